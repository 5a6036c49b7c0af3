"""Static cost analysis: parameters, multiply-accumulates (MACs) and bytes, per node and per model.

:func:`analyze` walks the main graph and every subgraph (If/Loop/Scan bodies, each right after the
node that holds it) in topological order and returns a :class:`ModelCost`. Shapes come from
:func:`graphopt.core.shapes.inferred_types` with concrete sizes for dynamic input dims, so the IR is never
touched (batch 1 is not baked into the model).

Weights (params)
----------------
A *weight* is any constant tensor a node reads: an initializer or the output of a ``Constant`` node,
whatever its dtype (int64 shape tensors and int8 quantized weights count too, so that the total equals
the bytes the file stores). Each weight is counted once, attributed to its first consumer in the walk
order; a ``Constant`` node nothing reads keeps its own tensor. Initializers nothing reads are listed
in :attr:`ModelCost.unused_initializers` and still counted in the totals, so

    ``ModelCost.params == sum(n.params for n in per_node) + params of unused initializers``.

An initializer that is also a graph input (the IR < 4 way to store weights) counts as a weight: it is
stored in the file. Sparse initializers count their stored non-zeros (values + indices bytes).
Sub-byte types (int4, float4...) count packed bytes.

MACs (one multiply-accumulate = one multiply and one add; "elements" = number of elements)
------------------------------------------------------------------------------------------
================================  =================================================================
Conv, ConvInteger, QLinearConv    N·Cout·∏(out spatial)·(Cin/groups)·∏(kernel) = |Y|·∏(W.shape[1:]);
                                  the bias add is not counted
ConvTranspose                     N·Cin·∏(in spatial)·(Cout/groups)·∏(kernel) = |X|·∏(W.shape[1:])
Gemm                              M·N·K (transA/transB aware); α, β and the C add are not counted
MatMul, MatMulInteger,            ∏(broadcast batch dims)·M·N·K; a 1-D left operand is (1, K), a 1-D
QLinearMatMul                     right operand is (K, 1), as in numpy
Einsum (1 or 2 operands)          2 operands: size of the joint index space (∏ of every index's
                                  size, ellipsis dims broadcast); 1 operand: 0 for a pure
                                  permutation/diagonal, else |X| (a sum); 3+ operands: unknown
RNN, GRU, LSTM                    seq·batch·(|W| + |R|), i.e. per step and direction
                                  gates·hidden·(input + hidden); gate activations, element-wise
                                  products and biases are not counted
MaxPool, AveragePool, LpPool      |Y|·∏(kernel_shape)
GlobalAverage/Max/LpPool,         |X| (one accumulate per input element)
Reduce*, ArgMax, ArgMin, TopK
LRN                               |Y|·size
Resize, Upsample, GridSample      nearest: 0; linear: |Y|·2^d; cubic: |Y|·4^d, d = number of
                                  resized (Resize/Upsample) or sampled (GridSample) axes
Sum, Max, Min (n inputs)          (n−1)·|Y|;  Mean: n·|Y|
Element-wise ops, activations,    k·|Y| with k from :data:`PER_ELEMENT` — 1 for arithmetic, logic,
normalizations, Softmax           comparisons, activations (a transcendental function counts as
                                  one), Where, (De)QuantizeLinear and BatchNormalization
                                  (inference form y = a·x + b); 2 for LpNormalization,
                                  RMSNormalization; 3 for Layer/Instance/Group/MeanVariance
                                  normalization (mean, variance, normalize + affine) and for
                                  Softmax/LogSoftmax (exp, sum, divide)
Shape and data-movement ops       0 (:data:`ZERO_COST`: Reshape, Transpose, Concat, Slice, Gather,
                                  Cast, Pad, Shape, Identity, Dropout, Constant, If/Loop/Scan
                                  themselves...)
================================  =================================================================

A node's MACs are ``None`` (unknown, never a silent 0) when a shape the formula needs has a dynamic
dim that neither ``batch`` nor ``input_shapes`` fixes, when its op has no rule (custom domains,
model-local functions, Attention, RoiAlign...), and when it sits inside a Loop or Scan body and
costs anything per iteration (the trip count is not known statically). Both branches of an If are
counted (an upper bound: which one runs depends on data). :attr:`ModelCost.macs` is the sum when
every node is known and ``None`` otherwise; :attr:`ModelCost.macs_known` is then a lower bound and
:attr:`ModelCost.unknown_macs_nodes` names the culprits.

Sizes that depend on data (an If whose branches yield different lengths, a NonZero, a Resize whose
scales are computed) can be *observed*: :mod:`graphopt.measure.observed` runs the model once on a
sample and passes what it saw as an :class:`Observed` — the shapes of main-graph values no static
rule could size, and the condition of each main-graph If. Observed sizes fill in only where the
static shapes are not concrete; an If whose condition was observed counts the branch that ran, and
the other branch's nodes cost 0 MACs (their weights still count: the file stores them). The MACs are
then those of that sample, exact at the probe.

Local function bodies are not expanded: a call is one node with unknown MACs.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import onnx
from onnx import helper

from graphopt.core.errors import OptionError
from graphopt.core.ir import Graph, Model, Node, Value
from graphopt.core.numbers import format_count
from graphopt.core.shapes import ShapeView

Dims = tuple[int | str | None, ...]

# ====================================================================================================
# results


@dataclass
class TensorInfo:
    """A graph input or output: name, dtype name (``"float32"``...) and declared shape."""

    name: str
    dtype: str | None
    shape: Dims | None


@dataclass
class NodeCost:
    """The cost of one node.

    Attributes
    ----------
    name, op_type, domain : the node's identity (``name`` is ``"<op>#<index>"`` for unnamed nodes).
    scope : ``""`` for the main graph, else the path of the subgraph, e.g. ``"if_1.then_branch"``.
    params, param_bytes : elements and bytes of the weights attributed to this node.
    macs : multiply-accumulates, ``None`` when unknown (``note`` says why).
    output_shapes : one entry per output, dims as inferred (ints; names or ``None`` if dynamic).
    """

    name: str
    op_type: str
    domain: str = ""
    scope: str = ""
    params: int = 0
    param_bytes: int = 0
    macs: int | None = 0
    output_shapes: list[Dims | None] = field(default_factory=list)
    note: str = ""

    @property
    def qualified_name(self) -> str:
        return f"{self.scope}/{self.name}" if self.scope else self.name


@dataclass
class ModelCost:
    """Totals and per-node costs of a model (see the module docstring for the counting rules).

    Attributes
    ----------
    params, param_bytes : every weight counted once, unused initializers included.
    macs : total MACs, ``None`` if any node's MACs are unknown.
    macs_known : sum over the nodes whose MACs are known (a lower bound when ``macs`` is None).
    nodes : number of nodes, those inside subgraphs included.
    op_histogram : node count per op type (``"domain:op"`` outside the default domain).
    per_node : one :class:`NodeCost` per node, in walk order (topological, subgraphs after their node).
    inputs, outputs : the main graph's interface (initializer-backed inputs left out).
    unknown_macs_nodes : qualified names of the nodes whose MACs are unknown.
    unused_initializers : initializers no node reads (counted in the totals).
    batch : the size used for dynamic batch dims.
    warnings : things that made the analysis less precise (e.g. shape inference failed).
    file_bytes : size of the model file, filled in by callers that know it.
    observed : how many value sizes and If branches came from a run of a sample (:class:`Observed`).
    """

    params: int
    param_bytes: int
    macs: int | None
    macs_known: int
    nodes: int
    op_histogram: Counter[str]
    per_node: list[NodeCost]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    unknown_macs_nodes: list[str]
    unused_initializers: list[str]
    batch: int = 1
    warnings: list[str] = field(default_factory=list)
    file_bytes: int | None = None
    observed: int = 0

    def summary(self) -> dict[str, Any]:
        """The ``before``/``after`` entry of an optimize report.

        Keys ``params, macs, bytes, nodes, file_bytes``; when ``macs`` is unknown also ``macs_known``
        (a lower bound), ``unknown_macs_nodes`` (how many nodes are unknown), ``unknown_macs_ops``
        (how many of each op) and ``unknown_macs_reason`` (the first such node and why); when a run
        sized values, ``observed`` (how many values and If branches).
        """
        out: dict[str, Any] = {"params": self.params, "macs": self.macs, "bytes": self.param_bytes,
                               "nodes": self.nodes, "file_bytes": self.file_bytes}
        if self.macs is None:
            unknown = [n for n in self.per_node if n.macs is None]
            out["macs_known"] = self.macs_known
            out["unknown_macs_nodes"] = len(self.unknown_macs_nodes)
            out["unknown_macs_ops"] = dict(Counter(_op_key(n.domain, n.op_type) for n in unknown))
            out["unknown_macs_reason"] = f"{unknown[0].qualified_name}: {unknown[0].note}" if unknown else ""
        if self.observed:
            out["observed"] = self.observed
        return out

    def to_dict(self, per_node: bool = True) -> dict[str, Any]:
        """A JSON-serialisable dict (shapes become lists; ``per_node=False`` leaves the node list out)."""
        out = asdict(self)
        out["op_histogram"] = dict(self.op_histogram)
        if not per_node:
            del out["per_node"]
        return _jsonable(out)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# ====================================================================================================
# entry points


@dataclass(frozen=True)
class Observed:
    """What one onnxruntime run of a sample showed (:func:`graphopt.measure.observed.observe`).

    Attributes
    ----------
    shapes : concrete dims of main-graph values, by name (used where the static shape is not concrete).
    conditions : the boolean each main-graph If's condition value held, by the condition's name.
    """

    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    conditions: Mapping[str, bool] = field(default_factory=dict)


def analyze(model: Model, input_shapes: Mapping[str, Sequence[int]] | None = None, batch: int = 1,
            observed: Observed | None = None) -> ModelCost:
    """Count parameters, MACs and bytes of every node of ``model`` and of the whole model.

    Parameters
    ----------
    model : the model (not modified).
    input_shapes : concrete shapes for graph inputs, e.g. ``{"tokens": (1, 128)}``; they take
        precedence over ``batch``.
    batch : the size given to a dynamic *first* dim of a graph input. Other dynamic dims need
        ``input_shapes``; without it the MACs of the nodes they reach are unknown (``None``).
    observed : sizes and If conditions seen in a run of one sample at these input shapes, for what
        no static rule sizes (see the module docstring).

    Returns
    -------
    ModelCost

    Raises
    ------
    OptionError
        ``input_shapes`` names an unknown input, or a shape of the wrong rank or conflicting with a
        fixed dim; ``batch`` is not positive.

    Examples
    --------
    >>> import onnx.parser
    >>> from graphopt.core.onnx_io import from_proto
    >>> proto = onnx.parser.parse_model('''
    ...     <ir_version: 8, opset_import: ["" : 17]>
    ...     g (float[N, 4] x) => (float[N, 3] y) <float[3, 4] w = {1,2,3,4,5,6,7,8,9,10,11,12}> {
    ...         y = Gemm <transB: int = 1> (x, w)
    ...     }''')
    >>> cost = analyze(from_proto(proto), batch=2)
    >>> cost.params, cost.macs
    (12, 24)
    """
    table = shape_table(model, input_shapes, batch, [], observed)
    return cost_with(model, table, observed.conditions if observed is not None else None)


def cost_with(model: Model, table: ConcreteShapes, conditions: Mapping[str, bool] | None = None) -> ModelCost:
    """:func:`analyze` with the shapes of ``table`` (:func:`shape_table`; observed sizes it holds
    included) and the observed If ``conditions``: a caller that adds observations to a table it has
    already costed does not infer the shapes again."""
    warnings = table.warnings if table.warnings is not None else []
    batch = table.batch
    conditions = conditions or {}
    ledger = _ParamLedger()
    per_node = [_node_cost(site, table, ledger) for site in _walk(model.graph, conditions=conditions)]
    unused = ledger.unclaimed_initializers(model.graph)
    unused_sizes = [_initializer_size(v) for v in unused]
    unknown = [n.qualified_name for n in per_node if n.macs is None]
    macs_known = sum(n.macs for n in per_node if n.macs is not None)
    return ModelCost(
        params=sum(n.params for n in per_node) + sum(size[0] for size in unused_sizes),
        param_bytes=sum(n.param_bytes for n in per_node) + sum(size[1] for size in unused_sizes),
        macs=None if unknown else macs_known,
        macs_known=macs_known,
        nodes=len(per_node),
        op_histogram=Counter(_op_key(n.domain, n.op_type) for n in per_node),
        per_node=per_node,
        inputs=[_tensor_info(v) for v in model.graph.inputs if not v.is_initializer],
        outputs=[_tensor_info(v) for v in model.graph.outputs],
        unknown_macs_nodes=unknown,
        unused_initializers=[v.name for v in unused],
        batch=batch,
        warnings=warnings,
        observed=len(table.observed_used) + len(conditions),
    )



def budget_cost(model: Model) -> tuple[int | None, int | None]:
    """``(MACs, params)`` of ``model`` as budgets count them (``PassContext.measure``)."""
    cost = analyze(model)
    return cost.macs, cost.params

def shape_table(model: Model, input_shapes: Mapping[str, Sequence[int]] | None = None, batch: int = 1,
                warnings: list[str] | None = None, observed: Observed | None = None) -> ConcreteShapes:
    """The shapes :func:`analyze` costs with: ``table.shape(value)`` (``None`` or symbolic dims when
    unknown). ``input_shapes``, ``batch`` and ``observed`` as in :func:`analyze`; inference warnings go
    to ``warnings``."""
    if batch < 1:
        raise OptionError(f"batch must be a positive integer, got {batch}")
    fixed, symbols = _resolve_inputs(model.graph, dict(input_shapes or {}), batch)
    table = ConcreteShapes(model, fixed, symbols, [] if warnings is None else warnings,
                           observed.shapes if observed is not None else None)
    table.batch = batch
    return table


@dataclass
class OpSummary:
    """Totals for one op type (a row of :func:`summarize_ops`)."""

    op_type: str
    count: int
    params: int
    macs: int | None
    macs_known: int


def summarize_ops(model: Model | ModelCost, input_shapes: Mapping[str, Sequence[int]] | None = None,
                  batch: int = 1) -> list[OpSummary]:
    """Node count, params and MACs per op type, most MACs first (then most nodes, then name).

    ``model`` may be a :class:`ModelCost` already computed (the other arguments are then ignored).
    An op type's ``macs`` is ``None`` when any of its nodes is unknown; ``macs_known`` sums the rest.
    """
    cost = model if isinstance(model, ModelCost) else analyze(model, input_shapes, batch)
    groups: dict[str, list[NodeCost]] = {}
    for n in cost.per_node:
        groups.setdefault(_op_key(n.domain, n.op_type), []).append(n)
    rows = []
    for op, nodes in groups.items():
        known = sum(n.macs for n in nodes if n.macs is not None)
        complete = all(n.macs is not None for n in nodes)
        rows.append(OpSummary(op, len(nodes), sum(n.params for n in nodes), known if complete else None, known))
    return sorted(rows, key=lambda r: (-r.macs_known, -r.count, r.op_type))


LAYER_COLUMNS = ("#", "node", "op", "output shape", "params", "MACs", "% MACs", "note")


def layer_rows(cost: ModelCost, *, sort_by: str = "order", limit: int | None = None) -> list[tuple[str, ...]]:
    """Rows of the per-layer table ``graphopt inspect`` prints, one per node, as display strings.

    Columns are :data:`LAYER_COLUMNS`. ``sort_by`` is ``"order"`` (walk order), ``"macs"`` or
    ``"params"`` (largest first; unknown MACs sort last); ``limit`` keeps the first rows only.
    Unknown MACs show as ``?`` and the note says why; the share is relative to
    :attr:`ModelCost.macs_known`.
    """
    keys: dict[str, Callable[[tuple[int, NodeCost]], Any]] = {
        "order": lambda item: item[0],
        "macs": lambda item: (item[1].macs is None, -(item[1].macs or 0), item[0]),
        "params": lambda item: (-item[1].params, item[0]),
    }
    if sort_by not in keys:
        raise OptionError(f"unknown sort key {sort_by!r}; use one of {', '.join(keys)}")
    items = sorted(enumerate(cost.per_node, 1), key=keys[sort_by])
    if limit is not None:
        items = items[:limit]
    return [_layer_row(index, n, cost.macs_known) for index, n in items]


def _layer_row(index: int, n: NodeCost, total_macs: int) -> tuple[str, ...]:
    shape = ", ".join(_format_dims(s) for s in n.output_shapes) or "-"
    share = "-" if n.macs is None or not total_macs else f"{100 * n.macs / total_macs:.1f}%"
    return (str(index), n.qualified_name, _op_key(n.domain, n.op_type), shape,
            format_count(n.params) if n.params else "-",
            "?" if n.macs is None else format_count(n.macs), share, n.note)


def _format_dims(dims: Dims | None) -> str:
    if dims is None:
        return "?"
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def _op_key(domain: str, op_type: str) -> str:
    return op_type if domain in ("", "ai.onnx") else f"{domain}:{op_type}"


def _tensor_info(value: Value) -> TensorInfo:
    return TensorInfo(value.name, _dtype_name(value.dtype), value.shape)


def _dtype_name(dtype: int | None) -> str | None:
    if dtype is None:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(dtype)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(dtype).lower()


# ====================================================================================================
# shapes


def _resolve_inputs(graph: Graph, given: dict[str, Sequence[int]], batch: int
                    ) -> tuple[dict[Value, Dims], dict[str, int]]:
    """Concrete-as-possible shapes of the main graph's inputs, and what each dim name stands for.

    A dim name (``dim_param``) means the same size wherever it appears, so fixing ``N`` on an input
    also fixes ``N`` on outputs and intermediate values onnx left symbolic.
    """
    inputs = {v.name: v for v in graph.inputs if not v.is_initializer}
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise OptionError(f"input_shapes names unknown input(s) {', '.join(map(repr, unknown))}; "
                          f"model inputs: {', '.join(inputs) or 'none'}")
    fixed: dict[Value, Dims] = {}
    symbols: dict[str, int] = {}
    for name, dims in given.items():
        value = inputs[name]
        fixed[value] = _check_given(value, tuple(int(d) for d in dims))
        for declared, size in zip(value.shape or (), fixed[value]):
            if isinstance(declared, str):
                symbols[declared] = size
    for value in inputs.values():
        dims = value.shape
        if value in fixed or not dims:
            continue
        if isinstance(dims[0], str):
            symbols.setdefault(dims[0], batch)  # substituted below, with every other use of the name
        elif dims[0] is None:
            dims = (batch, *dims[1:])
        fixed[value] = dims
    return {v: _substitute(d, symbols) for v, d in fixed.items()}, symbols


def _check_given(value: Value, dims: tuple[int, ...]) -> tuple[int, ...]:
    declared = value.shape
    if declared is not None and len(declared) != len(dims):
        raise OptionError(f"input_shapes[{value.name!r}] = {dims} has rank {len(dims)}, "
                          f"the model declares rank {len(declared)} {_format_dims(declared)}")
    for d, size in zip(declared or (), dims):
        if isinstance(d, int) and d != size:
            raise OptionError(f"input_shapes[{value.name!r}] = {dims} conflicts with the fixed shape "
                              f"{_format_dims(declared)}")
    if any(size < 0 for size in dims):
        raise OptionError(f"input_shapes[{value.name!r}] = {dims} has a negative dim")
    return dims


def _substitute(dims: Dims | None, symbols: Mapping[str, int]) -> Dims | None:
    if dims is None:
        return None
    return tuple(symbols.get(d, d) if isinstance(d, str) else d for d in dims)


def _is_concrete(dims: Dims | None) -> bool:
    return dims is not None and all(isinstance(d, int) for d in dims)


class ConcreteShapes(ShapeView):
    """The shape view at a probe shape: the given (or batch-1) input dims, every dim name they fix
    substituted wherever it appears, and a constant's own dims before anything inferred."""

    def __init__(self, model: Model, fixed: Mapping[Value, Dims], symbols: Mapping[str, int],
                 warnings: list[str], observed: Mapping[str, tuple[int, ...]] | None = None) -> None:
        concrete = {v.name: d for v, d in fixed.items() if _is_concrete(d)}
        super().__init__(model, input_shapes=concrete, warnings=warnings)
        self.fixed = fixed
        self.symbols = symbols
        self.observed = dict(observed or {})   # sizes a run saw (graphopt.measure.observed); may grow
        self.observed_used: set[str] = set()
        self.batch = 1
        # the dim names the inputs declare: a size named otherwise (or unnamed) is not an input's to fix
        self.input_dim_names = {d for v in model.graph.inputs if not v.is_initializer for d in (v.shape or ())
                                if isinstance(d, str)}
        self._constants = {value: dims for graph in model.graphs() for value in graph.values()
                           if (dims := _constant_dims(graph, value)) is not None}

    def shape(self, value: Value | None) -> Dims | None:
        if value is None:
            return None
        if value in self.fixed:
            return self.fixed[value]
        if value in self._constants:
            return self._constants[value]
        dims = _substitute(super().shape(value), self.symbols)
        if dims is not None and all(isinstance(d, int) for d in dims):
            return dims
        if value.name in self.observed and (dims is None or len(dims) == len(self.observed[value.name])):
            self.observed_used.add(value.name)
            return self.observed[value.name]   # seen in a run: a size only data decides
        # onnx's inference stops at shape arithmetic (a Slice whose end comes from Shape); onnxruntime's
        # symbolic engine evaluates it at these concrete inputs. Asked only here, so a model onnx resolves
        # never pays for it.
        found = self._symbolic_dims(value)
        if found is None or (dims is not None and len(found) != len(dims)):
            return dims
        if dims is None:
            return tuple(d if isinstance(d, int) else None for d in found)
        return tuple(d if isinstance(d, int) else (f if isinstance(f, int) else d) for d, f in zip(dims, found))


