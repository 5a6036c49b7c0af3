"""Shape-op simplification: no-ops removed, inverse pairs cancelled (pass ``simplify``, lossless).

Every rule below either proves ``y = x`` (then readers of ``y`` read ``x`` and the node goes) or
rewrites a pair of nodes into one that computes the same tensor. A rule acts only on what is known for
sure: constant operands (initializers or ``Constant`` nodes that are not overridable inputs) and element
types and dims that are static, from onnx shape inference or the IR (see
:class:`graphopt.core.shapes.ShapeView`). A symbolic dim is never assumed to be any value.

Cancellations and chains
------------------------
``transpose_pair``
    ``Transpose(Transpose(x, p1), p2)`` is ``Transpose(x, q)`` with ``q[i] = p1[p2[i]]`` (output dim ``i``
    is dim ``p2[i]`` of the middle tensor, which is dim ``p1[p2[i]]`` of ``x``). An identity ``q`` removes
    both; otherwise the outer node reads ``x`` with perm ``q``, refused when the inner Transpose has
    other readers (nothing would be saved). A missing perm means "reverse the dims" and needs the rank.
``squeeze_unsqueeze`` / ``unsqueeze_squeeze``
    ``Unsqueeze(Squeeze(x, a), a)`` and ``Squeeze(Unsqueeze(x, a), a)`` are ``x`` when the two axis sets
    are equal after normalising negative axes (Squeeze's against the rank of its input, Unsqueeze's
    against the rank of its output — the same rank here). A Squeeze without axes removes every size-1
    dim, so it needs the input's dims static (Squeeze∘Unsqueeze: also none of ``x``'s dims may be 1).
``reshape_chain``
    ``Reshape(Reshape(x, s1), s2)`` and ``Reshape(Flatten(x), s2)`` are ``Reshape(x, s2)``: a reshape only
    reads its input's element count, which the middle tensor shares with ``x``. Needs ``s2`` constant.
    With ``allowzero = 0`` a ``0`` in ``s2`` copies the *middle* tensor's dim: it is replaced by that dim
    when static; one dynamic copied dim becomes ``-1`` when every other entry of ``s2`` and every other dim
    of the middle tensor is static with equal products (then ``-1`` can only be that dim); else the rule
    refuses. ``-1`` is inferred from the element count, which is unchanged.

Shape tensors computed from ``Shape``
------------------------------------
Exporters rebuild a dynamic batch dim at run time: ``Reshape(x, Concat(Unsqueeze(Gather(Shape(t), 0)), 17, 64))``.
:func:`shape_entries` evaluates such an int64 vector symbolically (Shape, Gather, Slice, Unsqueeze, Squeeze,
Concat, int64 Cast, constants): each entry is a static int or the set of names of a dynamic dim (``dim i of
value v``, or its symbol from shape inference — onnx's, or onnxruntime's symbolic engine for main-graph values,
see :meth:`ShapeView.symbols`).

``reshape_shape_target``
    Reshape(x, computed) -> Reshape(x, constant); see :class:`ReshapeShapeTarget` for when an entry becomes
    ``0`` (it is x's own dim at that position) or ``-1`` (the element count proves it).
``shape_where_equal``
    ``Where(Equal(s, k), a, s)`` (torch's ``expand(B, -1, -1)``) -> a Concat of ``s``'s pieces and constants,
    when every comparison is decided (a dim is never negative); see :class:`ShapeWhereEqual`.

No-ops (``y = x``)
------------------
``noop_transpose``  perm is the identity (or rank <= 1 without perm).
``noop_reshape``    every target entry equals ``x``'s dim (static), or is ``0`` with ``allowzero = 0``, or is
                    a single ``-1`` while all other dims are static and non-zero (then ``-1`` resolves to
                    ``x``'s own dim, symbolic or not).
``noop_cast``       ``Cast`` to the input's own (known) element type; ``CastLike`` to a target of the same type.
``noop_slice``      every sliced axis has step 1, a start that clamps to 0 and an end that clamps to the
                    dim (a static dim, or ``INT64_MAX`` for any dim).
``noop_expand``     the target shape has no more dims than ``x`` and each of its entries is 1 or equals
                    ``x``'s static dim (broadcasting then changes nothing).
``noop_pad``        all pads are zero (any mode).
``single_concat``   Concat of one input.  ``single_split``: Split into one output.
``neutral_element`` ``x * 1``, ``1 * x``, ``x + 0``, ``0 + x``, ``x - 0``, ``x / 1`` with a constant whose
                    broadcast does not change ``x``'s shape (a scalar, or dims that are 1 or equal ``x``'s
                    static dims, rank not above ``x``'s). ``x * 1``, ``x / 1`` and ``x - 0`` are exact bit for
                    bit; ``x + (+0)`` turns ``-0.0`` into ``+0.0``, which compares equal.

Every no-op refuses when ``y`` is a model output and ``x`` cannot take over its name (a graph input,
an initializer or another output), and when both are outputs of one subgraph. Shapes never change, so
no re-inference is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from graphopt.core.ir import Graph, Model, Node, Value
from graphopt.core.manager import PassContext, register
from graphopt.core.ops import const_input, constant_value, producer_op, remove_dead, slice_bounds, sole_consumer
from graphopt.core.rewrite import Match, NoMatch, Rule, RulePass
from graphopt.core.shapes import ShapeView

INT64_MAX = 2**63 - 1


def _bypass_refusal(graph: Graph, y: Value | None, x: Value | None) -> str | None:
    """Why readers of ``y`` cannot read ``x`` instead, or None."""
    if x is None or y is None:
        return "missing input or output"
    if graph.is_graph_output(y) and graph.is_graph_output(x):
        return "input and output are both graph outputs"
    if not graph.can_replace(y, x):
        return "would rename a model output"
    return None


def _bypass(graph: Graph, y: Value, x: Value, nodes: list[Node]) -> None:
    graph.replace_all_uses(y, x)
    remove_dead(graph, nodes)


def _axes(graph: Graph, node: Node) -> list[int] | None | str:
    """Squeeze/Unsqueeze axes from the attribute (opset < 13) or the input; None = absent; "unknown"."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attr("axes")]
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    axes = const_input(graph, node, 1)
    return "unknown" if axes is None else [int(a) for a in axes.reshape(-1)]


