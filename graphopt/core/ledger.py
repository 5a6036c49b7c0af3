"""What a pass left alone, and why: the one ledger every pass reports refusals with.

A pass that meets something it cannot reason about leaves it alone and says so. The ledger counts
each ``(rule, reason)`` once, with the names of up to ``examples`` of the things refused, and turns
into the stats entry every pass uses::

    "left_alone": [{"rule": "fold_batchnorm", "reason": "weight is shared", "count": 2,
                    "examples": ["Conv_3", "Conv_7"]}, ...]

``rule`` is present only when the pass has several rules (a rule pass, fold_constants' checks); the
list is sorted by rule and reason, so the stats are the same from run to run.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

__all__ = ["LeftAlone"]


class LeftAlone:
    """Refusals counted by ``(rule, reason)``, with a few example names each."""

    def __init__(self, examples: int = 3) -> None:
        self.max_examples = examples
        self.counts: Counter[tuple[str, str]] = Counter()
        self.examples: dict[tuple[str, str], list[str | int]] = defaultdict(list)

    def add(self, reason: str, example: str | int | None = None, *, rule: str = "", count: int = 1) -> None:
        """Record that ``example`` (a node, value or layer name, or a group id) was left alone for ``reason``."""
        key = (rule, reason)
        self.counts[key] += count
        if example is not None and len(self.examples[key]) < self.max_examples:
            self.examples[key].append(example)

    def merge(self, other: LeftAlone) -> None:
        for (rule, reason), count in other.counts.items():
            self.counts[(rule, reason)] += count
            room = self.max_examples - len(self.examples[(rule, reason)])
            self.examples[(rule, reason)].extend(other.examples.get((rule, reason), [])[:max(room, 0)])

    def __bool__(self) -> bool:
        return bool(self.counts)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def reasons(self) -> set[str]:
        return {reason for _, reason in self.counts}

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-ready entries, sorted by rule then reason."""
        out = []
        for (rule, reason), count in sorted(self.counts.items()):
            entry: dict[str, Any] = {"rule": rule} if rule else {}
            entry.update(reason=reason, count=count, examples=list(self.examples.get((rule, reason), [])))
            out.append(entry)
        return out

    def into(self, stats: dict[str, Any]) -> dict[str, Any]:
        """``stats`` with ``left_alone`` set when anything was left alone (returned for chaining)."""
        if self.counts:
            stats["left_alone"] = self.to_list()
        return stats