def _enclosing(graph: Graph) -> Graph | None:
    return graph.parent.graph if graph.parent is not None else None


# ====================================================================================================
# weights


def _owner(graph: Graph, value: Value) -> Graph | None:
    """The graph (this one or an enclosing one) in which ``value`` is produced or stored."""
    scope: Graph | None = graph
    while scope is not None:
        if value in scope.nx and (scope.producer(value) is not None or not scope.is_captured(value)):
            return scope
        scope = _enclosing(scope)
    return None


def _constant_node(graph: Graph, value: Value) -> Node | None:
    owner = _owner(graph, value)
    node = owner.producer(value) if owner is not None else None
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        return node
    return None


def _constant_dims(graph: Graph, value: Value) -> Dims | None:
    if value.is_initializer:
        if value.const is None and value.sparse_const is not None:
            return tuple(value.sparse_const.dims)
        return value.shape
    node = _constant_node(graph, value)
    if node is None:
        return None
    for name, proto in node.attrs.items():
        if name == "value":
            return tuple(proto.t.dims)
        if name == "sparse_value":
            return tuple(proto.sparse_tensor.dims)
        if name in ("value_float", "value_int", "value_string"):
            return ()
        if name in ("value_floats", "value_ints", "value_strings"):
            return (len(helper.get_attribute_value(proto)),)
    return None


