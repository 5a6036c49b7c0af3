"""Shape-op simplification: no-ops removed, inverse pairs cancelled (pass ``simplify``, lossless).

Every rule below either proves ``y = x`` (then readers of ``y`` read ``x`` and the node goes) or
rewrites a pair of nodes into one that computes the same tensor. A rule acts only on what is known for
sure: constant operands (initializers or ``Constant`` nodes that are not overridable inputs) and element
types and dims that are static, from onnx shape inference or the IR (see
:class:`graphopt.passes.cleanup.TypeTable`). A symbolic dim is never assumed to be any value.

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
    when static, else the rule refuses. ``-1`` is inferred from the element count, which is unchanged.

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

from typing import Any

import numpy as np

from graphopt.ir import Graph, Model, Node, Value
from graphopt.manager import Pass, PassContext, PassResult, register
from graphopt.passes.cleanup import TypeTable, constant_of, slice_bounds
from graphopt.rewrite import Match, Rule, apply_rules, producer_op, remove_dead, sole_consumer

INT64_MAX = 2**63 - 1


class NoMatch(str):
    """A reason meaning "the pattern is absent" (a Transpose that permutes), not "refused for safety".

    The rule engine counts both; :class:`Simplify` reports only the refusals, so ``left_alone`` answers
    "why was this no-op kept?" instead of listing every ordinary node.
    """


def const_input(graph: Graph, node: Node, slot: int) -> np.ndarray | None:
    """The constant at input ``slot`` (see :func:`graphopt.passes.cleanup.constant_of`), or None."""
    return constant_of(graph, node.inputs[slot]) if slot < len(node.inputs) else None


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
    def __init__(self, types: TypeTable) -> None:
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
            return why or Match(node, nodes={"inner": inner}, extra={"identity": True})
        if sole_consumer(graph, inner.outputs[0]) is not node:
            return "inner Transpose has other readers and the pair does not cancel"
        return Match(node, nodes={"inner": inner}, extra={"identity": False, "perm": composed})

    def rewrite(self, graph: Graph, match: Match) -> None:
        node, inner = match.node, match.nodes["inner"]
        if match.extra["identity"]:
            _bypass(graph, node.outputs[0], inner.inputs[0], [node, inner])
            return
        graph.set_input(node, 0, inner.inputs[0])
        node.set_attr("perm", match.extra["perm"])
        remove_dead(graph, [inner])


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
        return _bypass_refusal(graph, node.outputs[0], x) or Match(node, nodes={"inner": inner})

    def rewrite(self, graph: Graph, match: Match) -> None:
        _bypass(graph, match.node.outputs[0], match.nodes["inner"].inputs[0], match.all_nodes())


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
        return _bypass_refusal(graph, node.outputs[0], x) or Match(node, nodes={"inner": inner})

    def rewrite(self, graph: Graph, match: Match) -> None:
        _bypass(graph, match.node.outputs[0], match.nodes["inner"].inputs[0], match.all_nodes())


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
        if copied:
            middle = self.types.dims(inner.outputs[0])
            if middle is None or any(i >= len(middle) or middle[i] is None for i in copied):
                return "a 0 entry copies a non-static dim of the middle tensor"
            target = target.copy()
            for i in copied:
                target[i] = middle[i]
        return Match(node, nodes={"inner": inner}, arrays={"shape": target}, extra={"new_shape": bool(copied)})

    def rewrite(self, graph: Graph, match: Match) -> None:
        node, inner = match.node, match.nodes["inner"]
        graph.set_input(node, 0, inner.inputs[0])
        if match.extra["new_shape"]:
            old = node.inputs[1]
            graph.set_input(node, 1, graph.add_initializer(match.arrays["shape"], old.name))
            if old.name in graph.initializers and not graph.uses(old) and not graph.is_graph_output(old) \
                    and not graph.is_graph_input(old):
                graph.remove_initializer(old)
        remove_dead(graph, [inner])


class NoopReshape(_NoOp):
    name = "noop_reshape"
    root_ops = ("Reshape",)

    def why_not(self, graph: Graph, node: Node) -> str | None:
        target = const_input(graph, node, 1)
        if target is None:
            return NoMatch("target shape is not constant")
        dims = self.types.dims(node.inputs[0])
        if dims is None:
            return "input rank unknown"
        target = [int(s) for s in target.reshape(-1)]
        if len(target) != len(dims):
            return NoMatch("rank changes")
        allowzero = bool(node.attr("allowzero", 0))
        inferred = [i for i, s in enumerate(target) if s == -1]
        for s, d in zip(target, dims):
            if s == -1 or (s == 0 and not allowzero) or (d is not None and s == d):
                continue
            return NoMatch("a dim changes") if d is not None else "a target dim meets a non-static dim"
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
        target = const_input(graph, node, 1)
        if target is None:
            return NoMatch("target shape is not constant")
        dims = self.types.dims(node.inputs[0])
        if dims is None:
            return "input rank unknown"
        return _broadcast_refusal([int(s) for s in target.reshape(-1)], dims)


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
                return Match(node, values={"x": x})
        return why

    def rewrite(self, graph: Graph, match: Match) -> None:
        _bypass(graph, match.node.outputs[0], match.values["x"], [match.node])


def rules(types: TypeTable) -> list[Rule]:
    """The rules of ``simplify``, no-ops before pairs on the same op."""
    return [cls(types) for cls in (NoopTranspose, TransposePair, SqueezeUnsqueeze, UnsqueezeSqueeze, NoopReshape,
                                   ReshapeChain, NoopCast, NoopSlice, NoopExpand, NoopPad, SingleConcat, SingleSplit,
                                   NeutralElement)]


@register
class Simplify(Pass):
    name = "simplify"
    lossless = True
    summary = "remove shape no-ops (same-type Cast, whole Slice, x*1...) and cancel Transpose/Squeeze/Reshape pairs"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        stats = apply_rules(model, rules(TypeTable(model)))
        out: dict[str, Any] = {"rewrites": stats.total, **stats.to_dict()}
        absent = {(rule, reason) for rule, reasons in stats.refused.items() for reason in reasons
                  if isinstance(reason, NoMatch)}
        left = [e for e in out.pop("left_alone", []) if (e["rule"], e["reason"]) not in absent]
        if left:
            out["left_alone"] = left
        return PassResult(stats.total > 0, out)
