"""What each ONNX op computes, in torch, with inference semantics.

Each entry of :data:`OPS` is ``fn(node, args, opset) -> [outputs]``: ``args`` are torch tensors (``None``
for an omitted optional input), attributes are read from the IR node with ONNX's defaults. The set is
what graphopt's presets leave in a CNN or a transformer (the zoo and ``models/corpus`` after the
lossless preset and each lossy preset), plus their common neighbours. Semantics are inference ones:

* BatchNormalization uses its stored statistics (``training_mode=1`` is refused), Dropout is the identity.
* Shape-like inputs (Reshape's shape, Slice's starts, Resize's sizes, Pad's pads, …) are read as Python
  ints; they are constants or integer tensors computed from shapes, never trained.

An op whose attributes ask for something not written here (a Resize mode, a ConvTranspose
``output_shape``, a second MaxPool output) raises :class:`Unsupported`; an op not in :data:`OPS` is
refused before anything runs (:func:`unsupported_ops`). The interpreter's equality with onnxruntime is
tested per op (``tests/test_finetune_ops.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

from graphopt.core.ir import Model, Node

Tensor = torch.Tensor


class Unsupported(Exception):
    """The op is known, but not with these attributes or inputs."""


# =============================================================================================
# helpers

_DTYPES = {TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
           TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32,
           TensorProto.INT16: torch.int16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
           TensorProto.BOOL: torch.bool}


def torch_dtype(onnx_type: int) -> torch.dtype:
    if onnx_type not in _DTYPES:
        raise Unsupported(f"element type {TensorProto.DataType.Name(onnx_type)}")
    return _DTYPES[onnx_type]


def ints(t: Tensor | None) -> list[int]:
    """A shape-like input as Python ints."""
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _float_or_int_div(a: Tensor, b: Tensor) -> Tensor:
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates, like C


def _spatial_pads(node: Node, x: Tensor, kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial dim from ``pads`` or ``auto_pad``."""
    n = len(kernel)
    auto = node.attr("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        pads = list(node.attr("pads", [0] * (2 * n)))
        return [(pads[i], pads[i + n]) for i in range(n)]
    if auto == "VALID":
        return [(0, 0)] * n
    out = []
    for i in range(n):
        size = x.shape[2 + i]
        want = math.ceil(size / strides[i])
        total = max((want - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
        small, big = total // 2, total - total // 2
        out.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return out


def _pad_input(x: Tensor, pads: list[tuple[int, int]], value: float = 0.0) -> Tensor:
    flat = [p for begin_end in reversed(pads) for p in begin_end]   # F.pad lists the last dim first
    return F.pad(x, flat, value=value) if any(flat) else x


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# =============================================================================================
# layers


def conv(node: Node, a: list, opset: int) -> list[Tensor]:
    x, w = a[0], a[1]
    b = a[2] if len(a) > 2 else None
    n = w.dim() - 2
    if n not in _CONV:
        raise Unsupported(f"{n}-D convolution")
    kernel = list(node.attr("kernel_shape", w.shape[2:]))
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    x = _pad_input(x, _spatial_pads(node, x, kernel, strides, dilations))
    return [_CONV[n](x, w, b, strides, 0, dilations, node.attr("group", 1))]


def conv_transpose(node: Node, a: list, opset: int) -> list[Tensor]:
    x, w = a[0], a[1]
    b = a[2] if len(a) > 2 else None
    n = w.dim() - 2
    if n not in _CONV_T or node.attr("output_shape") is not None:
        raise Unsupported("output_shape or a rank other than 1-3-D")
    auto = node.attr("auto_pad", b"NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET", ""):
        raise Unsupported("auto_pad")
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    out_pad = list(node.attr("output_padding", [0] * n))
    pads = list(node.attr("pads", [0] * (2 * n)))
    y = _CONV_T[n](x, w, b, strides, 0, out_pad, node.attr("group", 1), dilations)
    # ONNX pads crop the full transposed output (begin, end) per spatial dim
    index = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[i + n]) for i in range(n)]
    return [y[tuple(index)]]


def gemm(node: Node, a: list, opset: int) -> list[Tensor]:
    x, w = a[0], a[1]
    if node.attr("transA", 0):
        x = x.t()
    if node.attr("transB", 0):
        w = w.t()
    y = node.attr("alpha", 1.0) * (x @ w)
    if len(a) > 2 and a[2] is not None:
        y = y + node.attr("beta", 1.0) * a[2]
    return [y]


def batch_norm(node: Node, a: list, opset: int) -> list[Tensor]:
    if node.attr("training_mode", 0) or sum(o is not None for o in node.outputs) > 1:
        raise Unsupported("training mode (inference statistics only)")
    x, scale, bias, mean, var = a[:5]
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = scale / torch.sqrt(var + node.attr("epsilon", 1e-5))
    return [(x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)]


def layer_norm(node: Node, a: list, opset: int) -> list[Tensor]:
    if sum(o is not None for o in node.outputs) > 1:
        raise Unsupported("Mean / InvStdDev outputs")
    x = a[0]
    axis = _axis(node.attr("axis", -1), x.dim())
    shape = x.shape[axis:]
    scale = a[1].expand(shape) if a[1] is not None else None
    bias = a[2].expand(shape) if len(a) > 2 and a[2] is not None else None
    return [F.layer_norm(x, shape, scale, bias, node.attr("epsilon", 1e-5))]


def instance_norm(node: Node, a: list, opset: int) -> list[Tensor]:
    return [F.instance_norm(a[0], weight=a[1], bias=a[2], eps=node.attr("epsilon", 1e-5))]


def _pool_args(node: Node, x: Tensor) -> tuple[list[int], list[int], list[int], list[tuple[int, int]]]:
    kernel = list(node.attr("kernel_shape"))
    n = len(kernel)
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    return kernel, strides, dilations, _spatial_pads(node, x, kernel, strides, dilations)


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def max_pool(node: Node, a: list, opset: int) -> list[Tensor]:
    if sum(o is not None for o in node.outputs) > 1 or node.attr("storage_order", 0):
        raise Unsupported("the Indices output")
    x = a[0]
    kernel, strides, dilations, pads = _pool_args(node, x)
    if len(kernel) not in _MAX_POOL:
        raise Unsupported(f"{len(kernel)}-D pooling")
    x = _pad_input(x, pads, value=-math.inf)
    return [_MAX_POOL[len(kernel)](x, kernel, strides, 0, dilations, ceil_mode=bool(node.attr("ceil_mode", 0)))]


def avg_pool(node: Node, a: list, opset: int) -> list[Tensor]:
    x = a[0]
    kernel, strides, dilations, pads = _pool_args(node, x)
    if len(kernel) not in _AVG_POOL or any(d != 1 for d in dilations):
        raise Unsupported("dilations or a rank other than 1-3-D")
    include = bool(node.attr("count_include_pad", 0))
    ceil = bool(node.attr("ceil_mode", 0))
    if all(b == e and 2 * b <= k for (b, e), k in zip(pads, kernel)):
        return [_AVG_POOL[len(kernel)](x, kernel, strides, [b for b, _ in pads], ceil_mode=ceil,
                                       count_include_pad=include)]
    if not include:
        raise Unsupported("asymmetric pads without count_include_pad")
    return [_AVG_POOL[len(kernel)](_pad_input(x, pads), kernel, strides, 0, ceil_mode=ceil)]


def global_avg_pool(node: Node, a: list, opset: int) -> list[Tensor]:
    return [a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True)]


