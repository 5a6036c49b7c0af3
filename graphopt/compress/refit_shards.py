"""The least-squares re-fits after a change (pruning's :func:`graphopt.compress.reconstruct.refit`, and
through :func:`gather_layers` lowrank's compensation), their statistics gathered shard by shard through
an executor: for a calibration set given as a directory of ``.npz`` shards, larger than memory.

The in-memory re-fit holds what a directory cannot give it: the reference's target rows of every layer
from one pass over all samples (:class:`~graphopt.compress.reconstruct.TargetStore`) and the activations
of all samples at a cut that moves down the model (:class:`~graphopt.measure.segments.Frontier`). Here
each layer's statistics are a sum over shards instead (:func:`graphopt.compress.shards.gather`),
gathered layer by layer (lowrank: a group of layers reading one tensor at a time) in the order of the
in-memory re-fit, since a layer's inputs are read from the model re-fitted so far. A task reads its shard and, batch by batch, runs the reference for the layer's
target ``Y`` and the model for its input ``X``, keeps the same rows of both, and returns:

* the two-fold :class:`~graphopt.compress.lstsq.CrossGram` s (even and odd samples of the shard), whose
  sums in shard order give the folds the ridge is chosen by, and the statistics of all rows;
* for a layer followed by a Relu or a Clip (activation-aware fit), the sampled rows themselves (float32),
  at most :func:`~graphopt.compress.reconstruct.layer_rows` for all shards together.

Rows: shard ``k`` keeps its share of the layer's rows (:func:`graphopt.compress.shards.rows_share`), drawn
by a generator seeded with ``(seed, k)`` (a seed per layer, derived from the run's and the layer's
position): the same on every executor, so the written model is the same
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

__all__ = ["LayerShards", "Part", "gather_layers", "layer_shard", "merge_parts", "refit"]

#: One shard's statistics of one layer: its CrossGrams (two folds, or one), and the kept ``x`` and ``y``
#: rows (float32, one array per batch) or ``None``.
Part = tuple[tuple[CrossGram, ...], list[np.ndarray] | None, list[np.ndarray] | None]


@dataclass
class LayerShards:
    """What a task needs for the statistics of some layers reading one model, on one shard. A layer's node
    is named by its first output (node names may be empty); ``rows[i]`` are layer ``i``'s rows over all
    shards, ``out_keep[i]`` the reference's output channels its targets keep (``None``: all)."""

    model: ShippedModel            # the inputs X: the model re-fitted so far
    reference: ShippedModel        # the targets Y: the model before the change
    outputs: list[str]
    out_keep: list[np.ndarray | None]
    rows: list[int]
    n_samples: int
    seed: int
    batch_size: int
    folds: bool                    # two-fold statistics (even and odd samples) instead of one
    keep_rows: bool                # an activation-aware fit needs the rows themselves
    fast: bool = False             # float32 products (CrossGram.fast)


