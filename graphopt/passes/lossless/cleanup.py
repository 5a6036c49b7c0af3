"""Graph cleanup: dead code, no-op nodes, constants and duplicates.

``dead_code``
    A node is live when one of its outputs reaches a graph output (through data edges or a subgraph
    capture); everything else is removed, together with initializers nothing reads. Graph inputs are
    the model's interface and stay. Nodes of domains whose semantics graphopt does not know (custom
    ops) may have side effects and are never removed; the stats name them.

``identity``
    ``Identity`` and inference-mode ``Dropout`` (no mask output read, training mode absent or a
    constant false) compute ``y = x``: readers of ``y`` read ``x`` instead. When ``y`` is a model output
    and ``x`` cannot take over its name (``x`` is a graph input, an initializer or another output), the
    node stays — renaming the model's interface is not ours to do — and the stats say so. It also stays
    when ``x`` and ``y`` are both outputs of one subgraph: the checker accepts the repeated output name
    that would result, but onnxruntime 1.31 then computes wrong values for the first one.

``fold_constants``
    A value computed only from constants (initializers, ``Constant`` nodes, and ``Shape``/``Size`` of
    tensors whose dims are statically known) is a constant: it is evaluated once and stored as an
    initializer, and the nodes that computed it go. onnx-graphsurgeon's ``fold_constants`` is the
    oracle: the IR is exported, folded by graphsurgeon (which runs the constant part in onnxruntime),
    and only the answer — which of *our* values became which arrays — is read back and applied to the
    IR through its helpers, so names, metadata and order of everything else stay as they were. A folded
    model output keeps its name (it becomes a ``Constant`` node, since an initializer cannot take over
    the interface name). Values are matched to graphsurgeon's tensors by object, not by name, so sibling
    subgraphs that reuse a local name cannot be confused.

    Refuses (left as computation, with the reason in the stats):

    * non-deterministic ops (``RandomNormal``, ``RandomUniform``, their ``*Like`` forms, ``Multinomial``,
      ``Bernoulli``, ``Dropout`` in training mode) and everything computed from them;
    * ops of custom domains and calls of local functions (onnxruntime may not evaluate them; they may
      have side effects; a function body may hide a random op);
    * nodes reading a graph input that has a default initializer (the caller may override it);
    * results larger than ``max_bytes`` (default 16 MiB): a ``ConstantOfShape``/``Expand``/``Tile`` of
      constants is cheaper to compute than to store. A node whose output is statically known to be too
      big is not even evaluated (and so neither are its readers); one whose size is only known after
      evaluation is dropped then;
    * results whose dtype or shape differ from what the IR declares for the value (a guard; it caught the
      float64 Constants below);
    * local function bodies (graphsurgeon folds them separately; not wired here).

    Five graphsurgeon pitfalls are worked around, not inherited:

    * its ``fold_shapes`` step first runs a "shape-tensor cast elision" that rewrites
      ``Cast(int->float) -> Mul(0.5) -> Cast(float->int)`` into an integer ``Mul`` by ``int(0.5) = 0`` —
      wrong values. So graphsurgeon runs with ``fold_shapes=False``, and this pass materialises the
      static shape values itself beforehand (``Shape`` with its ``start``/``end``, ``Size``, and
      ``Gather``/``Slice`` of a ``Shape`` selecting only static dims), from onnx shape inference;
    * it evaluates every foldable tensor, not only those a remaining node reads (its test compares
      consumer *node* names with tensor names): this pass picks that frontier itself, stores only it, and
      reports a refusal only where it matters;
    * its recursion into subgraphs drops the ``should_exclude_node`` callback (a ``RandomNormal`` inside
      an ``If`` branch would be folded), so this pass folds each graph itself, outermost first;
    * it lowers ``value_float`` / ``value_floats`` Constants to float64 arrays (folding ``k * k`` in double,
      a dtype the model never had): this pass hands it every numeric ``Constant`` already as an array of
      the right type, and refuses any evaluated value whose dtype or shape differs from the declared one;
    * subgraphs it imports have no IR version, so their constant parts are exported with onnx's newest
      (14 with onnx 1.23), which onnxruntime 1.31 refuses ("Inference failed": nothing folded). Every
      graph gets the model's IR version before folding. When evaluation still fails, the fold is
      redone with graphsurgeon's recursive partitioning, so one bad node does not block the rest.

``constant_to_initializer``
    A ``Constant`` node (any form: ``value``, ``value_float(s)``, ``value_int(s)``, ``value_string(s)``,
    ``sparse_value`` — the last one densified) becomes an initializer of its own graph (a subgraph's
    ``Constant`` becomes that subgraph's initializer). Refused for a main-graph output (an initializer
    cannot take over an interface name) and inside local functions (a FunctionProto has no initializers).

``dedupe_initializers``
    Initializers of one graph with identical dtype, shape and bytes (so ``0.0`` and ``-0.0`` differ, and a
    NaN equals the same NaN) are one tensor: readers of the copies read the first one (a model output
    among them is preferred as the survivor, keeping its name). A graph input with a default value is
    never merged (the caller may override it), nor are two outputs of one graph; sparse initializers are
    left alone, and each subgraph is deduplicated within its own scope.

``cse``
    Common subexpression elimination: two nodes with the same domain, op type, attributes (compared as
    serialized AttributeProtos) and the same input values compute the same outputs, so readers of the
    later one read the earlier one. For ``Add``, ``Mul``, ``And``, ``Or``, ``Xor`` and ``Equal`` with two
    inputs the input order does not matter (IEEE ``a + b == b + a`` exactly). One walk in topological
    order merges whole duplicated chains. Never merged: non-deterministic ops (as above), nodes holding
    subgraphs, custom-domain ops, and pairs whose outputs are both outputs of the graph (a model output
    keeps its name: when only the later node's output is one, the earlier node's output takes it over).

What each pass left alone is reported in the one ledger's form (:class:`~graphopt.core.ledger.LeftAlone`):
``{rule, reason, count, examples}``, ``rule`` being the op type where the pass treats several (``identity``:
Identity or Dropout; ``fold_constants``: the op that computes the value; ``dead_code``: ``domain:op``).

All passes walk every graph, subgraphs included; ``dead_code``, ``identity`` and ``cse`` also walk local
function bodies, where a ``Constant`` that reads a function attribute (``ref_attr_name``) is not a constant
(:func:`graphopt.core.ops.constant_value`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import networkx as nx
import numpy as np
from onnx import helper, numpy_helper

from graphopt.core.errors import GraphoptError
from graphopt.core.ir import Graph, Model, Node, Value
from graphopt.core.ledger import LeftAlone
from graphopt.core.manager import Option, Pass, PassContext, PassResult, register
from graphopt.core.ops import constant_value, remove_dead, slice_bounds
from graphopt.core.shapes import ShapeView

# Domains whose ops are pure functions of their inputs: unused results can be dropped.
PURE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


def _is_pure(node: Node, model: Model) -> bool:
    if node.domain in PURE_DOMAINS:
        return True
    return any(fn.extras.domain == node.domain and fn.extras.name == node.op_type for fn in model.functions)


@register
class DeadCode(Pass):
    name = "dead_code"
    summary = "remove nodes and initializers that no graph output depends on"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed_nodes: Counter[str] = Counter()
        removed_inits = 0
        left = LeftAlone()
        for graph in list(model.graphs()):
            live = _live_items(graph)
            dead = [n for n in reversed(graph.toposort()) if n not in live]
            for node in dead:
                if not _is_pure(node, model):
                    left.add("op of an unknown domain (it may have side effects)", node.name or node.op_type,
                             rule=f"{node.domain}:{node.op_type}")
                    continue
                if any(graph.uses(v) for v in node.outputs if v is not None):
                    continue  # read by a kept impure node
                graph.remove_node(node)
                removed_nodes[node.op_type] += 1
            for value in list(graph.initializers.values()) + list(graph.sparse_initializers.values()):
                if not graph.uses(value) and not graph.is_graph_output(value) and not graph.is_graph_input(value):
                    graph.remove_initializer(value)
                    removed_inits += 1
        stats = {"removed_nodes": sum(removed_nodes.values()), "removed_by_op": dict(sorted(removed_nodes.items())),
                 "removed_initializers": removed_inits}
        return PassResult(bool(removed_nodes) or removed_inits > 0, left.into(stats))


def _live_items(graph: Graph) -> set:
    live: set = set()
    for out in graph.outputs:
        if out in live:
            continue
        live.add(out)
        live |= nx.ancestors(graph.nx, out)
    return live


def _dropout_is_identity(node: Node, graph: Graph) -> bool:
    if len(node.outputs) > 1 and node.outputs[1] is not None and (graph.uses(node.outputs[1])
                                                                  or graph.is_graph_output(node.outputs[1])):
        return False  # the mask is read
    return not dropout_may_train(node, graph)


@register
class EliminateIdentity(Pass):
    name = "identity"
    summary = "remove Identity and inference-mode Dropout (readers read the input directly)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed: Counter[str] = Counter()
        left = LeftAlone()
        for graph in list(model.graphs()):
            for node in graph.toposort():
                if node.domain not in ("", "ai.onnx") or node.op_type not in ("Identity", "Dropout"):
                    continue
                if node.op_type == "Dropout" and not _dropout_is_identity(node, graph):
                    left.add("training mode or mask is read", node.name or node.op_type, rule=node.op_type)
                    continue
                x, y = node.inputs[0], node.outputs[0]
                if x is None or y is None:
                    continue
                refusal = graph.replace_refusal(y, x)
                if refusal is not None:
                    left.add(refusal, node.name or node.op_type, rule=node.op_type)
                    continue
                graph.replace_all_uses(y, x)
                graph.remove_node(node)
                removed[node.op_type] += 1
        return PassResult(bool(removed), left.into({"removed": dict(sorted(removed.items()))}))


# =============================================================================================
# shared: what is non-deterministic, what is known about types


STANDARD_DOMAINS = ("", "ai.onnx")
# Ops whose every run draws fresh random numbers: never evaluated ahead of time, never merged.
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                  "Multinomial", "Bernoulli"})




def dropout_may_train(node: Node, graph: Graph) -> bool:
    """Whether a ``Dropout`` can run in training mode (then it is random)."""
    if node.attr("is_test", 1) == 0:  # opset < 7 training flag
        return True
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = constant_value(graph, node.inputs[2])
        return mode is None or bool(np.asarray(mode).item())
    return False


def is_nondeterministic(node: Node, graph: Graph) -> bool:
    """A random op, or a ``Dropout`` that may be in training mode."""
    if node.domain not in STANDARD_DOMAINS:
        return False
    return node.op_type in NONDETERMINISTIC_OPS or (node.op_type == "Dropout" and dropout_may_train(node, graph))


def sorted_graphs(root: Graph) -> list[tuple[Graph, list[Node]]]:
    """``root`` and its nested subgraphs, outermost first, each with its nodes in topological order.

    One topological sort per graph (``walk()`` then ``toposort()`` sorts each twice, and a sort is the
    dominant cost on large graphs). The lists are snapshots: a pass that removes nodes skips those no
    longer in ``graph.nx``.
    """
    out: list[tuple[Graph, list[Node]]] = []

    def visit(graph: Graph) -> None:
        order = graph.toposort()
        out.append((graph, order))
        for node in order:
            for sub in node.iter_subgraphs():
                visit(sub)

    visit(root)
    return out


def _attached(graph: Graph, model: Model) -> bool:
    """Whether ``graph`` is still part of the model (its holder node was not removed)."""
    while graph.parent is not None:
        holder = graph.parent
        if holder.graph is None or holder not in holder.graph.nx:
            return False
        graph = holder.graph
    return graph is model.graph


# =============================================================================================
# fold_constants


PURE_FOLD_DOMAINS = PURE_DOMAINS  # what onnxruntime can evaluate and has no side effects
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _static_shape_values(graph: Graph, order: list[Node], types: ShapeView) -> dict[Value, np.ndarray]:
    """Values of ``Shape``/``Size`` nodes (and ``Gather``/``Slice`` of a ``Shape``) fixed by static dims."""
    out: dict[Value, np.ndarray] = {}
    for node in order:
        if node.domain in STANDARD_DOMAINS and node.outputs and node.outputs[0] is not None:
            array = _shape_value(node, graph, types)
            if array is not None:
                out[node.outputs[0]] = array
    return out


def _constant_node_values(graph: Graph, order: list[Node]) -> dict[Value, np.ndarray]:
    """Arrays of the graph's numeric ``Constant`` nodes, with the dtypes ONNX defines for each form."""
    out = {}
    for node in order:
        if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS and node.outputs[0] is not None:
            array = graph.constant_array(node.outputs[0])
            if array is not None and array.dtype != object:
                out[node.outputs[0]] = array
    return out


