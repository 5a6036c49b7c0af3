"""Decomposed normalisation and activation patterns -> their standard ONNX op (pass ``fuse_patterns``, lossless).

The pass also moves a constant ``Add`` into the pieces of a ``Concat`` when a piece absorbs it (below).

Exporters often write LayerNorm and GELU as chains of elementwise ops. onnxruntime recognises those
chains and runs each as one kernel (``LayerNormalization``, ``Gelu`` / ``BiasGelu``), but only when the
chain is intact: folding the GELU's ``0.5`` or the LayerNorm's ``γ`` into the next MatMul (which
``fold_affine`` would do, exactly) is lossless yet slower, because the fused kernel is lost. So this
module does two things:

* :func:`graphopt.core.patterns.protected_role` tells other passes that a node belongs to such a
  chain (``fold_affine`` then leaves it alone and says why);
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
    (which it does once the shapes are known, and which is slower than Add + LN).
    Refused: ``C`` would enlarge the result by broadcasting, the Concat has other readers, piece sizes
    along the axis are not static (for a sliced ``C``), or no piece absorbs anything.

``gelu`` (opset >= 20)
    ``0.5·x·(1 + erf(x/√2))`` → ``Gelu(x)``, and ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` →
    ``Gelu(x, approximate="tanh")``, for any grouping of the three factors of the product and with
    ``x/√2`` written as ``x·(1/√2)``. Constants must match to float32 precision (relative 1e-6). Below
    opset 20 the chain is left as it is (no contrib ops are emitted), and it stays protected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from graphopt.core.ir import Graph, Model, Node, Value
from graphopt.core.manager import PassContext, register
from graphopt.core.ops import constant_value, is_float, is_op, remove_dead, sole_consumer
from graphopt.core.patterns import Gelu, LayerNorm, match_gelu, match_layer_norm
from graphopt.core.rewrite import Match, Rule, RulePass
from graphopt.core.shapes import ShapeView

_FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _opset(model: Model) -> int:
    return model.opset("") or 1


class _TypedRule(Rule):
    """A rule that reads dtypes and dims from the pass's :class:`ShapeView` (inferred once per run)."""

    def __init__(self, types: ShapeView) -> None:
        self.types = types


@dataclass(kw_only=True)
class _GeluMatch(Match):
    gelu: Gelu


class GeluFusion(_TypedRule):
    name = "gelu"
    root_ops = ("Mul",)

    def match(self, graph: Graph, node: Node) -> _GeluMatch | str | None:
        g = match_gelu(graph, node)
        if g is None:
            return None
        if not is_float(g.x) and self.types.dtype(g.x) not in _FLOATS:
            return "not a float tensor (or its type is unknown)"
        return _GeluMatch(node, gelu=g)

    def rewrite(self, graph: Graph, match: _GeluMatch) -> None:
        g = match.gelu
        y = g.root.outputs[0]
        attrs = {"approximate": "tanh"} if g.approximate == "tanh" else {}
        new = graph.add_node("Gelu", [g.x], [f"{g.root.name or 'Gelu'}_gelu"], attrs,
                             name=f"{g.root.name or 'Mul'}_gelu", anchor=g.root)
        new.outputs[0].type = y.type
        graph.replace_all_uses(y, new.outputs[0])
        remove_dead(graph, g.nodes)


@dataclass(kw_only=True)
class _LayerNormMatch(Match):
    ln: LayerNorm
    axis: int  # the first normalised axis, negative
    scale: np.ndarray  # over the normalised dims
    bias: np.ndarray


def _norm_param(key: str, c: np.ndarray | None, default: float, norm: list[int], rank: int,
                np_dtype: np.dtype) -> np.ndarray | str:
    """LayerNormalization's ``scale`` or ``bias`` over the normalised dims ``norm`` (``default`` when
    absent), or why the decomposed one's constant is not such a parameter."""
    if c is None:
        return np.full(norm, default, dtype=np_dtype)
    if c.ndim > rank or c.dtype != np_dtype:
        return f"{key} does not broadcast over the normalised dims only"
    lead = c.shape[:max(0, c.ndim - len(norm))]
    if any(s != 1 for s in lead):
        return f"{key} varies over a non-normalised axis"
    try:
        return np.ascontiguousarray(np.broadcast_to(c.reshape(c.shape[len(lead):]), norm))
    except ValueError:
        return f"{key} does not broadcast to the normalised dims"


class LayerNormFusion(_TypedRule):
    name = "layer_norm"
    root_ops = ("Div",)

    def match(self, graph: Graph, node: Node) -> _LayerNormMatch | str | None:
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
        scale = _norm_param("scale", ln.scale, 1.0, norm, rank, np_dtype)
        if isinstance(scale, str):
            return scale
        bias = _norm_param("bias", ln.bias, 0.0, norm, rank, np_dtype)
        if isinstance(bias, str):
            return bias
        if graph.is_graph_output(ln.x) and ln.x is ln.out:
            return "input and output are the same value"
        return _LayerNormMatch(node, ln=ln, axis=axes[0] - rank, scale=scale, bias=bias)

    def rewrite(self, graph: Graph, match: _LayerNormMatch) -> None:
        ln = match.ln
        hint = match.node.name or "LayerNorm"
        scale = graph.add_initializer(match.scale, f"{hint}_scale")
        bias = graph.add_initializer(match.bias, f"{hint}_bias")
        new = graph.add_node("LayerNormalization", [ln.x, scale, bias], [f"{hint}_ln"],
                             {"axis": int(match.axis), "epsilon": float(ln.epsilon)},
                             name=f"{hint}_ln", anchor=match.node)
        new.outputs[0].type = ln.out.type
        graph.replace_all_uses(ln.out, new.outputs[0])
        remove_dead(graph, ln.nodes)


