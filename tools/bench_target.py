"""Target CPUs (issue 21): the zoo pruned at ``--target-macs`` for each target CPU, on the machine at hand.

Per model and ``--target-cpu``: the default ``prune`` preset (calibration on ``models/fmnist_calib.npz``),
its kept channels per group, its MACs ratio, the MACs the target computes (channels padded to its NCHWc
blocks: :meth:`graphopt.measure.latency.LatencyModel.macs_only` with the target's geometry, a ratio of the
pruned to the original model), the accuracy drop on ``models/fmnist_eval.npz`` (2000 samples; accuracy
does not depend on the CPU), and, for the target that *is* this machine only, the measured speed-up:
original against pruned, onnxruntime ENABLE_ALL, 1 thread, batch 64, ``--runs`` alternating pairs per
round (CPU time; :func:`bench_pair.ab_seconds`), median and range of ``--rounds`` rounds. A target that
is not this machine cannot be timed here: its row says so.

The first line names the machine: the CPU kind graphopt detects, the CPU, onnxruntime's version.

Command::

    python tools/bench_target.py [--models vgg,resnet,mobilenetv2] [--targets auto,avx512] [--target-macs 0.5]
                                 [--rounds 5] [--runs 20] [--option prune_filters.KEY=VALUE ...]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import onnxruntime as ort  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prune import MODELS, _ab, _accuracy, _macs, _prune, _speedup  # noqa: E402

from graphopt.core.onnx_io import from_proto, load, to_proto  # noqa: E402
from graphopt.measure import latency as lat  # noqa: E402
from graphopt.measure import target as targets  # noqa: E402
from graphopt.measure.calibration import load_data  # noqa: E402


def charged_ratio(original, pruned, target: targets.Target) -> float | None:
    """MACs the target computes (padded to its blocks) of ``pruned`` over ``original`` (both cleaned)."""
    from graphopt.app.api import optimize
    model = lat.LatencyModel.macs_only(target.path)
    before = lat.model_time(optimize(to_proto(original), preset="lossless", run_verify=False).ir, model)[0]
    after = lat.model_time(from_proto(pruned), model)[0]
    return after / before if before and after else None


def row(name: str, spec: str, target_macs: float, runs: int, rounds: int,
        options: Sequence[str] = ()) -> list[str]:
    target = targets.resolve(spec)
    original = load(MODELS / f"{name}.onnx")
    calib = load_data(MODELS / "fmnist_calib.npz", original)
    evaluation = load_data(MODELS / "fmnist_eval.npz", original)
    proto, stats, seconds = _prune(name, calib, target_macs, list(options), target_cpu=spec)
    kept = " ".join(str(g["channels_after"]) for g in stats["groups"])
    ref, acc = _accuracy(name, proto, evaluation)
    charged = charged_ratio(original, proto, target)
    if target.native:
        _, _, ratios = _ab(to_proto(original), proto, evaluation.head(64).inputs, runs, rounds)
        speed = _speedup(ratios)
    else:
        speed = f"not timed (this machine is not {target.name})"
    return [name, f"{target.name} ({spec})", target.profile, kept, f"{_macs(proto) / _macs(original):.3f}",
            f"{charged:.3f}" if charged else "?", f"{acc - ref:+.2f}", speed, f"{seconds:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg,resnet,mobilenetv2")
    parser.add_argument("--targets", default="auto,avx512")
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--option", action="append", default=[], metavar="PASS.KEY=VALUE",
                        help="a pass option for every prune (as graphopt optimize --option)")
    args = parser.parse_args()
    host = targets.resolve("auto")
    print(f"Machine: {host.host.cpu if host.host else '?'}, detected CPU kind {host.name} "
          f"({' '.join(host.host.evidence) if host.host else '?'}; onnxruntime blocks {host.path.block} channels), "
          f"onnxruntime {ort.__version__}\n")
    header = ["model", "target CPU", "profile", "kept channels per group", "MACs ratio", "MACs the target computes",
              "acc drop (pts)", "speed-up (batch 64)", "prune s"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in args.models.split(","):
        for spec in args.targets.split(","):
            print("| " + " | ".join(row(name, spec, args.target_macs, args.runs, args.rounds, args.option)) + " |", flush=True)


if __name__ == "__main__":
    main()
