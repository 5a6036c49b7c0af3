"""Coupling rules of the layers: Conv, ConvTranspose, Gemm and MatMul.

A layer's output channels are a new dimension coupled to its weight's output axis and its bias (the weights
are *producers* of the group); its input channels are coupled to the weight's input axis (the layer is a
*consumer*: pruning the group slices that axis). A grouped / depthwise Conv couples input block ``j``, output
block ``j`` and weight rows of block ``j`` into one channel. A MatMul of two activations (attention) couples
flat ``(head, dim)`` dimensions whose batch axes keep their size (with the walk's ``heads`` mode, the batch
axis of the heads shrinks instead and couples the third tensor's head axis). Refusals: a weight computed at runtime
(for a consumer or a grouped conv), a grouped ConvTranspose, Gemm operands that are not 2-D, a bias with rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from graphopt.compress.channels.dims import CannotFollow, Dim
from graphopt.core.ir import Node, Value

if TYPE_CHECKING:
    from graphopt.compress.channels.walk import CouplingWalk


def conv_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    sw = b.shape(w)
    groups = int(node.attr("group", 1))
    where = (d.value, d.axes)
    at_in = where in ((x, (1,)), (w, (1,))) if groups == 1 else False
    at_out = where in ((y, (1,)), (w, (0,)), (bias, (0,))) or (groups > 1 and where == (x, (1,)))
    if groups > 1 and where == (w, (1,)):
        raise CannotFollow("input axis of a grouped convolution's weight")
    if not (at_in or at_out):
        raise CannotFollow(f"axes {d.axes} of {d.value.name!r}")
    if not b.is_param(w) and (at_in or groups > 1):
        raise CannotFollow("weight computed at runtime")
    if at_in:
        wd = b.dim(w, (1,))
        b.link(b.dim(x, (1,)), wd)
        b.role("consumer", node, w, wd, x)
        return
    yd = _conv_producer(b, node, y, w, 0, bias)
    if groups > 1:  # conv group j: input block j, output block j are one channel
        cin, cout = b.shape(x)[1], sw[0]
        per_in, per_out = cin // groups, cout // groups
        xd = b.dim(x, (1,))
        p = np.arange(cin)
        q = np.arange(cout)
        b.link(xd, yd, p, (p // per_in) * per_out)
        if per_in > 1:
            b.link(xd, xd, p, (p // per_in) * per_in)
        if per_out > 1:
            b.link(yd, yd, q, (q // per_out) * per_out)


def _conv_producer(b: CouplingWalk, node: Node, y: Value, w: Value, w_axis: int, bias: Value | None) -> Dim:
    """Link output channel axis 1 of ``y`` to the weight's output axis ``w_axis`` and the bias; return y's dim."""
    yd, wd = b.dim(y, (1,)), b.dim(w, (w_axis,))
    b.link(yd, wd)
    b.role("producer", node, w, wd)
    if bias is not None:
        bd = b.dim(bias, (0,))
        b.link(yd, bd)
        b.role("producer", node, bias, bd)
    return yd


def conv_transpose_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    if int(node.attr("group", 1)) != 1:
        raise CannotFollow("grouped ConvTranspose")
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    where = (d.value, d.axes)
    if where in ((x, (1,)), (w, (0,))):
        wd = b.dim(w, (0,))
        b.link(b.dim(x, (1,)), wd)
        b.role("consumer", node, w, wd, x)
    elif where in ((y, (1,)), (w, (1,)), (bias, (0,))):
        _conv_producer(b, node, y, w, 1, bias)
    else:
        raise CannotFollow(f"axes {d.axes} of {d.value.name!r}")


def _gemm_contracted(b: CouplingWalk, node: Node, a: Value, fa: int, w: Value, fb: int) -> None:
    """The contracted axis: A's features ~ B's features; whichever operand is a weight is a consumer."""
    ad, wd = b.dim(a, (fa,)), b.dim(w, (fb,))
    b.link(ad, wd)
    if wd.is_param:
        b.role("consumer", node, w, wd, a)
    if ad.is_param:
        b.role("consumer", node, a, ad, w)


def _gemm_outputs(b: CouplingWalk, node: Node, w: Value, nb: int, c: Value | None) -> None:
    """Y's columns ~ B's output axis ~ C's last axis (a C broadcast along it is left alone)."""
    y = node.outputs[0]
    yd, wd = b.dim(y, (1,)), b.dim(w, (nb,))
    b.link(yd, wd)
    b.role("producer", node, w, wd)
    if c is None:
        return
    sc = b.shape(c)
    if sc and sc[-1] == yd.size and yd.size > 1:
        cd = b.dim(c, (len(sc) - 1,))
        b.link(yd, cd)
        b.role("producer", node, c, cd)
    elif sc and sc[-1] != 1:
        raise CannotFollow(f"bias {c.name!r} shape {sc}")


