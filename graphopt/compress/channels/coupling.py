"""What each op means for channel dimensions: one coupling rule per op family.

A rule ``rule(walk, node, dim, side, slot)`` is called when the walk (:mod:`.walk`) reaches ``dim`` at
``node`` (``side`` ``"in"``: input ``slot`` reads it; ``"out"``: output ``slot`` is it). It couples ``dim`` with
the node's other dimensions (``walk.link``: positions that are the same channel), marks weights as producers
(their output channels are the group) or consumers (their input channels are), or raises
:class:`CannotFollow` with the reason. The pass-through families live here; the rules that move positions
are in :mod:`.index_mapping`, the layers (Conv, Gemm, MatMul) in :mod:`.layers`.

==========================================  =====================================================
Conv (group 1), Gemm, MatMul (const B)      output channels = a new dim, coupled to ``W``'s output
                                            axis and the bias; input channels couple to ``W``'s
                                            input axis (the layer is a *consumer*)
grouped / depthwise Conv                    conv group ``j``: input block ``j``, output block
                                            ``j`` and ``W`` rows of block ``j`` are one channel
                                            (``group`` shrinks with it)
ConvTranspose (group 1)                     ``X`` axis 1 ~ ``W`` axis 0; ``Y`` axis 1 ~ ``W`` axis 1
elementwise (Add, Sub, Mul, Div, Pow,       numpy broadcasting: aligned axes of equal size are the
Where, Sum, Max, Min, Mean, PRelu)          same positions; size-1 (broadcast) axes are not coupled
activations, Identity, Dropout, Cast        identity
BatchNorm, InstanceNorm                     axis 1 ~ scale/bias/mean/var axis 0
Max/Average/Lp pool, global pools           axes 0 and 1 are identity (pooled axes: frozen)
Resize / Upsample, Pad                      identity on axes they leave unchanged
Transpose                                   axis permutation (positions permuted for flat dims)
Reshape / Flatten / Squeeze / Unsqueeze     from the concrete shapes: a whole axis group maps flat
                                            to flat (channel shuffle = Reshape, Transpose,
                                            Reshape becomes a permutation); a leading axis merged
                                            with others maps channel ``c`` to the block
                                            ``[c·R, (c+1)·R)`` (Flatten before Gemm)
Concat / Split / Slice (step 1)             offsets along the axis
Gather (constant 1-D indices)               output position ``q`` is input position ``idx[q]``
Softmax, LayerNorm, Reduce*                 identity on axes they do not normalise/reduce
MatMul of two activations (attention)       a flat ``(head, dim)`` dimension: batch axes keep their
                                            size, the matrix axis follows the rules above (q·kᵀ
                                            couples q's and k's head dims; attn·v keeps v's)
Shape                                       no coupling, when its value only feeds Reshape targets
                                            and Slice bounds (they are rewritten for the pruned
                                            shapes); anything else reading it freezes the group
==========================================  =====================================================

Refusals (each freezes the group, naming the op and node): an op without a rule above, an op reading the
dimension in a way its rule cannot follow (a pooled or reduced axis, a Reshape whose target is not a shape
computation, a Slice with a step, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from graphopt.compress.channels.dims import CannotFollow, Dim
from graphopt.compress.channels.index_mapping import (
    concat_rule,
    gather_rule,
    reshape_rule,
    slice_rule,
    split_rule,
    transpose_rule,
)
from graphopt.compress.channels.layers import conv_rule, conv_transpose_rule, gemm_rule, matmul_rule
from graphopt.compress.channels.shape_eval import SHAPE_OPS
from graphopt.core.ir import Node, Value

if TYPE_CHECKING:
    from graphopt.compress.channels.walk import CouplingWalk

Rule = Callable[["CouplingWalk", Node, Dim, str, int], None]

_UNARY = frozenset("""
    Relu LeakyRelu Elu Selu Celu Gelu Sigmoid HardSigmoid HardSwish Softplus Softsign Tanh ThresholdedRelu
    Mish Swish Shrink Clip Abs Neg Exp Log Sqrt Reciprocal Floor Ceil Round Sign Erf Sin Cos Tan Asin Acos Atan
    Sinh Cosh Asinh Acosh Atanh Not IsNaN IsInf Identity Cast CastLike Dropout
""".split())
_ELEMENTWISE = frozenset("""
    Add Sub Mul Div Pow Mod PRelu Where Sum Max Min Mean And Or Xor Equal Greater Less GreaterOrEqual LessOrEqual
    BitwiseAnd BitwiseOr BitwiseXor BitShift
