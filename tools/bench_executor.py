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

3. **A ResNet-18-sized sensitivity search on Ray** (``--only distributed``, needs the ``ray`` extra). The
   synthetic ResNet-18 (``tools/synthetic_models.py``, 224x224, random weights and ``--r18-samples``
   random inputs) goes through the ``prune`` preset at half the MACs until its sensitivity table, which is
   captured (function, items, context) and then replayed, ``--rounds`` times with the executors in a
   rotating order: in-process (onnxruntime's threads, and one thread), a process pool of 1 and 2, and
   a local Ray cluster of 1 and 2 CPUs (started before the timing; its start and first-map warm-up are
   timed apart). Each replay starts from a fresh copy of the context, as a run does. Also measured: the
   cost of a task that does nothing (the per-task overhead), the bytes each executor moves, and a
   scaling model checked against the measured times (printed under the tables).

4. **Allocator quality.** Random 4-unit problems (5 levels each) against brute force: how often greedy
   alone and greedy + refinement reach the optimal predicted error, their mean gap, and the uniform
   baseline at the same cost; and the number of cost evaluations on a problem with one level per
   channel.

Usage::

    python tools/bench_executor.py [--model models/vgg.onnx] [--samples 256] [--workers 2] [--rounds 3]
    python tools/bench_executor.py --only distributed [--rounds 5] [--r18-samples 16] [--r18-levels 4]

The machine's cores may be shared with other work: the load average is printed with the tables.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pickle
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.compress import budget
from graphopt.measure.blas import blas_threads
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


# -------------------------------------------------------------------------------------------------
# a ResNet-18-sized sensitivity search: in-process, process pool, Ray


class _Captured(BaseException):
    """Stops the run once the sensitivity table is captured (a BaseException: passes let it through)."""


class Capture:
    """An executor that runs everything in this process until prune's sensitivity table, which it records
    and stops the run with."""

    workers = 1

    def __init__(self) -> None:
        self.call: tuple | None = None

    def map(self, fn, items, *, context=None, progress=None):
        from graphopt.passes.lossy.prune import measure_level
        if fn is measure_level:
            self.call = (fn, list(items), context)
            raise _Captured
        return InProcess().map(fn, items, context=context, progress=progress)


def capture_table(args) -> tuple:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from synthetic_models import resnet18

    import graphopt
    from graphopt.core.onnx_io import from_proto
    from graphopt.measure.calibration import random_data

    proto = resnet18(batch=None, image=224)
    data = random_data(from_proto(proto), args.r18_samples, seed=0)
    capture = Capture()
    try:
        graphopt.optimize(proto, preset="prune", data=data, target_macs=0.5, run_verify=False, executor=capture,
                          options={"prune_filters.levels": args.r18_levels})
    except _Captured:
        pass
    if capture.call is None:
        raise RuntimeError("the prune preset measured no sensitivity table")
    return capture.call


def fresh(context, threads=None):
    """A copy of ``context`` as a run would start with it (no caches), its sessions at ``threads``."""
    copy = pickle.loads(pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL))
    copy.ev.threads = threads
    return copy


def bench_distributed(args) -> list[str]:
    from graphopt.measure.ray_executor import RayExecutor

    t0 = time.perf_counter()
    fn, items, context = capture_table(args)
    setup = time.perf_counter() - t0
    blob = pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL)
    item_bytes = statistics.mean(len(pickle.dumps(i)) for i in items)
    n = len(items)
    clusters: dict[int, RayExecutor] = {}
    starts: dict[int, list[float]] = {1: [], 2: []}

    def ray_cluster(cpus: int) -> RayExecutor:
        """A local cluster of ``cpus`` (one Ray cluster per process: the other is shut down), started and
        warmed up (a task on every CPU) outside the timing."""
        if cpus not in clusters:
            for other in list(clusters):
                clusters.pop(other).close()
            executor = RayExecutor(cpus)
            t = time.perf_counter()
            executor.start()
            executor.map(noop, list(range(cpus)))
            starts[cpus].append(time.perf_counter() - t)
            clusters[cpus] = executor
        return clusters[cpus]

    executors = {
        "InProcess, onnxruntime's threads": InProcess,
        "InProcess, 1 thread": InProcess,
        "ProcessPool(1)": lambda: ProcessPool(1),
        "ProcessPool(2)": lambda: ProcessPool(2),
        "Ray, local cluster of 1 CPU": lambda: ray_cluster(1),
        "Ray, local cluster of 2 CPUs": lambda: ray_cluster(2),
    }
    names = list(executors)
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            executor = executors[name]()
            ctx = fresh(context, 1 if "1 thread" in name else None)
            t = time.perf_counter()
            with blas_threads(1):      # as the prune pass runs (its workers have one BLAS thread too)
                results[name] = executor.map(fn, items, context=ctx)
            times[name].append(time.perf_counter() - t)
            print(f"[{name}: {times[name][-1]:.1f} s]", file=sys.stderr, flush=True)
    overhead = task_overhead(ray_cluster(2), args.rounds)
    for executor in clusters.values():
        executor.close()
    ref = results[names[1]]
    base = statistics.median(times[names[1]])
    rows = [(f"Sensitivity table of prune on the synthetic ResNet-18 (224x224, {args.r18_samples} random inputs, "
             f"`prune_filters.levels={args.r18_levels}`): {n} evaluations; the run up to the table took {setup:.0f} "
             f"s, then the table was replayed {args.rounds} times per executor, executors rotated each round; "
             f"median seconds. The context (model, samples, cached activations, re-fit statistics) pickles to "
             f"{len(blob) / 2**20:.1f} MiB, an item to {item_bytes:.0f} bytes, a result is a float."), "",
            "| executor | seconds (median) | each round | speed-up over in-process, 1 thread | results equal to "
            "in-process |", "|---|---:|---|---:|---|"]
    for name in names:
        t = statistics.median(times[name])
        same = "bitwise" if results[name] == ref else (
            f"max rel. diff {max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(results[name], ref)):.1e}")
        each = " / ".join(f"{x:.1f}" for x in times[name])
        rows.append(f"| {name} | {t:.1f} | {each} | {base / t:.2f} | {same} |")
    rows += ["", "Ray cluster start and warm-up (`ray.init`, then a task per CPU), median: "
             + ", ".join(f"{cpus} CPU{'s' if cpus > 1 else ''} {statistics.median(v):.1f} s"
                         for cpus, v in starts.items() if v) + ".", "",
             "| overhead (tasks that return their item) | seconds |", "|---|---:|"]
    rows += [f"| {name} | {value * 1e3:.2f} ms |" for name, value in overhead.items()]
    rows += ["", *scaling_model(n, times, len(blob), overhead)]
    return rows


