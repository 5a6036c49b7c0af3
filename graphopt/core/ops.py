"""The questions rules and passes ask of a graph, answered once.

Is this node a standard op of that type; what is the single consumer of a value, the producer of an
op type; which inputs are constant (a function's ``ref_attr_name`` Constant is not); a conv's
geometry (:class:`ConvInfo`); a Slice's constant bounds; and the two small mutations every rewrite
ends with (drop the values and nodes it left unread).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from graphopt.core.ir import Graph, Node, Value

STANDARD_DOMAINS = ("", "ai.onnx")

# The layers that carry a weight matrix: what re-fits, factorizations, sparsity and sharing act on.
# ConvTranspose is a layer too, but not every pass can treat it (its weight is [Cin, Cout/g, k...]).
LAYER_OPS = ("Conv", "Gemm", "MatMul")
LAYER_OPS_WITH_TRANSPOSE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def is_op(node: Node | None, *op_types: str) -> bool:
    """``node`` is a standard-domain op of one of ``op_types``."""
    return node is not None and node.domain in STANDARD_DOMAINS and node.op_type in op_types


def sole_consumer(graph: Graph, value: Value | None) -> Node | None:
    """The only node reading ``value`` (once, through a data edge), when ``value`` is not a graph output."""
    if value is None or graph.is_graph_output(value):
        return None
    uses = graph.uses(value)
    if len(uses) != 1 or isinstance(uses[0][1], tuple):
        return None
    return uses[0][0]


def producer_op(graph: Graph, value: Value | None, *op_types: str) -> Node | None:
    """The producer of ``value`` if it is one of ``op_types`` (standard domain), else None."""
    if value is None:
        return None
    node = graph.producer(value)
    return node if is_op(node, *op_types) else None


def constant_value(graph: Graph, value: Value | None) -> np.ndarray | None:
    """``graph.constant_array(value)``, except that a ``Constant`` inside a function whose payload refers
    to the function's attribute (``ref_attr_name``) is not a constant: its value is only known at the
    call site (and the IR raises on it)."""
    producer = graph.producer(value) if value is not None else None
    if is_op(producer, "Constant") and any(a.ref_attr_name for a in producer.attrs.values()):
        return None
    return graph.constant_array(value)


def const_input(graph: Graph, node: Node, slot: int) -> np.ndarray | None:
    """The constant array at input ``slot`` of ``node`` (None when absent or not constant)."""
    return constant_value(graph, node.inputs[slot]) if slot < len(node.inputs) else None


def is_float(value: Value | None) -> bool:
    from onnx import TensorProto
    return value is not None and value.dtype in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16,
                                                 TensorProto.BFLOAT16)


def remove_dead(graph: Graph, nodes: Iterable[Node]) -> None:
    """Remove nodes whose outputs nothing reads any more (consumers first)."""
    candidates = set(nodes)
    for node in reversed(graph.toposort()):
        if node not in candidates:
            continue
        if not any(graph.uses(v) or graph.is_graph_output(v) for v in node.outputs if v is not None):
            graph.remove_node(node)


# =============================================================================================
# conv geometry (shared by the merges in passes/branch.py and the re-fits in graphopt/lstsq.py)


@dataclass
class ConvInfo:
    """A Conv with constant weights, its geometry normalised (explicit pads, strides, dilations)."""

    node: Node
    x: Value
    out: Value
    weight: np.ndarray
    bias: np.ndarray | None
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    group: int

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def cout(self) -> int:
        return int(self.weight.shape[0])

    @property
    def cin(self) -> int:
        return int(self.weight.shape[1]) * self.group

    @property
    def excess(self) -> tuple[int, ...]:
        return tuple(pb + pe - d * (k - 1)
                     for pb, pe, d, k in zip(self.pads_begin, self.pads_end, self.dilations, self.kernel))

    def key(self) -> tuple:
        """What must be equal for two convs to merge at all (kernels and pads may differ: alignment)."""
        return (self.x.name, self.strides, self.dilations, self.group, self.weight.dtype.str, self.weight.ndim)


def _conv_weights(graph: Graph, node: Node) -> tuple[np.ndarray, np.ndarray | None] | str:
    """The conv's constant float weight (rank >= 3) and bias (None when absent), or why not."""
    w = graph.constant_array(node.inputs[1])
    if w is None:
        return "conv weight is not constant"
    if w.dtype.kind != "f" or w.ndim < 3:
        return "conv weight is not a float tensor of rank >= 3"
    b = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = graph.constant_array(node.inputs[2])
        if b is None:
            return "conv bias is not constant"
        if b.shape != (w.shape[0],):
            return "conv bias shape does not match the weight"
    return w, b


def conv_info(graph: Graph, node: Node) -> ConvInfo | str:
    """The conv's :class:`ConvInfo`, or why it cannot take part in a merge."""
    if not is_op(node, "Conv"):
        return "not a Conv"
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None or node.outputs[0] is None:
        return "Conv without input or weight"
    found = _conv_weights(graph, node)
    if isinstance(found, str):
        return found
    w, b = found
    auto_pad = node.attr("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return f"auto_pad={auto_pad} (pads depend on the input size)"
    rank = w.ndim - 2
    kernel_attr = node.attr("kernel_shape")
    if kernel_attr is not None and tuple(kernel_attr) != tuple(w.shape[2:]):
        return "kernel_shape attribute disagrees with the weight"
    strides = tuple(node.attr("strides", [1] * rank))
    dilations = tuple(node.attr("dilations", [1] * rank))
    pads = [0] * (2 * rank) if auto_pad == "VALID" else list(node.attr("pads", [0] * (2 * rank)))
    if len(strides) != rank or len(dilations) != rank or len(pads) != 2 * rank:
        return "conv attributes disagree with the weight rank"
    return ConvInfo(node, node.inputs[0], node.outputs[0], w, b, strides, dilations, tuple(pads[:rank]),
                    tuple(pads[rank:]), int(node.attr("group", 1)))


def drop_unused(graph: Graph, values: Sequence[Value | None]) -> None:
    """Remove weights (initializers or Constant outputs) that nothing reads any more."""
    for v in dict.fromkeys(v for v in values if v is not None):
        if v not in graph.nx or graph.uses(v) or graph.is_graph_output(v) or graph.is_graph_input(v):
            continue
        if graph.initializers.get(v.name) is v or graph.sparse_initializers.get(v.name) is v:
            graph.remove_initializer(v)
            continue
        producer = graph.producer(v)
        if is_op(producer, "Constant"):
            graph.remove_node(producer)


def slice_bounds(node: Node, graph: Graph) -> tuple[list[int], list[int], list[int] | None, list[int]] | None:
    """Constant (starts, ends, axes or None, steps) of a Slice, from its inputs (opset >= 10) or attributes."""
    if "starts" in node.attrs:  # opset < 10
        starts, ends = list(node.attr("starts")), list(node.attr("ends"))
        axes = node.attr("axes")
        return starts, ends, (list(axes) if axes is not None else None), [1] * len(starts)
    parts = []
    for slot in (1, 2, 3, 4):
        if slot >= len(node.inputs) or node.inputs[slot] is None:
            parts.append(None)
            continue
        array = constant_value(graph, node.inputs[slot])
        if array is None:
            return None
        parts.append([int(i) for i in array.reshape(-1)])
    starts, ends, axes, steps = parts
    if starts is None or ends is None:
        return None
    return starts, ends, axes, steps if steps is not None else [1] * len(starts)