# Bits per element of the packed sub-byte types (numpy holds them one per byte).
_SUB_BYTE_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in
                  (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
                   ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)) if hasattr(onnx.TensorProto, name)}


def _proto_size(tp: onnx.TensorProto) -> tuple[int, int]:
    """(elements, bytes) of a TensorProto, read from its dims and type (no copy of the data)."""
    n = math.prod(tp.dims)
    if tp.data_type == onnx.TensorProto.STRING:
        return n, sum(len(s) for s in tp.string_data)
    if tp.data_type in _SUB_BYTE_BITS:
        return n, (n * _SUB_BYTE_BITS[tp.data_type] + 7) // 8
    return n, n * np.dtype(helper.tensor_dtype_to_np_dtype(tp.data_type)).itemsize


def _array_size(arr: np.ndarray) -> tuple[int, int]:
    if arr.dtype == object:
        return arr.size, sum(len(s) for s in arr.reshape(-1))
    return arr.size, arr.nbytes


def _initializer_size(value: Value) -> tuple[int, int]:
    if value.const is not None:
        return _proto_size(value.const)
    if value.sparse_const is not None:
        nnz, values_bytes = _proto_size(value.sparse_const.values)
        return nnz, values_bytes + _proto_size(value.sparse_const.indices)[1]
    return _array_size(value.array)


