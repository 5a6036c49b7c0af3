"""onnxruntime's quantizer, called in memory, and the quantized weights of a QDQ model read and rewritten.

Building (:func:`static_qdq`, :func:`dynamic`)
---------------------------------------------
``onnxruntime.quantization.quantize_static`` takes a path or a ModelProto, writes
``<model>-inferred.onnx`` beside a path input and temporary copies into ``TMPDIR``, and runs its own
calibration, which keeps intermediate outputs in memory. graphopt calls the quantizer classes underneath
it (``QDQQuantizer``, ``ONNXQuantizer``) on a shape-inferred ModelProto in memory instead, with the
activation ranges it measured itself (:func:`graphopt.measure.qdq.activation_ranges`, streamed): no file
is written, and the calibration is bounded by one batch.

Formats: static QDQ with unsigned (``u8s8``) or signed (``s8s8``) 8-bit activations and signed
per-channel weights (8-bit, or 4-bit for W4A8), symmetric, zero point 0; or dynamic (``dynamic``:
``MatMulInteger`` with activations quantized per run, no calibration) for the MatMul / Gemm layers.
ConvTranspose weights ``[C_in, C_out/g, kh, kw]`` are per channel on axis 1, the output channels
(onnxruntime issue #19694: axis 0 quantizes per input channel), passed explicitly.

Opset: per-channel scales need ``DequantizeLinear``'s ``axis``, which exists from opset 13 on.
onnxruntime's quantizer writes it at any opset (its own ``quantize_static`` too), and onnxruntime then
rejects the model ("Unrecognized attribute: axis"); :func:`at_per_channel_opset` converts an older
model with onnx's version converter first (in memory), or says why it cannot.

Reading and rewriting (:func:`weight_slots`, :func:`write_layer`)
----------------------------------------------------------------
In a QDQ model a quantized layer reads its weight through ``DequantizeLinear(q, s, 0)`` and its bias
through ``DequantizeLinear(q_b, s_x·s, 0)`` (int32). :func:`weight_slots` finds those initializers per
layer (by node name: the quantizer keeps the names of the nodes it wraps); :func:`write_layer` replaces
the codes, the scales and the bias with a re-fitted set (:mod:`graphopt.compress.quantgrid`), so the
re-fit keeps the structure onnxruntime fuses and only changes numbers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.core.errors import GraphoptError
from graphopt.measure.qdq import Range

__all__ = ["FORMATS", "LAYER_OPS", "PER_CHANNEL_OPSET", "WeightSlots", "at_per_channel_opset", "blockwise_4bit",
           "dynamic", "input_scale", "named", "read_codes", "static_qdq", "weight_slots", "write_layer"]

FORMATS = ("u8s8", "s8s8", "dynamic")
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# The weight's output-channel axis where onnxruntime's default is wrong (issue #19694). Gemm is left to
# the quantizer, which takes axis 0 with transB and 1 without.
_CHANNEL_AXIS = {"ConvTranspose": 1}
#: The first opset whose DequantizeLinear takes ``axis`` (per-channel scales).
PER_CHANNEL_OPSET = 13


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer logs through the root logger (per-channel axis notes on LayerNorm weights,
    pre-processing advice); graphopt reports what it did in the pass's stats instead."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def named(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A shape-inferred copy of ``proto`` whose nodes all have unique names (the quantizer keys nodes by
    name; exporters leave some empty)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    taken = {n.name for n in out.graph.node if n.name}
    for i, node in enumerate(out.graph.node):
        if not node.name:
            name = f"{node.op_type}_q{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return onnx.shape_inference.infer_shapes(out)


def _default_opset(proto: onnx.ModelProto) -> int | None:
    """The version of the default ONNX domain ``proto`` imports (None when it imports none)."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def at_per_channel_opset(proto: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str | None]:
    """``proto`` at an opset where per-channel ``DequantizeLinear`` is valid, and what was done.

    At opset >= :data:`PER_CHANNEL_OPSET` it is returned as is with ``None``; older, a shape-inferred copy
    converted to that opset by ``onnx.version_converter`` with a note ``"opset 11 -> 13: ..."``; when the
    converter fails, ``(None, reason)`` (the caller refuses: a per-channel QDQ model would not load)."""
    version = _default_opset(proto)
    if version is None or version >= PER_CHANNEL_OPSET:
        return proto, None
    try:
        converted = onnx.version_converter.convert_version(proto, PER_CHANNEL_OPSET)
        converted = onnx.shape_inference.infer_shapes(converted)
    except Exception as exc:  # the converter raises RuntimeError or ValidationError, by op
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, (f"opset {version}: per-channel int8 needs opset {PER_CHANNEL_OPSET}, and onnx's version "
                      f"converter failed ({first})")
    converted.ir_version = max(converted.ir_version, proto.ir_version)
    return converted, (f"opset {version} -> {PER_CHANNEL_OPSET}: per-channel DequantizeLinear needs opset "
                       f"{PER_CHANNEL_OPSET} (onnx's version converter)")


