"""The plan cost model: MACs, params and predicted time of a pruning plan, without building the pruned model.

A plan says how many (or which) channels each group keeps. New shapes follow from the plan (each member's
flat size drops by ``removed × positions per channel``); each node a changed shape reaches is re-costed with
:mod:`graphopt.measure.analysis`'s own MAC rules (or :mod:`graphopt.measure.latency`'s kernel model for time),
so the numbers equal ``analysis.analyze`` of what :func:`.shrink.apply` produces. Parameters change by the
sliced weights and by the shape constants the shrink rewrites (:func:`.shapes.shape_fixes`,
:func:`.shapes.param_delta`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.compress.channels.dims import Dim, shape_key
from graphopt.compress.channels.groups import Group
from graphopt.compress.channels.shapes import param_delta, shape_fixes
from graphopt.core.errors import GraphoptError
from graphopt.core.ir import Model, Node, Value
from graphopt.measure import analysis as measure_analysis

if TYPE_CHECKING:
    from graphopt.compress.channels.walk import CouplingWalk


def _use_signatures(groups: list[Group]) -> dict[tuple, tuple]:
    """(weight, reader) -> how that reader slices the weight; a shared weight's readers slice it alike (one
    copy) iff their dims sit in the same groups with the same maps."""
    memberships: dict[tuple, list[tuple]] = {}
    for g in groups:
        for m in g.members:
            if m.use is not None:
                memberships.setdefault((m.value, m.use), []).append((m.axes, g.gid, m.index_map.tobytes()))
    return {key: tuple(sorted(v)) for key, v in memberships.items()}


class _PlanShapes:
    """What a MAC rule of :mod:`graphopt.measure.analysis` sees of a node (``NodeShapes``'s public face: ``node``,
    ``n_inputs``, ``input``, ``output``, ``attr``), over a dict of concrete shapes: re-costs one node of the
    pruned model without building it."""

    def __init__(self, node: Node, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.node = node
        self.shapes = shapes

    @property
    def n_inputs(self) -> int:
        return sum(1 for v in self.node.inputs if v is not None)

    def input(self, slot: int) -> tuple[int, ...]:
        return self._shape(self.node.inputs[slot] if slot < len(self.node.inputs) else None, f"input {slot}")

    def output(self, slot: int = 0) -> tuple[int, ...]:
        return self._shape(self.node.outputs[slot] if slot < len(self.node.outputs) else None, f"output {slot}")

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.node.attr(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def _shape(self, value: Value | None, what: str) -> tuple[int, ...]:
        if value is None:
            raise measure_analysis.UnknownShape(f"{what} is missing")
        dims = self.shapes.get(shape_key(value.name, self.node.name))  # this reader's copy of a shared weight
        if dims is None:
            dims = self.shapes.get(value.name)
        if dims is None:
            raise measure_analysis.UnknownShape(f"shape of {value.name!r} unknown")
        return dims


def _node_macs(node: Node, shapes: Mapping[str, tuple[int, ...]]) -> int:
    rule = measure_analysis.RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if rule is None:
        return 0
    try:
        return int(rule(_PlanShapes(node, shapes)))
    except measure_analysis.UnknownShape:
        return 0


@dataclass
class _PricedPlan:
    """A plan :meth:`PlanCost.time` priced in full: its counts, dim sizes, shapes and total, and the node
    times at its shapes (filled as neighbours need them)."""
    counts: dict[int, int]
    sizes: dict[tuple, int]
    shapes: dict[str, tuple[int, ...]]
    total: float
    node_times: dict[str, float] = field(default_factory=dict)


class PlanCost:
    """Analytic MACs/params of the pruned model: re-cost only the nodes whose shapes change.

    A changed weight is replaced by one new tensor of its new shape (params: new size − old size). A
    weight several nodes share gets one new copy per distinct way its readers are sliced
    (:meth:`use_signature`), and the old one goes when no reader is left. A changed shape constant
    (Reshape target, Split sizes, Slice bounds) keeps its size unless several nodes read it (then each
    changed reader gets its own copy); a Split without sizes gets a sizes input.
    """

    def __init__(self, model: Model, table: Any, walk: CouplingWalk, groups: list[Group],
                 input_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        self.graph = model.graph
        self.groups = groups
        self.walk = walk
        self._table = table
        base = measure_analysis.analyze(model, input_shapes=dict(input_shapes or {}) or None)
        self.base_macs = base.macs_known
        self.base_params = base.params
        self.dims = {d.key: d for d in walk.dims.values()}
        #: base shapes, keyed by value name (and "value@reader" for a shared weight's readers)
        self.shapes: dict[str, tuple[int, ...]] = {}
        #: shape key -> the nodes to re-cost when that shape changes
        self.nodes_of_key: dict[str, list[Node]] = {}
        self.key_info: dict[str, tuple[Value, str | None]] = {}  # shape key -> (value, reader or None)
        self.param_keys = {d.shape_key for d in walk.dims.values() if d.is_param}
        for d in walk.dims.values():
            self._add_dim(d)
        #: group -> [(dim key, positions per channel)]
        self.group_dims: list[list[tuple[tuple, int]]] = [
            [((m.value, m.axes, m.use), int(m.index_map.shape[1])) for m in g.members] for g in groups]
        self.use_signature = _use_signatures(groups)
        self.base_node_macs: dict[str, int] = {}
        self._base_times: dict[tuple[int, int, bool], tuple[Any, float, dict[str, float]]] = {}
        self._last_plans: dict[tuple[int, int, bool], _PricedPlan] = {}  # see time()
        self._shape_dims: dict[str, list[tuple]] | None = None
        #: nodes whose shape inputs read the shape of a member (dynamic Reshape/Slice): re-check on change
        self.dynamic_readers: dict[str, list[Node]] = {}
        self._add_dynamic_readers()

    def _note(self, u: Value) -> None:
        """Record the concrete shape of ``u`` (a value a re-costed node reads or writes), once."""
        if u.name not in self.shapes:
            dims = self._table.shape(u)
            if dims is not None and all(isinstance(t, int) for t in dims):
                self.shapes[u.name] = tuple(int(t) for t in dims)

    def _note_node(self, node: Node) -> None:
        for u in (*node.inputs, *node.outputs):
            if u is not None:
                self._note(u)

    def _nodes_of(self, d: Dim) -> list[Node]:
        """The nodes whose cost changes with ``d``: its one reader (shared weight), or its readers and producer."""
        graph, v = self.graph, d.value
        if d.use is not None:
            return [n for n in graph.consumers(v) if n.name == d.use]
        nodes = [n for n, slot in graph.uses(v) if not isinstance(slot, tuple)]
        p = graph.producer(v)
        if p is not None:
            nodes.append(p)
        return nodes

    def _add_dim(self, d: Dim) -> None:
        self.key_info[d.shape_key] = (d.value, d.use)
        self.shapes[d.shape_key] = tuple(int(t) for t in self._table.shape(d.value))
        nodes = self._nodes_of(d)
        self.nodes_of_key[d.shape_key] = nodes
        for n in nodes:
            self._note_node(n)

    def _add_dynamic_readers(self) -> None:
        walk = self.walk
        by_name = {n.name: n for n in self.graph.toposort()} if walk.dynamic else {}
        for node_name, reads in walk.dynamic.items():
            node = by_name[node_name]
            for v in reads:
                self.dynamic_readers.setdefault(v, []).append(node)
            self._note_node(node)

    def dim_sizes(self, keep: Mapping[int, Any]) -> dict[tuple, int]:
        """New flat size of every dimension the plan changes (``keep[gid]``: a count or the kept indices)."""
        sizes: dict[tuple, int] = {}
        for gid, kept in keep.items():
            g = self.groups[int(gid)]
            kept = int(kept) if np.isscalar(kept) else len(kept)  # a count, or the kept indices
            removed = g.size - kept
            if removed <= 0:
                continue
            if kept < g.min_keep:
                raise GraphoptError(f"group {gid} must keep at least {g.min_keep} channel(s)")
            for key, k in self.group_dims[int(gid)]:
                sizes[key] = sizes.get(key, self.dims[key].size) - removed * k
        return sizes

    def new_shapes(self, sizes: Mapping[tuple, int]) -> dict[str, tuple[int, ...]]:
        """New shapes by shape key (value, or ``value@reader`` for a shared weight)."""
        out: dict[str, list[int]] = {}
        for key, flat in sizes.items():
            d = self.dims[key]
            shape = out.get(d.shape_key)
            if shape is None:
                shape = out[d.shape_key] = list(self.shapes[d.shape_key])
            shape[d.prunable_axis] = flat // d.stride
        return {name: tuple(s) for name, s in out.items()}

    def cost(self, keep: Mapping[int, Any]) -> tuple[int, int]:
        """(MACs, params) of the plan: base + the re-costed nodes' differences + the weight and constant deltas."""
        changed = self.new_shapes(self.dim_sizes(keep))
        if not changed:
            return self.base_macs, self.base_params
        shapes = dict(self.shapes)
        shapes.update(changed)
        nodes = self.changed_nodes(changed)
        macs = self.base_macs
        for n in nodes:
            old = self.base_node_macs.get(n.name)
            if old is None:
                old = self.base_node_macs[n.name] = _node_macs(n, self.shapes)
            macs += _node_macs(n, shapes) - old
        params = self.base_params + self.weight_delta(changed)
        params += self._shape_constant_delta(nodes, shapes)
        return macs, params

    def changed_nodes(self, changed: Mapping[str, Any] | set[str]) -> list[Node]:
        """The nodes to re-cost (or whose shape inputs to fix) when the shapes keyed ``changed`` change, in
        graph order."""
        nodes: dict[str, Node] = {}
        for key in changed:
            for n in (*self.nodes_of_key.get(key, []), *self.dynamic_readers.get(key, [])):
                nodes[n.name] = n
        return sorted(nodes.values(), key=lambda n: n.seq)

    def time(self, keep: Mapping[int, Any], latency: Any, batch: int, steps: bool = False) -> float:
        """Predicted seconds of the touched nodes under the plan (see ``ChannelAnalysis.time``).

        Priced as a difference: from the unpruned model (the nodes of every group the plan changes), or,
        when fewer groups differ from the last plan priced that way (``budget.near_candidates`` prices thousands of
        neighbours of one allocation, each one or two groups away from it), from that plan, re-timing only
        the nodes of the groups that differ. Both sum the same node times."""
        key = (id(latency), batch, steps)
        cached = self._base_times.get(key)
        if cached is None or cached[0] is not latency:  # the model object is kept, so its id is not reused
            touched = {n.name: n for nodes in self.nodes_of_key.values() for n in nodes}
            per = {name: self._node_time(n, self.shapes, latency, batch, steps) for name, n in touched.items()}
            cached = self._base_times[key] = (latency, sum(per.values()), per)
            self._last_plans.pop(key, None)
        _, base, per = cached
        counts = self._counts(keep)
        last = self._last_plans.get(key)
        if last is not None:
            differ = [g for g in set(counts) | set(last.counts)
                      if counts.get(g, self.groups[g].size) != last.counts.get(g, self.groups[g].size)]
            if len(differ) < len(counts):
                return self._time_from(last, counts, differ, latency, batch, steps)
        sizes = self.dim_sizes(counts)
        changed = self.new_shapes(sizes)
        if not changed:
            return base
        shapes = {**self.shapes, **changed}
        total = base
        for n in self.changed_nodes(changed):
            old = per.get(n.name)
            if old is None:
                old = per[n.name] = self._node_time(n, self.shapes, latency, batch, steps)
            total += self._node_time(n, shapes, latency, batch, steps) - old
        self._last_plans[key] = _PricedPlan(counts, sizes, shapes, total)
        return total

    def _counts(self, keep: Mapping[int, Any]) -> dict[int, int]:
        """``{group: channels kept}`` of a plan given as counts or kept indices; a group under its
        ``min_keep`` is refused."""
        counts = {}
        for gid, kept in keep.items():
            g = self.groups[int(gid)]
            n = int(kept) if np.isscalar(kept) else len(kept)
            if n < g.min_keep and n < g.size:
                raise GraphoptError(f"group {gid} must keep at least {g.min_keep} channel(s)")
            counts[int(gid)] = n
        return counts

    def _time_from(self, last: _PricedPlan, counts: dict[int, int], differ: list[int], latency: Any,
                   batch: int, steps: bool) -> float:
        """The plan ``counts`` priced from ``last``: each dim of a group in ``differ`` moves by
        ``Δkept × positions per channel`` (sizes are linear in the removed counts), and only the nodes those
        dims reach are re-timed, at ``last``'s shapes and at the new ones."""
        sizes = dict(last.sizes)
        moved: set[str] = set()
        for gid in differ:
            g = self.groups[gid]
            step = counts.get(gid, g.size) - last.counts.get(gid, g.size)
            for dim_key, k in self.group_dims[gid]:
                sizes[dim_key] = sizes.get(dim_key, self.dims[dim_key].size) + step * k
                moved.add(self.dims[dim_key].shape_key)
        shapes = dict(last.shapes)
        for sk in moved:
            shape = list(self.shapes[sk])
            for dim_key in self._dims_of_shape()[sk]:
                if dim_key in sizes:
                    d = self.dims[dim_key]
                    shape[d.prunable_axis] = sizes[dim_key] // d.stride
            shapes[sk] = tuple(shape)
        total = last.total
        for n in self.changed_nodes(moved):
            before = last.node_times.get(n.name)
            if before is None:
                before = last.node_times[n.name] = self._node_time(n, last.shapes, latency, batch, steps)
            total += self._node_time(n, shapes, latency, batch, steps) - before
        return total

    def _dims_of_shape(self) -> dict[str, list[tuple]]:
        """shape key -> the dim keys of that tensor (a weight pruned on two axes has two)."""
        if self._shape_dims is None:
            self._shape_dims = {}
            for dim_key, d in self.dims.items():
                self._shape_dims.setdefault(d.shape_key, []).append(dim_key)
        return self._shape_dims

    def _node_time(self, node: Node, shapes: Mapping[str, tuple[int, ...]], latency: Any, batch: int,
                   steps: bool = False) -> float:
        from graphopt.measure.latency import node_work

        def lookup(table: Mapping[str, tuple[int, ...]]):
            def dims(v: Value) -> tuple[int, ...] | None:
                return table.get(shape_key(v.name, node.name)) or table.get(v.name)
            return dims

        work = node_work(node, lookup(shapes), path=latency.path, padded=steps, like=lookup(self.shapes),
                         passes=steps)
        return 0.0 if work is None else float(latency.time(work.scaled(batch)))

    def weight_delta(self, changed: Mapping[str, tuple[int, ...]]) -> int:
        """Params added by slicing weights (negative): see the class docstring for shared weights."""
        delta = 0
        shared: dict[str, tuple[Value, dict[tuple, tuple[int, ...]], int]] = {}
        for key, shape in changed.items():
            value, use = self.key_info[key]
            if use is None:
                if key in self.param_keys:
                    delta += math.prod(shape) - math.prod(self.shapes[key])
                continue
            _, copies, n = shared.setdefault(value.name, (value, {}, 0))
            copies[self.use_signature[(value.name, use)]] = shape
            shared[value.name] = (value, copies, n + 1)
        for value, copies, changed_readers in shared.values():
            delta += sum(math.prod(shape) for shape in copies.values())
            if changed_readers == len(self.graph.consumers(value)):  # the old tensor loses its last reader
                delta -= int(np.asarray(self.graph.constant_array(value)).size)
        return delta

    def _shape_constant_delta(self, nodes: Any, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """Params added by rewriting Reshape targets / Split sizes / Slice bounds (see the class docstring)."""
        changed = {name for name, shape in shapes.items() if shape != self.shapes.get(name, shape)}
        plan = []
        for n in nodes:
            plan.extend((n, f) for f in shape_fixes(self.walk, n, self.shapes, shapes, changed))
        return param_delta(self.graph, plan)