def _constant_node_size(node: Node) -> tuple[int, int]:
    for name, proto in node.attrs.items():
        if name == "value":
            return _proto_size(proto.t)
        if name == "sparse_value":
            sp = proto.sparse_tensor
            nnz, values_bytes = _proto_size(sp.values)
            return nnz, values_bytes + _proto_size(sp.indices)[1]
        if name in ("value_float", "value_int", "value_floats", "value_ints", "value_string", "value_strings"):
            data = np.asarray(helper.get_attribute_value(proto),
                              dtype=np.float32 if "float" in name else (np.int64 if "int" in name else object))
            return _array_size(data)
    return 0, 0


class _ParamLedger:
    """Hands each weight to its first consumer, once."""

    def __init__(self) -> None:
        self.claimed: set[Value] = set()

    def claim(self, graph: Graph, node: Node) -> tuple[int, int]:
        """(elements, bytes) of the weights ``node`` is the first to read."""
        weights: list[Value] = [v for v in node.inputs if v is not None]
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            # A Constant nobody reads still sits in the file: it keeps its own tensor.
            weights += [v for v in node.outputs if v is not None and not graph.uses(v)]
        elements = nbytes = 0
        for value in weights:
            if value in self.claimed:
                continue
            size = self._size(graph, value)
            if size is not None:
                self.claimed.add(value)
                elements, nbytes = elements + size[0], nbytes + size[1]
        return elements, nbytes

    @staticmethod
    def _size(graph: Graph, value: Value) -> tuple[int, int] | None:
        if value.is_initializer:
            return _initializer_size(value)
        node = _constant_node(graph, value)
        return _constant_node_size(node) if node is not None else None

    def unclaimed_initializers(self, graph: Graph) -> list[Value]:
        out: list[Value] = []
        for scope in graph.walk():
            for value in (*scope.initializers.values(), *scope.sparse_initializers.values()):
                if value not in self.claimed and value not in out:
                    out.append(value)
        return out


