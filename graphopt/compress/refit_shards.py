"""The least-squares re-fit after pruning (:func:`graphopt.compress.reconstruct.refit`), its statistics
gathered shard by shard through an executor: for a calibration set given as a directory of ``.npz``
shards, larger than memory.

The in-memory re-fit holds what a directory cannot give it: the reference's target rows of every layer
from one pass over all samples (:class:`~graphopt.compress.reconstruct.TargetStore`) and the activations
of all samples at a cut that moves down the model (:class:`~graphopt.measure.segments.Frontier`). Here
each layer's statistics are a sum over shards instead (:func:`graphopt.compress.shards.gather`), one
``map`` per layer, in the same order as the in-memory re-fit, since a layer's inputs are read from the
model re-fitted so far. A task reads its shard and, batch by batch, runs the reference for the layer's
target ``Y`` and the model for its input ``X``, keeps the same rows of both, and returns:

* the two-fold :class:`~graphopt.compress.lstsq.CrossGram` s (even and odd samples of the shard), whose
  sums in shard order give the folds the ridge is chosen by, and the statistics of all rows;
* for a layer followed by a Relu or a Clip (activation-aware fit), the sampled rows themselves (float32),
  at most :func:`~graphopt.compress.reconstruct.layer_rows` for all shards together.

Rows: shard ``k`` keeps its share of the layer's rows (:func:`graphopt.compress.shards.rows_share`), drawn
by a generator seeded with ``(seed, k)``: the same on every executor, so the written model is the same
bits in-process, in a pool and on Ray for any number of workers. It is another uniform sample of rows
than the in-memory re-fit's, so not the same bits as that.

Cost: the model and the reference run once per layer and shard (the in-memory re-fit runs each about
once in all); the driver holds one layer's statistics and kept rows, a task one shard and one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import ceil
from typing import Any

import numpy as np

from graphopt.compress import shards
from graphopt.compress.lstsq import CrossGram, LinearLayer
from graphopt.compress.reconstruct import RIDGES, RefitTarget, activation_after, layer_rows, solve_layer
from graphopt.core.ir import Model
from graphopt.measure.calibration import Calibrator, SampleData, batch_within
from graphopt.measure.executor import Executor, ShippedModel

__all__ = ["LayerShards", "Part", "layer_shard", "merge_parts", "refit"]

#: One shard's statistics of a layer: the two folds, and the kept ``(x, y)`` rows or ``None``.
Part = tuple[CrossGram, CrossGram, list[np.ndarray] | None, list[np.ndarray] | None]


@dataclass
class LayerShards:
    """What a task needs for one layer's statistics on one shard."""

    model: ShippedModel            # the model re-fitted so far: the layer's inputs
    reference: ShippedModel        # the model before the removal: the targets
    node: str
    out_keep: np.ndarray | None
    n_samples: int
    rows: int                      # the layer's rows over all shards
    seed: int
    batch_size: int
    keep_rows: bool                # an activation-aware fit needs the rows themselves


def layer_shard(ctx: LayerShards, item: tuple[int, Any]) -> Part:
    """One shard's two-fold statistics (and kept rows) of the layer (runs in executor workers)."""
    index, piece = item
    model, reference = ctx.model.ir(), ctx.reference.ir()
    shard = shards.load(piece, model)
    layer = LinearLayer.of(model.graph, next(n for n in model.graph.nodes if n.name == ctx.node))
    rng = shards.rng(ctx.seed, index)
    per_batch = max(1, ceil(shards.rows_share(ctx.rows, shard, ctx.n_samples)
                            / max(1, ceil(shard.n_samples / ctx.batch_size))))
    folds = (CrossGram(bias=True), CrossGram(bias=True))
    xs: list[np.ndarray] | None = [] if ctx.keep_rows else None
    ys: list[np.ndarray] | None = [] if ctx.keep_rows else None
    targets = Calibrator(reference, shard, ctx.batch_size).run([layer.y.name])
    inputs = Calibrator(model, shard, ctx.batch_size).run([layer.x.name])
    done = 0
    for y_batch, x_batch in zip(targets, inputs):
        flat = layer.target_rows(y_batch[layer.y.name])
        select = None
        if flat.shape[0] > per_batch:
            select = np.sort(rng.choice(flat.shape[0], size=per_batch, replace=False))
            flat = flat[select]
        if ctx.out_keep is not None:
            flat = flat[:, ctx.out_keep]
        y_rows = np.ascontiguousarray(flat, dtype=np.float32)   # as the runtime computed them
        x = x_batch[layer.x.name]
        x_rows = layer.rows(x, select)
        if xs is not None:
            xs.append(np.asarray(x_rows, dtype=np.float32))
            ys.append(y_rows)
        # folds by sample (even / odd sample of the shard), so rows of one sample never sit in both
        per_sample = max(layer.positions(x.shape) // max(x.shape[0], 1), 1)
        position = np.arange(x_rows.shape[0]) if select is None else select
        odd = ((position // per_sample) + done) % 2 == 1
        done += x.shape[0]
        for fold, mask in ((folds[0], ~odd), (folds[1], odd)):
            if mask.any():
                fold.update(x_rows[mask], y_rows[mask])
    return folds[0], folds[1], xs, ys


def merge_parts(total: Part, part: Part) -> Part:
    """Two shards' statistics as one: folds added, kept rows one after the other (shard order)."""
    rows = (None, None) if total[2] is None else (total[2] + part[2], total[3] + part[3])
    return total[0].merge(part[0]), total[1].merge(part[1]), *rows


def refit(model: Model, reference: Model, targets: Sequence[RefitTarget], data: shards.Samples, head: SampleData, *,
          executor: Executor, shard_samples: int = 0, max_rows: int = 65536, seed: int = 0, batch_size: int = 64,
          ridges: Sequence[float] = RIDGES, activation_aware: bool = True, progress=None) -> list[dict[str, Any]]:
    """:func:`graphopt.compress.reconstruct.refit` with each layer's statistics gathered in shards of ``data``
    (module docstring). ``head``: samples in memory like ``data``'s, on which the batch size is bounded to
    what one run of every target may hold (:func:`~graphopt.measure.calibration.batch_within`)."""
    graph = model.graph
    records: list[dict[str, Any]] = []
    by_name = {n.name: n for n in graph.nodes}
    layers = {t.node: LinearLayer.of(graph, by_name[t.node]) if t.node in by_name else f"node {t.node!r} not found"
              for t in targets}
    batch_size = batch_within(reference, sorted({layer.y.name for layer in layers.values()
                                                 if not isinstance(layer, str)}), head, batch_size)
    shipped_reference = ShippedModel(reference)
    n_samples = shards.count(data)
    for t in targets:
        if isinstance(layers[t.node], str):
            records.append({"node": t.node, "skipped": layers[t.node]})
            continue
        # re-read the layer: an earlier re-fit may have replaced initializers (never this node's)
        layer = LinearLayer.of(graph, {n.name: n for n in graph.nodes}[t.node])
        if progress is not None:
            progress(f"prune: re-fitting {t.node} (in shards)")
        act = activation_after(graph, layer) if activation_aware else None
        context = LayerShards(ShippedModel(model), shipped_reference, t.node, t.out_keep, n_samples,
                              layer_rows(max_rows, layer.features, layer.out_features), seed, batch_size,
                              act is not None)
        fold0, fold1, xs, ys = shards.gather(data, layer_shard, merge_parts, context=context, executor=executor,
                                             shard_samples=shard_samples)
        records.append(solve_layer(graph, t.node, layer, (fold0, fold1), ridges, act,
                                   None if xs is None else (xs, ys)))
    return records
