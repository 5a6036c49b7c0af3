"""Channel dependency analysis: which tensor dimensions must lose the same channels.

Removing output channels of a convolution changes every tensor those channels flow into: the BN
after it, the residual ``Add`` it joins (and therefore the other branch of that ``Add``), the
``Concat`` it is part of, the ``Flatten`` block it becomes in front of a ``Gemm``, and the input
channels of every layer that reads it. This module finds those couplings.

The coupling graph
------------------
A *dimension* is ``(value, axes)``: one tensor (activation or weight) and one axis of it, or a few
axes read as one flat index in row-major order (channel shuffle and head splits turn one axis into two).
Its *positions* are ``0 .. size-1``. The coupling graph (``ChannelAnalysis.graph``, a networkx graph)
has the dimensions as nodes; an edge carries position pairs ``(p, q)`` meaning "position ``p`` here and
``q`` there are the same channel: they are removed together". Op rules create the edges:

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

Reshape targets and Slice bounds may be computed at runtime from ``Shape`` (torch exports
``x.view(x.size(0), ...)`` that way): the analysis evaluates that computation (:meth:`_Builder.evaluate`)
and follows the Reshape by its inferred shapes.

A dimension spread over several axes may shrink along one axis only (the largest, the others keep
their size: the ``g`` of a shuffle, the number of heads), so its positions that differ only in the
other axes are coupled too.

Groups
------
Connected positions form one *channel* (an equivalence class). Channels that touch exactly the same
dimensions, the same number of times, form a *group*: they are interchangeable, and a pruning plan
says how many (which) of a group's channels to keep. A ``Concat`` output therefore belongs to the
group of each branch (with the branch's offset), and each branch stays its own group.

A weight several nodes read (``dedupe_initializers`` merges equal biases of unrelated layers) does not
couple them: each reader has its own dimensions of it (``Member.use``).

Refusals (a frozen group is never pruned; ``Group.frozen`` says why, naming the op and node):

* an op without a rule above, an op reading the dimension in a way the rule cannot follow (a pooled
  or reduced axis, a Reshape whose target is computed at runtime, a Slice with a step...);
* graph inputs and outputs (the model's interface keeps its shape), values read inside subgraphs;
* a tensor reached with two different axis structures;
* groups of one channel are not prunable, and at least ``min_keep`` (1) channel is always kept: a
  group never removes every channel of anything.

Costs
-----
:meth:`ChannelAnalysis.cost` gives the MACs and parameters of the pruned model without building it:
new shapes follow from the plan, and each affected node is re-costed with :mod:`graphopt.measure.analysis`'s
own rules, so the numbers equal ``analysis.analyze`` of what :func:`graphopt.compress.shrink.apply` produces.
Parameters change by the sliced weights and by the shape constants the shrink rewrites
(:func:`shape_fixes`, :func:`param_delta`).

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

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np

from graphopt.core.errors import GraphoptError
from graphopt.core.ir import Graph, Model, Node, Value
from graphopt.measure import analysis as _analysis

# ====================================================================================================
# public data


@dataclass
class Member:
    """One dimension of a group.

    ``index_map[i]`` are the positions (flat over ``axes``, row-major) of group channel ``i`` in this
    dimension; shape ``[group.size, k]``. ``axis`` is the axis that shrinks. ``axes`` has one entry except
    for flat multi-axis dimensions (a channel shuffle's ``(groups, channels)``, attention's ``(heads,
    head_dim)``): there the positions are flat indices over ``axes``, not indices along ``axis``, so
    per-axis statistics must unravel them (``np.unravel_index(pos, sizes)``) or skip such members.
    ``use`` names the reading node when the member is one reader's view of a weight several nodes share.
    """

    value: str
    axis: int
    index_map: np.ndarray
    axes: tuple[int, ...] = ()
    is_param: bool = False
    use: str | None = None  # for a weight several nodes read: the node this dimension belongs to


@dataclass
class Producer:
    """A weight whose output channels are the group: slice it along ``axis`` (Conv W axis 0, biases, BN...)."""

    node: str
    param: str
    axis: int
    index_map: np.ndarray


@dataclass
class Consumer:
    """A layer whose input channels are the group: ``param`` (its weight) is sliced along ``axis``.

    ``value`` is the layer's input tensor (it keeps its name in the pruned model, with fewer channels).
    Conv W axis 1, Gemm W feature axis (a flattened channel maps to its block of features), MatMul W axis -2,
    ConvTranspose W axis 0.
    """

    node: str
    value: str
    param: str
    axis: int
    index_map: np.ndarray


@dataclass
class Group:
    """Channels that are removed together; see the module docstring."""

    gid: int
    size: int
    frozen: str | None
    members: list[Member]
    producers: list[Producer]
    consumers: list[Consumer]
    divisor: int = 1
    min_keep: int = 1
    frozen_all: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return self.frozen is None and self.size >= 2

    def member(self, value: str) -> Member | None:
        return next((m for m in self.members if m.value == value), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (index maps left out: the sizes say how many positions a channel has)."""
        return {
            "gid": self.gid, "size": self.size, "frozen": self.frozen, "prunable": self.prunable,
            "divisor": self.divisor, "min_keep": self.min_keep,
            "members": [{"value": m.value, "axis": m.axis, "axes": list(m.axes),
                         "per_channel": int(m.index_map.shape[1]),
                         "param": m.is_param} for m in self.members],
            "producers": [{"node": p.node, "param": p.param, "axis": p.axis} for p in self.producers],
            "consumers": [{"node": c.node, "value": c.value, "param": c.param, "axis": c.axis}
                          for c in self.consumers],
            "frozen_all": list(self.frozen_all),
        }


# ====================================================================================================
# dimensions and the builder


@dataclass(eq=False)
class _Dim:
    index: int
    value: Value
    axes: tuple[int, ...]
    sizes: tuple[int, ...]
    offset: int
    prunable_axis: int
    is_param: bool
    use: str | None = None  # the reading node, for a weight several nodes share (each reader has its own dims)
    frozen: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return math.prod(self.sizes)

    @property
    def key(self) -> tuple[str, tuple[int, ...], str | None]:
        return (self.value.name, self.axes, self.use)

    def __post_init__(self) -> None:
        #: where the cost model keeps this tensor's shape: per value, or per reader for a shared weight
        self.shape_key = shape_key(self.value.name, self.use)
        #: positions per index of the shrinking axis
        self.stride = self.size // self.sizes[self.axes.index(self.prunable_axis)]

    def label(self) -> str:
        at = f"@{self.use}" if self.use else ""
        return f"{self.value.name}{at}[{','.join(map(str, self.axes))}]"


def shape_key(value: str, use: str | None) -> str:
    return value if use is None else f"{value}@{use}"


class _Stop(Exception):
    """A rule cannot follow a dimension through a node; the message says why."""


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
LAYERS = frozenset("Conv ConvTranspose Gemm MatMul".split())


