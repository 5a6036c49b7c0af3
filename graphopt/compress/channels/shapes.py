"""Shape fixes: the shape inputs and attributes a pruning plan makes stale, and what they cost.

Reshape targets, Split sizes, Slice bounds, Resize sizes and Gather indices hold channel counts (or channel
positions). After a plan they must be rewritten: a constant is replaced (in place when only that node reads
it, else by a copy), an input computed at runtime from ``Shape`` is patched (the stale entries replaced, the
others sliced from the runtime value and concatenated again, so a dynamic batch size stays dynamic), an
attribute (opset < 10 Slice, Split) is set. :func:`shape_fixes` decides them, :func:`param_delta` counts the
params they add for :mod:`.plan`, and :mod:`.shrink` applies them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from graphopt.compress.channels.index_mapping import slice_params
from graphopt.core.ir import Graph, Node, Value

if TYPE_CHECKING:
    from graphopt.compress.channels.walk import CouplingWalk


def param_delta(graph: Graph, plan: Sequence[tuple[Node, ShapeFix]]) -> int:
    """Params added by the shape fixes of a plan (mirrors :func:`.shrink.apply`).

    A replaced constant read only there is rewritten in place; a shared one gets a new copy per reader and
    goes away with its last reader; a patch adds its positions and values; attributes cost nothing.
    """
    uses: dict[str, int] = {}
    delta = 0
    for node, fix in plan:
        delta += fix.size
        if fix.kind != "replace":
            continue
        v = node.inputs[fix.slot] if fix.slot < len(node.inputs) else None
        if v is None:
            continue
        arr = graph.constant_array(v)
        if arr is None:
            continue
        uses.setdefault(v.name, len(graph.uses(v)))
        uses[v.name] -= 1
        if uses[v.name] == 0:
            delta -= int(np.asarray(arr).size)
    return delta


@dataclass
class ShapeFix:
    """One stale shape input (or attribute) of a node after a plan, and how :mod:`.shrink` fixes it.

    ``kind``: ``"replace"`` — input ``slot`` (a constant, or missing) becomes the constant ``values``;
    ``"patch"`` — input ``slot`` is computed at runtime (from ``Shape``): ``values`` replace the entries at
    ``positions``, the others stay dynamic (a batch size stays dynamic), through Slice + Concat
    (:func:`patch_runs`);
    ``"attr"`` — attribute ``attr`` becomes ``values``. ``values`` is ``None`` when it needs the kept
    indices and only sizes were asked for.
    """

    kind: str
    slot: int | None
    size: int  # params the fix adds (new constant elements)
    values: np.ndarray | None = None
    positions: np.ndarray | None = None
    attr: str = ""
    length: int = 0  # entries of the patched vector


def patch_runs(length: int, positions: Sequence[int]) -> list[tuple[str, int, int]]:
    """Maximal runs ``(kind, lo, hi)`` of a shape vector: ``"keep"`` (sliced from the runtime value: a
    starts and an ends constant) or ``"set"`` (a constant of ``hi - lo`` entries). Slice and Concat keep the
    vector visible to onnx's shape inference (data propagation), unlike a scatter."""
    chosen = {int(p) for p in positions}
    runs: list[tuple[str, int, int]] = []
    for i in range(length):
        kind = "set" if i in chosen else "keep"
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1], i + 1)
        else:
            runs.append((kind, i, i + 1))
    return runs


