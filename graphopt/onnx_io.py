"""ONNX ModelProto <-> IR, with an exact round trip.

``to_proto(from_proto(m))`` equals ``m`` field for field when ``m``'s node lists are topologically
sorted (as the ONNX spec requires): initializers keep their stored layout (raw or typed fields,
doc strings), attributes keep their order and protos, and every field the IR does not model
(doc strings, metadata_props, producer, training_info, quantization annotations, node overloads and
device configurations...) is carried through untouched in an ``extras`` proto.

Loading resolves every name once: a subgraph (If/Loop/Scan body) that reads a value of an enclosing
scope gets the enclosing :class:`~graphopt.ir.Value` object and its parent node a capture edge.

Saving is atomic (a temporary file in the target folder, then ``os.replace``) and writes external
data when the source model had it or when the model would not fit protobuf's 2 GB limit.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx
from onnx import external_data_helper

from .errors import ModelLoadError
from .ir import Function, Graph, Model, Namer, Node, Value

_PROTOBUF_LIMIT = 2**31 - 2**20  # leave headroom under 2 GiB for the non-tensor fields

# ---------------------------------------------------------------------------------------------
# loading


def load(path: str | os.PathLike) -> Model:
    """Read an ONNX file (and its external data) into the IR.

    Raises
    ------
    ModelLoadError
        The path is missing or a directory, the file is not a (complete) ONNX model, its external
        data is missing, or a node reads a name that nothing defines.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (google.protobuf.message.DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model (protobuf parse failed: {_first_line(exc)})") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    _check_looks_like_model(proto, path)
    has_external = any(external_data_helper.uses_external_data(t) for t in _all_tensors(proto))
    if has_external:
        try:
            external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelLoadError(f"{path}: external data missing or unreadable ({_first_line(exc)})") from None
    model = from_proto(proto, source=str(path))
    model.uses_external_data = has_external
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _check_looks_like_model(proto: onnx.ModelProto, path: Path) -> None:
    # Random bytes often parse as a protobuf with unknown fields only; a truncated file that lost
    # its tail loses opset_import (written after the graph). Both are caught here.
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph or no ir_version)")
    if len(proto.opset_import) == 0:
        raise ModelLoadError(f"{path}: ONNX model is incomplete (no opset_import; truncated file?)")
    if len(proto.graph.output) == 0:
        raise ModelLoadError(f"{path}: ONNX model has no graph outputs (truncated or corrupt file?)")


def _all_tensors(proto: onnx.ModelProto):
    """Every TensorProto in the model: initializers and tensor attributes, in all graphs and functions."""
    def of_graph(g: onnx.GraphProto):
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        yield from of_nodes(g.node)

    def of_nodes(nodes):
        for n in nodes:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("g"):
                    yield from of_graph(a.g)
                for sub in a.graphs:
                    yield from of_graph(sub)

    yield from of_graph(proto.graph)
    for fn in proto.functions:
        yield from of_nodes(fn.node)


def from_proto(proto: onnx.ModelProto, source: str = "<model>") -> Model:
    """Convert a ModelProto into the IR.

    The IR keeps references to the proto's tensors and attributes rather than copying them (a large
    model would otherwise sit in memory twice); do not mutate ``proto`` afterwards.
    """
    extras = onnx.ModelProto()
    _copy_fields(proto, extras, skip={"graph", "functions"})
    graph = _Builder(source, Namer()).graph(proto.graph, parent=None, outer={})
    functions = [_function_from_proto(fp, source) for fp in proto.functions]
    return Model(graph, extras, functions)