def _normalized(axes: list[int], rank: int | None) -> set[int] | None:
    if any(a < 0 for a in axes):
        if rank is None:
            return None
        return {a + rank if a < 0 else a for a in axes}
    return set(axes)


class _TypedRule(Rule):
    def __init__(self, types: ShapeView) -> None:
        self.types = types

    def rank(self, value: Value | None) -> int | None:
        dims = self.types.dims(value) if value is not None else None
        return None if dims is None else len(dims)


class _NoOp(_TypedRule):
    """A rule that proves ``outputs[0] = inputs[0]``; subclasses implement :meth:`why_not`."""

    def why_not(self, graph: Graph, node: Node) -> str | None:
        raise NotImplementedError

    def match(self, graph: Graph, node: Node) -> Match | str:
        why = self.why_not(graph, node) or _bypass_refusal(graph, node.outputs[0], node.inputs[0] if node.inputs
                                                           else None)
        if why is not None:
            return why
        if any(v is not None and (graph.uses(v) or graph.is_graph_output(v)) for v in node.outputs[1:]):
            return "another output is read"
        return Match(node)

    def rewrite(self, graph: Graph, match: Match) -> None:
        _bypass(graph, match.node.outputs[0], match.node.inputs[0], [match.node])

    def target_and_dims(self, graph: Graph, node: Node) -> tuple[list[int], tuple] | str:
        """A Reshape's / Expand's constant target shape and its input's dims, or why they are not known."""
        target = const_input(graph, node, 1)
        if target is None:
            return NoMatch("target shape is not constant")
        dims = self.types.dims(node.inputs[0])
        if dims is None:
            return "input rank unknown"
        return [int(s) for s in target.reshape(-1)], dims


def _perm(node: Node, rank: int | None) -> list[int] | None:
    perm = node.attr("perm")
    if perm is not None:
        return [int(p) for p in perm]
    return None if rank is None else list(reversed(range(rank)))


class NoopTranspose(_NoOp):
    name = "noop_transpose"
    root_ops = ("Transpose",)

    def why_not(self, graph: Graph, node: Node) -> str | None:
        perm = _perm(node, self.rank(node.inputs[0]))
        if perm is None:
            return "no perm and unknown rank"
        return None if perm == list(range(len(perm))) else NoMatch("perm is not the identity")


@dataclass(kw_only=True)
class _TransposePairMatch(Match):
    inner: Node
    perm: list[int] | None  # the composed perm; None when the pair cancels