def layer_shard(ctx: LayerShards, item: tuple[int, Any]) -> list[Part]:
    """One shard's statistics (and kept rows) of each layer (runs in executor workers)."""
    index, piece = item
    model, reference = ctx.model.ir(), ctx.reference.ir()
    shard = shards.load(piece, model)
    producers = {n.outputs[0].name: n for n in model.graph.nodes if n.outputs and n.outputs[0] is not None}
    layers = [LinearLayer.of(model.graph, producers[name]) for name in ctx.outputs]
    rng = shards.rng(ctx.seed, index)
    n_batches = max(1, ceil(shard.n_samples / ctx.batch_size))
    per_batch = [max(1, ceil(shards.rows_share(rows, shard, ctx.n_samples) / n_batches)) for rows in ctx.rows]
    parts = [(tuple(CrossGram(bias=True, fast=ctx.fast) for _ in range(2 if ctx.folds else 1)),
              [] if ctx.keep_rows else None, [] if ctx.keep_rows else None) for _ in layers]
    targets = Calibrator(reference, shard, ctx.batch_size).run(sorted({layer.y.name for layer in layers}))
    inputs = Calibrator(model, shard, ctx.batch_size).run(sorted({layer.x.name for layer in layers}))
    done = 0
    for y_batch, x_batch in zip(targets, inputs):
        n = 0
        for layer, keep, share, (grams, xs, ys) in zip(layers, ctx.out_keep, per_batch, parts):
            flat = layer.target_rows(y_batch[layer.y.name])
            select = None
            if flat.shape[0] > share:
                select = np.sort(rng.choice(flat.shape[0], size=share, replace=False))
                flat = flat[select]
            if keep is not None:
                flat = flat[:, keep]
            y_rows = np.ascontiguousarray(flat, dtype=np.float32)   # as the runtime computed them
            x = x_batch[layer.x.name]
            n = x.shape[0]
            x_rows = layer.rows(x, select)
            if xs is not None:
                xs.append(np.asarray(x_rows, dtype=np.float32))
                ys.append(y_rows)
            if len(grams) == 1:
                grams[0].update(x_rows, y_rows)
                continue
            # folds by sample (even / odd sample of the shard), so rows of one sample never sit in both
            per_sample = max(layer.positions(x.shape) // max(n, 1), 1)
            position = np.arange(x_rows.shape[0]) if select is None else select
            odd = ((position // per_sample) + done) % 2 == 1
            for fold, mask in zip(grams, (~odd, odd)):
                if mask.any():
                    fold.update(x_rows[mask], y_rows[mask])
        done += n
    return parts


def merge_parts(total: list[Part], part: list[Part]) -> list[Part]:
    """Two shards' statistics as one, layer by layer: CrossGrams added, kept rows one after the other."""
    out = []
    for (grams, xs, ys), (more, xs2, ys2) in zip(total, part):
        out.append((tuple(a.merge(b) for a, b in zip(grams, more)),
                    None if xs is None else xs + xs2, None if ys is None else ys + ys2))
    return out


def gather_layers(model: Model, reference: Model, layers: Sequence[LinearLayer], data: shards.Samples, *,
                  executor: Executor, rows: Sequence[int], seed: int, batch_size: int, folds: bool = False,
                  keep_rows: bool = False, fast: bool = False, out_keep: Sequence[np.ndarray | None] | None = None,
                  shard_samples: int = 0) -> list[Part]:
    """The statistics of ``layers`` of ``model`` (inputs ``X``) against ``reference`` (targets ``Y`` at
    the same value names), summed over the shards of ``data`` in shard order (module docstring)."""
    context = LayerShards(ShippedModel(model), ShippedModel(reference),
                          [layer.node.outputs[0].name for layer in layers],
                          list(out_keep) if out_keep is not None else [None] * len(layers), list(rows),
                          shards.count(data), seed, batch_size, folds, keep_rows, fast)
    return shards.gather(data, layer_shard, merge_parts, context=context, executor=executor,
                         shard_samples=shard_samples)


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
    for position, t in enumerate(targets):
        if isinstance(layers[t.node], str):
            records.append({"node": t.node, "skipped": layers[t.node]})
            continue
        # re-read the layer: an earlier re-fit may have replaced initializers (never this node's)
        layer = LinearLayer.of(graph, {n.name: n for n in graph.nodes}[t.node])
        if progress is not None:
            progress(f"prune: re-fitting {t.node} (in shards)")
        act = activation_after(graph, layer) if activation_aware else None
        [(folds, xs, ys)] = gather_layers(model, reference, [layer], data, executor=executor,
                                          rows=[layer_rows(max_rows, layer.features, layer.out_features)],
                                          seed=int(np.random.default_rng([seed, position]).integers(2 ** 31)),
                                          batch_size=batch_size, folds=True, keep_rows=act is not None,
                                          out_keep=[t.out_keep], shard_samples=shard_samples)
        records.append(solve_layer(graph, t.node, layer, folds, ridges, act, None if xs is None else (xs, ys)))
    return records
