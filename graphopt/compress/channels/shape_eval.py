"""Evaluating shape computations: the value of ``Shape -> Gather -> Concat -> Reshape``-style chains.

torch exports ``x.view(x.size(0), ...)`` as a Reshape whose target is computed at runtime from ``Shape``.
The coupling walk evaluates such a computation on concrete shapes (batch 1) to follow the Reshape, and the
shrink evaluates it again on the pruned shapes to see which entries go stale. One function per op;
an op not listed here (or a form of it this module does not know) raises :class:`CannotFollow`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from graphopt.compress.channels.dims import CannotFollow
from graphopt.core.ir import Node

#: Ops a shape computation may be made of (the Shape reader rule lets its value flow through them).
SHAPE_OPS = frozenset("Shape Gather Unsqueeze Squeeze Concat Cast Div Mul Add Sub Floor Ceil Identity Slice "
                      "ReduceProd Constant Reshape".split())

Inputs = list  # list[np.ndarray | None]: the evaluated inputs of a node


def _gather(node: Node, ins: Inputs) -> np.ndarray:
    return np.take(ins[0], ins[1].astype(np.int64), axis=int(node.attr("axis", 0)))


def _squeeze_axes(node: Node, ins: Inputs):
    return ins[1] if len(ins) > 1 and ins[1] is not None else node.attr("axes")


def _squeeze(node: Node, ins: Inputs) -> np.ndarray:
    x, axes = ins[0], _squeeze_axes(node, ins)
    return np.squeeze(x, axis=tuple(int(a) for a in axes)) if axes is not None else np.squeeze(x)


def _unsqueeze(node: Node, ins: Inputs) -> np.ndarray:
    x, axes = ins[0], _squeeze_axes(node, ins)
    out = x
    for a in sorted(int(t) % (x.ndim + len(axes)) for t in axes):
        out = np.expand_dims(out, a)
    return out


def _concat(node: Node, ins: Inputs) -> np.ndarray:
    return np.concatenate([np.atleast_1d(t) for t in ins if t is not None], axis=int(node.attr("axis", 0)))


def _cast(node: Node, ins: Inputs) -> np.ndarray:
    from onnx import helper
    return ins[0].astype(helper.tensor_dtype_to_np_dtype(int(node.attr("to"))))


def _div(node: Node, ins: Inputs) -> np.ndarray:
    """ONNX integer Div truncates toward zero (numpy's ``//`` floors)."""
    a, c = ins[0], ins[1]
    if np.issubdtype(a.dtype, np.integer):
        return (np.trunc(a / c)).astype(a.dtype)
    return a / c


def _binary(ufunc: Callable) -> Callable[[Node, Inputs], np.ndarray]:
    return lambda node, ins: ufunc(ins[0], ins[1])


def _reshape(node: Node, ins: Inputs) -> np.ndarray:
    x = ins[0]
    return x.reshape([int(t) if t != 0 else x.shape[i] for i, t in enumerate(ins[1])])


def _reduce_prod(node: Node, ins: Inputs) -> np.ndarray:
    x = ins[0]
    return np.array([np.prod(x)], dtype=x.dtype) if node.attr("keepdims", 1) else np.prod(x)


def _slice(node: Node, ins: Inputs) -> np.ndarray:
    if len(ins) < 3:
        raise CannotFollow(f"cannot evaluate {node.op_type} {node.name!r}")
    x, starts, ends = ins[0], ins[1], ins[2]
    axes = ins[3] if len(ins) > 3 and ins[3] is not None else range(len(starts))
    steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for a, st, en, sp in zip(axes, starts, ends, steps):
        index[int(a)] = slice(int(st), int(en), int(sp))
    return x[tuple(index)]


_EVALUATORS: dict[str, Callable[[Node, Inputs], np.ndarray]] = {
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Cast": _cast,
    "Div": _div,
    "Mul": _binary(np.multiply),
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Floor": lambda node, ins: np.floor(ins[0]),
    "Ceil": lambda node, ins: np.ceil(ins[0]),
    "Identity": lambda node, ins: ins[0],
    "Reshape": _reshape,
    "ReduceProd": _reduce_prod,
    "Slice": _slice,
}


def eval_shape_op(node: Node, ins: Inputs) -> np.ndarray:
    """The output of one shape-computation node from its evaluated inputs (``Shape`` is the walk's job)."""
    evaluator = _EVALUATORS.get(node.op_type)
    if evaluator is None:
        raise CannotFollow(f"cannot evaluate {node.op_type} {node.name!r}")
    return evaluator(node, ins)
