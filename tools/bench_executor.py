"""Benchmark the executors and the allocator.

1. **Sensitivity analysis through an executor.** Every Conv of a zoo model is a unit; at each level
   the filters with the smallest L1 norm beyond the kept count are zeroed and the relative output error
   on ``--samples`` calibration samples is measured (:func:`graphopt.compress.budget.sensitivity`). The same
   analysis runs with :class:`~graphopt.measure.executor.InProcess` (onnxruntime's default threads, and 1
   thread) and :class:`~graphopt.measure.executor.ProcessPool` (``--workers`` processes of 1 thread each, pool
   start included), alternating the executors in each round; the table shows the median wall time and
   the ratio to InProcess measured in the same run, and checks that every executor returns the same
   errors. Two ways to apply a change are timed:

   * ``override``: the weights are graph inputs of one cached session (``EvalContext.overridable``);
     an evaluation is one pass over the data;
   * ``rebuild``: a modified ModelProto per evaluation (a new onnxruntime session each time), as a pass
     that restructures the graph (pruning with re-fit) must do.

2. **The additive error model on the real model.** The sensitivities of (1) are allocated to MAC
   targets (greedy + refinement, and the best uniform ratio); the table compares the predicted error
   (sum of single-unit errors) with the error measured with all units changed at once.

3. **Allocator quality.** Random 4-unit problems (5 levels each) against brute force: how often greedy
   alone and greedy + refinement reach the optimal predicted error, their mean gap, and the uniform
   baseline at the same cost; and the number of cost evaluations on a problem with one level per
   channel.

Usage::

    python tools/bench_executor.py [--model models/vgg.onnx] [--samples 256] [--workers 2] [--rounds 3]

The machine's cores may be shared with other work: the load average is printed with the tables.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.compress import budget
from graphopt.measure.calibration import load_data
from graphopt.measure.executor import EvalContext, InProcess, ProcessPool


@dataclass
class ZeroContext:
    ev: EvalContext
    mode: str                                  # "override" or "rebuild"
    orders: dict[str, np.ndarray]              # weight name -> filters by ascending L1 norm


def zero_filters(ctx: ZeroContext, item: tuple[str, int]) -> float:
    """Relative output error with all but ``level`` filters of weight ``key`` zeroed (smallest L1 first)."""
    key, level = item
    weights = ctx.ev.cache.get("weights")
    if weights is None:
        weights = ctx.ev.cache["weights"] = {t.name: numpy_helper.to_array(t) for t in ctx.ev.proto().graph.initializer}
    w = weights[key].copy()
    order = ctx.orders[key]
    w[order[:len(order) - level]] = 0
    if ctx.mode == "override":
        return ctx.ev.error(ctx.ev.run({key: w}))
    proto = ctx.ev.fresh_proto()
    for t in proto.graph.initializer:
        if t.name == key:
            t.CopyFrom(numpy_helper.from_array(w, key))
    return ctx.ev.error(ctx.ev.run(model=proto))


def noop(ctx: ZeroContext, item: int) -> int:
    return item


def conv_units(proto: onnx.ModelProto, ratios) -> tuple[list[budget.Unit], dict[str, np.ndarray]]:
    inits = {t.name: t for t in proto.graph.initializer}
    units, orders = [], {}
    for node in proto.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            units.append(budget.Unit(node.input[1], budget.levels(w.shape[0], ratios)))
            orders[node.input[1]] = np.argsort(np.abs(w).reshape(w.shape[0], -1).sum(1), kind="stable")
    return units, orders


def bench_sensitivity(args) -> list[str]:
    proto = onnx.load(args.model)
    data = load_data(args.data, proto).head(args.samples)
    ratios = [k / args.levels for k in range(args.levels - 1, 0, -1)]
    units, orders = conv_units(proto, ratios)
    n_items = sum(len(u.levels) - 1 for u in units)
    executors = {"InProcess (ORT default threads)": (InProcess(), None),
                 "InProcess (1 thread)": (InProcess(), 1),
                 f"ProcessPool({args.workers}), 1 thread each": (ProcessPool(args.workers), None)}
    rows = []
    for mode in args.modes.split(","):
        times: dict[str, list[float]] = {name: [] for name in executors}
        results: dict[str, dict] = {}
        names = list(executors)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each round
                executor, threads = executors[name]
                ev = EvalContext(proto.SerializeToString(), data, batch_size=args.samples,
                                 overridable=tuple(orders) if mode == "override" else (), threads=threads)
                ctx = ZeroContext(ev, mode, orders)
                t0 = time.perf_counter()
                sens = budget.sensitivity(units, zero_filters, executor=executor, context=ctx)
                times[name].append(time.perf_counter() - t0)
                results[name] = sens
        ref = results[names[0]]
        base = statistics.median(times[names[0]])
        for name in names:
            worst = max(abs(results[name][k][lv] - ref[k][lv]) / max(ref[k][lv], 1e-12)
                        for k in ref for lv in ref[k] if lv != max(ref[k]))
            t = statistics.median(times[name])
            rows.append(f"| {mode} | {name} | {n_items} | {t:.2f} | {t / base:.2f} | {worst:.1e} |")
    # what a pool costs before any evaluation: starting the workers and shipping the context
    starts = []
    for _ in range(args.rounds):
        ev = EvalContext(proto.SerializeToString(), data, batch_size=args.samples)
        t0 = time.perf_counter()
        ProcessPool(args.workers).map(noop, list(range(args.workers)), context=ZeroContext(ev, "override", orders))
        starts.append(time.perf_counter() - t0)
    rows.append(f"| - | ProcessPool({args.workers}) start + context, no evaluation | 0 | "
                f"{statistics.median(starts):.2f} | - | - |")
    header = [(f"Sensitivity of `{args.model}`: {len(units)} Conv units x {args.levels - 1} levels = {n_items} "
              f"evaluations on {args.samples} samples; median of {args.rounds} rounds (executors alternated)."),
              "",
              "| apply | executor | evaluations | seconds | ratio to InProcess (default threads) | max rel. diff of errors |",
              "|---|---|---:|---:|---:|---:|"]
    return header + rows


# -------------------------------------------------------------------------------------------------
# the additive error model on the real model


def chain_macs_cost(path: str, proto: onnx.ModelProto, units: list[budget.Unit]) -> budget.PolynomialCost:
    """MACs of a plain conv chain (VGG) as a PolynomialCost: a conv scales with its input unit (the
    previous conv's filters) and its own; nodes after a conv (BN, Relu, pool, the first Gemm) with it."""
    from graphopt.core.onnx_io import load
    from graphopt.measure.analysis import analyze

    per_node = {n.name: n.macs or 0 for n in analyze(load(path)).per_node}
    keys = {u.key for u in units}
    cost = budget.PolynomialCost({u.key: u.full for u in units})
    previous, gemms = None, 0
    for node in proto.graph.node:
        macs = float(per_node.get(node.name, 0))
        if node.op_type == "Conv" and node.input[1] in keys:
            cost.add(macs, *([previous] if previous else []), node.input[1])
            previous = node.input[1]
        elif node.op_type == "Gemm" and gemms == 0 and previous:
            gemms += 1
            cost.add(macs, previous)
        elif node.op_type in ("Gemm", "MatMul") or previous is None:
            cost.add(macs)
        else:
            cost.add(macs, previous)
    return cost


def bench_additive(args) -> list[str]:
    proto = onnx.load(args.model)
    data = load_data(args.data, proto).head(args.samples)
    ratios = [k / args.levels for k in range(args.levels - 1, 0, -1)]
    units, orders = conv_units(proto, ratios)
    ev = EvalContext(proto.SerializeToString(), data, batch_size=args.samples, overridable=tuple(orders))
    ctx = ZeroContext(ev, "override", orders)
    sens = budget.sensitivity(units, zero_filters, executor=InProcess(), context=ctx)
    cost = chain_macs_cost(args.model, proto, units)
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    base_acc = ev.accuracy(ev.reference())

    def measure(keep):
        overrides = {}
        for key, level in keep.items():
            w = weights[key].copy()
            w[orders[key][:len(orders[key]) - level]] = 0
            overrides[key] = w
        out = ev.run(overrides)
        return ev.error(out), ev.accuracy(out)

    rows = [(f"Additive error model on `{args.model}` (filters zeroed by L1, no re-fit; {args.samples} calibration "
            "samples; MACs of the conv chain as a PolynomialCost). Predicted = sum of single-unit errors; "
            "measured = all units changed at once."), "",
            "| target MACs | allocation | MACs / full | predicted error | measured error | accuracy drop (points) |",
            "|---:|---|---:|---:|---:|---:|"]
    for target in args.targets:
        for name, alloc in (("greedy + refine", budget.allocate(units, sens, cost, target * cost.total)),
                            ("uniform", budget.uniform_at(units, sens, cost, target * cost.total))):
            err, acc = measure(alloc.keep)
            rows.append(f"| {target:.2f} | {name} | {alloc.cost / cost.total:.3f} | {alloc.predicted_error:.4f} | "
                        f"{err:.4f} | {base_acc - acc:.1f} |")
    return rows


# -------------------------------------------------------------------------------------------------
# allocator quality


def random_problem(rng, convex: bool, interact: bool):
    units, sens, full = [], {}, {}
    for i in range(4):
        size = int(rng.integers(8, 33))
        u = budget.Unit(f"u{i}", budget.levels(size, [0.8, 0.6, 0.4, 0.2]))
        units.append(u)
        full[u.key] = size
        if convex:
            a, p = rng.uniform(0.1, 2), rng.uniform(1.5, 3)
            sens[u.key] = {lv: a * (1 - lv / size) ** p for lv in u.levels}
        else:  # step-like measured curves: flat, then jumps
            jumps = np.cumsum(rng.choice([0, 0, 1, 3], len(u.levels) - 1) * rng.uniform(0.1, 1, len(u.levels) - 1))
            sens[u.key] = dict(zip(u.levels, [0.0, *map(float, jumps)]))
    cost = budget.PolynomialCost(full)
    for key in full:
        cost.add(float(rng.uniform(10, 100)), key)
    if interact:
        for a, b in zip(list(full), list(full)[1:]):
            cost.add(float(rng.uniform(50, 200)), a, b)
    cost.add(20.0)
    return units, sens, cost, cost.total * float(rng.uniform(0.3, 0.8))


def brute_force(units, sens, cost, target):
    best = None
    for combo in itertools.product(*[u.levels for u in units]):
        keep = {u.key: lv for u, lv in zip(units, combo)}
        if cost(keep) <= target:
            e = budget.predicted_error(units, sens, keep)
            best = e if best is None or e < best else best
    return best


def bench_allocator(args) -> list[str]:
    rows = [("Allocator vs brute force: random 4-unit problems, 5 levels each, target 30-80 % of the full cost; "
            f"{args.problems} problems per row. 'optimal' = reaches the least predicted error; gap = mean "
            "relative excess of predicted error."), "",
            ("| error curves | costs | greedy optimal | greedy gap | greedy+refine optimal | greedy+refine gap "
            "| uniform gap |"), "|---|---|---:|---:|---:|---:|---:|"]
    for convex, interact in itertools.product((True, False), (False, True)):
        rng = np.random.default_rng(0)
        stats = {"greedy": [], "refined": [], "uniform": []}
        for _ in range(args.problems):
            units, sens, cost, target = random_problem(rng, convex, interact)
            best = brute_force(units, sens, cost, target)
            for name, alloc in (("greedy", budget.allocate(units, sens, cost, target, refine=False)),
                                ("refined", budget.allocate(units, sens, cost, target)),
                                ("uniform", budget.uniform_at(units, sens, cost, target))):
                gap = (alloc.predicted_error - best) / best if best > 0 else 0.0
                stats[name].append((alloc.predicted_error <= best + 1e-9, gap))
        pct = {k: 100 * np.mean([o for o, _ in v]) for k, v in stats.items()}
        gap = {k: 100 * np.mean([g for _, g in v]) for k, v in stats.items()}
        rows.append(f"| {'convex' if convex else 'step-like'} | {'products (interacting)' if interact else 'additive'} "
                    f"| {pct['greedy']:.0f} % | {gap['greedy']:.1f} % | {pct['refined']:.0f} % | {gap['refined']:.1f} % "
                    f"| {gap['uniform']:.0f} % |")
    # fine levels: one level per channel
    rng = np.random.default_rng(5)
    sizes = [32, 64, 64, 128, 128, 256, 256, 512, 512]
    units = [budget.Unit(f"g{i}", budget.levels(s, [k / s for k in range(1, s + 1)])) for i, s in enumerate(sizes)]
    sens = {}
    for u in units:
        a = rng.uniform(0.01, 1)
        pts = np.array([0.0625, 0.125, 0.25, 0.5, 0.75, 1.0]) * u.full
        vals = [a * (1 - p / u.full) ** 2 + (0.01 if p < u.full else 0) for p in pts]
        sens[u.key] = {lv: float(np.interp(lv, pts, vals)) for lv in u.levels}
    poly = budget.PolynomialCost({u.key: u.full for u in units}).add(1e6, units[0].key)
    for a, b in itertools.pairwise(units):
        poly.add(9e6, a.key, b.key)
    calls = [0]

    def cost(keep):
        calls[0] += 1
        return poly(keep)

    rows += ["", ("| fine levels (9 units, 32-512 channels, one level per channel) | cost calls | seconds | "
             "cost / target |"), "|---|---:|---:|---:|"]
    for refine in (False, True):
        calls[0] = 0
        t0 = time.perf_counter()
        alloc = budget.allocate(units, sens, cost, 0.5 * poly.total, refine=refine)
        rows.append(f"| {'greedy + refine' if refine else 'greedy'} (plain callable) | {calls[0]} | "
                    f"{time.perf_counter() - t0:.2f} | {alloc.cost / (0.5 * poly.total):.4f} |")
    t0 = time.perf_counter()
    alloc = budget.allocate(units, sens, poly, 0.5 * poly.total)
    rows.append(f"| greedy + refine (PolynomialCost.delta) | - | {time.perf_counter() - t0:.2f} | "
                f"{alloc.cost / (0.5 * poly.total):.4f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/vgg.onnx")
    parser.add_argument("--data", default="models/fmnist_calib.npz")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--levels", type=int, default=8, help="keep ratios k/levels, k = levels-1 .. 1")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="override,rebuild")
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--skip", nargs="*", choices=("sensitivity", "additive", "allocator"), default=[])
    args = parser.parse_args()
    load = os.getloadavg()
    out = [f"cores: {os.cpu_count()}, load average before: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", ""]
    if "sensitivity" not in args.skip:
        out += bench_sensitivity(args) + [""]
    if "additive" not in args.skip:
        out += bench_additive(args) + [""]
    if "allocator" not in args.skip:
        out += bench_allocator(args) + [""]
    load = os.getloadavg()
    out.append(f"load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
