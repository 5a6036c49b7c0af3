"""Least-squares reconstruction of linear layers after pruning (He et al. 2017; ThiNet).

After channels are removed, every plain linear layer ``y = x W + b`` (Conv with ``group = 1``, Gemm,
MatMul; :class:`graphopt.compress.lstsq.LinearLayer`) whose input changed is re-fitted so that its output on
calibration data matches the *unpruned* model's output at the same value name:

    ``min_{W, b} ‖X W + 1bᵀ − Y‖² + λ ‖W − W₀‖²``

* ``X`` are the layer's input rows in the **pruned** model (im2col patches of the kept channels), so a
  layer also compensates the errors of the layers re-fitted before it; the layers are fitted one at a
  time in topological order, each from a fresh pass over the data (option ``sequential``).
* ``Y`` are the output rows of the **original** model at the same value, restricted to the output
  channels the layer keeps (``out_keep``).
* The bias column is not penalised: at the optimum ``b = ȳ − x̄ W``, which absorbs the mean
  contribution of the removed input channels (``Σ_removed x̄_c W_c``) into the bias.
* The ridge pulls towards the layer's current (pruned) weights ``W₀`` rather than towards 0, so a
  strong ridge means "change little". ``λ = ρ · mean(diag(XᵀX))``; ``ρ`` is chosen per layer from a
  grid by two-fold cross-validation on the calibration rows (the rows of even and of odd batches),
  ``ρ = ∞`` (keep ``W₀``, re-fit only the bias) included, so a fit that does not generalise is not
  taken. The final solve uses all rows.

Through the activation: when the layer's output is read only by ``Relu`` or ``Clip(lo, hi)``, what
matters is ``act(XW + b)``. Where the original output is clipped (``y ≤ lo`` or ``y ≥ hi``), any
prediction on the same side of the bound is exact, so the target there becomes ``min(pred, lo)`` /
``max(pred, hi)`` and the fit is solved again (``XᵀX`` is unchanged, only ``XᵀT`` is recomputed from
the sampled rows, kept in memory for this one layer); a few iterations, kept only while the error
after the activation decreases.

Statistics stream (``XᵀX``, ``XᵀY``, at most ``max_rows`` rows per layer, sampled uniformly with a
seeded generator), so memory is bounded by one batch plus ``F²`` per layer, plus the rows an
activation-aware fit keeps: a layer with many features gets fewer rows (:func:`layer_rows`) so that
those stay within ``KEPT_ROW_BYTES``. The targets of all layers come from one reference pass; they stay
in memory up to ``TARGET_RAM_BYTES`` in all and go to a temporary directory beyond it
(:class:`TargetStore`), so a deep model does not hold every layer's targets in memory at once. Each
layer's targets are dropped once it is fitted.

Refused, with the reason in the stats: layers :class:`LinearLayer` does not describe (grouped and
depthwise convs, ``auto_pad`` SAME...). Such a layer keeps its (sliced) weights; the next plain layer
downstream is re-fitted and compensates.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from math import ceil
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.measure.blas import for_work
from graphopt.compress.lstsq import CrossGram, LinearLayer
from graphopt.core import scratch
from graphopt.core.ir import Model, Node
from graphopt.measure import ort as gort
from graphopt.measure.calibration import Calibrator, SampleData, batch_within, feed_batch_size
from graphopt.measure.segments import Frontier

DEFAULT_RIDGE = 1e-3
#: A layer's targets (float32 ``[rows, O]``, all layers' held from one reference pass) and an
#: activation-aware fit's inputs (float32 ``[rows, F]``) stay in memory: its rows are capped to this.
KEPT_ROW_BYTES = 256 * 2**20
#: ...but never below this many rows (the former default, whatever ``F``).
MIN_ROWS = 16384
#: The reference targets of all layers held in memory at once; the rest wait in a scratch folder.
TARGET_RAM_BYTES = 512 * 2**20
RIDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, float("inf"))


@dataclass
class RefitTarget:
    """A layer to re-fit: node name (in the pruned model) and the original output channels it keeps."""

    node: str
    out_keep: np.ndarray | None = None   # indices into the reference output's channel axis; None = all


def solve_towards(gram: CrossGram, ridge: float, w0: np.ndarray, b0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``argmin ‖Xθ − Y‖² + λ‖W − W₀‖²`` (bias unpenalised), ``λ = ridge · mean diag(XᵀX)``.

    Normal equations ``(XᵀX + λD) θ = XᵀY + λ D θ₀`` with ``D`` the identity on the weight rows and 0 on
    the bias row. ``ridge = inf`` returns ``(W₀, b)`` with only the bias re-fitted.
    """
    f = gram.features
    a = gram.xtx.astype(np.float64)
    rhs = gram.xty.astype(np.float64)
    if not np.isfinite(ridge):
        # Keep W0; the best bias for it is mean(y) - mean(x) W0.
        n = max(gram.count, 1)
        x_mean = gram.xtx[-1, :f] / n
        y_mean = gram.xty[-1] / n
        return w0.astype(np.float64), y_mean - x_mean @ w0
    lam = ridge * max(float(np.diagonal(a)[:f].mean()), 1e-12)
    a[np.arange(f), np.arange(f)] += lam
    rhs[:f] += lam * w0
    try:
        with for_work(2 / 3 * a.shape[0] ** 3):
            sol = np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
    return sol[:-1], sol[-1]


