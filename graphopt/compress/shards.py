"""Calibration statistics gathered in shards of samples through an executor, merged in shard order.

The statistics the least-squares fits and the whitening need are sums over the samples: a
:class:`~graphopt.compress.lstsq.CrossGram`'s ``XᵀX``, ``XᵀY``, ``Σy``, ``Σy²`` and row count, a
:class:`~graphopt.measure.calibration.Gram`'s ``XᵀX``, ``Σx`` and count. Several processes (or Ray
workers) can each stream a part of the samples and the partial sums be added. :func:`gather` cuts the
samples into shards of ``shard_samples`` consecutive samples (the last may be shorter), runs
``fn(context, (index, shard))`` for each through the run's executor, ``executor.workers`` shards in the
first ``map`` and then as many as keep a map's parts within :data:`PARTS_BYTES`, and adds each part into
the total as its map comes back, in shard order: the driver holds the total and one map's parts, a
worker one shard's activations, one batch at a time. Each shard
travels once, with its task; the context (the model) once per ``map``.

A calibration set given as a directory of ``.npz`` shards (``--data DIR``,
:class:`graphopt.measure.sampledir.SampleDir`) is not cut: its shards are the files (or parts of them,
when samples are held out of a fit), and a task carries a :class:`~graphopt.measure.sampledir.ShardSlice`
(a path and a range), which ``fn`` reads where it runs (:func:`load`). In this process that is one
shard at a time, so the driver holds one shard and one batch of activations whatever the size of the
set; in a pool or on Ray each worker reads its own shards and the driver reads none.

Refused: nothing; ``shard_samples`` 0, or not smaller than the number of samples, means one shard,
computed in this process by the unsharded code exactly as before (the option's default). A
directory's shard found corrupt when it is read raises its ``DataError`` (bad input).

What the result depends on
--------------------------
* **Not on the executor:** the shards depend on ``shard_samples`` (or the directory's files) only and the
  parts are added in shard order, so in-process, a process pool and Ray give the same bits for any
  number of workers. A directory's shards give the same bits as the same samples in one file cut by a
  ``shard_samples`` that makes the same shards.
* **Against one unsharded stream:** the same sums added in another order, so equal to float64 rounding
  (``tests/test_shards.py`` checks 1e-12 relative), when no rows are subsampled. A layer whose rows are
  subsampled (``max_rows``) draws them per shard, from a generator seeded with ``(seed, shard index)``
  and its share of ``max_rows``: another uniform sample of about the same size, not the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from math import ceil
from typing import Any, TypeVar

import numpy as np

from graphopt.compress import lstsq
from graphopt.core.errors import DataError
from graphopt.measure.calibration import SampleData
from graphopt.measure.executor import Executor, ShippedModel, TaskError
from graphopt.measure.sampledir import ShardSlice

S = TypeVar("S")
#: The parts one ``map`` of :func:`gather` may bring back to the driver at once (after its first, of one
#: shard per worker, has shown how large a part is).
PARTS_BYTES = 256 * 2**20
#: Samples to gather statistics over: in memory (cut into shards of ``shard_samples``), or the slices of a
#: directory of shards (:meth:`graphopt.measure.sampledir.SampleDir.slices`), one shard each.
Samples = SampleData | Sequence[ShardSlice]

__all__ = ["PARTS_BYTES", "CrossGramShards", "Samples", "collect", "count", "crossgram_shard", "gather", "load",
           "merge_crossgrams", "nbytes", "one_shard", "pieces", "rng", "rows_share", "spans", "unsharded"]


def one_shard(n_samples: int, shard_samples: int) -> bool:
    """Whether ``n_samples`` make a single shard (then nothing is sharded)."""
    return shard_samples <= 0 or n_samples <= shard_samples


def unsharded(data: Samples, shard_samples: int) -> bool:
    """Whether ``data`` is samples in memory that make one shard: the unsharded code serves them. A
    directory's slices never are (each is read where it is used)."""
    return isinstance(data, SampleData) and one_shard(data.n_samples, shard_samples)


def count(data: Samples) -> int:
    """The samples of ``data``: in memory, or the slices of a directory of shards."""
    return data.n_samples if isinstance(data, SampleData) else sum(piece.n_samples for piece in data)