def _copy_fields(src: google.protobuf.message.Message, dst: google.protobuf.message.Message, skip: set[str]) -> None:
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _function_from_proto(fp: onnx.FunctionProto, source: str) -> Function:
    extras = onnx.FunctionProto()
    _copy_fields(fp, extras, skip={"input", "output", "node", "value_info"})
    builder = _Builder(f"{source}: function {fp.domain}:{fp.name}", Namer())
    graph = Graph(builder.namer)
    body = onnx.GraphProto()
    body.input.extend(onnx.ValueInfoProto(name=n) for n in fp.input)
    body.output.extend(onnx.ValueInfoProto(name=n) for n in fp.output)
    body.node.extend(fp.node)
    body.value_info.extend(fp.value_info)
    builder.fill(graph, body, outer={})
    return Function(graph, extras)


class _Builder:
    """Builds IR graphs from GraphProtos, resolving names through the enclosing scopes."""

    def __init__(self, source: str, namer: Namer) -> None:
        self.source = source
        self.namer = namer

    def error(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"{self.source}: {message}")

    def graph(self, gp: onnx.GraphProto, parent: Node | None, outer: Mapping[str, Value]) -> Graph:
        graph = Graph(self.namer, parent)
        _copy_fields(gp, graph.extras, skip={"node", "initializer", "sparse_initializer", "input", "output",
                                             "value_info"})
        self.fill(graph, gp, outer)
        return graph

    def define(self, local: dict[str, Value], name: str, where: str) -> Value:
        if name in local:
            raise self.error(f"value {name!r} is defined twice ({where})")
        if name in self.namer.values:
            raise self.error(f"value {name!r} shadows a value of an enclosing graph ({where}); ONNX forbids it")
        self.namer.values.add(name)
        value = Value(name)
        local[name] = value
        return value

    def fill(self, graph: Graph, gp: onnx.GraphProto, outer: Mapping[str, Value]) -> None:
        local: dict[str, Value] = {}

        def resolve(name: str, reader: str) -> Value:
            value = local.get(name) or outer.get(name)
            if value is None:
                raise self.error(f"{reader} reads {name!r}, which nothing defines")
            return value

        for vi in gp.input:
            value = self.define(local, vi.name, "graph input")
            _take_value_info(value, vi)
            graph.add_input(value)
        inputs = {v.name: v for v in graph.inputs}
        for tp in gp.initializer:
            # An initializer named like a graph input is that input's default value (IR < 4 style).
            value = inputs.get(tp.name) or self.define(local, tp.name, "initializer")
            value.const = tp
            graph.initializers[tp.name] = value
            graph.nx.add_node(value)
        for sp in gp.sparse_initializer:
            name = sp.values.name
            value = inputs.get(name) or self.define(local, name, "sparse initializer")
            value.sparse_const = sp
            graph.sparse_initializers[name] = value
            graph.nx.add_node(value)

        # Outputs first, so nodes may appear in any order in the file (we sort on export anyway).
        for index, np_ in enumerate(gp.node):
            for out in np_.output:
                if out:
                    self.define(local, out, f"output of node #{index} {np_.op_type} {np_.name!r}")

        scope = _Scope(local, outer)
        for index, np_ in enumerate(gp.node):
            node = Node(np_.op_type, np_.domain, np_.name)
            node.seq = (index, 0)
            node.graph = graph
            if np_.name:
                graph.namer.nodes.add(np_.name)
            graph.nx.add_node(node)
            reader = f"node #{index} {np_.op_type} {np_.name!r}"
            extras = onnx.NodeProto()
            _copy_fields(np_, extras, skip={"input", "output", "attribute", "name", "op_type", "domain"})
            node.extras = extras if extras.ByteSize() else None
            for attr in np_.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    node.subgraphs[attr.name] = self.graph(attr.g, node, scope)
                    node.attrs[attr.name] = _without_payload(attr)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    node.subgraphs[attr.name] = [self.graph(g, node, scope) for g in attr.graphs]
                    node.attrs[attr.name] = _without_payload(attr)
                else:
                    node.attrs[attr.name] = attr
            for slot, name in enumerate(np_.input):
                node.inputs.append(None)
                if name:
                    graph.set_input(node, slot, resolve(name, reader))
            for slot, name in enumerate(np_.output):
                node.outputs.append(None)
                if name:
                    graph._set_output(node, slot, local[name])
            for sub in node.iter_subgraphs():
                for captured in sub.captured_values():
                    graph.add_capture(node, captured)

        for vi in gp.output:
            value = resolve(vi.name, "graph output")
            graph.nx.add_node(value)
            if not graph.is_graph_input(value):
                _take_value_info(value, vi)
            graph.outputs.append(value)

        orphans = []
        for order, vi in enumerate(gp.value_info):
            value = local.get(vi.name)
            if value is None or value.is_initializer or graph.is_graph_input(value) or graph.is_graph_output(value) \
                    or value.info_order is not None:
                orphans.append(vi)  # describes nothing we own: keep it verbatim
                continue
            _take_value_info(value, vi)
            value.info_order = order
        graph.orphan_value_info = orphans  # type: ignore[attr-defined]


