"""What near_fastest's pricing and its measured check cost, per model, without running a prune.

For each model: its prunable groups; the time to price one neighbour of a half-pruned plan (two groups
moved) by ``ChannelAnalysis.time(steps=True)`` from the last plan priced (what near_fastest does) and
from the unpruned model (what it did before), with the largest relative difference of the two prices;
and ``prune.near_check_work``'s estimate of the measured check (two candidates, ``--samples`` samples),
the number ``near_fastest_check_tflop`` is compared with.

    python tools/bench_near_check.py models/vgg.onnx:512 ~/.cache/graphopt/large/resnet50.onnx:64
"""

from __future__ import annotations

import sys
import time
import types

import numpy as np

from graphopt.compress import channels
from graphopt.core.onnx_io import load
from graphopt.measure import target as targets
from graphopt.passes.lossy.prune import _layers_of, near_check_work


def measure(path: str, samples: int, trials: int = 100) -> dict:
    model = load(path)
    analysis = channels.analyze(model)
    groups = analysis.prunable()
    latency = targets.resolve("auto").latency
    keep = {g.gid: max(g.size // 2, g.min_keep) for g in groups}
    rng = np.random.default_rng(0)
    plans = []
    for _ in range(trials):
        plan = dict(keep)
        for g in rng.choice(groups, size=min(2, len(groups)), replace=False):
            plan[g.gid] = int(rng.integers(g.min_keep, g.size + 1))
        plans.append(plan)
    analysis.time(keep, latency, 64, steps=True)           # the plan neighbours are priced from
    start = time.perf_counter()
    delta = [analysis.time(p, latency, 64, steps=True) for p in plans]
    from_last = (time.perf_counter() - start) / trials
    start = time.perf_counter()
    full = []
    for p in plans:
        analysis.plan_cost._last_plans.clear()               # force the price from the unpruned model
        full.append(analysis.time(p, latency, 64, steps=True))
    from_base = (time.perf_counter() - start) / trials
    names = sorted({c.node for g in groups for c in g.consumers})
    layers = {k: v for k, v in _layers_of(model.graph, names).items() if v.features <= 4096}
    run = types.SimpleNamespace(layers=layers, data=types.SimpleNamespace(n_samples=samples),
                                macs0=analysis.cost({})[0])
    return {"groups": len(groups), "from_last_ms": 1e3 * from_last, "from_base_ms": 1e3 * from_base,
            "max_rel_diff": max(abs(a - b) / b for a, b in zip(delta, full)),
            "check_tflop": near_check_work(run, 2) / 1e12}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    print(f"{'model':<22} {'groups':>6} {'from last ms':>12} {'from base ms':>12} {'max rel diff':>12} "
          f"{'check TFLOP':>11}")
    for spec in argv:
        path, _, n = spec.partition(":")
        r = measure(path, int(n or 512))
        print(f"{path.rsplit('/', 1)[-1]:<22} {r['groups']:>6} {r['from_last_ms']:>12.2f} "
              f"{r['from_base_ms']:>12.2f} {r['max_rel_diff']:>12.1e} {r['check_tflop']:>11.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
