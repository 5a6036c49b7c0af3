"""A small rule engine for local rewrites (fusions, folds, cancellations).

A :class:`Rule` is anchored on a node of given op types and has three steps:

``match(graph, node) -> Match | str | None``
    Collect the nodes, values and constants the rewrite needs; or return the reason it does not apply
    (a short string such as ``"weight is not constant"``) — reasons are counted in the stats, so a user
    can see why something was left alone; or ``None`` when the node is simply not an instance of the
    pattern (a Conv with no sibling to fuse with): nothing to report.
``rewrite(graph, match) -> None``
    Perform the change through the IR's helpers only.

:func:`apply_rules` walks the graph in topological order, re-reading the graph for every candidate,
so a match never refers to a node an earlier rewrite removed (a classic pitfall of rule engines that
compute every match up front). It loops until no rule applies (bounded), and returns a
:class:`RuleStats` with the count per rule and the refusal reasons per rule.

Helpers at the bottom answer the questions most rules ask: is this node a standard op of that type,
what is the single consumer of a value, which inputs are constant.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .ir import Graph, Model, Node, Value

if TYPE_CHECKING:
    from .manager import PassResult

STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass
class Match:
    """What a rule found: the anchor node plus named nodes, values and arrays."""

    node: Node
    nodes: dict[str, Node] = field(default_factory=dict)
    values: dict[str, Value] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def all_nodes(self) -> list[Node]:
        return [self.node, *self.nodes.values()]


class Rule:
    """Base class of a local rewrite. Subclasses set ``name`` and ``root_ops`` and implement the two steps."""

    name: ClassVar[str] = ""
    root_ops: ClassVar[tuple[str, ...]] = ()

    def match(self, graph: Graph, node: Node) -> Match | str | None:
        raise NotImplementedError

    def rewrite(self, graph: Graph, match: Match) -> None:
        raise NotImplementedError


@dataclass
class RuleStats:
    """How often each rule applied, and why it was refused where it was (with a few examples)."""

    applied: Counter[str] = field(default_factory=Counter)
    refused: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    examples: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))

    def refuse(self, rule: Rule, reason: str, node: Node) -> None:
        self.refused[rule.name][reason] += 1
        examples = self.examples[(rule.name, reason)]
        if len(examples) < 3:
            examples.append(node.name or node.op_type)

    @property
    def total(self) -> int:
        return sum(self.applied.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"applied": {rule: n}, "left_alone": [{rule, reason, count, examples}]}``."""
        left = [{"rule": rule, "reason": reason, "count": count, "examples": self.examples[(rule, reason)]}
                for rule, reasons in sorted(self.refused.items()) for reason, count in sorted(reasons.items())]
        out: dict[str, Any] = {"applied": dict(sorted(self.applied.items()))}
        if left:
            out["left_alone"] = left
        return out


class NoMatch(str):
    """A ``match`` answer meaning "the pattern is absent here" (a Transpose that does permute), not
    "refused for a reason worth reporting": :func:`apply_rules` treats it like ``None``.

    It exists for rules whose helpers chain several checks and return the first failing one's reason:
    the reason stays readable in code and tests, while ``left_alone`` lists only real refusals.
    """


def apply_rules(model: Model, rules: Sequence[Rule], *, max_rounds: int = 20,
                graphs: Iterable[Graph] | None = None) -> RuleStats:
    """Apply ``rules`` everywhere they match, until none does (at most ``max_rounds`` sweeps).

    Refusals are recorded from the last sweep only, so a node that one rule refused and a later
    rewrite then made eligible is not reported as left alone.
    """
    stats = RuleStats()
    by_op: dict[str, list[Rule]] = defaultdict(list)
    for rule in rules:
        for op in rule.root_ops:
            by_op[op].append(rule)
    for graph in list(graphs if graphs is not None else model.graphs()):
        for _ in range(max_rounds):
            round_refusals = RuleStats()
            changed = False
            for node in graph.toposort():
                if node not in graph.nx or node.domain not in STANDARD_DOMAINS:
                    continue  # removed by an earlier rewrite in this sweep, or not an op we know
                for rule in by_op.get(node.op_type, ()):
                    found = rule.match(graph, node)
                    if found is None or isinstance(found, NoMatch):
                        continue
                    if isinstance(found, str):
                        round_refusals.refuse(rule, found, node)
                        continue
                    rule.rewrite(graph, found)
                    stats.applied[rule.name] += 1
                    changed = True
                    break
            if not changed:
                for rule_name, reasons in round_refusals.refused.items():
                    for reason, count in reasons.items():
                        stats.refused[rule_name][reason] += count
                        stats.examples[(rule_name, reason)].extend(round_refusals.examples[(rule_name, reason)])
                break
    return stats


def rules_result(model: Model, rules: Sequence[Rule]) -> PassResult:
    """:func:`apply_rules` as a pass's result: changed when a rule applied; stats ``rewrites`` (the
    count), ``applied`` and ``left_alone``."""
    from .manager import PassResult
    stats = apply_rules(model, rules)
    return PassResult(stats.total > 0, {"rewrites": stats.total, **stats.to_dict()})


# ---------------------------------------------------------------------------------------------
# questions rules ask


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


def conv_info(graph: Graph, node: Node) -> ConvInfo | str:
    """The conv's :class:`ConvInfo`, or why it cannot take part in a merge."""
    if not is_op(node, "Conv"):
        return "not a Conv"
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None or node.outputs[0] is None:
        return "Conv without input or weight"
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
