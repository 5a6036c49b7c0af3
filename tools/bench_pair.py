"""Latency of two models in one process, A and B alternating: the steadiest comparison on a shared machine.

onnxruntime ENABLE_ALL, one intra-op thread (spinning off), process CPU time per run (with one thread
onnxruntime computes on the calling thread, and CPU time does not count waits for a core that other
processes cause), medians. Dynamic dims other than the batch are set to 1.

    python tools/bench_pair.py models/inception.onnx inception.opt.onnx --batch 64 --runs 80
    python tools/bench_pair.py models/mobilenetv2.onnx pruned.onnx --rounds 10 --runs 30

``--rounds R`` repeats the comparison R times, two seconds apart, and prints one row per round: the
ratio moves with the machine's state (on this shared VM, by ±5% between minutes; the original's own
time in each row shows the state), so a ratio near a threshold needs several rounds, not one.

``--kernels`` also prints where the time goes: onnxruntime's profiler (same settings), the median time of
each kernel summed by kind (depthwise / pointwise / other conv, then by op type), for A and B, and how
much of each kind B keeps; three profiles of each, A and B alternating, median per kind. A pruned model
whose time shrinks less than its MACs shows here which kernels do not scale with the channels removed.

    python tools/bench_pair.py models/mobilenetv2.onnx pruned.onnx --kernels
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort


def session(model, config: dict[str, str] | None = None,
            level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    """ENABLE_ALL (or ``level``), one intra-op thread, no spinning, plus the session ``config`` entries;
    ``model`` is a path or a ModelProto."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def random_feeds(sess: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """One random float input at ``batch``; other dynamic dims set to 1."""
    spec = sess.get_inputs()[0]
    shape = [batch] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
    return {spec.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def ab_seconds(a, b, batch: int = 64, runs: int = 80, feeds: dict[str, np.ndarray] | None = None,
               config_b: dict[str, str] | None = None, level_b: ort.GraphOptimizationLevel | None = None
               ) -> tuple[float, float]:
    """Median CPU seconds per run of ``a`` and ``b`` (paths or ModelProtos), alternating which goes first;
    ``b``'s session takes the extra ``config_b`` entries and the optimization level ``level_b``."""
    sessions = [session(a), session(b, config_b, level_b or ort.GraphOptimizationLevel.ORT_ENABLE_ALL)]
    feeds = feeds if feeds is not None else random_feeds(sessions[0], batch)
    for s in sessions:
        s.run(None, feeds)
    times: list[list[float]] = [[], []]
    for r in range(runs):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            start = time.process_time()
            sessions[k].run(None, feeds)
            times[k].append(time.process_time() - start)
    return float(np.median(times[0])), float(np.median(times[1]))


def kernel_kind(event: dict) -> str:
    """A profiled kernel's kind: convolutions by their filter shape (the second input), else the op type."""
    shapes = event.get("inputs", [])
    if "Conv" in event["op"] and len(shapes) > 1 and len(shapes[1]) == 4:
        filt = shapes[1]
        if filt[1] == 1 and shapes[0][1] > 1:
            return "Conv depthwise"
        return "Conv pointwise" if filt[2:] == [1, 1] else f"Conv {filt[2]}x{filt[3]}"
    return event["op"]


def kernel_table(a: str, b: str, batch: int, rounds: int = 3) -> str:
    """Markdown table: per kernel kind, the summed median kernel time of ``a`` and ``b`` (ms) and B/A.

    Each model is profiled ``rounds`` times, A and B alternating, and each kind takes its median over
    the rounds: two profiles a few seconds apart differ by several percent on a shared machine.
    """
    import onnx
    from graphopt.measure.calibrate import profile_kernels  # the latency calibration's profiler settings

    protos = [onnx.load(a), onnx.load(b)]
    per_round: list[list[dict[str, float]]] = [[], []]
    for r in range(rounds):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            sums: dict[str, float] = {}
            for event in profile_kernels(protos[k], batch=batch, seconds=1.0):
                kind = kernel_kind(event)
                sums[kind] = sums.get(kind, 0.0) + event["seconds"]
            per_round[k].append(sums)
    totals = [{kind: float(np.median([s.get(kind, 0.0) for s in rounds_of]))
               for kind in set().union(*rounds_of)} for rounds_of in per_round]
    ta, tb = (sum(t.values()) for t in totals)
    rows = ["| kernels | A ms | B ms | B / A | share of B |", "|---|---|---|---|---|"]
    for kind in sorted(set(totals[0]) | set(totals[1]), key=lambda k: -totals[0].get(k, 0.0)):
        x, y = totals[0].get(kind, 0.0), totals[1].get(kind, 0.0)
        rows.append(f"| {kind} | {x * 1e3:.2f} | {y * 1e3:.2f} | {y / x if x else float('nan'):.2f} | "
                    f"{y / tb:.0%} |")
    rows.append(f"| all | {ta * 1e3:.2f} | {tb * 1e3:.2f} | {tb / ta:.2f} | 100% |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the comparison, 2 s apart, one row each")
    parser.add_argument("--kernels", action="store_true", help="also print kernel time by kind (profiler)")
    args = parser.parse_args()
    print("| A | B | batch | runs | A ms | B ms | speed-up A/B |\n|---|---|---|---|---|---|---|")
    ratios = []
    for r in range(args.rounds):
        if r:
            time.sleep(2.0)
        a, b = (t * 1e3 for t in ab_seconds(args.a, args.b, args.batch, args.runs))
        ratios.append(a / b)
        print(f"| {args.a} | {args.b} | {args.batch} | {args.runs} | {a:.2f} | {b:.2f} | {a / b:.3f}x |", flush=True)
    if args.rounds > 1:
        print(f"\nspeed-up over {args.rounds} rounds: median {np.median(ratios):.3f}x, "
              f"range {min(ratios):.3f}x-{max(ratios):.3f}x")
    if args.kernels:
        print("\n" + kernel_table(args.a, args.b, args.batch))


if __name__ == "__main__":
    main()
