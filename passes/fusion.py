"""Decomposed normalisation and activation patterns -> their standard ONNX op (pass ``fuse_patterns``, lossless).

The pass also moves a constant ``Add`` into the pieces of a ``Concat`` when a piece absorbs it (below).

Exporters often write LayerNorm and GELU as chains of elementwise ops. onnxruntime recognises those
chains and runs each as one kernel (``LayerNormalization``, ``Gelu`` / ``BiasGelu``), but only when the
chain is intact: folding the GELU's ``0.5`` or the LayerNorm's ``γ`` into the next MatMul (which
``fold_affine`` would do, exactly) is lossless yet slower, because the fused kernel is lost. So this
module does two things:

* :func:`protected_role` tells other passes that a node belongs to such a chain (``fold_affine`` then
  leaves it alone and says why);
* the rules below replace a chain by the standard op when the model's opset has it.

``layer_norm`` (opset >= 17)
    ``d = x − ReduceMean(x, A)``; ``v = ReduceMean(d², A)`` (``d²`` as ``Pow(d, 2)`` or ``Mul(d, d)``);
    ``y = d / Sqrt(v + ε)``, optionally ``y·γ`` then ``+ β`` (constants), is
    ``LayerNormalization(x, γ, β, axis=a0, epsilon=ε)`` when ``A`` are the trailing axes ``a0 … r−1``
    (``keepdims = 1``). ``γ``/``β`` are broadcast to the normalised dims, which must be static (1 / 0 when
    absent). Exact up to float rounding (onnxruntime's kernel accumulates the variance differently).
    Refused: other axes, keepdims = 0, non-constant ``ε``/``γ``/``β``, an intermediate read elsewhere,
    non-float tensors.

``add_through_concat``
    ``Concat(x_1, …, x_n) + C`` with a constant ``C`` = ``Concat(x_1 + C_1, …, x_n + C_n)`` where ``C_i`` is
    ``C``'s slice for piece ``i`` along the concat axis (``C`` itself when its dim there is 1). Applied when
    some piece absorbs its slice exactly: a constant piece (the sum is folded), or ``Expand(k, s)``, which
    becomes ``Expand(k + C_i, s)`` (the broadcast shape is unchanged because ``C_i`` already broadcasts into
    the piece). Other pieces get their own ``Add`` (none when the slice is all zeros). Every element gets
    the same single addition as before: bit-identical. The transformer's ``[cls; patches] + pos_embed``
    is the case: the class token's position embedding folds into the token, and the Add shrinks by one
    row. It also keeps onnxruntime from fusing that Add into a broadcasting ``SkipLayerNormalization``
    (which it does once the shapes are known, and which measured 0.41 ms against 0.1 ms for Add + LN).
    Refused: ``C`` would enlarge the result by broadcasting, the Concat has other readers, piece sizes
    along the axis are not static (for a sliced ``C``), or no piece absorbs anything.

``gelu`` (opset >= 20)
    ``0.5·x·(1 + erf(x/√2))`` → ``Gelu(x)``, and ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` →
    ``Gelu(x, approximate="tanh")``, for any grouping of the three factors of the product and with
    ``x/√2`` written as ``x·(1/√2)``. Constants must match to float32 precision (relative 1e-6). Below
    opset 20 the chain is left as it is (no contrib ops are emitted), and it stays protected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from graphopt.passes.cleanup import constant_of
from onnx import TensorProto, helper

from graphopt.ir import Graph, Model, Node, Value
from graphopt.manager import Pass, PassContext, PassResult, register
from graphopt.rewrite import (
    Match,
    Rule,
    rules_result,
    is_float,
    is_op,
    remove_dead,
    sole_consumer,
)
from graphopt.shapes import TypeTable

_RTOL = 1e-6
_FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _opset(model: Model) -> int:
    return model.opset("") or 1


def _scalar(graph: Graph, value: Value | None) -> float | None:
    """The value of a constant holding one number (any shape of size 1), else None."""
    array = constant_of(graph, value) if value is not None else None
    if array is None or array.size != 1 or array.dtype.kind != "f":
        return None
    return float(array.reshape(()))


def _close(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= _RTOL * abs(b) + 1e-12


def _other(node: Node, value: Value) -> Value | None:
    """The input of a two-input node that is not ``value`` (None unless ``value`` is read exactly once)."""
    if len(node.inputs) != 2 or node.inputs[0] is node.inputs[1]:
        return None
    if node.inputs[0] is value:
        return node.inputs[1]
    return node.inputs[0] if node.inputs[1] is value else None


def _internal(graph: Graph, node: Node) -> bool:
    """The node's output is read by exactly one node and is not a graph output."""
    return sole_consumer(graph, node.outputs[0]) is not None


