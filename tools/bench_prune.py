"""Filter pruning benchmark (issue 5): accuracy at half the MACs, validity on the zoo, latency.

Tables (markdown on stdout; every number measured in this one run):

1. ``accuracy`` — per model (default vgg, resnet, mobilenetv2) at ``--target-macs`` (0.5), accuracy on
   ``models/fmnist_eval.npz`` (2000 samples; calibration on ``models/fmnist_calib.npz``), no fine-tuning:
   graphopt's ``prune`` preset with the default ThiNet ranking + sensitivity allocation + least-squares
   reconstruction; the same kept channels without reconstruction; uniform ratios per criterion with and
   without reconstruction; ``l1`` with the sensitivity allocation; and onnxsim's
   ``apply_structured_pruning`` on the same models (failures, e.g. models onnxruntime rejects, recorded).
2. ``zoo`` — every zoo model through the default ``prune`` preset: valid (onnx.checker + onnxruntime runs),
   MACs ratio (graphopt.measure.analysis), groups pruned / prunable, accuracy drop.
3. ``latency`` — onnxruntime ENABLE_ALL, 1 intra-op thread, original vs pruned, alternating A/B runs in
   one process (CPU time of the process; medians), batch 64 on the zoo CNNs, and the synthetic ResNet-18
   at 224x224 (random weights; pruned with l1 / uniform / no reconstruction, accuracy is meaningless there).
   ``--rounds R`` times each pair R times and reports the median speed-up and its range: on a shared
   machine the ratio itself drifts by several percent from one minute to the next.

4. ``seeds`` — the default ``prune`` preset at ``--seeds`` seeds (default 4; the seed draws the rows the
   least-squares fits sample): accuracy drop per seed, to show how far from the 1-point bar a run can land.
5. ``frontier`` — random allocations (kept counts multiples of 8, MACs within 1% of the target) of one
   model (default mobilenetv2), each pruned by hand (``prune_filters.channels``, L1 order, no re-fit):
   measured speed-up (batch 64) against the speed-up the latency model predicts, and, for the fastest
   ``--top`` and the default allocation, the accuracy drop with ThiNet + least-squares re-fit: what
   speed is for sale at these MACs, and at what accuracy. ``--radius R`` draws them within ``R`` channels
   of the default allocation per group instead: a local search for a faster allocation that keeps the
   accuracy. The allocations are pruned and the fastest re-fitted through an executor (``--executor``,
   ``--workers``, ``--ray-address`` as in ``graphopt optimize``); the timing stays in this process.

Commands::

    python tools/bench_prune.py accuracy [--models vgg,resnet,mobilenetv2]
    python tools/bench_prune.py zoo
    python tools/bench_prune.py latency [--runs 20] [--rounds 5]
    python tools/bench_prune.py seeds [--seeds 4]
    python tools/bench_prune.py frontier [--models mobilenetv2] [--samples 40] [--top 4] [--radius 16] [--rounds 5]
                                         [--executor process|ray] [--workers N] [--ray-address ADDR]
    python tools/bench_prune.py all
"""

from __future__ import annotations

import os

# One BLAS thread: the machine is shared, and OpenBLAS's pool spinning against other processes slows
# the least-squares work (must be set before numpy loads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_pair import ab_seconds  # noqa: E402  (tools/ is on sys.path when run as a script)

from graphopt.app.api import optimize
from graphopt.core.onnx_io import from_proto, load, to_proto
from graphopt.measure import ort as gort
from graphopt.measure.analysis import analyze
from graphopt.measure.calibration import SampleData, load_data, random_data
from graphopt.measure.executor import KINDS, InProcess, opened
from graphopt.measure.verify import verify

MODELS = ROOT / "models"
ZOO = ["vgg", "resnet", "mobilenetv2", "inception", "shufflenet", "senet", "lenet5", "lenet300", "transformer"]


