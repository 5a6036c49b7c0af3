"""The intermediate representation: ONNX graphs as bipartite ``networkx.MultiDiGraph``\\ s.

A :class:`Graph` holds two kinds of networkx nodes:

* :class:`Node` — one ONNX operator;
* :class:`Value` — one tensor name (a graph input, an initializer, or an operator output).

Edges run ``Value -> Node`` (the node reads the value; the edge key is the input slot, so ``Mul(x, x)``
is two edges with keys 0 and 1) and ``Node -> Value`` (the node writes the value; key = output slot).
A node that holds subgraphs (If / Loop / Scan) and whose subgraphs read a value of an enclosing scope
gets a *capture* edge ``Value -> Node`` with key ``("capture", name)``: use-def queries, dead-code
analysis and the topological order then see that dependency like any other.

Invariants (checked by :meth:`Graph.check_invariants`):

1. ``node.inputs[i] is v`` iff there is an edge ``v -> node`` with key ``i``; the same for outputs.
2. A value has at most one producer, and a value with a producer is neither a graph input nor an
   initializer.
3. A value name is defined once along every chain of enclosing scopes (ONNX forbids shadowing; sibling
   subgraphs read from a file may reuse a local name). The main graph and all its subgraphs share one
   :class:`Namer`, so every name the IR hands out is unique across all of them; each local function has
   its own.
4. The graph is acyclic.

Value objects are shared between a graph and the subgraphs that capture them: a subgraph's networkx
graph contains the captured outer :class:`Value` itself, with no producer there. Arrays held by values
are read-only; a pass that changes a weight makes a new array (and, if the weight has other consumers,
a new value), so a shallow copy of the graph never aliases a mutation.

All mutation goes through :class:`Graph` methods, which keep edges, lists and names consistent.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import networkx as nx
import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.core.errors import IRError

CAPTURE = "capture"

# Attribute types whose payload is a subgraph (or a list of them).
_GRAPH_ATTR_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


class Namer:
    """The naming authority of one scope: hands out unique value and node names.

    ``fresh("conv1_fused")`` returns the hint itself when it is free and ``conv1_fused_1``,
    ``conv1_fused_2``... otherwise. The counter per hint makes the result deterministic.
    """

    def __init__(self) -> None:
        self.values: set[str] = set()
        self.nodes: set[str] = set()
        self._next: dict[tuple[str, str], int] = {}

    def _fresh(self, taken: set[str], kind: str, hint: str) -> str:
        hint = hint or kind
        if hint not in taken:
            taken.add(hint)
            return hint
        base = re.sub(r"_\d+$", "", hint)
        n = self._next.get((kind, base), 1)
        while f"{base}_{n}" in taken:
            n += 1
        self._next[(kind, base)] = n + 1
        name = f"{base}_{n}"
        taken.add(name)
        return name

    def value_name(self, hint: str) -> str:
        return self._fresh(self.values, "v", hint)

    def node_name(self, hint: str) -> str:
        return self._fresh(self.nodes, "n", hint)



def dims_of(tp: onnx.TypeProto | None) -> tuple[int | str | None, ...] | None:
    """The dims of a tensor type: an ``int`` when static, the symbol (``dim_param``) when named, ``None``
    when unknown; ``None`` when the type is not a tensor or its rank is unknown. The one place a
    ``TypeProto`` becomes dims.

    A negative ``dim_value`` is unknown too: Paddle's exporter (and others) write a dynamic dim as
    ``-1``, which no tensor can have."""
    if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    return tuple((d.dim_value if d.dim_value >= 0 else None) if d.HasField("dim_value") else (d.dim_param or None)
                 for d in tp.tensor_type.shape.dim)


class Value:
    """A tensor (or sequence/optional/map) name in a graph.

    Attributes
    ----------
    name : str
    type : onnx.TypeProto or None
        Full type; ``None`` when unknown. :attr:`dtype` and :attr:`shape` read it for tensors.
    const : onnx.TensorProto or None
        The stored tensor when the value is an initializer (kept as loaded, so an untouched weight
        is written back bit for bit, including its data layout).
    sparse_const : onnx.SparseTensorProto or None
        The stored tensor of a sparse initializer.
    info : onnx.ValueInfoProto or None
        ``doc_string`` / ``metadata_props`` of the value's ValueInfoProto (name and type live above).
    info_order : int or None
        Position in the source graph's ``value_info`` list, so export keeps that order.
    """

    __slots__ = ("name", "type", "const", "sparse_const", "_array", "info", "info_order", "__weakref__")

    def __init__(self, name: str, type: onnx.TypeProto | None = None) -> None:
        self.name = name
        self.type = type
        self.const: onnx.TensorProto | None = None
        self.sparse_const: onnx.SparseTensorProto | None = None
        self._array: np.ndarray | None = None
        self.info: onnx.ValueInfoProto | None = None
        self.info_order: int | None = None

    def __repr__(self) -> str:
        return f"Value({self.name!r}, dtype={self.dtype}, shape={self.shape})"

    # --- type ------------------------------------------------------------------------------
    @property
    def dtype(self) -> int | None:
        """ONNX element type (``onnx.TensorProto.FLOAT`` ...) of a tensor value, else ``None``."""
        if self.const is not None:
            return self.const.data_type
        if self._array is not None:
            return helper.np_dtype_to_tensor_dtype(self._array.dtype)
        if self.type is not None and self.type.HasField("tensor_type"):
            return self.type.tensor_type.elem_type or None
        return None

    @property
    def shape(self) -> tuple[int | str | None, ...] | None:
        """Dims of a tensor value: ints, symbolic names, or ``None`` per unknown dim; ``None`` if rank unknown."""
        if self.const is not None:
            return tuple(self.const.dims)
        if self._array is not None:
            return self._array.shape
        return dims_of(self.type)

    def set_tensor_type(self, dtype: int | None, shape: Sequence[int | str | None] | None) -> None:
        """Set the value's type to a tensor of ``dtype`` and ``shape`` (``None`` = unknown)."""
        if dtype is None:
            self.type = None
            return
        self.type = helper.make_tensor_type_proto(dtype, None if shape is None else list(shape))

    # --- constant payload --------------------------------------------------------------------
    @property
    def is_initializer(self) -> bool:
        return self.const is not None or self._array is not None or self.sparse_const is not None

    @property
    def array(self) -> np.ndarray:
        """The initializer's data as a read-only numpy array (materialised lazily, once)."""
        if self._array is None:
            if self.const is not None:
                arr = numpy_helper.to_array(self.const)
            elif self.sparse_const is not None:
                arr = _densify(self.sparse_const)
            else:
                raise IRError(f"value {self.name!r} is not an initializer")
            arr.flags.writeable = False
            self._array = arr
        return self._array

    def hold_decoded(self, array: np.ndarray) -> None:
        """Hold an untouched initializer as its decoded, read-only ``array`` alone, without a TensorProto.

        For a *plain* tensor (name, dims, type and ``raw_data``, nothing else) this loses nothing:
        :meth:`tensor_proto` writes ``numpy_helper.from_array(array, name)``, the same bytes. A large
        model would otherwise hold every weight twice, as the loaded proto and as the array the passes
        read. ``array`` is not copied, so a clone can share it (it is read-only; :meth:`set_array`
        replaces, never writes into, it). The type stays what the graph declared.
        """
        if array.flags.writeable:
            raise IRError(f"value {self.name!r}: a held array must be read-only")
        self._array = array
        self.const = None
        self.sparse_const = None

    @property
    def held_array(self) -> np.ndarray | None:
        """The array when it is the initializer's only payload (no stored proto), else ``None``."""
        return self._array if self.const is None and self.sparse_const is None else None

    def set_array(self, array: np.ndarray) -> None:
        """Replace the stored tensor. Only :class:`Graph` calls this (it checks for sharing)."""
        arr = np.array(array, copy=True)
        arr.flags.writeable = False
        self._array = arr
        self.const = None
        self.sparse_const = None
        self.type = helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))

    def tensor_proto(self) -> onnx.TensorProto:
        """The initializer as a TensorProto named like the value (the stored one when untouched)."""
        if self.const is not None:
            if self.const.name != self.name:
                tp = onnx.TensorProto()
                tp.CopyFrom(self.const)
                tp.name = self.name
                return tp
            return self.const
        tp = numpy_helper.from_array(self.array, self.name)
        return tp


