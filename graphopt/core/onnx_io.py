"""ONNX ModelProto <-> IR, with an exact round trip.

``to_proto(from_proto(m))`` equals ``m`` field for field when ``m``'s node lists are topologically
sorted (as the ONNX spec requires): initializers keep their stored layout (raw or typed fields,
doc strings), attributes keep their order and protos, and every field the IR does not model
(doc strings, metadata_props, producer, training_info, quantization annotations, node overloads and
device configurations...) is carried through untouched in an ``extras`` proto.

Loading resolves every name once: a subgraph (If/Loop/Scan body) that reads a value of an enclosing
scope gets the enclosing :class:`~graphopt.core.ir.Value` object and its parent node a capture edge.

Saving is atomic (a temporary file in the target folder, then ``os.replace``) and writes external
data when the source model had it or when the model would not fit protobuf's 2 GB limit. It streams:
the main graph's initializers are serialized one at a time, so saving a model needs memory for one
tensor beyond the IR, not for a second copy of the model.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import google.protobuf.message
import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from graphopt.core.errors import GraphoptError, ModelLoadError
from graphopt.core.ir import Function, Graph, Model, Namer, Node, Value

PROTOBUF_LIMIT = 2**31 - 2**20  # under 2 GiB, with headroom for fields added around a model (more outputs)

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
    weights = _detach_weights(proto)
    if weights:
        proto = _reparsed(proto)  # a new protobuf arena: the parsed weights are freed with the old one
    model = from_proto(proto, source=str(path), weights=weights)
    model.uses_external_data = has_external
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


_PLAIN_TENSOR_FIELDS = frozenset({"name", "dims", "data_type", "raw_data"})
_DETACHABLE_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
    onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64})
_DETACH_MIN_BYTES = 4096  # smaller tensors cost nothing to keep twice, and keep their proto


def _detach_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Decode the main graph's large *plain* initializers into read-only arrays and clear their data
    from ``proto``: ``{name: array}``.

    Plain means name, dims, a fixed-width numeric type and ``raw_data`` only (what exporters write; also
    the data read back from an external data file), so ``numpy_helper.from_array(array, name)`` gives
    back the same bytes and the round trip stays exact.
    Anything else (typed-field storage, doc strings, subgraph and function tensors, big-endian hosts)
    keeps its proto.
    """
    if sys.byteorder != "little":
        return {}
    weights: dict[str, np.ndarray] = {}
    names = [tp.name for tp in proto.graph.initializer]
    if len(set(names)) != len(names):
        return {}  # a corrupt model; from_proto reports it with the proto as it was
    for tp in proto.graph.initializer:
        if tp.data_type not in _DETACHABLE_TYPES or not tp.HasField("raw_data"):
            continue
        extra = {field.name for field, _ in tp.ListFields()} - _PLAIN_TENSOR_FIELDS
        # load_external_data_for_model leaves data_location set to DEFAULT: the data is now raw_data, and
        # the writer sets the field again when it writes external data.
        if extra - {"data_location"} or ("data_location" in extra and tp.data_location != onnx.TensorProto.DEFAULT):
            continue
        array = numpy_helper.to_array(tp)
        if array.nbytes < _DETACH_MIN_BYTES:
            continue
        array.flags.writeable = False
        weights[tp.name] = array
        tp.ClearField("raw_data")
    return weights