def global_max_pool(node: Node, a: list, opset: int) -> list[Tensor]:
    return [a[0].amax(dim=tuple(range(2, a[0].dim())), keepdim=True)]


# =============================================================================================
# activations and element-wise


def clip(node: Node, a: list, opset: int) -> list[Tensor]:
    if opset < 11:
        lo, hi = node.attr("min"), node.attr("max")
    else:
        lo = a[1].item() if len(a) > 1 and a[1] is not None else None
        hi = a[2].item() if len(a) > 2 and a[2] is not None else None
    return [torch.clamp(a[0], lo, hi)]


def softmax_like(fn: Callable[..., Tensor]) -> Callable[[Node, list, int], list[Tensor]]:
    def run(node: Node, a: list, opset: int) -> list[Tensor]:
        x = a[0]
        axis = _axis(node.attr("axis", -1 if opset >= 13 else 1), x.dim())
        if opset >= 13 or axis == x.dim() - 1:
            return [fn(x, dim=axis)]
        # before opset 13 the input is coerced to 2-D at ``axis``
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return [fn(flat, dim=1).reshape(x.shape)]
    return run


def gelu(node: Node, a: list, opset: int) -> list[Tensor]:
    approx = node.attr("approximate", b"none")
    return [F.gelu(a[0], approximate=approx.decode() if isinstance(approx, bytes) else approx)]


def elementwise(fn: Callable[..., Tensor]) -> Callable[[Node, list, int], list[Tensor]]:
    return lambda node, a, opset: [fn(*a)]


def variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Node, list, int], list[Tensor]]:
    def run(node: Node, a: list, opset: int) -> list[Tensor]:
        out = a[0]
        for t in a[1:]:
            out = fn(out, t)
        return [out]
    return run