def _densify(sp: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sp.values)
    dense = np.zeros(tuple(sp.dims), dtype=values.dtype)
    idx = numpy_helper.to_array(sp.indices).astype(np.int64)
    if idx.ndim == 1:  # linearised indices
        dense.reshape(-1)[idx] = values
    else:  # [NNZ, rank] coordinates
        dense[tuple(idx.T)] = values
    return dense


class Node:
    """One ONNX operator.

    ``inputs`` / ``outputs`` are lists of :class:`Value` or ``None`` (an omitted optional input or
    output, written ``""`` in ONNX). ``attrs`` maps names to ``AttributeProto`` in source order; for
    graph-valued attributes the proto's payload is empty and the :class:`Graph` objects live in
    ``subgraphs`` (a list for ``GRAPHS``). ``extras`` keeps every other NodeProto field (doc_string,
    overload, metadata_props, device configurations) untouched.
    """

    __slots__ = ("op_type", "domain", "name", "inputs", "outputs", "attrs", "subgraphs", "extras", "seq", "graph",
                 "__weakref__")

    def __init__(self, op_type: str, domain: str = "", name: str = "") -> None:
        self.op_type = op_type
        self.domain = domain
        self.name = name
        self.inputs: list[Value | None] = []
        self.outputs: list[Value | None] = []
        self.attrs: dict[str, onnx.AttributeProto] = {}
        self.subgraphs: dict[str, Graph | list[Graph]] = {}
        self.extras: onnx.NodeProto | None = None
        self.seq: tuple[int, int] = (0, 0)
        self.graph: Graph | None = None

    def __repr__(self) -> str:
        return f"Node({self.op_type}, {self.name!r})"

    def attr(self, name: str, default: Any = None) -> Any:
        """The attribute's Python value (ints, floats, bytes, lists, TensorProto...), or ``default``."""
        if name in self.subgraphs:
            return self.subgraphs[name]
        proto = self.attrs.get(name)
        if proto is None:
            return default
        return helper.get_attribute_value(proto)

    def set_attr(self, name: str, value: Any) -> None:
        """Set a (non-graph) attribute from a Python value, keeping its position if it existed."""
        self.attrs[name] = helper.make_attribute(name, value)

    def del_attr(self, name: str) -> None:
        self.attrs.pop(name, None)

    def iter_subgraphs(self) -> Iterator[Graph]:
        for g in self.subgraphs.values():
            if isinstance(g, Graph):
                yield g
            else:
                yield from g