# ---------------------------------------------------------------------------------------------
# GELU


@dataclass
class Gelu:
    x: Value
    approximate: str
    root: Node
    nodes: list[Node] = field(default_factory=list)


def _factors(graph: Graph, root: Node) -> tuple[list[Value], list[Node]] | None:
    """Operands of a tree of Mul nodes under ``root`` whose inner nodes have no other reader (max 3)."""
    factors: list[Value] = []
    nodes = [root]

    def visit(value: Value, depth: int) -> None:
        p = graph.producer(value)
        if depth < 2 and is_op(p, "Mul") and len(p.inputs) == 2 and _internal(graph, p):
            nodes.append(p)
            for v in p.inputs:
                visit(v, depth + 1)
        else:
            factors.append(value)

    for v in root.inputs:
        visit(v, 1)
    return (factors, nodes) if len(factors) == 3 else None


def _scaled_by(graph: Graph, value: Value, factor: float) -> tuple[Value, Node] | None:
    """``value = x·factor`` (Mul by the constant, or Div by its inverse): returns ``(x, node)``."""
    p = graph.producer(value)
    if is_op(p, "Mul") and len(p.inputs) == 2:
        for i in (0, 1):
            if _close(_scalar(graph, p.inputs[1 - i]), factor):
                return p.inputs[i], p
    if is_op(p, "Div") and len(p.inputs) == 2 and _close(_scalar(graph, p.inputs[1]), 1.0 / factor):
        return p.inputs[0], p
    return None


def _one_plus(graph: Graph, value: Value, op: str) -> tuple[Value, list[Node]] | None:
    """``value = 1 + op(u)`` with the Add and ``op`` read once: returns ``(u, nodes)``."""
    add = graph.producer(value)
    if not is_op(add, "Add") or len(add.inputs) != 2 or not _internal(graph, add):
        return None
    for i in (0, 1):
        inner = graph.producer(add.inputs[i])
        if is_op(inner, op) and _close(_scalar(graph, add.inputs[1 - i]), 1.0) and _internal(graph, inner):
            return inner.inputs[0], [add, inner]
    return None


def _tanh_argument(graph: Graph, u: Value, x: Value) -> list[Node] | None:
    """``u = √(2/π)·(x + 0.044715·x³)``, with ``x³`` as ``Pow(x, 3)`` or ``x·x·x``: the nodes, or None."""
    scaled = _scaled_by(graph, u, math.sqrt(2.0 / math.pi))
    if scaled is None or not _internal(graph, scaled[1]):
        return None
    inner, scale_node = scaled
    add = graph.producer(inner)
    if not is_op(add, "Add") or not _internal(graph, add) or len(add.inputs) != 2:
        return None
    cube_term = _other(add, x)
    if cube_term is None:
        return None
    c = _scaled_by(graph, cube_term, 0.044715)
    if c is None or not _internal(graph, c[1]):
        return None
    cube, c_node = c
    p = graph.producer(cube)
    if p is None or not _internal(graph, p):
        return None
    if is_op(p, "Pow") and p.inputs[0] is x and _close(_scalar(graph, p.inputs[1]), 3.0):
        return [scale_node, add, c_node, p]
    if is_op(p, "Mul") and len(p.inputs) == 2:
        a, b = p.inputs
        q = graph.producer(b if a is x else a)
        if (a is x or b is x) and is_op(q, "Mul") and list(q.inputs) == [x, x] and _internal(graph, q):
            return [scale_node, add, c_node, p, q]
    return None


def match_gelu(graph: Graph, root: Node) -> Gelu | None:
    """The GELU (erf or tanh form) whose last Mul is ``root``, or None."""
    if not is_op(root, "Mul") or len(root.inputs) != 2:
        return None
    found = _factors(graph, root)
    if found is None:
        return None
    factors, muls = found
    half = [i for i, f in enumerate(factors) if _close(_scalar(graph, f), 0.5)]
    for h in half:
        rest = [f for i, f in enumerate(factors) if i != h]
        for xi in (0, 1):
            x, bracket = rest[xi], rest[1 - xi]
            for op in ("Erf", "Tanh"):
                inner = _one_plus(graph, bracket, op)
                if inner is None:
                    continue
                u, nodes = inner
                if op == "Erf":
                    scaled = _scaled_by(graph, u, 1.0 / math.sqrt(2.0))
                    if scaled is None or scaled[0] is not x or not _internal(graph, scaled[1]):
                        continue
                    return Gelu(x, "none", root, muls + nodes + [scaled[1]])
                extra = _tanh_argument(graph, u, x)
                if extra is not None:
                    return Gelu(x, "tanh", root, muls + nodes + extra)
    return None


