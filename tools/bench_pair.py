"""Latency of two models in one process, A and B alternating: the steadiest comparison on a shared machine.

onnxruntime ENABLE_ALL, one intra-op thread (spinning off), process CPU time per run (with one thread
onnxruntime computes on the calling thread, and CPU time does not count waits for a core that other
processes cause), medians. Dynamic dims other than the batch are set to 1.

    python tools/bench_pair.py models/inception.onnx inception.opt.onnx --batch 64 --runs 80
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort


def session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=80)
    args = parser.parse_args()
    sessions = [session(args.a), session(args.b)]
    spec = sessions[0].get_inputs()[0]
    shape = [args.batch] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
    feeds = {spec.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for s in sessions:
        s.run(None, feeds)
    times: list[list[float]] = [[], []]
    for r in range(args.runs):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            start = time.process_time()
            sessions[k].run(None, feeds)
            times[k].append(time.process_time() - start)
    a, b = (float(np.median(t)) * 1e3 for t in times)
    print(f"| A | B | batch | runs | A ms | B ms | speed-up A/B |\n|---|---|---|---|---|---|---|\n"
          f"| {args.a} | {args.b} | {args.batch} | {args.runs} | {a:.2f} | {b:.2f} | {a / b:.3f}x |")


if __name__ == "__main__":
    main()
