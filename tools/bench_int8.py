"""int8 benchmark (issue 18): accuracy, latency ratio and size of quantized zoo models, in one run.

For each model (default: vgg, resnet, mobilenetv2, inception, transformer), on ``models/fmnist_eval.npz``
(2000 held-out images; calibration on ``models/fmnist_calib.npz``) and, with ``--test``, on the 10,000
Fashion-MNIST test images as well (of which the 2000 are the first; one image is 0.01 point there):

* ``float``: the original;
* ``ort static``: onnxruntime's ``quantize_static`` with its defaults (QDQ, signed activations and weights,
  MinMax) and per-channel weights, on the lossless output (run in a temporary working directory: it
  writes files there);
* ``graphopt int8, all fused``: ``--preset int8 --option quantize.latency=off``: every layer onnxruntime
  fuses is quantized (the "graphopt int8" rows of the tables before the speed rule);
* ``graphopt int8, priced``: ``--preset int8`` (the default ``quantize.latency=cost``: layers, int8
  regions and the whole model the target's profile prices slower quantized stay float);
* ``prune``, ``prune → int8``: ``--preset prune --target-macs 0.5`` without and with ``--quantize int8``
  (CNNs; all fused), and ``prune → int8, priced``;
* ``lowrank``, ``lowrank → int8``: ``--preset lowrank --target-macs 0.5`` without and with it (vgg,
  transformer; all fused);
* ``W4A8 rtn`` / ``W4A8 re-fit``: ``--preset int8 --quantize w4a8`` with ``quantize.refit=rtn`` / the default
  (W4A8 is for size: the speed rule does not apply to it).

Accuracy is measured as deployed: onnxruntime ``ORT_ENABLE_ALL`` (the fused integer kernels). Latency:
``ORT_ENABLE_ALL``, one intra-op thread, batch 64, each variant against the original float model,
alternating A and B in one process (``tools/bench_pair.py``'s ``ab_seconds``), median CPU time; the
ratio is variant / float. Size: the serialized model.

    python tools/bench_int8.py [--models vgg,resnet] [--runs 30] [--test] [--batch 64] [--only 'LABEL;LABEL']
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import graphopt  # noqa: E402
from bench_int8_calib import test_images  # noqa: E402
from bench_pair import ab_seconds  # noqa: E402

CNNS = ("vgg", "resnet", "mobilenetv2")
#: every layer onnxruntime fuses quantized, whatever the target's prices say (the pre-speed-rule rows)
ALL_FUSED = ["quantize.latency=off"]
LOWRANK = ("vgg", "transformer")


def _accuracy(proto: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])
    return float((pred.argmax(axis=1) == y).mean() * 100)


def ort_static(float_proto: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """onnxruntime's ``quantize_static`` with its defaults and per-channel weights, calibrated on ``feeds``
    (feed dicts), in a private temporary working directory (its pre-processing and symbolic inference
    write into the working directory)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(feeds)

        def get_next(self):
            return next(self.batches, None)

    here = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            onnx.save(float_proto, "float.onnx")
            quantize_static("float.onnx", "int8.onnx", Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
            return onnx.load("int8.onnx")
        finally:
            os.chdir(here)


def _optimize(path: str, calib: str, **kw) -> onnx.ModelProto:
    return graphopt.optimize(path, data=calib, run_verify=False, **kw).model


def variants(name: str, calib_path: str, calib: np.ndarray):
    """(label, builder) per row of ``name``'s table; builders run only for the rows asked for."""
    path = str(ROOT / "models" / f"{name}.onnx")

    def opt(**kw):
        return lambda: _optimize(path, calib_path, **kw)

    yield "float", lambda: onnx.load(path)
    yield "ort static (S8S8, per-channel)", lambda: ort_static(
        _optimize(path, calib_path), ({"input": calib[i:i + 64]} for i in range(0, len(calib), 64)))
    yield "graphopt int8, all fused", opt(preset="int8", options=ALL_FUSED)
    yield "graphopt int8, priced", opt(preset="int8")
    if name in CNNS:
        yield "prune 0.5", opt(preset="prune", target_macs=0.5)
        yield "prune 0.5 → int8", opt(preset="prune", target_macs=0.5, quantize="int8", options=ALL_FUSED)
        yield "prune 0.5 → int8, priced", opt(preset="prune", target_macs=0.5, quantize="int8")
    if name in LOWRANK:
        yield "lowrank 0.5", opt(preset="lowrank", target_macs=0.5)
        yield "lowrank 0.5 → int8", opt(preset="lowrank", target_macs=0.5, quantize="int8", options=ALL_FUSED)
    yield "W4A8 rtn", opt(preset="int8", quantize="w4a8", options=["quantize.refit=rtn"])
    yield "W4A8 re-fit", opt(preset="int8", quantize="w4a8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg,resnet,mobilenetv2,inception,transformer")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--test", action="store_true", help="also the accuracy on the 10,000 test images")
    parser.add_argument("--only", default=None,
                        help="row labels to run besides float, separated by ';', e.g. 'graphopt int8, priced'")
    args = parser.parse_args(argv)
    calib_path = str(ROOT / "models" / "fmnist_calib.npz")
    calib = np.load(calib_path)["input"]
    evaluation = np.load(ROOT / "models" / "fmnist_eval.npz")
    x, y = evaluation["input"], evaluation["labels"]
    feeds = {"input": np.random.default_rng(0).standard_normal((args.batch, 1, 28, 28)).astype(np.float32)}
    tx, ty = test_images() if args.test else (None, None)
    test_cols = " test-10k % | drop (points) |" if args.test else ""
    print("| model | variant | accuracy % | drop (points) |" + test_cols + " time / float | size KB |")
    print("|---|---|---|---|" + ("---|---|" if args.test else "") + "---|---|")
    for name in args.models.split(","):
        base = test_base = original = None
        for label, build in variants(name, calib_path, calib):
            if args.only and label != "float" and label not in args.only.split(";"):
                continue
            proto = build()
            acc = _accuracy(proto, x, y)
            test = _accuracy(proto, tx, ty) if args.test else None
            if base is None:
                base, test_base, original = acc, test, proto
                ratio = 1.0
            else:
                a, b = ab_seconds(original, proto, batch=args.batch, runs=args.runs, feeds=feeds)
                ratio = b / a
            test_cells = f" {test:.2f} | {test_base - test:+.2f} |" if args.test else ""
            print(f"| {name} | {label} | {acc:.2f} | {base - acc:+.2f} |{test_cells} {ratio:.2f} | "
                  f"{len(proto.SerializeToString()) / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
