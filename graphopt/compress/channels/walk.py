"""The coupling walk: from every layer's output channels, follow each dimension through the ops that read or
produce it, applying the op's coupling rule (:mod:`.coupling`), and record which positions are the same channel.

The walk numbers every position of every dimension it meets (:class:`Dim` ``offset``) and collects position
pairs ``(p, q)`` ("position ``p`` here and ``q`` there are the same channel") as edge arrays for the
union-find of :mod:`.groups`; the networkx graph :attr:`CouplingWalk.nx` has an edge per pair of coupled
dimensions. A rule that cannot follow a dimension raises :class:`CannotFollow`; the walk records the reason
on the dimension (naming the op and node), which freezes its group. Graph inputs and outputs, values read
inside subgraphs, custom domains and ops without a rule freeze too.

A weight several nodes read (``dedupe_initializers`` merges equal biases of unrelated layers) does not couple
them: each reader has its own dimensions of it (``Dim.use``).

Which axis of a flat multi-axis dimension shrinks (attention's ``(heads, head_dim)``, a channel shuffle's
``(groups, channels)``): by default the largest (the head dim); with ``heads=True`` the first one in the
tensor's axis order, the outer factor of the split ``H·D -> (H, D)`` (the heads: the exporters' Transposes
keep H before D), so that a channel is a whole head. In that mode a tensor may be reached both as the flat
``(H, D)`` dimension and as its head axis alone (the attention scores ``[B, H, S, S]`` meet ``Q``'s
``[B, H, S, D]`` in a MatMul's batch axes): the two are linked (position ``(h, d)`` is head ``h``) instead of
freezing, since both say the same thing: the head axis shrinks. Two dimensions that disagree (a Transpose
that puts D before H) still merge every head into one channel, a group that cannot be pruned.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np

from graphopt.compress.channels.coupling import RULES
from graphopt.compress.channels.dims import CannotFollow, Dim
from graphopt.compress.channels.shape_eval import SHAPE_OPS, eval_shape_op
from graphopt.core.errors import GraphoptError
from graphopt.core.ir import Model, Node, Value

#: Ops whose output channels are a new dimension (the sources of the walk).
LAYERS = frozenset("Conv ConvTranspose Gemm MatMul".split())


class CouplingWalk:
    """Walks the main graph from every layer's output channels, applying op rules (see the module docstring)."""

    def __init__(self, model: Model, table: Any, heads: bool = False) -> None:
        self.model = model
        self.heads = heads  # flat multi-axis dims shrink along their first axis (whole attention heads)
        self.graph = model.graph
        self.table = table
        self.dims: dict[tuple[str, tuple[int, ...]], Dim] = {}
        self.by_value: dict[tuple[str, str | None], list[Dim]] = {}
        self._site: Node | None = None  # the node whose rule runs (names the reader of a shared weight)
        self.total = 0
        self.edges_a: list[np.ndarray] = []
        self.edges_b: list[np.ndarray] = []
        self.queue: deque[Dim] = deque()
        self.nx = nx.Graph()
        self.roles: dict[tuple, tuple] = {}  # (kind, node, param, dim.key) -> (kind, node, value, dim)
        self.dynamic: dict[str, set[str]] = {}  # Reshape/Slice node -> values whose Shape its bounds read
        self._evaluated: dict[str, np.ndarray] = {}
        self._shapes: dict[Value, tuple[int, ...]] = {}

    # ----- shapes and constants ---------------------------------------------------------------
    def shape(self, value: Value | None) -> tuple[int, ...]:
        if value is None:
            raise CannotFollow("missing input")
        cached = self._shapes.get(value)
        if cached is not None:
            return cached
        dims = self.table.shape(value)
        if dims is None or not all(isinstance(d, int) for d in dims):
            raise CannotFollow(f"shape of {value.name!r} is not known statically ({dims}); onnx shape inference could not "
                        f"follow it (graphopt's fold_constants / the lossless preset usually makes it static)")
        out = self._shapes[value] = tuple(int(d) for d in dims)
        return out

    def rank(self, value: Value) -> int:
        return len(self.shape(value))

    def const(self, value: Value | None) -> np.ndarray | None:
        return self.graph.constant_array(value) if value is not None else None

    def is_param(self, value: Value) -> bool:
        return self.const(value) is not None

    def evaluate(self, value: Value, reads: set[str] | None = None,
                 shapes: Mapping[str, tuple[int, ...]] | None = None) -> np.ndarray:
        """The value of a shape computation (Shape, Gather, Concat, arithmetic... on constants), at batch 1.

        ``reads`` collects the values whose Shape the computation reads; ``shapes`` overrides the shapes
        Shape sees (to evaluate the computation for a pruned model). Raises :class:`CannotFollow` when the value
        is not such a computation.
        """
        const = self.const(value)
        if const is not None:
            return np.asarray(const)
        node = self.graph.producer(value)
        if node is None:
            raise CannotFollow(f"{value.name!r} is not computed from shapes")
        if node.op_type not in SHAPE_OPS or node.domain not in ("", "ai.onnx"):
            raise CannotFollow(f"{value.name!r} is computed by {node.op_type} {node.name!r}")
        if node.op_type == "Shape":
            x = node.inputs[0]
            if reads is not None:
                reads.add(x.name)
            dims = shapes[x.name] if shapes is not None and x.name in shapes else self.shape(x)
            start, end = node.attr("start", 0), node.attr("end", None)
            return np.array(dims, dtype=np.int64)[start:end]
        ins = [self.evaluate(u, reads, shapes) if u is not None else None for u in node.inputs]
        if shapes is None and value.name in self._evaluated:
            return self._evaluated[value.name]
        out = eval_shape_op(node, ins)
        if shapes is None:
            self._evaluated[value.name] = out
        return out

    # ----- dims and edges -----------------------------------------------------------------------
    def _use_of(self, value: Value) -> str | None:
        """The reader a weight's dimension belongs to, when several nodes read the weight.

        A weight shared by several nodes (``dedupe_initializers`` merges equal biases) couples nothing:
        each reader gets its own dimensions, and the shrink gives readers sliced differently their own copy.
        """
        site = self._site
        if site is None or not self.is_param(value) or len(self.graph.consumers(value)) < 2:
            return None
        return site.name if any(u is value for u in site.inputs) else None

    def dim(self, value: Value, axes: Sequence[int]) -> Dim:
        axes = tuple(sorted(int(a) for a in axes))
        use = self._use_of(value)
        key = (value.name, axes, use)
        found = self.dims.get(key)
        if found is not None:
            return found
        shape = self.shape(value)
        if any(a < 0 or a >= len(shape) for a in axes):
            raise CannotFollow(f"axes {axes} out of range for {value.name!r} {shape}")
        sizes = tuple(shape[a] for a in axes)
        prunable = axes[0] if self.heads else axes[max(range(len(axes)), key=lambda i: (sizes[i], i))]
        d = Dim(len(self.dims), value, axes, sizes, self.total, prunable, self.is_param(value), use)
        self.total += d.size
        self.dims[key] = d
        self.nx.add_node(key, dim=d)
        for other in self.by_value.setdefault((value.name, use), []):
            if set(other.axes) & set(axes) and not self._same_heads(d, other):
                reason = f"{value.name!r} is reached with two axis structures {other.axes} and {axes}"
                other.frozen.append(reason)
                d.frozen.append(reason)
        self.by_value[(value.name, use)].append(d)
        if len(axes) > 1:  # only the largest axis shrinks: positions that differ in the others go together
            grid = np.arange(d.size).reshape(sizes)
            index = [slice(None)] * len(axes)
            for i, a in enumerate(axes):
                if a != prunable:
                    index[i] = slice(0, 1)
            base = np.broadcast_to(grid[tuple(index)], sizes).ravel()
            self._pairs(d, d, np.arange(d.size), base)
        self.queue.append(d)
        return d

    def _same_heads(self, a: Dim, b: Dim) -> bool:
        """In ``heads`` mode, link a flat ``(H, D)`` dimension with the same tensor's head axis ``H`` alone
        (position ``(h, d)`` of the flat one is position ``h`` of the other) and say True; False when the
        two are not that pair (the caller freezes them)."""
        if not self.heads or len(a.axes) == len(b.axes):
            return False
        single, flat = (a, b) if len(a.axes) < len(b.axes) else (b, a)
        if single.axes != (flat.prunable_axis,):
            return False
        heads = np.unravel_index(np.arange(flat.size), flat.sizes)[flat.axes.index(flat.prunable_axis)]
        self._pairs(flat, single, np.arange(flat.size), heads)
        return True

    def _pairs(self, a: Dim, b: Dim, pa: np.ndarray, pb: np.ndarray) -> None:
        pa = np.asarray(pa, dtype=np.int64).ravel()
        pb = np.asarray(pb, dtype=np.int64).ravel()
        if pa.shape != pb.shape:
            raise GraphoptError(f"internal: position pairs of {a.label()} and {b.label()} differ in length")
        self.edges_a.append(pa + a.offset)
        self.edges_b.append(pb + b.offset)
        if a is not b:
            self.nx.add_edge(a.key, b.key)

    def link(self, a: Dim, b: Dim, pa: np.ndarray | None = None, pb: np.ndarray | None = None) -> None:
        """Couple positions ``pa`` of ``a`` with ``pb`` of ``b`` (default: identity, equal sizes)."""
        if pa is None:
            if a.size != b.size:
                raise CannotFollow(f"{a.label()} ({a.size}) and {b.label()} ({b.size}) differ in size")
            pa = pb = np.arange(a.size)
        self._pairs(a, b, pa, pb)

    def role(self, kind: str, node: Node, param: Value, d: Dim, value: Value | None = None) -> None:
        if not d.is_param:
            return
        self.roles.setdefault((kind, node.name, param.name, d.key), (kind, node.name, value.name if value else "", d))

    # ----- the walk ----------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.graph.toposort():
            if node.op_type in LAYERS and node.domain in ("", "ai.onnx") and node.outputs and node.outputs[0]:
                y = node.outputs[0]
                try:
                    rank = len(self.shape(y))
                    axis = rank - 1 if node.op_type in ("Gemm", "MatMul") else 1
                    if node.op_type == "MatMul" and not self.is_param(node.inputs[1]):
                        continue  # activation x activation: not a layer with filters of its own
                    self.dim(y, (axis,))
                except CannotFollow:
                    continue
        done: set[tuple] = set()
        while self.queue:
            d = self.queue.popleft()
            self._visit(d, done)

    def _visit(self, d: Dim, done: set) -> None:
        g = self.graph
        v = d.value
        if g.is_graph_output(v):
            d.frozen.append(f"{v.name!r} is a graph output")
        if g.is_graph_input(v):
            d.frozen.append(f"{v.name!r} is a graph input")
        sites: list[tuple[Node, str, int]] = []
        producer = g.producer(v)
        if producer is not None and producer.op_type != "Constant":
            sites.append((producer, "out", producer.outputs.index(v)))
        for node, slot in g.uses(v):
            if d.use is not None and node.name != d.use:
                continue  # another reader of a shared weight: its own dimensions
            if isinstance(slot, tuple):
                d.frozen.append(f"{v.name!r} is read inside a subgraph of {node.op_type} {node.name!r}")
                continue
            sites.append((node, "in", slot))
        for node, side, slot in sites:
            if (node.name, d.key, side, slot) in done:  # Concat(x, x) reads x twice, at two offsets
                continue
            done.add((node.name, d.key, side, slot))
            try:
                if node.domain not in ("", "ai.onnx"):
                    raise CannotFollow("custom domain")
                rule = RULES.get(node.op_type)
                if rule is None:
                    raise CannotFollow("no channel rule for this op")
                self._site = node
                rule(self, node, d, side, slot)
            except CannotFollow as exc:
                d.frozen.append(f"{node.op_type} {node.name!r}: {exc}")
            finally:
                self._site = None