class _CountedGraph(nx.MultiDiGraph):
    """A ``MultiDiGraph`` that counts its structural changes (``version``), so that a query as costly as
    the topological order can be cached until the next change. Every networkx method that adds or
    removes nodes or edges (``_MUTATORS``) is wrapped to count."""

    version = 0


_MUTATORS = ("add_node", "add_nodes_from", "remove_node", "remove_nodes_from", "add_edge", "add_edges_from",
             "remove_edge", "remove_edges_from", "update", "clear", "clear_edges")


def _counting(name: str):
    base = getattr(nx.MultiDiGraph, name)

    def method(self, *args, **kwargs):
        self.version += 1
        return base(self, *args, **kwargs)
    method.__name__ = name
    return method


for _name in _MUTATORS:
    setattr(_CountedGraph, _name, _counting(_name))


class Graph:
    """One ONNX graph (the main graph, a subgraph, or a function body) on a networkx MultiDiGraph.

    Parameters
    ----------
    namer : Namer
        The scope's naming authority, shared with enclosing and nested graphs.
    parent : Node or None
        The node whose attribute holds this graph (``None`` for the main graph and function bodies).
    """

    def __init__(self, namer: Namer | None = None, parent: Node | None = None) -> None:
        self.nx = _CountedGraph()
        self._order: tuple[int, list[Node]] | None = None  # (nx version, toposort) cache
        self.namer = namer or Namer()
        self.parent = parent
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.initializers: dict[str, Value] = {}
        self.sparse_initializers: dict[str, Value] = {}
        self.extras = onnx.GraphProto()  # name, doc_string, quantization_annotation, metadata_props
        self._seq = itertools.count(1)
        self._minor = itertools.count(1)
        self._depth: dict[Node, int] | None = None  # see _depths()

    # ===== queries ==============================================================================
    @property
    def name(self) -> str:
        return self.extras.name

    @property
    def nodes(self) -> list[Node]:
        """Op nodes in deterministic topological order (a fresh list: safe to mutate while iterating)."""
        return self.toposort()

    def __len__(self) -> int:
        return sum(1 for n in self.nx if isinstance(n, Node))

    def values(self) -> Iterator[Value]:
        """Every value this graph knows, captured outer values included."""
        return (n for n in self.nx if isinstance(n, Value))

    def producer(self, value: Value) -> Node | None:
        """The node that writes ``value`` in this graph, or ``None`` (input, initializer, captured)."""
        if value not in self.nx:
            return None
        for node in self.nx.predecessors(value):
            return node
        return None

    def uses(self, value: Value) -> list[tuple[Node, int | tuple[str, str]]]:
        """``(node, slot)`` for every read of ``value`` here; capture reads have slot ``("capture", name)``."""
        if value not in self.nx:
            return []
        return [(node, key) for _, node, key in self.nx.out_edges(value, keys=True)]

    def consumers(self, value: Value) -> list[Node]:
        """Distinct nodes that read ``value`` (directly, or inside their subgraphs), in edge order."""
        seen: dict[Node, None] = {}
        for node, _ in self.uses(value):
            seen.setdefault(node, None)
        return list(seen)

    def is_graph_output(self, value: Value) -> bool:
        return any(v is value for v in self.outputs)

    def is_graph_input(self, value: Value) -> bool:
        return any(v is value for v in self.inputs)

    def is_captured(self, value: Value) -> bool:
        """True when ``value`` belongs to an enclosing scope (read here, defined outside)."""
        return (value in self.nx and self.producer(value) is None and not self.is_graph_input(value)
                and value.name not in self.initializers and value.name not in self.sparse_initializers)

    def captured_values(self) -> list[Value]:
        return [v for v in self.values() if self.is_captured(v)]

    def constant_array(self, value: Value | None) -> np.ndarray | None:
        """The array of an initializer or a ``Constant`` node's output, else ``None``.

        An initializer that is also a graph input is *not* constant (the caller may override it), also when
        a subgraph reads it from an enclosing scope.
        """
        if value is None:
            return None
        if value.is_initializer and not self._is_overridable(value):
            return value.array
        node = self.producer(value)
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return _constant_node_array(node)
        return None

    def _is_overridable(self, value: Value) -> bool:
        """Whether ``value`` is a graph input of this graph or of an enclosing one."""
        graph: Graph | None = self
        while graph is not None:
            if graph.is_graph_input(value):
                return True
            graph = graph.parent.graph if graph.parent is not None else None
        return False

    def walk(self) -> Iterator[Graph]:
        """This graph and every nested subgraph, outermost first."""
        yield self
        for node in self.toposort():
            for sub in node.iter_subgraphs():
                yield from sub.walk()

    def toposort(self) -> list[Node]:
        """Op nodes in topological order; ties broken by ``node.seq`` (source order for loaded nodes).

        For a model whose node list is already topologically sorted this reproduces that list exactly.
        """
        # Cached until the graph's structure changes: a node's seq is fixed before it is added.
        if self._order is not None and self._order[0] == self.nx.version:
            return list(self._order[1])

        def key(n: Node | Value) -> tuple[int, int]:
            return n.seq if isinstance(n, Node) else (-1, 0)
        try:
            order = [n for n in nx.lexicographical_topological_sort(self.nx, key=key) if isinstance(n, Node)]
        except nx.NetworkXUnfeasible as exc:
            raise IRError(f"graph {self.name!r} has a cycle") from exc
        self._order = (self.nx.version, order)
        return list(order)

    # ===== construction (used by the loader and by passes) ======================================
    def _attach_value(self, value: Value) -> Value:
        if value not in self.nx:
            self.nx.add_node(value)
        return value

    def new_value(self, hint: str, dtype: int | None = None, shape: Sequence[int | str | None] | None = None) -> Value:
        """A fresh value with a unique name derived from ``hint`` (not yet attached to any node)."""
        v = Value(self.namer.value_name(hint))
        if dtype is not None:
            v.set_tensor_type(dtype, shape)
        return self._attach_value(v)

    def add_input(self, value: Value) -> Value:
        self._attach_value(value)
        self.inputs.append(value)
        return value

    def add_initializer(self, array: np.ndarray, hint: str) -> Value:
        """A new initializer value holding ``array`` (copied, read-only) under a unique name."""
        v = Value(self.namer.value_name(hint))
        v.set_array(array)
        self.initializers[v.name] = v
        return self._attach_value(v)

    def add_node(self, op_type: str, inputs: Sequence[Value | None], outputs: int | Sequence[Value | None | str] = 1,
                 attrs: dict[str, Any] | None = None, name: str = "", domain: str = "",
                 anchor: Node | None = None) -> Node:
        """Create a node and wire it.

        Parameters
        ----------
        inputs : values (or ``None`` for an omitted optional input).
        outputs : a count of fresh outputs, or a list of existing unproduced values, ``None`` for omitted
            outputs, or strings used as name hints for fresh values.
        attrs : attribute name -> Python value (made with ``onnx.helper.make_attribute``).
        name : name hint for the node (made unique).
        anchor : place the node at ``anchor``'s position in the export order (ties of the topological
            sort), so a rewrite keeps the file's layout stable. Default: after every existing node.
        """
        node = Node(op_type, domain, self.namer.node_name(name or op_type))
        node.seq = (anchor.seq[0], next(self._minor)) if anchor is not None else (next(self._seq) + 10**9, 0)
        node.graph = self
        self.nx.add_node(node)
        for attr_name, attr_value in (attrs or {}).items():
            node.set_attr(attr_name, attr_value)
        for slot, value in enumerate(inputs):
            node.inputs.append(None)
            if value is not None:
                self.set_input(node, slot, value)
        if self._depth is not None:
            self._depth[node] = 1 + max((self._depth[p] for p in self._readers_of(node)), default=0)
        specs: Sequence[Value | None | str] = [node.name] * outputs if isinstance(outputs, int) else outputs
        for slot, spec in enumerate(specs):
            if isinstance(spec, str):
                hint = spec if not isinstance(outputs, int) else (spec if outputs == 1 else f"{spec}_{slot}")
                spec = self.new_value(hint)
            node.outputs.append(None)
            if spec is not None:
                self._set_output(node, slot, spec)
        return node

    def _set_output(self, node: Node, slot: int, value: Value) -> None:
        self._attach_value(value)
        if self.producer(value) is not None:
            raise IRError(f"value {value.name!r} already has a producer")
        node.outputs[slot] = value
        self.nx.add_edge(node, value, key=slot)
        if self._depth is not None:
            for reader in self.consumers(value):
                self._note_edge(node, reader)

    def set_input(self, node: Node, slot: int, value: Value | None) -> None:
        """Make ``node`` read ``value`` at input ``slot`` (``None`` omits that optional input)."""
        while len(node.inputs) <= slot:
            node.inputs.append(None)
        old = node.inputs[slot]
        if old is not None:
            self.nx.remove_edge(old, node, key=slot)
        node.inputs[slot] = value
        if value is not None:
            self._attach_value(value)
            self.nx.add_edge(value, node, key=slot)
            if self._depth is not None:
                self._note_edge(self.producer(value), node)

    def add_capture(self, node: Node, value: Value) -> None:
        """Record that a subgraph of ``node`` reads ``value`` of this (or an enclosing) scope."""
        self._attach_value(value)
        if not self._capture_keys(value, node):
            self.nx.add_edge(value, node, key=(CAPTURE, value.name))
            if self._depth is not None:
                self._note_edge(self.producer(value), node)

    def _capture_keys(self, value: Value, node: Node) -> list[tuple[str, str]]:
        # Keys carry the value's name at capture time; a later rename must not hide the edge.
        if value not in self.nx:
            return []
        return [k for k in (self.nx.get_edge_data(value, node) or {}) if isinstance(k, tuple)]

    # ===== depths (cheap cycle checks) ==========================================================
    def _readers_of(self, node: Node) -> Iterator[Node]:
        """The nodes whose outputs ``node`` reads (directly or through its subgraphs' captures)."""
        for value in self.nx.predecessors(node):
            yield from self.nx.predecessors(value)

    def _depths(self) -> dict[Node, int]:
        """Each node's depth: one more than the deepest node it reads from.

        Only a path from a deeper node to a shallower one is impossible, so a new edge ``u -> v`` with
        ``depth[u] < depth[v]`` cannot close a cycle, and :meth:`replace_all_uses` searches the graph only
        when that test fails. The map is a cache: :meth:`add_node` extends it, removals keep it valid, and
        an edge that breaks ``depth[u] < depth[v]`` drops it (recomputed on the next call). Mutating
        ``self.nx`` behind the IR's back leaves it stale.
        """
        if self._depth is None:
            depth: dict[Node, int] = {}
            try:
                order = list(nx.topological_sort(self.nx))
            except nx.NetworkXUnfeasible as exc:
                raise IRError(f"graph {self.name!r} has a cycle") from exc
            for item in order:
                if isinstance(item, Node):
                    depth[item] = 1 + max((depth[p] for p in self._readers_of(item)), default=0)
            self._depth = depth
        return self._depth

    def _note_edge(self, producer: Node | None, reader: Node) -> None:
        """Keep :meth:`_depths` valid after ``reader`` started to read an output of ``producer``."""
        depth = self._depth
        if depth is None or producer is None or reader not in depth:  # add_node sets a new node's depth
            return
        if depth.get(producer, depth[reader]) >= depth[reader]:
            self._depth = None

    # ===== mutation =============================================================================
    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Every read of ``old`` in this graph (and in subgraphs that capture it) now reads ``new``.

        When ``old`` is an output of the main graph, the model's interface is kept: ``new`` takes over
        ``old``'s name (and ``old`` gets a fresh one). That is impossible when ``new`` is itself a
        graph input, an initializer or another output; use :meth:`can_replace` first.

        Raises
        ------
        IRError
            If the replacement would rename the model's interface, make a subgraph output an outer value,
            or create a cycle.
        """
        if old is new:
            return
        if not self.can_replace(old, new):
            raise IRError(f"cannot replace {old.name!r} by {new.name!r}: {new.name!r} cannot take over the output name")
        new_producer = self.producer(new)
        readers = self.consumers(old)
        if new_producer is not None and readers:
            depth = self._depths()
            shallow = [r for r in readers if depth[r] <= depth[new_producer]]  # the only ones that may reach it
            for reader in shallow:
                if reader is new_producer or nx.has_path(self.nx, reader, new_producer):
                    raise IRError(f"cannot replace {old.name!r} by {new.name!r}: {new.name!r} is computed from "
                                  f"{reader!r}, which reads {old.name!r} (the graph would have a cycle)")
        for node, slot in list(self.uses(old)):
            if isinstance(slot, tuple):
                self.nx.remove_edge(old, node, key=slot)
                for sub in node.iter_subgraphs():
                    if old in sub.nx:
                        sub.replace_all_uses(old, new)
                self.add_capture(node, new)
            else:
                self.set_input(node, slot, new)
        if self.is_graph_output(old):
            self.outputs = [new if v is old else v for v in self.outputs]
            if self.parent is None and not self._is_function_body():
                self._swap_names(old, new)
        self._release_capture(old)

    def can_replace(self, old: Value, new: Value) -> bool:
        """Whether :meth:`replace_all_uses` can keep the graph's outputs valid (see :meth:`replace_refusal`)."""
        return self.replace_refusal(old, new) is None

    def replace_refusal(self, old: Value, new: Value) -> str | None:
        """Why ``old`` cannot be replaced by ``new`` everywhere, or ``None`` when it can.

        The main graph keeps its output names, so ``new`` must be free to take one over. A subgraph's
        outputs are positional, but must be defined in the subgraph itself (the ONNX checker refuses an
        outer value as a subgraph output), unless ``old`` already was an outer value. In no graph may
        two outputs become one value: the checker accepts a repeated output name, but onnxruntime 1.31
        then returns wrong values for one of them.
        """
        if not self.is_graph_output(old):
            return None
        if self.is_graph_output(new):
            return f"{old.name!r} and {new.name!r} are both outputs of graph {self.name!r}"
        if self.parent is not None:
            if (new in self.nx and not self.is_captured(new)) or self.is_captured(old):
                return None
            return f"subgraph {self.name!r} cannot output {new.name!r}, a value of an enclosing graph"
        if self._is_function_body():
            return None
        for kind, applies in (("a graph input", self.is_graph_input(new)), ("an initializer", new.is_initializer),
                              ("a value of an enclosing graph", self.is_captured(new))):
            if applies:
                return f"{old.name!r} is a model output and {new.name!r} ({kind}) cannot take its name"
        return None

    def _is_function_body(self) -> bool:
        return getattr(self, "function", None) is not None

    def _swap_names(self, old: Value, new: Value) -> None:
        interface_name = old.name
        self.rename_value(old, interface_name + "_replaced")  # old may be an initializer: keep the table keyed
        new.name, interface_name = interface_name, new.name
        # ``new``'s previous name is free again only if nothing else holds it; names are cheap, keep it reserved.
        if old.info is not None and new.info is None:
            new.info = old.info
        if new.type is None:
            new.type = old.type

    def remove_node(self, node: Node, *, keep_outputs: bool = False) -> None:
        """Delete ``node``. Its outputs are deleted too unless ``keep_outputs`` (they must be unused)."""
        for value in node.outputs:
            if value is None:
                continue
            if not keep_outputs:
                if self.uses(value) or self.is_graph_output(value):
                    raise IRError(f"removing {node!r} would orphan {value.name!r}, still used")
                self.nx.remove_node(value)
        read = list(dict.fromkeys(u for u, _ in self.nx.in_edges(node)))
        self.nx.remove_node(node)
        if self._depth is not None:
            self._depth.pop(node, None)
        for value in read:
            self._release_capture(value)

    def _release_capture(self, value: Value) -> None:
        """Forget a captured value that nothing here reads any more (outer values are not ours to keep).

        The enclosing graph then drops its capture edge when no other subgraph of that node reads the value,
        and so on outwards, so no scope keeps a dependency that no longer exists.
        """
        if value not in self.nx or not self.is_captured(value) or self.uses(value) or self.is_graph_output(value):
            return
        self.nx.remove_node(value)
        owner = self.parent
        if owner is None or owner.graph is None or any(value in sub.nx for sub in owner.iter_subgraphs()):
            return
        outer = owner.graph
        for key in outer._capture_keys(value, owner):
            outer.nx.remove_edge(value, owner, key=key)
        outer._release_capture(value)

    def remove_initializer(self, value: Value) -> None:
        if self.uses(value) or self.is_graph_output(value):
            raise IRError(f"initializer {value.name!r} is still used")
        self.initializers.pop(value.name, None)
        self.sparse_initializers.pop(value.name, None)
        self.inputs = [v for v in self.inputs if v is not value]
        if value in self.nx:
            self.nx.remove_node(value)

    def set_initializer_array(self, value: Value, array: np.ndarray) -> None:
        """Change an initializer's data in place — allowed only when one node of this graph is its sole reader.

        A weight of an enclosing scope (captured here) is refused: other scopes may read it. A sparse
        initializer becomes a dense one.
        """
        if self.initializers.get(value.name) is not value and self.sparse_initializers.get(value.name) is not value:
            raise IRError(f"value {value.name!r} is not an initializer of graph {self.name!r}")
        if len(self.consumers(value)) > 1 or self.is_graph_output(value) or self.is_graph_input(value):
            raise IRError(f"initializer {value.name!r} is shared; make a new one instead of rewriting it")
        value.set_array(array)
        if self.sparse_initializers.pop(value.name, None) is not None:
            self.initializers[value.name] = value

    def set_trained_array(self, value: Value, array: np.ndarray) -> None:
        """New values for an initializer of this graph, of its dtype and shape, that are right for *every*
        reader: a weight trained jointly for all the nodes that share it (fine-tuning) stays one shared
        weight, which :meth:`set_initializer_array` refuses to rewrite for one reader."""
        if self.initializers.get(value.name) is not value and self.sparse_initializers.get(value.name) is not value:
            raise IRError(f"value {value.name!r} is not an initializer of graph {self.name!r}")
        array = np.asarray(array)
        if array.shape != tuple(value.shape or ()) or array.dtype != value.array.dtype:
            raise IRError(f"trained values for {value.name!r} are {array.dtype}{list(array.shape)}, "
                          f"not {value.array.dtype}{list(value.shape or ())}")
        if self.is_graph_input(value):
            raise IRError(f"initializer {value.name!r} is also a graph input (the caller may override it)")
        value.set_array(array)
        if self.sparse_initializers.pop(value.name, None) is not None:
            self.initializers[value.name] = value

    def rename_value(self, value: Value, hint: str) -> str:
        """Give ``value`` a fresh unique name derived from ``hint``; returns it."""
        was_init = self.initializers.pop(value.name, None)
        was_sparse = self.sparse_initializers.pop(value.name, None)
        value.name = self.namer.value_name(hint)
        if was_init is not None:
            self.initializers[value.name] = value
        if was_sparse is not None:
            self.sparse_initializers[value.name] = value
        return value.name

    # ===== invariants ===========================================================================
    def check_invariants(self) -> None:
        """Raise :class:`IRError` if the networkx graph and the node lists disagree, or on a cycle."""
        seen_names: dict[str, Value] = {}
        for item in self.nx:
            if isinstance(item, Node):
                self._check_node(item)
            else:
                self._check_value(item, seen_names)
        for v in self.outputs + self.inputs:
            if v not in self.nx:
                raise IRError(f"graph input/output {v.name!r} is not in the graph")
        for name, v in self.initializers.items():
            if v.name != name:
                raise IRError(f"initializer table key {name!r} != value name {v.name!r}")
        if not nx.is_directed_acyclic_graph(self.nx):
            raise IRError(f"graph {self.name!r} has a cycle")

    def _check_node(self, node: Node) -> None:
        """The node's input/output lists and its edges agree both ways; its subgraphs are sound."""
        if node.graph is not self:
            raise IRError(f"{node!r} belongs to another graph")
        self._check_edges(node)
        for sub in node.iter_subgraphs():
            if sub.parent is not node:
                raise IRError(f"subgraph of {node!r} has the wrong parent")
            for outer in sub.captured_values():
                if not self._capture_keys(outer, node):
                    raise IRError(f"{node!r}: subgraph reads {outer.name!r} without a capture edge")
            sub.check_invariants()

    def _check_edges(self, node: Node) -> None:
        for slot, v in enumerate(node.inputs):
            if v is not None and not self.nx.has_edge(v, node, key=slot):
                raise IRError(f"{node!r} input {slot} ({v.name!r}) has no edge")
        for slot, v in enumerate(node.outputs):
            if v is not None and not self.nx.has_edge(node, v, key=slot):
                raise IRError(f"{node!r} output {slot} ({v.name!r}) has no edge")
        for u, _, key in self.nx.in_edges(node, keys=True):
            if isinstance(key, tuple):
                if not any(u in sub.nx for sub in node.iter_subgraphs()):
                    raise IRError(f"{node!r} captures {u.name!r} but no subgraph reads it")
            elif key >= len(node.inputs) or node.inputs[key] is not u:
                raise IRError(f"edge {u.name!r}->{node!r} slot {key} not in the node's inputs")
        for _, v, key in self.nx.out_edges(node, keys=True):
            if key >= len(node.outputs) or node.outputs[key] is not v:
                raise IRError(f"edge {node!r}->{v.name!r} slot {key} not in the node's outputs")

    def _check_value(self, value: Value, seen_names: dict[str, Value]) -> None:
        """One value per name, at most one producer, and none for an input or initializer."""
        other = seen_names.setdefault(value.name, value)
        if other is not value:
            raise IRError(f"two values named {value.name!r}")
        producers = list(self.nx.predecessors(value))
        if len(producers) > 1:
            raise IRError(f"value {value.name!r} has {len(producers)} producers")
        if producers and (value.is_initializer or self.is_graph_input(value)):
            raise IRError(f"value {value.name!r} is produced by a node and is also an input/initializer")