# ---------------------------------------------------------------------------------------------
# LayerNorm


@dataclass
class LayerNorm:
    x: Value
    axes: list[int]
    epsilon: float
    div: Node
    out: Value
    nodes: list[Node]
    var_axes: list[int] = field(default_factory=list)
    scale: np.ndarray | None = None
    bias: np.ndarray | None = None


def _reduce_axes(graph: Graph, node: Node) -> list[int] | None:
    if node.attr("keepdims", 1) != 1:
        return None
    if "axes" in node.attrs:
        return [int(a) for a in node.attr("axes")]
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = constant_of(graph, node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    return None  # all axes (or noop_with_empty_axes): not a LayerNorm we rewrite


def match_layer_norm(graph: Graph, div: Node) -> LayerNorm | None:
    """The decomposed LayerNorm whose ``Div`` is ``div`` (with its γ Mul / β Add when present), or None."""
    if not is_op(div, "Div") or len(div.inputs) != 2:
        return None
    sub, sqrt = graph.producer(div.inputs[0]), graph.producer(div.inputs[1])
    if not is_op(sub, "Sub") or not is_op(sqrt, "Sqrt") or not _internal(graph, sqrt):
        return None
    x, mean = sub.inputs
    mean_node = graph.producer(mean)
    if not is_op(mean_node, "ReduceMean") or mean_node.inputs[0] is not x or not _internal(graph, mean_node):
        return None
    add_eps = graph.producer(sqrt.inputs[0])
    if not is_op(add_eps, "Add") or not _internal(graph, add_eps) or len(add_eps.inputs) != 2:
        return None
    var, eps = None, None
    for i in (0, 1):
        e = _scalar(graph, add_eps.inputs[1 - i])
        if e is not None:
            var, eps = add_eps.inputs[i], e
    var_node = graph.producer(var) if var is not None else None
    if not is_op(var_node, "ReduceMean") or not _internal(graph, var_node):
        return None
    sq = graph.producer(var_node.inputs[0])
    d = sub.outputs[0]
    if sq is None or not _internal(graph, sq):
        return None
    if not ((is_op(sq, "Pow") and sq.inputs[0] is d and _close(_scalar(graph, sq.inputs[1]), 2.0))
            or (is_op(sq, "Mul") and list(sq.inputs) == [d, d])):
        return None
    readers = {n for n, _ in graph.uses(d)}
    if readers != {sq, div} or graph.is_graph_output(d):
        return None
    axes1, axes2 = _reduce_axes(graph, mean_node), _reduce_axes(graph, var_node)
    if axes1 is None or axes2 is None or eps is None or eps < 0:
        return None
    nodes = [mean_node, sub, sq, var_node, add_eps, sqrt, div]
    ln = LayerNorm(x, axes1, eps, div, div.outputs[0], nodes, axes2)
    # optional affine tail: y·γ, then + β (constants)
    out = div.outputs[0]
    mul = sole_consumer(graph, out)
    if is_op(mul, "Mul"):
        other = _other(mul, out)
        gamma = constant_of(graph, other) if other is not None else None
        if gamma is not None and gamma.dtype.kind == "f":
            ln.scale, out = gamma, mul.outputs[0]
            ln.nodes.append(mul)
    add = sole_consumer(graph, out)
    if is_op(add, "Add"):
        other = _other(add, out)
        beta = constant_of(graph, other) if other is not None else None
        if beta is not None and beta.dtype.kind == "f":
            ln.bias, out = beta, add.outputs[0]
            ln.nodes.append(add)
    ln.out = out
    return ln


def protected_role(graph: Graph, node: Node) -> str | None:
    """Whether ``node`` is part of a decomposed GELU or LayerNorm that onnxruntime fuses into one kernel.

    Checked from the node outwards (a GELU's last Mul is at most four readers away from any of its
    nodes; a LayerNorm's γ/β at most two from its Div), so it costs a few lookups per call.
    """
    if node.op_type not in ("Mul", "Add", "Sub", "Div"):
        return None
    frontier, seen = [node], {node}
    for _ in range(5):
        nxt = []
        for n in frontier:
            if is_op(n, "Mul"):
                g = match_gelu(graph, n)
                if g is not None and node in g.nodes:
                    return "GELU"
            if is_op(n, "Div"):
                ln = match_layer_norm(graph, n)
                if ln is not None and node in ln.nodes:
                    return "LayerNorm"
            for v in n.outputs:
                for reader, _ in (graph.uses(v) if v is not None else []):
                    if reader not in seen:
                        seen.add(reader)
                        nxt.append(reader)
        frontier = nxt
    # a LayerNorm's β Add is two steps below its Div, upwards: look at the producers too
    for v in node.inputs:
        p = graph.producer(v) if v is not None else None
        for q in (p, graph.producer(p.inputs[0]) if p is not None and p.inputs else None):
            if is_op(q, "Div"):
                ln = match_layer_norm(graph, q)
                if ln is not None and node in ln.nodes:
                    return "LayerNorm"
    return None


# ---------------------------------------------------------------------------------------------
# rules


class _TypedRule(Rule):
    """A rule that reads dtypes and dims from the pass's :class:`TypeTable` (inferred once per run)."""

    def __init__(self, types: TypeTable) -> None:
        self.types = types


class GeluFusion(_TypedRule):
    name = "gelu"
    root_ops = ("Mul",)

    def match(self, graph: Graph, node: Node) -> Match | str | None:
        g = match_gelu(graph, node)
        if g is None:
            return None
        if not is_float(g.x) and self.types.dtype(g.x) not in _FLOATS:
            return "not a float tensor (or its type is unknown)"
        return Match(node, values={"x": g.x}, extra={"gelu": g})

    def rewrite(self, graph: Graph, match: Match) -> None:
        g: Gelu = match.extra["gelu"]
        y = g.root.outputs[0]
        attrs = {"approximate": "tanh"} if g.approximate == "tanh" else {}
        new = graph.add_node("Gelu", [g.x], [f"{g.root.name or 'Gelu'}_gelu"], attrs,
                             name=f"{g.root.name or 'Mul'}_gelu", anchor=g.root)
        new.outputs[0].type = y.type
        graph.replace_all_uses(y, new.outputs[0])
        remove_dead(graph, g.nodes)


class LayerNormFusion(_TypedRule):
    name = "layer_norm"
    root_ops = ("Div",)

    def match(self, graph: Graph, node: Node) -> Match | str | None:
        ln = match_layer_norm(graph, node)
        if ln is None:
            return None
        dims = self.types.dims(ln.x)
        dtype = self.types.dtype(ln.x)
        if dims is None:
            return "input rank unknown"
        rank = len(dims)
        axes = sorted(a + rank if a < 0 else a for a in ln.axes)
        other = sorted(a + rank if a < 0 else a for a in ln.var_axes)
        if axes != other or not axes or axes != list(range(axes[0], rank)):
            return "reduces over axes other than the trailing ones"
        norm = dims[axes[0]:]
        if any(d is None for d in norm):
            return "normalised dims are not static"
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype) if dtype else None
        if np_dtype is None or np.dtype(np_dtype).kind != "f":
            return "not a float tensor"
        arrays = {}
        for key, c, default in (("scale", ln.scale, 1.0), ("bias", ln.bias, 0.0)):
            if c is None:
                arrays[key] = np.full(norm, default, dtype=np_dtype)
                continue
            if c.ndim > rank or c.dtype != np_dtype:
                return f"{key} does not broadcast over the normalised dims only"
            lead = c.shape[:max(0, c.ndim - len(norm))]
            if any(s != 1 for s in lead):
                return f"{key} varies over a non-normalised axis"
            try:
                arrays[key] = np.ascontiguousarray(np.broadcast_to(c.reshape(c.shape[len(lead):]), norm))
            except ValueError:
                return f"{key} does not broadcast to the normalised dims"
        if graph.is_graph_output(ln.x) and ln.x is ln.out:
            return "input and output are the same value"
        return Match(node, extra={"ln": ln, "axis": axes[0] - rank, **arrays})

    def rewrite(self, graph: Graph, match: Match) -> None:
        ln: LayerNorm = match.extra["ln"]
        hint = match.node.name or "LayerNorm"
        scale = graph.add_initializer(match.extra["scale"], f"{hint}_scale")
        bias = graph.add_initializer(match.extra["bias"], f"{hint}_bias")
        new = graph.add_node("LayerNormalization", [ln.x, scale, bias], [f"{hint}_ln"],
                             {"axis": int(match.extra["axis"]), "epsilon": float(ln.epsilon)},
                             name=f"{hint}_ln", anchor=match.node)
        new.outputs[0].type = ln.out.type
        graph.replace_all_uses(ln.out, new.outputs[0])
        remove_dead(graph, ln.nodes)