def reshape_target(walk: CouplingWalk, node: Node, old: Mapping[str, tuple[int, ...]],
                   new: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    """The Reshape target the pruned model needs: old entries kept where still right (``-1``, ``0`` copy)."""
    x, y = node.inputs[0], node.outputs[0]
    sy_old = old[y.name]
    sx, sy = new.get(x.name, old[x.name]), new.get(y.name, sy_old)
    allowzero = int(node.attr("allowzero", 0))
    t = np.array(walk.evaluate(node.inputs[1]), dtype=np.int64).copy()
    for i in range(len(t)):
        if t[i] == -1:
            continue
        if t[i] == 0 and not allowzero and i < len(sx) and sx[i] == sy[i]:
            continue
        t[i] = sy[i]
    return t



Shapes = Mapping[str, tuple[int, ...]]


@dataclass
class _Site:
    """One node whose shape inputs may be stale: the shapes before (``old``) and after (``new``) the plan."""

    walk: CouplingWalk
    node: Node
    old: Shapes
    new: Shapes
    changed: set[str]
    kept_axes: Mapping[str, Mapping[int, np.ndarray]] | None
    dyn: bool  # its shape inputs read the shape of a changed value at runtime

    def is_changed(self, v: Value | None) -> bool:
        return v is not None and v.name in self.changed


def _patch(s: _Site, slot: int, desired: np.ndarray, must: set[int]) -> list[ShapeFix]:
    """A patch of runtime input ``slot``: the entries that differ from ``desired`` (and those in ``must``)."""
    now = np.asarray(s.walk.evaluate(s.node.inputs[slot], None, s.new)).ravel()
    want = np.asarray(desired).ravel()
    pos = sorted(must | {i for i in range(len(want)) if want[i] is not None and now[i] != want[i]})
    if not pos:
        return []
    values = None if any(want[i] is None for i in pos) else np.array([want[i] for i in pos], dtype=np.int64)
    size = sum(2 if kind == "keep" else hi - lo for kind, lo, hi in patch_runs(len(want), pos))
    return [ShapeFix("patch", slot, size, values, np.array(pos, dtype=np.int64), length=len(want))]


def _reshape_fixes(s: _Site) -> list[ShapeFix]:
    node, old, new = s.node, s.old, s.new
    y = node.outputs[0]
    if not (s.is_changed(y) or s.dyn):
        return []
    target = reshape_target(s.walk, node, old, new)
    if s.walk.graph.constant_array(node.inputs[1]) is not None:
        return [ShapeFix("replace", 1, target.size, target)]
    sy_old, sy = old[y.name], new.get(y.name, old[y.name])
    return _patch(s, 1, target, {i for i in range(len(sy)) if sy[i] != sy_old[i]})


def _split_fixes(s: _Site) -> list[ShapeFix]:
    node, old, new, ins = s.node, s.old, s.new, s.node.inputs
    if not any(s.is_changed(o) for o in node.outputs):
        return []
    x = ins[0]
    axis = int(node.attr("axis", 0)) % len(old[x.name])
    sizes = np.array([new.get(o.name, old[o.name])[axis] for o in node.outputs], dtype=np.int64)
    if (len(ins) > 1 and ins[1] is not None) or (s.walk.model.opset() or 13) >= 13:
        return [ShapeFix("replace", 1, sizes.size, sizes)]
    return [ShapeFix("attr", None, 0, sizes, attr="split")]


def _moved_bounds(s: _Site, sx: tuple[int, ...], starts: list[int], ends: list[int], axes: list[int],
                  moved: list[int]) -> tuple[list, list]:
    """Slice bounds along the axes that lost channels: new start = kept channels before the old start (``None``
    when only sizes were asked for)."""
    x = s.node.inputs[0]
    new_starts: list = list(starts)
    new_ends: list = list(ends)
    for i in moved:
        a = axes[i]
        kept = s.kept_axes.get(x.name, {}).get(a) if s.kept_axes is not None else None
        if kept is None and s.kept_axes is not None:
            kept = np.arange(sx[a])
        if kept is None:
            new_starts[i] = new_ends[i] = None
            continue
        idx = np.arange(sx[a])[slice(starts[i], ends[i], 1)]
        if not len(idx):
            new_starts[i] = new_ends[i] = 0
            continue
        start = int(np.searchsorted(kept, idx[0]))
        new_starts[i] = start
        new_ends[i] = start + int(np.count_nonzero((kept >= idx[0]) & (kept <= idx[-1])))
    return new_starts, new_ends


def _slice_input_fixes(s: _Site, moved: list[int], wanted: dict[int, list]) -> list[ShapeFix]:
    """Fixes of the bound inputs 1..4: a constant start / end is replaced; a runtime one is patched."""
    ins = s.node.inputs
    fixes = []
    for slot in range(1, min(len(ins), 5)):
        v = ins[slot]
        if v is None:
            continue
        const = s.walk.graph.constant_array(v)
        if const is not None:
            if moved and slot in (1, 2):
                arr = None if None in wanted[slot] else np.array(wanted[slot], dtype=np.asarray(const).dtype)
                fixes.append(ShapeFix("replace", slot, int(np.asarray(const).size), arr))
            continue
        if slot == 3:  # axes: indices into the input, not sizes
            continue
        fixes.extend(_patch(s, slot, np.array(wanted[slot], dtype=object), set(moved) if slot in (1, 2) else set()))
    return fixes


def _slice_fixes(s: _Site) -> list[ShapeFix]:
    ins = s.node.inputs
    x = ins[0]
    sx = s.old.get(x.name)
    if sx is None:
        return []
    starts, ends, axes, steps = slice_params(s.walk, s.node, len(sx))
    nx_ = s.new.get(x.name, sx)
    moved = [i for i, a in enumerate(axes) if nx_[a] != sx[a]]
    if not moved and not s.dyn:
        return []
    new_starts, new_ends = _moved_bounds(s, sx, starts, ends, axes, moved)
    if len(ins) == 1:  # attribute form (opset < 10)
        return [ShapeFix("attr", None, 0, None if None in new_starts else np.array(new_starts), attr="starts"),
                ShapeFix("attr", None, 0, None if None in new_ends else np.array(new_ends), attr="ends")]
    return _slice_input_fixes(s, moved, {1: new_starts, 2: new_ends, 3: axes, 4: steps})


def _resize_fixes(s: _Site) -> list[ShapeFix]:
    ins, y = s.node.inputs, s.node.outputs[0]
    if not (len(ins) > 3 and ins[3] is not None and s.is_changed(y)):
        return []
    sizes = np.array(s.new[y.name], dtype=np.int64)
    return [ShapeFix("replace", 3, sizes.size, sizes)]


def _gather_fixes(s: _Site) -> list[ShapeFix]:
    """Constant indices along a pruned axis: renumbered into the kept positions of the input."""
    node, old, new, kept_axes = s.node, s.old, s.new, s.kept_axes
    x, y = node.inputs[0], node.outputs[0]
    if not s.is_changed(x):
        return []
    axis = int(node.attr("axis", 0)) % len(old[x.name])
    if new[x.name][axis] == old[x.name][axis]:
        return []
    idx = np.asarray(s.walk.graph.constant_array(node.inputs[1]))
    if kept_axes is None:
        return [ShapeFix("replace", 1, int(new.get(y.name, old[y.name])[axis]))]
    kept_x = kept_axes.get(x.name, {}).get(axis, np.arange(old[x.name][axis]))
    kept_y = kept_axes.get(y.name, {}).get(axis, np.arange(old[y.name][axis]))
    source = idx.astype(np.int64)[kept_y] % old[x.name][axis]
    values = np.searchsorted(kept_x, source).astype(idx.dtype)
    return [ShapeFix("replace", 1, int(values.size), values)]


_FIXERS = {"Reshape": _reshape_fixes, "Split": _split_fixes, "Slice": _slice_fixes, "Resize": _resize_fixes,
           "Gather": _gather_fixes}


def shape_fixes(walk: CouplingWalk, node: Node, old: Shapes, new: Shapes, changed: set[str],
                kept_axes: Mapping[str, Mapping[int, np.ndarray]] | None = None) -> list[ShapeFix]:
    """Shape inputs / attributes of ``node`` a plan makes stale (Reshape targets, Split sizes, Slice bounds,
    Resize sizes, Gather indices), with the params each fix adds (see :class:`ShapeFix` and :func:`param_delta`).

    ``old`` / ``new``: shapes by shape key before and after the plan; ``changed``: the keys whose shape
    changes; ``kept_axes``: kept indices per key and axis (``None``: sizes only, values left ``None``).
    """
    fixer = _FIXERS.get(node.op_type)
    if fixer is None:
        return []
    dyn = bool(walk.dynamic.get(node.name, set()) & changed)
    return fixer(_Site(walk, node, old, new, changed, kept_axes, dyn))
