"""Is any int8 form onnxruntime offers faster than float on this CPU? (issue 18)

Each row times one int8 form of a model against the same model in float, in one process, A and B
alternating (``tools/bench_pair.py``'s ``ab_seconds``: ``ORT_ENABLE_ALL``, one intra-op thread, no
spinning, median CPU time per run); the ratio is int8 / float (below 1: int8 is faster).

Models: chains of ``--depth`` equal convs with ReLU (``conv3x3`` C→C, ``pointwise`` 1x1 C→C,
``depthwise`` 3x3 with group C), input ``[batch, C, H, W]``, or of MatMuls (``matmul``: C×C weights,
input ``[batch, H·W tokens, C]``), at every channel count, spatial size and batch given; and, with
``--zoo``, zoo models after the lossless preset.

Forms (activations quantized from ranges measured on the random inputs, MinMax):

``u8s8``       QDQ, unsigned activations, signed per-channel symmetric weights: graphopt's int8 on an
               AVX2 target (its 7-bit weights change the codes, not the kernel). onnxruntime fuses it into
               ``QLinearConv``; symmetric weights take MLAS's ``ConvSym`` kernels.
``u8s8-tensor`` the same with one weight scale per tensor.
``u8u8``       the ``u8s8`` model with its weights stored as uint8 with zero point 128: MLAS's U8U8 GEMM
               (16-bit products ``vpmaddwd``, which cannot overflow), no ``ConvSym``.
``u8s8-prec``  ``u8s8`` run with ``session.x64quantprecision=1`` (onnxruntime turns the weights into u8 itself).
``s8s8``       QDQ with signed activations, run with ``session.qdqisint8allowed=1``.
``qop``        QOperator format: ``QLinearConv`` (NCHW) written into the file by onnxruntime's quantizer.
A cell marked ``(N float)`` had N layers left as float kernels between Q/DQ by onnxruntime's optimizer.

``dynamic``    dynamic quantization (weights int8, activations quantized per run: ``MatMulInteger`` /
               ``ConvInteger``), graphopt's choice for conv-free models.
``u8s8-ext``   ``u8s8`` at ``ORT_ENABLE_EXTENDED``: without the level-3 layout transformers (NHWC for
               ``QLinearConv``, NCHWc for float convs; the float side keeps ``ORT_ENABLE_ALL``).

    python tools/bench_int8_forms.py [--kinds conv3x3,pointwise,depthwise] [--channels 32,128]
        [--sizes 14,28,56] [--batches 1,64] [--forms u8s8,u8u8,...] [--zoo] [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_pair import ab_seconds  # noqa: E402

from graphopt.compress import ortquant  # noqa: E402
from graphopt.core.onnx_io import from_proto  # noqa: E402
from graphopt.measure import qdq  # noqa: E402
from graphopt.measure.calibration import SampleData  # noqa: E402

FORMS = ("u8s8", "u8s8-tensor", "u8u8", "u8s8-prec", "s8s8", "qop", "u8s8-ext", "dynamic")
_CONFIG = {"u8s8-prec": {"session.x64quantprecision": "1"}, "s8s8": {"session.qdqisint8allowed": "1"}}


def chain(kind: str, channels: int, depth: int, seed: int = 0) -> onnx.ModelProto:
    """``depth`` convs of ``kind`` (C→C, same padding) each followed by a ReLU; input ``x [N, C, H, W]``.
    ``matmul``: ``depth`` MatMuls by C×C weights with ReLUs, input ``x [N, H·W, C]`` (tokens)."""
    rng = np.random.default_rng(seed)
    if kind == "matmul":
        return _matmul_chain(channels, depth, rng)
    k, group = (1, 1) if kind == "pointwise" else (3, channels if kind == "depthwise" else 1)
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        fan_in = (channels // group) * k * k
        w = (rng.standard_normal((channels, channels // group, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array((rng.standard_normal(channels) * 0.1).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", group=group,
                                   pads=[k // 2] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                          ["N", channels, "H", "W"])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _matmul_chain(channels: int, depth: int, rng: np.random.Generator) -> onnx.ModelProto:
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        w = (rng.standard_normal((channels, channels)) * np.sqrt(2.0 / channels)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"matmul{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "matmul", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                              ["N", "T", channels])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _ranges(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, qdq.Range]:
    model = from_proto(proto)
    names = [v.name for v in model.graph.inputs] + [o.name for n in model.graph.toposort() for o in n.outputs if o]
    return qdq.activation_ranges(model, SampleData(feeds), names)


def to_u8_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The QDQ model with each int8 weight (zero point 0) stored as uint8 ``q + 128`` with zero point 128:
    the same values, run by MLAS's U8U8 kernels."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    tensors = {t.name: t for t in out.graph.initializer}
    for slot in ortquant.weight_slots(out).values():
        codes = numpy_helper.to_array(tensors[slot.codes])
        dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == slot.codes)
        zp = numpy_helper.to_array(tensors[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1, np.int8)
        if codes.dtype != np.int8 or np.any(zp != 0):
            continue
        tensors[slot.codes].CopyFrom(numpy_helper.from_array((codes.astype(np.int16) + 128).astype(np.uint8), slot.codes))
        tensors[dq.input[2]].CopyFrom(numpy_helper.from_array(np.full(zp.shape, 128, np.uint8), dq.input[2]))
    return out


def qoperator(proto: onnx.ModelProto, ranges: dict[str, qdq.Range]) -> onnx.ModelProto:
    """QOperator format (QLinearConv / QGemm in the file), u8 activations, s8 per-channel weights."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode

    tensors = TensorsData(CalibrationMethod.MinMax, {n: TensorData(lowest=np.float32(r.lo), highest=np.float32(r.hi))
                                                    for n, r in ranges.items()})
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    with ortquant._quiet():
        q = ONNXQuantizer(copy, True, True, QuantizationMode.QLinearOps, True, QuantType.QInt8, QuantType.QUInt8,
                          tensors, [], [], ["Conv", "Gemm", "MatMul"], {"WeightSymmetric": True})
        q.quantize_model()
    out = q.model.model
    out.ir_version = proto.ir_version
    return out