def mod(node: Node, a: list, opset: int) -> list[Tensor]:
    # fmod=0 (integers): the result takes the divisor's sign, as Python's %; fmod=1: the dividend's, as C's
    return [torch.fmod(a[0], a[1]) if node.attr("fmod", 0) else torch.remainder(a[0], a[1])]


def pow_(node: Node, a: list, opset: int) -> list[Tensor]:
    return [torch.pow(a[0], a[1].to(a[0].dtype) if a[0].dtype.is_floating_point else a[1])]


def prelu(node: Node, a: list, opset: int) -> list[Tensor]:
    return [torch.where(a[0] >= 0, a[0], a[0] * a[1])]


# =============================================================================================
# shapes and indexing


def reshape(node: Node, a: list, opset: int) -> list[Tensor]:
    x, shape = a[0], ints(a[1])
    if not node.attr("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


def flatten(node: Node, a: list, opset: int) -> list[Tensor]:
    x = a[0]
    axis = _axis(node.attr("axis", 1), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]), -1)]


def transpose(node: Node, a: list, opset: int) -> list[Tensor]:
    perm = node.attr("perm") or list(reversed(range(a[0].dim())))
    return [a[0].permute(*perm)]


def concat(node: Node, a: list, opset: int) -> list[Tensor]:
    parts = [t for t in a if t is not None]
    return [torch.cat(parts, dim=_axis(node.attr("axis"), parts[0].dim()))]


def split(node: Node, a: list, opset: int) -> list[Tensor]:
    x = a[0]
    axis = _axis(node.attr("axis", 0), x.dim())
    sizes = ints(a[1]) if len(a) > 1 and a[1] is not None else list(node.attr("split", []))
    if not sizes:
        n = len(node.outputs)
        chunk = math.ceil(x.shape[axis] / n)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
    return list(torch.split(x, sizes, dim=axis))


