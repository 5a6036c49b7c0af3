"""Benchmark a calibration set given as a directory of ``.npz`` shards (``--data DIR``, issue 20).

1. **Memory against the number of shards.** The bundled calibration images (``models/fmnist_calib.npz``,
   512 images with labels) are tiled into shards of ``--shard-samples`` samples (shard ``k`` starts at
   image ``37·k``, so no two shards are the same), and directories of ``--counts`` shards are written.
   For each, ``graphopt optimize MODEL --data DIR --samples HEAD ARGS --no-verify -q`` runs in-process
   under ``/usr/bin/time -v``: its peak resident memory and its wall time. For contrast, the largest set
   as one ``.npz`` file (``--data FILE``: read whole; the passes then use its first ``samples``).
2. **The same bytes on every executor.** On the directory of ``--identical-count`` shards, the same
   command in-process, in a process pool (``--workers 2``) and on a local Ray cluster
   (``--executor ray --workers 2``, when the extra is installed): the written files compared byte for
   byte, and each run's time and peak memory (``/usr/bin/time`` counts the process and the children it
   waits for, so a pool's workers but not a Ray cluster's).

Every file goes to one private temporary directory, removed at the end.

Usage::

    python tools/bench_shards.py [--model models/resnet.onnx] [--shard-samples 4096] [--counts 2,8,32]
        [--head 128] [--identical-count 4] [--args "--preset prune --target-macs 0.5"]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_set(folder: Path, count: int, size: int) -> int:
    """``count`` shards of ``size`` images in ``folder``; returns the bytes written."""
    calib = np.load(ROOT / "models" / "fmnist_calib.npz")
    images, labels = calib["input"], calib["labels"]
    folder.mkdir(parents=True)
    total = 0
    for k in range(count):
        index = (np.arange(size) + 37 * k) % len(images)
        path = folder / f"part-{k:04d}.npz"
        np.savez(path, input=images[index], labels=labels[index])
        total += path.stat().st_size
    return total


def timed(argv: list[str], cwd: Path) -> dict:
    """``argv`` under ``/usr/bin/time -v``: exit code, wall seconds, peak RSS (MiB)."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *argv], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {shlex.join(argv)}\n{done.stderr[-2000:]}")
    return {"seconds": seconds, "rss_mib": int(rss.group(1)) / 1024 if rss else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "resnet.onnx"))
    parser.add_argument("--shard-samples", type=int, default=4096)
    parser.add_argument("--counts", default="2,8,32")
    parser.add_argument("--head", type=int, default=128, help="--samples: the head held in memory")
    parser.add_argument("--identical-count", type=int, default=4)
    parser.add_argument("--args", default="--preset prune --target-macs 0.5",
                        help="the pipeline's arguments (quoted)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-executors", action="store_true")
    args = parser.parse_args()
    graphopt = [sys.executable, "-m", "graphopt", "optimize", str(Path(args.model).resolve()), *shlex.split(args.args), "--samples",
                str(args.head), "--no-verify", "-q"]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        env_cwd = work / "cwd"
        env_cwd.mkdir()
        if not args.skip_memory:
            counts = [int(c) for c in args.counts.split(",")]
            print(f"\n`{shlex.join(['graphopt', 'optimize', Path(args.model).name, *shlex.split(args.args)])} "
                  f"--data DIR --samples {args.head} --no-verify`, in-process; shards of {args.shard_samples} "
                  f"images (28x28 float32)\n")
            print("| --data | shards | samples | MB on disk | peak RSS (MiB) | seconds |")
            print("|---|---:|---:|---:|---:|---:|")
            for count in counts:
                folder = work / f"set-{count}"
                size = write_set(folder, count, args.shard_samples)
                out = timed([*graphopt, "--data", str(folder), "-o", str(work / f"out-{count}.onnx")], env_cwd)
                print(f"| DIR | {count} | {count * args.shard_samples} | {size / 1e6:.0f} | {out['rss_mib']:.0f} | "
                      f"{out['seconds']:.1f} |", flush=True)
                if count != max(counts):
                    shutil.rmtree(folder)
            largest = max(counts)
            single = work / "one.npz"
            parts = [np.load(p) for p in sorted((work / f"set-{largest}").glob("*.npz"))]
            np.savez(single, input=np.concatenate([p["input"] for p in parts]),
                     labels=np.concatenate([p["labels"] for p in parts]))
            del parts
            shutil.rmtree(work / f"set-{largest}")
            out = timed([*graphopt, "--data", str(single), "-o", str(work / "out-one.onnx")], env_cwd)
            print(f"| one FILE.npz | 1 | {largest * args.shard_samples} | {single.stat().st_size / 1e6:.0f} | "
                  f"{out['rss_mib']:.0f} | {out['seconds']:.1f} |", flush=True)
            single.unlink()
        if not args.skip_executors:
            folder = work / "set-identical"
            write_set(folder, args.identical_count, args.shard_samples)
            runs = {"in-process": [], "process pool of 2": ["--workers", "2"]}
            try:
                import ray  # noqa: F401
                runs["Ray, local cluster of 2 CPUs"] = ["--executor", "ray", "--workers", "2"]
            except ImportError:
                print("(Ray not installed: its run is skipped)")
            print(f"\n{args.identical_count} shards of {args.shard_samples} images, the same command on each "
                  f"executor\n")
            print("| executor | seconds | peak RSS (MiB) | file equal to in-process |")
            print("|---|---:|---:|---|")
            first = None
            for name, extra in runs.items():
                path = work / f"exec-{len(extra)}.onnx"
                out = timed([*graphopt, "--data", str(folder), *extra, "-o", str(path)], env_cwd)
                data = path.read_bytes()
                first = data if first is None else first
                print(f"| {name} | {out['seconds']:.1f} | {out['rss_mib']:.0f} | "
                      f"{'byte for byte' if data == first else 'DIFFERENT'} |", flush=True)
            left = sorted(p.name for p in env_cwd.iterdir())
            print(f"\nfiles left in the working directory: {left or 'none'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
