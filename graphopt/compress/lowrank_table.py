"""Low-rank's sensitivity table at model scale: a factorization measured as a weight override.

``lowrank``'s ``select=target`` needs, per candidate layer and rank, the model's output error with only
that layer factorized. Building that model (a copy with the layer split in two) and a session for each of
``layers × ranks`` evaluations is what kept a BERT-base run from finishing: a 440 MB model parsed, copied
and compiled several hundred times.

A rank-``r`` factorization computes ``x·(P·Q) + b'``, which is the unchanged layer with its weight set to
``W' = P·Q`` and its bias to ``b'`` (the mean correction). So an evaluation feeds ``W'`` and ``b'`` as
initializer values to a session of the *unchanged* model (:func:`weight_overrides`), run from a cut just
before the layer on activations cached once (:mod:`graphopt.measure.segments`). One session serves every
layer its cut serves, at every rank; the layers come in topological order, so each cut's session is built
once and only one is held at a time. Up to float rounding (the pair multiplies in two steps) the outputs are
those of the factorized model; tests/test_lowrank_table.py checks it form by form.

Where the layer's storage does not allow it (the weight or bias shared with another reader, a Gemm without
a bias slot for the correction, a MatMul whose correction has no ``Add`` to go to), the unit is measured on
the factorized model as before, and the stats list it under ``by_model`` with the reason.

Work, and ranks in between
--------------------------
The table's work is ``samples · Σ_u measured_levels_u · MACs_u`` (``MACs_u``: one sample through the
nodes from the unit's cut on). Over option ``sensitivity_tmacs`` it measures fewer samples (down to 16),
then fewer ranks per layer (down to one), then 8 samples (:func:`graphopt.compress.budget.table_size`).
A rank not measured gets its error from the layer's own: for small changes the model's output error is
the layer's output error carried forward by the layers after it, ``e_model(r) ≈ g · e_layer(r)²`` with a
gain ``g`` that depends on where the layer sits, not on the rank. ``g`` is read off the measured ranks
(``e_model / e_layer²``) and interpolated linearly in the rank between them (held constant beyond), and
``e_layer(r)²`` comes from the spectrum (:func:`graphopt.passes.lossy.lowrank.make_plan`). With every
rank measured the table is the measurement itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphopt.compress.lstsq import stored_weight
from graphopt.core.ir import Graph, Node, Value
from graphopt.core.ops import is_op, producer_op, sole_consumer
from graphopt.measure import segments
from graphopt.measure.executor import EvalContext, in_worker


@dataclass
class WeightSlots:
    """Where a layer's factorized weight and bias are written as initializer values.

    ``weight`` is stored as ``layout`` says (:attr:`graphopt.compress.lstsq.LinearLayer.layout`, what
    :func:`graphopt.compress.lstsq.stored_weight` takes; ``trans_b`` also for a MatMul reading
    ``Transpose(Wᵀ)``, whose ``Wᵀ`` is written), each conv group in turn, divided by ``scale`` (a Gemm's α). ``bias`` (or ``None``): ``"replace"`` stores the plan's bias divided by
    ``bias_scale`` (β) in the shape of ``bias_base``; ``"add"`` stores ``bias_base`` plus the plan's mean
    correction (the ``Add`` after a MatMul)."""

    weight: str
    layout: tuple[str, tuple[int, int], bool]
    dtype: np.dtype
    scale: float = 1.0
    bias: str | None = None
    bias_mode: str = ""
    bias_base: np.ndarray | None = None
    bias_scale: float = 1.0

    @property
    def names(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)


def _sole_initializer(graph: Graph, value: Value | None, reader: Node) -> str | None:
    """Why ``value`` cannot be overridden for ``reader`` alone, or ``None`` when it can."""
    if value is None or not value.is_initializer:
        return "not an initializer"
    if graph.is_graph_output(value) or any(node is not reader for node, _ in graph.uses(value)):
        return f"initializer {value.name!r} has other readers"
    return None


def weight_slots(graph: Graph, site: Any) -> WeightSlots | str:
    """The :class:`WeightSlots` of a :class:`graphopt.passes.lossy.lowrank.Site`, or why its factorization
    cannot be written into the unchanged layer. ``bias`` is ``None`` where the layer has no slot for a
    bias (a Gemm/Conv without one, a MatMul without a constant ``Add`` after it): such a layer can carry
    a factorization without a mean correction only."""
    node = site.node
    w = node.inputs[1]
    if site.kind == "matmul" and not w.is_initializer:
        t = producer_op(graph, w, "Transpose")
        if t is None or sole_consumer(graph, w) is not node or graph.is_graph_output(w):
            return "weight is not an initializer"
        why = _sole_initializer(graph, t.inputs[0], t)
        if why is not None:
            return f"weight behind a Transpose: {why}"
        slots = WeightSlots(t.inputs[0].name, ("matmul", (1, 1), True), site.dtype)
    else:
        why = _sole_initializer(graph, w, node)
        if why is not None:
            return f"weight: {why}"
        kernel = tuple(site.weight.shape[2:]) if site.kind == "conv" else (1, 1)
        layout = (site.kind, kernel, site.kind == "gemm" and bool(node.attr("transB", 0)))
        slots = WeightSlots(w.name, layout, site.dtype, float(node.attr("alpha", 1.0)) if site.kind == "gemm" else 1.0)
    if site.kind in ("gemm", "conv"):
        b = node.inputs[2] if len(node.inputs) > 2 else None
        if b is None:
            return slots                       # the caller decides whether a correction needs a slot
        why = _sole_initializer(graph, b, node)
        if why is not None:
            return f"bias: {why}"
        base = b.array
        if base.size != site.out_features:
            return "bias is not one value per output"
        slots.bias, slots.bias_mode, slots.bias_base = b.name, "replace", base
        slots.bias_scale = float(node.attr("beta", 1.0)) if site.kind == "gemm" else 1.0
        return slots
    add = sole_consumer(graph, site.y)
    if is_op(add, "Add") and len(add.inputs) == 2 and site.y in add.inputs:
        other = add.inputs[1] if add.inputs[0] is site.y else add.inputs[0]
        if other is not site.y and _sole_initializer(graph, other, add) is None:
            base = other.array
            if base.size == site.out_features and (base.ndim == 0 or base.shape[-1] == site.out_features):
                slots.bias, slots.bias_mode, slots.bias_base = other.name, "add", base
    return slots


def override_values(slots: WeightSlots, plan: Any) -> dict[str, np.ndarray] | str:
    """The initializer values that make the unchanged layer compute ``plan`` (a
    :class:`graphopt.passes.lossy.lowrank.Plan` with its factors), or why they cannot."""
    form = plan.form
    stored = np.concatenate([stored_weight(slots.layout, form.reconstruct(g, p, q))   # [F, O] per group
                             for g, (p, q) in enumerate(plan.factors)])
    out = {slots.weight: (stored / slots.scale).astype(slots.dtype)}
    if plan.bias is None:
        return out
    bias = np.asarray(plan.bias, dtype=np.float64)
    if slots.bias is None:
        if np.any(bias):
            return "no bias to write the mean correction to"
        return out
    base = slots.bias_base
    if slots.bias_mode == "replace":
        value = bias / slots.bias_scale
    else:
        value = base.astype(np.float64) + bias.reshape(base.shape)
    out[slots.bias] = value.reshape(base.shape).astype(base.dtype)
    return out


@dataclass
class OverrideTable:
    """What :func:`measure_by_override` needs: the unchanged model with its data, each unit's slots, plans
    and cut, and the cached activations (:class:`graphopt.measure.segments.Checkpoints`)."""

    ev: EvalContext                      # the unchanged model and the samples
    slots: dict[Any, WeightSlots]        # unit key -> where its factorization is written
    plan: Any                            # (key, level) -> the full Plan (factors included)
    cuts: dict[Any, int] = field(default_factory=dict)
    checkpoints: Any = None
    threads: int | None = None
    held: tuple[int, Any, int] | None = None  # (cut, session, the cut it runs from): one at a time

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["held"] = None              # a session stays in its process; a worker builds its own
        return state

    def overridable(self, cut: int) -> list[str]:
        """Every slot of the units this cut serves: one session for all of them."""
        return sorted({n for key, s in self.slots.items() if self.cuts.get(key, 0) == cut for n in s.names})

    def session(self, cut: int) -> tuple[Any, int]:
        """The session serving ``cut`` and the cut it runs from."""
        if self.held is None or self.held[0] != cut:
            self.held = None                      # free the last cut's session before building the next
            self.held = (cut, *self.checkpoints.session(self.ev.proto(), cut, overridable=self.overridable(cut),
                                                        threads=1 if in_worker() else self.threads))
        return self.held[1], self.held[2]


def measure_by_override(table: OverrideTable, item: tuple[Any, int]) -> float:
    """Relative output error of the model with unit ``item[0]`` factorized at rank ``item[1]``."""
    key, level = item
    values = override_values(table.slots[key], table.plan(key, level))
    if isinstance(values, str):  # weight_slots accepted the unit, so only a mean correction can land here
        raise ValueError(f"unit {key!r}: {values}")
    sess, start = table.session(table.cuts.get(key, 0))
    return float(table.ev.error(table.checkpoints.run(sess, start, values)))


def build_table(proto: onnx.ModelProto, data: Any, slots: Mapping[Any, WeightSlots], plan, starts: Mapping[Any, int],
                evaluations: Mapping[Any, int], node_macs: Sequence[float], *, batch_size: int = 64,
                threads: int | None = None, weights: Mapping[str, np.ndarray] | None = None,
                ) -> tuple[OverrideTable, dict[str, Any]]:
    """The :class:`OverrideTable` of the units in ``slots`` (``starts[key]``: the position of the unit's
    node in ``proto.graph.node``) and its stats (cuts, cached MB). ``weights``: the arrays of ``proto``'s
    by-reference stubs (:func:`graphopt.measure.ort.structure`)."""
    checkpoints, cuts = segments.Checkpoints.build(
        proto, data, {k: (starts[k], int(evaluations.get(k, 1))) for k in slots}, node_macs,
        batch_size=batch_size, threads=threads, weights=weights)
    ev = EvalContext(proto, data, batch_size=checkpoints.batch, threads=threads, weights=dict(weights or {}))
    table = OverrideTable(ev, dict(slots), plan, cuts, checkpoints, threads=threads)
    if table.checkpoints.reference is not None:
        ev.set_reference(table.checkpoints.reference)
    stats: dict[str, Any] = {"cuts": len(table.checkpoints.values),
                             "cached_mb": round(table.checkpoints.nbytes / 2**20, 3)}
    if table.checkpoints.dropped:
        stats["cuts_dropped"] = {str(k): v for k, v in table.checkpoints.dropped.items()}
    return table, stats


def gain_filled(measured: Mapping[int, float], layer_sq: Mapping[int, float], levels: Sequence[int]
                ) -> dict[int, float]:
    """Errors at every level of a unit from the measured ones (module docstring): measured levels as
    measured; the others ``g(r)·e_layer(r)²`` with the gain ``g = e_model / e_layer²`` interpolated
    linearly in the rank between measured levels and held beyond them. A level whose layer error is 0
    has model error 0. Without any measured gain the layer's own error stands in (``g = 1``)."""
    gains = sorted((r, measured[r] / layer_sq[r]) for r in measured if layer_sq.get(r, 0.0) > 1e-30)
    out: dict[int, float] = {}
    for r in levels:
        if r in measured:
            out[r] = float(measured[r])
        elif layer_sq.get(r, 0.0) <= 0.0:
            out[r] = 0.0
        elif not gains:
            out[r] = float(layer_sq[r])
        else:
            ranks = [g[0] for g in gains]
            out[r] = float(np.interp(r, ranks, [g[1] for g in gains]) * layer_sq[r])
    return out