class _Builder:
    """Walks the main graph from every layer's output channels, applying op rules (see the module docstring)."""

    def __init__(self, model: Model, table: Any) -> None:
        self.model = model
        self.graph = model.graph
        self.table = table
        self.dims: dict[tuple[str, tuple[int, ...]], _Dim] = {}
        self.by_value: dict[tuple[str, str | None], list[_Dim]] = {}
        self._site: Node | None = None  # the node whose rule runs (names the reader of a shared weight)
        self.total = 0
        self.edges_a: list[np.ndarray] = []
        self.edges_b: list[np.ndarray] = []
        self.queue: deque[_Dim] = deque()
        self.nx = nx.Graph()
        self.roles: dict[tuple, tuple] = {}  # (kind, node, param, dim.key) -> (kind, node, value, dim)
        self.dynamic: dict[str, set[str]] = {}  # Reshape/Slice node -> values whose Shape its bounds read
        self._evaluated: dict[str, np.ndarray] = {}
        self._shapes: dict[Value, tuple[int, ...]] = {}

    # ----- shapes and constants ---------------------------------------------------------------
    def shape(self, value: Value | None) -> tuple[int, ...]:
        if value is None:
            raise _Stop("missing input")
        cached = self._shapes.get(value)
        if cached is not None:
            return cached
        dims = self.table.dims(self.graph, value)
        if dims is None or not all(isinstance(d, int) for d in dims):
            raise _Stop(f"shape of {value.name!r} is not known statically ({dims}); onnx shape inference could not "
                        f"follow it (graphopt's fold_constants / the lossless preset usually makes it static)")
        out = self._shapes[value] = tuple(int(d) for d in dims)
        return out

    def const(self, value: Value | None) -> np.ndarray | None:
        return self.graph.constant_array(value) if value is not None else None

    def is_param(self, value: Value) -> bool:
        return self.const(value) is not None

    def evaluate(self, value: Value, reads: set[str] | None = None,
                 shapes: Mapping[str, tuple[int, ...]] | None = None) -> np.ndarray:
        """The value of a shape computation (Shape, Gather, Concat, arithmetic... on constants), at batch 1.

        ``reads`` collects the values whose Shape the computation reads; ``shapes`` overrides the shapes
        Shape sees (to evaluate the computation for a pruned model). Raises :class:`_Stop` when the value is
        not such a computation.
        """
        const = self.const(value)
        if const is not None:
            return np.asarray(const)
        node = self.graph.producer(value)
        if node is None:
            raise _Stop(f"{value.name!r} is not computed from shapes")
        if node.op_type not in _SHAPE_OPS or node.domain not in ("", "ai.onnx"):
            raise _Stop(f"{value.name!r} is computed by {node.op_type} {node.name!r}")
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
        out = _eval_shape_op(node, ins)
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

    def dim(self, value: Value, axes: Sequence[int]) -> _Dim:
        axes = tuple(sorted(int(a) for a in axes))
        use = self._use_of(value)
        key = (value.name, axes, use)
        found = self.dims.get(key)
        if found is not None:
            return found
        shape = self.shape(value)
        if any(a < 0 or a >= len(shape) for a in axes):
            raise _Stop(f"axes {axes} out of range for {value.name!r} {shape}")
        sizes = tuple(shape[a] for a in axes)
        prunable = axes[max(range(len(axes)), key=lambda i: (sizes[i], i))]
        d = _Dim(len(self.dims), value, axes, sizes, self.total, prunable, self.is_param(value), use)
        self.total += d.size
        self.dims[key] = d
        self.nx.add_node(key, dim=d)
        for other in self.by_value.setdefault((value.name, use), []):
            if set(other.axes) & set(axes):
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

    def _pairs(self, a: _Dim, b: _Dim, pa: np.ndarray, pb: np.ndarray) -> None:
        pa = np.asarray(pa, dtype=np.int64).ravel()
        pb = np.asarray(pb, dtype=np.int64).ravel()
        if pa.shape != pb.shape:
            raise GraphoptError(f"internal: position pairs of {a.label()} and {b.label()} differ in length")
        self.edges_a.append(pa + a.offset)
        self.edges_b.append(pb + b.offset)
        if a is not b:
            self.nx.add_edge(a.key, b.key)

    def link(self, a: _Dim, b: _Dim, pa: np.ndarray | None = None, pb: np.ndarray | None = None) -> None:
        """Couple positions ``pa`` of ``a`` with ``pb`` of ``b`` (default: identity, equal sizes)."""
        if pa is None:
            if a.size != b.size:
                raise _Stop(f"{a.label()} ({a.size}) and {b.label()} ({b.size}) differ in size")
            pa = pb = np.arange(a.size)
        self._pairs(a, b, pa, pb)

    def role(self, kind: str, node: Node, param: Value, d: _Dim, value: Value | None = None) -> None:
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
                except _Stop:
                    continue
        done: set[tuple] = set()
        while self.queue:
            d = self.queue.popleft()
            self._visit(d, done)

    def _visit(self, d: _Dim, done: set) -> None:
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
                    raise _Stop("custom domain")
                rule = _RULES.get(node.op_type)
                if rule is None:
                    raise _Stop("no channel rule for this op")
                self._site = node
                rule(self, node, d, side, slot)
            except _Stop as exc:
                d.frozen.append(f"{node.op_type} {node.name!r}: {exc}")
            finally:
                self._site = None


# ====================================================================================================
# op rules: rule(builder, node, dim, side ("in"/"out"), slot)


_SHAPE_OPS = frozenset("Shape Gather Unsqueeze Squeeze Concat Cast Div Mul Add Sub Floor Ceil Identity Slice "
                       "ReduceProd Constant Reshape".split())


def _eval_shape_op(node: Node, ins: list[np.ndarray | None]) -> np.ndarray:
    op = node.op_type
    x = ins[0]
    if op == "Gather":
        return np.take(x, ins[1].astype(np.int64), axis=int(node.attr("axis", 0)))
    if op in ("Unsqueeze", "Squeeze"):
        axes = ins[1] if len(ins) > 1 and ins[1] is not None else node.attr("axes")
        if op == "Squeeze":
            return np.squeeze(x, axis=tuple(int(a) for a in axes)) if axes is not None else np.squeeze(x)
        out = x
        for a in sorted(int(t) % (x.ndim + len(axes)) for t in axes):
            out = np.expand_dims(out, a)
        return out
    if op == "Concat":
        return np.concatenate([np.atleast_1d(t) for t in ins if t is not None], axis=int(node.attr("axis", 0)))
    if op == "Cast":
        from onnx import helper
        return x.astype(helper.tensor_dtype_to_np_dtype(int(node.attr("to"))))
    if op in ("Div", "Mul", "Add", "Sub"):
        a, c = ins[0], ins[1]
        if op == "Div":
            if np.issubdtype(a.dtype, np.integer):
                return (np.trunc(a / c)).astype(a.dtype)
            return a / c
        return {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract}[op](a, c)
    if op == "Floor":
        return np.floor(x)
    if op == "Ceil":
        return np.ceil(x)
    if op == "Identity":
        return x
    if op == "Reshape":
        return x.reshape([int(t) if t != 0 else x.shape[i] for i, t in enumerate(ins[1])])
    if op == "ReduceProd":
        return np.array([np.prod(x)], dtype=x.dtype) if node.attr("keepdims", 1) else np.prod(x)
    if op == "Slice" and len(ins) >= 3:
        starts, ends = ins[1], ins[2]
        axes = ins[3] if len(ins) > 3 and ins[3] is not None else range(len(starts))
        steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
        index = [slice(None)] * x.ndim
        for a, st, en, sp in zip(axes, starts, ends, steps):
            index[int(a)] = slice(int(st), int(en), int(sp))
        return x[tuple(index)]
    raise _Stop(f"cannot evaluate {op} {node.name!r}")