# ====================================================================================================
# the walk


@dataclass
class _Site:
    """One node in its context: the graph that holds it, its scope path, whether a loop repeats it."""

    node: Node
    graph: Graph
    scope: str
    index: int
    in_loop: bool
    not_taken: bool = False   # inside an If branch that the observed run did not take


_LOOPING = {"Loop", "Scan"}


def _walk(graph: Graph, scope: str = "", in_loop: bool = False,
          counter: Iterator[int] | None = None, conditions: Mapping[str, bool] | None = None,
          not_taken: bool = False) -> Iterator[_Site]:
    """Every node of ``graph`` in topological order, each followed by the nodes of its subgraphs;
    ``conditions`` (If condition name -> the value a run saw) marks the branches that did not run."""
    counter = counter if counter is not None else itertools.count(1)
    conditions = conditions or {}
    for node in graph.toposort():
        site = _Site(node, graph, scope, next(counter), in_loop, not_taken)
        yield site
        looping = in_loop or (node.op_type in _LOOPING and node.domain in ("", "ai.onnx"))
        ran = _branch_taken(node, conditions)
        for attr_name, sub in node.subgraphs.items():
            skipped = not_taken or (ran is not None and attr_name != ran)
            for suffix, body in _named_subgraphs(sub):
                label = f"{_node_label(node, site.index)}.{attr_name}{suffix}"
                yield from _walk(body, f"{scope}/{label}" if scope else label, looping, counter, conditions,
                                 skipped)