def _constant_node_array(node: Node) -> np.ndarray | None:
    """The tensor a ``Constant`` node produces, for any of its attribute forms.

    ``None`` when the value comes from a function attribute (``ref_attr_name``): it is only known per call.
    """
    for attr_name, proto in node.attrs.items():
        if proto.ref_attr_name:
            return None
        if attr_name == "value":
            return numpy_helper.to_array(proto.t)
        if attr_name == "sparse_value":
            return _densify(proto.sparse_tensor)
        value = helper.get_attribute_value(proto)
        if attr_name in ("value_float", "value_int"):
            return np.array(value, dtype=np.float32 if attr_name == "value_float" else np.int64)
        if attr_name in ("value_floats", "value_ints"):
            return np.array(value, dtype=np.float32 if attr_name == "value_floats" else np.int64)
        if attr_name in ("value_string", "value_strings"):  # str, like numpy_helper.to_array of a string tensor
            return np.array(_decode(value), dtype=object)
    return None


def _decode(value: bytes | list[bytes]) -> str | list[str]:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return [v.decode("utf-8") for v in value]


class Function:
    """A model-local function: a body :class:`Graph` plus the FunctionProto's other fields in ``extras``."""

    def __init__(self, graph: Graph, extras: onnx.FunctionProto) -> None:
        self.graph = graph
        self.extras = extras
        graph.function = self  # type: ignore[attr-defined]

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.extras.domain, self.extras.name, self.extras.overload)


