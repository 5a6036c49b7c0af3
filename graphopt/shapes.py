"""Shape and type inference on the IR, through ``onnx.shape_inference``.

Two entry points:

* :func:`infer_shapes` writes inferred types back into the IR. Passes that change shapes (pruning,
  factorization) call it after their rewrite with ``reset=True``, which first forgets every
  intermediate type so that no stale shape survives.
* :func:`inferred_types` computes types without touching the IR, optionally with concrete sizes for
  dynamic input dims (analysis counts MACs at batch 1 this way without baking batch 1 into the model).

Large float weights are passed to onnx as data-less stubs: shape inference needs their dims only,
and a 100 MB model is not copied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from .errors import GraphoptError
from .ir import Graph, Model
from .onnx_io import to_proto

InputShapes = Mapping[str, Sequence[int]]


def _inferred_proto(model: Model, input_shapes: InputShapes | None, strict: bool) -> onnx.ModelProto:
    proto = to_proto(model, weights=False)
    if input_shapes:
        for vi in proto.graph.input:
            if vi.name in input_shapes:
                _fix_dims(vi, input_shapes[vi.name])
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=strict, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise GraphoptError(f"shape inference failed: {str(exc).splitlines()[0]}") from None


def _fix_dims(vi: onnx.ValueInfoProto, dims: Sequence[int]) -> None:
    shape = vi.type.tensor_type.shape
    if len(shape.dim) != len(dims):
        raise GraphoptError(f"input {vi.name!r} has rank {len(shape.dim)}, but the given shape {tuple(dims)} "
                            f"has rank {len(dims)}")
    for d, size in zip(shape.dim, dims):
        if d.HasField("dim_value") and d.dim_value != size:
            raise GraphoptError(f"input {vi.name!r} dim is fixed to {d.dim_value}, cannot set it to {size}")
        d.Clear()
        d.dim_value = int(size)


def _collect(graph: Graph, gp: onnx.GraphProto, out: dict[Graph, dict[str, onnx.TypeProto]]) -> None:
    """Map each IR graph to ``name -> TypeProto`` from the inferred GraphProto (same node order)."""
    types = {vi.name: vi.type for vi in gp.value_info}
    types.update({vi.name: vi.type for vi in gp.output if vi.type.WhichOneof("value")})
    out[graph] = types
    for node, np_ in zip(graph.toposort(), gp.node):
        attrs = {a.name: a for a in np_.attribute}
        for name, sub in node.subgraphs.items():
            attr = attrs[name]
            if isinstance(sub, Graph):
                _collect(sub, attr.g, out)
            else:
                for g, sg in zip(sub, attr.graphs):
                    _collect(g, sg, out)


def inferred_types(model: Model, input_shapes: InputShapes | None = None,
                   strict: bool = False) -> dict[Graph, dict[str, onnx.TypeProto]]:
    """Types onnx infers for every value of every graph, without changing the IR.

    Parameters
    ----------
    input_shapes : concrete dims for graph inputs (e.g. ``{"input": (1, 3, 224, 224)}``).
    strict : raise on any inference error instead of leaving the value untyped.
    """
    inferred = _inferred_proto(model, input_shapes, strict)
    out: dict[Graph, dict[str, onnx.TypeProto]] = {}
    _collect(model.graph, inferred.graph, out)
    return out


def infer_shapes(model: Model, *, reset: bool = False, strict: bool = False) -> None:
    """Write inferred types into the IR's values.

    ``reset=True`` first clears the type of every value that is not a graph input, a graph output or
    an initializer, so only freshly inferred shapes remain (required after a shape-changing rewrite).
    """
    if reset:
        for graph in model.graphs():
            for value in graph.values():
                if not (value.is_initializer or graph.is_graph_input(value) or graph.is_graph_output(value)
                        or graph.is_captured(value)):
                    value.type = None
    for graph, types in inferred_types(model, strict=strict).items():
        for value in graph.values():
            if value.is_initializer or graph.is_graph_input(value) or graph.is_captured(value):
                continue
            t = types.get(value.name)
            if t is not None and t.WhichOneof("value") is not None:
                value.type = t