def spans(n_samples: int, shard_samples: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: consecutive shards of ``shard_samples`` (one shard when :func:`one_shard`)."""
    if one_shard(n_samples, shard_samples):
        return [(0, n_samples)]
    return [(a, min(a + shard_samples, n_samples)) for a in range(0, n_samples, shard_samples)]


def pieces(data: Samples, shard_samples: int) -> list[SampleData | ShardSlice]:
    """The shards of ``data``: spans of ``shard_samples`` samples in memory, or a directory's slices as
    they are (``shard_samples`` does not cut them: a file is read whole wherever it is cut)."""
    if isinstance(data, SampleData):
        return [data.window(a, b) for a, b in spans(data.n_samples, shard_samples)]
    return list(data)


def load(piece: SampleData | ShardSlice, model: Any) -> SampleData:
    """A shard's samples: as they are, or read from the shard's file (in the process that asks)."""
    return piece if isinstance(piece, SampleData) else piece.load(model)


def rng(seed: int, index: int) -> np.random.Generator:
    """Shard ``index``'s row-sampling generator: a stream of its own, the same on every executor."""
    return np.random.default_rng([int(seed), int(index)])


def rows_share(max_rows: int, shard: SampleData, n_samples: int) -> int:
    """The rows a shard keeps per layer: its share of ``max_rows`` (by samples), at least one."""
    return max(1, ceil(max_rows * shard.n_samples / max(n_samples, 1)))


def gather(data: Samples, fn: Callable[[Any, tuple[int, SampleData | ShardSlice]], S], merge: Callable[[S, S], S], *,
           context: Any, executor: Executor, shard_samples: int) -> S:
    """``fn``'s statistics of every shard of ``data``, added in shard order by ``merge`` (module docstring).

    ``fn`` gets ``(index, piece)`` and reads the piece with :func:`load`. A shard found corrupt where it is
    read raises its :class:`~graphopt.core.errors.DataError` here (bad input, not a failed evaluation)."""
    items = list(enumerate(pieces(data, shard_samples)))
    workers = max(int(executor.workers), 1)
    step, start = workers, 0
    total: S | None = None
    while start < len(items):
        try:
            parts = executor.map(fn, items[start:start + step], context=context)
        except TaskError as exc:
            if isinstance(exc.original, DataError):
                raise exc.original from None
            raise
        start += len(parts)
        # the next map takes as many shards as keep their parts within PARTS_BYTES (whole rounds of the
        # workers, at least one): fewer maps, and a process pool starts once per map
        step = workers * max(1, PARTS_BYTES // max(max(nbytes(part) for part in parts) * workers, 1))
        for part in parts:
            total = part if total is None else merge(total, part)
    return total


def nbytes(obj: Any) -> int:
    """The bytes of the numpy arrays in ``obj`` (nested in tuples, lists, dicts and objects' attributes)."""
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (tuple, list)):
        return sum(nbytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(nbytes(x) for x in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(nbytes(x) for x in vars(obj).values())
    return 0


# ===============================================================================================
# CrossGram statistics of linear layers (lstsq.collect, sharded)


@dataclass
class CrossGramShards:
    """What a worker needs to gather the :class:`~graphopt.compress.lstsq.CrossGram` of each layer on one
    shard: the model (read and target, as ``lstsq.collect`` with no reference), each layer's node by its
    first output's name (node names may be empty; the worker rebuilds the
    :class:`~graphopt.compress.lstsq.LinearLayer` from its copy of the model), and how ``collect`` samples
    rows."""

    model: ShippedModel
    outputs: dict[Hashable, str]
    n_samples: int
    max_rows: int
    seed: int
    batch_size: int
    bias: bool = True


def crossgram_shard(ctx: CrossGramShards, item: tuple[int, SampleData | ShardSlice]) -> dict[Hashable, lstsq.CrossGram]:
    """The statistics of one shard (runs in executor workers; a directory's shard is read here)."""
    index, piece = item
    model = ctx.model.ir()
    shard = load(piece, model)
    producers = {n.outputs[0].name: n for n in model.graph.nodes if n.outputs and n.outputs[0] is not None}
    layers = {key: lstsq.LinearLayer.of(model.graph, producers[name]) for key, name in ctx.outputs.items()}
    return lstsq.collect(model, layers, shard, max_rows=rows_share(ctx.max_rows, shard, ctx.n_samples),
                         rng=rng(ctx.seed, index), batch_size=ctx.batch_size, bias=ctx.bias)


def merge_crossgrams(total: dict[Hashable, lstsq.CrossGram],
                     part: Mapping[Hashable, lstsq.CrossGram]) -> dict[Hashable, lstsq.CrossGram]:
    return {key: gram.merge(part[key]) for key, gram in total.items()}


def collect(model: Any, layers: Mapping[Hashable, lstsq.LinearLayer], data: Samples, *, executor: Executor,
            shard_samples: int, max_rows: int, seed: int, batch_size: int = 64,
            bias: bool = True) -> dict[Hashable, lstsq.CrossGram]:
    """:func:`graphopt.compress.lstsq.collect` (inputs and targets from ``model`` itself), in shards.

    One shard: ``lstsq.collect`` itself, in this process. ``layers`` must be what
    :meth:`~graphopt.compress.lstsq.LinearLayer.of` makes of their nodes (a worker rebuilds them so)."""
    if not layers or unsharded(data, shard_samples):
        return lstsq.collect(model, dict(layers), data, max_rows=max_rows, seed=seed, batch_size=batch_size,
                             bias=bias)
    context = CrossGramShards(ShippedModel(model), {key: layer.node.outputs[0].name for key, layer in layers.items()},
                              count(data), max_rows, seed, batch_size, bias)
    return gather(data, crossgram_shard, merge_crossgrams, context=context, executor=executor,
                  shard_samples=shard_samples)