def slice_(node: Node, a: list, opset: int) -> list[Tensor]:
    x = a[0]
    if opset < 10:
        starts, ends = list(node.attr("starts")), list(node.attr("ends"))
        axes, steps = list(node.attr("axes", range(len(starts)))), [1] * len(starts)
    else:
        starts, ends = ints(a[1]), ints(a[2])
        axes = ints(a[3]) if len(a) > 3 and a[3] is not None else list(range(len(starts)))
        steps = ints(a[4]) if len(a) > 4 and a[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, x.dim())
        size = x.shape[axis]
        if step > 0:
            lo = min(max(start + size if start < 0 else start, 0), size)
            hi = min(max(end + size if end < 0 else end, 0), size)
            index[axis] = slice(lo, max(hi, lo), step)
        else:
            # a negative step: the same elements read backwards, via a flip of the forward range
            lo_excl = max(min(end + size if end < 0 else end, size - 1), -1)
            hi_incl = max(min(start + size if start < 0 else start, size - 1), -1)
            count = max(0, (hi_incl - lo_excl - 1) // (-step) + 1) if hi_incl > lo_excl else 0
            first = hi_incl - (count - 1) * (-step) if count else 0
            index[axis] = slice(first, first + (count - 1) * (-step) + 1 if count else 0, -step)
            flips.append(axis)
    y = x[tuple(index)]
    return [torch.flip(y, flips) if flips else y]


def gather(node: Node, a: list, opset: int) -> list[Tensor]:
    x, idx = a[0], a[1].long()
    axis = _axis(node.attr("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return [out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])]


def _axes(node: Node, a: list, opset: int, version: int) -> list[int] | None:
    if opset >= version:
        return ints(a[1]) if len(a) > 1 and a[1] is not None else None
    axes = node.attr("axes")
    return None if axes is None else list(axes)


def squeeze(node: Node, a: list, opset: int) -> list[Tensor]:
    x = a[0]
    axes = _axes(node, a, opset, 13)
    if axes is None:
        return [x.squeeze()]
    return [x.squeeze(tuple(_axis(d, x.dim()) for d in axes))]


def unsqueeze(node: Node, a: list, opset: int) -> list[Tensor]:
    x = a[0]
    given = _axes(node, a, opset, 13) or []
    rank = x.dim() + len(given)
    for d in sorted(_axis(d, rank) for d in given):
        x = x.unsqueeze(d)
    return [x]


def shape(node: Node, a: list, opset: int) -> list[Tensor]:
    dims = list(a[0].shape)
    start, end = node.attr("start", 0), node.attr("end")
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


def cast(node: Node, a: list, opset: int) -> list[Tensor]:
    return [a[0].to(torch_dtype(node.attr("to")))]


def expand(node: Node, a: list, opset: int) -> list[Tensor]:
    x, target = a[0], ints(a[1])
    rank = max(x.dim(), len(target))
    have = [1] * (rank - x.dim()) + list(x.shape)
    target = [1] * (rank - len(target)) + target
    return [x.reshape(have).expand([max(h, t) if 1 in (h, t) else t for h, t in zip(have, target)])]


def tile(node: Node, a: list, opset: int) -> list[Tensor]:
    return [a[0].repeat(ints(a[1]))]


def constant(node: Node, a: list, opset: int) -> list[Tensor]:
    value = node.attr("value")
    if value is not None:
        return [torch.from_numpy(numpy_helper.to_array(value).copy())]
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if node.attr(key) is not None:
            return [torch.tensor(node.attr(key), dtype=dtype)]
    for key, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if node.attr(key) is not None:
            return [torch.tensor(list(node.attr(key)), dtype=dtype)]
    raise Unsupported("a sparse or string Constant")


def constant_of_shape(node: Node, a: list, opset: int) -> list[Tensor]:
    value = node.attr("value")
    fill = torch.from_numpy(numpy_helper.to_array(value).copy()) if value is not None else torch.zeros(1)
    return [torch.full(ints(a[0]), fill.reshape(-1)[0].item(), dtype=fill.dtype)]


def range_(node: Node, a: list, opset: int) -> list[Tensor]:
    return [torch.arange(a[0].item(), a[1].item(), a[2].item(), dtype=a[0].dtype)]


def pad(node: Node, a: list, opset: int) -> list[Tensor]:
    mode = node.attr("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    x = a[0]
    pads = ints(a[1]) if opset >= 11 else list(node.attr("pads"))
    value = (a[2].item() if len(a) > 2 and a[2] is not None else 0.0) if opset >= 11 else node.attr("value", 0.0)
    axes = ints(a[3]) if len(a) > 3 and a[3] is not None else list(range(x.dim()))
    n = len(axes)
    per_axis = {_axis(ax, x.dim()): (pads[i], pads[i + n]) for i, ax in enumerate(axes)}
    flat = [p for d in reversed(range(x.dim())) for p in per_axis.get(d, (0, 0))]
    if mode == "constant":
        return [F.pad(x, flat, value=value)]
    if mode in ("reflect", "edge") and all(per_axis.get(d, (0, 0)) == (0, 0) for d in range(min(2, x.dim()))):
        spatial = flat[: 2 * (x.dim() - 2)]
        return [F.pad(x, spatial, mode="reflect" if mode == "reflect" else "replicate")]
    raise Unsupported(f"Pad mode {mode} on these axes")


def reduce(fn: Callable[..., Tensor], axes_input_from: int) -> Callable[[Node, list, int], list[Tensor]]:
    def run(node: Node, a: list, opset: int) -> list[Tensor]:
        x = a[0]
        axes = _axes(node, a, opset, axes_input_from)
        keep = bool(node.attr("keepdims", 1))
        if not axes:
            if node.attr("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, dim=tuple(_axis(d, x.dim()) for d in axes), keepdim=keep)]
    return run


def resize(node: Node, a: list, opset: int) -> list[Tensor]:
    x = a[0]
    mode = node.attr("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    ctm = node.attr("coordinate_transformation_mode", b"half_pixel")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    if opset < 11 or x.dim() != 4 or node.attr("axes") is not None:
        raise Unsupported("Resize before opset 11, with axes, or not on NCHW")
    scales = a[2].tolist() if len(a) > 2 and a[2] is not None and a[2].numel() else None
    sizes = ints(a[3]) if len(a) > 3 and a[3] is not None else None
    if scales is not None and (scales[0] != 1 or scales[1] != 1):
        raise Unsupported("Resize of the batch or channel axis")
    out_size = sizes[2:] if sizes else [int(math.floor(x.shape[2 + i] * scales[2 + i])) for i in range(2)]
    if mode == "nearest":
        nearest = node.attr("nearest_mode", b"round_prefer_floor")
        nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
        if ctm == "asymmetric" and nearest == "floor":
            return [F.interpolate(x, size=out_size, mode="nearest")]
        if ctm in ("half_pixel", "pytorch_half_pixel") and nearest == "round_prefer_ceil" or (
                scales is not None and all(float(s).is_integer() for s in scales[2:]) and ctm == "asymmetric"):
            return [F.interpolate(x, size=out_size, mode="nearest-exact" if ctm != "asymmetric" else "nearest")]
        raise Unsupported(f"Resize nearest with {ctm}/{nearest}")
    if mode == "linear" and ctm in ("align_corners", "half_pixel", "pytorch_half_pixel"):
        if ctm == "half_pixel" and scales is not None and not sizes:
            return [F.interpolate(x, scale_factor=scales[2:], mode="bilinear", align_corners=False,
                                  recompute_scale_factor=False)]
        return [F.interpolate(x, size=out_size, mode="bilinear", align_corners=ctm == "align_corners")]
    raise Unsupported(f"Resize {mode} with {ctm}")


def where(node: Node, a: list, opset: int) -> list[Tensor]:
    return [torch.where(a[0].bool(), a[1], a[2])]


def identity(node: Node, a: list, opset: int) -> list[Tensor]:
    return [a[0]]


def dropout(node: Node, a: list, opset: int) -> list[Tensor]:
    if sum(o is not None for o in node.outputs) > 1:
        raise Unsupported("the mask output")
    return [a[0]]


# =============================================================================================
# the table

OPS: dict[str, Callable[[Node, list, int], list[Tensor]]] = {
    "Conv": conv, "ConvTranspose": conv_transpose, "Gemm": gemm, "MatMul": elementwise(torch.matmul),
    "BatchNormalization": batch_norm, "LayerNormalization": layer_norm, "InstanceNormalization": instance_norm,
    "MaxPool": max_pool, "AveragePool": avg_pool, "GlobalAveragePool": global_avg_pool,
    "GlobalMaxPool": global_max_pool,
    "Relu": elementwise(F.relu), "Sigmoid": elementwise(torch.sigmoid), "Tanh": elementwise(torch.tanh),
    "Erf": elementwise(torch.erf), "Gelu": gelu, "Clip": clip,
    "LeakyRelu": lambda node, a, opset: [F.leaky_relu(a[0], node.attr("alpha", 0.01))],
    "Elu": lambda node, a, opset: [F.elu(a[0], node.attr("alpha", 1.0))],
    "HardSigmoid": lambda node, a, opset: [torch.clamp(node.attr("alpha", 0.2) * a[0] + node.attr("beta", 0.5), 0, 1)],
    "HardSwish": elementwise(F.hardswish), "Softplus": elementwise(F.softplus), "PRelu": prelu,
    "Softmax": softmax_like(torch.softmax), "LogSoftmax": softmax_like(torch.log_softmax),
    "Add": elementwise(torch.add), "Sub": elementwise(torch.sub), "Mul": elementwise(torch.mul),
    "Div": elementwise(_float_or_int_div), "Mod": mod, "Pow": pow_, "Sqrt": elementwise(torch.sqrt),
    "Neg": elementwise(torch.neg), "Abs": elementwise(torch.abs), "Exp": elementwise(torch.exp),
    "Log": elementwise(torch.log), "Reciprocal": elementwise(torch.reciprocal),
    "Max": variadic(torch.maximum), "Min": variadic(torch.minimum), "Sum": variadic(torch.add),
    "Equal": elementwise(torch.eq), "Less": elementwise(torch.lt), "Greater": elementwise(torch.gt),
    "Not": elementwise(torch.logical_not), "And": elementwise(torch.logical_and),
    "Or": elementwise(torch.logical_or), "Where": where,
    "Reshape": reshape, "Flatten": flatten, "Transpose": transpose, "Concat": concat, "Split": split,
    "Slice": slice_, "Gather": gather, "Squeeze": squeeze, "Unsqueeze": unsqueeze, "Shape": shape,
    "Cast": cast, "Expand": expand, "Tile": tile, "Constant": constant, "ConstantOfShape": constant_of_shape,
    "Range": range_, "Pad": pad, "Resize": resize, "Identity": identity, "Dropout": dropout,
    "ReduceMean": reduce(torch.mean, 18), "ReduceSum": reduce(torch.sum, 13), "ReduceMax": reduce(torch.amax, 18),
    "ReduceMin": reduce(torch.amin, 18),
}


def unsupported_ops(model: Model) -> list[str]:
    """The op types of the main graph the interpreter does not know (sorted), and any subgraph- or
    function-owning node's op (If, Loop, Scan and local functions are not interpreted)."""
    local = {(fn.extras.domain, fn.extras.name) for fn in model.functions}
    out = set()
    for node in model.graph.toposort():
        if node.domain not in ("", "ai.onnx") or (node.domain, node.op_type) in local:
            out.add(f"{node.domain}:{node.op_type}" if node.domain else node.op_type)
        elif node.op_type not in OPS or any(True for _ in node.iter_subgraphs()):
            out.add(node.op_type)
    return sorted(out)