class _Scope(Mapping[str, Value]):
    """Name lookup through a graph's own values, then the enclosing scopes'."""

    def __init__(self, local: Mapping[str, Value], outer: Mapping[str, Value]) -> None:
        self.local, self.outer = local, outer

    def __getitem__(self, name: str) -> Value:
        if name in self.local:
            return self.local[name]
        return self.outer[name]

    def __iter__(self):
        yield from self.local
        yield from self.outer

    def __len__(self) -> int:
        return len(self.local) + len(self.outer)

    def get(self, name, default=None):
        value = self.local.get(name)
        return value if value is not None else self.outer.get(name, default)


def _take_value_info(value: Value, vi: onnx.ValueInfoProto) -> None:
    value.type = vi.type if vi.HasField("type") else None
    if vi.doc_string or len(vi.metadata_props):
        extra = onnx.ValueInfoProto()
        _copy_fields(vi, extra, skip={"name", "type"})
        value.info = extra


def _without_payload(attr: onnx.AttributeProto) -> onnx.AttributeProto:
    shell = onnx.AttributeProto()
    _copy_fields(attr, shell, skip={"g", "graphs"})
    return shell


# ---------------------------------------------------------------------------------------------
# export


def to_proto(model: Model, *, weights: bool = True) -> onnx.ModelProto:
    """The IR as a ModelProto: deterministic, nodes in topological order.

    ``weights=False`` writes large floating-point initializers as dims-and-type stubs without data:
    enough for shape inference, and no copy of the weights (not a runnable model).
    """
    proto = onnx.ModelProto()
    _copy_fields(model.extras, proto, skip=set())
    proto.graph.CopyFrom(_graph_to_proto(model.graph, weights))
    for fn in model.functions:
        proto.functions.append(_function_to_proto(fn))
    return proto


def _value_info(value: Value, with_type: bool = True) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto(name=value.name)
    if with_type and value.type is not None:
        vi.type.CopyFrom(value.type)
    if value.info is not None:
        _copy_fields(value.info, vi, skip={"name", "type"})
    return vi


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
_STUB_MIN_ELEMENTS = 1024  # small tensors stay: shape inference reads e.g. Resize scales


def _weight_stub(value: Value) -> onnx.TensorProto | None:
    """A data-less TensorProto for a large float initializer, or None when the tensor must stay whole."""
    shape = value.shape or ()
    if value.dtype not in _FLOAT_TYPES or int(np.prod(shape, dtype=np.int64)) < _STUB_MIN_ELEMENTS:
        return None
    return onnx.TensorProto(name=value.name, dims=list(shape), data_type=value.dtype)