def _branch_taken(node: Node, conditions: Mapping[str, bool]) -> str | None:
    """``"then_branch"`` / ``"else_branch"`` for an If whose condition a run observed, else ``None``."""
    if node.op_type != "If" or node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
        return None
    seen = conditions.get(node.inputs[0].name)
    return None if seen is None else ("then_branch" if seen else "else_branch")


def _named_subgraphs(sub: Graph | list[Graph]) -> list[tuple[str, Graph]]:
    if isinstance(sub, Graph):
        return [("", sub)]
    return [(f"[{i}]", g) for i, g in enumerate(sub)]


def _node_label(node: Node, index: int) -> str:
    return node.name or f"<{node.op_type}#{index}>"


def _node_cost(site: _Site, table: ConcreteShapes, ledger: _ParamLedger) -> NodeCost:
    node = site.node
    params, param_bytes = ledger.claim(site.graph, node)
    macs, note = _macs(site, table)
    return NodeCost(
        name=_node_label(node, site.index), op_type=node.op_type, domain=node.domain, scope=site.scope,
        params=params, param_bytes=param_bytes, macs=macs,
        output_shapes=[table.shape(v) if v is not None else None for v in node.outputs],
        note=note,
    )


class UnknownShape(Exception):
    """Raised by a MAC rule that lacks what it needs; the message says what."""


def _macs(site: _Site, table: ConcreteShapes) -> tuple[int | None, str]:
    node = site.node
    if site.not_taken:
        return 0, "in an If branch the observed run did not take"
    if node.domain not in ("", "ai.onnx") and (node.domain, node.op_type) not in CONTRIB_RULES:
        return None, f"no MAC rule for {node.domain}:{node.op_type}"
    rule = CONTRIB_RULES.get((node.domain, node.op_type)) or RULES.get(node.op_type)
    if rule is None:
        return None, f"no MAC rule for {node.op_type}"
    try:
        macs = int(rule(NodeShapes(site, table)))
    except UnknownShape as exc:
        return None, str(exc)
    if site.in_loop and macs:
        return None, f"inside a Loop/Scan body: {format_count(macs)} MACs per iteration, trip count unknown"
    return macs, ""