def static_qdq(proto: onnx.ModelProto, ranges: Mapping[str, Range], *, fmt: str, weight_bits: int = 8,
               exclude: Iterable[str] = (), op_types: Iterable[str] | None = None,
               per_channel: bool = True) -> onnx.ModelProto:
    """The static QDQ model of ``proto`` (from :func:`named`) in format ``fmt`` (``u8s8`` / ``s8s8``), with
    ``ranges`` for its activations, symmetric weights of ``weight_bits`` (8, 7: int8 storage with
    onnxruntime's ``reduce_range``, codes in ``[−64, 64]``, or 4) per output channel (one scale per
    tensor with ``per_channel=False``: only for benchmarks, the re-fit expects per-channel scales), and
    the nodes named in ``exclude`` left float."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    activation = QuantType.QUInt8 if fmt == "u8s8" else QuantType.QInt8
    weight = QuantType.QInt4 if weight_bits == 4 else QuantType.QInt8
    tensors = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(r.lo), highest=np.float32(r.hi)) for name, r in ranges.items()})
    ops = sorted(op_types) if op_types is not None else sorted(set(QDQRegistry) | set(QLinearOpsRegistry))
    extra = {"WeightSymmetric": True, "ActivationSymmetric": False,
             "QDQOpTypePerChannelSupportToAxis": dict(_CHANNEL_AXIS)}
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    with _quiet():
        quantizer = QDQQuantizer(copy, per_channel, weight_bits == 7, weight, activation, tensors, [], sorted(exclude), ops, extra)
        quantizer.quantize_model()
    out = quantizer.model.model
    out.ir_version = proto.ir_version
    return out


def dynamic(proto: onnx.ModelProto, *, exclude: Iterable[str] = (),
            op_types: Iterable[str] = ("MatMul", "Gemm")) -> onnx.ModelProto:
    """Dynamic quantization of ``proto``'s MatMul / Gemm layers (8-bit per-channel weights, activations
    quantized at run time). The quantizer rewrites every Gemm as ``<name>_MatMul`` + ``Add`` before it
    looks at the names to exclude, so an excluded Gemm is excluded under both names (it stays float, as
    that MatMul and Add)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    with _quiet():
        quantizer = ONNXQuantizer(copy, True, False, QuantizationMode.IntegerOps, False, QuantType.QInt8,
                                  QuantType.QUInt8, None, [], sorted({*exclude, *(f"{n}_MatMul" for n in exclude)}),
                                  sorted(op_types),
                                  {"MatMulConstBOnly": True})
        quantizer.quantize_model()
    out = quantizer.model.model
    out.ir_version = proto.ir_version
    return out


def blockwise_4bit(proto: onnx.ModelProto, *, block_size: int, exclude: Iterable[str] = (),
                   int8_activations: bool = True) -> onnx.ModelProto:
    """``proto``'s MatMul layers with a constant weight as onnxruntime's ``MatMulNBits``: symmetric 4-bit
    weights with one scale per ``block_size`` weights along the input dimension (round to nearest), the
    activations quantized to 8 bits per block at run time (``accuracy_level`` 4: W4A8) or, without
    ``int8_activations``, kept float (weight-only). Nodes named in ``exclude`` stay float.

    onnxruntime's quantizer for it imports ``onnx_ir`` (a runtime dependency of graphopt for that reason,
    not of onnxruntime); without it this refuses in one line."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        raise GraphoptError(f"W4A8 without convs uses onnxruntime's MatMulNBits quantizer, which cannot be "
                            f"imported here ({exc}); pip install onnx-ir") from None

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    with _quiet():
        quantizer = MatMulNBitsQuantizer(copy, bits=4, block_size=block_size, is_symmetric=True,
                                         accuracy_level=4 if int8_activations else None,
                                         nodes_to_exclude=sorted(exclude), op_types_to_quantize=("MatMul",))
        quantizer.process()
    out = quantizer.model.model
    out.ir_version = proto.ir_version
    return out


# =============================================================================================
# the quantized weights of a QDQ model


@dataclass
class WeightSlots:
    """Where one quantized layer's numbers live in a QDQ model (initializer names)."""

    node: str
    op_type: str
    x: str                     # the layer's (dequantized) input
    codes: str                 # int8 / int4 weight codes, stored layout
    scale: str                 # per-channel weight scale
    axis: int
    bias_codes: str | None     # int32 bias codes, or None (no bias, or a float bias)
    bias_scale: str | None
    bias_float: str | None     # a float bias initializer read directly