class AddThroughConcat(_TypedRule):
    name = "add_through_concat"
    root_ops = ("Add",)

    def match(self, graph: Graph, node: Node) -> Match | str | None:
        if len(node.inputs) != 2 or node.inputs[0] is node.inputs[1]:
            return None
        for slot in (0, 1):
            c = constant_of(graph, node.inputs[slot])
            concat = graph.producer(node.inputs[1 - slot])
            if c is not None and is_op(concat, "Concat"):
                break
        else:
            return None
        if c.dtype.kind != "f" or sole_consumer(graph, concat.outputs[0]) is not node:
            return None
        out = self.types.symbols(concat.outputs[0])  # static where known, symbolic inference fills the rest
        if out is None or c.ndim > len(out):
            return "rank unknown or the constant has a higher rank"
        rank = len(out)
        axis = concat.attr("axis")
        axis = axis + rank if axis < 0 else axis
        cc = c.reshape((1,) * (rank - c.ndim) + c.shape)
        for dc, do in zip(cc.shape, out):
            if dc != 1 and dc != do:
                return "the constant would enlarge the result by broadcasting"
        slices: list[np.ndarray] = []
        if cc.shape[axis] == 1:
            slices = [cc] * len(concat.inputs)
        else:
            start = 0
            for piece in concat.inputs:
                dims = self.types.symbols(piece)
                if dims is None or len(dims) != rank or not isinstance(dims[axis], int):
                    return "piece sizes along the concat axis are not static"
                slices.append(np.take(cc, range(start, start + dims[axis]), axis=axis))
                start += dims[axis]
        absorbed = []
        for piece, ci in zip(concat.inputs, slices):
            k = constant_of(graph, piece)
            p = graph.producer(piece)
            if k is not None and k.dtype == c.dtype and np.broadcast_shapes(k.shape, ci.shape) == k.shape:
                absorbed.append("constant")
            elif is_op(p, "Expand") and sole_consumer(graph, piece) is concat and \
                    (kk := constant_of(graph, p.inputs[0])) is not None and kk.dtype == c.dtype:
                absorbed.append("expand")
            else:
                absorbed.append("")
        if not any(absorbed):
            return None
        return Match(node, nodes={"concat": concat}, extra={"slices": slices, "absorbed": absorbed})

    def rewrite(self, graph: Graph, match: Match) -> None:
        node, concat = match.node, match.nodes["concat"]
        hint = node.name or "Add"
        pieces: list[Value] = []
        for i, (piece, ci, how) in enumerate(zip(concat.inputs, match.extra["slices"], match.extra["absorbed"])):
            if how == "constant":
                k = constant_of(graph, piece)
                pieces.append(graph.add_initializer((k + ci).astype(k.dtype), f"{hint}_piece{i}"))
            elif how == "expand":
                expand = graph.producer(piece)
                k = constant_of(graph, expand.inputs[0])
                folded = graph.add_initializer((k + ci).astype(k.dtype), f"{hint}_piece{i}")
                graph.set_input(expand, 0, folded)
                pieces.append(piece)
            elif not np.any(ci):
                pieces.append(piece)
            else:
                add = graph.add_node("Add", [piece, graph.add_initializer(ci, f"{hint}_slice{i}")],
                                     [f"{hint}_piece{i}"], name=f"{hint}_{i}", anchor=node)
                pieces.append(add.outputs[0])
        new = graph.add_node("Concat", pieces, [f"{hint}_concat"], {"axis": concat.attr("axis")},
                             name=f"{concat.name or 'Concat'}_added", anchor=node)
        new.outputs[0].type = node.outputs[0].type
        graph.replace_all_uses(node.outputs[0], new.outputs[0])
        remove_dead(graph, [node, concat])


@register
class FusePatterns(Pass):
    name = "fuse_patterns"
    lossless = True
    summary = ("decomposed LayerNorm (opset >= 17) and GELU (opset >= 20) -> LayerNormalization / Gelu; "
               "Concat + constant -> Concat of pieces that absorb it")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opset = _opset(model)
        types = TypeTable(model)
        rules: list[Rule] = []  # LayerNormalization needs opset 17, Gelu opset 20
        if opset >= 17:
            rules.append(LayerNormFusion(types))
        if opset >= 20:
            rules.append(GeluFusion(types))
        rules.append(AddThroughConcat(types))
        return rules_result(model, rules)