def _macs(model: Any) -> int | None:
    """MACs per image (batch 1; the zoo's input is [N, 1, 28, 28], fixed so that dynamic reshapes resolve)."""
    ir = model if not isinstance(model, onnx.ModelProto) else from_proto(model)
    shapes = {v.name: [1, *v.shape[1:]] for v in ir.graph.inputs
              if v.shape and all(isinstance(d, int) for d in v.shape[1:])}
    macs = analyze(ir, input_shapes=shapes or None).macs
    if macs is None:  # reshape targets computed at run time (shufflenet): count the cleaned-up model
        macs = analyze(optimize(to_proto(ir), preset="lossless", run_verify=False).ir,
                       input_shapes=shapes or None).macs
    return macs


def _prune(name: str, calib: SampleData, target: float, options: dict[str, Any], preset: str = "prune",
           passes: list[str] | None = None, target_cpu: str | None = None) -> tuple[onnx.ModelProto, dict, float]:
    start = time.perf_counter()
    result = optimize(MODELS / f"{name}.onnx", preset=None if passes else preset, passes=passes, data=calib,
                      target_macs=target, options=options, run_verify=False, target_cpu=target_cpu)
    stats = next(p["stats"] for p in result.report["passes"] if p["name"] == "prune_filters")
    return result.model, stats, time.perf_counter() - start


def _without_reconstruction(name: str, calib: SampleData, stats: dict) -> onnx.ModelProto:
    """The kept channels of a ``prune`` run, applied to the same cleaned model without re-fitting."""
    from graphopt.compress import channels
    from graphopt.passes.lossy.prune import apply_plan
    cleaned = optimize(MODELS / f"{name}.onnx", preset="lossless", run_verify=False).ir
    analysis = channels.analyze(cleaned)
    keep = {g["group"]: np.array(g["kept"], dtype=np.int64) for g in stats["groups"] if g["kept"] != "all"}
    apply_plan(cleaned, analysis, keep, cleaned.clone(), None, refit=False,
               refit_scope="consumers", max_rows=0, seed=0, batch=64)
    return to_proto(cleaned)


def _accuracy(name: str, proto: onnx.ModelProto, evaluation: SampleData) -> tuple[float, float]:
    report = verify(MODELS / f"{name}.onnx", proto, evaluation, mode="accuracy")
    if report.accuracy_candidate is None:
        raise RuntimeError(report.reasons[0] if report.reasons else "no accuracy")
    return report.accuracy_reference, report.accuracy_candidate


def _row(rows: list, model: str, variant: str, make, evaluation: SampleData, macs0: int) -> Any:
    start = time.perf_counter()
    try:
        out = make()
        proto, seconds = (out[0], out[2]) if isinstance(out, tuple) else (out, time.perf_counter() - start)
        gort.session(proto)  # onnxruntime must load it
        ref, acc = _accuracy(model, proto, evaluation)
        macs = _macs(proto)
        rows.append([model, variant, f"{macs / macs0:.3f}" if macs else "?", f"{ref:.2f}", f"{acc:.2f}",
                     f"{acc - ref:+.2f}", f"{seconds:.0f}"])
        return out
    except Exception as exc:  # noqa: BLE001 - a failing variant is a result, not a crash of the benchmark
        rows.append([model, variant, "-", "-", "-", f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}",
                     f"{time.perf_counter() - start:.0f}"])
        return None


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def accuracy_table(models: list[str], target: float) -> str:
    import onnxsim
    rows: list[list[str]] = []
    for name in models:
        original = load(MODELS / f"{name}.onnx")
        calib = load_data(MODELS / "fmnist_calib.npz", original)
        evaluation = load_data(MODELS / "fmnist_eval.npz", original)
        macs0 = _macs(original)
        main = _row(rows, name, "thinet + sensitivity + LS (default)", partial(_prune, name, calib, target, {}),
                    evaluation, macs0)
        if main is not None:
            _row(rows, name, "thinet + sensitivity, no LS", partial(_without_reconstruction, name, calib, main[1]),
                 evaluation, macs0)
        _row(rows, name, "l1 + sensitivity + LS", partial(_prune, name, calib, target, {"prune_filters.criterion": "l1"}),
             evaluation, macs0)
        for crit in ("l1", "l2", "mean", "apoz", "thinet"):
            for rec in (False, True):
                if crit not in ("l1", "thinet") and not rec:
                    continue
                opts = {"prune_filters.criterion": crit, "prune_filters.allocation": "uniform",
                        "prune_filters.refit": rec}
                _row(rows, name, f"{crit} + uniform{' + LS' if rec else ', no LS'}",
                     partial(_prune, name, calib, target, opts), evaluation, macs0)
        # BN scale needs the BN nodes: prune the raw export (the prune preset folds BN first).
        bn = {"prune_filters.criterion": "bn", "prune_filters.allocation": "uniform"}
        _row(rows, name, "bn + uniform + LS (no cleanup first)",
             partial(_prune, name, calib, target, bn, passes=["prune_filters"]), evaluation, macs0)
        for sparsity in (0.3, 0.5):
            _row(rows, name, f"onnxsim apply_structured_pruning(sparsity={sparsity})",
                 partial(onnxsim.apply_structured_pruning, str(MODELS / f"{name}.onnx"), sparsity=sparsity),
                 evaluation, macs0)
        print(f"[{name} done]", file=sys.stderr, flush=True)
    return _table(["model", "variant", "MACs ratio", "orig acc", "acc", "drop (pts)", "time (s)"], rows)