def _shape_dims(node: Node, types: ShapeView) -> list[int | None] | None:
    """The dims a ``Shape`` node returns (``None`` per non-static dim), honouring ``start``/``end``."""
    dims = types.dims(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    if dims is None:
        return None
    rank = len(dims)

    def clamp(i: int) -> int:  # negative counts from the back, then clamp to [0, rank]
        return min(max(i + rank if i < 0 else i, 0), rank)

    return list(dims[clamp(node.attr("start", 0)):clamp(node.attr("end", rank))])


def _shape_value(node: Node, graph: Graph, types: ShapeView) -> np.ndarray | None:
    """The value of ``Shape``, ``Size``, or a ``Gather``/``Slice`` of a ``Shape``, when every dim it
    returns is static; else None."""
    if node.op_type == "Shape":
        dims = _shape_dims(node, types)
        return None if dims is None or None in dims else np.array(dims, np.int64)
    if node.op_type == "Size":
        shape = types.static_shape(node.inputs[0])
        return None if shape is None else np.array(int(np.prod(shape, dtype=np.int64)), np.int64)
    if node.op_type not in ("Gather", "Slice"):
        return None
    shape_node = graph.producer(node.inputs[0])
    if shape_node is None or shape_node.op_type != "Shape" or shape_node.domain not in STANDARD_DOMAINS:
        return None
    dims = _shape_dims(shape_node, types)
    if dims is None:
        return None
    if node.op_type == "Gather":
        return _gathered_dims(node, graph, dims)
    return _sliced_dims(node, graph, dims)


def _gathered_dims(node: Node, graph: Graph, dims: list[int | None]) -> np.ndarray | None:
    """``Gather(Shape(t), indices)`` when the indices are constant and pick static dims only."""
    indices = constant_value(graph, node.inputs[1])
    if indices is None or not np.issubdtype(indices.dtype, np.integer):
        return None
    flat = [int(i) for i in indices.reshape(-1)]
    if any(not -len(dims) <= i < len(dims) for i in flat):
        return None
    picked = [dims[i] for i in flat]
    return None if None in picked else np.array(picked, np.int64).reshape(indices.shape)


def _sliced_dims(node: Node, graph: Graph, dims: list[int | None]) -> np.ndarray | None:
    """``Slice(Shape(t), ...)`` when the bounds are constant and select static dims only."""
    bounds = slice_bounds(node, graph)
    if bounds is None:
        return None
    starts, ends, axes, steps = bounds
    if len(starts) != 1 or axes not in (None, [0], [-1]) or steps[0] == 0:
        return None
    picked = dims[starts[0]:ends[0]:steps[0]]  # ONNX Slice clamps like Python slicing
    return None if None in picked else np.array(picked, np.int64)


def _could_fold(graph: Graph, node: Node) -> bool:
    """Every input and every captured value of ``node`` is constant (a cheap test before the real oracle)."""
    if node.op_type == "Constant":
        return False
    if not node.inputs and not node.subgraphs:
        return True  # ConstantOfShape-like sources (and random ones, which the oracle refuses with a reason)
    read = [v for v, _ in graph.nx.in_edges(node)]
    return all(graph.constant_array(v) is not None for v in read)


class _GraphsurgeonFold:
    """One run of onnx-graphsurgeon's constant folding on an export of the IR.

    :meth:`run` returns, per IR graph, the ``(value, array)`` pairs graphsurgeon turned into constants,
    and records why it left foldable nodes alone (:attr:`refused`) and what it warned (:attr:`notes`).
    """

    def __init__(self, model: Model, graphs: list[tuple[Graph, list[Node]]], types: ShapeView, max_bytes: int,
                 fold_shapes: bool) -> None:
        self.model, self.types, self.max_bytes, self.fold_shapes = model, types, max_bytes, fold_shapes
        self.order = dict(graphs)  # the IR does not change while graphsurgeon works: sort once
        self.refused: dict[tuple[int, str], dict[str, str]] = {}
        self.notes: list[str] = []
        # An input's default value may be overridden by the caller: graphsurgeon wrongly treats it as a constant.
        self.overridable = {v.name for g, _ in graphs for v in g.inputs if v.is_initializer}

    def run(self, partitioning: str | None) -> dict[Graph, list[tuple[Value, Any]]]:
        import onnx_graphsurgeon as gs
        from onnx_graphsurgeon.logger import G_LOGGER

        from graphopt.core.onnx_io import to_proto

        proto = to_proto(self.model)
        log = io.StringIO()
        old_severity = G_LOGGER.severity
        G_LOGGER.severity = G_LOGGER.WARNING
        try:
            with contextlib.redirect_stdout(log):
                main = gs.import_onnx(proto)
                tensors: dict[Value, Any] = {}
                pairs: list[tuple[Graph, Any]] = []
                self._pair(self.model.graph, main, proto.ir_version, tensors, pairs)
                for graph, gs_graph in pairs:  # outermost first, as graphsurgeon itself recurses
                    known = _constant_node_values(graph, self.order[graph])
                    if self.fold_shapes:
                        known.update(_static_shape_values(graph, self.order[graph], self.types))
                    for value, array in known.items():
                        tensors[value].to_constant(array)
                        tensors[value].inputs.clear()
                    gs_graph.fold_constants(fold_shapes=False, recurse_subgraphs=False, partitioning=partitioning,
                                            error_ok=True, flatten_subgraphs=False, size_threshold=None,
                                            should_exclude_node=self._excluder(graph), recurse_functions=False)
        finally:
            G_LOGGER.severity = old_severity
        # A warning is a "[W] ..." line followed by its detail lines; keep failures, one line each.
        blocks = re.split(r"^\[W\] ", _ANSI.sub("", log.getvalue()), flags=re.MULTILINE)
        self.notes = sorted({" ".join(b.split()) for b in blocks if "Inference failed" in b or "failed with" in b})
        found: dict[Graph, list[tuple[Value, Any]]] = {}
        for graph, _ in pairs:
            for node in self.order[graph]:
                for value in node.outputs:
                    if value is None or graph.constant_array(value) is not None:
                        continue
                    tensor = tensors[value]
                    if isinstance(tensor, gs.Constant):
                        found.setdefault(graph, []).append((value, tensor.values))
        return found

    @property
    def inference_failed(self) -> bool:
        return any("Inference failed" in note for note in self.notes)

    def _pair(self, graph: Graph, gs_graph: Any, ir_version: int, tensors: dict[Value, Any],
              pairs: list[tuple[Graph, Any]]) -> None:
        """Match IR nodes to graphsurgeon nodes (both in export order) and IR values to its tensors."""
        gs_graph.ir_version = ir_version  # graphsurgeon leaves subgraphs without one (see module docstring)
        pairs.append((graph, gs_graph))
        nodes = self.order[graph]
        if len(nodes) != len(gs_graph.nodes) or any(a.op_type != b.op for a, b in zip(nodes, gs_graph.nodes)):
            raise GraphoptError(f"graphsurgeon's import of graph {graph.name!r} does not match the IR")
        for node, gs_node in zip(nodes, gs_graph.nodes):
            by_name = {t.name: t for t in gs_node.outputs}
            for value in node.outputs:
                if value is not None:
                    tensors[value] = by_name[value.name]
            for attr_name, sub in node.subgraphs.items():
                gs_sub = gs_node.attrs[attr_name]
                for ir_sub, gs_one in zip([sub] if isinstance(sub, Graph) else sub,
                                          gs_sub if isinstance(gs_sub, list) else [gs_sub]):
                    self._pair(ir_sub, gs_one, ir_version, tensors, pairs)

    def _excluder(self, graph: Graph) -> Callable[[Any], bool]:
        local = {v.name: v for node in self.order[graph] for v in node.outputs if v is not None}

        def exclude(gs_node: Any) -> bool:
            why = self._why_not(gs_node, local)
            if why is not None:
                out = next((t.name for t in gs_node.outputs if not t.is_empty()), gs_node.name)
                self.refused.setdefault((id(graph), out), {"value": out, "op": gs_node.op, "why": why})
            return why is not None

        return exclude

    def _why_not(self, gs_node: Any, local: dict[str, Value]) -> str | None:
        """Why a node graphsurgeon found foldable must not be folded, or None."""
        why = _gs_unfoldable_op(gs_node)
        if why is not None:
            return why
        read = [t.name for t in gs_node.inputs if not t.is_empty()]
        read += [name for sub in gs_node.subgraphs() for name in sub._foreign_tensors()]
        overridden = sorted(set(read) & self.overridable)
        if overridden:
            return f"reads graph input {overridden[0]!r}, whose default value the caller may override"
        for t in gs_node.outputs:
            value = local.get(t.name)
            size = self.types.static_bytes(value) if value is not None else None
            if size is not None and size > self.max_bytes:
                return f"too big: {size} bytes > max_bytes {self.max_bytes}"
        return None


def _gs_unfoldable_op(gs_node: Any) -> str | None:
    """Why ``gs_node`` or a node of its subgraphs may not be evaluated ahead of time (a custom domain, a
    random op), or None."""
    for node in [gs_node, *(n for sub in gs_node.subgraphs(recursive=True) for n in sub.nodes)]:
        domain = node.domain or ""  # graphsurgeon says None for the default domain
        if domain not in PURE_FOLD_DOMAINS:
            return f"custom domain {domain!r}"
        if domain in STANDARD_DOMAINS and node.op in NONDETERMINISTIC_OPS:
            return f"non-deterministic op {node.op}" if node is gs_node else f"subgraph holds {node.op}"
        if node.op == "Dropout" and domain in STANDARD_DOMAINS and _gs_dropout_may_train(node):
            return "Dropout in training mode (random)"
    return None


def _gs_dropout_may_train(gs_node: Any) -> bool:
    import onnx_graphsurgeon as gs
    if gs_node.attrs.get("is_test", 1) == 0:
        return True
    if len(gs_node.inputs) > 2 and not gs_node.inputs[2].is_empty():
        mode = gs_node.inputs[2]
        return not isinstance(mode, gs.Constant) or bool(np.asarray(mode.values).item())
    return False


@register
class FoldConstants(Pass):
    name = "fold_constants"
    lossless = True
    summary = "evaluate constant subgraphs (onnx-graphsurgeon + onnxruntime) and store the results as initializers"
    options = {
        "max_bytes": Option(16 * 2**20, "largest folded tensor to store, in bytes; bigger ones stay computed", int,
                            low=0),
        "fold_shapes": Option(True, "fold Shape/Size of tensors whose dims are static", bool),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        max_bytes, fold_shapes = self.opt(ctx, "max_bytes"), self.opt(ctx, "fold_shapes")
        graphs = sorted_graphs(model.graph)
        # Cheap tests first: exporting to graphsurgeon and shape inference cost seconds on large graphs.
        could_fold = any(_could_fold(g, n) for g, order in graphs for n in order)
        if not could_fold and not (fold_shapes and any(n.op_type in ("Shape", "Size") for _, o in graphs for n in o)):
            return PassResult(False, {"folded": 0})
        types = ShapeView(model)
        if not could_fold and not any(_static_shape_values(g, order, types) for g, order in graphs):
            return PassResult(False, {"folded": 0})
        try:
            oracle, found, partitioned = self._evaluate(model, graphs, types, max_bytes, fold_shapes)
        except Exception as exc:  # graphsurgeon is an oracle: when it breaks, the IR stays as it was
            return PassResult(False, {"folded": 0, "error": f"onnx-graphsurgeon failed: {type(exc).__name__}: "
                                                             f"{str(exc).splitlines()[0] if str(exc) else ''}"})
        refused = [(d["why"], d["value"], d["op"]) for d in oracle.refused.values()]
        stats = self._apply(model, [g for g, _ in graphs], found, types, max_bytes, refused)
        left = LeftAlone()
        for why, value, op in sorted(refused, key=lambda r: (r[0], r[1])):
            left.add(why, value, rule=op)
        left.into(stats)
        if oracle.notes:
            stats["graphsurgeon_warnings"] = [n[:300] for n in oracle.notes[:10]]
            stats["partitioned_retry"] = partitioned
        return PassResult(stats["folded"] > 0 or stats["removed_nodes"] > 0, stats)

    @staticmethod
    def _evaluate(model: Model, graphs: list[tuple[Graph, list[Node]]], types: ShapeView, max_bytes: int,
                  fold_shapes: bool) -> tuple[_GraphsurgeonFold, dict[Graph, list[tuple[Value, Any]]], bool]:
        """graphsurgeon's answer: the oracle run, what it evaluated, and whether it had to partition."""
        oracle = _GraphsurgeonFold(model, graphs, types, max_bytes, fold_shapes)
        found = oracle.run(partitioning=None)
        if not oracle.inference_failed:
            return oracle, found, False
        # One failing node blocks a whole graph; isolate it.
        notes = oracle.notes
        oracle = _GraphsurgeonFold(model, graphs, types, max_bytes, fold_shapes)
        found = oracle.run(partitioning="recursive")
        oracle.notes = sorted(set(notes) | set(oracle.notes))
        return oracle, found, True

    @staticmethod
    def _apply(model: Model, graphs: list[Graph], found: dict[Graph, list[tuple[Value, Any]]],
               types: ShapeView, max_bytes: int, refused: list[tuple[str, str, str]]) -> dict[str, Any]:
        """Store the frontier of ``found`` and remove what computed it; appends ``(why, value, op)`` to
        ``refused`` for each value it must not store."""
        new_values: dict[Value, tuple[Graph, str, int]] = {}
        touched: set[Value] = set()  # initializers read by removed nodes, and new ones: drop them if unused
        removed: Counter[str] = Counter()
        for graph in graphs:  # outermost first: a subgraph whose holder node went dead is skipped
            if graph not in found or not _attached(graph, model):
                continue
            producers = []
            for value, array, why in _frontier(graph, found[graph], types, max_bytes):
                producer = graph.producer(value)
                if why is not None:
                    refused.append((why, value.name, producer.op_type))
                    continue
                new = _store_folded(graph, value, array, producer, touched)
                new_values[new] = (graph, producer.op_type, int(array.nbytes))
                producers.append(producer)
            removed.update(_remove_computation(graph, model, producers, touched))
        _drop_unread(graphs, model, touched)
        return _folded_stats(new_values, removed)


def _store_folded(graph: Graph, value: Value, array: np.ndarray, producer: Node, touched: set[Value]) -> Value:
    """Make ``value``'s readers read ``array``: a new initializer, or a ``Constant`` node for a model output
    (an initializer cannot take over an interface name)."""
    if graph.parent is None and graph.is_graph_output(value) and not graph._is_function_body():
        const = graph.add_node("Constant", [], [value.name], name=producer.name or value.name,
                               attrs={"value": numpy_helper.from_array(array)}, anchor=producer)
        new = const.outputs[0]
    else:
        new = graph.add_initializer(array, value.name)
        touched.add(new)
    graph.replace_all_uses(value, new)
    return new


def _remove_computation(graph: Graph, model: Model, producers: list[Node], touched: set[Value]) -> list[str]:
    """Remove the pure nodes that computed the stored values, once nothing reads them; returns their op types.
    The initializers they read join ``touched``."""
    candidates = set(producers)
    for producer in producers:
        candidates |= {n for n in nx.ancestors(graph.nx, producer) if isinstance(n, Node)}
    candidates = {n for n in candidates if _is_pure(n, model)}
    for node in candidates:
        touched |= {v for v, _ in graph.nx.in_edges(node) if v.is_initializer}
    remove_dead(graph, candidates)
    return [n.op_type for n in candidates if n not in graph.nx]


def _drop_unread(graphs: list[Graph], model: Model, touched: set[Value]) -> None:
    """Remove the ``touched`` initializers nothing reads any more (graph inputs and outputs stay)."""
    for graph in graphs:
        if not _attached(graph, model):
            continue
        for value in list(graph.initializers.values()):
            if value in touched and not graph.uses(value) and not graph.is_graph_output(value) \
                    and not graph.is_graph_input(value):
                graph.remove_initializer(value)


def _folded_stats(new_values: dict[Value, tuple[Graph, str, int]], removed: Counter[str]) -> dict[str, Any]:
    """Counts of the stored values that something still reads, by the op that computed them."""
    by_op: Counter[str] = Counter()
    added = 0
    for value, (graph, op_type, nbytes) in new_values.items():
        if value in graph.nx and (graph.uses(value) or graph.is_graph_output(value)):
            by_op[op_type] += 1
            added += nbytes
    return {"folded": sum(by_op.values()), "folded_by_op": dict(sorted(by_op.items())), "bytes_added": added,
            "removed_nodes": sum(removed.values()), "removed_by_op": dict(sorted(removed.items()))}


def _frontier(graph: Graph, found: list[tuple[Value, Any]], types: ShapeView,
              max_bytes: int) -> list[tuple[Value, Any, str | None]]:
    """The evaluated values worth storing, each with the reason it must not be stored (or None).

    A value is worth storing when a graph output or a reader that stays (a node not all of whose outputs
    are stored) needs it; the values in between go with the nodes computing them. graphsurgeon evaluates
    them all (its frontier test compares consumer *node* names with tensor names), so this choice is ours.
    """
    why = {value: _refuse_folded(value, array, types, max_bytes) for value, array in found}
    stored = {value for value, reason in why.items() if reason is None}

    def stays(node: Node) -> bool:
        return not all(v in stored for v in node.outputs if v is not None)

    return [(value, array, why[value]) for value, array in found
            if graph.producer(value) is not None
            and (graph.is_graph_output(value) or any(stays(n) for n in graph.consumers(value)))]


def _refuse_folded(value: Value, array: Any, types: ShapeView, max_bytes: int) -> str | None:
    """Why an evaluated value must not be stored (checked after graphsurgeon), or None."""
    if not isinstance(array, np.ndarray):
        return "not a tensor"
    if array.nbytes > max_bytes:
        return f"too big: {array.nbytes} bytes > max_bytes {max_bytes}"
    try:
        dtype = helper.np_dtype_to_tensor_dtype(array.dtype)
    except (KeyError, ValueError, TypeError):
        return f"unsupported array dtype {array.dtype}"
    declared = types.dtype(value)
    if declared is not None and declared != dtype:
        return (f"evaluated dtype {helper.tensor_dtype_to_string(dtype)} differs from the declared "
                f"{helper.tensor_dtype_to_string(declared)}")
    dims = types.dims(value)
    if dims is not None and (len(dims) != array.ndim or any(d is not None and d != s for d, s in zip(dims, array.shape))):
        return f"evaluated shape {list(array.shape)} differs from the declared {list(dims)}"
    return None


# =============================================================================================
# constant_to_initializer


_MAX_DENSIFIED_BYTES = 16 * 2**20  # a sparse Constant is densified only up to this size


@register
class ConstantToInitializer(Pass):
    name = "constant_to_initializer"
    lossless = True
    summary = "turn Constant nodes into initializers (a subgraph's into that subgraph's initializers)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        converted: Counter[str] = Counter()
        left = LeftAlone()
        for graph, order in sorted_graphs(model.graph):
            for node in order:
                if node.op_type != "Constant" or node.domain not in STANDARD_DOMAINS or not node.outputs \
                        or node.outputs[0] is None:
                    continue
                value = node.outputs[0]
                form = next(iter(node.attrs), "none")
                why = self._why_not(graph, node, value, form)
                if why is not None:
                    left.add(why, value.name)
                    continue
                new = graph.add_initializer(graph.constant_array(value), value.name)
                graph.replace_all_uses(value, new)
                graph.remove_node(node)
                converted[form] += 1
        for fn in model.functions:
            for graph in fn.graph.walk():
                for n in graph.toposort():
                    if n.op_type == "Constant" and n.domain in STANDARD_DOMAINS:
                        left.add("inside a local function (a FunctionProto has no initializers)",
                                 n.outputs[0].name if n.outputs and n.outputs[0] is not None else n.name)
        stats: dict[str, Any] = {"converted": sum(converted.values()), "by_form": dict(sorted(converted.items()))}
        return PassResult(bool(converted), left.into(stats))

    @staticmethod
    def _why_not(graph: Graph, node: Node, value: Value, form: str) -> str | None:
        if graph.parent is None and graph.is_graph_output(value):
            return "model output: an initializer cannot take over its name"
        if form == "sparse_value":
            dims = node.attrs[form].sparse_tensor.dims
            values = node.attrs[form].sparse_tensor.values
            itemsize = helper.tensor_dtype_to_np_dtype(values.data_type).itemsize
            if int(np.prod(dims, dtype=np.int64)) * itemsize > _MAX_DENSIFIED_BYTES:
                return f"sparse constant would densify to more than {_MAX_DENSIFIED_BYTES} bytes"
        if graph.constant_array(value) is None:
            return f"unsupported attribute {form!r}"
        return None


# =============================================================================================
# dedupe_initializers


def _content_digest(array: np.ndarray) -> bytes:
    if array.dtype == object:  # strings: hash the text, not the object pointers
        data = "\x00".join(f"{len(s)}:{s}" for s in (str(x) for x in array.reshape(-1))).encode()
    else:
        data = np.ascontiguousarray(array).tobytes()
    return hashlib.sha256(data).digest()


def _peek_array(value: Value) -> np.ndarray:
    """The initializer's data without caching a numpy copy in the IR: hashing every weight of a large
    model must not hold it twice (the stored TensorProto stays the one copy)."""
    if value.const is not None and value.const.HasField("raw_data"):
        return numpy_helper.to_array(value.const)
    return value.array


@register
class DedupeInitializers(Pass):
    name = "dedupe_initializers"
    lossless = True
    summary = "merge initializers of identical dtype, shape and bytes into one (per graph scope)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        merged = 0
        saved = 0
        left = LeftAlone()
        for graph, _ in sorted_graphs(model.graph):
            by_type: dict[tuple, list[Value]] = defaultdict(list)
            for value in graph.initializers.values():
                if not graph.is_graph_input(value):  # an input's default may be overridden: never shared
                    by_type[(value.dtype, tuple(value.shape))].append(value)
            for candidates in by_type.values():
                if len(candidates) < 2:
                    continue  # a unique shape is never read into memory
                by_bytes: dict[bytes, list[Value]] = defaultdict(list)
                for value in candidates:
                    by_bytes[_content_digest(_peek_array(value))].append(value)
                for group in by_bytes.values():
                    keep = next((v for v in group if graph.is_graph_output(v)), group[0])
                    for dup in group:
                        if dup is keep:
                            continue
                        if not graph.can_replace(dup, keep):
                            left.add("both are graph outputs", f"{dup.name} (same as {keep.name})")
                            continue
                        graph.replace_all_uses(dup, keep)
                        graph.remove_initializer(dup)
                        merged += 1
                        saved += int(dup.array.nbytes)
        return PassResult(merged > 0, left.into({"merged": merged, "bytes_saved": saved}))


# =============================================================================================
# cse


# Two-input ops whose result does not depend on the input order, bit for bit.
COMMUTATIVE_OPS = frozenset({"Add", "Mul", "And", "Or", "Xor", "Equal"})
CSE_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def _cse_key(graph: Graph, node: Node) -> tuple | None:
    """What makes two nodes compute the same outputs, or None when ``node`` must not be merged."""
    if node.domain not in CSE_DOMAINS or node.subgraphs or is_nondeterministic(node, graph):
        return None
    inputs: tuple = tuple(node.inputs)
    if node.op_type in COMMUTATIVE_OPS and node.domain in STANDARD_DOMAINS and len(inputs) == 2 \
            and None not in inputs:
        inputs = tuple(sorted(inputs, key=lambda v: v.name))
    attrs = tuple(sorted((name, proto.SerializeToString(deterministic=True)) for name, proto in node.attrs.items()))
    return (node.domain or "", node.op_type, inputs, attrs, tuple(v is not None for v in node.outputs))


@register
class CommonSubexpressions(Pass):
    name = "cse"
    lossless = True
    summary = "merge nodes computing the same op, with the same attributes, on the same inputs"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        merged: Counter[str] = Counter()
        left = LeftAlone()
        graphs = sorted_graphs(model.graph) + [pair for fn in model.functions for pair in sorted_graphs(fn.graph)]
        for graph, order in graphs:
            first_of: dict[tuple, Node] = {}
            for node in order:  # earlier merges already re-pointed this node's inputs; removed ones are gone
                if node not in graph.nx:
                    continue
                key = _cse_key(graph, node)
                if key is None:
                    continue
                first = first_of.setdefault(key, node)
                if first is node:
                    continue
                pairs = [(dup, kept) for dup, kept in zip(node.outputs, first.outputs) if dup is not None]
                if any(not graph.can_replace(dup, kept)
                       for dup, kept in pairs):
                    left.add("both outputs are graph outputs",
                             f"{node.name or node.op_type} (same as {first.name or first.op_type})")
                    continue
                for dup, kept in pairs:
                    graph.replace_all_uses(dup, kept)
                graph.remove_node(node)
                merged[node.op_type] += 1
        stats: dict[str, Any] = {"merged": sum(merged.values()), "merged_by_op": dict(sorted(merged.items()))}
        return PassResult(bool(merged), left.into(stats))
