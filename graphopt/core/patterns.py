"""Recognisers for the decomposed GELU and LayerNorm chains onnxruntime fuses into one kernel.

:func:`match_gelu` and :func:`match_layer_norm` read a chain from one of its nodes (the math of each
chain is in :mod:`graphopt.passes.lossless.fusion`, which replaces them by the standard op);
:func:`protected_role` tells any pass that a node belongs to such a chain, so that an exact rewrite
that would break onnxruntime's fusion (folding the GELU's ``0.5`` into the next MatMul) is left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from graphopt.core.ir import Graph, Node, Value
from graphopt.core.ops import constant_value, is_op, sole_consumer

_RTOL = 1e-6
_FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _scalar(graph: Graph, value: Value | None) -> float | None:
    """The value of a constant holding one number (any shape of size 1), else None."""
    array = constant_value(graph, value) if value is not None else None
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
    cube_nodes = _cube_nodes(graph, cube, x)
    return None if cube_nodes is None else [scale_node, add, c_node, *cube_nodes]


def _cube_nodes(graph: Graph, cube: Value, x: Value) -> list[Node] | None:
    """The nodes computing ``cube = x³`` as ``Pow(x, 3)`` or ``x·(x·x)``, or None."""
    p = graph.producer(cube)
    if p is None or not _internal(graph, p):
        return None
    if is_op(p, "Pow") and p.inputs[0] is x and _close(_scalar(graph, p.inputs[1]), 3.0):
        return [p]
    if is_op(p, "Mul") and len(p.inputs) == 2:
        a, b = p.inputs
        q = graph.producer(b if a is x else a)
        if (a is x or b is x) and is_op(q, "Mul") and list(q.inputs) == [x, x] and _internal(graph, q):
            return [p, q]
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
        axes = constant_value(graph, node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    return None  # all axes (or noop_with_empty_axes): not a LayerNorm we rewrite


def match_layer_norm(graph: Graph, div: Node) -> LayerNorm | None:
    """The decomposed LayerNorm whose ``Div`` is ``div`` (with its γ Mul / β Add when present), or None:
    ``(x − mean(x)) / sqrt(mean(d²) + ε)`` with ``d = x − mean(x)`` read by the square and the Div only."""
    if not is_op(div, "Div") or len(div.inputs) != 2:
        return None
    sub, sqrt = graph.producer(div.inputs[0]), graph.producer(div.inputs[1])
    if not is_op(sub, "Sub") or not is_op(sqrt, "Sqrt") or not _internal(graph, sqrt):
        return None
    x, mean = sub.inputs
    mean_node = graph.producer(mean)
    if not is_op(mean_node, "ReduceMean") or mean_node.inputs[0] is not x or not _internal(graph, mean_node):
        return None
    found = _variance_plus_eps(graph, sqrt)
    if found is None:
        return None
    add_eps, var_node, eps = found
    d = sub.outputs[0]
    sq = _square_of(graph, var_node, d)
    if sq is None:
        return None
    readers = {n for n, _ in graph.uses(d)}
    if readers != {sq, div} or graph.is_graph_output(d):
        return None
    axes1, axes2 = _reduce_axes(graph, mean_node), _reduce_axes(graph, var_node)
    if axes1 is None or axes2 is None or eps is None or eps < 0:
        return None
    nodes = [mean_node, sub, sq, var_node, add_eps, sqrt, div]
    ln = LayerNorm(x, axes1, eps, div, div.outputs[0], nodes, axes2)
    _take_affine_tail(graph, ln)
    return ln


def _variance_plus_eps(graph: Graph, sqrt: Node) -> tuple[Node, Node, float | None] | None:
    """``(Add, ReduceMean, ε)`` of ``sqrt``'s input ``ReduceMean(·) + ε`` (ε a constant scalar), or None."""
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
    return add_eps, var_node, eps


def _square_of(graph: Graph, var_node: Node, d: Value) -> Node | None:
    """The node squaring ``d`` (``Pow(d, 2)`` or ``Mul(d, d)``) that ``var_node`` averages, or None."""
    sq = graph.producer(var_node.inputs[0])
    if sq is None or not _internal(graph, sq):
        return None
    if not ((is_op(sq, "Pow") and sq.inputs[0] is d and _close(_scalar(graph, sq.inputs[1]), 2.0))
            or (is_op(sq, "Mul") and list(sq.inputs) == [d, d])):
        return None
    return sq


def _take_affine_tail(graph: Graph, ln: LayerNorm) -> None:
    """Extend ``ln`` by the optional affine tail: ``y·γ``, then ``+ β`` (float constants)."""
    out = ln.out
    mul = sole_consumer(graph, out)
    if is_op(mul, "Mul"):
        gamma = _float_constant_beside(graph, mul, out)
        if gamma is not None:
            ln.scale, out = gamma, mul.outputs[0]
            ln.nodes.append(mul)
    add = sole_consumer(graph, out)
    if is_op(add, "Add"):
        beta = _float_constant_beside(graph, add, out)
        if beta is not None:
            ln.bias, out = beta, add.outputs[0]
            ln.nodes.append(add)
    ln.out = out


def _float_constant_beside(graph: Graph, node: Node, value: Value) -> np.ndarray | None:
    """The float constant ``node`` combines ``value`` with, or None."""
    other = _other(node, value)
    c = constant_value(graph, other) if other is not None else None
    return c if c is not None and c.dtype.kind == "f" else None


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
            role = _role_rooted_at(graph, n, node)
            if role is not None:
                return role
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
            if is_op(q, "Div") and _role_rooted_at(graph, q, node) is not None:
                return "LayerNorm"
    return None


def _role_rooted_at(graph: Graph, root: Node, node: Node) -> str | None:
    """The role (``"GELU"`` or ``"LayerNorm"``) when the pattern whose root node is ``root`` (a GELU's last
    Mul, a LayerNorm's Div) contains ``node``, else None."""
    if is_op(root, "Mul"):
        g = match_gelu(graph, root)
        if g is not None and node in g.nodes:
            return "GELU"
    if is_op(root, "Div"):
        ln = match_layer_norm(graph, root)
        if ln is not None and node in ln.nodes:
            return "LayerNorm"
    return None

