"""Channel dependency analysis: which tensor dimensions must lose the same channels, as pruning groups.

Removing output channels of a convolution changes every tensor those channels flow into: the BN after it, the
residual ``Add`` it joins (and therefore the other branch of that ``Add``), the ``Concat`` it is part of, the
``Flatten`` block it becomes in front of a ``Gemm``, and the input channels of every layer that reads it.
:func:`analyze` finds those couplings: the walk (:mod:`.walk`, with the per-op rules of :mod:`.coupling`)
couples positions of ``(tensor, axes)`` dimensions, :mod:`.groups` turns them into groups and says which are
frozen and why, and :mod:`.plan` costs a plan (kept channels per group) without building the pruned model;
:mod:`.shrink` builds it.

Examples
--------
>>> import numpy as np, onnx.parser
>>> from graphopt.core.onnx_io import from_proto
>>> proto = onnx.parser.parse_model('''
...     <ir_version: 8, opset_import: ["" : 17]>
...     g (float[N, 2, 4, 4] x) => (float[N, 3] y)
...     <float[6, 2, 1, 1] w1 = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, float[6] b1 = {0, 0, 0, 0, 0, 0},
...      float[3, 6] w2 = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18}> {
...         c = Conv (x, w1, b1)
...         r = Relu (c)
...         p = GlobalAveragePool (r)
...         f = Flatten (p)
...         y = Gemm <transB: int = 1> (f, w2)
...     }''')
>>> result = analyze(from_proto(proto))
>>> [(g.size, g.prunable) for g in result.groups]
[(6, True), (3, False)]
>>> result.groups[1].frozen
"'y' is a graph output"
>>> sorted((p.param, p.axis) for p in result.groups[0].producers)
[('b1', 0), ('w1', 0)]
>>> [(c.node, c.param, c.axis) for c in result.groups[0].consumers][0][1:]
('w2', 1)
>>> result.cost({0: 3}) < result.base_cost()
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphopt.compress.channels.groups import Group, build_groups, components
from graphopt.compress.channels.plan import PlanCost
from graphopt.compress.channels.walk import CouplingWalk
from graphopt.core.ir import Model
from graphopt.measure import analysis as measure_analysis


class ChannelAnalysis:
    """Pruning groups of a model (see the module docstring). Build it with :func:`analyze`.

    Attributes
    ----------
    groups : every group, in a deterministic order (``gid`` = index).
    graph : the coupling graph (networkx): nodes ``(value, axes, reader)`` (``reader`` is ``None`` except
        for one reader's view of a shared weight) with attribute ``dim``; an edge for each pair of coupled
        dimensions.
    walk : the :class:`CouplingWalk` that found them (its dimensions, and shape computations it can evaluate).
    plan_cost : the :class:`PlanCost` of plans on this model (shapes, the nodes each shape reaches).
    """

    def __init__(self, model: Model, walk: CouplingWalk, groups: list[Group], plan_cost: PlanCost) -> None:
        self.model = model
        self.groups = groups
        self.graph = walk.nx
        self.walk = walk
        self.plan_cost = plan_cost

    def group(self, gid: int) -> Group:
        return self.groups[gid]

    def prunable(self) -> list[Group]:
        """Groups that may lose channels: not frozen and at least two channels."""
        return [g for g in self.groups if g.prunable]

    def frozen(self) -> list[Group]:
        return [g for g in self.groups if g.frozen is not None]

    def cost(self, keep: Mapping[int, int]) -> tuple[int, int]:
        """(MACs, params) of the whole main graph at batch 1 if group ``gid`` kept ``keep[gid]`` channels.

        Counted as :func:`graphopt.measure.analysis.analyze` counts them (unknown MACs count as 0, like
        ``macs_known``); groups absent from ``keep`` are unchanged.
        """
        return self.plan_cost.cost(keep)

    def base_cost(self) -> tuple[int, int]:
        return self.plan_cost.base_macs, self.plan_cost.base_params

    def time(self, keep: Mapping[int, int], latency: Any, batch: int = 1, steps: bool = False) -> float:
        """Predicted seconds (:mod:`graphopt.measure.latency`) of the nodes the groups touch, at ``batch``, if
        group ``gid`` kept ``keep[gid]`` channels. Only differences are meaningful: nodes no group touches
        are left out. Each node keeps its unpruned kernel family and channels are not padded to blocks
        (``padded=False``), so the time is a polynomial in the kept fractions; a node whose shapes are
        unknown counts 0. ``steps``: the target's steps instead — channels padded to whole blocks and
        blocked dense convs charged by whole filter sets (:meth:`graphopt.measure.latency.Nchwc.pass_factor`):
        not a polynomial, for comparing a few plans."""
        return self.plan_cost.time(keep, latency, batch, steps)

    def dim_sizes(self, keep: Mapping[int, Sequence[int] | np.ndarray | int]) -> dict[tuple, int]:
        """New flat size of every dimension ``(value, axes, reader)`` the plan changes."""
        return self.plan_cost.dim_sizes(keep)

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups],
                "prunable": len(self.prunable()), "frozen": len(self.frozen())}


def analyze(model: Model, input_shapes: Mapping[str, Sequence[int]] | None = None,
            heads: bool = False) -> ChannelAnalysis:
    """Channel groups of ``model``'s main graph (the model is not modified).

    Parameters
    ----------
    input_shapes : concrete shapes for graph inputs; dynamic first dims default to 1 (batch), like
        :func:`graphopt.measure.analysis.analyze`.
    heads : attention's flat ``(heads, head_dim)`` dimensions (and a channel shuffle's ``(groups,
        channels)``) shrink along their first axis: a channel is a whole head (its ``D`` rows of Q, K and V
        and columns of the output projection), instead of one head-dim position shared by every head
        (see :mod:`.walk`).

    Returns
    -------
    ChannelAnalysis
    """
    table, _ = _shape_table(model, input_shapes)
    walk = CouplingWalk(model, table, heads=heads)
    walk.run()
    ea = np.concatenate(walk.edges_a) if walk.edges_a else np.zeros(0, np.int64)
    eb = np.concatenate(walk.edges_b) if walk.edges_b else np.zeros(0, np.int64)
    labels = components(walk.total, ea, eb)
    dims = sorted(walk.dims.values(), key=lambda d: d.index)
    groups = build_groups(walk, dims, labels)
    plan_cost = PlanCost(model, table, walk, groups, input_shapes)
    return ChannelAnalysis(model, walk, groups, plan_cost)


def _shape_table(model: Model, input_shapes: Mapping[str, Sequence[int]] | None) -> tuple[Any, list[str]]:
    warnings: list[str] = []
    return measure_analysis.shape_table(model, input_shapes, 1, warnings), warnings