def _graph_to_proto(graph: Graph, weights: bool = True) -> onnx.GraphProto:
    gp = onnx.GraphProto()
    _copy_fields(graph.extras, gp, skip=set())
    order = graph.toposort()
    gp.node.extend(_node_to_proto(n, weights) for n in order)
    gp.input.extend(_value_info(v) for v in graph.inputs)
    gp.output.extend(_value_info(v) for v in graph.outputs)
    for value in graph.initializers.values():
        stub = None if weights else _weight_stub(value)
        gp.initializer.append(stub if stub is not None else value.tensor_proto())
    for value in graph.sparse_initializers.values():
        sp = onnx.SparseTensorProto()
        sp.CopyFrom(value.sparse_const)
        sp.values.name = value.name
        gp.sparse_initializer.append(sp)
    gp.value_info.extend(_value_info(v) for v in _intermediate_values(graph, order))
    gp.value_info.extend(getattr(graph, "orphan_value_info", ()))
    return gp


def _intermediate_values(graph: Graph, order: list[Node]) -> list[Value]:
    """Typed values produced in this graph that are not graph outputs: source order, then new ones."""
    listed, new = [], []
    for node in order:
        for value in node.outputs:
            if value is None or value.type is None or graph.is_graph_output(value):
                continue
            (listed if value.info_order is not None else new).append(value)
    listed.sort(key=lambda v: v.info_order)
    return listed + new


def _node_to_proto(node: Node, weights: bool = True) -> onnx.NodeProto:
    np_ = onnx.NodeProto()
    np_.input.extend(v.name if v is not None else "" for v in node.inputs)
    np_.output.extend(v.name if v is not None else "" for v in node.outputs)
    if node.name:
        np_.name = node.name
    np_.op_type = node.op_type
    if node.domain:
        np_.domain = node.domain
    for name, attr in node.attrs.items():
        sub = node.subgraphs.get(name)
        if sub is None:
            np_.attribute.append(attr)
            continue
        full = np_.attribute.add()
        full.CopyFrom(attr)
        if isinstance(sub, Graph):
            full.g.CopyFrom(_graph_to_proto(sub, weights))
        else:
            full.graphs.extend(_graph_to_proto(g, weights) for g in sub)
    if node.extras is not None:
        _copy_fields(node.extras, np_, skip=set())
    return np_


def _function_to_proto(fn: Function) -> onnx.FunctionProto:
    fp = onnx.FunctionProto()
    graph = fn.graph
    order = graph.toposort()
    _copy_fields(fn.extras, fp, skip=set())
    fp.input.extend(v.name for v in graph.inputs)
    fp.output.extend(v.name for v in graph.outputs)
    fp.node.extend(_node_to_proto(n) for n in order)
    fp.value_info.extend(_value_info(v) for v in _intermediate_values(graph, order))
    fp.value_info.extend(getattr(graph, "orphan_value_info", ()))
    return fp


# ---------------------------------------------------------------------------------------------
# saving


def save(model: Model | onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None,
         size_threshold: int = 1024) -> None:
    """Write ``model`` to ``path`` atomically.

    Parameters
    ----------
    external_data : write weights to ``<file name>.data`` beside the model. ``None`` (default): when the
        source model used external data, or when the model would exceed protobuf's 2 GB limit.
    size_threshold : tensors smaller than this many bytes stay inside the model file.

    The model (and its data file) are written to a temporary folder in the target directory and moved
    into place with ``os.replace``; the model file appears last, so a reader never sees a model whose
    data is incomplete, and a failure leaves nothing behind.
    """
    if isinstance(model, Model):
        proto = to_proto(model)
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)  # writing external data rewrites the tensors; never touch the caller's proto
    path = Path(path)
    if external_data is None:
        external_data = (isinstance(model, Model) and model.uses_external_data) or proto.ByteSize() > _PROTOBUF_LIMIT
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_model = tmpdir / path.name
        data_name = path.name + ".data"
        if external_data:
            onnx.save_model(proto, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=size_threshold, convert_attribute=False)
            if (tmpdir / data_name).exists():
                os.replace(tmpdir / data_name, path.parent / data_name)
        else:
            with open(tmp_model, "wb") as fh:
                fh.write(proto.SerializeToString())
        os.replace(tmp_model, path)
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()


def round_trip(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``to_proto(from_proto(proto))`` — handy in tests and sweeps."""
    return to_proto(from_proto(proto))