def zoo_table(models: list[str], target: float) -> tuple[str, dict[str, onnx.ModelProto]]:
    rows, pruned = [], {}
    for name in models:
        original = load(MODELS / f"{name}.onnx")
        calib = load_data(MODELS / "fmnist_calib.npz", original)
        evaluation = load_data(MODELS / "fmnist_eval.npz", original)
        try:
            proto, stats, seconds = _prune(name, calib, target, {})
            onnx.checker.check_model(proto)
            gort.session(proto)
            ref, acc = _accuracy(name, proto, evaluation)
            macs0, macs = _macs(original), _macs(proto)
            ratio = f"{macs / macs0:.3f}" if macs and macs0 else "?"
            within = "yes" if macs and macs0 and abs(macs / macs0 - target) <= 0.05 * target else "no"
            rows.append([name, "yes", ratio, within, f"{stats.get('pruned_groups', 0)}/{stats.get('prunable_groups', 0)}",
                         f"{acc - ref:+.2f}", f"{seconds:.0f}", stats.get("allocation", {}).get("not_met", "")
                         or stats.get("skipped", "")])
            pruned[name] = proto
        except Exception as exc:  # noqa: BLE001 - a model that fails is a result
            rows.append([name, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}", "", "", "", "", "", ""])
        print(f"[{name} done]", file=sys.stderr, flush=True)
    header = ["model", "valid", "MACs ratio", "within 5%", "groups pruned/prunable", "acc drop (pts)", "time (s)",
              "note"]
    return _table(header, rows), pruned


def _ab(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int,
        rounds: int = 1) -> tuple[float, float, list[float]]:
    """Median CPU seconds of ``a`` and ``b`` (ENABLE_ALL, 1 thread, alternating which goes first) over
    ``rounds`` rounds of ``runs`` pairs, and each round's ratio: the ratio drifts with the machine's
    state, so one round can land either side of a threshold."""
    times = [ab_seconds(a, b, runs=runs, feeds=feeds) for _ in range(rounds)]
    ratios = [ta / tb for ta, tb in times]
    return float(np.median([t[0] for t in times])), float(np.median([t[1] for t in times])), ratios


def _speedup(ratios: list[float]) -> str:
    """``1.62x`` for one round, ``1.62x (1.55-1.68)``: the median and range over rounds."""
    med = float(np.median(ratios))
    return f"{med:.2f}x" if len(ratios) == 1 else f"{med:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def latency_table(pruned: dict[str, onnx.ModelProto], runs: int, batch: int, rounds: int = 1) -> str:
    """The default ``prune`` preset (channel counts multiples of 8, allocator buying MACs weighted by a
    time per MAC: ``latency=ops``) against the same with the allocator buying plain MACs (``latency=macs``), both
    against the original. The synthetic ResNet-18 rows compare ``multiple`` 1 and 8 (onnxruntime's NCHWc
    conv kernels work in blocks of 8 channels on AVX2: other counts fall back to slower paths)."""
    rows = []
    for name, proto in pruned.items():
        original = load(MODELS / f"{name}.onnx")
        evaluation = load_data(MODELS / "fmnist_eval.npz", original)
        feeds = evaluation.head(batch).inputs
        variants = [("default (target's channel units, latency=ops)", proto, None)]
        try:
            calib = load_data(MODELS / "fmnist_calib.npz", original)
            pm = _prune(name, calib, 0.5, {"prune_filters.latency": "macs"})[0]
            variants.append(("latency=macs", pm, _accuracy(name, pm, evaluation)))
        except Exception as exc:  # noqa: BLE001 - recorded as a result
            rows.append([name, "latency=macs", "-", "-", "-", "-", f"failed: {type(exc).__name__}"])
        for label, candidate, acc in variants:
            if acc is None:
                acc = _accuracy(name, candidate, evaluation)
            a, b, ratios = _ab(to_proto(original), candidate, feeds, runs, rounds)
            rows.append([name, label, f"{_macs(candidate) / _macs(original):.3f}", f"{acc[1] - acc[0]:+.2f}",
                         f"{a * 1e3:.1f}", f"{b * 1e3:.1f}", _speedup(ratios)])
        print(f"[latency {name} done]", file=sys.stderr, flush=True)
    rows += [_resnet18_row(runs, m, rounds) for m in (1, 8)]
    speed = "speed-up" if rounds == 1 else f"speed-up (median and range of {rounds} rounds)"
    return _table(["model", "variant", "MACs ratio", "acc drop", f"original ms (batch {batch})", "pruned ms",
                   speed], rows)


def _resnet18_row(runs: int, multiple: int, rounds: int = 1) -> list[str]:
    sys.path.insert(0, str(ROOT / "tools"))
    from synthetic_models import resnet18
    proto = resnet18(batch=1, image=224)
    ir = from_proto(proto)
    data = random_data(ir, 2, seed=0)
    result = optimize(proto, preset="prune", data=data, target_macs=0.5, run_verify=False,
                      options={"prune_filters.criterion": "l1", "prune_filters.allocation": "uniform",
                               "prune_filters.refit": False, "prune_filters.multiple": multiple})
    feeds = random_data(ir, 1, seed=1).inputs
    a, b, ratios = _ab(proto, result.model, feeds, max(runs // 2, 5), rounds)
    return ["resnet18 (synthetic, 224x224, batch 1, l1/uniform)", f"multiple={multiple}",
            f"{_macs(result.model) / _macs(proto):.3f}", "n/a (random weights)", f"{a * 1e3:.1f}", f"{b * 1e3:.1f}",
            _speedup(ratios)]


def seeds_table(models: list[str], target: float, seeds: int) -> str:
    rows = []
    for name in models:
        original = load(MODELS / f"{name}.onnx")
        calib = load_data(MODELS / "fmnist_calib.npz", original)
        evaluation = load_data(MODELS / "fmnist_eval.npz", original)
        drops = []
        for seed in range(seeds):
            result = optimize(MODELS / f"{name}.onnx", preset="prune", data=calib, target_macs=target,
                              run_verify=False, seed=seed)
            stats = next(p["stats"] for p in result.report["passes"] if p["name"] == "prune_filters")
            ref, acc = _accuracy(name, result.model, evaluation)
            drops.append(ref - acc)
            rows.append([name, seed, f"{_macs(result.model) / _macs(original):.3f}", f"{acc - ref:+.2f}",
                         " ".join(str(g["channels_after"]) for g in stats["groups"])])
        rows.append([name, "worst", "", f"{-max(drops):+.2f}", f"mean {-float(np.mean(drops)):+.2f}"])
        print(f"[seeds {name} done]", file=sys.stderr, flush=True)
    return _table(["model", "seed", "MACs ratio", "acc drop (pts)", "kept channels per group"], rows)


@dataclass
class Frontier:
    """What an executor's worker needs to prune one allocation of the frontier search."""

    name: str
    target: float
    batch: int


def pruned_by_hand(ctx: Frontier, keep: dict[int, int]) -> tuple[bytes, float | None]:
    """The model pruned to ``keep`` (L1 order, no re-fit) and its predicted time at the batch (a worker's job)."""
    from graphopt.measure import latency as lat
    proto = optimize(MODELS / f"{ctx.name}.onnx", preset="prune", run_verify=False,
                     options={"prune_filters.channels": _plan_text(keep), "prune_filters.criterion": "l1",
                              "prune_filters.refit": False}).model
    return proto.SerializeToString(), lat.model_time(from_proto(proto), lat.load(), batch=ctx.batch)[0]


def refit_drop(ctx: Frontier, keep: dict[int, int]) -> str:
    """Accuracy drop of the model pruned to ``keep`` with the default ranking and re-fit (a worker's job)."""
    original = load(MODELS / f"{ctx.name}.onnx")
    calib = load_data(MODELS / "fmnist_calib.npz", original)
    proto = _prune(ctx.name, calib, ctx.target, {"prune_filters.channels": _plan_text(keep)})[0]
    ref, acc = _accuracy(ctx.name, proto, load_data(MODELS / "fmnist_eval.npz", original))
    return f"{acc - ref:+.2f}"


def frontier_table(name: str, target: float, samples: int, top: int, runs: int, batch: int, radius: int = 0,
                   rounds: int = 1, executor: Any = None) -> str:
    """Random allocations at ``target`` MACs: measured vs predicted speed-up, accuracy of the fastest.

    ``radius > 0`` draws them around the default allocation instead (each group's kept count within
    ``radius`` channels of the default's), to look for a faster allocation that keeps its accuracy.
    The allocations are pruned, and the fastest re-fitted and scored, through ``executor`` (in-process by
    default; ``--executor``/``--workers``); the speed-ups are timed here, one pair at a time.
    """
    from graphopt.compress import channels
    from graphopt.measure import latency as lat
    from graphopt.measure import target as targets

    path = MODELS / f"{name}.onnx"
    original = load(path)
    calib = load_data(MODELS / "fmnist_calib.npz", original)
    evaluation = load_data(MODELS / "fmnist_eval.npz", original)
    macs0 = _macs(original)
    cleaned = optimize(path, preset="lossless", run_verify=False).ir
    analysis = channels.analyze(cleaned)
    default_model, default, _ = _prune(name, calib, target, {})
    default_keep = {g["group"]: g["channels_after"] for g in default["groups"]}
    plans = random_plans(analysis, macs0, target, samples, radius, default_keep)
    latency = targets.resolve().latency  # the default target's (this machine's) profile
    t0 = lat.model_time(cleaned, latency, batch=batch)[0]  # BN folded, as onnxruntime runs it
    feeds = evaluation.head(batch).inputs
    executor = executor or InProcess()
    job = Frontier(name, target, batch)
    measured = []
    for keep, (blob, t1) in zip([default_keep, *plans], executor.map(pruned_by_hand, [default_keep, *plans],
                                                                     context=job)):
        proto = onnx.load_from_string(blob)
        ratios = _ab(to_proto(original), proto, feeds, runs, rounds)[2]
        measured.append((keep, _macs(proto) / macs0, t0 / t1 if t0 and t1 else float("nan"),
                         float(np.median(ratios))))
    ordered = [measured[0], *sorted(measured[1:], key=lambda r: -r[3])]
    # the default's own model; the fastest others pruned by hand with the default ranking and re-fit
    ref, acc = _accuracy(name, default_model, evaluation)
    drops = [f"{acc - ref:+.2f}", *executor.map(refit_drop, [keep for keep, *_ in ordered[1:top + 1]], context=job)]

    rows = []
    for i, (keep, ratio, predicted, speed) in enumerate(ordered):
        label = "default" if i == 0 else f"{'nearby' if radius else 'random'} #{i}"
        rows.append([label, " ".join(str(k) for k in keep.values()), f"{ratio:.3f}", f"{predicted:.2f}x",
                     f"{speed:.2f}x", drops[i] if i < len(drops) else ""])
    from scipy.stats import spearmanr  # the bench extra
    rho = float(spearmanr([r[2] for r in measured], [r[3] for r in measured])[0])
    table = _table(["allocation", "kept channels per group", "MACs ratio", "predicted speed-up",
                    f"measured speed-up (batch {batch})", "acc drop (ThiNet + LS)"], rows)
    return table + (f"\n\nRank correlation of predicted and measured speed-up over {len(measured)} allocations: "
                    f"{rho:.2f}")


def random_plans(analysis, macs0: float, target: float, samples: int, radius: int, default_keep: dict[int, int], *,
                 seed: int = 0) -> list[dict[int, int]]:
    """Up to ``samples`` distinct random kept counts per group (multiples of 8 and of the group's
    divisor; within ``radius`` channels of ``default_keep`` when ``radius`` > 0) whose MACs ratio (of
    ``macs0``) is within 1 % of ``target``, none equal to ``default_keep``."""
    rng = np.random.default_rng(seed)
    groups = analysis.prunable()
    plans: list[dict[int, int]] = []
    for _ in range(2000 * samples):
        if len(plans) >= samples:
            break
        keep = {g.gid: _random_count(rng, g, radius, default_keep.get(g.gid, g.size)) for g in groups}
        macs = analysis.cost(keep)[0]
        if abs(macs / macs0 - target) <= 0.01 * target and keep not in plans and keep != default_keep:
            plans.append(keep)
    return plans


def _random_count(rng, group, radius: int, default: int) -> int:
    step = int(np.lcm(8, max(group.divisor, 1)))
    counts = range(step, group.size + 1, step)
    if radius:
        counts = [k for k in counts if abs(k - default) <= radius]
    return int(rng.choice(counts)) if group.size >= step and counts else group.size


def _plan_text(keep: dict[int, int]) -> str:
    """Kept counts as option ``prune_filters.channels`` takes them (``"3:40,7:64"``)."""
    return ",".join(f"{gid}:{k}" for gid, k in keep.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["accuracy", "zoo", "latency", "seeds", "frontier", "all"])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--samples", type=int, default=40, help="random allocations (frontier)")
    parser.add_argument("--top", type=int, default=4, help="fastest allocations re-fitted and scored (frontier)")
    parser.add_argument("--radius", type=int, default=0,
                        help="frontier: draw allocations within this many channels of the default's, per group")
    parser.add_argument("--models", default=None, help="comma-separated zoo names")
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1,
                        help="latency, frontier: time each pair this many times (the median speed-up; latency "
                             "also prints the range)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--executor", choices=KINDS, help="frontier: where the allocations are pruned and scored "
                        "(as graphopt optimize's --executor)")
    parser.add_argument("--workers", type=int, help="frontier: processes or Ray CPUs (as graphopt's --workers)")
    parser.add_argument("--ray-address", help="frontier: a Ray cluster to use (implies --executor ray)")
    args = parser.parse_args(argv)
    if args.what in ("accuracy", "all"):
        models = args.models.split(",") if args.models else ["vgg", "resnet", "mobilenetv2"]
        print(f"## Accuracy at {args.target_macs} MACs (fmnist_eval, 2000 samples; no fine-tuning)\n")
        print(accuracy_table(models, args.target_macs), flush=True)
        print()
    if args.what == "seeds":
        models = args.models.split(",") if args.models else ["vgg", "resnet", "mobilenetv2"]
        print(f"## Accuracy at {args.target_macs} MACs over {args.seeds} seeds\n")
        print(seeds_table(models, args.target_macs, args.seeds), flush=True)
        return
    if args.what == "frontier":
        with opened(args.executor, args.workers, address=args.ray_address) as executor:
            for name in (args.models.split(",") if args.models else ["mobilenetv2"]):
                print(f"## {name}: allocations at {args.target_macs} MACs\n")
                print(frontier_table(name, args.target_macs, args.samples, args.top, args.runs, args.batch,
                                     args.radius, args.rounds, executor), flush=True)
        return
    if args.what in ("zoo", "latency", "all"):
        models = args.models.split(",") if args.models and args.what != "all" else ZOO
        table, pruned = zoo_table(models, args.target_macs)
        if args.what in ("zoo", "all"):
            print(f"## Zoo at --target-macs {args.target_macs} (prune preset, defaults)\n")
            print(table, flush=True)
            print()
        if args.what in ("latency", "all"):
            cnns = {k: v for k, v in pruned.items() if k != "transformer"}
            print(f"## Latency (onnxruntime ENABLE_ALL, 1 thread, CPU time, median of {args.runs} alternating runs)\n")
            print(latency_table(cnns, args.runs, args.batch, args.rounds), flush=True)


if __name__ == "__main__":
    main()