class NodeShapes:
    """What a MAC rule sees of a node: concrete shapes (or :class:`UnknownShape`) and attributes."""

    def __init__(self, site: _Site, table: ConcreteShapes) -> None:
        self.node = site.node
        self.graph = site.graph
        self.table = table

    @property
    def n_inputs(self) -> int:
        return sum(1 for v in self.node.inputs if v is not None)

    def input(self, slot: int) -> tuple[int, ...]:
        return self._concrete(self.node.inputs[slot] if slot < len(self.node.inputs) else None, f"input {slot}")

    def output(self, slot: int = 0) -> tuple[int, ...]:
        return self._concrete(self.node.outputs[slot] if slot < len(self.node.outputs) else None, f"output {slot}")

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.node.attr(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def _concrete(self, value: Value | None, what: str) -> tuple[int, ...]:
        if value is None:
            raise UnknownShape(f"{what} is missing")
        dims = self.table.shape(value)
        if dims is None:
            raise UnknownShape(f"shape of {value.name!r} unknown")
        if not _is_concrete(dims):
            from_inputs = any(isinstance(d, str) and d in self.table.input_dim_names for d in dims)
            hint = ("pass input_shapes" if from_inputs
                    else "a size the input values decide (a run of a sample measures it)")
            raise UnknownShape(f"{value.name!r} has dynamic dims {_format_dims(dims)}; {hint}")
        return tuple(int(d) for d in dims)  # type: ignore[arg-type]


# ====================================================================================================
# MAC rules: each takes a NodeShapes and returns an int (see the module docstring for the formulas)


def _zero(s: NodeShapes) -> int:
    return 0


def _per_element(k: int, s: NodeShapes) -> int:
    return k * math.prod(s.output())


def _conv(w_slot: int, s: NodeShapes) -> int:
    # W is (Cout, Cin/groups, k...): |Y|·∏(W.shape[1:]) = N·Cout·∏(out)·(Cin/groups)·∏(k).
    return math.prod(s.output()) * math.prod(s.input(w_slot)[1:])


def _conv_transpose(s: NodeShapes) -> int:
    # W is (Cin, Cout/groups, k...): every input element is scattered through Cout/groups kernels.
    return math.prod(s.input(0)) * math.prod(s.input(1)[1:])


def _gemm(s: NodeShapes) -> int:
    a, b = s.input(0), s.input(1)
    if len(a) != 2 or len(b) != 2:
        raise UnknownShape(f"Gemm operands must be 2-D, got {a} and {b}")
    m, k = (a[1], a[0]) if s.attr("transA", 0) else a
    n = b[0] if s.attr("transB", 0) else b[1]
    return m * n * k


def _matmul(a_slot: int, b_slot: int, s: NodeShapes) -> int:
    a, b = s.input(a_slot), s.input(b_slot)
    if not a or not b:
        raise UnknownShape("MatMul of a scalar")
    a = (1, *a) if len(a) == 1 else a  # numpy: a 1-D left operand is a row vector
    b = (*b, 1) if len(b) == 1 else b  # ... and a 1-D right operand a column vector
    try:
        batch = np.broadcast_shapes(a[:-2], b[:-2])
    except ValueError:
        raise UnknownShape(f"batch dims {a[:-2]} and {b[:-2]} do not broadcast") from None
    return math.prod(batch) * a[-2] * a[-1] * b[-1]


def _matmul_nbits(s: NodeShapes) -> int:
    """onnxruntime's ``MatMulNBits``: the float input ``[..., K]`` times its packed ``K x N`` weight."""
    a, k, n = s.input(0), int(s.attr("K", 0)), int(s.attr("N", 0))
    if not a or not k or not n:
        raise UnknownShape("MatMulNBits without its input shape or K / N")
    return math.prod(a[:-1]) * k * n


def _einsum(s: NodeShapes) -> int:
    equation = s.attr("equation", "").replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(s.node.inputs) or len(terms) > 2:
        raise UnknownShape("Einsum with 3+ operands: the cost depends on the contraction order")
    sizes: dict[str, int] = {}
    ellipses = []
    for slot, term in enumerate(terms):
        ellipses.append(_bind_einsum_term(term, s.input(slot), sizes))
    try:
        ellipsis = np.broadcast_shapes(*ellipses)
    except ValueError:
        raise UnknownShape(f"Einsum ellipsis dims {ellipses} do not broadcast") from None
    space = math.prod(sizes.values()) * math.prod(ellipsis)
    if len(terms) == 2:
        return space
    letters = [c for c in terms[0] if c.isalpha()]
    out = set(rhs) if arrow else {c for c in letters if letters.count(c) == 1}
    return 0 if out >= set(letters) else space


def _bind_einsum_term(term: str, shape: tuple[int, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    """Record each letter's size (broadcast: the largest wins); return the dims under ``...``."""
    head, dots, tail = term.partition("...")
    n_ellipsis = len(shape) - len(head) - len(tail)
    if n_ellipsis < 0 or (n_ellipsis and not dots):
        raise UnknownShape(f"Einsum term {term!r} does not match shape {shape}")
    dims = dict(zip(head, shape[:len(head)]))
    for letter, size in zip(tail, shape[len(head) + n_ellipsis:]):
        dims[letter] = size
    for letter, size in dims.items():
        sizes[letter] = max(sizes.get(letter, 1), size)
    return shape[len(head):len(head) + n_ellipsis]


def _recurrent(s: NodeShapes) -> int:
    # W: (dirs, gates·hidden, input), R: (dirs, gates·hidden, hidden): one mat-vec of each per step.
    x = s.input(0)
    if len(x) != 3:
        raise UnknownShape(f"recurrent input must be 3-D, got {x}")
    seq, batch = (x[1], x[0]) if s.attr("layout", 0) else (x[0], x[1])
    return seq * batch * (math.prod(s.input(1)) + math.prod(s.input(2)))


def _pool(s: NodeShapes) -> int:
    kernel = s.attr("kernel_shape")
    if not kernel:
        raise UnknownShape("pooling without kernel_shape")
    return math.prod(s.output()) * math.prod(kernel)


def _input_elements(s: NodeShapes) -> int:
    return math.prod(s.input(0))


def _lrn(s: NodeShapes) -> int:
    return math.prod(s.output()) * int(s.attr("size", 1))


_INTERPOLATION = {"nearest": 0, "linear": 2, "bilinear": 2, "cubic": 4, "bicubic": 4}


def _interpolation_factor(mode: str, axes: int) -> int:
    if mode not in _INTERPOLATION:
        raise UnknownShape(f"unknown interpolation mode {mode!r}")
    base = _INTERPOLATION[mode]
    return 0 if base == 0 else base ** axes


def _resize(s: NodeShapes) -> int:
    x, y = s.input(0), s.output()
    resized = sum(1 for a, b in zip(x, y) if a != b)
    return math.prod(y) * _interpolation_factor(s.attr("mode", "nearest"), resized)


def _grid_sample(s: NodeShapes) -> int:
    y = s.output()
    return math.prod(y) * _interpolation_factor(s.attr("mode", "linear"), len(y) - 2)


def _variadic(extra: int, s: NodeShapes) -> int:
    return (s.n_inputs - 1 + extra) * math.prod(s.output())


#: Ops that only move, reshape, select or create data, and container ops (their bodies count apart).
ZERO_COST = frozenset("""
    Reshape Flatten Squeeze Unsqueeze Transpose Concat ConcatFromSequence Split SplitToSequence Slice
    Gather GatherElements GatherND Scatter ScatterElements ScatterND Expand Tile Pad CenterCropPad
    Shape Size Identity Dropout Constant ConstantOfShape Cast CastLike DepthToSpace SpaceToDepth
    Compress OneHot Range EyeLike Trilu NonZero ReverseSequence Unique MaxUnpool
    If Loop Scan Optional OptionalGetElement OptionalHasElement SequenceAt SequenceConstruct SequenceEmpty
    SequenceErase SequenceInsert SequenceLength
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Bernoulli Multinomial
    HannWindow HammingWindow BlackmanWindow MelWeightMatrix
""".split())

#: MACs per output element of element-wise ops, activations, normalizations and softmax.
PER_ELEMENT: dict[str, int] = {
    **dict.fromkeys("""
        Add Sub Mul Div Pow Mod Neg Abs Reciprocal Floor Ceil Round Sqrt Exp Log Erf Sign
        Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh
        Relu LeakyRelu PRelu Elu Selu Celu Gelu Sigmoid HardSigmoid HardSwish Softplus Softsign Tanh
        ThresholdedRelu Mish Swish Shrink Clip
        Not And Or Xor Equal Greater Less GreaterOrEqual LessOrEqual IsNaN IsInf Where
        BitShift BitwiseAnd BitwiseOr BitwiseXor BitwiseNot
        QuantizeLinear DequantizeLinear Hardmax CumSum BatchNormalization
    """.split(), 1),
    "DynamicQuantizeLinear": 2,  # min/max scan, then quantize
    "LpNormalization": 2,  # norm, divide
    "RMSNormalization": 2,  # mean of squares, scale
    **dict.fromkeys("LayerNormalization InstanceNormalization GroupNormalization MeanVarianceNormalization".split(),
                    3),  # mean, variance, normalize + affine
    **dict.fromkeys(("Softmax", "LogSoftmax"), 3),  # exp, sum, divide
}

#: (domain, op type) -> rule, for the contrib ops graphopt itself writes.
CONTRIB_RULES: dict[tuple[str, str], Callable[[NodeShapes], int]] = {("com.microsoft", "MatMulNBits"): _matmul_nbits}

#: op type -> rule(NodeShapes) -> MACs.
RULES: dict[str, Callable[[NodeShapes], int]] = {
    **dict.fromkeys(ZERO_COST, _zero),
    **{op: partial(_per_element, k) for op, k in PER_ELEMENT.items()},
    "Conv": partial(_conv, 1), "ConvInteger": partial(_conv, 1), "QLinearConv": partial(_conv, 3),
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": partial(_matmul, 0, 1), "MatMulInteger": partial(_matmul, 0, 1),
    "QLinearMatMul": partial(_matmul, 0, 3),
    "Einsum": _einsum,
    **dict.fromkeys(("RNN", "GRU", "LSTM"), _recurrent),
    **dict.fromkeys(("MaxPool", "AveragePool", "LpPool"), _pool),
    **dict.fromkeys("""GlobalAveragePool GlobalMaxPool GlobalLpPool ArgMax ArgMin TopK ReduceSum ReduceMean
        ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceSumSquare""".split(),
                    _input_elements),
    "LRN": _lrn,
    "Resize": _resize, "Upsample": _resize, "GridSample": _grid_sample,
    "Sum": partial(_variadic, 0), "Max": partial(_variadic, 0), "Min": partial(_variadic, 0),
    "Mean": partial(_variadic, 1),
}
