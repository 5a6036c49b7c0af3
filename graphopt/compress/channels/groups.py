"""Groups: channels that are removed together, found by a union-find over the positions the walk coupled.

Connected positions form one *channel* (an equivalence class, :func:`components`). Channels that touch exactly
the same dimensions, the same number of times, form a *group* (:func:`build_groups`): they are interchangeable,
and a pruning plan says how many (which) of a group's channels to keep. A ``Concat`` output therefore belongs
to the group of each branch (with the branch's offset), and each branch stays its own group.

A dimension spread over several axes may shrink along one axis only (the largest, the others keep their size:
the ``g`` of a shuffle, the number of heads), so its positions that differ only in the other axes are coupled
too.

What freezes a group (``Group.frozen`` is the first reason, ``Group.frozen_all`` all of them; a frozen group is
never pruned): every reason the walk recorded on one of its dimensions — an op without a coupling rule or a
rule that cannot follow the dimension (the message names the op and node), a graph input or output (the
model's interface keeps its shape), a value read inside a subgraph, a tensor reached with two different axis
structures. A group of one channel is not prunable, and at least ``min_keep`` (1) channel is always kept: a
group never removes every channel of anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.compress.channels.dims import Dim

if TYPE_CHECKING:
    from graphopt.compress.channels.walk import CouplingWalk


@dataclass
class Member:
    """One dimension of a group.

    ``index_map[i]`` are the positions (flat over ``axes``, row-major) of group channel ``i`` in this
    dimension; shape ``[group.size, k]``. ``axis`` is the axis that shrinks. ``axes`` has one entry except
    for flat multi-axis dimensions (a channel shuffle's ``(groups, channels)``, attention's ``(heads,
    head_dim)``): there the positions are flat indices over ``axes``, not indices along ``axis``, so
    per-axis statistics must unravel them (``np.unravel_index(pos, sizes)``) or skip such members.
    ``use`` names the reading node when the member is one reader's view of a weight several nodes share.
    """

    value: str
    axis: int
    index_map: np.ndarray
    axes: tuple[int, ...] = ()
    is_param: bool = False
    use: str | None = None  # for a weight several nodes read: the node this dimension belongs to


@dataclass
class Producer:
    """A weight whose output channels are the group: slice it along ``axis`` (Conv W axis 0, biases, BN...)."""

    node: str
    param: str
    axis: int
    index_map: np.ndarray


@dataclass
class Consumer:
    """A layer whose input channels are the group: ``param`` (its weight) is sliced along ``axis``.

    ``value`` is the layer's input tensor (it keeps its name in the pruned model, with fewer channels).
    Conv W axis 1, Gemm W feature axis (a flattened channel maps to its block of features), MatMul W axis -2,
    ConvTranspose W axis 0.
    """

    node: str
    value: str
    param: str
    axis: int
    index_map: np.ndarray


@dataclass
class Group:
    """Channels that are removed together (see the module docstring); ``frozen`` says why it may not be pruned."""

    gid: int
    size: int
    frozen: str | None
    members: list[Member]
    producers: list[Producer]
    consumers: list[Consumer]
    divisor: int = 1
    min_keep: int = 1
    frozen_all: list[str] = field(default_factory=list)
    #: positions of one channel in each weight it slices (the fewest over its weights): ``D`` for a group of
    #: attention heads, 1 for filters. A kept count of ``k`` channels keeps ``k·width`` weight rows, so
    #: ``prune_filters``' block multiple applies to ``k·width`` (set by the walk's ``heads`` mode only).
    width: int = 1

    @property
    def prunable(self) -> bool:
        return self.frozen is None and self.size >= 2

    def member(self, value: str) -> Member | None:
        return next((m for m in self.members if m.value == value), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (index maps left out: the sizes say how many positions a channel has)."""
        return {
            "gid": self.gid, "size": self.size, "frozen": self.frozen, "prunable": self.prunable,
            "divisor": self.divisor, "min_keep": self.min_keep, "width": self.width,
            "members": [{"value": m.value, "axis": m.axis, "axes": list(m.axes),
                         "per_channel": int(m.index_map.shape[1]),
                         "param": m.is_param} for m in self.members],
            "producers": [{"node": p.node, "param": p.param, "axis": p.axis} for p in self.producers],
            "consumers": [{"node": c.node, "value": c.value, "param": c.param, "axis": c.axis}
                          for c in self.consumers],
            "frozen_all": list(self.frozen_all),
        }