def choose_ridge(folds: Sequence[CrossGram], w0: np.ndarray, b0: np.ndarray,
                 ridges: Sequence[float] = RIDGES) -> tuple[float, dict[float, float]]:
    """The ridge with the smallest two-fold held-out error (sum of squared errors over both folds)."""
    scores: dict[float, float] = {}
    if any(f.count == 0 for f in folds):  # one sample: nothing to validate on
        return DEFAULT_RIDGE, scores
    for ridge in ridges:
        total = 0.0
        for fit, held in ((folds[0], folds[1]), (folds[1], folds[0])):
            w, b = solve_towards(fit, ridge, w0, b0)
            total += float(held.sse(w, b).sum())
        scores[ridge] = total
    best = min(scores, key=lambda r: (scores[r], -r if np.isfinite(r) else -1e300))
    return best, scores


def _layer_gram_pass(model: Model, reference_rows: list[tuple[np.ndarray | None, np.ndarray]], layer: LinearLayer,
                     data: SampleData, batch_size: int,
                     kept: list[np.ndarray] | None = None, batches=None) -> tuple[CrossGram, CrossGram]:
    """Two-fold statistics of the layer's rows; ``kept`` (a list) also receives the rows (float32).
    ``batches`` yields the layer's input per batch (default: a run of the whole model)."""
    folds = (CrossGram(bias=True), CrossGram(bias=True))
    if batches is None:
        batches = Calibrator(model, data, batch_size).run([layer.x.name])
    for i, batch in enumerate(batches):
        select, y_rows = reference_rows[i]
        x = batch[layer.x.name]
        rows = layer.rows(x, select)
        if kept is not None:
            kept.append(np.asarray(rows, dtype=np.float32))
        # Folds by sample (even / odd sample of the data), so rows of one image never sit in both.
        per_sample = max(layer.positions(x.shape) // max(x.shape[0], 1), 1)
        index = np.arange(rows.shape[0]) if select is None else select
        odd = ((index // per_sample) + i * batch_size) % 2 == 1
        for fold, mask in ((folds[0], ~odd), (folds[1], odd)):
            if mask.any():
                fold.update(rows[mask], y_rows[mask])
    return folds


def layer_rows(max_rows: int, features: int, outputs: int = 0) -> int:
    """Rows to sample for a layer with ``features`` inputs and ``outputs`` targets per row: ``max_rows``,
    fewer when its rows (float32 inputs kept for an activation-aware fit, and float32 targets) would
    pass ``KEPT_ROW_BYTES`` (but at least ``MIN_ROWS``, or ``max_rows`` if that is smaller)."""
    return min(max_rows, max(MIN_ROWS, KEPT_ROW_BYTES // (4 * max(features + outputs, 1))))


class TargetStore:
    """Per layer and batch, the sampled row positions and the target rows: in memory while the total stays
    within ``ram_bytes``, in a scratch folder of the run (``graphopt.core.scratch``; one ``.npz`` per
    batch, removed by :meth:`pop` and :meth:`close`) beyond it.

    Batches are added batch-major (batch 0 of every layer, then batch 1...), so a spilled layer keeps its
    first batches in memory and reads the rest back in :meth:`pop`. Use as a context manager.
    """

    def __init__(self, ram_bytes: int = TARGET_RAM_BYTES) -> None:
        self.ram_bytes = ram_bytes
        self.in_memory = 0
        self.on_disk = 0
        self._batches: dict[str, list[tuple[np.ndarray | None, np.ndarray] | str]] = {}
        self._dir: contextlib.ExitStack | None = None  # holds the scratch folder while something is spilled
        self._folder: Path | None = None
        self._files = 0

    def add(self, key: str, select: np.ndarray | None, rows: np.ndarray) -> None:
        batches = self._batches.setdefault(key, [])
        size = _nbytes(select, rows)
        if self.in_memory + size <= self.ram_bytes:
            self.in_memory += size
            batches.append((select, rows))
            return
        if self._dir is None:
            self._dir = contextlib.ExitStack()
            self._folder = self._dir.enter_context(scratch.directory("targets"))
        path = os.path.join(self._folder, f"{self._files}.npz")
        self._files += 1
        np.savez(path, rows=rows, **({} if select is None else {"select": select}))
        self.on_disk += size
        batches.append(path)

    def pop(self, key: str) -> list[tuple[np.ndarray | None, np.ndarray]]:
        """The layer's ``(select, rows)`` per batch, read back from disk where spilled; then forgotten."""
        out = []
        for item in self._batches.pop(key, []):
            if isinstance(item, str):
                with np.load(item) as f:
                    out.append((f["select"] if "select" in f.files else None, f["rows"]))
                os.remove(item)
            else:
                self.in_memory -= _nbytes(*item)
                out.append(item)
        return out

    def close(self) -> None:
        self._batches.clear()
        if self._dir is not None:
            self._dir.close()
            self._dir = None

    def __enter__(self) -> "TargetStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _nbytes(select: np.ndarray | None, rows: np.ndarray) -> int:
    return rows.nbytes + (select.nbytes if select is not None else 0)


def reference_targets(reference: Model, layers: dict[str, tuple[str, np.ndarray | None, Any]], data: SampleData,
                      store: TargetStore, *, max_rows: int, seed: int, batch_size: int) -> None:
    """Per layer and batch, the sampled row positions and the reference's target rows (one data pass),
    added to ``store``.

    ``layers[key] = (value name in the reference, out_keep, LinearLayer)``.
    """
    rng = np.random.default_rng(seed)
    n_batches = max(1, ceil(data.n_samples / batch_size))
    per_batch = {key: max(1, ceil(layer_rows(max_rows, layer.features, layer.out_features) / n_batches))
                 for key, (_, _, layer) in layers.items()}
    names = sorted({name for name, _, _ in layers.values()})
    if not names:
        return
    for batch in Calibrator(reference, data, batch_size).run(names):
        for key, (name, keep, layer) in layers.items():
            y = batch[name]
            flat = layer.target_rows(y)
            select = None
            if flat.shape[0] > per_batch[key]:
                select = np.sort(rng.choice(flat.shape[0], size=per_batch[key], replace=False))
                flat = flat[select]
            if keep is not None:
                flat = flat[:, keep]
            # float32, as the runtime computed them (the statistics accumulate in float64).
            store.add(key, select, np.ascontiguousarray(flat, dtype=np.float32))


def activation_after(graph, layer: LinearLayer) -> tuple[float, float] | None:
    """``(lo, hi)`` when the layer's output is read only by a ``Relu`` or a ``Clip`` with constant bounds."""
    readers = graph.consumers(layer.y)
    if len(readers) != 1 or graph.is_graph_output(layer.y):
        return None
    act = readers[0]
    if act.op_type == "Relu":
        return 0.0, float("inf")
    if act.op_type == "Clip":
        bounds = []
        for slot, default in ((1, -np.inf), (2, np.inf)):
            v = act.inputs[slot] if len(act.inputs) > slot else None
            if v is None:
                bounds.append(default)
                continue
            arr = graph.constant_array(v)
            if arr is None or arr.size != 1:
                return None
            bounds.append(float(arr.reshape(-1)[0]))
        return bounds[0], bounds[1]
    return None


def activation_targets(y: np.ndarray, pred: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Targets for ``act(pred) ≈ act(y)`` with ``act = clip(·, lo, hi)``: where ``y`` is clipped, any
    prediction on the same side of the bound is exact, so the target there is the prediction itself
    (no error) or the bound when the prediction crosses it."""
    t = y.copy()
    below, above = y <= lo, y >= hi
    t[below] = np.minimum(pred[below], lo)
    t[above] = np.maximum(pred[above], hi)
    return t


def _act_error(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, lo: float, hi: float) -> float:
    """Relative RMS error after the activation, ``‖act(xw + b) − act(y)‖ / ‖act(y) − mean‖``."""
    a = np.clip(x @ w + b, lo, hi)
    r = np.clip(y, lo, hi)
    return float(np.sqrt(((a - r) ** 2).sum() / max(((r - r.mean(axis=0)) ** 2).sum(), 1e-30)))


def fit_through_activation(full: CrossGram, x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray,
                           ridge: float, w0: np.ndarray, b0: np.ndarray, lo: float, hi: float,
                           iterations: int = 3) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Re-solve with activation-aware targets (``XᵀX`` is unchanged, only ``XᵀT`` is recomputed).

    Returns ``(w, b, error_before, error_after)`` — post-activation relative errors of the plain fit
    and of the returned one (the plain fit is returned when iterating does not help).
    """
    start = _act_error(x, y, w, b, lo, hi)
    best = (w, b, start)
    g = CrossGram(bias=True)
    g.xtx, g.count = full.xtx, full.count
    for _ in range(iterations):
        with for_work(4.0 * x.shape[0] * x.shape[1] * y.shape[1]):
            t = activation_targets(y, x @ best[0] + best[1], lo, hi)
            g.xty = np.concatenate([x.T.astype(np.float64) @ t, t.sum(axis=0, keepdims=True)], axis=0)
        g.y_sum, g.y_sq = t.sum(axis=0), (t * t).sum(axis=0)
        w2, b2 = solve_towards(g, ridge, w0, b0)
        err = _act_error(x, y, w2, b2, lo, hi)
        if err >= best[2]:
            break
        best = (w2, b2, err)
    return best[0], best[1], start, best[2]


def refit(model: Model, reference: Model, targets: Sequence[RefitTarget], data: SampleData, *,
          max_rows: int = 65536, seed: int = 0, batch_size: int = 64, ridges: Sequence[float] = RIDGES,
          activation_aware: bool = True, progress=None, target_ram_bytes: int = TARGET_RAM_BYTES,
          usage: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Re-fit ``targets`` of ``model`` (pruned, mutated) one after the other, in the given order.

    Returns one record per target: ``node``, ``rel_error_before`` / ``rel_error_after`` (relative RMS
    error of the layer output against the reference, on the calibration rows), ``ridge``, ``rows``;
    or ``skipped`` with the reason. ``usage`` (a dict), if given, receives the bytes of reference
    targets held in memory and written to disk (``targets_in_memory``, ``targets_on_disk``).
    """
    graph = model.graph
    by_name = {n.name: n for n in graph.nodes}
    layers: dict[str, LinearLayer] = {}
    records: list[dict[str, Any]] = []
    specs = {}
    for t in targets:
        node = by_name.get(t.node)
        layer = LinearLayer.of(graph, node) if node is not None else f"node {t.node!r} not found"
        if isinstance(layer, str):
            records.append({"node": t.node, "skipped": layer})
            continue
        layers[t.node] = layer
        specs[t.node] = (layer.y.name, t.out_keep, layer)
    batch_size = batch_within(reference, [name for name, _, _ in specs.values()], data, batch_size)
    with TargetStore(target_ram_bytes) as store:
        reference_targets(reference, specs, data, store, max_rows=max_rows, seed=seed, batch_size=batch_size)
        if usage is not None:
            usage.update(targets_in_memory=store.in_memory, targets_on_disk=store.on_disk)
        records += _refit_each(model, graph, targets, layers, store, data, batch_size, ridges, activation_aware,
                               progress)
    return records


def _refit_each(model: Model, graph, targets: Sequence[RefitTarget], layers: dict[str, LinearLayer],
                store: TargetStore, data: SampleData, batch_size: int, ridges: Sequence[float],
                activation_aware: bool, progress) -> list[dict[str, Any]]:
    """The per-layer loop of :func:`refit`: each layer's targets are taken from ``store`` as it is fitted."""
    records = []
    frontier = Frontier(data, feed_batch_size(model, batch_size, data))
    pending = [t.node for t in targets if t.node in layers]
    for t in targets:
        if t.node not in layers:
            continue
        # Re-read the layer: an earlier re-fit may have replaced initializers (never this node's).
        node = {n.name: n for n in graph.nodes}[t.node]
        layer = LinearLayer.of(graph, node)
        if progress is not None:
            progress(f"prune: re-fitting {t.node}")
        act = activation_after(graph, layer) if activation_aware else None
        kept_rows: list[np.ndarray] | None = [] if act is not None else None
        rows = store.pop(t.node)
        # Every node before the first layer still to fit is final: the frontier's cut moves up to it.
        proto, weights = gort.structure(model)   # the weights by reference: no copy of the model per layer
        position = {n.name: i for i, n in enumerate(proto.graph.node)}
        frontier.advance(proto, min(position[name] for name in pending if name in position), weights)
        pending.remove(t.node)
        folds = _layer_gram_pass(model, rows, layer, data, batch_size, kept_rows,
                                 batches=frontier.batches(proto, [layer.x.name], weights))
        del proto, weights
        kept = None if act is None else (kept_rows, [yr for _, yr in rows])
        del rows, kept_rows  # before the next layer's targets are read back
        records.append(solve_layer(graph, t.node, layer, folds, ridges, act, kept))
    return records


def solve_layer(graph, name: str, layer: LinearLayer, folds: tuple[CrossGram, CrossGram], ridges: Sequence[float],
                act: tuple[float, float] | None, kept: tuple[list[np.ndarray], list[np.ndarray]] | None
                ) -> dict[str, Any]:
    """Re-fit one layer from its two-fold statistics (ridge by cross-validation, then all rows), through
    its activation ``act`` when the sampled rows ``kept`` (``x`` and ``y`` parts, float32) are given;
    the weights are set only when the error falls. Returns the layer's record."""
    w0 = layer.weight_matrix().astype(np.float64)
    b0 = layer.bias_vector().astype(np.float64)
    full = folds[0].merge(folds[1])
    before = full.relative_error(w0, b0)
    ridge, _ = choose_ridge(folds, w0, b0, ridges)
    w, b = solve_towards(full, ridge, w0, b0)
    after = full.relative_error(w, b)
    record = {"node": name, "rel_error_before": _r(before), "rel_error_after": _r(after),
              "ridge": ridge if np.isfinite(ridge) else "inf (bias only)", "rows": full.count}
    if act is not None and kept is not None and np.isfinite(ridge):
        x = np.concatenate(kept[0], axis=0)
        y = np.concatenate(kept[1], axis=0).astype(np.float64)
        w, b, e0, e1 = fit_through_activation(full, x, y, w, b, ridge, w0, b0, *act)
        record.update(activation=[act[0], act[1] if np.isfinite(act[1]) else "inf"],
                      act_error_plain_fit=_r(e0), act_error_after=_r(e1),
                      act_error_before=_r(_act_error(x, y, w0, b0, *act)))
        after = full.relative_error(w, b) if e1 < e0 else after
        del x, y
    improved = after < before or ("act_error_after" in record
                                  and record["act_error_after"] < record["act_error_before"])
    if improved:
        layer.set_weights(graph, w, b)
    else:
        record["kept_weights"] = "the fit did not reduce the error"
    return record


def _r(v: float) -> float:
    return float(f"{v:.6g}")


def linear_nodes_from(graph, start: set[str]) -> list[Node]:
    """Linear layers (as :class:`LinearLayer` sees them) named in ``start`` or downstream of one, in
    topological order: every layer whose input the pruning changed, directly or through earlier layers."""
    out = []
    affected: set[str] = set()
    for node in graph.toposort():
        if node.name in start or any(v is not None and v.name in affected for v in node.inputs):
            affected.update(v.name for v in node.outputs if v is not None)
            if not isinstance(LinearLayer.of(graph, node), str):
                out.append(node)
    return out