class TransposePair(_TypedRule):
    name = "transpose_pair"
    root_ops = ("Transpose",)

    def match(self, graph: Graph, node: Node) -> Match | str:
        inner = producer_op(graph, node.inputs[0], "Transpose")
        if inner is None:
            return NoMatch("input is not a Transpose")
        x = inner.inputs[0]
        rank = self.rank(x)
        p1, p2 = _perm(inner, rank), _perm(node, rank)
        if p1 is None or p2 is None or len(p1) != len(p2):
            return "no perm and unknown rank"
        composed = [p1[i] for i in p2]
        if composed == list(range(len(composed))):
            why = _bypass_refusal(graph, node.outputs[0], x)
            return why or _TransposePairMatch(node, inner=inner, perm=None)
        if sole_consumer(graph, inner.outputs[0]) is not node:
            return "inner Transpose has other readers and the pair does not cancel"
        return _TransposePairMatch(node, inner=inner, perm=composed)

    def rewrite(self, graph: Graph, match: _TransposePairMatch) -> None:
        node, inner = match.node, match.inner
        if match.perm is None:
            _bypass(graph, node.outputs[0], inner.inputs[0], [node, inner])
            return
        graph.set_input(node, 0, inner.inputs[0])
        node.set_attr("perm", match.perm)
        remove_dead(graph, [inner])


@dataclass(kw_only=True)
class _InverseMatch(Match):
    inner: Node  # the node the matched one undoes: both go, readers read the inner one's input


class SqueezeUnsqueeze(_TypedRule):
    """Unsqueeze(Squeeze(x, a), a) -> x."""

    name = "squeeze_unsqueeze"
    root_ops = ("Unsqueeze",)

    def match(self, graph: Graph, node: Node) -> Match | str:
        inner = producer_op(graph, node.inputs[0], "Squeeze")
        if inner is None:
            return NoMatch("input is not a Squeeze")
        x = inner.inputs[0]
        dims = self.types.dims(x)
        rank = None if dims is None else len(dims)
        squeezed, unsqueezed = _axes(graph, inner), _axes(graph, node)
        if squeezed == "unknown" or unsqueezed in ("unknown", None):
            return NoMatch("axes are not constant")
        if squeezed is None:  # every size-1 dim: only known when all dims are static
            if dims is None or None in dims:
                return "Squeeze without axes on a tensor with non-static dims"
            squeezed = [i for i, d in enumerate(dims) if d == 1]
        a, b = _normalized(squeezed, rank), _normalized(unsqueezed, rank)
        if a is None or b is None:
            return "negative axes and unknown rank"
        if a != b:
            return NoMatch("axes differ")
        return _bypass_refusal(graph, node.outputs[0], x) or _InverseMatch(node, inner=inner)

    def rewrite(self, graph: Graph, match: _InverseMatch) -> None:
        _bypass(graph, match.node.outputs[0], match.inner.inputs[0], [match.node, match.inner])


class UnsqueezeSqueeze(_TypedRule):
    """Squeeze(Unsqueeze(x, a), a) -> x."""

    name = "unsqueeze_squeeze"
    root_ops = ("Squeeze",)

    def match(self, graph: Graph, node: Node) -> Match | str:
        inner = producer_op(graph, node.inputs[0], "Unsqueeze")
        if inner is None:
            return NoMatch("input is not an Unsqueeze")
        x = inner.inputs[0]
        unsqueezed, squeezed = _axes(graph, inner), _axes(graph, node)
        if unsqueezed in ("unknown", None) or squeezed == "unknown":
            return NoMatch("axes are not constant")
        dims = self.types.dims(x)
        rank = None if dims is None else len(dims) + len(unsqueezed)  # rank of the middle tensor
        if squeezed is None:  # removes the inserted 1s, and any size-1 dim of x too
            if dims is None or None in dims or 1 in dims:
                return "Squeeze without axes and x may have size-1 dims"
            squeezed = list(unsqueezed)
        a, b = _normalized(unsqueezed, rank), _normalized(squeezed, rank)
        if a is None or b is None:
            return "negative axes and unknown rank"
        if a != b:
            return NoMatch("axes differ")
        return _bypass_refusal(graph, node.outputs[0], x) or _InverseMatch(node, inner=inner)

    def rewrite(self, graph: Graph, match: _InverseMatch) -> None:
        _bypass(graph, match.node.outputs[0], match.inner.inputs[0], [match.node, match.inner])


@dataclass(kw_only=True)
class _ReshapeChainMatch(Match):
    inner: Node
    shape: np.ndarray | None  # a new target shape (its 0 entries resolved); None: the target stays