def components(n: int, ea: np.ndarray, eb: np.ndarray) -> np.ndarray:
    """Label of each of ``n`` positions: the smallest position connected to it."""
    parent = np.arange(n, dtype=np.int64)
    if not len(ea):
        return parent
    while True:
        while True:  # pointer jumping to roots
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
        ra, rb = parent[ea], parent[eb]
        differ = ra != rb
        if not differ.any():
            return parent
        lo = np.minimum(ra[differ], rb[differ])
        hi = np.maximum(ra[differ], rb[differ])
        np.minimum.at(parent, hi, lo)


def _signed_classes(b: CouplingWalk, dims: list[Dim], labels: np.ndarray) -> tuple[np.ndarray, list[tuple]]:
    """Positions sorted by (class, dim, position), and one entry ``(first dim, first position, signature,
    class starts)`` per group in the deterministic group order (by first dimension, then first position).

    The signature of a class is the ``(dim, count)`` of its runs; equal signatures form one group.
    """
    offsets = np.array([d.offset for d in dims], dtype=np.int64)
    pos = np.arange(b.total, dtype=np.int64)
    dim_of = np.searchsorted(offsets, pos, side="right") - 1
    # Sort positions by (class, dim, position): a class is then one slice, made of one run per dim it touches.
    order = np.lexsort((pos, dim_of, labels))
    lab_sorted, dim_sorted = labels[order], dim_of[order]
    n = len(order)
    new_class = np.ones(n, dtype=bool)
    new_class[1:] = lab_sorted[1:] != lab_sorted[:-1]
    new_run = new_class.copy()
    new_run[1:] |= dim_sorted[1:] != dim_sorted[:-1]
    cls_start = np.flatnonzero(new_class)
    run_start = np.flatnonzero(new_run)
    run_dim = dim_sorted[run_start].tolist()
    run_count = np.diff(np.append(run_start, n)).tolist()
    first_run = np.searchsorted(run_start, cls_start).tolist()
    last_run = first_run[1:] + [len(run_start)]
    by_sig: dict[tuple, list[int]] = {}
    for ci, (r0, r1) in enumerate(zip(first_run, last_run)):
        sig = tuple(zip(run_dim[r0:r1], run_count[r0:r1]))
        by_sig.setdefault(sig, []).append(ci)
    entries = []
    for sig, classes in by_sig.items():
        starts = cls_start[classes]
        starts = starts[np.argsort(order[starts], kind="stable")]  # channel order: position in the first dim
        entries.append((sig[0][0], int(order[starts[0]]), sig, starts))
    entries.sort(key=lambda t: (t[0], t[1]))
    return order, entries


def _group(gid: int, sig: tuple, starts: np.ndarray, order: np.ndarray, dims: list[Dim],
           roles_by_dim: dict[int, list[tuple]]) -> Group:
    """One group: a member per dimension of its signature, the weights' roles, every freezing reason."""
    members: list[Member] = []
    producers: list[Producer] = []
    consumers: list[Consumer] = []
    frozen: list[str] = []
    within = 0  # offset of this dim's run inside each class's slice
    for di, k in sig:
        d = dims[di]
        index_map = order[starts[:, None] + within + np.arange(k)] - d.offset
        within += k
        members.append(Member(d.value.name, d.prunable_axis, index_map, d.axes, d.is_param, d.use))
        frozen.extend(r for r in d.frozen if r not in frozen)
        for kind, node, value, _ in roles_by_dim.get(di, []):
            if kind == "producer":
                producers.append(Producer(node, d.value.name, d.prunable_axis, index_map))
            else:
                consumers.append(Consumer(node, value, d.value.name, d.prunable_axis, index_map))
    return Group(gid, len(starts), frozen[0] if frozen else None, members, producers, consumers,
                 frozen_all=frozen)


def build_groups(b: CouplingWalk, dims: list[Dim], labels: np.ndarray) -> list[Group]:
    """The groups of the walk's dimensions (``dims`` in index order), given each position's class label."""
    if not dims:
        return []
    order, entries = _signed_classes(b, dims, labels)
    roles_by_dim: dict[int, list[tuple]] = {}
    for kind, node, value, d in b.roles.values():
        roles_by_dim.setdefault(d.index, []).append((kind, node, value, d))
    groups = [_group(gid, sig, starts, order, dims, roles_by_dim) for gid, (_, _, sig, starts) in enumerate(entries)]
    if b.heads:
        for g in groups:
            weights = [m.index_map.shape[1] for m in g.members if m.is_param]
            g.width = min(weights) if weights else 1
    return groups