""".split())
_POOLS = frozenset("MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split())
_RESHAPES = frozenset("Reshape Flatten Squeeze Unsqueeze".split())
_REDUCES = frozenset("""ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare""".split())
#: Ops whose output channels are a new dimension (the sources of the walk).


def _shape_value_passes_on(b: CouplingWalk, v: Value, user: Node, uslot: int | tuple) -> bool:
    """Whether a shape value ``v`` read by ``user`` flows on (True: follow its outputs) or ends harmlessly
    in a bound the shrink rewrites (False); raises when it reaches anything else."""
    if isinstance(uslot, tuple):
        raise CannotFollow(f"its value is read inside {user.op_type} {user.name!r}")
    if (user.op_type == "Reshape" and uslot == 1) or (user.op_type == "Slice" and uslot >= 1) \
            or user.op_type == "Shape":  # the length of a shape vector does not depend on its values
        return False
    if (user.op_type in SHAPE_OPS and user.op_type != "Shape") or (user.op_type == "Reshape" and uslot == 0
                                                                     and b.rank(v) <= 1):
        return True
    raise CannotFollow(f"its value flows into {user.op_type} {user.name!r}")


def shape_reader_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    """Shape: allowed when its value only ever feeds Reshape targets and Slice bounds.

    Those get constants for the pruned shapes (:func:`.shrink.apply`), so what the old computation would have
    said no longer matters.
    """
    stack = [o for o in node.outputs if o is not None]
    seen: set[str] = set()
    while stack:
        v = stack.pop()
        if v.name in seen:
            continue
        seen.add(v.name)
        if b.graph.is_graph_output(v):
            raise CannotFollow(f"its value reaches the graph output {v.name!r}")
        for user, uslot in b.graph.uses(v):
            if _shape_value_passes_on(b, v, user, uslot):
                stack.extend(o for o in user.outputs if o is not None)


def _only_axes(d: Dim, allowed: Sequence[int], what: str) -> None:
    if not set(d.axes) <= set(allowed):
        raise CannotFollow(f"{what} along axes {d.axes}")


def unary_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    if side == "in" and slot != 0:
        return  # Clip bounds, CastLike target: no channels flow through them
    x = node.inputs[0]
    outs = [o for o in node.outputs if o is not None]
    if node.op_type == "Dropout":
        outs = outs[:2]
    for o in outs:
        b.link(b.dim(x, d.axes), b.dim(o, d.axes))


def elementwise_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    y = node.outputs[0]
    ry = b.rank(y)
    if side == "in":
        out_axes = tuple(a + ry - b.rank(node.inputs[slot]) for a in d.axes)
    else:
        out_axes = d.axes
    yd = b.dim(y, out_axes)
    for s, u in enumerate(node.inputs):
        if u is None:
            continue
        shape_u = b.shape(u)
        axes_u = [a - (ry - len(shape_u)) for a in out_axes]
        present = [a for a in axes_u if a >= 0]
        sizes = [shape_u[a] for a in present]
        if not present or all(n == 1 for n in sizes):
            continue  # broadcast along the channels: the operand has none
        if len(present) != len(axes_u) or tuple(sizes) != yd.sizes:
            raise CannotFollow(f"input {s} broadcasts part of the channel axes {out_axes}")
        ud = b.dim(u, present)
        b.link(yd, ud)
        if ud.is_param:
            b.role("producer", node, u, ud)


def norm_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    x, y = node.inputs[0], node.outputs[0]
    if len([o for o in node.outputs if o is not None]) > 1:
        raise CannotFollow("training-mode outputs")
    if side == "in" and slot > 0:
        axes = (1,)
        if d.axes != (0,):
            raise CannotFollow(f"parameter axes {d.axes}")
    else:
        axes = d.axes
    if 1 not in axes:
        if node.op_type == "InstanceNormalization":
            raise CannotFollow(f"normalised axes {axes}")
        b.link(b.dim(x, axes), b.dim(y, axes))
        return
    if axes != (1,):
        raise CannotFollow(f"channel axis mixed with {axes}")
    xd, yd = b.dim(x, (1,)), b.dim(y, (1,))
    b.link(xd, yd)
    for p in node.inputs[1:]:
        if p is None:
            continue
        if len(b.shape(p)) != 1:
            raise CannotFollow(f"parameter {p.name!r} is not 1-D")
        pd = b.dim(p, (0,))
        b.link(yd, pd)
        b.role("producer", node, p, pd)


def pool_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    if len([o for o in node.outputs if o is not None]) > 1:
        raise CannotFollow("Indices output")
    _only_axes(d, (0, 1), "pooled")
    b.link(b.dim(node.inputs[0], d.axes), b.dim(node.outputs[0], d.axes))


def same_size_axes_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    """Resize / Upsample / Pad: identity on axes whose size does not change (and, for Pad, with zero pads)."""
    if side == "in" and slot != 0:
        raise CannotFollow(f"channels flow into input {slot}")
    x, y = node.inputs[0], node.outputs[0]
    sx, sy = b.shape(x), b.shape(y)
    for a in d.axes:
        if sx[a] != sy[a]:
            raise CannotFollow(f"axis {a} changes size {sx[a]} -> {sy[a]}")
    if node.op_type == "Pad":
        _check_zero_pads(b, node, d.axes, len(sx))
    if node.op_type == "Resize" and len(node.inputs) > 3 and node.inputs[3] is not None \
            and b.const(node.inputs[3]) is None:
        raise CannotFollow("sizes computed at runtime")
    if node.op_type == "Resize" and len(node.inputs) > 1 and node.inputs[1] is not None:
        roi = b.const(node.inputs[1])
        if roi is None or (roi.size and node.attr("coordinate_transformation_mode", b"") == b"tf_crop_and_resize"):
            raise CannotFollow("region of interest")
    b.link(b.dim(x, d.axes), b.dim(y, d.axes))


def _check_zero_pads(b: CouplingWalk, node: Node, axes: Sequence[int], rank: int) -> None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        pads = b.const(node.inputs[1])
        if pads is None:
            raise CannotFollow("pads computed at runtime")
        pad_axes = list(range(rank))
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            ax = b.const(node.inputs[3])
            if ax is None:
                raise CannotFollow("pad axes computed at runtime")
            pad_axes = [int(a) % rank for a in ax]
    else:
        pads = np.array(node.attr("pads", []))
        pad_axes = list(range(rank))
    n = len(pad_axes)
    for a in axes:
        if a in pad_axes:
            i = pad_axes.index(a)
            if pads[i] != 0 or pads[i + n] != 0:
                raise CannotFollow(f"pads axis {a}")



def _axes_of(b: CouplingWalk, node: Node, rank: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = b.const(node.inputs[1])
        if arr is None:
            raise CannotFollow("axes computed at runtime")
        return [int(t) % rank for t in arr.ravel()]
    axes = node.attr("axes")
    return None if axes is None else [int(t) % rank for t in axes]


def reduce_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    if side == "in" and slot != 0:
        raise CannotFollow("channels flow into the axes input")
    x, y = node.inputs[0], node.outputs[0]
    rank = b.rank(x)
    axes = _axes_of(b, node, rank)
    if axes is None or (not axes and node.attr("noop_with_empty_axes", 0) == 0):
        axes = list(range(rank))
    keep = int(node.attr("keepdims", 1))
    kept = [a for a in range(rank) if a not in axes]
    if side == "in":
        if set(d.axes) & set(axes):
            raise CannotFollow(f"reduces axes {sorted(set(d.axes) & set(axes))}")
        xa = d.axes
    else:
        xa = d.axes if keep else tuple(kept[a] for a in d.axes)
    ya = xa if keep else tuple(kept.index(a) for a in xa)
    b.link(b.dim(x, xa), b.dim(y, ya))


def axis_op_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    """Softmax / LogSoftmax / LayerNormalization: identity on axes they do not normalise."""
    x, y = node.inputs[0], node.outputs[0]
    rank = b.rank(x)
    if side == "in" and slot != 0:
        raise CannotFollow("normalisation parameters")
    if node.op_type == "LayerNormalization":
        if len([o for o in node.outputs if o is not None]) > 1:
            raise CannotFollow("mean/inv-std outputs")
        norm = list(range(int(node.attr("axis", -1)) % rank, rank))
    else:
        default = -1 if (b.model.opset() or 13) >= 13 else 1
        axis = int(node.attr("axis", default)) % rank
        norm = [axis] if (b.model.opset() or 13) >= 13 else list(range(axis, rank))
    if set(d.axes) & set(norm):
        raise CannotFollow(f"normalises axes {norm}")
    b.link(b.dim(x, d.axes), b.dim(y, d.axes))


#: op type -> rule(walk, node, dim, side ("in"/"out"), slot); an op without a rule freezes what it touches
RULES: dict[str, Rule] = {
    **dict.fromkeys(_UNARY, unary_rule),
    **dict.fromkeys(_ELEMENTWISE, elementwise_rule),
    **dict.fromkeys(("BatchNormalization", "InstanceNormalization"), norm_rule),
    **dict.fromkeys(_POOLS, pool_rule),
    **dict.fromkeys(("Resize", "Upsample", "Pad"), same_size_axes_rule),
    "Transpose": transpose_rule,
    **dict.fromkeys(_RESHAPES, reshape_rule),
    "Concat": concat_rule,
    "Split": split_rule,
    "Slice": slice_rule,
    "Gather": gather_rule,
    "Conv": conv_rule,
    "ConvTranspose": conv_transpose_rule,
    "Gemm": gemm_rule,
    "MatMul": matmul_rule,
    "Shape": shape_reader_rule,
    **dict.fromkeys(_REDUCES, reduce_rule),
    **dict.fromkeys(("Softmax", "LogSoftmax", "LayerNormalization"), axis_op_rule),
}