def _without_copies(target: np.ndarray, middle: tuple | None, copied: list[int]) -> np.ndarray | str:
    """``target`` with its 0 entries (copies of the middle tensor's dims) replaced by those dims, so that
    it applies to the chain's input; or why a copied dim cannot be written without the middle tensor."""
    if middle is None or any(i >= len(middle) for i in copied):
        return "a 0 entry copies a non-static dim of the middle tensor"
    target = target.copy()
    dynamic = [i for i in copied if middle[i] is None]
    if dynamic:
        # One copied dynamic dim m_i can be written as -1 when everything else is static and the
        # other entries multiply to the product of the middle tensor's other dims: then
        # -1 = |x| / prod(others) = m_i · prod(middle others) / prod(others) = m_i.
        others = [int(t) if t != 0 else middle[i] for i, t in enumerate(target) if i != dynamic[0]]
        middle_others = [d for i, d in enumerate(middle) if i != dynamic[0]]
        if len(dynamic) > 1 or -1 in others or None in others or None in middle_others \
                or 0 in others or np.prod(others, dtype=np.int64) != np.prod(middle_others, dtype=np.int64):
            return "a 0 entry copies a non-static dim of the middle tensor"
        target[dynamic[0]] = -1
    for i in copied:
        if middle[i] is not None:
            target[i] = middle[i]
    return target


class ReshapeChain(_TypedRule):
    """Reshape(Reshape(x, s1) or Flatten(x), s2) -> Reshape(x, s2)."""

    name = "reshape_chain"
    root_ops = ("Reshape",)

    def match(self, graph: Graph, node: Node) -> Match | str:
        inner = producer_op(graph, node.inputs[0], "Reshape", "Flatten")
        if inner is None:
            return NoMatch("input is not a Reshape or Flatten")
        target = const_input(graph, node, 1)
        if target is None:
            return NoMatch("target shape is not constant")
        target = target.astype(np.int64)
        copied = [i for i, s in enumerate(target) if s == 0] if not node.attr("allowzero", 0) else []
        if not copied:
            return _ReshapeChainMatch(node, inner=inner, shape=None)
        resolved = _without_copies(target, self.types.dims(inner.outputs[0]), copied)
        if isinstance(resolved, str):
            return resolved
        return _ReshapeChainMatch(node, inner=inner, shape=resolved)

    def rewrite(self, graph: Graph, match: _ReshapeChainMatch) -> None:
        node, inner = match.node, match.inner
        graph.set_input(node, 0, inner.inputs[0])
        if match.shape is not None:
            old = node.inputs[1]
            graph.set_input(node, 1, graph.add_initializer(match.shape, old.name))
            if old.name in graph.initializers and not graph.uses(old) and not graph.is_graph_output(old) \
                    and not graph.is_graph_input(old):
                graph.remove_initializer(old)
        remove_dead(graph, [inner])


def _changed_dim(target: list[int], dims: tuple, allowzero: bool) -> str | None:
    """Why a Reshape to ``target`` may change a dim of ``dims`` (-1 is checked by the caller), or None."""
    for s, d in zip(target, dims):
        if s == -1 or (s == 0 and not allowzero) or (d is not None and s == d):
            continue
        return NoMatch("a dim changes") if d is not None else "a target dim meets a non-static dim"
    return None


class NoopReshape(_NoOp):
    name = "noop_reshape"
    root_ops = ("Reshape",)

    def why_not(self, graph: Graph, node: Node) -> str | None:
        found = self.target_and_dims(graph, node)
        if isinstance(found, str):
            return found
        target, dims = found
        if len(target) != len(dims):
            return NoMatch("rank changes")
        why = _changed_dim(target, dims, bool(node.attr("allowzero", 0)))
        if why is not None:
            return why
        inferred = [i for i, s in enumerate(target) if s == -1]
        if inferred:
            others = [d for i, d in enumerate(dims) if i != inferred[0]]
            if len(inferred) > 1 or None in others or 0 in others:
                return "-1 does not resolve to the input's dim for sure"
        return None


