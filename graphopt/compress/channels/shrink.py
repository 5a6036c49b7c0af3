"""Physical channel removal: apply a pruning plan from :mod:`.analysis` to a model.

``apply(model, analysis, keep)`` keeps, for every group ``gid`` in ``keep``, only the channels
``keep[gid]`` (sorted indices into the group's channels) and removes the others everywhere the
analysis coupled them:

* every weight dimension of the group (Conv/Gemm/MatMul filters and input rows, biases, BN statistics,
  per-channel constants of elementwise ops) is sliced with ``np.take`` along its axis. A weight read by
  one node is rewritten in place; a ``Constant`` node's tensor becomes a new initializer. A weight several
  nodes share is never rewritten: each distinct way its readers are sliced gets a new initializer
  (readers coupled alike share one), and the old tensor is removed once no node reads it;
* shape constants that depend on channel counts are rewritten: Reshape targets (a target computed
  from ``Shape`` becomes a constant), Split sizes, Slice bounds (new start = kept channels before the
  old start), Resize sizes, and the ``group`` of grouped/depthwise convolutions;
* shapes are re-inferred (:func:`graphopt.core.shapes.infer_shapes` with ``reset=True``) and every coupled
  activation is checked to have the expected new shape.

Activation names are preserved, so calibration data of the original and the pruned model match by
name. Refusals (:class:`graphopt.core.errors.GraphoptError`, the model untouched): a frozen group, an unknown
group id, indices out of range / unsorted / repeated, fewer than ``min_keep`` kept channels, a kept count
that is not a multiple of ``divisor``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphopt.compress.channels.analysis import ChannelAnalysis
from graphopt.compress.channels.dims import Dim
from graphopt.compress.channels.plan import PlanCost
from graphopt.compress.channels.shapes import ShapeFix, patch_runs, shape_fixes
from graphopt.core.errors import GraphoptError
from graphopt.core.ir import Graph, Model, Node, Value
from graphopt.core.shapes import infer_shapes


def validate(analysis: ChannelAnalysis, keep: Mapping[int, Sequence[int] | np.ndarray]) -> dict[int, np.ndarray]:
    """Check a plan and return it as sorted int64 arrays (only groups that lose channels)."""
    out: dict[int, np.ndarray] = {}
    for gid, kept in keep.items():
        if not 0 <= int(gid) < len(analysis.groups):
            raise GraphoptError(f"unknown channel group {gid}")
        g = analysis.group(int(gid))
        arr = np.asarray(kept, dtype=np.int64).ravel()
        if arr.size and (arr.min() < 0 or arr.max() >= g.size):
            raise GraphoptError(f"group {gid}: kept indices must be in [0, {g.size})")
        if arr.size > 1 and not (np.diff(arr) > 0).all():
            raise GraphoptError(f"group {gid}: kept indices must be sorted and distinct")
        if arr.size == g.size:
            continue
        if g.frozen is not None:
            raise GraphoptError(f"group {gid} is frozen: {g.frozen}")
        if arr.size < g.min_keep:
            raise GraphoptError(f"group {gid}: must keep at least {g.min_keep} of {g.size} channels")
        if arr.size % g.divisor:
            raise GraphoptError(f"group {gid}: kept count {arr.size} is not a multiple of {g.divisor}")
        out[int(gid)] = arr
    return out


def apply(model: Model, analysis: ChannelAnalysis, keep: Mapping[int, Sequence[int] | np.ndarray]) -> dict[str, Any]:
    """Remove every channel not in ``keep[gid]`` from ``model`` (mutated); see the module docstring.

    Returns
    -------
    dict
        ``groups``: per changed group ``{gid, before, after}``; ``params_removed``; ``rewritten``: shape
        inputs and attributes that were updated.
    """
    if analysis.model is not model:
        # The analysis holds Value objects of the model it analysed: its names must still resolve.
        raise GraphoptError("the analysis was made for another model object; analyse this model first")
    plan = validate(analysis, keep)
    stats: dict[str, Any] = {"groups": [], "params_removed": 0, "rewritten": []}
    if not plan:
        return stats
    cost = analysis.plan_cost
    stats["groups"] = [{"gid": gid, "before": analysis.group(gid).size, "after": int(kept.size)}
                       for gid, kept in plan.items()]
    kept_axes = _kept_axes(analysis, plan)
    old = cost.shapes
    new = _new_shapes(old, kept_axes)
    changed = {k for k, s in new.items() if s != old[k]}
    shapes = dict(old)
    shapes.update(new)
    # decide shape-input rewrites before anything changes (they read the original constants)
    fixes, attr_updates = _decide_rewrites(analysis, old, shapes, changed, kept_axes)
    stats["params_removed"] = _slice_weights(model.graph, cost, old, changed, kept_axes)
    stats["rewritten"] = _rewrite_shape_inputs(model.graph, fixes, attr_updates)
    infer_shapes(model, reset=True)
    _check_new_shapes(model.graph, cost, new, changed, kept_axes)
    return stats


def _kept_axes(analysis: ChannelAnalysis, plan: Mapping[int, np.ndarray]) -> dict[str, dict[int, np.ndarray]]:
    """Shape key (value, or ``value@reader`` for a shared weight) -> axis -> kept indices, for every dimension
    the plan touches."""
    removed: dict[tuple, list[np.ndarray]] = {}
    for gid, kept in plan.items():
        g = analysis.group(gid)
        drop = np.setdiff1d(np.arange(g.size), kept)
        for m in g.members:
            removed.setdefault((m.value, m.axes, m.use), []).append(m.index_map[drop].ravel())
    kept_axes: dict[str, dict[int, np.ndarray]] = {}
    for key, parts in removed.items():
        d = analysis.plan_cost.dims[key]
        kept_flat = np.setdiff1d(np.arange(d.size), np.concatenate(parts))
        kept_axes.setdefault(d.shape_key, {}).update(_per_axis(d, kept_flat))
    return kept_axes


def _new_shapes(old: Mapping[str, tuple[int, ...]], kept_axes: Mapping[str, Mapping[int, np.ndarray]]
                ) -> dict[str, tuple[int, ...]]:
    new: dict[str, tuple[int, ...]] = {}
    for key, axes in kept_axes.items():
        shape = list(old[key])
        for a, idx in axes.items():
            shape[a] = len(idx)
        new[key] = tuple(shape)
    return new


def _decide_rewrites(analysis: ChannelAnalysis, old: Mapping[str, tuple[int, ...]],
                     shapes: Mapping[str, tuple[int, ...]], changed: set[str],
                     kept_axes: Mapping[str, Mapping[int, np.ndarray]]
                     ) -> tuple[list[tuple[Node, ShapeFix]], list[tuple[Node, str, Any]]]:
    """The shape-input fixes and attribute updates of every node a changed shape reaches, in graph order."""
    fixes: list[tuple[Node, ShapeFix]] = []
    attr_updates: list[tuple[Node, str, Any]] = []
    for n in analysis.plan_cost.changed_nodes(changed):
        for fix in shape_fixes(analysis.walk, n, old, shapes, changed, kept_axes):
            if fix.values is None:
                raise GraphoptError(f"internal: no value for the {fix.kind} of {n.op_type} {n.name!r}")
            if fix.kind == "attr":
                attr_updates.append((n, fix.attr, [int(t) for t in fix.values]))
            else:
                fixes.append((n, fix))
        attr_updates.extend(_attribute_updates(n, old, shapes))
    return fixes, attr_updates


def _slice_weights(graph: Graph, cost: PlanCost, old: Mapping[str, tuple[int, ...]], changed: set[str],
                   kept_axes: Mapping[str, Mapping[int, np.ndarray]]) -> int:
    """Slice the weights: one new tensor per weight, or per distinct slicing of a shared weight's readers.
    Returns the params removed."""
    weights = sorted(k for k in changed if cost.key_info[k][0].name in graph.initializers
                     or graph.constant_array(cost.key_info[k][0]) is not None)
    params_before = params_after = 0
    shared: dict[str, list[str]] = {}
    for key in weights:
        value, use = cost.key_info[key]
        if use is not None:
            shared.setdefault(value.name, []).append(key)
            continue
        arr = _sliced(graph, value, kept_axes[key])
        params_before += int(np.prod(old[key]))
        params_after += arr.size
        _replace_weight(graph, value, arr)
    for keys in shared.values():
        before, after = _slice_shared_weight(graph, cost, keys, kept_axes)
        params_before += before
        params_after += after
    return params_before - params_after


def _slice_shared_weight(graph: Graph, cost: PlanCost, keys: list[str],
                         kept_axes: Mapping[str, Mapping[int, np.ndarray]]) -> tuple[int, int]:
    """Give each reader of a shared weight its slicing (readers sliced alike share one copy); drop the old
    tensor when no node reads it any more. Returns (params removed with it, params of the copies)."""
    value = cost.key_info[keys[0]][0]
    params_after = 0
    copies: dict[tuple, Value] = {}
    for key in keys:
        use = cost.key_info[key][1]
        signature = cost.use_signature[(value.name, use)]
        if signature not in copies:
            arr = _sliced(graph, value, kept_axes[key])
            copies[signature] = graph.add_initializer(arr, value.name)
            params_after += arr.size
        reader = next(n for n in graph.consumers(value) if n.name == use)
        for slot, u in enumerate(reader.inputs):
            if u is value:
                graph.set_input(reader, slot, copies[signature])
    params_before = 0
    if not graph.uses(value):
        params_before = int(np.asarray(graph.constant_array(value)).size)
    _drop_if_unused(graph, value)
    return params_before, params_after


def _rewrite_shape_inputs(graph: Graph, fixes: list[tuple[Node, ShapeFix]],
                          attr_updates: list[tuple[Node, str, Any]]) -> list[str]:
    """Apply the shape-input fixes and attribute updates; returns what was rewritten."""
    rewritten = []
    for node, fix in fixes:
        if fix.kind == "replace":
            _set_constant_input(graph, node, fix.slot, fix.values)
        else:
            _patch_input(graph, node, fix)
        rewritten.append(f"{node.op_type} {node.name} input {fix.slot}")
    for node, attr, value in attr_updates:
        if value is None:
            node.del_attr(attr)
        else:
            node.set_attr(attr, value)
        rewritten.append(f"{node.op_type} {node.name} {attr}")
    return rewritten


def _check_new_shapes(graph: Graph, cost: PlanCost, new: Mapping[str, tuple[int, ...]], changed: set[str],
                      kept_axes: Mapping[str, Mapping[int, np.ndarray]]) -> None:
    """Every coupled activation has, after re-inference, the channel counts the plan gives it."""
    by_name = {v.name: v for v in graph.values()}
    for name in changed:
        value, _ = cost.key_info.get(name, (None, None))
        if value is None or graph.constant_array(value) is not None or name in graph.initializers:
            continue
        v = by_name.get(name)
        got = v.shape if v is not None else None
        if got is None:
            continue
        for a, size in enumerate(new[name]):
            if a < len(got) and isinstance(got[a], int) and got[a] != size and a in kept_axes[name]:
                raise GraphoptError(f"internal: {name!r} axis {a} has {got[a]} channels after pruning, "
                                    f"expected {size}")


def _per_axis(d: Dim, kept_flat: np.ndarray) -> dict[int, np.ndarray]:
    """Kept indices per axis of a dimension; a multi-axis dimension must keep a product of index sets."""
    if len(d.axes) == 1:
        return {d.axes[0]: kept_flat}
    coords = np.unravel_index(kept_flat, d.sizes)
    per = {a: np.unique(c) for a, c in zip(d.axes, coords)}
    if int(np.prod([len(v) for v in per.values()])) != kept_flat.size:
        raise GraphoptError(f"internal: kept positions of {d.label()} are not a product of per-axis sets")
    for a, idx in per.items():
        if a != d.prunable_axis and len(idx) != d.sizes[d.axes.index(a)]:
            raise GraphoptError(f"internal: {d.label()} loses positions along its fixed axis {a}")
    return per


def _sliced(graph: Graph, value: Value, kept: Mapping[int, np.ndarray]) -> np.ndarray:
    arr = np.asarray(graph.constant_array(value))
    for a, idx in sorted(kept.items()):
        arr = np.take(arr, idx, axis=a)
    return arr


def _replace_weight(graph: Graph, value: Value, arr: np.ndarray) -> None:
    """Give every reader of ``value`` the sliced tensor (in place only when one node reads an initializer)."""
    readers = graph.uses(value)
    if value.is_initializer and len(graph.consumers(value)) == 1 and not graph.is_graph_input(value):
        graph.set_initializer_array(value, arr)
        return
    new = graph.add_initializer(arr, value.name)
    for node, slot in list(readers):
        graph.set_input(node, slot, new)
    _drop_if_unused(graph, value)


def _set_constant_input(graph: Graph, node: Node, slot: int, arr: np.ndarray) -> None:
    """Input ``slot`` of ``node`` becomes the constant ``arr`` (see :func:`.shapes.param_delta`)."""
    v = node.inputs[slot] if slot < len(node.inputs) else None
    if v is not None and v.is_initializer and graph.uses(v) == [(node, slot)] and not graph.is_graph_input(v):
        graph.set_initializer_array(v, arr)
        return
    hint = v.name if v is not None else f"{node.name}_split"
    new = graph.add_initializer(arr, hint)
    graph.set_input(node, slot, new)
    if v is not None and graph.constant_array(v) is not None:
        _drop_if_unused(graph, v)


def _drop_if_unused(graph: Graph, value: Value) -> None:
    if graph.uses(value) or graph.is_graph_output(value):
        return
    if value.is_initializer:
        graph.remove_initializer(value)
        return
    producer = graph.producer(value)
    if producer is not None and producer.op_type == "Constant" and not any(
            graph.uses(o) for o in producer.outputs if o is not None):
        graph.remove_node(producer)


def _patch_input(graph: Graph, node: Node, fix: ShapeFix) -> None:
    """Input ``fix.slot`` (computed at runtime) gets ``fix.values`` at ``fix.positions``; the other entries
    are sliced from the runtime value and everything is concatenated again (see :func:`.shapes.patch_runs`)."""
    v = node.inputs[fix.slot]
    dtype = np.int32 if v.dtype == 6 else np.int64
    length = fix.length
    values = dict(zip(fix.positions.tolist(), fix.values.tolist()))
    pieces = []
    for kind, lo, hi in patch_runs(length, fix.positions.tolist()):
        if kind == "set":
            pieces.append(graph.add_initializer(np.array([values[i] for i in range(lo, hi)], dtype=dtype),
                                                f"{node.name}_fix"))
            continue
        starts = graph.add_initializer(np.array([lo], np.int64), f"{node.name}_fix_start")
        ends = graph.add_initializer(np.array([hi], np.int64), f"{node.name}_fix_end")
        piece = graph.add_node("Slice", [v, starts, ends], [f"{v.name}_{lo}_{hi}"], name=f"{node.name}_fix_slice",
                               anchor=node)
        pieces.append(piece.outputs[0])
    cat = graph.add_node("Concat", pieces, [f"{v.name}_pruned"], attrs={"axis": 0}, name=f"{node.name}_fix_concat",
                         anchor=node)
    graph.set_input(node, fix.slot, cat.outputs[0])


def _attribute_updates(node: Node, old: Mapping[str, tuple[int, ...]], new: Mapping[str, tuple[int, ...]]
                       ) -> list[tuple[Node, str, Any]]:
    """The ``group`` of a grouped Conv whose channels shrink; a Split's ``num_outputs`` (replaced by sizes)."""
    op = node.op_type
    out: list[tuple[Node, str, Any]] = []
    if op == "Conv" and int(node.attr("group", 1)) > 1:
        y = node.outputs[0]
        if y.name in new and new[y.name][1] != old[y.name][1]:
            g = int(node.attr("group", 1))
            per_out = old[y.name][1] // g
            out.append((node, "group", new[y.name][1] // per_out))
    if op == "Split" and node.attr("num_outputs") is not None and any(
            new.get(o.name, old[o.name]) != old[o.name] for o in node.outputs):
        out.append((node, "num_outputs", None))  # the sizes input replaces it
    return out