def _reparsed(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` in its own protobuf arena. upb frees a parsed message's memory only when
    nothing refers into it any more, and the IR keeps references to nodes and attributes."""
    fresh = onnx.ModelProto()
    fresh.ParseFromString(proto.SerializeToString())
    return fresh


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


def from_proto(proto: onnx.ModelProto, source: str = "<model>", *,
               weights: Mapping[str, np.ndarray] | None = None) -> Model:
    """Convert a ModelProto into the IR.

    The IR keeps references to the proto's tensors and attributes rather than copying them (a large
    model would otherwise sit in memory twice); do not mutate ``proto`` afterwards. ``weights`` gives
    read-only arrays for main-graph initializers whose data ``proto`` does not hold (see
    :meth:`~graphopt.core.ir.Value.hold_decoded`); they are held, not copied.

    Raises
    ------
    ModelLoadError
        A node reads a name nothing defines, a name is defined twice or shadows an enclosing scope's,
        a node's domain has no opset_import, or a string field is not valid UTF-8 (a corrupt file).
    """
    try:
        extras = onnx.ModelProto()
        _copy_fields(proto, extras, skip={"graph", "functions"})
        domains = _imported_domains(proto.opset_import)
        graph = _Builder(source, Namer(), domains, weights or {}).graph(proto.graph, parent=None, outer={})
        functions = [_function_from_proto(fp, source, domains) for fp in proto.functions]
    except UnicodeDecodeError as exc:
        # protobuf hands out bytes for a string field that is not UTF-8; copying it raises this.
        raise ModelLoadError(f"{source}: a string field is not valid UTF-8 ({_first_line(exc)}); "
                             f"corrupt file?") from None
    return Model(graph, extras, functions)


def _imported_domains(opset_import) -> frozenset[str]:
    domains = {imp.domain for imp in opset_import}
    if domains & {"", "ai.onnx"}:
        domains |= {"", "ai.onnx"}  # two spellings of the default domain
    return frozenset(domains)


def _node_extras(np_: onnx.NodeProto) -> onnx.NodeProto | None:
    """The node's fields the IR does not model, or None when there are none."""
    extras = onnx.NodeProto()
    _copy_fields(np_, extras, skip={"input", "output", "attribute", "name", "op_type", "domain"})
    # An explicitly empty name or domain is a present field in the proto: keep that presence.
    for field in ("name", "domain"):
        if np_.HasField(field) and not getattr(np_, field):
            setattr(extras, field, "")
    return extras if extras.ByteSize() else None


def _copy_fields(src: google.protobuf.message.Message, dst: google.protobuf.message.Message, skip: set[str]) -> None:
    for field, value in src.ListFields():
        if field.name not in skip:
            _copy_fields_of(src, dst, field, value)


def _function_from_proto(fp: onnx.FunctionProto, source: str, model_domains: frozenset[str]) -> Function:
    extras = onnx.FunctionProto()
    _copy_fields(fp, extras, skip={"input", "output", "node", "value_info"})
    domains = model_domains | _imported_domains(fp.opset_import)
    builder = _Builder(f"{source}: function {fp.domain}:{fp.name}", Namer(), domains)
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

    def __init__(self, source: str, namer: Namer, domains: frozenset[str],
                 weights: Mapping[str, np.ndarray] | None = None) -> None:
        self.source = source
        self.namer = namer
        self.domains = domains  # opset_import domains: a node of any other domain means a corrupt model
        self.weights = dict(weights or {})  # main-graph initializers held as arrays (taken once)

    def error(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"{self.source}: {message}")

    def graph(self, gp: onnx.GraphProto, parent: Node | None, outer: Mapping[str, Value]) -> Graph:
        graph = Graph(self.namer, parent)
        _copy_fields(gp, graph.extras, skip={"node", "initializer", "sparse_initializer", "input", "output",
                                             "value_info"})
        self.fill(graph, gp, outer)
        return graph

    def text(self, value: str | bytes, where: str) -> str:
        """A name as read from the proto; protobuf returns bytes when the field is not valid UTF-8."""
        if not isinstance(value, str):
            raise self.error(f"{where}: name {value!r} is not valid UTF-8 (corrupt file?)")
        return value

    def define(self, local: dict[str, Value], outer: Mapping[str, Value], name: str, where: str) -> Value:
        # Sibling subgraphs (then/else branches) may reuse a name; only enclosing scopes are off limits.
        name = self.text(name, where)
        if name in local:
            raise self.error(f"value {name!r} is defined twice ({where})")
        if name in outer:
            raise self.error(f"value {name!r} shadows a value of an enclosing graph ({where}); ONNX forbids it")
        self.namer.values.add(name)
        value = Value(name)
        local[name] = value
        return value

    def fill(self, graph: Graph, gp: onnx.GraphProto, outer: Mapping[str, Value]) -> None:
        """Build ``graph`` from ``gp``: inputs, initializers, nodes (outputs defined first, so nodes may
        come in any order), graph outputs, then value_info."""
        local: dict[str, Value] = {}
        self._fill_inputs_and_initializers(graph, gp, local, outer)
        for index, np_ in enumerate(gp.node):
            for out in np_.output:
                if out:
                    self.define(local, outer, out, f"output of node #{index} {np_.op_type} {np_.name!r}")
        scope = _Scope(local, outer)
        for index, np_ in enumerate(gp.node):
            self._fill_node(graph, index, np_, local, outer, scope)
        self._fill_outputs(graph, gp, local, outer)
        self._fill_value_info(graph, gp, local)

    def _resolve(self, local: Mapping[str, Value], outer: Mapping[str, Value], name: str, reader: str) -> Value:
        value = local.get(name) or outer.get(name)
        if value is None:
            raise self.error(f"{reader} reads {name!r}, which nothing defines")
        return value

    def _fill_inputs_and_initializers(self, graph: Graph, gp: onnx.GraphProto, local: dict[str, Value],
                                      outer: Mapping[str, Value]) -> None:
        for vi in gp.input:
            value = self.define(local, outer, vi.name, "graph input")
            _take_value_info(value, vi)
            graph.add_input(value)
        inputs = {v.name: v for v in graph.inputs}
        for tp in gp.initializer:
            # An initializer named like a graph input is that input's default value (IR < 4 style).
            value = inputs.get(tp.name) or self.define(local, outer, tp.name, "initializer")
            held = self.weights.pop(tp.name, None) if graph.parent is None else None
            if held is not None:
                value.hold_decoded(held)
            else:
                value.const = tp
            graph.initializers[tp.name] = value
            graph.nx.add_node(value)
        for sp in gp.sparse_initializer:
            name = sp.values.name
            value = inputs.get(name) or self.define(local, outer, name, "sparse initializer")
            value.sparse_const = sp
            graph.sparse_initializers[name] = value
            graph.nx.add_node(value)

    def _fill_node(self, graph: Graph, index: int, np_: onnx.NodeProto, local: dict[str, Value],
                   outer: Mapping[str, Value], scope: _Scope) -> None:
        where = f"node #{index}"
        node = Node(self.text(np_.op_type, where), self.text(np_.domain, where), self.text(np_.name, where))
        node.seq = (index, 0)
        node.graph = graph
        if np_.name:
            graph.namer.nodes.add(np_.name)
        graph.nx.add_node(node)
        reader = f"node #{index} {np_.op_type} {np_.name!r}"
        if np_.domain not in self.domains:
            # Also what a file cut between two opset_import entries looks like.
            raise self.error(f"{reader} has domain {np_.domain!r}, which the model does not import "
                             f"(no opset_import entry)")
        node.extras = _node_extras(np_)
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
                graph.set_input(node, slot, self._resolve(local, outer, name, reader))
        for slot, name in enumerate(np_.output):
            node.outputs.append(None)
            if name:
                graph._set_output(node, slot, local[name])
        for sub in node.iter_subgraphs():
            for captured in sub.captured_values():
                graph.add_capture(node, captured)

    def _fill_outputs(self, graph: Graph, gp: onnx.GraphProto, local: dict[str, Value],
                      outer: Mapping[str, Value]) -> None:
        kept_outputs: dict[int, tuple[Value, onnx.TypeProto | None, onnx.ValueInfoProto]] = {}
        for index, vi in enumerate(gp.output):
            value = self._resolve(local, outer, vi.name, "graph output")
            graph.nx.add_node(value)
            if local.get(vi.name) is value and not graph.is_graph_input(value) and not graph.is_graph_output(value):
                _take_value_info(value, vi)
            elif _value_info(value) != vi:
                # An input, an outer value or a repeated output, described differently here: the value has
                # one type, so keep this entry verbatim (while the value and its type stay the same).
                kept_outputs[index] = (value, value.type, vi)
            graph.outputs.append(value)
        graph.kept_output_info = kept_outputs  # type: ignore[attr-defined]

    @staticmethod
    def _fill_value_info(graph: Graph, gp: onnx.GraphProto, local: dict[str, Value]) -> None:
        orphans = []
        for order, vi in enumerate(gp.value_info):
            value = local.get(vi.name)
            if value is None or value.is_initializer or graph.is_graph_input(value) or graph.is_graph_output(value) \
                    or value.info_order is not None:
                orphans.append((order, vi))  # describes nothing we own: keep it verbatim, in its place
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
    if any(field.name not in ("name", "type") for field, _ in vi.ListFields()):
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
    return _model_to_proto(model, weights)


def _model_to_proto(model: Model, weights: bool = True, main_initializers: bool = True) -> onnx.ModelProto:
    # Every message is filled in place (``add()``, not ``append(built)``): protobuf copies on append and
    # on CopyFrom, and a copy of a tensor-carrying message is a copy of its weights.
    proto = onnx.ModelProto()
    _copy_fields(model.extras, proto, skip=set())
    _graph_to_proto(model.graph, weights, proto.graph, initializers=main_initializers)
    for fn in model.functions:
        _function_to_proto(fn, proto.functions.add())
    return proto


MEMORY_LOCATION = "graphopt-in-memory"  # the external-data location of a weight passed by reference


def shared_proto(model: Model) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``model`` as a ModelProto whose large held weights are passed by reference, and those weights.

    Each main-graph initializer held as a C-ordered array of a fixed-width type (see
    :meth:`~graphopt.core.ir.Value.hold_decoded`) of 4 KiB or more is written as an external-data
    stub at :data:`MEMORY_LOCATION` (dims and type, no data) and returned in ``{name: array}``, the
    arrays themselves (read-only, not copied). onnxruntime takes them as external initializers
    (:func:`graphopt.measure.ort.session`), and :func:`from_proto` as held arrays: a session or a
    clone of a large model then costs no serialized copy of its weights. Not a model to save.
    """
    proto = _model_to_proto(model, main_initializers=False)
    weights: dict[str, np.ndarray] = {}
    for value in model.graph.initializers.values():
        held = value.held_array
        if held is None or held.nbytes < _DETACH_MIN_BYTES or not held.flags.c_contiguous \
                or onnx.helper.np_dtype_to_tensor_dtype(held.dtype) not in _DETACHABLE_TYPES:
            proto.graph.initializer.append(value.tensor_proto())
            continue
        tp = proto.graph.initializer.add(name=value.name, dims=held.shape,
                                         data_type=onnx.helper.np_dtype_to_tensor_dtype(held.dtype))
        tp.data_location = onnx.TensorProto.EXTERNAL
        for key, entry in (("location", MEMORY_LOCATION), ("length", str(held.nbytes))):
            tp.external_data.add(key=key, value=entry)
        weights[value.name] = held
    return proto, weights


def by_reference(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A whole ModelProto (the caller's to give up: it is emptied) in :func:`shared_proto`'s form: its
    large plain main-graph weights decoded once into read-only arrays, stubs in a new small proto."""
    weights = _detach_weights(proto)
    for tp in proto.graph.initializer:
        if tp.name in weights:
            tp.data_location = onnx.TensorProto.EXTERNAL
            for key, entry in (("location", MEMORY_LOCATION), ("length", str(weights[tp.name].nbytes))):
                tp.external_data.add(key=key, value=entry)
    return (_reparsed(proto) if weights else proto), weights


def is_in_memory(tp: onnx.TensorProto) -> bool:
    """Whether ``tp`` is a stub of :func:`shared_proto`, whose data is passed by reference."""
    return tp.data_location == onnx.TensorProto.EXTERNAL and any(
        entry.key == "location" and entry.value == MEMORY_LOCATION for entry in tp.external_data)


def inline_weights(proto: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of a :func:`shared_proto` proto with its by-reference ``weights`` written in: a model that
    stands alone (to serialize for another process)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for tp in out.graph.initializer:
        if is_in_memory(tp):
            tp.ClearField("data_location")
            del tp.external_data[:]
            tp.raw_data = np.ascontiguousarray(weights[tp.name]).tobytes()
    return out


def clone_model(model: Model) -> Model:
    """An independent copy of ``model`` through the exact proto round trip, sharing its held
    (read-only) weight arrays instead of serializing and decoding them again."""
    proto, weights = shared_proto(model)
    copy = from_proto(proto, weights=weights)
    copy.uses_external_data = model.uses_external_data
    return copy


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


def _graph_to_proto(graph: Graph, weights: bool = True, gp: onnx.GraphProto | None = None,
                    initializers: bool = True) -> onnx.GraphProto:
    """Fill ``gp`` (a new GraphProto by default); ``initializers=False`` leaves out the dense initializers."""
    gp = onnx.GraphProto() if gp is None else gp
    _copy_fields(graph.extras, gp, skip=set())
    order = graph.toposort()
    for n in order:
        _node_to_proto(n, weights, gp.node.add())
    gp.input.extend(_value_info(v) for v in graph.inputs)
    gp.output.extend(_output_info(graph))
    for value in graph.initializers.values() if initializers else ():
        stub = None if weights else _weight_stub(value)
        gp.initializer.append(stub if stub is not None else value.tensor_proto())
    for value in graph.sparse_initializers.values():
        sp = onnx.SparseTensorProto()
        sp.CopyFrom(value.sparse_const)
        sp.values.name = value.name
        gp.sparse_initializer.append(sp)
    gp.value_info.extend(_value_info_list(graph, order))
    return gp


def _output_info(graph: Graph) -> list[onnx.ValueInfoProto]:
    kept = getattr(graph, "kept_output_info", {})
    infos = []
    for index, value in enumerate(graph.outputs):
        entry = kept.get(index)
        if entry is not None and entry[0] is value and entry[1] is value.type:
            infos.append(entry[2])
        else:
            infos.append(_value_info(value))
    return infos


def _value_info_list(graph: Graph, order: list[Node]) -> list[onnx.ValueInfoProto]:
    """The graph's ``value_info``: the source's entries in source order, then new typed values.

    A source entry stays even without a type; values produced in this graph that are graph outputs are
    described in ``output`` instead.
    """
    listed = [(order, _current_info(graph, vi)) for order, vi in getattr(graph, "orphan_value_info", ())]
    new = []
    for node in order:
        for value in node.outputs:
            if value is None or graph.is_graph_output(value):
                continue
            if value.info_order is not None:
                listed.append((value.info_order, _value_info(value)))
            elif value.type is not None:
                new.append(_value_info(value))
    listed.sort(key=lambda item: item[0])
    return [vi for _, vi in listed] + new


def _current_info(graph: Graph, vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """A source ``value_info`` entry kept verbatim, unless it describes an initializer whose tensor changed
    shape or type since (a pruned weight): a stale entry would contradict the tensor and fail shape inference."""
    value = graph.initializers.get(vi.name)
    if value is None or value.type is None or not vi.type.HasField("tensor_type"):
        return vi
    same = (vi.type.tensor_type.elem_type == value.dtype
            and tuple(d.dim_value for d in vi.type.tensor_type.shape.dim) == tuple(value.shape or ()))
    return vi if same else _value_info(value)


def _node_to_proto(node: Node, weights: bool = True, np_: onnx.NodeProto | None = None) -> onnx.NodeProto:
    np_ = onnx.NodeProto() if np_ is None else np_
    if node.extras is not None:  # first, so the IR's own name and domain below win over the stored ones
        _copy_fields(node.extras, np_, skip=set())
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
            _graph_to_proto(sub, weights, full.g)
        else:
            for g in sub:
                _graph_to_proto(g, weights, full.graphs.add())
    return np_


def _function_to_proto(fn: Function, fp: onnx.FunctionProto) -> onnx.FunctionProto:
    graph = fn.graph
    order = graph.toposort()
    _copy_fields(fn.extras, fp, skip=set())
    fp.input.extend(v.name for v in graph.inputs)
    fp.output.extend(v.name for v in graph.outputs)
    for n in order:
        _node_to_proto(n, True, fp.node.add())
    fp.value_info.extend(_value_info_list(graph, order))
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

    The file holds the bytes ``to_proto(model).SerializeToString()`` (or, for a ModelProto, its own
    ``SerializeToString()``) would give, but streamed (see :class:`_StreamWriter`): no second copy of
    the weights is made, and a model over 2 GB can be written. With external data, the main graph's
    initializers stored as ``raw_data`` of at least ``size_threshold`` bytes go to the data file;
    subgraph weights stay inline. A ModelProto is never modified.

    Raises
    ------
    GraphoptError
        ``external_data=False`` for a model over protobuf's 2 GB limit.
    """
    path = Path(path)
    writer = _StreamWriter.of_model(model) if isinstance(model, Model) else _StreamWriter.of_proto(model)
    if external_data is None:
        external_data = getattr(model, "uses_external_data", False) or writer.inline_size() > PROTOBUF_LIMIT
    if not external_data and writer.inline_size() > PROTOBUF_LIMIT:
        raise GraphoptError(f"{path}: the model is {writer.inline_size()} bytes, over protobuf's 2 GB limit; "
                            f"save it with external data")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_model = tmpdir / path.name
        data_name = path.name + ".data"
        with open(tmp_model, "wb") as fh:
            if external_data:
                with open(tmpdir / data_name, "wb") as data:
                    writer.write(fh, _ExternalData(data, data_name, size_threshold))
            else:
                writer.write(fh)
        data_file = tmpdir / data_name
        if data_file.exists() and data_file.stat().st_size == 0:
            data_file.unlink()  # nothing was large enough to move out, as with onnx.save_model
        if data_file.exists():
            os.replace(data_file, path.parent / data_name)
        os.replace(tmp_model, path)
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()


def serialized_size(model: Model | onnx.ModelProto) -> int:
    """Bytes of ``model`` serialized without external data, also past protobuf's 2 GiB limit (where
    ``ModelProto.ByteSize()`` raises)."""
    if isinstance(model, onnx.ModelProto):
        try:
            return model.ByteSize()
        except google.protobuf.message.EncodeError:
            return _StreamWriter.of_proto(model).inline_size()
    return _StreamWriter.of_model(model).inline_size()


def fits_protobuf(model: Model | onnx.ModelProto) -> bool:
    """Whether ``model`` can be serialized as one protobuf message (onnx and onnxruntime take it in memory)."""
    return serialized_size(model) <= PROTOBUF_LIMIT


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field_header(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


_MODEL_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number


class _ExternalData:
    """Where :class:`_StreamWriter` puts large raw tensors: one data file, tensors back to back."""

    def __init__(self, fh: BinaryIO, location: str, size_threshold: int) -> None:
        self.fh, self.location, self.size_threshold = fh, location, size_threshold

    def wants(self, tp: onnx.TensorProto) -> bool:
        # Like onnx's convert_model_to_external_data: raw tensors only (typed fields stay inline).
        return tp.HasField("raw_data") and len(tp.raw_data) >= self.size_threshold

    def stub(self, tp: onnx.TensorProto, offset: int) -> onnx.TensorProto:
        stub = onnx.TensorProto()
        _copy_fields(tp, stub, skip={"raw_data", "data_location", "external_data"})
        # The entries onnx's set_external_data writes (it insists on raw_data being present, so not it).
        for key, text in (("location", self.location), ("offset", str(offset)), ("length", str(len(tp.raw_data)))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, text
        stub.data_location = onnx.TensorProto.EXTERNAL
        return stub


class _StreamWriter:
    """Writes ``to_proto(model).SerializeToString()`` without holding a second copy of the weights.

    The skeleton (the model without the main graph's dense initializers) is built as usual (an IR
    model is exported; a ModelProto's other fields are copied). The file is
    then the skeleton's fields before ``graph``, the graph field's header, the graph's fields before
    ``initializer`` (``node``, ``name``), each initializer serialized on its own, the graph's other
    fields, and the model's fields after ``graph``. Protobuf writes fields in field-number order and a
    message is the concatenation of its fields, so these are exactly the bytes ``SerializeToString``
    writes for the whole model (the tests compare them).
    """

    def __init__(self, skeleton: onnx.ModelProto, tensors: Callable[[], Iterator[onnx.TensorProto]]) -> None:
        self._tensors = tensors
        graph = skeleton.graph
        head, tail = onnx.ModelProto(), onnx.ModelProto()
        for field, value in skeleton.ListFields():
            if field.number != _MODEL_GRAPH_FIELD:
                _copy_fields_of(skeleton, head if field.number < _MODEL_GRAPH_FIELD else tail, field, value)
        self.model_head, self.model_tail = head.SerializeToString(), tail.SerializeToString()
        graph_bytes = graph.SerializeToString()
        for field, _ in graph.ListFields():
            if field.number < _GRAPH_INITIALIZER_FIELD:
                graph.ClearField(field.name)
        self.graph_tail = graph.SerializeToString()
        assert graph_bytes.endswith(self.graph_tail), "protobuf did not write fields in field-number order"
        self.graph_head = graph_bytes[:len(graph_bytes) - len(self.graph_tail)]
        self._inline: int | None = None

    @classmethod
    def of_model(cls, model: Model) -> _StreamWriter:
        """The writer of an IR model: its export without the main graph's initializers, then those."""
        return cls(_model_to_proto(model, main_initializers=False),
                   lambda: (value.tensor_proto() for value in model.graph.initializers.values()))

    @classmethod
    def of_proto(cls, proto: onnx.ModelProto) -> _StreamWriter:
        """The writer of a ModelProto, whose tensors it reads in place (never copied, never changed)."""
        skeleton = onnx.ModelProto()
        _copy_fields(proto, skeleton, skip={"graph"})
        _copy_fields(proto.graph, skeleton.graph, skip={"initializer"})
        return cls(skeleton, lambda: iter(proto.graph.initializer))

    def inline_size(self) -> int:
        """Bytes of the whole model written without external data."""
        if self._inline is None:
            tensors = sum(len(_field_header(_GRAPH_INITIALIZER_FIELD, n)) + n
                          for n in (tp.ByteSize() for tp in self._tensors()))
            graph = len(self.graph_head) + tensors + len(self.graph_tail)
            self._inline = len(self.model_head) + len(_field_header(_MODEL_GRAPH_FIELD, graph)) + graph \
                + len(self.model_tail)
        return self._inline

    def write(self, fh: BinaryIO, external: _ExternalData | None = None) -> None:
        # Two passes over the tensors: sizes (and data-file offsets) first, since the graph field's
        # length comes before its content; then the bytes. Only one tensor is serialized at a time.
        sizes, offset = [], 0
        for tp in self._tensors():
            if external is not None and external.wants(tp):
                sizes.append(external.stub(tp, offset).ByteSize())
                offset += len(tp.raw_data)
            else:
                sizes.append(tp.ByteSize())
        graph_size = len(self.graph_head) + len(self.graph_tail) \
            + sum(len(_field_header(_GRAPH_INITIALIZER_FIELD, n)) + n for n in sizes)
        fh.write(self.model_head)
        fh.write(_field_header(_MODEL_GRAPH_FIELD, graph_size))
        fh.write(self.graph_head)
        offset = 0
        for tp, size in zip(self._tensors(), sizes):
            if external is not None and external.wants(tp):
                external.fh.write(tp.raw_data)
                tp, offset = external.stub(tp, offset), offset + len(tp.raw_data)
            data = tp.SerializeToString()
            assert len(data) == size, f"tensor {tp.name!r} changed while it was written"
            fh.write(_field_header(_GRAPH_INITIALIZER_FIELD, size))
            fh.write(data)
            del data
        fh.write(self.graph_tail)
        fh.write(self.model_tail)


def _copy_fields_of(src: google.protobuf.message.Message, dst: google.protobuf.message.Message, field,
                    value) -> None:
    if field.is_repeated:
        getattr(dst, field.name).extend(value)
    elif field.message_type is not None:
        getattr(dst, field.name).CopyFrom(value)
    else:
        setattr(dst, field.name, value)


def round_trip(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``to_proto(from_proto(proto))`` — handy in tests and sweeps."""
    return to_proto(from_proto(proto))
