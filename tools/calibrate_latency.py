"""Check a latency profile (:mod:`graphopt.measure.latency`) against this machine.

Calibrating moved into the package: ``graphopt calibrate`` measures the profile of the machine at hand
(:mod:`graphopt.measure.calibrate`) and caches it; ``graphopt calibrate -o graphopt/data/latency_avx2.json``
on the AVX2 machine refreshes the shipped one. What stays here is the held-out check behind BENCHMARKS.md
("Latency model: predicted vs measured"):

``check`` — a fresh, differently seeded set of kernels (per-kind error of the profile), and whole zoo
            models (after the lossless preset) at batch 1 and 64 (sum of the predicted kernel times
            against the measured sum of kernel times in the profiler, and against the wall-clock time).

``int8``  — measures only the int8 kinds (fused int8 convs and GEMMs, and the conversions around them),
            each beside its float twin, and writes their coefficients into an existing profile in the
            time base of its float kinds (:func:`graphopt.measure.calibrate.fit`), the float kinds
            untouched: how the shipped AVX2 profile got its int8 prices without re-fitting the float
            ones every pruning result rests on.

Commands::

    python tools/calibrate_latency.py check [--profile FILE | --target-cpu KIND] [--seed 1]
    python tools/calibrate_latency.py int8 --into graphopt/data/latency_avx2.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphopt.core import scratch  # noqa: E402
from graphopt.measure import calibrate as cal  # noqa: E402
from graphopt.measure import latency as lat  # noqa: E402
from graphopt.measure import ort as gort  # noqa: E402
from graphopt.measure import target as targets  # noqa: E402

ZOO = ["vgg", "resnet", "mobilenetv2", "inception", "shufflenet", "senet", "lenet5", "lenet300", "transformer"]


def _print_quality(title: str, quality: dict[str, dict]) -> None:
    print(f"\n{title}\n\n| kind | kernels | median rel. error | 90th pct rel. error |\n|---|---|---|---|")
    for kind, q in quality.items():
        print(f"| {kind} | {q['n']} | {q['median_rel_error']:.1%} | {q['p90_rel_error']:.1%} |")


def _wall(proto, batch: int, runs: int = 30) -> float:
    sess = gort.session(proto, optimize=True, threads=1)
    return cal.median_wall(sess, cal.feeds(sess, batch), runs)


def cmd_check(args) -> None:
    model = lat.load(args.profile) if args.profile else targets.resolve(args.target_cpu).latency
    records = cal.measure(cal.kernel_set(model.path, args.seed, args.scale), seconds=0.15)
    overhead = cal.profiler_overhead()
    quality = {}
    for kind in lat.KINDS:
        rows = [r for r in records if r["kind"] == kind]
        if rows:
            pred = np.array([model.time(lat.Work(kind, tuple(r["features"]))) for r in rows])
            quality[kind] = cal.errors(pred, cal.net_seconds(np.array([r["seconds"] for r in rows]), overhead))
    _print_quality(f"held-out kernels (seed {args.seed})", quality)
    print(f"\nwhole models: predicted vs measured (kernels = sum of the kernel times in onnxruntime's profiler, "
          f"less its {overhead * 1e6:.1f} us per kernel; wall = median run)\n\n"
          "| model | batch | predicted ms | kernels ms | wall ms | predicted / kernels | predicted / wall |\n"
          "|---|---|---|---|---|---|---|")
    from graphopt.core.manager import PassContext, build_pipeline, run_pipeline
    from graphopt.core.onnx_io import load as load_model
    from graphopt.core.onnx_io import to_proto
    for name in args.models.split(","):
        # after the lossless preset, as the lossy passes see a model: shape-computed Reshape targets are
        # constants there, so every shape is known
        ir = load_model(str(ROOT / "models" / f"{name}.onnx"))
        run_pipeline(build_pipeline("lossless"), ir, PassContext())
        proto = to_proto(ir)
        for batch in (1, 64):
            pred, _ = lat.model_time(ir, model, batch=batch)
            kernels = float(sum(cal.net_seconds(np.array([e["seconds"] for e in cal.profile_kernels(proto, batch)]),
                                                overhead)))
            wall = _wall(proto, batch)
            ratios = ["—", "—"] if pred is None else [f"{pred / kernels:.2f}", f"{pred / wall:.2f}"]
            print(f"| {name} | {batch} | {'—' if pred is None else f'{pred * 1e3:.3f}'} | {kernels * 1e3:.3f} | "
                  f"{wall * 1e3:.3f} | {ratios[0]} | {ratios[1]} |", flush=True)


def cmd_int8(args) -> None:
    import datetime

    import onnxruntime as ort

    path = Path(args.into)
    model = lat.LatencyModel.from_json(__import__("json").loads(path.read_text()))
    kernels = [k for k in cal.kernel_set(model.path, args.seed, args.scale) if k.kind in lat.INT8_KINDS]
    records = cal.measure(kernels, seconds=0.15)
    overhead = cal.profiler_overhead()
    coefficients, quality = cal.fit(records, overhead, reference=model)
    int8 = {k: coefficients[k] for k in lat.INT8_KINDS if k in coefficients}
    model.coefficients.update(int8)
    model.meta["int8"] = {"command": "python tools/calibrate_latency.py int8 --into " + args.into,
                          "date": datetime.date.today().isoformat(), "onnxruntime": ort.__version__,
                          "seed": args.seed, "kernels": len(records), "profiler_overhead_us": round(overhead * 1e6, 3),
                          "fit": {k: quality[k] for k in int8}}
    path.write_text(model.to_text())
    _print_quality(f"int8 kinds written into {path}", {k: quality[k] for k in int8})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--profile", default=None, help="a profile file (default: the target's)")
    c.add_argument("--target-cpu", default="auto")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--scale", type=float, default=1.0, help="kernels per kind, as a fraction of the quotas")
    c.add_argument("--models", default=",".join(ZOO))
    q = sub.add_parser("int8")
    q.add_argument("--into", required=True, help="the profile file to add the int8 coefficients to")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    with scratch.run():
        {"check": cmd_check, "int8": cmd_int8}[args.cmd](args)


if __name__ == "__main__":
    main()