class NoopCast(_NoOp):
    name = "noop_cast"
    root_ops = ("Cast", "CastLike")

    def why_not(self, graph: Graph, node: Node) -> str | None:
        have = self.types.dtype(node.inputs[0])
        if node.op_type == "Cast":
            want = node.attr("to")
        else:
            want = self.types.dtype(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if have is None or want is None:
            return "element type unknown"
        return None if have == want else NoMatch("changes the element type")


class NoopSlice(_NoOp):
    name = "noop_slice"
    root_ops = ("Slice",)

    def why_not(self, graph: Graph, node: Node) -> str | None:
        bounds = slice_bounds(node, graph)
        if bounds is None:
            return NoMatch("bounds are not constant")
        starts, ends, axes, steps = bounds
        dims = self.types.dims(node.inputs[0])
        axes = list(range(len(starts))) if axes is None else axes
        for start, end, axis, step in zip(starts, ends, axes, steps):
            if step != 1:
                return NoMatch("a step is not 1")
            if axis < 0:
                if dims is None:
                    return "negative axis and unknown rank"
                axis += len(dims)
            dim = dims[axis] if dims is not None and 0 <= axis < len(dims) else None
            if dim is None:
                if start != 0 or end < INT64_MAX:
                    return "bounds meet a non-static dim"
                continue
            if min(max(start + dim if start < 0 else start, 0), dim) != 0 \
                    or min(max(end + dim if end < 0 else end, 0), dim) != dim:
                return NoMatch("takes part of a dim")
        return None


class NoopExpand(_NoOp):
    name = "noop_expand"
    root_ops = ("Expand",)

    def why_not(self, graph: Graph, node: Node) -> str | None:
        found = self.target_and_dims(graph, node)
        return found if isinstance(found, str) else _broadcast_refusal(*found)


def _broadcast_refusal(other: list[int], dims: tuple[int | None, ...]) -> str | None:
    """Why broadcasting ``x`` (``dims``) against a shape ``other`` could change ``x``'s shape, or None."""
    if len(other) > len(dims):
        return NoMatch("broadcast raises the rank")
    for s, d in zip(reversed(other), reversed(dims)):
        if s != 1 and d is None:
            return "broadcast meets a non-static dim"
        if s != 1 and s != d:
            return NoMatch("broadcast changes a dim")
    return None


class NoopPad(_NoOp):
    name = "noop_pad"
    root_ops = ("Pad",)

    def why_not(self, graph: Graph, node: Node) -> str | None:
        pads = node.attr("pads") if "pads" in node.attrs else const_input(graph, node, 1)
        if pads is None:
            return NoMatch("pads are not constant")
        return None if not np.any(np.asarray(pads)) else NoMatch("pads are not all zero")


class SingleConcat(_NoOp):
    name = "single_concat"
    root_ops = ("Concat",)

    def why_not(self, graph: Graph, node: Node) -> str | None:
        return None if len(node.inputs) == 1 else NoMatch("several inputs")


class SingleSplit(_NoOp):
    name = "single_split"
    root_ops = ("Split",)

    def why_not(self, graph: Graph, node: Node) -> str | None:
        return None if len(node.outputs) == 1 else NoMatch("several outputs")


@dataclass(kw_only=True)
class _Bypassed(Match):
    x: Value  # what the matched node's output equals


class NeutralElement(_TypedRule):
    """x*1, 1*x, x+0, 0+x, x-0, x/1 -> x."""

    name = "neutral_element"
    root_ops = ("Mul", "Add", "Sub", "Div")
    _NEUTRAL = {"Mul": 1, "Add": 0, "Sub": 0, "Div": 1}

    def match(self, graph: Graph, node: Node) -> Match | str:
        if len(node.inputs) != 2:
            return NoMatch("not two inputs")
        slots = (1, 0) if node.op_type in ("Mul", "Add") else (1,)  # which operand may be the constant
        neutral = self._NEUTRAL[node.op_type]
        why: str = NoMatch("no neutral constant operand")
        for slot in slots:
            const = const_input(graph, node, slot)
            if const is None or const.dtype == object or not np.all(const == neutral):
                continue
            x = node.inputs[1 - slot]
            if const.ndim > 0:
                dims = self.types.dims(x)
                if dims is None:
                    why = "rank of the other operand unknown"
                    continue
                why = _broadcast_refusal(list(const.shape), dims)
                if why is not None:
                    continue
            x_type = self.types.dtype(x)
            if x_type is not None and x_type != self.types.dtype(node.inputs[slot]):
                why = "element types differ"  # not valid ONNX; never guess what the output type is
                continue
            why = _bypass_refusal(graph, node.outputs[0], x)
            if why is None:
                return _Bypassed(node, x=x)
        return why

    def rewrite(self, graph: Graph, match: _Bypassed) -> None:
        _bypass(graph, match.node.outputs[0], match.x, [match.node])


# ---------------------------------------------------------------------------------------------
# shape tensors computed from Shape: evaluated symbolically

# One entry of a 1-D shape tensor: a static int, or the set of names a dynamic dim is known by
# (``("dim", value, index)`` for "dim ``index`` of ``value``" and ``("sym", dim_param)``).
Entry = int | frozenset
_MAX_DEPTH = 12


def _dim_keys(types: ShapeView, value: Value, index: int) -> Entry | None:
    """Dim ``index`` of ``value``: its static size, or the names it is known by; None if out of range."""
    symbols = types.symbols(value)
    if symbols is None or not 0 <= index < len(symbols):
        return None
    d = symbols[index]
    if isinstance(d, int):
        return d
    keys = {("dim", value, index)}
    if isinstance(d, str):
        keys.add(("sym", d))
    return frozenset(keys)


def shape_entries(graph: Graph, types: ShapeView, value: Value | None,
                  depth: int = 0) -> tuple[list[Entry], bool] | None:
    """Evaluate an int64 shape tensor built from ``Shape`` (Gather/Slice/Unsqueeze/Squeeze/Concat of it
    and constants) into entries; returns ``(entries, is_scalar)`` or None when it cannot be followed.

    ``Shape(t)[i]`` is dim ``i`` of ``t``: a static size, or a symbol that stands for that dim.
    """
    if value is None or depth > _MAX_DEPTH:
        return None
    const = constant_value(graph, value)
    if const is not None:
        if const.dtype not in (np.int64, np.int32) or const.ndim > 1:
            return None
        return [int(v) for v in const.reshape(-1)], const.ndim == 0
    node = graph.producer(value)
    if node is None or node.domain not in ("", "ai.onnx") or node.outputs[0] is not value:
        return None
    follow = _SHAPE_OPS.get(node.op_type)
    return None if follow is None else follow(graph, types, node, depth)


_Entries = tuple[list[Entry], bool]


def _entries_of_shape(graph: Graph, types: ShapeView, node: Node, depth: int) -> _Entries | None:
    symbols = types.symbols(node.inputs[0])
    if symbols is None:
        return None
    rank = len(symbols)

    def clamp(i: int) -> int:
        return min(max(i + rank if i < 0 else i, 0), rank)

    start, end = clamp(node.attr("start", 0)), clamp(node.attr("end", rank))
    entries = [_dim_keys(types, node.inputs[0], i) for i in range(start, end)]
    return entries, False  # type: ignore[return-value]


def _entries_of_identity(graph: Graph, types: ShapeView, node: Node, depth: int) -> _Entries | None:
    return shape_entries(graph, types, node.inputs[0], depth + 1)


def _entries_of_cast(graph: Graph, types: ShapeView, node: Node, depth: int) -> _Entries | None:
    inner = shape_entries(graph, types, node.inputs[0], depth + 1)
    src = types.dtype(node.inputs[0])
    # int32 <-> int64 keeps every dim (dims are < 2**31 in practice, but only int64 -> int64 is exact)
    return inner if inner is not None and node.attr("to") == src == TensorProto.INT64 else None


def _entries_of_gather(graph: Graph, types: ShapeView, node: Node, depth: int) -> _Entries | None:
    if node.attr("axis", 0) != 0:
        return None
    data = shape_entries(graph, types, node.inputs[0], depth + 1)
    idx = const_input(graph, node, 1)
    if data is None or data[1] or idx is None or idx.ndim > 1 or not np.issubdtype(idx.dtype, np.integer):
        return None
    n = len(data[0])
    picked = []
    for i in idx.reshape(-1).tolist():
        if not -n <= i < n:
            return None
        picked.append(data[0][i])
    return picked, idx.ndim == 0


def _entries_of_slice(graph: Graph, types: ShapeView, node: Node, depth: int) -> _Entries | None:
    data = shape_entries(graph, types, node.inputs[0], depth + 1)
    bounds = slice_bounds(node, graph)
    if data is None or data[1] or bounds is None:
        return None
    starts, ends, axes, steps = bounds
    if len(starts) != 1 or axes not in (None, [0], [-1]) or steps[0] != 1:
        return None
    return data[0][starts[0]:ends[0]], False  # ONNX clamps like Python slicing for step 1


def _entries_of_unsqueeze_or_squeeze(graph: Graph, types: ShapeView, node: Node, depth: int) -> _Entries | None:
    data = shape_entries(graph, types, node.inputs[0], depth + 1)
    axes = _axes(graph, node)
    if data is None or axes in ("unknown", None) or axes not in ([0], [-1]):
        return None
    entries, scalar = data
    if node.op_type == "Unsqueeze":
        return (entries, False) if scalar else None
    return (entries, True) if not scalar and len(entries) == 1 else None


def _entries_of_concat(graph: Graph, types: ShapeView, node: Node, depth: int) -> _Entries | None:
    if node.attr("axis") not in (0, -1):
        return None
    out: list[Entry] = []
    for x in node.inputs:
        part = shape_entries(graph, types, x, depth + 1)
        if part is None or part[1]:
            return None
        out += part[0]
    return out, False


_SHAPE_OPS = {"Shape": _entries_of_shape, "Identity": _entries_of_identity, "Cast": _entries_of_cast,
              "Gather": _entries_of_gather, "Slice": _entries_of_slice,
              "Unsqueeze": _entries_of_unsqueeze_or_squeeze, "Squeeze": _entries_of_unsqueeze_or_squeeze,
              "Concat": _entries_of_concat}


@dataclass(kw_only=True)
class _NewTarget(Match):
    shape: np.ndarray  # the constant target shape


class ReshapeShapeTarget(_TypedRule):
    """Reshape(x, Concat(Shape-derived dims, constants)) -> Reshape(x, constant).

    The target is evaluated symbolically (:func:`shape_entries`). An entry that is dim ``k`` of ``x``
    itself (the same tensor and index, or the same ``dim_param``) at position ``k`` becomes ``0``, which
    with ``allowzero = 0`` copies exactly that dim. If one dynamic entry is left, it becomes ``-1`` when the
    element count proves it: every other entry is static, and ``x`` has static dims whose product equals
    theirs plus one dynamic dim known by the same name, so ``-1 = |x| / prod(others)`` is that dim
    (even when it is 0, since the others are non-zero). Refused with ``allowzero = 1`` (0 would mean an
    empty dim) and when an entry cannot be proved.
    """

    name = "reshape_shape_target"
    root_ops = ("Reshape",)

    def match(self, graph: Graph, node: Node) -> Match | str:
        if len(node.inputs) < 2 or const_input(graph, node, 1) is not None:
            return NoMatch("target shape is constant")
        evaluated = shape_entries(graph, self.types, node.inputs[1])
        if evaluated is None or evaluated[1]:
            return NoMatch("target is not built from Shape and constants")
        if node.attr("allowzero", 0):
            return "allowzero = 1: a copied dim cannot be written as 0"
        entries = evaluated[0]
        x = node.inputs[0]
        symbols = self.types.symbols(x)
        target = self._copied(x, symbols, entries)
        open_ = [k for k, t in enumerate(target) if t is None]
        if len(open_) > 1:
            return "more than one target dim is not a dim of the input"
        if open_:
            why = self._inferred_dim_refusal(x, symbols, target, entries, open_[0])
            if why:
                return why
            target[open_[0]] = -1
        if target.count(-1) > 1:
            return "more than one -1"
        return _NewTarget(node, shape=np.array(target, np.int64))

    def _copied(self, x: Value, symbols: tuple | None, entries: list[Entry]) -> list[int | None]:
        """The target with static entries kept, dim ``k`` of ``x`` at position ``k`` as 0 (copied), and
        None where an entry is neither."""
        rank = None if symbols is None else len(symbols)
        target: list[int | None] = []
        for k, e in enumerate(entries):
            if isinstance(e, int):
                target.append(e)
                continue
            mine = _dim_keys(self.types, x, k) if rank is not None and k < rank else None
            target.append(0 if isinstance(mine, frozenset) and mine & e else None)
        return target

    def _inferred_dim_refusal(self, x: Value, symbols: tuple | None, target: list[int | None],
                              entries: list[Entry], k: int) -> str | None:
        """Why entry ``k`` cannot be written as -1 (the element count must prove it is x's one dynamic dim)."""
        if -1 in target or symbols is None:
            return "a target dim is not a dim of the input"
        dynamic = [i for i, d in enumerate(symbols) if not isinstance(d, int)]
        if len(dynamic) != 1 or not (_dim_keys(self.types, x, dynamic[0]) & entries[k]):  # type: ignore[operator]
            return "a target dim is not a dim of the input"
        others = [symbols[i] if t == 0 else t for i, t in enumerate(target) if i != k]
        if any(not isinstance(o, int) or o <= 0 for o in others):
            return "a target dim is not a dim of the input"
        have = int(np.prod([d for d in symbols if isinstance(d, int)], dtype=np.int64))
        if have != int(np.prod(others, dtype=np.int64)):
            return "element count does not prove the inferred dim"
        return None

    def rewrite(self, graph: Graph, match: Match) -> None:
        node = match.node
        old = node.inputs[1]
        graph.set_input(node, 1, graph.add_initializer(match.shape, f"{node.name or 'Reshape'}_shape"))
        remove_dead(graph, _producers(graph, old))


def _producers(graph: Graph, value: Value) -> list[Node]:
    """The nodes that compute ``value`` (within :data:`_MAX_DEPTH` steps), for removal once unread."""
    out: list[Node] = []
    frontier = [value]
    for _ in range(_MAX_DEPTH + 1):
        nxt = []
        for v in frontier:
            p = graph.producer(v) if v is not None else None
            if p is not None and p not in out and not p.subgraphs:
                out.append(p)
                nxt += list(p.inputs)
        frontier = nxt
    return out


def _equal_entries(entries: list[Entry], k: np.ndarray) -> list[bool] | str:
    """``entries[i] == k[i]`` decided statically (a dim is never negative), or why it cannot be."""
    take: list[bool] = []
    for e, ki in zip(entries, k):
        if isinstance(e, int):
            take.append(e == int(ki))
        elif int(ki) < 0:
            take.append(False)  # a dim is never negative
        else:
            return "a comparison depends on a dynamic dim"
    return take


@dataclass(kw_only=True)
class _PiecesMatch(Match):
    pieces: list[Value | np.ndarray]  # the new Concat's inputs: kept pieces, or constant replacements


class ShapeWhereEqual(_TypedRule):
    """``Where(Equal(s, k), a, s)`` on a shape tensor ``s = Concat(p_1, …, p_m)`` -> ``Concat`` of the pieces and
    of constant slices of ``a``, when every comparison is decided statically.

    This is how exporters write ``x.expand(B, -1, -1)``: ``s = [B, -1, -1]``, and ``-1`` entries are replaced by
    1. An entry that is a static int compares as that int; an entry that is a dim of a tensor is ``>= 0``,
    so it never equals a negative ``k[i]``. Each piece must be kept or replaced as a whole. The result is the
    same int64 vector, and onnx's shape inference can follow a ``Concat`` (it cannot follow ``Where``), so
    the shape of what reads it becomes known.
    """

    name = "shape_where_equal"
    root_ops = ("Where",)

    def match(self, graph: Graph, node: Node) -> Match | str:
        if len(node.inputs) != 3:
            return NoMatch("not a Where")
        cond, a, s = node.inputs
        eq = producer_op(graph, cond, "Equal")
        concat = producer_op(graph, s, "Concat")
        if eq is None or concat is None or s not in eq.inputs or node.inputs[0] is s:
            return NoMatch("not Where(Equal(s, k), a, s) on a Concat")
        k = const_input(graph, eq, 1 if eq.inputs[0] is s else 0)
        a_const = constant_value(graph, a)
        entries = shape_entries(graph, self.types, s)
        if k is None or a_const is None or entries is None or entries[1]:
            return NoMatch("k or a not constant, or s not a shape tensor")
        entries = entries[0]
        n = len(entries)
        if k.ndim > 1 or a_const.ndim > 1 or k.size not in (1, n) or a_const.size not in (1, n) \
                or a_const.dtype != np.int64:
            return "k or a does not broadcast along s"
        k_b = np.broadcast_to(k.reshape(-1), (n,))
        a_b = np.broadcast_to(a_const.reshape(-1), (n,))
        take = _equal_entries(entries, k_b)
        if isinstance(take, str):
            return take
        pieces = self._pieces(graph, concat, take, a_b)
        if isinstance(pieces, str):
            return pieces
        return _PiecesMatch(node, pieces=pieces)

    def _pieces(self, graph: Graph, concat: Node, take: list[bool],
                a_b: np.ndarray) -> list[Value | np.ndarray] | str:
        """The new Concat's inputs: each piece of ``s`` kept, or replaced as a whole by its slice of ``a``."""
        pieces: list[Value | np.ndarray] = []
        pos = 0
        for piece in concat.inputs:
            part = shape_entries(graph, self.types, piece)
            if part is None or part[1]:
                return "a piece of s is not a 1-D shape tensor"
            size = len(part[0])
            chosen = take[pos:pos + size]
            if all(chosen):
                pieces.append(np.array(a_b[pos:pos + size], np.int64))
            elif not any(chosen):
                pieces.append(piece)
            else:
                return "a piece of s is partly replaced"
            pos += size
        return pieces

    def rewrite(self, graph: Graph, match: _PiecesMatch) -> None:
        node = match.node
        hint = node.name or "Where"
        inputs = [p if isinstance(p, Value) else graph.add_initializer(p, f"{hint}_piece") for p in match.pieces]
        new = graph.add_node("Concat", inputs, [f"{hint}_shape"], {"axis": 0}, name=f"{hint}_shape", anchor=node)
        new.outputs[0].type = node.outputs[0].type
        graph.replace_all_uses(node.outputs[0], new.outputs[0])
        remove_dead(graph, [node, *_producers(graph, node.inputs[0])])


def rules(types: ShapeView) -> list[Rule]:
    """The rules of ``simplify``, no-ops before pairs on the same op."""
    return [cls(types) for cls in (NoopTranspose, TransposePair, SqueezeUnsqueeze, UnsqueezeSqueeze, NoopReshape,
                                   ReshapeChain, NoopCast, NoopSlice, NoopExpand, NoopPad, SingleConcat, SingleSplit,
                                   NeutralElement, ReshapeShapeTarget, ShapeWhereEqual)]


@register
class Simplify(RulePass):
    name = "simplify"
    summary = "remove shape no-ops (same-type Cast, whole Slice, x*1...) and cancel Transpose/Squeeze/Reshape pairs"

    def rules(self, model: Model, ctx: PassContext) -> list[Rule]:
        return rules(ShapeView(model))
