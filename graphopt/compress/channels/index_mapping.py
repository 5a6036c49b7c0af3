"""Coupling rules that move channel positions: Transpose, Reshape / Flatten / Squeeze / Unsqueeze, Concat,
Split, Slice and Gather (Torch-Pruning's index mappings).

Each maps positions of one tensor's dimension to positions of another's: a permutation (Transpose, a channel
shuffle's Reshape), a block (a channel merged with trailing axes by Flatten: channel ``c`` is features
``[c·R, (c+1)·R)``), an offset (Concat / Split / Slice along the channel axis) or an index table (Gather).
Refusals: a dimension spread over several reshape groups, a Slice with a step along it, bounds or indices
computed at runtime (a Reshape target or Slice bound computed from ``Shape`` is evaluated and followed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from graphopt.compress.channels.dims import CannotFollow, Dim
from graphopt.core.ir import Node, Value

if TYPE_CHECKING:
    from graphopt.compress.channels.walk import CouplingWalk


def transpose_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = b.rank(x)
    perm = list(node.attr("perm", list(range(rank - 1, -1, -1))))
    if side == "in":
        xd = d
        y_axes = tuple(sorted(perm.index(a) for a in d.axes))
        yd = b.dim(y, y_axes)
    else:
        yd = d
        xd = b.dim(x, tuple(sorted(perm[a] for a in d.axes)))
    if b.heads and len(xd.axes) > 1 and perm[yd.prunable_axis] != xd.prunable_axis:
        # the heads (the first axis) would become the second: a split this walk does not recognise
        raise CannotFollow(f"moves the shrinking axis {xd.prunable_axis} behind axis {perm[yd.prunable_axis]}")
    # y's sorted axes are x axes [perm[a] for a in yd.axes]; reorder x's flat grid into that order.
    order = [xd.axes.index(perm[a]) for a in yd.axes]
    grid = np.arange(xd.size).reshape(xd.sizes).transpose(order).ravel()
    b.link(xd, yd, grid, np.arange(yd.size))


def _axis_groups(a: Sequence[int], c: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Contiguous axis groups of a reshape ``a -> c`` whose products match; size-1 axes stand alone."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(c):
        if i < len(a) and a[i] == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(c) and c[j] == 1:
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(a) or j >= len(c):
            raise CannotFollow("reshape sizes do not match")
        gi, gj, pa, pc = [i], [j], a[i], c[j]
        i += 1
        j += 1
        while pa != pc:
            if pa < pc:
                if i >= len(a):
                    raise CannotFollow("reshape sizes do not match")
                gi.append(i)
                pa *= a[i]
                i += 1
            else:
                if j >= len(c):
                    raise CannotFollow("reshape sizes do not match")
                gj.append(j)
                pc *= c[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _check_reshape_arguments(b: CouplingWalk, node: Node) -> None:
    """Refuse a Reshape target / Squeeze axes the walk cannot know; a target computed from ``Shape`` is
    evaluated, and the node remembered as a dynamic reader of the shapes it reads."""
    if node.op_type == "Reshape":
        target = b.const(node.inputs[1])
        if target is None:
            reads: set[str] = set()
            target = b.evaluate(node.inputs[1], reads)  # raises when the target is not a shape computation
            b.dynamic.setdefault(node.name, set()).update(reads)
        if int(node.attr("allowzero", 0)) and (np.asarray(target) == 0).any():
            raise CannotFollow("allowzero with a zero in the target")
    if node.op_type in ("Squeeze", "Unsqueeze") and len(node.inputs) > 1 and node.inputs[1] is not None \
            and b.const(node.inputs[1]) is None:
        raise CannotFollow("axes computed at runtime")


def _home_group(groups: list[tuple[list[int], list[int]]], d: Dim) -> tuple[list[int], list[int]]:
    """The one reshape group ``(source axes, destination axes)`` holding all of ``d``'s axes."""
    axes = list(d.axes)
    home = [(gs, gd) for gs, gd in groups if set(axes) & set(gs)]
    if len(home) != 1 or not set(axes) <= set(home[0][0]):
        raise CannotFollow(f"axes {d.axes} span several reshape groups")
    if not home[0][1]:
        raise CannotFollow("axes collapse to nothing")
    return home[0]


def _link_whole_group(b: CouplingWalk, d: Dim, dst: Value, gs: list[int], gd: list[int]) -> None:
    """``d`` is a whole reshape group: its flat positions are the destination group's flat positions."""
    partial = [e for e in b.by_value.get((dst.name, None), []) if set(e.axes) < set(gd)]
    if partial and len(gs) == 1:
        # The flat side of a block merge (Flatten before Gemm): the leading axes' dim on the other side
        # already links its blocks here when it is visited.
        if any(e.axes != tuple(gd[:len(e.axes)]) for e in partial):
            raise CannotFollow(f"axes {[e.axes for e in partial]} of {dst.name!r} are not leading axes")
        return
    b.link(d, b.dim(dst, gd))


def reshape_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    """Reshape / Flatten / Squeeze / Unsqueeze, from the concrete shapes: a whole axis group maps flat to
    flat; leading axes merged with trailing ones map channel ``c`` to the block ``[c·R, (c+1)·R)``."""
    if side == "in" and slot != 0:
        raise CannotFollow("channels flow into the shape input")
    x, y = node.inputs[0], node.outputs[0]
    _check_reshape_arguments(b, node)
    sx, sy = b.shape(x), b.shape(y)
    dst, src_shape = (y, sx) if side == "in" else (x, sy)
    groups = _axis_groups(sx, sy) if side == "in" else [(gj, gi) for gi, gj in _axis_groups(sx, sy)]
    axes = list(d.axes)
    gs, gd = _home_group(groups, d)
    if axes == gs:
        _link_whole_group(b, d, dst, gs, gd)
        return
    if axes == gs[:len(axes)] and len(gd) == 1:  # leading axes merged with trailing ones: blocks
        rest = math.prod(src_shape[a] for a in gs[len(axes):])
        dd = b.dim(dst, gd)
        b.link(d, dd, np.repeat(np.arange(d.size), rest), np.arange(d.size * rest))
        return
    raise CannotFollow(f"axes {d.axes} are part of the reshape group {gs} -> {gd}")