def task_overhead(ray_executor, rounds: int) -> dict[str, float]:
    """Seconds per task that does nothing: ``4·workers`` one-item tasks per map (one run each), on a warm
    Ray cluster and in-process; a process pool's start and stop per map (it makes one per map)."""
    out = {}
    n = 4 * ray_executor.workers
    for name, executor, per in (("Ray task, warm cluster of 2 CPUs", ray_executor, n),
                                ("InProcess call", InProcess(), n),
                                ("ProcessPool(2) start and stop, per map", ProcessPool(2), 1)):
        samples = []
        for _ in range(rounds * 5):
            t = time.perf_counter()
            executor.map(noop, list(range(n)))
            samples.append((time.perf_counter() - t) / per)
        out[name] = statistics.median(samples)
    return out


def scaling_model(n: int, times: dict, context_bytes: int, overhead: dict) -> list[str]:
    """``T(N) = S + W/N + n_t·o/N + tail``, ``tail`` between 0 and one run's work ``W/(4N)`` (the items go
    out in about 4 runs per worker; the last may run alone). ``W``: the work (in-process, one thread);
    ``o``: a task's overhead; ``S``: what a map pays once per worker (the context fetched and unpickled,
    sessions built), read off the 1-CPU cluster's time. Checked at N = 2, extrapolated beyond."""
    w = statistics.median(times["InProcess, 1 thread"])
    o = overhead["Ray task, warm cluster of 2 CPUs"]
    # paired by round (the machine's load moves between rounds, less within one)
    s1 = statistics.median(a - b for a, b in zip(times["Ray, local cluster of 1 CPU"], times["InProcess, 1 thread"]))
    s1 -= min(n, 4) * o

    def bounds(workers: int) -> tuple[float, float]:
        low = s1 + w / workers + min(n, 4 * workers) * o / workers
        return low, low + (w / (4 * workers) if workers > 1 else 0.0)

    rows = [f"Scaling model: T(N) = S + W/N + n_t·o/N + tail, with W = {w:.1f} s (in-process, 1 thread), "
            f"n = {n} evaluations in n_t = min(n, 4N) tasks of o = {o * 1e3:.2f} ms each, S = {s1:.1f} s (the "
            f"1-CPU cluster's time beyond W, paired by round: the {context_bytes / 2**20:.1f} MiB context fetched "
            "and unpickled, sessions built), tail between 0 and W/(4N) for N > 1 (the last task alone). Bytes "
            "moved per map: the context once into the object store and once to each node (its workers read it "
            "from shared memory), the items (about 20 bytes each) and as many floats back.", "",
            "| N (Ray CPUs) | predicted s (no tail – whole tail) | measured s | predicted speed-up | "
            "measured speed-up |", "|---:|---:|---:|---:|---:|"]
    for workers in (1, 2, 4, 8, 16):
        low, high = bounds(workers)
        name = {1: "Ray, local cluster of 1 CPU", 2: "Ray, local cluster of 2 CPUs"}.get(workers)
        measured = statistics.median(times[name]) if name else None
        rows.append(f"| {workers} | {low:.1f} – {high:.1f} | {f'{measured:.1f}' if name else '–'} | "
                    f"{w / high:.2f} – {w / low:.2f} | {f'{w / measured:.2f}' if name else '–'} |")
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
    parser.add_argument("--only", choices=("distributed",), help="run only this section (distributed: the "
                        "ResNet-18 sensitivity search in-process, in a process pool and on Ray)")
    parser.add_argument("--r18-samples", type=int, default=16, help="distributed: random inputs (half held out)")
    parser.add_argument("--r18-levels", type=int, default=4, help="distributed: levels measured per group")
    args = parser.parse_args()
    if args.only == "distributed":
        load = os.getloadavg()
        out = [f"cores: {os.cpu_count()}, load average before: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", ""]
        out += bench_distributed(args)
        load = os.getloadavg()
        out += ["", f"load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"]
        print("\n".join(out))
        return
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