def _shape_reader(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    """Shape: allowed when its value only ever feeds Reshape targets and Slice bounds.

    Those get constants for the pruned shapes (:func:`graphopt.compress.shrink.apply`), so what the old
    computation would have said no longer matters.
    """
    stack = [o for o in node.outputs if o is not None]
    seen: set[str] = set()
    while stack:
        v = stack.pop()
        if v.name in seen:
            continue
        seen.add(v.name)
        if b.graph.is_graph_output(v):
            raise _Stop(f"its value reaches the graph output {v.name!r}")
        for user, uslot in b.graph.uses(v):
            if isinstance(uslot, tuple):
                raise _Stop(f"its value is read inside {user.op_type} {user.name!r}")
            if (user.op_type == "Reshape" and uslot == 1) or (user.op_type == "Slice" and uslot >= 1) \
                    or user.op_type == "Shape":  # the length of a shape vector does not depend on its values
                continue
            if (user.op_type in _SHAPE_OPS and user.op_type != "Shape") or (user.op_type == "Reshape" and uslot == 0
                                                                             and _rank(b, v) <= 1):
                stack.extend(o for o in user.outputs if o is not None)
                continue
            raise _Stop(f"its value flows into {user.op_type} {user.name!r}")


def _only_axes(d: _Dim, allowed: Sequence[int], what: str) -> None:
    if not set(d.axes) <= set(allowed):
        raise _Stop(f"{what} along axes {d.axes}")


def _rank(b: _Builder, v: Value) -> int:
    return len(b.shape(v))


def _unary(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    if side == "in" and slot != 0:
        return  # Clip bounds, CastLike target: no channels flow through them
    x = node.inputs[0]
    outs = [o for o in node.outputs if o is not None]
    if node.op_type == "Dropout":
        outs = outs[:2]
    for o in outs:
        b.link(b.dim(x, d.axes), b.dim(o, d.axes))


def _elementwise(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    y = node.outputs[0]
    ry = _rank(b, y)
    if side == "in":
        out_axes = tuple(a + ry - _rank(b, node.inputs[slot]) for a in d.axes)
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
            raise _Stop(f"input {s} broadcasts part of the channel axes {out_axes}")
        ud = b.dim(u, present)
        b.link(yd, ud)
        if ud.is_param:
            b.role("producer", node, u, ud)


def _norm(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    x, y = node.inputs[0], node.outputs[0]
    if len([o for o in node.outputs if o is not None]) > 1:
        raise _Stop("training-mode outputs")
    if side == "in" and slot > 0:
        axes = (1,)
        if d.axes != (0,):
            raise _Stop(f"parameter axes {d.axes}")
    else:
        axes = d.axes
    if 1 not in axes:
        if node.op_type == "InstanceNormalization":
            raise _Stop(f"normalised axes {axes}")
        b.link(b.dim(x, axes), b.dim(y, axes))
        return
    if axes != (1,):
        raise _Stop(f"channel axis mixed with {axes}")
    xd, yd = b.dim(x, (1,)), b.dim(y, (1,))
    b.link(xd, yd)
    for p in node.inputs[1:]:
        if p is None:
            continue
        if len(b.shape(p)) != 1:
            raise _Stop(f"parameter {p.name!r} is not 1-D")
        pd = b.dim(p, (0,))
        b.link(yd, pd)
        b.role("producer", node, p, pd)


def _pool(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    if len([o for o in node.outputs if o is not None]) > 1:
        raise _Stop("Indices output")
    _only_axes(d, (0, 1), "pooled")
    b.link(b.dim(node.inputs[0], d.axes), b.dim(node.outputs[0], d.axes))


def _same_size_axes(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    """Resize / Upsample / Pad: identity on axes whose size does not change (and, for Pad, with zero pads)."""
    if side == "in" and slot != 0:
        raise _Stop(f"channels flow into input {slot}")
    x, y = node.inputs[0], node.outputs[0]
    sx, sy = b.shape(x), b.shape(y)
    for a in d.axes:
        if sx[a] != sy[a]:
            raise _Stop(f"axis {a} changes size {sx[a]} -> {sy[a]}")
    if node.op_type == "Pad":
        _check_zero_pads(b, node, d.axes, len(sx))
    if node.op_type == "Resize" and len(node.inputs) > 3 and node.inputs[3] is not None \
            and b.const(node.inputs[3]) is None:
        raise _Stop("sizes computed at runtime")
    if node.op_type == "Resize" and len(node.inputs) > 1 and node.inputs[1] is not None:
        roi = b.const(node.inputs[1])
        if roi is None or (roi.size and node.attr("coordinate_transformation_mode", b"") == b"tf_crop_and_resize"):
            raise _Stop("region of interest")
    b.link(b.dim(x, d.axes), b.dim(y, d.axes))


def _check_zero_pads(b: _Builder, node: Node, axes: Sequence[int], rank: int) -> None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        pads = b.const(node.inputs[1])
        if pads is None:
            raise _Stop("pads computed at runtime")
        pad_axes = list(range(rank))
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            ax = b.const(node.inputs[3])
            if ax is None:
                raise _Stop("pad axes computed at runtime")
            pad_axes = [int(a) % rank for a in ax]
    else:
        pads = np.array(node.attr("pads", []))
        pad_axes = list(range(rank))
    n = len(pad_axes)
    for a in axes:
        if a in pad_axes:
            i = pad_axes.index(a)
            if pads[i] != 0 or pads[i + n] != 0:
                raise _Stop(f"pads axis {a}")


def _transpose(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = _rank(b, x)
    perm = list(node.attr("perm", list(range(rank - 1, -1, -1))))
    if side == "in":
        xd = d
        y_axes = tuple(sorted(perm.index(a) for a in d.axes))
        yd = b.dim(y, y_axes)
    else:
        yd = d
        xd = b.dim(x, tuple(sorted(perm[a] for a in d.axes)))
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
            raise _Stop("reshape sizes do not match")
        gi, gj, pa, pc = [i], [j], a[i], c[j]
        i += 1
        j += 1
        while pa != pc:
            if pa < pc:
                if i >= len(a):
                    raise _Stop("reshape sizes do not match")
                gi.append(i)
                pa *= a[i]
                i += 1
            else:
                if j >= len(c):
                    raise _Stop("reshape sizes do not match")
                gj.append(j)
                pc *= c[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _reshape(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    if side == "in" and slot != 0:
        raise _Stop("channels flow into the shape input")
    x, y = node.inputs[0], node.outputs[0]
    if node.op_type == "Reshape":
        target = b.const(node.inputs[1])
        if target is None:
            reads: set[str] = set()
            target = b.evaluate(node.inputs[1], reads)  # raises when the target is not a shape computation
            b.dynamic.setdefault(node.name, set()).update(reads)
        if int(node.attr("allowzero", 0)) and (np.asarray(target) == 0).any():
            raise _Stop("allowzero with a zero in the target")
    if node.op_type in ("Squeeze", "Unsqueeze") and len(node.inputs) > 1 and node.inputs[1] is not None \
            and b.const(node.inputs[1]) is None:
        raise _Stop("axes computed at runtime")
    sx, sy = b.shape(x), b.shape(y)
    dst, src_shape = (y, sx) if side == "in" else (x, sy)
    groups = _axis_groups(sx, sy) if side == "in" else [(gj, gi) for gi, gj in _axis_groups(sx, sy)]
    axes = list(d.axes)
    home = [(gs, gd) for gs, gd in groups if set(axes) & set(gs)]
    if len(home) != 1 or not set(axes) <= set(home[0][0]):
        raise _Stop(f"axes {d.axes} span several reshape groups")
    gs, gd = home[0]
    if not gd:
        raise _Stop("axes collapse to nothing")
    if axes == gs:  # the whole group: flat positions are the same
        partial = [e for e in b.by_value.get((dst.name, None), []) if set(e.axes) < set(gd)]
        if partial and len(gs) == 1:
            # The flat side of a block merge (Flatten before Gemm): the leading axes' dim on the other side
            # already links its blocks here when it is visited.
            if any(e.axes != tuple(gd[:len(e.axes)]) for e in partial):
                raise _Stop(f"axes {[e.axes for e in partial]} of {dst.name!r} are not leading axes")
            return
        dd = b.dim(dst, gd)
        b.link(d, dd)
        return
    if axes == gs[:len(axes)] and len(gd) == 1:  # leading axes merged with trailing ones: blocks
        rest = math.prod(src_shape[a] for a in gs[len(axes):])
        dd = b.dim(dst, gd)
        b.link(d, dd, np.repeat(np.arange(d.size), rest), np.arange(d.size * rest))
        return
    raise _Stop(f"axes {d.axes} are part of the reshape group {gs} -> {gd}")


def _concat(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    y = node.outputs[0]
    rank = _rank(b, y)
    axis = int(node.attr("axis")) % rank
    ins = node.inputs
    if axis not in d.axes:
        for u in ins:
            b.link(b.dim(y, d.axes), b.dim(u, d.axes))
        return
    if d.axes != (axis,):
        raise _Stop(f"concatenation axis mixed with {d.axes}")
    yd = b.dim(y, (axis,))
    offset = 0
    for s, u in enumerate(ins):
        n = b.shape(u)[axis]
        if n and (side == "out" or s == slot):
            b.link(b.dim(u, (axis,)), yd, np.arange(n), offset + np.arange(n))
        offset += n


def _split(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    if side == "in" and slot != 0:
        raise _Stop("channels flow into the split sizes")
    x = node.inputs[0]
    rank = _rank(b, x)
    axis = int(node.attr("axis", 0)) % rank
    outs = node.outputs
    if axis not in d.axes:
        for o in outs:
            if o is not None:
                b.link(b.dim(x, d.axes), b.dim(o, d.axes))
        return
    if d.axes != (axis,):
        raise _Stop(f"split axis mixed with {d.axes}")
    if len(node.inputs) > 1 and node.inputs[1] is not None and b.const(node.inputs[1]) is None:
        raise _Stop("split sizes computed at runtime")
    xd = b.dim(x, (axis,))
    offset = 0
    for s, o in enumerate(outs):
        if o is None:
            raise _Stop("omitted output")
        n = b.shape(o)[axis]
        if n and (side == "in" or s == slot):
            b.link(xd, b.dim(o, (axis,)), offset + np.arange(n), np.arange(n))
        offset += n


def _slice_params(b: _Builder, node: Node, rank: int) -> tuple[list[int], list[int], list[int], list[int]]:
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


def _slice(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    if side == "in" and slot != 0:
        raise _Stop("channels flow into the slice bounds")
    x, y = node.inputs[0], node.outputs[0]
    sx, sy = b.shape(x), b.shape(y)
    starts, ends, axes, steps = _slice_params(b, node, len(sx))
    sliced = [a for a in d.axes if a in axes]
    if not sliced:
        b.link(b.dim(x, d.axes), b.dim(y, d.axes))
        return
    if len(d.axes) != 1:
        raise _Stop(f"sliced axis mixed with {d.axes}")
    a = d.axes[0]
    i = axes.index(a)
    if steps[i] != 1:
        raise _Stop(f"step {steps[i]} along the channel axis")
    idx = np.arange(sx[a])[slice(starts[i], ends[i], 1)]
    if len(idx) != sy[a]:
        raise _Stop("slice size disagrees with the inferred shape")
    if len(idx):
        b.link(b.dim(x, (a,)), b.dim(y, (a,)), idx, np.arange(len(idx)))


def _gather(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    """Gather with constant 1-D indices: along the gathered axis, output position q is input ``idx[q]``."""
    if side == "in" and slot != 0:
        raise _Stop("channels flow into the indices")
    x, y = node.inputs[0], node.outputs[0]
    rx = _rank(b, x)
    axis = int(node.attr("axis", 0)) % rx
    idx = b.const(node.inputs[1])
    if idx is None:
        raise _Stop("indices computed at runtime")
    q = np.asarray(idx).ndim
    if side == "in":
        xa = list(d.axes)
    else:
        if any(axis <= a < axis + q for a in d.axes) and q != 1:
            raise _Stop(f"gathered axes {d.axes}")
        xa = [a if a < axis + q else a - q + 1 for a in d.axes]
    if axis not in xa:
        ya = [a if a < axis else a + q - 1 for a in xa]
        b.link(b.dim(x, xa), b.dim(y, ya))
        return
    if xa != [axis] or q != 1:
        raise _Stop(f"gathered axis {axis} mixed with {d.axes}" if q == 1 else "indices are not 1-D")
    n = b.shape(x)[axis]
    positions = np.asarray(idx, dtype=np.int64) % n
    b.link(b.dim(x, (axis,)), b.dim(y, (axis,)), positions, np.arange(len(positions)))


def _conv(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    sw = b.shape(w)
    groups = int(node.attr("group", 1))
    where = (d.value, d.axes)
    at_in = where in ((x, (1,)), (w, (1,))) if groups == 1 else False
    at_out = where in ((y, (1,)), (w, (0,)), (bias, (0,))) or (groups > 1 and where == (x, (1,)))
    if groups > 1 and where == (w, (1,)):
        raise _Stop("input axis of a grouped convolution's weight")
    if not (at_in or at_out):
        raise _Stop(f"axes {d.axes} of {d.value.name!r}")
    if not b.is_param(w) and (at_in or groups > 1):
        raise _Stop("weight computed at runtime")
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


def _conv_producer(b: _Builder, node: Node, y: Value, w: Value, w_axis: int, bias: Value | None) -> _Dim:
    """Link output channel axis 1 of ``y`` to the weight's output axis ``w_axis`` and the bias; return y's dim."""
    yd, wd = b.dim(y, (1,)), b.dim(w, (w_axis,))
    b.link(yd, wd)
    b.role("producer", node, w, wd)
    if bias is not None:
        bd = b.dim(bias, (0,))
        b.link(yd, bd)
        b.role("producer", node, bias, bd)
    return yd


def _conv_transpose(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    if int(node.attr("group", 1)) != 1:
        raise _Stop("grouped ConvTranspose")
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
        raise _Stop(f"axes {d.axes} of {d.value.name!r}")


def _gemm(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    a, w = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    if _rank(b, a) != 2 or _rank(b, w) != 2:
        raise _Stop("operands are not 2-D")
    ta, tb = int(node.attr("transA", 0)), int(node.attr("transB", 0))
    fa, ma = (0, 1) if ta else (1, 0)
    fb, nb = (1, 0) if tb else (0, 1)
    where = (d.value, d.axes)
    if where in ((a, (fa,)), (w, (fb,))):
        ad, wd = b.dim(a, (fa,)), b.dim(w, (fb,))
        b.link(ad, wd)
        if wd.is_param:
            b.role("consumer", node, w, wd, a)
        if ad.is_param:
            b.role("consumer", node, a, ad, w)
        return
    if where in ((y, (1,)), (w, (nb,))) or (c is not None and d.value is c):
        yd, wd = b.dim(y, (1,)), b.dim(w, (nb,))
        b.link(yd, wd)
        b.role("producer", node, w, wd)
        if c is not None:
            sc = b.shape(c)
            if sc and sc[-1] == yd.size and yd.size > 1:
                cd = b.dim(c, (len(sc) - 1,))
                b.link(yd, cd)
                b.role("producer", node, c, cd)
            elif sc and sc[-1] != 1:
                raise _Stop(f"bias {c.name!r} shape {sc}")
        return
    if where in ((y, (0,)), (a, (ma,))):
        b.link(b.dim(y, (0,)), b.dim(a, (ma,)))
        if c is not None and len(b.shape(c)) == 2 and b.shape(c)[0] > 1:
            raise _Stop("bias with rows")
        return
    raise _Stop(f"axes {d.axes} of {d.value.name!r}")


def _matmul(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    a, w = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    ra, rw, ry = _rank(b, a), _rank(b, w), _rank(b, y)
    if ra < 2 or rw < 2:
        raise _Stop("1-D operand")
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
    out_ax = ax + ry - _rank(b, d.value)
    yd = b.dim(y, (out_ax,))
    for u, r in ((a, ra), (w, rw)):
        ua = out_ax - (ry - r)
        if ua >= 0 and b.shape(u)[ua] == yd.size:
            b.link(yd, b.dim(u, (ua,)))


def _matmul_flat(b: _Builder, node: Node, d: _Dim) -> None:
    """A flat dimension over broadcast batch axes plus one matrix axis (attention heads: ``(head, dim)``).

    The batch axes keep their size (only the matrix axis may shrink); the matrix axis follows the
    single-axis rules: A's last ~ B's second-to-last (contracted), B's last ~ Y's last, A's rows ~ Y's rows.
    """
    a, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    ranks = {"a": _rank(b, a), "w": _rank(b, w), "y": _rank(b, y)}
    values = {"a": a, "w": w, "y": y}
    role = next(k for k, v in values.items() if v is d.value)
    r = ranks[role]
    batch = [ax for ax in d.axes if ax < r - 2]
    matrix = [ax for ax in d.axes if ax >= r - 2]
    if len(matrix) != 1 or d.prunable_axis != matrix[0]:
        raise _Stop(f"flat dimension {d.axes} shrinks along a batch axis")
    # matrix axis as (operand, offset from the end)
    pairs = {("a", 1): ("w", 2), ("w", 2): ("a", 1), ("w", 1): ("y", 1), ("y", 1): ("w", 1),
             ("a", 2): ("y", 2), ("y", 2): ("a", 2)}
    other, back = pairs[(role, r - matrix[0])]
    ro = ranks[other]
    shape_o = b.shape(values[other])
    axes_o = [ax - r + ro for ax in batch]
    if any(ax < 0 or shape_o[ax] != b.shape(d.value)[bx] for ax, bx in zip(axes_o, batch)):
        raise _Stop(f"batch axes {batch} broadcast between the operands")
    od = b.dim(values[other], [*axes_o, ro - back])
    b.link(d, od)


def _axes_of(b: _Builder, node: Node, rank: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = b.const(node.inputs[1])
        if arr is None:
            raise _Stop("axes computed at runtime")
        return [int(t) % rank for t in arr.ravel()]
    axes = node.attr("axes")
    return None if axes is None else [int(t) % rank for t in axes]


def _reduce(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    if side == "in" and slot != 0:
        raise _Stop("channels flow into the axes input")
    x, y = node.inputs[0], node.outputs[0]
    rank = _rank(b, x)
    axes = _axes_of(b, node, rank)
    if axes is None or (not axes and node.attr("noop_with_empty_axes", 0) == 0):
        axes = list(range(rank))
    keep = int(node.attr("keepdims", 1))
    kept = [a for a in range(rank) if a not in axes]
    if side == "in":
        if set(d.axes) & set(axes):
            raise _Stop(f"reduces axes {sorted(set(d.axes) & set(axes))}")
        xa = d.axes
    else:
        xa = d.axes if keep else tuple(kept[a] for a in d.axes)
    ya = xa if keep else tuple(kept.index(a) for a in xa)
    b.link(b.dim(x, xa), b.dim(y, ya))


def _axis_op(b: _Builder, node: Node, d: _Dim, side: str, slot: int) -> None:
    """Softmax / LogSoftmax / LayerNormalization: identity on axes they do not normalise."""
    x, y = node.inputs[0], node.outputs[0]
    rank = _rank(b, x)
    if side == "in" and slot != 0:
        raise _Stop("normalisation parameters")
    if node.op_type == "LayerNormalization":
        if len([o for o in node.outputs if o is not None]) > 1:
            raise _Stop("mean/inv-std outputs")
        norm = list(range(int(node.attr("axis", -1)) % rank, rank))
    else:
        default = -1 if (b.model.opset() or 13) >= 13 else 1
        axis = int(node.attr("axis", default)) % rank
        norm = [axis] if (b.model.opset() or 13) >= 13 else list(range(axis, rank))
    if set(d.axes) & set(norm):
        raise _Stop(f"normalises axes {norm}")
    b.link(b.dim(x, d.axes), b.dim(y, d.axes))


_RULES = {
    **dict.fromkeys(_UNARY, _unary),
    **dict.fromkeys(_ELEMENTWISE, _elementwise),
    **dict.fromkeys(("BatchNormalization", "InstanceNormalization"), _norm),
    **dict.fromkeys(_POOLS, _pool),
    **dict.fromkeys(("Resize", "Upsample", "Pad"), _same_size_axes),
    "Transpose": _transpose,
    **dict.fromkeys(_RESHAPES, _reshape),
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Shape": _shape_reader,
    **dict.fromkeys(_REDUCES, _reduce),
    **dict.fromkeys(("Softmax", "LogSoftmax", "LayerNormalization"), _axis_op),
}

#: Op types the analysis follows (anything else freezes the groups it touches).
SUPPORTED_OPS = frozenset(_RULES)


# ====================================================================================================
# union-find over positions


def _components(n: int, ea: np.ndarray, eb: np.ndarray) -> np.ndarray:
    """Label of each of ``n`` positions: the smallest position connected to it."""
    parent = np.arange(n, dtype=np.int64)
    if not len(ea):
        return parent
    while True:
        while True:  # pointer jumping to roots
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
        ra, rb = parent[ea], parent[eb]
        differ = ra != rb
        if not differ.any():
            return parent
        lo = np.minimum(ra[differ], rb[differ])
        hi = np.maximum(ra[differ], rb[differ])
        np.minimum.at(parent, hi, lo)


# ====================================================================================================
# the analysis


class ChannelAnalysis:
    """Pruning groups of a model (see the module docstring). Build it with :func:`analyze`.

    Attributes
    ----------
    groups : every group, in a deterministic order (``gid`` = index).
    graph : the coupling graph (networkx): nodes ``(value, axes, reader)`` (``reader`` is ``None`` except
        for one reader's view of a shared weight) with attribute ``dim``; an edge for each pair of coupled
        dimensions.
    """

    def __init__(self, model: Model, builder: _Builder, groups: list[Group], cost_model: _CostModel) -> None:
        self.model = model
        self.groups = groups
        self.graph = builder.nx
        self._builder = builder
        self._cost = cost_model

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
        return self._cost.cost(keep)

    def base_cost(self) -> tuple[int, int]:
        return self._cost.base_macs, self._cost.base_params

    def time(self, keep: Mapping[int, int], latency: Any, batch: int = 1) -> float:
        """Predicted seconds (:mod:`graphopt.measure.latency`) of the nodes the groups touch, at ``batch``, if
        group ``gid`` kept ``keep[gid]`` channels. Only differences are meaningful: nodes no group touches
        are left out. Each node keeps its unpruned kernel family and channels are not padded to blocks
        (``padded=False``), so the time is a polynomial in the kept fractions; a node whose shapes are
        unknown counts 0."""
        return self._cost.time(keep, latency, batch)

    def dim_sizes(self, keep: Mapping[int, Sequence[int] | np.ndarray | int]) -> dict[tuple, int]:
        """New flat size of every dimension ``(value, axes, reader)`` the plan changes."""
        return self._cost.dim_sizes(keep)

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups],
                "prunable": len(self.prunable()), "frozen": len(self.frozen())}


def analyze(model: Model, input_shapes: Mapping[str, Sequence[int]] | None = None) -> ChannelAnalysis:
    """Channel groups of ``model``'s main graph (the model is not modified).

    Parameters
    ----------
    input_shapes : concrete shapes for graph inputs; dynamic first dims default to 1 (batch), like
        :func:`graphopt.measure.analysis.analyze`.

    Returns
    -------
    ChannelAnalysis
    """
    table, _ = _shape_table(model, input_shapes)
    b = _Builder(model, table)
    b.run()
    ea = np.concatenate(b.edges_a) if b.edges_a else np.zeros(0, np.int64)
    eb = np.concatenate(b.edges_b) if b.edges_b else np.zeros(0, np.int64)
    labels = _components(b.total, ea, eb)
    dims = sorted(b.dims.values(), key=lambda d: d.index)
    groups = _groups(b, dims, labels)
    cost_model = _CostModel(model, table, b, groups, input_shapes)
    return ChannelAnalysis(model, b, groups, cost_model)


def _shape_table(model: Model, input_shapes: Mapping[str, Sequence[int]] | None) -> tuple[Any, list[str]]:
    warnings: list[str] = []
    return _analysis.shape_table(model, input_shapes, 1, warnings), warnings


def _groups(b: _Builder, dims: list[_Dim], labels: np.ndarray) -> list[Group]:
    if not dims:
        return []
    offsets = np.array([d.offset for d in dims], dtype=np.int64)
    pos = np.arange(b.total, dtype=np.int64)
    dim_of = np.searchsorted(offsets, pos, side="right") - 1
    # Sort positions by (class, dim, position): a class is then one slice, made of one run per dim it touches.
    order = np.lexsort((pos, dim_of, labels))
    lab_sorted, dim_sorted = labels[order], dim_of[order]
    n = len(order)
    new_class = np.ones(n, dtype=bool)
    new_class[1:] = lab_sorted[1:] != lab_sorted[:-1]
    new_run = new_class.copy()
    new_run[1:] |= dim_sorted[1:] != dim_sorted[:-1]
    cls_start = np.flatnonzero(new_class)
    run_start = np.flatnonzero(new_run)
    run_dim = dim_sorted[run_start].tolist()
    run_count = np.diff(np.append(run_start, n)).tolist()
    first_run = np.searchsorted(run_start, cls_start).tolist()
    last_run = first_run[1:] + [len(run_start)]
    # the signature of a class: the (dim, count) of its runs; equal signatures form one group
    by_sig: dict[tuple, list[int]] = {}
    for ci, (r0, r1) in enumerate(zip(first_run, last_run)):
        sig = tuple(zip(run_dim[r0:r1], run_count[r0:r1]))
        by_sig.setdefault(sig, []).append(ci)
    # deterministic group order: by first dimension, then by first position there
    entries = []
    for sig, classes in by_sig.items():
        starts = cls_start[classes]
        starts = starts[np.argsort(order[starts], kind="stable")]  # channel order: position in the first dim
        entries.append((sig[0][0], int(order[starts[0]]), sig, starts))
    entries.sort(key=lambda t: (t[0], t[1]))
    roles_by_dim: dict[int, list[tuple]] = {}
    for kind, node, value, d in b.roles.values():
        roles_by_dim.setdefault(d.index, []).append((kind, node, value, d))
    groups: list[Group] = []
    for gid, (_, _, sig, starts) in enumerate(entries):
        members: list[Member] = []
        producers: list[Producer] = []
        consumers: list[Consumer] = []
        frozen: list[str] = []
        within = 0  # offset of this dim's run inside each class's slice
        for di, k in sig:
            d = dims[di]
            index_map = order[starts[:, None] + within + np.arange(k)] - d.offset
            within += k
            members.append(Member(d.value.name, d.prunable_axis, index_map, d.axes, d.is_param, d.use))
            frozen.extend(r for r in d.frozen if r not in frozen)
            for kind, node, value, _ in roles_by_dim.get(di, []):
                if kind == "producer":
                    producers.append(Producer(node, d.value.name, d.prunable_axis, index_map))
                else:
                    consumers.append(Consumer(node, value, d.value.name, d.prunable_axis, index_map))
        groups.append(Group(gid, len(starts), frozen[0] if frozen else None, members, producers, consumers,
                            frozen_all=frozen))
    return groups


# ====================================================================================================
# cost


class _CostShapes(_analysis.NodeShapes):
    """``analysis.NodeShapes`` over a dict of concrete shapes (for re-costing one node with analysis's MAC rules)."""

    def __init__(self, node: Node, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.node = node
        self.shapes = shapes

    def _concrete(self, value: Value | None, what: str) -> tuple[int, ...]:
        if value is None:
            raise _analysis.UnknownShape(f"{what} is missing")
        dims = self.shapes.get(shape_key(value.name, self.node.name))  # this reader's copy of a shared weight
        if dims is None:
            dims = self.shapes.get(value.name)
        if dims is None:
            raise _analysis.UnknownShape(f"shape of {value.name!r} unknown")
        return dims


def _node_macs(node: Node, shapes: Mapping[str, tuple[int, ...]]) -> int:
    rule = _analysis.RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if rule is None:
        return 0
    try:
        return int(rule(_CostShapes(node, shapes)))
    except _analysis.UnknownShape:
        return 0


class _CostModel:
    """Analytic MACs/params of the pruned model: re-cost only the nodes whose shapes change.

    A changed weight is replaced by one new tensor of its new shape (params: new size − old size). A
    weight several nodes share gets one new copy per distinct way its readers are sliced
    (:meth:`use_signature`), and the old one goes when no reader is left. A changed shape constant
    (Reshape target, Split sizes, Slice bounds) keeps its size unless several nodes read it (then each
    changed reader gets its own copy); a Split without sizes gets a sizes input.
    """

    def __init__(self, model: Model, table: Any, b: _Builder, groups: list[Group],
                 input_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        self.graph = graph = model.graph
        self.groups = groups
        self.b = b
        base = _analysis.analyze(model, input_shapes=dict(input_shapes or {}) or None)
        self.base_macs = base.macs_known
        self.base_params = base.params
        self.dims = {d.key: d for d in b.dims.values()}
        # base shapes, keyed by value name (and "value@reader" for a shared weight's readers)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.nodes_of_key: dict[str, list[Node]] = {}

        def note(u: Value) -> None:
            if u.name not in self.shapes:
                dims = table.dims(graph, u)
                if dims is not None and all(isinstance(t, int) for t in dims):
                    self.shapes[u.name] = tuple(int(t) for t in dims)

        self.key_info: dict[str, tuple[Value, str | None]] = {}  # shape key -> (value, reader or None)
        self.param_keys = {d.shape_key for d in b.dims.values() if d.is_param}
        for d in b.dims.values():
            v = d.value
            self.key_info[d.shape_key] = (v, d.use)
            self.shapes[d.shape_key] = tuple(int(t) for t in table.dims(graph, v))
            if d.use is not None:
                nodes = [n for n in graph.consumers(v) if n.name == d.use]
            else:
                nodes = [n for n, slot in graph.uses(v) if not isinstance(slot, tuple)]
                p = graph.producer(v)
                if p is not None:
                    nodes.append(p)
            self.nodes_of_key[d.shape_key] = nodes
            for n in nodes:
                for u in (*n.inputs, *n.outputs):
                    if u is not None:
                        note(u)
        # group -> [(dim key, positions per channel)]
        self.group_dims: list[list[tuple[tuple, int]]] = []
        for g in groups:
            self.group_dims.append([((m.value, m.axes, m.use), int(m.index_map.shape[1])) for m in g.members])
        # a shared weight's readers slice it alike (one copy) iff their dims sit in the same groups, same maps
        memberships: dict[tuple, list[tuple]] = {}
        for g in groups:
            for m in g.members:
                if m.use is not None:
                    memberships.setdefault((m.value, m.use), []).append((m.axes, g.gid, m.index_map.tobytes()))
        self.use_signature = {key: tuple(sorted(v)) for key, v in memberships.items()}
        self.base_node_macs: dict[str, int] = {}
        self._base_times: dict[tuple[int, int], tuple[Any, float, dict[str, float]]] = {}
        # nodes whose shape inputs read the shape of a member (dynamic Reshape/Slice): re-check on change
        self.dynamic_readers: dict[str, list[Node]] = {}
        by_name = {n.name: n for n in graph.toposort()} if b.dynamic else {}
        for node_name, reads in b.dynamic.items():
            node = by_name[node_name]
            for v in reads:
                self.dynamic_readers.setdefault(v, []).append(node)
            for u in (*node.inputs, *node.outputs):
                if u is not None:
                    note(u)

    def dim_sizes(self, keep: Mapping[int, Any]) -> dict[tuple, int]:
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
        changed = self.new_shapes(self.dim_sizes(keep))
        if not changed:
            return self.base_macs, self.base_params
        shapes = dict(self.shapes)
        shapes.update(changed)
        nodes = self._changed_nodes(changed)
        macs = self.base_macs
        for n in nodes:
            old = self.base_node_macs.get(n.name)
            if old is None:
                old = self.base_node_macs[n.name] = _node_macs(n, self.shapes)
            macs += _node_macs(n, shapes) - old
        params = self.base_params + self.weight_delta(changed)
        params += self._shape_constant_delta(nodes, shapes)
        return macs, params

    def _changed_nodes(self, changed: Mapping[str, tuple[int, ...]]) -> list[Node]:
        nodes: dict[str, Node] = {}
        for key in changed:
            for n in (*self.nodes_of_key.get(key, []), *self.dynamic_readers.get(key, [])):
                nodes[n.name] = n
        return sorted(nodes.values(), key=lambda n: n.seq)

    def time(self, keep: Mapping[int, Any], latency: Any, batch: int) -> float:
        cached = self._base_times.get((id(latency), batch))
        if cached is None or cached[0] is not latency:  # the model object is kept, so its id is not reused
            touched = {n.name: n for nodes in self.nodes_of_key.values() for n in nodes}
            per = {name: self._node_time(n, self.shapes, latency, batch) for name, n in touched.items()}
            cached = self._base_times[(id(latency), batch)] = (latency, sum(per.values()), per)
        _, base, per = cached
        changed = self.new_shapes(self.dim_sizes(keep))
        if not changed:
            return base
        shapes = {**self.shapes, **changed}
        total = base
        for n in self._changed_nodes(changed):
            old = per.get(n.name)
            if old is None:
                old = per[n.name] = self._node_time(n, self.shapes, latency, batch)
            total += self._node_time(n, shapes, latency, batch) - old
        return total

    def _node_time(self, node: Node, shapes: Mapping[str, tuple[int, ...]], latency: Any, batch: int) -> float:
        from graphopt.measure.latency import node_work

        def lookup(table: Mapping[str, tuple[int, ...]]):
            def dims(v: Value) -> tuple[int, ...] | None:
                return table.get(shape_key(v.name, node.name)) or table.get(v.name)
            return dims

        work = node_work(node, lookup(shapes), path=latency.path, padded=False, like=lookup(self.shapes))
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

    def _is_param(self, name: str) -> bool:
        ds = self.b.by_value.get((name, None))
        return bool(ds) and ds[0].is_param

    def _shape_constant_delta(self, nodes: Any, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """Params added by rewriting Reshape targets / Split sizes / Slice bounds (see the class docstring)."""
        changed = {name for name, shape in shapes.items() if shape != self.shapes.get(name, shape)}
        plan = []
        for n in nodes:
            plan.extend((n, f) for f in shape_fixes(self.b, n, self.shapes, shapes, changed))
        return param_delta(self.graph, plan)


def param_delta(graph: Graph, plan: Sequence[tuple[Node, ShapeFix]]) -> int:
    """Params added by the shape fixes of a plan (mirrors :func:`graphopt.compress.shrink.apply`).

    A replaced constant read only there is rewritten in place; a shared one gets a new copy per reader and
    goes away with its last reader; a patch adds its positions and values; attributes cost nothing.
    """
    uses: dict[str, int] = {}
    delta = 0
    for node, fix in plan:
        delta += fix.size
        if fix.kind != "replace":
            continue
        v = node.inputs[fix.slot] if fix.slot < len(node.inputs) else None
        if v is None:
            continue
        arr = graph.constant_array(v)
        if arr is None:
            continue
        uses.setdefault(v.name, len(graph.uses(v)))
        uses[v.name] -= 1
        if uses[v.name] == 0:
            delta -= int(np.asarray(arr).size)
    return delta


@dataclass
class ShapeFix:
    """One stale shape input (or attribute) of a node after a plan, and how :mod:`graphopt.compress.shrink` fixes it.

    ``kind``: ``"replace"`` — input ``slot`` (a constant, or missing) becomes the constant ``values``;
    ``"patch"`` — input ``slot`` is computed at runtime (from ``Shape``): ``values`` replace the entries at
    ``positions``, the others stay dynamic (a batch size stays dynamic), through Slice + Concat
    (:func:`patch_runs`);
    ``"attr"`` — attribute ``attr`` becomes ``values``. ``values`` is ``None`` when it needs the kept
    indices and only sizes were asked for.
    """

    kind: str
    slot: int | None
    size: int  # params the fix adds (new constant elements)
    values: np.ndarray | None = None
    positions: np.ndarray | None = None
    attr: str = ""
    length: int = 0  # entries of the patched vector


def patch_runs(length: int, positions: Sequence[int]) -> list[tuple[str, int, int]]:
    """Maximal runs ``(kind, lo, hi)`` of a shape vector: ``"keep"`` (sliced from the runtime value: a
    starts and an ends constant) or ``"set"`` (a constant of ``hi - lo`` entries). Slice and Concat keep the
    vector visible to onnx's shape inference (data propagation), unlike a scatter."""
    chosen = {int(p) for p in positions}
    runs: list[tuple[str, int, int]] = []
    for i in range(length):
        kind = "set" if i in chosen else "keep"
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1], i + 1)
        else:
            runs.append((kind, i, i + 1))
    return runs


def reshape_target(b: _Builder, node: Node, old: Mapping[str, tuple[int, ...]],
                   new: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    """The Reshape target the pruned model needs: old entries kept where still right (``-1``, ``0`` copy)."""
    x, y = node.inputs[0], node.outputs[0]
    sy_old = old[y.name]
    sx, sy = new.get(x.name, old[x.name]), new.get(y.name, sy_old)
    allowzero = int(node.attr("allowzero", 0))
    t = np.array(b.evaluate(node.inputs[1]), dtype=np.int64).copy()
    for i in range(len(t)):
        if t[i] == -1:
            continue
        if t[i] == 0 and not allowzero and i < len(sx) and sx[i] == sy[i]:
            continue
        t[i] = sy[i]
    return t


def shape_fixes(b: _Builder, node: Node, old: Mapping[str, tuple[int, ...]], new: Mapping[str, tuple[int, ...]],
                changed: set[str], kept_axes: Mapping[str, Mapping[int, np.ndarray]] | None = None
                ) -> list[ShapeFix]:
    """Shape inputs / attributes of ``node`` a plan makes stale (Reshape targets, Split sizes, Slice bounds,
    Resize sizes), with the params each fix adds (see :class:`ShapeFix` and :func:`param_delta`)."""
    op = node.op_type
    graph = b.graph
    ins = node.inputs
    reads = b.dynamic.get(node.name, set())
    dyn = bool(reads & changed)

    def is_changed(v: Value | None) -> bool:
        return v is not None and v.name in changed

    def patch(slot: int, desired: np.ndarray, must: set[int]) -> list[ShapeFix]:
        now = np.asarray(b.evaluate(ins[slot], None, new)).ravel()
        want = np.asarray(desired).ravel()
        pos = sorted(must | {i for i in range(len(want)) if want[i] is not None and now[i] != want[i]})
        if not pos:
            return []
        values = None if any(want[i] is None for i in pos) else np.array([want[i] for i in pos], dtype=np.int64)
        size = sum(2 if kind == "keep" else hi - lo for kind, lo, hi in patch_runs(len(want), pos))
        return [ShapeFix("patch", slot, size, values, np.array(pos, dtype=np.int64), length=len(want))]

    if op == "Reshape" and (is_changed(node.outputs[0]) or dyn):
        target = reshape_target(b, node, old, new)
        if graph.constant_array(ins[1]) is not None:
            return [ShapeFix("replace", 1, target.size, target)]
        sy_old, sy = old[node.outputs[0].name], new.get(node.outputs[0].name, old[node.outputs[0].name])
        return patch(1, target, {i for i in range(len(sy)) if sy[i] != sy_old[i]})
    if op == "Split" and any(is_changed(o) for o in node.outputs):
        x = ins[0]
        axis = int(node.attr("axis", 0)) % len(old[x.name])
        sizes = np.array([new.get(o.name, old[o.name])[axis] for o in node.outputs], dtype=np.int64)
        if (len(ins) > 1 and ins[1] is not None) or (b.model.opset() or 13) >= 13:
            return [ShapeFix("replace", 1, sizes.size, sizes)]
        return [ShapeFix("attr", None, 0, sizes, attr="split")]
    if op == "Slice":
        x = ins[0]
        sx = old.get(x.name)
        if sx is None:
            return []
        starts, ends, axes, steps = _slice_params(b, node, len(sx))
        nx_ = new.get(x.name, sx)
        moved = [i for i, a in enumerate(axes) if nx_[a] != sx[a]]
        if not moved and not dyn:
            return []
        new_starts: list = list(starts)
        new_ends: list = list(ends)
        for i in moved:
            a = axes[i]
            kept = kept_axes.get(x.name, {}).get(a) if kept_axes is not None else None
            if kept is None and kept_axes is not None:
                kept = np.arange(sx[a])
            if kept is None:
                new_starts[i] = new_ends[i] = None
                continue
            idx = np.arange(sx[a])[slice(starts[i], ends[i], 1)]
            if not len(idx):
                new_starts[i] = new_ends[i] = 0
                continue
            start = int(np.searchsorted(kept, idx[0]))
            new_starts[i] = start
            new_ends[i] = start + int(np.count_nonzero((kept >= idx[0]) & (kept <= idx[-1])))
        if len(ins) == 1:  # attribute form (opset < 10)
            return [ShapeFix("attr", None, 0, None if None in new_starts else np.array(new_starts), attr="starts"),
                    ShapeFix("attr", None, 0, None if None in new_ends else np.array(new_ends), attr="ends")]
        fixes = []
        wanted = {1: new_starts, 2: new_ends, 3: axes, 4: steps}
        for slot in range(1, min(len(ins), 5)):
            v = ins[slot]
            if v is None:
                continue
            const = graph.constant_array(v)
            if const is not None:
                if moved and slot in (1, 2):
                    arr = None if None in wanted[slot] else np.array(wanted[slot], dtype=np.asarray(const).dtype)
                    fixes.append(ShapeFix("replace", slot, int(np.asarray(const).size), arr))
                continue
            if slot == 3:  # axes: indices into the input, not sizes
                continue
            fixes.extend(patch(slot, np.array(wanted[slot], dtype=object),
                               set(moved) if slot in (1, 2) else set()))
        return fixes
    if op == "Resize" and len(ins) > 3 and ins[3] is not None and is_changed(node.outputs[0]):
        sizes = np.array(new[node.outputs[0].name], dtype=np.int64)
        return [ShapeFix("replace", 3, sizes.size, sizes)]
    if op == "Gather" and is_changed(ins[0]):
        x, y = ins[0], node.outputs[0]
        axis = int(node.attr("axis", 0)) % len(old[x.name])
        if new[x.name][axis] == old[x.name][axis]:
            return []
        idx = np.asarray(graph.constant_array(ins[1]))
        if kept_axes is None:
            return [ShapeFix("replace", 1, int(new.get(y.name, old[y.name])[axis]))]
        kept_x = kept_axes.get(x.name, {}).get(axis, np.arange(old[x.name][axis]))
        kept_y = kept_axes.get(y.name, {}).get(axis, np.arange(old[y.name][axis]))
        source = idx.astype(np.int64)[kept_y] % old[x.name][axis]
        values = np.searchsorted(kept_x, source).astype(idx.dtype)
        return [ShapeFix("replace", 1, int(values.size), values)]
    return []
