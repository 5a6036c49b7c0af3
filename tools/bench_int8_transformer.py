"""Why W4A8 and lowrank → int8 on transformers are what they are (issue 18): the alternatives, measured.

On the corpus's BERT text classifiers (``models/corpus/text_classifier*.onnx``, their 400 held-out
windows, 0.25 point each; calibration on their 256), as deployed (``ORT_ENABLE_ALL``, one thread):

``w4``       onnxruntime's ``MatMulNBits`` on the lossless output (graphopt's W4A8 without convs) at blocks
             of 32 and 128 weights, with int8 activations (``accuracy_level`` 4) and weight-only (0):
             accuracy change against float, and time against float (batch 64, A and B alternating,
             ``tools/bench_pair.py``'s ``ab_seconds``).
``lowrank``  ``--preset lowrank --target-params 0.7``, then dynamic int8 (onnxruntime's ``quantize_dynamic``
             in memory, :func:`graphopt.compress.ortquant.dynamic`) with every factor quantized, the
             second factors float (graphopt's rule), the first factors float, and every factor quantized
             after balancing each bottleneck's channels SmoothQuant-style (``s = a^0.5 / w^0.5``, ``a`` the
             channel's largest activation on the calibration windows, ``w`` the largest weight of its row
             of the second factor): accuracy change against lowrank alone.

    python tools/bench_int8_transformer.py [--models text_classifier,text_classifier_dynamo] [--runs 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import graphopt  # noqa: E402
from bench_int8_corpus import data_of, outputs, score  # noqa: E402
from bench_pair import ab_seconds  # noqa: E402
from graphopt.compress import ortquant  # noqa: E402
from graphopt.measure import ort as gort  # noqa: E402


def _pairs(proto: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(first, second) factor MatMuls: a constant-weight MatMul reading another one's output."""
    inits = {t.name for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    out = []
    for node in proto.graph.node:
        first = producer.get(node.input[0]) if node.op_type == "MatMul" else None
        if (first is not None and first.op_type == "MatMul" and node.input[1] in inits
                and first.input[1] in inits):
            out.append((first, node))
    return out


def _smoothed(proto: onnx.ModelProto, pairs, calib) -> onnx.ModelProto:
    names = [first.output[0] for first, _ in pairs]
    sess = gort.session(gort.with_outputs(proto, names))
    peak = {n: 0.0 for n in names}
    for feed in calib.batches(64):
        for n, v in zip(names, sess.run(names, feed)):
            peak[n] = np.maximum(peak[n], np.abs(v).reshape(-1, v.shape[-1]).max(0))
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    weights = {t.name: t for t in out.graph.initializer}
    for first, second in pairs:
        u, v = numpy_helper.to_array(weights[first.input[1]]), numpy_helper.to_array(weights[second.input[1]])
        s = np.sqrt(np.maximum(peak[first.output[0]], 1e-8) / np.maximum(np.abs(v).max(1), 1e-8))
        weights[first.input[1]].CopyFrom(numpy_helper.from_array((u / s).astype(np.float32), first.input[1]))
        weights[second.input[1]].CopyFrom(numpy_helper.from_array((v * s[:, None]).astype(np.float32),
                                                                  second.input[1]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="text_classifier,text_classifier_dynamo")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    print("| model | variant | accuracy % | change (points) | time / float |\n|---|---|---|---|---|")
    for name in args.models.split(","):
        proto = onnx.load(ROOT / "models" / "corpus" / f"{name}.onnx")
        calib, evaluation = data_of(name, proto)
        ref = outputs(proto, evaluation)
        base = score(ref, ref, evaluation.labels)
        feeds = next(iter(evaluation.batches(64)))
        lossless = ortquant.named(graphopt.optimize(proto, data=calib, run_verify=False).model)
        print(f"| {name} | float | {base:.2f} | +0.00 | 1.00 |")
        for block in (32, 128):
            for int8 in (True, False):
                q = ortquant.blockwise_4bit(lossless, block_size=block, int8_activations=int8)
                acc = score(ref, outputs(q, evaluation), evaluation.labels)
                a, b = ab_seconds(proto, q, runs=args.runs, feeds=feeds)
                label = f"MatMulNBits, block {block}, " + ("int8 activations (W4A8)" if int8 else "weight-only")
                print(f"| {name} | {label} | {acc:.2f} | {acc - base:+.2f} | {b / a:.2f} |", flush=True)
        low = ortquant.named(graphopt.optimize(proto, data=calib, preset="lowrank", target_params=0.7,
                                               run_verify=False).model)
        low_acc = score(ref, outputs(low, evaluation), evaluation.labels)
        print(f"| {name} | lowrank 0.7 | {low_acc:.2f} | {low_acc - base:+.2f} | — |")
        pairs = _pairs(low)
        rows = [("every factor int8", ortquant.dynamic(low)),
                ("second factors float", ortquant.dynamic(low, exclude={s.name for _, s in pairs})),
                ("first factors float", ortquant.dynamic(low, exclude={f.name for f, _ in pairs})),
                ("every factor int8, bottleneck smoothed", ortquant.dynamic(_smoothed(low, pairs, calib)))]
        for label, q in rows:
            acc = score(ref, outputs(q, evaluation), evaluation.labels)
            print(f"| {name} | lowrank 0.7 → dynamic int8, {label} ({len(pairs)} pairs) | {acc:.2f} | "
                  f"{acc - low_acc:+.2f} vs lowrank | — |", flush=True)


if __name__ == "__main__":
    main()
