"""The target CPU's channel unit of each pruning group: the step its kept channel counts move in.

What a kept count costs is what the target's kernels charge for it. A group's channels live in every
tensor it couples, and where one of its convs runs on onnxruntime's blocked (NCHWc) kernels those tensors
are padded to whole blocks: with 16-channel blocks (AVX-512) 17 kept channels cost what 32 do, and 24
what 32 do, while with 8-channel blocks (AVX2) 24 is three whole blocks. A group none of whose convs is
blocked (GEMMs, convs off the blocked path, every conv of an ARM64 build without NCHWc kernels) is
computed in vectors of the target's float lanes, a partial vector costing a whole one.

So a group's unit is the target's block when one of its producing or consuming convs runs blocked (at
the counts it has now, :meth:`graphopt.measure.latency.Nchwc.nchwc`), else the target's lanes
(:meth:`graphopt.measure.target.Target.unit`). A count between two units buys no time over the next
unit and costs accuracy, so ``prune_filters`` offers the allocator whole units only: 8 everywhere on
AVX2 (what the fixed ``multiple`` of 8 was), 16 on AVX-512, 4 on ARM64 without NCHWc. Why not offer the
counts in between at the next unit's price: ``docs/decisions/targets.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from graphopt.core.ir import Graph, Node

__all__ = ["blocked_conv", "group_units"]


def blocked_conv(node: Node, path: Any) -> bool:
    """Whether ``node`` is a 2-D Conv that ``path`` (a :class:`graphopt.measure.latency.Nchwc`) puts on the
    blocked kernels at its weight's present shape (unknown shapes: not blocked)."""
    if node.op_type != "Conv" or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    shape = node.inputs[1].shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape):
        return False
    group = int(node.attr("group", 1) or 1)
    return bool(path.nchwc(shape[1] * group, shape[0], group, len(shape) - 2))


def group_units(graph: Graph, groups: Iterable[Any], target: Any) -> dict[int, int]:
    """``{group id: unit}`` for ``groups`` (:class:`graphopt.compress.channels.Group`) on ``target``
    (:class:`graphopt.measure.target.Target`): its block where a producer or consumer conv runs blocked,
    else its lanes (module docstring)."""
    nodes = {n.name: n for n in graph.nodes}
    out = {}
    for g in groups:
        names = {p.node for p in g.producers} | {c.node for c in g.consumers}
        blocked = any(blocked_conv(nodes[name], target.path) for name in names if name in nodes)
        out[g.gid] = target.unit(blocked)
    return out
