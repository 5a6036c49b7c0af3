"""Distillation fine-tuning benchmark (issue 17): least squares only against + fine-tuning.

For each model and MAC target: graphopt's ``prune`` preset (least-squares re-fit, calibration on
``models/fmnist_calib.npz``), then the ``finetune`` pass with the original as teacher and no labels,

* on the 512 calibration images (410 trained on, 102 held out by the pass) with shifts and flips, and
* (``--full``) on the 60,000 unlabeled Fashion-MNIST training images (``apt-get install
  dataset-fashion-mnist``), written as 6 ``.npz`` shards the pass streams,

exactly what ``graphopt optimize MODEL --preset prune+finetune --target-macs T --data
models/fmnist_calib.npz [--train-data DIR]`` runs (the pass is called on the pruned model here so one
pruning serves both variants). Accuracy is top-1 on the 10,000 Fashion-MNIST test images in
onnxruntime; ``time`` is the finetune pass's wall time (training and its checks). Speed-up is the
pruned model against the original (onnxruntime ENABLE_ALL, 1 thread, batch 64, alternating runs,
median of ``--rounds`` rounds). Each time cell gives the pass's wall time and its process CPU time
(torch's threads, the teacher's onnxruntime thread and the thread that prepares batches): the wall
time counts waiting for a shared machine, the CPU time does not.

Commands::

    python tools/bench_finetune.py [--models vgg,resnet,mobilenetv2] [--targets 0.5,0.35,0.25]
                                   [--full] [--epochs 2] [--lr LR] [--steps 300] [--threads N]
                                   [--option KEY=VALUE ...] [--skip-calib] [--rounds 3]
                                   [--seeds 0] [--prune-option KEY=VALUE ...]

``--threads`` and ``--option`` (finetune options, e.g. ``temperature=1``) apply to both fine-tuning
columns, ``--lr`` to the 60k column; left out, the pass's defaults hold. ``--prune-option`` passes
``prune_filters`` options to the pruning (e.g. ``multiple=16``); the ``kept`` column is the allocation
(kept channels per group). ``--seeds 0,1,2`` fine-tunes the same pruned model once per seed: the cell
gives each seed's accuracy, their mean and the spread (max − min). Each time cell also gives the
training thread's CPU time (``seconds_training_thread_cpu``): on an idle machine a step takes about
that (the next batch is made in the other thread), so it is the training time on this machine
unloaded; the wall time under load is an upper bound.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import gzip
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_pair import ab_seconds  # noqa: E402

from graphopt.app.api import optimize  # noqa: E402
from graphopt.core.manager import PassContext, get_pass  # noqa: E402
from graphopt.core.onnx_io import load, to_proto  # noqa: E402
from graphopt.measure import analysis  # noqa: E402
from graphopt.measure import ort as gort  # noqa: E402
from graphopt.measure.calibration import load_data  # noqa: E402

MODELS = ROOT / "models"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.286, 0.353   # the zoo's input normalisation (models/README.md)


def read_images(prefix: str) -> np.ndarray:
    with gzip.open(FMNIST / f"{prefix}-images-idx3-ubyte.gz", "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    return ((raw.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


def read_labels(prefix: str) -> np.ndarray:
    with gzip.open(FMNIST / f"{prefix}-labels-idx1-ubyte.gz", "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)


def accuracy(proto, images: np.ndarray, labels: np.ndarray) -> float:
    sess = gort.session(proto, threads=1)
    correct = 0
    for start in range(0, len(images), 500):
        logits = gort.run(sess, {"input": images[start:start + 500]})["logits"]
        correct += int((logits.argmax(1) == labels[start:start + 500]).sum())
    return 100.0 * correct / len(images)


def write_shards(folder: Path, images: np.ndarray, shards: int = 6) -> Path:
    for i, part in enumerate(np.array_split(images, shards)):
        np.savez(folder / f"train_{i}.npz", input=part)
    return folder


def finetune(name: str, pruned, calib, options: dict, train_data: Path | None, seed: int = 0):
    model = pruned.clone()
    ctx = PassContext(options={"finetune": options}, seed=seed, data=calib, original=load(MODELS / f"{name}.onnx"),
                      train_data=train_data)
    started, cpu = time.perf_counter(), time.process_time()
    result = get_pass("finetune").run(model, ctx)
    return model, result.stats, (time.perf_counter() - started, time.process_time() - cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg,resnet,mobilenetv2")
    parser.add_argument("--targets", default="0.5,0.35,0.25")
    parser.add_argument("--full", action="store_true", help="also fine-tune on the 60k training images")
    parser.add_argument("--epochs", type=float, default=2.0, help="epochs over the 60k images")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate on the 60k images (default: the pass's)")
    parser.add_argument("--steps", type=int, default=0, help="steps on the calibration images (0: the default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the pass's)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a finetune option for both columns (repeatable)")
    parser.add_argument("--skip-calib", action="store_true", help="leave out the calibration-only column")
    parser.add_argument("--rounds", type=int, default=3, help="speed-up rounds (0: not timed)")
    parser.add_argument("--seeds", default="0", help="fine-tuning seeds, comma-separated (one run each)")
    parser.add_argument("--prune-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a prune_filters option for the pruning (repeatable)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    prune_options = {f"prune_filters.{k}": v for k, v in (_parse(o) for o in args.prune_option)}
    common = dict(_parse(o) for o in args.option)
    if args.threads is not None:
        common["threads"] = args.threads

    test_x, test_y = read_images("t10k"), read_labels("t10k")
    tmp = tempfile.TemporaryDirectory(prefix="bench_finetune_")
    shards = write_shards(Path(tmp.name), read_images("train")) if args.full else None
    header = ["model", "target MACs", "kept", "reached", "original", "least squares only"]
    if not args.skip_calib:
        header.append("+ finetune, 512 calib (time)")
    if args.full:
        header.append(f"+ finetune, 60k unlabeled, {args.epochs:g} epochs (time)")
    header.append("speed-up (batch 64)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in args.models.split(","):
        path = MODELS / f"{name}.onnx"
        original = load(path)
        calib = load_data(MODELS / "fmnist_calib.npz", original)
        acc0 = accuracy(to_proto(original), test_x, test_y)
        macs0 = analysis.analyze(original).macs
        for target in [float(t) for t in args.targets.split(",")]:
            result = optimize(path, preset="prune", target_macs=target, data=calib, options=prune_options,
                              run_verify=False)
            pruned = result.ir
            groups = next(p["stats"] for p in result.report["passes"] if p["name"] == "prune_filters")["groups"]
            reached = analysis.analyze(pruned).macs / macs0
            acc_ls = accuracy(to_proto(pruned), test_x, test_y)
            kept = " ".join(str(g["channels_after"]) for g in groups)
            row = [name, f"{target:g}", kept, f"{reached:.3f}", f"{acc0:.2f}", f"{acc_ls:.2f}"]
            if not args.skip_calib:
                calib_opts = {**common, **({"steps": args.steps} if args.steps else {})}
                row.append(_cells([_scored(finetune(name, pruned, calib, calib_opts, None, seed), test_x, test_y)
                                   for seed in seeds]))
            if args.full:
                full_opts = {**common, "epochs": args.epochs, **({"lr": args.lr} if args.lr else {})}
                row.append(_cells([_scored(finetune(name, pruned, calib, full_opts, shards, seed), test_x, test_y)
                                   for seed in seeds]))
            feeds = {"input": test_x[:64]}
            ratios = [a / b for a, b in (ab_seconds(to_proto(original), to_proto(pruned), runs=40, feeds=feeds)
                                         for _ in range(args.rounds))]
            row.append(f"{np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "not timed")
            print("| " + " | ".join(row) + " |", flush=True)
    tmp.cleanup()


def _parse(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def _scored(run: tuple, test_x, test_y) -> tuple[float | None, dict, tuple[float, float]]:
    """``(test accuracy or None when the pass left the model unchanged, stats, seconds)``; the run's
    line goes to stderr at once, so a long series shows its progress."""
    model, stats, seconds = run
    acc = None if stats.get("skipped") else accuracy(to_proto(model), test_x, test_y)
    print(f"  {acc if acc is not None else stats['skipped']} ({_times(stats, seconds)})", file=sys.stderr, flush=True)
    return acc, stats, seconds


def _cells(runs: list[tuple]) -> str:
    """One run: its accuracy and times. Several seeds: each seed's accuracy, the mean and the spread
    (max − min), and each run's times."""
    if len(runs) == 1 or any(acc is None for acc, _, _ in runs):
        return "; ".join(_cell(*run) for run in runs)
    accs = [acc for acc, _, _ in runs]
    return (f"mean {np.mean(accs):.2f}, spread {max(accs) - min(accs):.2f} ("
            + ", ".join(f"{a:.2f}" for a in accs) + f"; {runs[0][1]['steps']} steps; "
            + "; ".join(_times(stats, seconds) for _, stats, seconds in runs) + ")")


def _times(stats: dict, seconds: tuple[float, float]) -> str:
    text = f"{seconds[0]:.0f} s wall, {seconds[1]:.0f} s CPU"
    if "seconds_training_thread_cpu" in stats:
        text += (f", training {stats['seconds_training']:.0f} s wall / "
                 f"{stats['seconds_training_thread_cpu']:.0f} s thread CPU")
    return text


def _cell(acc: float | None, stats: dict, seconds: tuple[float, float]) -> str:
    if acc is None:
        return f"unchanged: {stats['skipped']} ({_times(stats, seconds)})"
    return f"{acc:.2f} ({_times(stats, seconds)}, {stats['steps']} steps)"


if __name__ == "__main__":
    main()