def concat_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    y = node.outputs[0]
    rank = b.rank(y)
    axis = int(node.attr("axis")) % rank
    ins = node.inputs
    if axis not in d.axes:
        for u in ins:
            b.link(b.dim(y, d.axes), b.dim(u, d.axes))
        return
    if d.axes != (axis,):
        raise CannotFollow(f"concatenation axis mixed with {d.axes}")
    yd = b.dim(y, (axis,))
    offset = 0
    for s, u in enumerate(ins):
        n = b.shape(u)[axis]
        if n and (side == "out" or s == slot):
            b.link(b.dim(u, (axis,)), yd, np.arange(n), offset + np.arange(n))
        offset += n


def split_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    if side == "in" and slot != 0:
        raise CannotFollow("channels flow into the split sizes")
    x = node.inputs[0]
    rank = b.rank(x)
    axis = int(node.attr("axis", 0)) % rank
    outs = node.outputs
    if axis not in d.axes:
        for o in outs:
            if o is not None:
                b.link(b.dim(x, d.axes), b.dim(o, d.axes))
        return
    if d.axes != (axis,):
        raise CannotFollow(f"split axis mixed with {d.axes}")
    if len(node.inputs) > 1 and node.inputs[1] is not None and b.const(node.inputs[1]) is None:
        raise CannotFollow("split sizes computed at runtime")
    xd = b.dim(x, (axis,))
    offset = 0
    for s, o in enumerate(outs):
        if o is None:
            raise CannotFollow("omitted output")
        n = b.shape(o)[axis]
        if n and (side == "in" or s == slot):
            b.link(xd, b.dim(o, (axis,)), offset + np.arange(n), np.arange(n))
        offset += n


def slice_params(b: CouplingWalk, node: Node, rank: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """(starts, ends, axes, steps) of a Slice, attribute (opset < 10) or constant-input form."""
    if len(node.inputs) == 1:
        starts, ends = list(node.attr("starts")), list(node.attr("ends"))
        axes = list(node.attr("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        arrays = []
        for s in range(1, 5):
            v = node.inputs[s] if s < len(node.inputs) else None
            if v is None:
                arrays.append(None)
                continue
            arr = b.const(v)
            if arr is None:
                reads: set[str] = set()
                arr = b.evaluate(v, reads)
                b.dynamic.setdefault(node.name, set()).update(reads)
            arrays.append([int(t) for t in arr.ravel()])
        starts, ends = arrays[0], arrays[1]
        axes = arrays[2] if arrays[2] is not None else list(range(len(starts)))
        steps = arrays[3] if arrays[3] is not None else [1] * len(starts)
    return starts, ends, [a % rank for a in axes], steps


def slice_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    if side == "in" and slot != 0:
        raise CannotFollow("channels flow into the slice bounds")
    x, y = node.inputs[0], node.outputs[0]
    sx, sy = b.shape(x), b.shape(y)
    starts, ends, axes, steps = slice_params(b, node, len(sx))
    sliced = [a for a in d.axes if a in axes]
    if not sliced:
        b.link(b.dim(x, d.axes), b.dim(y, d.axes))
        return
    if len(d.axes) != 1:
        raise CannotFollow(f"sliced axis mixed with {d.axes}")
    a = d.axes[0]
    i = axes.index(a)
    if steps[i] != 1:
        raise CannotFollow(f"step {steps[i]} along the channel axis")
    idx = np.arange(sx[a])[slice(starts[i], ends[i], 1)]
    if len(idx) != sy[a]:
        raise CannotFollow("slice size disagrees with the inferred shape")
    if len(idx):
        b.link(b.dim(x, (a,)), b.dim(y, (a,)), idx, np.arange(len(idx)))


def gather_rule(b: CouplingWalk, node: Node, d: Dim, side: str, slot: int) -> None:
    """Gather with constant 1-D indices: along the gathered axis, output position q is input ``idx[q]``."""
    if side == "in" and slot != 0:
        raise CannotFollow("channels flow into the indices")
    x, y = node.inputs[0], node.outputs[0]
    rx = b.rank(x)
    axis = int(node.attr("axis", 0)) % rx
    idx = b.const(node.inputs[1])
    if idx is None:
        raise CannotFollow("indices computed at runtime")
    q = np.asarray(idx).ndim
    if side == "in":
        xa = list(d.axes)
    else:
        if any(axis <= a < axis + q for a in d.axes) and q != 1:
            raise CannotFollow(f"gathered axes {d.axes}")
        xa = [a if a < axis + q else a - q + 1 for a in d.axes]
    if axis not in xa:
        ya = [a if a < axis else a + q - 1 for a in xa]
        b.link(b.dim(x, xa), b.dim(y, ya))
        return
    if xa != [axis] or q != 1:
        raise CannotFollow(f"gathered axis {axis} mixed with {d.axes}" if q == 1 else "indices are not 1-D")
    n = b.shape(x)[axis]
    positions = np.asarray(idx, dtype=np.int64) % n
    b.link(b.dim(x, (axis,)), b.dim(y, (axis,)), positions, np.arange(len(positions)))