def forms(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], wanted: list[str]):
    """(name, model, session config, optimization level) for each wanted form."""
    named = ortquant.named(proto)
    ranges = _ranges(named, feeds)
    base = ortquant.static_qdq(named, ranges, fmt="u8s8", weight_bits=7)
    for name in wanted:
        level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if name == "u8s8-ext" else None
        if name in ("u8s8", "u8s8-prec", "u8s8-ext"):
            model = base
        elif name == "u8s8-tensor":
            model = ortquant.static_qdq(named, ranges, fmt="u8s8", weight_bits=7, per_channel=False)
        elif name == "u8u8":
            model = to_u8_weights(base)
        elif name == "s8s8":
            model = ortquant.static_qdq(named, ranges, fmt="s8s8", weight_bits=7)
        elif name == "dynamic":
            model = ortquant.dynamic(named, op_types=("MatMul", "Gemm", "Conv"))
        elif name == "qop":
            model = qoperator(named, ranges)
        else:
            raise SystemExit(f"unknown form {name!r} (known: {', '.join(FORMS)})")
        yield name, model, _CONFIG.get(name), level


def unfused(model: onnx.ModelProto, config: dict[str, str] | None, level) -> int:
    """Layers onnxruntime still runs as float kernels on dequantized weights in this form's session."""
    import tempfile

    opts = ort.SessionOptions()
    opts.graph_optimization_level = level or ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    with tempfile.TemporaryDirectory() as folder:
        opts.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return len(qdq.float_layers(onnx.load(opts.optimized_model_filepath)))


def _zoo(names: list[str]):
    import graphopt

    calib = str(ROOT / "models" / "fmnist_calib.npz")
    for name in names:
        yield name, graphopt.optimize(str(ROOT / "models" / f"{name}.onnx"), data=calib, run_verify=False).model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="conv3x3,pointwise,depthwise")
    parser.add_argument("--channels", default="32,128")
    parser.add_argument("--sizes", default="14,28,56")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--zoo", default="", help="zoo models to time as well, e.g. vgg,resnet,mobilenetv2")
    parser.add_argument("--runs", type=int, default=30, help="runs of each model per comparison, at most")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="fewer runs (at least 5) where the float model's runs would take longer than this")
    args = parser.parse_args(argv)
    wanted = args.forms.split(",")
    print("| model | batch | " + " | ".join(wanted) + " |")
    print("|---|---|" + "---|" * len(wanted))
    rng = np.random.default_rng(0)
    cases = []
    for kind in filter(None, args.kinds.split(",")):
        for c in map(int, args.channels.split(",")):
            for size in map(int, args.sizes.split(",")):
                cases.append((f"{kind} C={c} {size}x{size}", chain(kind, c, args.depth), (c, size)))
    for name, proto in _zoo(list(filter(None, args.zoo.split(",")))):
        cases.append((name, proto, (1, 28)))  # the zoo's input: [batch, 1, 28, 28]
    for label, proto, (c, size) in cases:
        for batch in map(int, args.batches.split(",")):
            shape = (batch, size * size, c) if label.startswith("matmul") else (batch, c, size, size)
            x = rng.standard_normal(shape).astype(np.float32)
            feeds = {proto.graph.input[0].name: x}
            once, _ = ab_seconds(proto, proto, runs=1, feeds=feeds)
            runs = int(min(args.runs, max(5, args.seconds / max(once, 1e-6))))
            cells = []
            for _, model, config, level in forms(proto, feeds, wanted):
                a, b = ab_seconds(proto, model, runs=runs, feeds=feeds, config_b=config, level_b=level)
                left = unfused(model, config, level)
                cells.append(f"{b / a:.2f}" + (f" ({left} float)" if left else ""))
            print(f"| {label} | {batch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
