"""Filter-set steps of onnxruntime's blocked convs: measured time of single convs against the latency
model's smooth and step-aware predictions (issue 21, BENCHMARKS.md "Target CPUs").

Each conv is one 3x3 Conv + Relu at batch 64 (``graphopt.measure.calibrate.conv_model``), run with
onnxruntime ENABLE_ALL, 1 thread, no spinning; all of them interleaved, ``--runs`` times each, the
median process CPU time (the single-conv model includes its reorders into and out of the blocked
layout). Beside it the target's profile's prediction as calibrated (``smooth``) and with the MACs charged
by whole filter sets (``steps``: :meth:`graphopt.measure.latency.Nchwc.pass_factor`).

    python tools/bench_passes.py [--convs 16:8:28,16:16:28,...] [--runs 30]

(``cin:cout:size[:stride]`` per conv.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pair import session  # noqa: E402

from graphopt.measure import latency as lat  # noqa: E402
from graphopt.measure import target as targets  # noqa: E402
from graphopt.measure.calibrate import conv_model, feeds  # noqa: E402

DEFAULT = ("16:8:28,16:16:28,16:24:28,16:32:28,56:24:7,56:32:7,56:40:7,56:48:7,56:64:7,"
           "24:16:14:2,24:32:14:2,24:40:14:2")


def parse(text: str) -> list[tuple[int, int, int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        try:
            parts = [int(p) for p in item.split(":")]
        except ValueError:
            parts = []
        if len(parts) not in (3, 4) or min(parts) < 1:
            print(f"bench_passes: --convs item {item!r} is not cin:cout:size[:stride]", file=sys.stderr)
            sys.exit(2)
        out.append((*parts, 1) if len(parts) == 3 else tuple(parts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--convs", default=DEFAULT)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    convs = parse(args.convs)
    target = targets.resolve("auto")
    model = target.latency
    runs = []
    for cin, cout, size, stride in convs:
        s = session(conv_model(64, cin, cout, (3, 3), size, 1, stride))
        x = feeds(s, 64)
        s.run(None, x)
        runs.append((s, x))
    times: list[list[float]] = [[] for _ in convs]
    for r in range(args.runs):
        order = range(len(convs)) if r % 2 == 0 else reversed(range(len(convs)))
        for i in order:
            s, x = runs[i]
            t0 = time.process_time()
            s.run(None, x)
            times[i].append(time.process_time() - t0)
    print(f"target {target.name} ({target.profile}); filter set {model.path.filter_set} blocks of {model.path.block}\n")
    print("| conv (cin -> cout, size, stride) | measured ms | smooth ms | steps ms | pass factor |")
    print("|---|---|---|---|---|")
    for (cin, cout, size, stride), ts in zip(convs, times):
        out = (size + 2 - 3) // stride + 1
        work = [lat.conv_work(64, cin, cout, (3, 3), (size, size), (out, out), path=model.path, passes=p)
                for p in (False, True)]
        smooth, steps = (model.time(w) * 1e3 for w in work)
        print(f"| {cin} -> {cout}, {size}x{size}, {stride} | {statistics.median(ts) * 1e3:.3f} | {smooth:.3f} | "
              f"{steps:.3f} | {model.path.pass_factor(model.path.pad(cout)):.2f} |")


if __name__ == "__main__":
    main()
