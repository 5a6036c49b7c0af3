"""A dimension of the coupling graph, and the exception a coupling rule raises when it cannot follow one.

A *dimension* is ``(value, axes, reader)``: one tensor (activation or weight) and one axis of it, or a few
axes read as one flat index in row-major order (a channel shuffle's ``(groups, channels)``, attention's
``(heads, head_dim)``). Only its largest axis shrinks (:attr:`Dim.prunable_axis`). ``reader`` is ``None``
except for one reader's view of a weight several nodes share (each reader has its own dimensions of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from graphopt.core.ir import Value


class CannotFollow(Exception):
    """A rule cannot follow a dimension through a node; the message says why (it freezes the group)."""


def shape_key(value: str, use: str | None) -> str:
    """Where a shape is kept: by value name, or ``value@reader`` for one reader of a shared weight."""
    return value if use is None else f"{value}@{use}"


@dataclass(eq=False)
class Dim:
    """One dimension: its positions ``offset .. offset + size - 1`` in the walk's global numbering."""

    index: int
    value: Value
    axes: tuple[int, ...]
    sizes: tuple[int, ...]
    offset: int
    prunable_axis: int
    is_param: bool
    use: str | None = None  # the reading node, for a weight several nodes share (each reader has its own dims)
    frozen: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return math.prod(self.sizes)

    @property
    def key(self) -> tuple[str, tuple[int, ...], str | None]:
        return (self.value.name, self.axes, self.use)

    def __post_init__(self) -> None:
        #: where the cost model keeps this tensor's shape: per value, or per reader for a shared weight
        self.shape_key = shape_key(self.value.name, self.use)
        #: positions per index of the shrinking axis
        self.stride = self.size // self.sizes[self.axes.index(self.prunable_axis)]

    def label(self) -> str:
        at = f"@{self.use}" if self.use else ""
        return f"{self.value.name}{at}[{','.join(map(str, self.axes))}]"
