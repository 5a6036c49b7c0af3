"""A small rule engine for local rewrites (fusions, folds, cancellations).

A :class:`Rule` has the shape of onnxscript's rewrite rules, in three parts:

``root_ops``
    The structural pattern's anchor: the op types of the node the rule starts from.
``match(graph, node) -> Match | str | None``
    The check. It collects what the rewrite needs into a typed :class:`Match` (a small dataclass per
    rule or per family of rules: the rewrite reads ``match.producer``, never a string key); or returns the reason it does not apply (a short string such as ``"weight is not constant"``) —
    reasons are counted in the stats, so a user can see why something was left alone; or ``None`` (or a
    :class:`NoMatch`) when the node is simply not an instance of the pattern: nothing to report.
``rewrite(graph, match) -> str | list[str] | None``
    Perform the change through the IR's helpers only. It may return a short label of where it applied
    (``"after Conv"``), or one per layer it changed, counted in the stats' ``sites``.

One rule per variant: two behaviours are two small rules sharing helpers, never one rule with a flag.

:func:`apply_rules` walks the graph in topological order, re-reading the graph for every candidate,
so a match never refers to a node an earlier rewrite removed (a classic pitfall of rule engines that
compute every match up front). It loops until no rule applies (bounded), and returns a
:class:`RuleStats` with the count per rule and the refusal reasons per rule.

:class:`RulePass` is the one base of every pass made of rules: a subclass says which rules to build
for a model, and its stats have the same keys for every rule pass: ``rewrites`` (the count),
``applied`` (``{rule: n}``), ``sites`` (``{label: n}``, when the rules label their rewrites) and
``left_alone`` (the :class:`~graphopt.core.ledger.LeftAlone` entries, when anything was refused).

The questions rules ask (is this a standard op of that type, the single consumer of a value, which
inputs are constant, a conv's geometry) are answered by :mod:`graphopt.core.ops`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from graphopt.core.ir import Graph, Model, Node
from graphopt.core.ledger import LeftAlone
from graphopt.core.manager import Pass, PassContext, PassResult
from graphopt.core.ops import STANDARD_DOMAINS


@dataclass
class Match:
    """What a rule found: the anchor node. A rule whose rewrite needs more (the other nodes of the
    pattern, a weight's folded form, a plan) subclasses it as a ``@dataclass(kw_only=True)`` with typed
    fields, so the rewrite reads ``match.producer``, never a string key."""

    node: Node


class Rule:
    """Base class of a local rewrite. Subclasses set ``name`` and ``root_ops`` and implement the two steps."""

    name: ClassVar[str] = ""
    root_ops: ClassVar[tuple[str, ...]] = ()

    def match(self, graph: Graph, node: Node) -> Match | str | None:
        raise NotImplementedError

    def rewrite(self, graph: Graph, match: Match) -> str | list[str] | None:
        raise NotImplementedError


@dataclass
class RuleStats:
    """How often each rule applied, where (the rewrites' labels), and why it was refused where it was
    (a :class:`LeftAlone`)."""

    applied: Counter[str] = field(default_factory=Counter)
    sites: Counter[str] = field(default_factory=Counter)
    left: LeftAlone = field(default_factory=LeftAlone)

    def refuse(self, rule: Rule, reason: str, node: Node) -> None:
        self.left.add(reason, node.name or node.op_type, rule=rule.name)

    @property
    def total(self) -> int:
        return sum(self.applied.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"rewrites": n, "applied": {rule: n}, "sites": {label: n},
        "left_alone": [{rule, reason, count, examples}]}`` (``sites`` and ``left_alone`` when not empty)."""
        out: dict[str, Any] = {"rewrites": self.total, "applied": dict(sorted(self.applied.items()))}
        if self.sites:
            out["sites"] = dict(sorted(self.sites.items()))
        return self.left.into(out)


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
                    sites = rule.rewrite(graph, found)
                    stats.applied[rule.name] += 1
                    stats.sites.update([sites] if isinstance(sites, str) else sites or ())
                    changed = True
                    break
            if not changed:
                stats.left.merge(round_refusals.left)
                break
    return stats


class RulePass(Pass):
    """A pass made of rules: :meth:`rules` builds them for a model, :meth:`run` applies them everywhere
    until none applies. Changed when a rule applied; stats as :meth:`RuleStats.to_dict`."""

    lossless = True

    def rules(self, model: Model, ctx: PassContext) -> Sequence[Rule]:
        raise NotImplementedError

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        stats = apply_rules(model, self.rules(model, ctx))
        return PassResult(stats.total > 0, stats.to_dict())