@dataclass(kw_only=True)
class _ConcatAddMatch(Match):
    """``Add(Concat(p_1, …), c)``: ``c``'s slice per piece, and how each piece absorbs it."""

    concat: Node
    slices: list[np.ndarray]
    absorbed: list[str]  # "constant", "expand" (into the Expand's constant input) or "" (an Add stays)


def _constant_and_concat(graph: Graph, node: Node) -> tuple[np.ndarray, Node] | None:
    """The float constant and the Concat (read by this Add alone) that the Add sums, or None."""
    if len(node.inputs) != 2 or node.inputs[0] is node.inputs[1]:
        return None
    for slot in (0, 1):
        c = constant_value(graph, node.inputs[slot])
        concat = graph.producer(node.inputs[1 - slot])
        if c is not None and is_op(concat, "Concat"):
            break
    else:
        return None
    if c.dtype.kind != "f" or sole_consumer(graph, concat.outputs[0]) is not node:
        return None
    return c, concat


def _absorption(graph: Graph, piece: Value, ci: np.ndarray, c: np.ndarray, concat: Node) -> str:
    """How ``piece`` can absorb its slice ``ci`` of the constant: "constant" (it is a constant that keeps
    its shape), "expand" (it is an Expand of a constant, read by the Concat alone), or "" (it cannot)."""
    k = constant_value(graph, piece)
    p = graph.producer(piece)
    if k is not None and k.dtype == c.dtype and np.broadcast_shapes(k.shape, ci.shape) == k.shape:
        return "constant"
    if is_op(p, "Expand") and sole_consumer(graph, piece) is concat and \
            (kk := constant_value(graph, p.inputs[0])) is not None and kk.dtype == c.dtype:
        return "expand"
    return ""


class AddThroughConcat(_TypedRule):
    name = "add_through_concat"
    root_ops = ("Add",)

    def match(self, graph: Graph, node: Node) -> _ConcatAddMatch | str | None:
        found = _constant_and_concat(graph, node)
        if found is None:
            return None
        c, concat = found
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
        slices = self.slices(concat, cc, axis, rank)
        if isinstance(slices, str):
            return slices
        absorbed = [_absorption(graph, piece, ci, c, concat) for piece, ci in zip(concat.inputs, slices)]
        if not any(absorbed):
            return None
        return _ConcatAddMatch(node, concat=concat, slices=slices, absorbed=absorbed)

    def slices(self, concat: Node, cc: np.ndarray, axis: int, rank: int) -> list[np.ndarray] | str:
        """The constant ``cc`` (of the Concat's rank) cut along ``axis`` into one slice per piece."""
        if cc.shape[axis] == 1:
            return [cc] * len(concat.inputs)
        slices: list[np.ndarray] = []
        start = 0
        for piece in concat.inputs:
            dims = self.types.symbols(piece)
            if dims is None or len(dims) != rank or not isinstance(dims[axis], int):
                return "piece sizes along the concat axis are not static"
            slices.append(np.take(cc, range(start, start + dims[axis]), axis=axis))
            start += dims[axis]
        return slices

    def rewrite(self, graph: Graph, match: _ConcatAddMatch) -> None:
        node, concat = match.node, match.concat
        hint = node.name or "Add"
        pieces = [self.absorb(graph, node, hint, i, piece, ci, how)
                  for i, (piece, ci, how) in enumerate(zip(concat.inputs, match.slices, match.absorbed))]
        new = graph.add_node("Concat", pieces, [f"{hint}_concat"], {"axis": concat.attr("axis")},
                             name=f"{concat.name or 'Concat'}_added", anchor=node)
        new.outputs[0].type = node.outputs[0].type
        graph.replace_all_uses(node.outputs[0], new.outputs[0])
        remove_dead(graph, [node, concat])

    @staticmethod
    def absorb(graph: Graph, node: Node, hint: str, i: int, piece: Value, ci: np.ndarray, how: str) -> Value:
        """The value the new Concat reads in place of ``piece`` + ``ci``."""
        if how == "constant":
            k = constant_value(graph, piece)
            return graph.add_initializer((k + ci).astype(k.dtype), f"{hint}_piece{i}")
        if how == "expand":
            expand = graph.producer(piece)
            k = constant_value(graph, expand.inputs[0])
            folded = graph.add_initializer((k + ci).astype(k.dtype), f"{hint}_piece{i}")
            graph.set_input(expand, 0, folded)
            return piece
        if not np.any(ci):
            return piece
        add = graph.add_node("Add", [piece, graph.add_initializer(ci, f"{hint}_slice{i}")],
                             [f"{hint}_piece{i}"], name=f"{hint}_{i}", anchor=node)
        return add.outputs[0]


@register
class FusePatterns(RulePass):
    name = "fuse_patterns"
    summary = ("decomposed LayerNorm (opset >= 17) and GELU (opset >= 20) -> LayerNormalization / Gelu; "
               "Concat + constant -> Concat of pieces that absorb it")

    def rules(self, model: Model, ctx: PassContext) -> list[Rule]:
        opset = _opset(model)
        types = ShapeView(model)
        rules: list[Rule] = []  # LayerNormalization needs opset 17, Gelu opset 20
        if opset >= 17:
            rules.append(LayerNormFusion(types))
        if opset >= 20:
            rules.append(GeluFusion(types))
        rules.append(AddThroughConcat(types))
        return rules