def weight_slots(proto: onnx.ModelProto) -> dict[str, WeightSlots]:
    """Node name -> :class:`WeightSlots` for each Conv / ConvTranspose / Gemm / MatMul of ``proto`` whose
    weight is a ``DequantizeLinear`` of initializers."""
    inits = {t.name for t in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}
    out = {}
    for node in proto.graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or not all(i in inits for i in dq.input[:2]):
            continue
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        bias_codes = bias_scale = bias_float = None
        if len(node.input) > 2 and node.input[2]:
            bdq = producer.get(node.input[2])
            if bdq is not None and bdq.op_type == "DequantizeLinear" and all(i in inits for i in bdq.input[:2]):
                bias_codes, bias_scale = bdq.input[0], bdq.input[1]
            elif node.input[2] in inits:
                bias_float = node.input[2]
        out[node.name] = WeightSlots(node.name, node.op_type, node.input[0], dq.input[0], dq.input[1], axis,
                                     bias_codes, bias_scale, bias_float)
    return out


def write_layer(proto: onnx.ModelProto, slots: WeightSlots, codes: np.ndarray, scale: np.ndarray,
                bias: np.ndarray | None, input_scale: float | None) -> None:
    """Replace a layer's weight codes (stored layout), its per-channel scale and its bias in ``proto``.

    An int32 bias is stored as ``round(b / (s_x · s))`` with scale ``s_x · s`` (``input_scale`` is ``s_x``);
    a float bias as is. The codes keep their element type (int8, or int4)."""
    tensors = {t.name: t for t in proto.graph.initializer}
    old = tensors[slots.codes]
    _replace(tensors[slots.codes], numpy_helper.from_array(codes.astype(np.int8), slots.codes), old.data_type)
    _replace(tensors[slots.scale], numpy_helper.from_array(np.asarray(scale, np.float32).reshape(
        numpy_helper.to_array(tensors[slots.scale]).shape), slots.scale))
    if bias is None:
        return
    if slots.bias_codes is not None and input_scale is not None:
        bscale = (np.float32(input_scale) * np.asarray(scale, np.float32)).astype(np.float32)
        bscale = np.where(bscale > 0, bscale, np.float32(1e-12))
        bcodes = np.clip(np.rint(np.asarray(bias, np.float64) / bscale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        _replace(tensors[slots.bias_codes], numpy_helper.from_array(bcodes, slots.bias_codes))
        _replace(tensors[slots.bias_scale], numpy_helper.from_array(
            bscale.reshape(numpy_helper.to_array(tensors[slots.bias_scale]).shape), slots.bias_scale))
    elif slots.bias_float is not None:
        _replace(tensors[slots.bias_float], numpy_helper.from_array(np.asarray(bias, np.float32), slots.bias_float))


def _replace(target: onnx.TensorProto, new: onnx.TensorProto, data_type: int | None = None) -> None:
    """Overwrite ``target`` in place with ``new``'s contents; int4 codes (``data_type``) are re-packed."""
    if data_type is not None and data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        array = numpy_helper.to_array(new).astype(np.int8)
        nibbles = (array.reshape(-1) & 0x0F).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = nibbles[0::2] | (nibbles[1::2] << 4)  # ONNX 4-bit layout: element 2i in the low nibble
        new = onnx.helper.make_tensor(target.name, data_type, list(array.shape), packed.tobytes(), raw=True)
    target.CopyFrom(new)


def input_scale(proto: onnx.ModelProto, slots: WeightSlots) -> float | None:
    """``s_x``: the scale of the ``DequantizeLinear`` the layer reads its input from (None when it reads a
    float tensor)."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    dq = producer.get(slots.x)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    tensors = {t.name: t for t in proto.graph.initializer}
    if dq.input[1] not in tensors:
        return None
    return float(numpy_helper.to_array(tensors[dq.input[1]]).reshape(-1)[0])


def read_codes(proto: onnx.ModelProto, slots: WeightSlots) -> tuple[np.ndarray, np.ndarray]:
    """The layer's weight codes (int64, stored layout) and per-channel scales."""
    tensors = {t.name: t for t in proto.graph.initializer}
    return (numpy_helper.to_array(tensors[slots.codes]).astype(np.int64),
            numpy_helper.to_array(tensors[slots.scale]).astype(np.float64))