def gemm_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    """Gemm ``Y = A·B + C`` (with ``transA`` / ``transB``): contracted axis, output columns, or rows."""
    a, w = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    if b.rank(a) != 2 or b.rank(w) != 2:
        raise CannotFollow("operands are not 2-D")
    ta, tb = int(node.attr("transA", 0)), int(node.attr("transB", 0))
    fa, ma = (0, 1) if ta else (1, 0)
    fb, nb = (1, 0) if tb else (0, 1)
    where = (d.value, d.axes)
    if where in ((a, (fa,)), (w, (fb,))):
        _gemm_contracted(b, node, a, fa, w, fb)
    elif where in ((y, (1,)), (w, (nb,))) or (c is not None and d.value is c):
        _gemm_outputs(b, node, w, nb, c)
    elif where in ((y, (0,)), (a, (ma,))):
        b.link(b.dim(y, (0,)), b.dim(a, (ma,)))
        if c is not None and len(b.shape(c)) == 2 and b.shape(c)[0] > 1:
            raise CannotFollow("bias with rows")
    else:
        raise CannotFollow(f"axes {d.axes} of {d.value.name!r}")


def matmul_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    a, w = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    ra, rw, ry = b.rank(a), b.rank(w), b.rank(y)
    if ra < 2 or rw < 2:
        raise CannotFollow("1-D operand")
    if len(d.axes) != 1:
        _matmul_flat(b, node, d)
        return
    ax = d.axes[0]
    where = (d.value, ax)
    if where in ((a, ra - 1), (w, rw - 2)):
        ad, wd = b.dim(a, (ra - 1,)), b.dim(w, (rw - 2,))
        b.link(ad, wd)
        if wd.is_param:
            b.role("consumer", node, w, wd, a)
        return
    if where in ((y, ry - 1), (w, rw - 1)):
        yd, wd = b.dim(y, (ry - 1,)), b.dim(w, (rw - 1,))
        b.link(yd, wd)
        if wd.is_param:
            b.role("producer", node, w, wd)
        return
    if where in ((y, ry - 2), (a, ra - 2)):
        b.link(b.dim(y, (ry - 2,)), b.dim(a, (ra - 2,)))
        return
    # a broadcast batch axis
    out_ax = ax + ry - b.rank(d.value)
    yd = b.dim(y, (out_ax,))
    for u, r in ((a, ra), (w, rw)):
        ua = out_ax - (ry - r)
        if ua >= 0 and b.shape(u)[ua] == yd.size:
            b.link(yd, b.dim(u, (ua,)))


def _matmul_flat(b: CouplingWalk, node: Node, d: Dim) -> None:
    """A flat dimension over broadcast batch axes plus one matrix axis (attention heads: ``(head, dim)``).

    The batch axes keep their size (only the matrix axis may shrink); the matrix axis follows the
    single-axis rules: A's last ~ B's second-to-last (contracted), B's last ~ Y's last, A's rows ~ Y's rows.
    """
    a, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    ranks = {"a": b.rank(a), "w": b.rank(w), "y": b.rank(y)}
    values = {"a": a, "w": w, "y": y}
    role = next(k for k, v in values.items() if v is d.value)
    r = ranks[role]
    batch = [ax for ax in d.axes if ax < r - 2]
    matrix = [ax for ax in d.axes if ax >= r - 2]
    if len(matrix) != 1 or (d.prunable_axis != matrix[0] and not (b.heads and batch == [d.prunable_axis])):
        raise CannotFollow(f"flat dimension {d.axes} shrinks along a batch axis")
    # matrix axis as (operand, offset from the end)
    pairs = {("a", 1): ("w", 2), ("w", 2): ("a", 1), ("w", 1): ("y", 1), ("y", 1): ("w", 1),
             ("a", 2): ("y", 2), ("y", 2): ("a", 2)}
    other, back = pairs[(role, r - matrix[0])]
    ro = ranks[other]
    shape_o = b.shape(values[other])
    axes_o = [ax - r + ro for ax in batch]
    if any(ax < 0 or shape_o[ax] != b.shape(d.value)[bx] for ax, bx in zip(axes_o, batch)):
        raise CannotFollow(f"batch axes {batch} broadcast between the operands")
    od = b.dim(values[other], [*axes_o, ro - back])
    b.link(d, od)
    if d.prunable_axis != matrix[0]:
        _link_third_heads(b, d, values[next(k for k in values if k not in (role, other))], r)


def _link_third_heads(b: CouplingWalk, d: Dim, third: Value, r: int) -> None:
    """Heads mode: ``d`` shrinks along its batch axis (the heads), so the MatMul's third tensor loses the same
    heads on that axis (``q·kᵀ``'s scores ``[B, H, S, S]``; ``attn·v``'s probabilities): flat position
    ``(h, ·)`` of ``d`` is head ``h`` there. Refused when that axis broadcasts."""
    rt = b.rank(third)
    axis = d.prunable_axis - r + rt
    if axis < 0 or b.shape(third)[axis] != b.shape(d.value)[d.prunable_axis]:
        raise CannotFollow(f"the head axis {d.prunable_axis} broadcasts into {third.name!r}")
    heads = np.unravel_index(np.arange(d.size), d.sizes)[d.axes.index(d.prunable_axis)]
    b.link(d, b.dim(third, (axis,)), np.arange(d.size), heads)