class Model:
    """A whole model: the main :class:`Graph`, local functions, and the ModelProto's other fields.

    ``extras`` is the source ModelProto minus ``graph`` and ``functions`` (ir_version, opset_import,
    producer, metadata_props, training_info...), written back unchanged.
    """

    def __init__(self, graph: Graph, extras: onnx.ModelProto | None = None,
                 functions: Iterable[Function] = ()) -> None:
        self.graph = graph
        self.extras = extras if extras is not None else onnx.ModelProto()
        self.functions = list(functions)
        self.uses_external_data = False

    @property
    def ir_version(self) -> int:
        return self.extras.ir_version

    def opset(self, domain: str = "") -> int | None:
        """The imported opset version of ``domain`` (``""`` and ``"ai.onnx"`` are the same), or None."""
        domains = {"", "ai.onnx"} if domain in ("", "ai.onnx") else {domain}
        for imp in self.extras.opset_import:
            if imp.domain in domains:
                return imp.version
        return None

    def clone(self) -> Model:
        """An independent copy, through the exact proto round trip: for trial rewrites and for keeping a
        reference while the model changes. Held (read-only) weight arrays are shared, not copied."""
        from graphopt.core.onnx_io import clone_model  # onnx_io builds on this module

        return clone_model(self)

    def graphs(self) -> Iterator[Graph]:
        """The main graph, all its subgraphs, then each function body and its subgraphs."""
        yield from self.graph.walk()
        for fn in self.functions:
            yield from fn.graph.walk()

    def node_count(self) -> int:
        return sum(len(g) for g in self.graphs())

    def check_invariants(self) -> None:
        self.graph.check_invariants()
        for fn in self.functions:
            fn.graph.check_invariants()
