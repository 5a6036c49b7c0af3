"""Filter pruning (LOSSY): remove channels by coupling group, then re-fit the layers that read them.

The pass runs in four steps, each a method of :class:`PruneFilters` reading one :class:`PruneRun`:
**select** (groups and rankings), **plan** (kept channels per group), **apply** (removal and re-fit),
**report** (the stats).

Select
------
1. **Groups.** :func:`graphopt.compress.channels.analyze` splits the channel dimensions of the model into
   coupling groups; frozen groups (an op the analysis cannot follow, graph inputs/outputs) are left
   alone and listed in ``left_alone`` with the op that froze them.
2. **Ranking.** Each prunable group's channels are ranked by a criterion of
   :mod:`graphopt.compress.importance` (option ``criterion``: ``thinet`` (default), ``l1``, ``l2``, ``bn``,
   ``mean``, ``apoz``). ThiNet ranks by the least-squares error of the group's consumers and needs the
   ``XᵀX``/``XᵀY`` of each consumer on the calibration data (one pass over the original model); a group
   whose consumers are not plain linear layers falls back to ``l1``. Keeping ``k`` channels keeps the
   ``k`` best ranked (nested sets). With ``--data DIR`` (a directory of ``.npz`` shards) these statistics,
   and the sensitivity's re-fit statistics, stream every shard (less the held-out samples), each read
   where its task runs (:mod:`graphopt.compress.shards`); everything else uses the head in memory.
3. **Attention** (option ``attention``). ``head_dim`` (default): an attention channel is one position of
   the head dim, shared by every head (q/k's head dims have no weight consumer and are ranked by ``l1``).
   ``heads``: a channel is a whole head — its ``D`` rows of Q, K and V (weights and biases) and its ``D``
   input rows of the output projection, the head count of every split/merge Reshape target rewritten
   (``H -> H'``); the analysis runs with ``heads=True`` (:mod:`graphopt.compress.channels.walk`). ThiNet
   then ranks heads by the least-squares error of the output projection with the head's ``D`` input
   columns removed and the rest re-fitted (the columns are the head's block): that is what the removal
   costs after the re-fit this pass does, which the l2 norm of a head's rows does not say (Q/K rows act
   through a softmax, and a large V row may be one the other heads can stand in for). ``multiple``
   counts weight rows: a head of ``D`` rows keeps a multiple of 8 rows whenever ``D`` is one, so any head
   count is a level. Refused (the group frozen, the reason in ``left_alone``): what the walk cannot
   follow — a mask with a head axis, rotary embeddings (a Slice of the head dim), a fused QKV picked per
   head by Gather, a Transpose that puts the head dim before the heads (every head one channel).

Plan
----
4. **Budget.** Kept channel counts move in the target CPU's unit of each group
   (:mod:`graphopt.compress.channels.units`): its NCHWc block where one of the group's convs runs
   blocked, else its vector lanes, because a count between two units costs what the next one costs
   (8 everywhere on AVX2, 16 on AVX-512, 4 on ARM64 without NCHWc; arbitrary counts made pruned models
   slower than the original). Option ``multiple`` > 0 replaces the unit by a fixed multiple; a group
   smaller than its unit is not pruned. The target is the run's ``--target-cpu``
   (:mod:`graphopt.measure.target`). Option ``ratio`` > 0
   removes that fraction of every prunable group; option ``channels`` (``"3:40,7:64"``) sets kept counts
   by hand (group ids of the model this pass sees — under the ``prune`` preset the lossless cleanup runs
   first and may merge layers, so take them from a run's report or from
   ``graphopt inspect --groups --lossless``). Otherwise ``--target-macs`` / ``--target-params`` are met by
   :func:`graphopt.compress.budget.allocate`: each group is a unit (keyed by its group id) whose levels are
   the kept counts in whole units (and multiples of the group's divisor); its *sensitivity* at
   ``levels`` evenly spaced kept fractions is measured on ``sensitivity_samples`` calibration samples
   through the run's executor (:mod:`graphopt.measure.executor`; ``--executor``/``--workers``, or
   option ``workers`` for a local pool of its own): the model with only that group pruned to
   that level and its consumers re-fitted from the original statistics; error = relative squared error
   of the outputs (:func:`graphopt.measure.executor.relative_error`, or option ``sensitivity_metric``);
   levels in between are interpolated linearly. How one level is measured (the table is most of a large
   model's run): the dropped channels' input columns of every consumer are set to zero and the re-fitted
   consumers' weights written over theirs (:class:`Overrides`), fed as initializer values to one
   onnxruntime session per group (graph optimizations on: this is a measurement, not the verification)
   that runs only the model's suffix from a cut before the group, on activations cached once
   (:mod:`graphopt.measure.segments`). A dropped channel still flows to its consumers but nothing reads
   it, so the outputs are those of the model with it removed (tests/test_segments.py checks this group
   by group on the zoo). Where an op mixes the channels without the group's weights (attention's
   ``q·kᵀ`` over head-dim channels) the producers are zeroed too and the group is checked once against
   a real removal; a group that fails that check, or whose weights other layers share, is measured on
   the model really pruned by ``shrink`` (stats: ``allocation.sensitivity``). The table's work is
   capped by ``sensitivity_tmacs`` (fewer samples, then fewer levels; the stats say what was measured).
   The greedy allocator then removes, step by step, the channels that cost the least error per unit
   saved, until the target is met. What a unit is (option
   ``latency``): ``ops`` (default) — MACs, each group's errors divided by a hand-set time-per-MAC weight
   (:func:`latency_weights`; a dense conv is "small" below two of the target's blocks); ``time`` —
   predicted seconds of the nodes the groups touch (:mod:`graphopt.measure.latency` with the target's
   profile, or its MACs when it has none, at ``latency_batch``), with the time
   budget chosen by bisection so that the MACs meet the target
   (:func:`graphopt.compress.budget.allocate_priced`); ``macs`` — plain MACs. A params target always buys
   params. ``time`` is the principled one, but the calibrated model misses onnxruntime's layout reorders
   and was not better overall on the zoo (BENCHMARKS.md), so ``ops`` stays the default. The MACs/params of
   a plan come from :meth:`ChannelAnalysis.cost`, fitted once to a polynomial
   (:class:`graphopt.compress.budget.PolynomialCost`, checked against the analysis) so the thousands of
   allocator calls are cheap. The additive error model ignores how errors compound and how well the
   re-fit of later layers compensates, so (option ``blend``) allocations that mix the measured errors
   with an even-spread prior (``(1 − α)·sens + α·(1 − k/size)²``, normalised, α ∈ {0, ½, 1}) are each
   pruned, re-fitted on the first calibration samples and measured on the held-out last ones (one
   ``map`` of the run's executor, :class:`TrialContext`); the best is kept. **Fastest among near-equals**
   (option ``near_fastest``, a MAC target only): the least-error allocation's neighbours (one group
   deeper; one group a level up and another down to meet the target again) whose predicted error is
   within that fraction (default 0.1) of its own are compared by the target's *step-aware* predicted
   time (:func:`graphopt.compress.budget.near_candidates`; channels padded to whole blocks, blocked dense
   convs charged by whole filter sets of 4 blocks, :meth:`graphopt.measure.latency.Nchwc.pass_factor`),
   among those faster by more than 1% that keep at least ``1 − near_fastest_window`` (default 0.95) of
   the MACs asked for (issue 5: a pruned model's MACs are within 5% of the target; resnet's fastest
   near-equals are 7% under it, see BENCHMARKS.md). Why: predicted errors that close are not told apart
   by a table measured on a few hundred samples (resnet: six allocations within 10% measured −0.90 to
   −1.10 points in no order), while their times differ in steps the MACs do not show (a conv's 33rd
   output channel costs a whole pass over its input); BENCHMARKS.md, "Target CPUs". The table can also
   be wrong (inception's group 12), so a near-tie replaces the least-error allocation only when measured:
   the least-error allocation and the ``near_fastest_candidates`` (default 2) fastest near-ties are
   pruned, re-fitted on one half of the calibration samples and run on the other, both ways (the
   guard's folds), and the fastest whose pooled relative output error is within ``near_fastest`` of the
   least-error one's and, with class scores and labels, whose top-1 drop against it is at most
   ``guard_z`` paired standard errors, is taken (:class:`graphopt.compress.budget.TieCheck`); none, the
   least-error allocation stays (stats: ``allocation.near_fastest``). Without data the prediction
   decides and the stats say so. At the target only: the guard's relaxed tries take the least-error
   allocation. With option ``every_group`` (default) each prunable group loses at least its first step when
   that step is small (at most a quarter of the group). Option ``allocation=uniform`` instead bisects
   one common ratio for all groups. With ``--max-drop`` and labels in the data,
   :func:`graphopt.compress.budget.guarded` relaxes the target until the accuracy drop is within the
   budget, judged on samples each try was not fitted to: two folds (re-fitted on one half of the
   calibration samples, judged on the other, and the other way round), the verdicts pooled, accepted
   when ``drop + guard_z · SE <= --max-drop`` with the paired standard error ``SE = 100·√changed / n``
   (:class:`graphopt.compress.budget.HeldOutDrop`; docs/decisions/guards.md). Its tries go through the
   run's executor, the next ones of the bisection measured together when it has several workers (the
   search is the same). A first output that is not class scores turns the guard off (``guard_off`` in
   the stats). Targets are
   fractions of the pipeline's input model (``ctx.baseline``, recorded by the pass manager), not of the
   model after the cleanup that runs first.

Apply
-----
5. **Removal.** :func:`graphopt.compress.channels.shrink.apply` slices every producer/consumer parameter and fixes shape
   constants; surviving values keep their names.
6. **Reconstruction** (option ``refit``): :mod:`graphopt.compress.reconstruct` re-fits, one after the
   other in topological order, every plain linear layer whose input changed (option ``refit_scope``:
   ``consumers`` = only the layers reading a pruned tensor; ``downstream`` (default) = those and every
   plain linear layer after them, the final classifier included), inputs from the pruned model, targets
   from the original at the same value name, ridge towards the pruned weights chosen by
   cross-validation; the bias absorbs the mean of the removed channels. A layer followed by
   ``Relu``/``Clip`` is fitted through the activation (option ``activation_aware``). Layers that are
   not plain (depthwise convs...) are not re-fitted (listed under ``not_refitted``); the next plain one
   downstream compensates.

Refused (model unchanged, reason in the stats): no budget; no prunable group; a target the prunable
groups cannot reach is reported as ``met: false`` with the cost reached. Renamed options (``sens_samples``,
``sens_metric``, ``sens_levels``, ``reconstruct``, and ``refit`` given a layer scope) are refused with a
pointer to their new names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from math import gcd
from typing import Any, ClassVar

import numpy as np
import onnx

from graphopt.compress import budget, channels, refit_shards, shards
from graphopt.measure.blas import blas_threads
from graphopt.compress import importance as imp
from graphopt.compress import reconstruct as rec
from graphopt.compress.channels import shrink
from graphopt.compress.channels.units import group_units
from graphopt.compress.lstsq import LinearLayer, stored_weight
from graphopt.compress.options import calibration, guard
from graphopt.core.errors import OptionError
from graphopt.core.ir import Model
from graphopt.core.ledger import LeftAlone
from graphopt.core.manager import (
    Option,
    Pass,
    PassContext,
    PassResult,
    register,
)
from graphopt.measure import analysis as ana
from graphopt.measure import latency as lat
from graphopt.measure import ort as gort
from graphopt.measure import segments
from graphopt.measure import target as targets
from graphopt.measure.calibration import Calibrator, ChannelStats, reference_outputs
from graphopt.measure.verify import is_class_scores, top1_correct
from graphopt.measure.executor import (EvalContext, ShippedModel, executor_for, in_worker, make_executor,
                                       relative_error)

# =============================================================================================
# ranking


@dataclass
class Ranking:
    """The channels of one group, least important first, and how that order was obtained."""

    gid: int
    order: np.ndarray                      # permutation, removed-first
    criterion: str
    scores: np.ndarray
    predicted: np.ndarray | None = None    # thinet: relative error after removing order[:i+1]
    notes: list[str] = field(default_factory=list)

    def kept(self, k: int) -> np.ndarray:
        n = len(self.order)
        return np.sort(self.order[n - int(k):]) if k > 0 else np.zeros(0, dtype=np.int64)

    def summary(self) -> dict[str, Any]:
        if self.criterion == "thinet":  # scores are elimination ranks; the predicted errors say more
            return {"criterion": "thinet"}
        s = self.scores
        return {"criterion": self.criterion, "min": _r(s.min()), "median": _r(np.median(s)), "max": _r(s.max())}


def _layers_of(graph, nodes: list[str]) -> dict[str, Any]:
    by_name = {n.name: n for n in graph.nodes}
    out = {}
    for name in nodes:
        node = by_name.get(name)
        if node is None:
            continue
        layer = LinearLayer.of(graph, node)
        if not isinstance(layer, str):
            out[name] = layer
    return out


def consumer_blocks(layer, consumer) -> list[np.ndarray]:
    """Per group channel, the feature columns it owns in ``layer`` (a :class:`LinearLayer`)."""
    if layer.kind == "conv":
        return imp.blocks_for(consumer.index_map, layer.channel_columns)
    return imp.blocks_for(consumer.index_map, lambda pos: pos)


def consumer_grams(model: Model, groups: list, data, *, max_rows: int, seed: int, batch: int,
                   max_features: int, executor: Any = None, shard_samples: int = 0
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``XᵀX``/``XᵀY`` of every plain linear consumer of ``groups`` on the (unpruned) ``model``, in shards of
    ``shard_samples`` through ``executor`` when there are more samples, or shard by shard when ``data`` is
    the slices of a ``--data DIR`` (:mod:`graphopt.compress.shards`)."""
    names = sorted({c.node for g in groups for c in g.consumers})
    layers = {k: v for k, v in _layers_of(model.graph, names).items() if v.features <= max_features}
    if not layers or data is None:
        return {}, layers
    return shards.collect(model, layers, data, executor=executor, shard_samples=shard_samples, max_rows=max_rows,
                          seed=seed, batch_size=batch), layers


def rank_group(graph, group, criterion: str, grams: dict, layers: dict, act_stats: dict,
               ridge: float, step: int = 1) -> Ranking:
    """Order the channels of ``group`` by ``criterion`` (falling back to ``l1``, then to index order).
    ThiNet eliminates channels one at a time, or for a group too large for that
    (:func:`graphopt.compress.importance.thinet_step`) in rounds of a divisor of ``step``, the group's level
    spacing (kept counts between its multiples are never used)."""
    notes: list[str] = []
    if criterion == "thinet":
        problems = []
        for c in group.consumers:
            if c.node in grams and c.node in layers:
                g = grams[c.node]
                problems.append(imp.ThiNetProblem(g.xtx, g.xty, consumer_blocks(layers[c.node], c),
                                                  float(g.target_ss().sum()), c.node))
            else:
                notes.append(f"consumer {c.node} is not a plain linear layer: not in the ThiNet error")
        if problems:
            rounds = imp.thinet_step(group.size, [pr.xtx.shape[0] for pr in problems], step)
            res = imp.thinet(problems, group.size, ridge=ridge, min_keep=1, step=rounds)
            if rounds > 1:
                notes.append(f"thinet removed {rounds} channels per round (too large to remove one at a time)")
            return Ranking(group.gid, res.order, "thinet", res.scores, res.error, notes)
        notes.append("no plain linear consumer: ranked by l1 instead of thinet")
        criterion = "l1"
    scores = None
    if criterion in ("l1", "l2"):
        scores = imp.filter_norms(graph, group, 1 if criterion == "l1" else 2)
    elif criterion == "bn":
        scores = imp.bn_scale(graph, group)
    elif criterion in ("mean", "apoz"):
        scores = imp.activation_scores(group, act_stats, criterion)
    if scores is None and criterion != "l1":
        notes.append(f"{criterion} not available for this group: ranked by l1")
        criterion = "l1"
        scores = imp.filter_norms(graph, group, 1)
    if scores is None:
        notes.append("no filter weights: channels ranked by index")
        criterion = "index"
        scores = np.arange(group.size, dtype=np.float64)[::-1].copy()
    order = np.lexsort((-np.arange(group.size), scores))  # ascending score; ties: higher index removed first
    return Ranking(group.gid, order.astype(np.int64), criterion, scores, None, notes)


def activation_stats(model: Model, groups: list, data, batch: int) -> dict:
    """Per-channel statistics (:class:`ChannelStats`) of every activation the ``mean``/``apoz`` criteria read."""
    wanted = sorted({(v, a) for g in groups for v, a, _ in imp.activation_members(g)})
    if not wanted or data is None:
        return {}
    stats = {key: ChannelStats(axis=key[1]) for key in wanted}
    for b in Calibrator(model, data, batch).run(sorted({v for v, _ in wanted})):
        for (v, a), st in stats.items():
            st.update(b[v])
    return stats


# =============================================================================================
# trials: a copy pruned to one allocation and re-fitted (blend and guard; run in executor workers)


@dataclass
class TrialContext:
    """What a worker needs to prune and re-fit a copy of the model to one allocation and measure it:
    the unpruned model, the samples the re-fit uses (``data``), and for blend the held-out samples a
    trial's output error is measured on (``hold``) with the unpruned model's outputs there."""

    model: ShippedModel
    data: Any
    input_shapes: dict | None
    heads: bool
    seed: int
    batch: int
    refit: dict[str, Any]
    hold: Any = None
    ref_out: dict[str, np.ndarray] | None = None
    folds: list[tuple[Any, Any, Any]] | None = None  # (fit, held, the unpruned model's verdicts or outputs there)
    z: float = 0.0

    def pruned(self, keep_idx: Mapping[int, np.ndarray], data: Any = None) -> Model:
        """A copy pruned to ``keep_idx`` (kept channel indices per group) and re-fitted on ``data``
        (default :attr:`data`)."""
        model = self.model.ir()
        trial = model.clone()
        if keep_idx:
            # same model, same group ids; shrink needs an analysis of the copy
            analysis = channels.analyze(trial, self.input_shapes, heads=self.heads)
            apply_plan(trial, analysis, dict(keep_idx), model, self.data if data is None else data, seed=self.seed,
                       batch=self.batch, **self.refit)
        return trial


def trial_error(ctx: TrialContext, keep_idx: Mapping[int, np.ndarray]) -> float:
    """Relative output error on the held-out samples of the model pruned to ``keep_idx`` (blend)."""
    return float(relative_error(ctx.ref_out, _outputs(ctx.pruned(keep_idx), ctx.hold, ctx.batch)))


#: Ridge solves per re-fitted layer in one re-fit: choose_ridge's finite ridges on two folds, then the fit.
_SOLVES_PER_LAYER = 2 * sum(1 for r in rec.RIDGES if np.isfinite(r)) + 1


def near_check_work(run: PruneRun, candidates: int) -> float:
    """Floating-point operations near_fastest's measured check is estimated to cost: ``1 + candidates``
    allocations, each re-fitted and run on two folds of half the samples. A re-fit solves
    ``_SOLVES_PER_LAYER`` ridge systems of ``(F + 1)²`` per consumer layer (``(2/3)(F + 1)³`` each, F its
    features) and runs the model about three times over its fold (reference, pruned, held-out run:
    ``2 · MACs`` each per sample). With two candidates: 0.004-0.1 TFLOP on the zoo (512 samples; vgg's
    check took 10 s of CPU), 1.4 on EfficientNet-B0, 8.9 on DenseNet-121 and 10.7 on ResNet-50 at
    224x224 with 64 samples (where the check, six re-fits of the model, takes longer than the rest of the
    pass: issue 16's ten minutes would not hold)."""
    solves = sum(_SOLVES_PER_LAYER * 2 / 3 * (layer.features + 1) ** 3 for layer in run.layers.values())
    samples = 0 if run.data is None else run.data.n_samples
    runs = 3 * 2.0 * float(run.macs0) * samples / 2
    return (1 + candidates) * 2 * (solves + runs)


def trial_heldout(ctx: TrialContext, keep_idx: Mapping[int, np.ndarray]) -> tuple[float, np.ndarray | None]:
    """The model pruned to ``keep_idx``, cross-validated over :attr:`TrialContext.folds` (re-fitted on each
    fold's fitting samples, run on its held-out ones, whose unpruned outputs the fold holds): the
    relative squared output error pooled over every held-out sample, and the top-1 verdicts (in the folds'
    order) when the first output is class scores and the samples have labels, else ``None``
    (near_fastest's check)."""
    reference, outputs, correct = {}, {}, []
    for fit, held, ref_out in ctx.folds:
        out = _outputs(ctx.pruned(keep_idx, fit), held, ctx.batch)
        for name, value in ref_out.items():
            reference.setdefault(name, []).append(value)
            outputs.setdefault(name, []).append(out[name])
        scores = next(iter(out.values()))
        correct.append(scores.argmax(axis=1) == held.labels
                       if held.labels is not None and is_class_scores(scores, held.n_samples) else None)
    error = float(relative_error({k: np.concatenate(v) for k, v in reference.items()},
                                 {k: np.concatenate(v) for k, v in outputs.items()}))
    return error, None if any(c is None for c in correct) else np.concatenate(correct)


def trial_drop(ctx: TrialContext, keep_idx: Mapping[int, np.ndarray]) -> budget.HeldOutDrop:
    """Top-1 accuracy drop of the model pruned to ``keep_idx``, cross-validated (guard): per fold of
    :attr:`TrialContext.folds` re-fitted on its fitting samples and judged on its held-out ones, against
    the unpruned model's verdicts there; the verdicts of all folds pooled."""
    reference, correct = [], []
    for fit, held, held_reference in ctx.folds:
        reference.append(held_reference)
        correct.append(top1_correct(ctx.pruned(keep_idx, fit), held, ctx.batch))
    return budget.HeldOutDrop.of(np.concatenate(reference), np.concatenate(correct), ctx.z)


# =============================================================================================
# removal + reconstruction


def layer_out_keep(analysis, graph, keep_idx: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Node name -> original output channels it keeps, for linear layers whose output is pruned."""
    by_name = {n.name: n for n in graph.nodes}
    removed: dict[str, set[int]] = {}
    sizes: dict[str, int] = {}
    for gid, kept in keep_idx.items():
        group = analysis.group(gid)
        drop = np.setdiff1d(np.arange(group.size), kept)
        for p in group.producers:
            node = by_name.get(p.node)
            if node is None or len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].name != p.param:
                continue
            layer = LinearLayer.of(graph, node)
            if isinstance(layer, str):
                continue
            sizes[p.node] = layer.out_features
            removed.setdefault(p.node, set()).update(int(x) for x in np.asarray(p.index_map)[drop].reshape(-1))
    return {name: np.array(sorted(set(range(sizes[name])) - rem), dtype=np.int64) for name, rem in removed.items()}


def apply_plan(model: Model, analysis, keep_idx: dict[int, np.ndarray], reference: Model, data, *,
               refit: bool, refit_scope: str, max_rows: int, seed: int, batch: int,
               min_ridge: float = 1e-5, activation_aware: bool = True, progress=None,
               stream: Any = None, executor: Any = None) -> dict[str, Any]:
    """Shrink ``model`` (mutated) to ``keep_idx`` and re-fit; returns the shrink and re-fit stats.

    With ``refit`` and data, the layers of ``refit_scope`` (``consumers`` of a pruned group, or
    ``downstream`` = those and every plain linear layer after them) are re-fitted towards ``reference``:
    on ``data`` in memory, or with ``stream`` (the slices of a ``--data DIR``) on every shard of it through
    ``executor`` (:mod:`graphopt.compress.refit_shards`; ``data`` is then its head)."""
    graph = model.graph
    out_keep = layer_out_keep(analysis, graph, keep_idx)
    consumers = {c.node for gid in keep_idx for c in analysis.group(gid).consumers}
    not_plain = _not_plain_layers(graph, analysis, keep_idx, consumers)
    stats: dict[str, Any] = {"shrink": shrink.apply(model, analysis, keep_idx)}
    if not_plain:
        stats["not_refitted"] = {"reason": "not a plain conv/gemm/matmul: its weights are only sliced; the next "
                                           "plain layer downstream is re-fitted and compensates",
                                 "nodes": not_plain}
    if not refit or data is None:
        return stats
    if refit_scope == "downstream":
        nodes = rec.linear_nodes_from(graph, consumers)
    else:
        nodes = [n for n in graph.toposort() if n.name in consumers]
    targets = [rec.RefitTarget(n.name, out_keep.get(n.name)) for n in nodes]
    ridges = [r for r in rec.RIDGES if r >= min_ridge] or [min_ridge]
    if stream is not None:
        stats["refit"] = refit_shards.refit(model, reference, targets, stream, data, executor=executor,
                                            max_rows=max_rows, seed=seed, batch_size=batch, ridges=ridges,
                                            activation_aware=activation_aware, progress=progress)
        stats["refit_in_shards"] = {"shards": len(stream), "samples": shards.count(stream)}
        return stats
    usage: dict[str, int] = {}
    stats["refit"] = rec.refit(model, reference, targets, data, max_rows=max_rows, seed=seed, batch_size=batch,
                               ridges=ridges, activation_aware=activation_aware, progress=progress, usage=usage)
    stats["refit_target_bytes"] = usage
    return stats


def _not_plain_layers(graph, analysis, keep_idx: dict[int, np.ndarray], consumers: set[str]) -> dict[str, str]:
    """Conv/Gemm/MatMul nodes sliced along a pruned group that are not one linear map (depthwise /
    grouped convs), with the reason: they keep their sliced weights, and the next plain layer
    downstream is re-fitted instead."""
    by_name = {n.name: n for n in graph.nodes}
    sliced = {p.node for gid in keep_idx for p in analysis.group(gid).producers} | consumers
    not_plain = {}
    for name in sorted(sliced):
        node = by_name.get(name)
        if node is not None and node.op_type in ("Conv", "Gemm", "MatMul"):
            why = LinearLayer.of(graph, node)
            if isinstance(why, str):
                not_plain[name] = why
    return not_plain


# =============================================================================================
# sensitivity (runs in executor workers: module-level, picklable)


@dataclass
class RefitSlot:
    """Where a re-fitted consumer's new weights go when the removal is expressed as overrides: its weight
    initializer (``layout`` as :func:`graphopt.compress.lstsq.stored_weight` takes it), and the
    initializer the fitted bias ``b`` goes to: ``bias_sign`` 0 replaces the layer's own bias (Conv/Gemm
    ``B``) by ``b``; 1 adds ``b`` to the bias of the ``Add`` after a MatMul; -1 subtracts it from the
    running mean of the ``BatchNormalization`` after a Conv without bias (``BN(y + b)`` is ``BN`` with
    mean ``μ − b``). A Conv/Gemm without a bias and no such neighbour gets a zero bias input of its own
    in the measuring session's model (``new_bias``; the function is unchanged)."""

    weight: str
    layout: tuple
    features: int
    bias: str
    bias_sign: int
    node: str = ""
    new_bias: bool = False             # a Conv/Gemm without bias: the suffix model gets a zero one to override


@dataclass
class Overrides:
    """One group's removal written as new values of initializers of the unchanged model: the dropped
    channels' inputs of every consumer set to zero (``zeroed``: ``(param, axis, index_map)``), and the
    re-fitted consumers' weights and biases (``refit``). A dropped channel then still flows up to its
    consumers but is read by nothing: the outputs are those of the model with it removed."""

    zeroed: list[tuple[str, int, np.ndarray]]
    refit: dict[str, RefitSlot]
    params: tuple[str, ...]
    checked: bool = True                   # False: equal to the removal only if a measurement says so
    mixing: str = ""                       # the op that mixes the channels, when producers are zeroed too


@dataclass
class SensitivityContext:
    """What a worker needs to measure one (group, level): the model, data and per-group plans.

    ``overrides[gid]`` (when the group's removal can be written as initializer values, see
    :func:`removal_overrides`) and ``cuts[gid]`` with ``checkpoints`` (the unchanged model's activations
    before the group, :mod:`graphopt.measure.segments`) make an evaluation a run of the model's suffix
    in one cached onnxruntime session per group; without them it is the model pruned by
    :func:`graphopt.compress.channels.shrink.apply` (a session per evaluation)."""

    ev: Any                                # graphopt.measure.executor.EvalContext (model bytes + data)
    orders: dict[int, np.ndarray]          # gid -> removal order
    refits: dict[int, list]                # gid -> [(node, CrossGram, blocks)]
    ridge: float = 1e-3
    metric: str = "rel"                    # "rel": relative squared output error; "kl": softmax KL
    input_shapes: dict | None = None       # the shapes costs are counted at (PassContext.input_shapes)
    heads: bool = False                    # option attention=heads: the analysis' unit of attention
    overrides: dict[int, Overrides] = field(default_factory=dict)
    cuts: dict[int, int] = field(default_factory=dict)
    checkpoints: Any = None                # graphopt.measure.segments.Checkpoints


def measure_level(ctx: SensitivityContext, item: tuple[int, int]) -> float:
    """Relative output error of the model with only group ``item[0]`` (a group id) kept at ``item[1]`` channels."""
    gid, k = item
    outputs = (level_outputs_by_overrides(ctx, gid, k) if gid in ctx.overrides
               else level_outputs_by_removal(ctx, gid, k))
    if ctx.metric == "kl":
        return kl_error(ctx.ev.reference(), outputs)
    return float(ctx.ev.error(outputs))


def _split(ctx: SensitivityContext, gid: int, k: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Kept and dropped channels of group ``gid`` at ``k``, and each re-fitted consumer's new ``(W, b)``
    over its remaining columns ``cols``: ``[(node, cols, (W, b))]``."""
    order = ctx.orders[gid]
    kept = np.sort(order[len(order) - int(k):])
    dropped = np.sort(order[:len(order) - int(k)])
    plan = []
    for node, gram, blocks in ctx.refits.get(gid, []):
        removed_cols = np.concatenate([blocks[c] for c in dropped]) if len(dropped) else np.zeros(0, np.int64)
        cols = np.setdiff1d(np.arange(gram.features), removed_cols)
        plan.append((node, cols, gram.solve(ctx.ridge, cols)))
    return kept, dropped, plan


def level_outputs_by_removal(ctx: SensitivityContext, gid: int, k: int, *,
                             limit: int | None = None) -> dict[str, np.ndarray]:
    """The outputs of the model with group ``gid`` shrunk to ``k`` channels and its consumers re-fitted
    (run from the group's cut when the pruned model's suffix can be fed from it); ``limit``: the first
    batches only."""
    ctx.ev.cache.pop("suffix session", None)   # another group's overrides session: not two sessions at once
    model = ctx.ev.fresh_model()
    analysis = channels.analyze(model, ctx.input_shapes, heads=ctx.heads)
    kept, _, plan = _split(ctx, gid, k)
    shrink.apply(model, analysis, {gid: kept})
    by_name = {n.name: n for n in model.graph.nodes}
    for node, _, (w, b) in plan:
        layer = LinearLayer.of(model.graph, by_name[node])
        if not isinstance(layer, str) and layer.weight_matrix().shape == w.shape:
            layer.set_weights(model.graph, w, b)
    proto, weights = gort.structure(model)   # the unchanged weights shared with the context, not copied
    del model, analysis, by_name, plan
    checkpoints = _checkpoints(ctx)
    sess, start = checkpoints.session(proto, ctx.cuts.get(gid, 0), threads=_threads(ctx), weights=weights)
    del proto, weights
    return checkpoints.run(sess, start, limit=limit)


def level_outputs_by_overrides(ctx: SensitivityContext, gid: int, k: int, *,
                               limit: int | None = None) -> dict[str, np.ndarray]:
    """The same outputs as :func:`level_outputs_by_removal`, from the unchanged model's suffix with the
    group's :class:`Overrides` fed as initializer values (one session per group and process)."""
    spec = ctx.overrides[gid]
    _, dropped, plan = _split(ctx, gid, k)
    values: dict[str, np.ndarray] = {}
    for param, axis, index_map in spec.zeroed:
        arr = values[param] if param in values else _initializer(ctx, param).copy()
        pos = np.asarray(index_map)[dropped].reshape(-1)
        index = [slice(None)] * arr.ndim
        index[axis] = pos
        arr[tuple(index)] = 0
        values[param] = arr
    for node, cols, (w, b) in plan:
        slot = spec.refit[node]
        full = np.zeros((slot.features, w.shape[1]), dtype=np.float64)
        full[cols] = w
        dtype = _initializer(ctx, slot.weight).dtype
        values[slot.weight] = stored_weight(slot.layout, full).astype(dtype)
        base = np.zeros(w.shape[1], dtype) if slot.new_bias else _initializer(ctx, slot.bias)
        bias = np.asarray(b, dtype=np.float64).reshape(base.shape)
        values[slot.bias] = (base + slot.bias_sign * bias if slot.bias_sign else bias).astype(base.dtype)
    checkpoints = _checkpoints(ctx)
    cut = ctx.cuts.get(gid, 0)
    # One session at a time: the items come group by group, and every session holds its own copy of the
    # suffix's weights (one per group held drove a ResNet-50 run to 9.8 GB).
    held = ctx.ev.cache.get("suffix session")
    if held is None or held[0] != gid:
        ctx.ev.cache.pop("suffix session", None)
        held = ctx.ev.cache["suffix session"] = (
            gid, *checkpoints.session(_overrides_proto(ctx), cut, overridable=spec.params, threads=_threads(ctx)))
    return checkpoints.run(held[1], held[2], values, limit=limit)


def _overrides_proto(ctx: SensitivityContext) -> onnx.ModelProto:
    """The unchanged model the overrides' sessions start from, once per process: the evaluation context's
    model itself, or a copy in which every re-fitted Conv/Gemm without a bias (:attr:`RefitSlot.new_bias`,
    of any group) reads a zero one the overrides can set (the function is unchanged)."""
    if "overrides proto" not in ctx.ev.cache:
        new = {slot.bias: slot for spec in ctx.overrides.values() for slot in spec.refit.values() if slot.new_bias}
        proto = ctx.ev.proto()
        ctx.ev.cache["overrides proto"] = _with_new_biases(proto, list(new.values())) if new else proto
    return ctx.ev.cache["overrides proto"]


def _with_new_biases(proto: onnx.ModelProto, new: Sequence[RefitSlot]) -> onnx.ModelProto:
    """A copy of ``proto`` in which the node of each of the ``new`` slots reads a zero bias of its own."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = {n.name: n for n in out.graph.node}
    for slot in new:
        node, weight = nodes[slot.node], inits[slot.weight]   # dims and type only: a stub may hold no data
        outputs = weight.dims[0] if slot.layout[0] == "conv" or slot.layout[2] else weight.dims[1]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(weight.data_type)
        out.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(outputs, dtype), slot.bias))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = slot.bias
    return out


def _checkpoints(ctx: SensitivityContext):
    if ctx.checkpoints is None:
        ctx.checkpoints = segments.Checkpoints.none(ctx.ev.proto(), ctx.ev.data, ctx.ev.batch_size,
                                                    weights=ctx.ev.weights)
    return ctx.checkpoints


def _initializer(ctx: SensitivityContext, name: str) -> np.ndarray:
    """An initializer of the unchanged model as an array, read once per process."""
    key = ("initializer", name)
    if key not in ctx.ev.cache:
        ctx.ev.cache[key] = ctx.ev.initializer(name)
    return ctx.ev.cache[key]


def _threads(ctx: SensitivityContext) -> int | None:
    return 1 if in_worker() else ctx.ev.threads


#: Ops that mix the positions of an input they read without a weight of the group (attention's q·kᵀ
#: contracts the head dim): a dropped channel read there still changes the outputs, so zeroing its
#: consumers' inputs is not its removal.
_MIXING_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "MatMulInteger", "QLinearMatMul"})


def removal_overrides(graph: onnx.GraphProto, group, refitted: Sequence[str], layers: Mapping[str, Any],
                      readers: Mapping[str, list[onnx.NodeProto]] | None = None) -> Overrides | str:
    """``group``'s removal as :class:`Overrides` of the unchanged model's initializers, or why it cannot be.

    When an op mixes the group's positions without the group's weights (attention's ``q·kᵀ`` over head-dim
    channels; a depthwise conv maps each channel to itself, and whole heads (``width > 1``) are fine: a
    head's scores mix only its own positions), zeroed inputs of the consumers are not enough: the
    producers' parameters are zeroed too, so that the dropped channels are zeros where they are mixed
    (``q_d = 0`` drops ``q_d·k_d`` from every score). Whether that holds depends on what lies between
    producer and mixing op, so such overrides are marked ``checked = False`` and
    :func:`sensitivity_context` compares them with a real removal once before using them.

    Refused when: a consumer's weight is not an initializer only the group's own layers read (a shared or
    computed weight, or one reader's view of a weight several nodes share); a mixing op reads the group and a
    producer's parameter is not an initializer of its own; a re-fitted MatMul has no bias to take the
    fitted one (not followed by ``Add`` of a constant of its own). ``readers`` (:func:`segments.readers`
    of ``graph``) is computed when not given; pass it when asking for many groups."""
    readers = segments.readers(graph) if readers is None else readers
    inits = {t.name: t for t in graph.initializer}
    own = {c.node for c in group.consumers} | {p.node for p in group.producers}
    consumers = {c.node for c in group.consumers}
    mixed = None
    # A weight several nodes read, seen per reader: zeroing one reader's view would change the others'.
    per_reader = {m.value for m in group.members if m.use is not None}
    for m in group.members:
        if group.width > 1 or m.is_param:
            continue
        for node in readers.get(m.value, []):
            if node.op_type in _MIXING_OPS and node.name not in consumers and not _depthwise(node, inits):
                mixed = mixed or node
    zeroed = []
    for c in group.consumers:
        if c.param in per_reader:
            return f"consumer {c.node!r} reads one view of a weight several nodes share"
        if c.param not in inits:
            return f"consumer {c.node!r} reads a weight that is not an initializer"
        if any(n.name not in own for n in readers.get(c.param, [])):
            return f"the weight of {c.node!r} is shared with a layer outside the group"
        zeroed.append((c.param, c.axis, np.asarray(c.index_map)))
    if mixed is not None:
        for p in group.producers:
            if p.param not in inits or p.param in per_reader or any(n.name not in own for n in readers.get(p.param, [])):
                return (f"{mixed.op_type} {mixed.name!r} mixes the channels without the group's weights, and "
                        f"the parameter {p.param!r} of {p.node!r} is not an initializer of its own")
            zeroed.append((p.param, p.axis, np.asarray(p.index_map)))
    by_name = {n.name: n for n in graph.node}
    refit: dict[str, RefitSlot] = {}
    for name in refitted:
        node, layer = by_name.get(name), layers.get(name)
        if node is None or layer is None or node.input[1] not in inits:
            return f"re-fitted consumer {name!r} has no weight initializer"
        slot = _bias_slot(node, layer, readers, inits)
        if isinstance(slot, str):
            return slot
        refit[name] = RefitSlot(node.input[1], layer.layout, layer.features, slot[0], slot[1], node=name,
                                new_bias=len(slot) > 2)
    params = {p for p, _, _ in zeroed} | {s.weight for s in refit.values()} | {s.bias for s in refit.values()}
    return Overrides(zeroed, refit, tuple(sorted(params)), checked=mixed is None,
                     mixing=f"{mixed.op_type} {mixed.name!r}" if mixed is not None else "")


def _depthwise(node: onnx.NodeProto, inits: Mapping[str, Any]) -> bool:
    """A Conv whose every output channel reads one input channel (weight ``[C·m, 1, kh, kw]``)."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
        return False
    dims = list(inits[node.input[1]].dims)
    return len(dims) >= 2 and dims[1] == 1


def _bias_slot(node: onnx.NodeProto, layer, readers: Mapping[str, list], inits: Mapping[str, Any]
               ) -> tuple[str, int] | tuple[str, int, bool] | str:
    """``(initializer, sign[, new])`` that takes a re-fitted ``node``'s bias (see :class:`RefitSlot`), or
    why there is none."""
    if layer.kind in ("conv", "gemm") and len(node.input) >= 3 and node.input[2]:
        if node.input[2] not in inits or len(readers.get(node.input[2], [])) != 1:
            return f"the bias of {node.name!r} is not an initializer of its own"
        return node.input[2], 0
    after = readers.get(node.output[0], [])
    nxt = after[0] if len(after) == 1 else None
    if nxt is not None and layer.kind == "conv" and nxt.op_type == "BatchNormalization" and len(nxt.input) >= 4:
        mean = nxt.input[3]
        if mean in inits and len(readers.get(mean, [])) == 1 and nxt.input[0] == node.output[0]:
            return mean, -1
    if nxt is not None and layer.kind == "matmul" and nxt.op_type == "Add":
        other = [n for n in nxt.input if n != node.output[0]]
        if (len(other) == 1 and other[0] in inits and len(readers.get(other[0], [])) == 1
                and int(np.prod(inits[other[0]].dims)) == layer.out_features):
            return other[0], 1
    if layer.kind in ("conv", "gemm"):
        return f"graphopt_refit_bias/{node.name}", 0, True
    return f"{node.op_type} {node.name!r} has no bias initializer of its own to take the re-fitted bias"


def sensitivity_context(reference: Model, groups: Sequence, orders: Mapping[int, np.ndarray], grams: Mapping[str, Any],
                        layers: Mapping[str, Any], data, evaluations: Mapping[int, int], *, metric: str = "rel",
                        input_shapes: Mapping | None = None, heads: bool = False, proto: onnx.ModelProto | None = None,
                        starts: Mapping[int, int] | None = None, node_macs: Sequence[float] | None = None,
                        weights: Mapping[str, np.ndarray] | None = None,
                        ) -> tuple[SensitivityContext, dict[str, Any]]:
    """The :class:`SensitivityContext` of ``groups`` of ``reference`` measured on ``data``, and its stats.

    ``orders`` are the groups' removal orders, ``grams``/``layers`` their consumers' statistics (of the
    fitting samples) and layer views, ``evaluations[gid]`` how many levels will be measured. Each group
    whose removal can be written as initializer values gets its :class:`Overrides` (the others are
    listed by reason under ``by_removal``); cuts are chosen by :mod:`graphopt.measure.segments` at the
    groups' first nodes (:func:`group_starts`), weighted by their evaluations and priced by the MACs
    before them at ``input_shapes``. ``work_fraction`` is the share of the whole model's MACs the
    evaluations still run. ``proto`` (with the ``weights`` of its by-reference stubs,
    :func:`graphopt.measure.ort.structure`), ``starts`` and ``node_macs`` (of ``reference``) are computed
    when not given."""
    refits: dict[int, list] = {}
    for g in groups:
        # A consumer that also produces the group's channels (a residual block's last conv) loses outputs
        # too: its re-fit over all outputs no longer fits, and the pruned model keeps its sliced weights.
        producing = {p.node for p in g.producers}
        refits[g.gid] = [(c.node, grams[c.node], consumer_blocks(layers[c.node], c))
                         for c in g.consumers if c.node in grams and c.node in layers and c.node not in producing]
    if proto is None:
        proto, weights = gort.structure(reference)
    starts = group_starts(proto.graph, groups) if starts is None else starts
    node_macs = segments.node_macs(reference, proto, input_shapes) if node_macs is None else node_macs
    checkpoints, cuts = segments.Checkpoints.build(
        proto, data, {gid: (starts[gid], int(evaluations.get(gid, 1))) for gid in starts}, node_macs,
        batch_size=256, weights=weights)
    ev = EvalContext(proto, data, batch_size=checkpoints.batch, weights=dict(weights or {}))
    if checkpoints.reference is not None:
        ev.set_reference(checkpoints.reference)
    context = SensitivityContext(ev, dict(orders), refits, metric=metric, input_shapes=input_shapes, heads=heads,
                                 cuts=cuts, checkpoints=checkpoints)
    readers = segments.readers(proto.graph)
    by_removal: dict[str, list[int]] = {}
    for g in groups:
        spec = removal_overrides(proto.graph, g, [node for node, _, _ in refits[g.gid]], layers, readers)
        if isinstance(spec, str):
            by_removal.setdefault(spec, []).append(g.gid)
        else:
            context.overrides[g.gid] = spec
    checked = 0
    for gid, spec in list(context.overrides.items()):
        if not spec.checked:
            checked += 1
            why = _overrides_differ(context, gid)
            if why is not None:
                del context.overrides[gid]
                by_removal.setdefault(f"{spec.mixing} mixes the channels; {why}", []).append(gid)
    before = np.concatenate([[0.0], np.cumsum(node_macs)])
    full = float(before[-1]) or 1.0
    runs = sum(int(evaluations.get(g, 1)) for g in starts) or 1
    stats: dict[str, Any] = {
        "evaluations": int(sum(evaluations.values())),
        "by_overrides": len(context.overrides),
        "overrides_checked": checked,
        "cuts": len(context.checkpoints.values),
        "cached_mb": _r(context.checkpoints.nbytes / 2**20),
        "work_fraction": _r(sum(int(evaluations.get(g, 1)) * (full - before[context.cuts.get(g, 0)])
                                for g in starts) / (full * runs)),
    }
    if by_removal:
        stats["by_removal"] = by_removal
    if context.checkpoints.dropped:
        stats["cuts_dropped"] = {str(k): v for k, v in context.checkpoints.dropped.items()}
    return context, stats


def _overrides_differ(ctx: SensitivityContext, gid: int) -> str | None:
    """Why the group's overrides do not give its removal's outputs (at half its channels, on the first
    batch), or ``None`` when they do within float noise."""
    k = max(len(ctx.orders[gid]) // 2, 1)
    removed = level_outputs_by_removal(ctx, gid, k, limit=1)
    overridden = level_outputs_by_overrides(ctx, gid, k, limit=1)
    reference = {name: r[:len(removed[name])] for name, r in ctx.ev.reference().items()}
    scale = relative_error(reference, removed)
    gap = relative_error(removed, overridden)
    if np.isfinite(gap) and gap <= 1e-6 * max(scale, 1e-9):
        return None
    return f"zeroing its producers is not its removal here (relative gap {gap:.3g})"


def group_starts(graph: onnx.GraphProto, groups: Sequence) -> dict[int, int]:
    """Per group id, the position in ``graph.node`` of the first node that reads or writes one of the
    group's values or weights: removing its channels changes nothing before it."""
    touching: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in segments.node_reads(node) | set(node.output):
            touching.setdefault(name, []).append(i)
    position = {n.name: i for i, n in enumerate(graph.node)}
    out = {}
    for g in groups:
        found = [i for m in g.members for i in touching.get(m.value, [])]
        found += [position[x.node] for x in (*g.producers, *g.consumers) if x.node in position]
        out[g.gid] = min(found) if found else 0
    return out


def kl_error(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> float:
    """Mean ``KL(softmax(ref) ‖ softmax(out))`` over the rows of the first output (class scores on the
    last axis): how much the predicted distribution moved, which is what top-1 accuracy feels."""
    name = next(iter(reference))
    r = np.asarray(reference[name], dtype=np.float64).reshape(-1, reference[name].shape[-1])
    o = np.asarray(outputs[name], dtype=np.float64).reshape(r.shape)
    lr = r - r.max(axis=1, keepdims=True)
    lr -= np.log(np.exp(lr).sum(axis=1, keepdims=True))
    lo = o - o.max(axis=1, keepdims=True)
    lo -= np.log(np.exp(lo).sum(axis=1, keepdims=True))
    return float(np.mean(np.sum(np.exp(lr) * (lr - lo), axis=1)))


# =============================================================================================
# the pass


def polynomial_cost(groups: list, f: Callable[[dict[int, int]], float]):
    """:class:`graphopt.compress.budget.PolynomialCost` of ``f(keep)`` (MACs or params from ``analysis.cost``,
    predicted time from ``analysis.time``), fitted by probing ``f`` — or ``None`` when the probes do not fit
    a polynomial of degree <= 2 per group and bilinear between groups (the allocator then calls ``f``
    itself, which is slower).

    With ``x_g = keep_g / size_g``: ``cost = c + Σ a_g x_g + Σ q_g x_g² + Σ b_gh x_g x_h``. One group
    at a time at three sizes gives its quadratic; two groups at once give ``b_gh``.
    """
    full = {g.gid: g.size for g in groups}
    f0 = f({})
    probe: dict[int, int] = {}
    quad: dict[int, tuple[float, float]] = {}
    single: dict[int, float] = {}
    for g in groups:
        t1 = g.size // 2
        t2 = g.size - 1 if g.size - 1 not in (t1, 0) else None
        x1 = t1 / g.size
        y1 = f({g.gid: t1}) - f0
        single[g.gid] = y1
        probe[g.gid] = t1
        if t2 is None:
            quad[g.gid] = ((y1) / (x1 - 1), 0.0)   # linear through (1, 0) and (x1, y1)
            continue
        x2 = t2 / g.size
        y2 = f({g.gid: t2}) - f0
        # y(x) = s (x - 1) + q (x² - 1)
        a = np.array([[x1 - 1, x1 * x1 - 1], [x2 - 1, x2 * x2 - 1]])
        sq = np.linalg.solve(a, np.array([y1, y2]))
        quad[g.gid] = (float(sq[0]), float(sq[1]))
    pair: dict[tuple[int, int], float] = {}
    for i, g in enumerate(groups):
        for h in groups[i + 1:]:
            y = f({g.gid: probe[g.gid], h.gid: probe[h.gid]}) - f0 - single[g.gid] - single[h.gid]
            if abs(y) > 0:
                xg, xh = probe[g.gid] / g.size, probe[h.gid] / h.size
                pair[(g.gid, h.gid)] = y / ((xg - 1) * (xh - 1))
    cost = budget.PolynomialCost(full)
    constant = f0
    for g in groups:
        s_, q = quad[g.gid]
        linear = s_ - sum(b for (a_, c_), b in pair.items() if g.gid in (a_, c_))
        cost.add(linear, g.gid)
        if q:
            cost.add(q, g.gid, g.gid)
        constant -= linear + q
    for (a_, c_), b in pair.items():
        cost.add(b, a_, c_)
        constant -= b
    cost.add(constant)
    rng = np.random.default_rng(0)
    for _ in range(4):  # the fit must reproduce the analysis exactly, else do not use it
        keep = {g.gid: int(rng.integers(1, g.size + 1)) for g in groups}
        want = f(keep)
        got = cost(keep)
        if abs(got - want) > 1e-6 * max(abs(want), 1.0):
            return None
    return cost


#: Time saved per MAC saved by onnxruntime's CPU conv kernels (NCHWc, AVX2, 1 thread), relative to a
#: large dense conv, from per-node profiles of the zoo (BENCHMARKS.md): a dense conv with at most two
#: output blocks of 8 channels has a large fixed part, so removing its output channels buys little time.
#: Depthwise convs are slower per MAC than dense ones, but weighting them up moved channels to where
#: they bought no speed and cost accuracy, so they count as dense.
SMALL_OUTPUT_WEIGHT = 0.3
#: ... with at most this many output channels (two 8-channel blocks) on AVX2, where it was measured; on
#: another target, two of its blocks (:func:`small_output`).
SMALL_OUTPUT = 16


def small_output(target: targets.Target) -> int:
    """The output channels below which a dense conv counts as small on ``target``: two of its units."""
    return 2 * target.unit(blocked=True)


def _node_weight(node, cout: int, produces: bool, small: int = SMALL_OUTPUT) -> float:
    """Marginal time-per-MAC weight of one node for a group it produces (``produces``) or reads."""
    if node.op_type == "Conv" and produces and cout <= small:
        return SMALL_OUTPUT_WEIGHT
    return 1.0


def latency_weights(model: Model, groups: list, input_shapes: Mapping[str, Sequence[int]] | None = None,
                    small: int = SMALL_OUTPUT) -> dict[int, float]:
    """Estimated time saved per MAC saved by pruning each group: ``w_g = Σ_n ρ_n MACs_n / Σ_n MACs_n``.

    ``n`` runs over the group's producers and consumers (the nodes whose MACs shrink with it) and
    ``ρ_n`` is :func:`_node_weight` at the original channel counts (a node producing the group counts
    as a producer); a group whose nodes have no MACs gets 1. First order: pruning a fraction of the
    group's channels removes that fraction of each node's MACs, so the time saved per MAC saved is
    ``w_g`` (in units of a large dense conv's time per MAC).
    """
    per = {n.name: n for n in ana.analyze(model, input_shapes=input_shapes).per_node}
    nodes = {n.name: n for n in model.graph.nodes}
    out: dict[int, float] = {}
    for g in groups:
        num = den = 0.0
        produced = {p.node for p in g.producers}
        for name in produced | {c.node for c in g.consumers}:
            node, cost = nodes.get(name), per.get(name)
            if node is None or cost is None or not cost.macs:
                continue
            w = node.inputs[1] if len(node.inputs) > 1 else None
            shape = w.shape if w is not None else None
            rho = 1.0
            if node.op_type == "Conv" and shape and len(shape) >= 2 and all(isinstance(d, int) for d in shape[:2]):
                rho = _node_weight(node, int(shape[0]), name in produced, small)
            num += rho * cost.macs
            den += cost.macs
        out[g.gid] = num / den if den else 1.0
    return out


def _round_down(k: float, multiple: int) -> int:
    return int(np.floor(k / multiple) * multiple)


def _lcm(a: int, b: int) -> int:
    return a * b // gcd(a, b)

@dataclass
class PruneRun:
    """One run of :class:`PruneFilters` on one model: what its steps share, so that none takes a
    dozen arguments. ``model`` is pruned in place at the end; ``reference`` is the unpruned model (the
    sensitivity's base model and the re-fit's targets): ``model`` itself until the plan is applied (nothing
    changes it before; a copy held through the sensitivity table was 440 MB on BERT-base), then a copy."""

    pass_: PruneFilters
    ctx: PassContext
    model: Model
    analysis: Any                          # graphopt.compress.channels.ChannelAnalysis of model
    groups: list                           # the prunable groups, in the analysis' order
    reference: Model
    data: Any                              # calibration data (the first `samples`) or None
    seed: int
    batch: int = 64
    rankings: dict[int, Ranking] = field(default_factory=dict)
    grams: dict[str, Any] = field(default_factory=dict)     # consumer node -> CrossGram (all samples)
    layers: dict[str, Any] = field(default_factory=dict)    # consumer node -> LinearLayer
    macs0: int = 0
    params0: int = 0
    sensitivity_stats: dict[str, Any] = field(default_factory=dict)
    fit_grams: dict[str, Any] | None = None                  # consumer node -> CrossGram (fitting samples)
    units: dict[int, int] = field(default_factory=dict)      # group id -> the target's channel unit

    def opt(self, key: str) -> Any:
        return self.pass_.opt(self.ctx, key)

    def measures_sensitivity(self) -> bool:
        """Whether the plan will come from a measured sensitivity table (data, a target, no ratio,
        no explicit counts, the sensitivity allocation)."""
        return (self.data is not None and float(self.opt("remove_fraction")) <= 0
                and not str(self.opt("channels")).strip() and self.opt("allocation") == "sensitivity"
                and (self.ctx.target_macs is not None or self.ctx.target_params is not None))

    def size(self, gid: int) -> int:
        return self.analysis.group(gid).size

    def keep_indices(self, keep: Mapping[int, int]) -> dict[int, np.ndarray]:
        """Kept channel indices (best ranked) of every group ``keep`` prunes; groups kept whole are left out."""
        return {gid: self.rankings[gid].kept(k) for gid, k in keep.items() if k < self.size(gid)}

    def refit_options(self) -> dict[str, Any]:
        """The reconstruction options :func:`apply_plan` takes, as this run set them."""
        return {"refit": self.opt("refit"), "refit_scope": self.opt("refit_scope"),
                "max_rows": self.opt("max_rows"), "min_ridge": self.opt("min_ridge"),
                "activation_aware": self.opt("activation_aware")}

    def trials(self, data, **measure: Any) -> TrialContext:
        """The context of the trials of blend and guard: this run's model, pruned and re-fitted on ``data``
        to each allocation tried, then measured as ``measure`` says (:class:`TrialContext`)."""
        return TrialContext(ShippedModel(self.model), data, self.ctx.input_shapes, self.opt("attention") == "heads",
                            self.seed, self.batch, self.refit_options(), **measure)

    def heldout(self):
        """``(fit, held_out)``: the last ``sensitivity_samples`` samples (at most half) held out; ``None``
        if none can be."""
        n = self.data.n_samples
        n_eval = min(int(self.opt("sensitivity_samples")), n // 2) if n > 1 else n
        fit, held = self.data.split(n_eval)
        return None if held is None else (fit, held)


@dataclass
class AllocationProblem:
    """What the allocator is asked: ``units`` (one per prunable group, keyed by group id), the ``cost`` of
    an assignment and the ``goal`` it must reach (``cost(keep) <= goal``); ``full_cost`` is the cost of
    the unpruned model in the same unit. ``relative_cost`` (the analysis' MACs/params over the targets,
    <= 1 meets them) is the cost when no polynomial fit was made."""

    units: list[budget.Unit]
    target_macs: float | None
    target_params: float | None
    cost: Callable[[Mapping[int, int]], float]
    goal: float
    full_cost: float
    fitted: bool
    relative_cost: Callable[[Mapping[int, int]], float]


@register
class PruneFilters(Pass):
    name = "prune_filters"
    summary = ("LOSSY: remove filters by channel coupling group (ThiNet/L1/BN/APoZ ranking, sensitivity-allocated "
               "to --target-macs/--target-params) and re-fit the layers after them by least squares")
    lossless = False
    options: ClassVar[dict[str, Option]] = {
        "criterion": Option("thinet", "channel ranking", str, choices=imp.CRITERIA),
        "remove_fraction": Option(0.0, "uniform fraction of channels removed from every prunable group (0: use the global "
                             "--target-macs/--target-params)", float, low=0, high=1, high_open=True),
        "multiple": Option(0, "kept channel counts are multiples of this; 0: the target CPU's unit of each group "
                              "(its NCHWc block where a conv of the group runs blocked, else its vector lanes: 8 "
                              "on AVX2, 16 on AVX-512), since counts in between cost what the next unit costs",
                           int, choices=(0, 1, 2, 4, 8, 16)),
        "channels": Option("", "explicit kept channel counts, 'group:count,...' (ids of the groups of the model "
                               "this pass sees: under the prune preset, after the lossless cleanup; a run's report "
                               "lists them); groups not named keep all their channels; replaces the ratio and "
                               "the targets' allocation", str),
        "attention": Option("head_dim", "what an attention channel is: one position of the head dim, shared by "
                                        "every head (head_dim), or a whole head: its rows of Q, K, V and columns of "
                                        "the output projection, the head count in the Reshape targets rewritten "
                                        "(heads)", str, choices=("head_dim", "heads")),
        "allocation": Option("sensitivity", "how a global target is split between groups", str,
                             choices=("sensitivity", "uniform")),
        "blend": Option(False, "choose between the sensitivity allocation and ones blended with an even-spread "
                              "prior by the held-out error of the pruned, re-fitted model", bool),
        "latency": Option("ops", "what the allocator buys with each channel removed: MACs weighted by a "
                                  "hand-set time per MAC (ops: see :func:`latency_weights`), predicted time "
                                  "(time: graphopt.measure.latency's calibrated kernel times), or MACs (macs); the MAC "
                                  "target is met either way", str,
                          choices=("macs", "ops", "time")),
        "latency_batch": Option(1, "batch size the time price (latency=time) and the step-aware price of "
                                   "near_fastest are predicted at", int, low=1),
        "near_fastest": Option(0.1, "at a MAC target, take the allocation the target CPU's step-aware price "
                                    "predicts fastest among the least-error one's neighbours whose predicted "
                                    "error is within this fraction of its own (0: off)", float, low=0),
        "near_fastest_candidates": Option(2, "how many of near_fastest's fastest neighbours are measured against "
                                             "the least-error allocation (pruned, re-fitted on one half of the "
                                             "calibration samples and judged on the other, both ways) before "
                                             "one replaces it: the fastest not worse beyond noise is taken "
                                             "(0: the prediction decides, unmeasured)", int, low=0),
        "near_fastest_check_tflop": Option(1.0, "most work near_fastest's measured check may cost, in 10^12 "
                                                "floating-point operations as estimated before it runs "
                                                "(near_check_work); above it the least-error allocation is "
                                                "kept unmeasured", float, low=0),
        "near_fastest_window": Option(0.05, "how far below the MAC target near_fastest may go, as a fraction of "
                                            "the target (0.05: a pruned model keeps 95-100% of the MACs asked "
                                            "for, issue 5's bar)", float, low=0, high=1),
        "every_group": Option(True, "every prunable group loses at least its first step when that step removes "
                                    "at most a quarter of the group (global target)", bool),
        "workers": Option(1, "processes for the sensitivity measurements: 1, the run's executor (--executor, "
                             "--workers; by default this process); another count, a local pool of that many "
                             "(0: one per core)", int, low=0),
        "refit": Option(True, "re-fit the layers after the pruned tensors by least squares (which ones: "
                              "refit_scope)", bool, moved_values=(("consumers", "prune_filters.refit_scope"),
                                                                  ("downstream", "prune_filters.refit_scope"))),
        "activation_aware": Option(True, "fit a layer followed by Relu/Clip through the activation (targets "
                                         "where the original is clipped only need the same side of the bound)", bool),
        "refit_scope": Option("downstream", "which layers to re-fit: the consumers of the pruned tensors, or "
                                            "those and every plain linear layer after them", str,
                              choices=("consumers", "downstream")),
        **calibration(samples=(512, "for statistics and re-fitting"),
                      sensitivity_samples=(256, "the last ones, at most half; the consumers are re-fitted on "
                                                "the others"),
                      levels=(8, "kept fractions per group, evenly spaced; the rest interpolated"),
                      max_rows=(65536, "fewer for layers with very many features, see "
                                       "graphopt.compress.reconstruct.layer_rows"),
                      shard_samples=(0, "the ranking's and the sensitivity's re-fit statistics")),
        "sensitivity_tmacs": Option(12.0, "most multiply-accumulates (in 10^12) the sensitivity table may spend: "
                                          "samples x evaluations x the MACs each runs (about 3 minutes on 2 cores); "
                                          "beyond it fewer samples, then fewer levels are measured and the stats "
                                          "say so (0: no limit)", float, low=0),
        **guard(guard_z=(1.0, "with --max-drop: from the held-out samples whose verdict changed; the tries are "
                              "re-fitted on the other samples; near_fastest's check takes a candidate whose "
                              "drop against the least-error allocation is <= guard_z * its standard error")),
        "sensitivity_metric": Option("rel", "sensitivity error: relative squared output error, or the KL divergence "
                                            "of the softmax of the (class-score) output", str, choices=("rel", "kl")),
        "min_ridge": Option(1e-5, "smallest re-fit ridge tried (relative to the mean diagonal of X^T X; the ridge "
                                  "pulls towards the pruned weights and is chosen by 2-fold cross-validation)", float,
                            low=0),
        "thinet_ridge": Option(1e-3, "ridge of the ThiNet selection, relative to the mean diagonal of X^T X", float,
                               low=0),
        "max_features": Option(4096, "largest consumer (features) ThiNet and the re-fit statistics take", int, low=1),
    }
    renamed: ClassVar[dict[str, str]] = {
        "sens_samples": "sensitivity_samples",
        "sens_metric": "sensitivity_metric",
        "sens_levels": "levels",
        "reconstruct": "refit",
        "ratio": "remove_fraction",  # lowrank's ratio is a fraction kept: one name, two meanings
    }

    # -----------------------------------------------------------------------------------------

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        with blas_threads(1):
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        refusal = self._no_budget(ctx)
        if refusal is not None:
            return PassResult(False, {"skipped": refusal})
        analysis = channels.analyze(model, ctx.input_shapes, heads=self.opt(ctx, "attention") == "heads")
        groups = analysis.prunable()
        left_alone = _frozen_summary(analysis)
        if not groups:
            return PassResult(False, {"pruned_groups": 0, "skipped": "no prunable group",
                                      **({"left_alone": left_alone} if left_alone else {})})
        run = self._select(model, ctx, analysis, groups)
        keep, allocation_stats = self._plan(run)
        run.grams, run.fit_grams = {}, None  # F² per consumer, hundreds of MB on ResNet-50: not needed after the plan
        keep_idx = run.keep_indices(keep)
        if not keep_idx:
            guard = allocation_stats.get("guard")
            why = ("no allocation tried was within --max-drop on the held-out samples"
                   if nothing_passed(guard) else "the budget removes no channel")
            stats = {"pruned_groups": 0, "allocation": allocation_stats, "skipped": why, "left_alone": left_alone}
            if notice := guard_notice(allocation_stats.get("guard"), ctx.max_drop, 1.0):
                stats["notice"] = notice
            return PassResult(False, stats)
        costs = _plan_costs(run, keep_idx)  # before the removal changes the analysis' model
        ctx.say(f"prune: removing channels from {len(keep_idx)} groups")
        run.reference = model.clone()   # the re-fit's targets: the model as it was before the removal
        # with --data DIR the re-fit reads every shard (the trials before it re-fitted on the head)
        stream = None if ctx.data_dir is None else ctx.data_dir.slices()
        applied = apply_plan(model, analysis, keep_idx, run.reference, run.data, seed=run.seed, batch=run.batch,
                             progress=ctx.progress, stream=stream, executor=executor_for(ctx), **run.refit_options())
        return PassResult(True, self._report(run, keep_idx, costs, applied, allocation_stats, left_alone))

    # ---- select -------------------------------------------------------------------------------

    def _no_budget(self, ctx: PassContext) -> str | None:
        """Why the pass cannot run at all (no budget, a ratio out of range), or ``None``."""
        ratio = float(self.opt(ctx, "remove_fraction"))
        explicit = str(self.opt(ctx, "channels")).strip()
        if ratio <= 0 and not explicit and ctx.target_macs is None and ctx.target_params is None:
            return ("no budget: give --target-macs, --target-params or the option prune_filters.remove_fraction or "
                    "prune_filters.channels")
        if not 0 <= ratio < 1:
            return f"ratio {ratio} is not in [0, 1)"
        return None

    def _select(self, model: Model, ctx: PassContext, analysis, groups: list) -> PruneRun:
        """The run: calibration data, an untouched reference copy, and every prunable group ranked."""
        data = ctx.data.head(min(self.opt(ctx, "samples"), ctx.data.n_samples)) if ctx.data is not None else None
        run = PruneRun(self, ctx, model, analysis, groups, model, data,
                       seed=int(ctx.rng(self.name).integers(2 ** 31)),
                       units=group_units(model.graph, groups, targets.of(ctx)))
        criterion = run.opt("criterion")
        ctx.say(f"prune: ranking {len(groups)} groups by {criterion}")
        sensitivity = run.measures_sensitivity()
        if data is not None and (criterion == "thinet" or sensitivity):
            # One pass of statistics serves the ranking (all samples) and the sensitivity's re-fits (the
            # fitting samples only: the table is measured on the held-out rest): the two parts are gathered
            # apart and merged for the ranking. Ranking on the fitting samples alone cost vgg 0.2 and
            # mobilenetv2 0.4 points at half the MACs: a Gemm consumer has one row per sample.
            split = run.heldout() if sensitivity else None
            options = {"max_rows": run.opt("max_rows"), "batch": run.batch, "max_features": run.opt("max_features"),
                       "executor": executor_for(ctx), "shard_samples": run.opt("shard_samples")}
            # With --data DIR the statistics stream every shard of it (read where each task runs), less
            # the held-out samples, which are the last of the head in memory and so of the whole set's start.
            stream = ctx.data_dir
            if split is None:
                run.grams, run.layers = consumer_grams(run.reference, groups, data if stream is None else
                                                       stream.slices(), seed=run.seed, **options)
            else:
                fit = split[0] if stream is None else stream.slices(exclude=(split[0].n_samples, data.n_samples))
                run.fit_grams, run.layers = consumer_grams(run.reference, groups, fit, seed=run.seed, **options)
                # The fitting part is only solved from now on (the sensitivity's re-fits) and the merged
                # statistics only ranked: both held in float32 (CrossGram.compact), one key at a time, so
                # at most the held-out part is float64 (BERT-base: 1.1 GB per set of F² statistics).
                for gram in run.fit_grams.values():
                    gram.compact()
                held, _ = consumer_grams(run.reference, groups, split[1], seed=run.seed + 1, **options)
                run.grams = {}
                for k in list(held):
                    run.grams[k] = run.fit_grams[k].merge(held.pop(k)).compact()
        act = activation_stats(run.reference, groups, data, run.batch) if criterion in ("mean", "apoz") else {}
        run.rankings = {g.gid: rank_group(run.reference.graph, g, criterion, run.grams, run.layers, act,
                                          run.opt("thinet_ridge"), step=self._divisor(g, run)) for g in groups}
        if run.fit_grams is not None:
            run.grams = {}  # the merged statistics served the ranking only; the sensitivity reads fit_grams
        run.macs0, run.params0 = analysis.cost({})
        return run

    # ---- plan ---------------------------------------------------------------------------------

    def _plan(self, run: PruneRun) -> tuple[dict[int, int], dict[str, Any]]:
        """Kept channel count per group (explicit, uniform ratio, or allocated to the targets) and the
        allocation's stats."""
        explicit = str(run.opt("channels")).strip()
        ratio = float(run.opt("remove_fraction"))
        if explicit:
            return self._explicit_keep(explicit, run.groups, run.analysis), {"mode": "explicit", "channels": explicit}
        if ratio > 0:
            return ({g.gid: self._uniform_keep(g, 1.0 - ratio, run) for g in run.groups},
                    {"mode": "uniform", "ratio": ratio})
        return self._allocate(run)

    @staticmethod
    def _explicit_keep(text: str, groups: list, analysis) -> dict[int, int]:
        """Parse option ``channels`` (``"3:40,7:64"``) into kept counts per group.

        Refused (:class:`~graphopt.core.errors.OptionError`): malformed text, a group that is frozen or does
        not exist, a count outside ``[min_keep, size]`` or not a multiple of the group's divisor (a
        grouped conv's group count): such a model could not be built. The option's ``multiple`` is not
        enforced: an explicit count is the user's choice."""
        prunable = {g.gid: g for g in groups}
        keep = {g.gid: g.size for g in groups}
        for item in filter(None, (t.strip() for t in text.split(","))):
            gid_text, _, count_text = item.partition(":")
            try:
                gid, count = int(gid_text), int(count_text)
            except ValueError:
                raise OptionError(f"option prune_filters.channels: {item!r} is not 'group:count'") from None
            group = prunable.get(gid)
            if group is None:
                why = "frozen" if any(g.gid == gid for g in analysis.groups) else "not a group of this model"
                raise OptionError(f"option prune_filters.channels: group {gid} is {why} "
                                  "(see graphopt inspect --groups --lossless)")
            divisor = max(group.divisor, 1)
            low = max(group.min_keep, 1)
            if not low <= count <= group.size or count % divisor:
                raise OptionError(f"option prune_filters.channels: group {gid} can keep {low}..{group.size} channels"
                                  f"{f' in multiples of {divisor}' if divisor > 1 else ''}, not {count}")
            keep[gid] = count
        return keep

    @staticmethod
    def _divisor(group, run: PruneRun) -> int:
        """Kept counts are multiples of this: the group's divisor, and its unit (option ``multiple``, else
        the target's) counted in weight rows (a head of ``D`` rows already keeps a multiple of 8 rows when
        ``D`` is one)."""
        multiple = int(run.opt("multiple")) or run.units.get(group.gid, 1)
        return _lcm(multiple // gcd(multiple, max(group.width, 1)), max(group.divisor, 1))

    def _uniform_keep(self, group, fraction: float, run: PruneRun) -> int:
        m = self._divisor(group, run)
        k = _round_down(round(group.size * fraction), m) if group.size >= m else group.size
        low = max(group.min_keep, 1)
        low = int(np.ceil(low / m) * m) if group.size >= m else low
        return int(min(max(k, low), group.size))

    def _units(self, run: PruneRun) -> list[budget.Unit]:
        """One allocator unit per group, keyed by its id; its levels are the multiples of the divisor."""
        units = []
        for g in run.groups:
            m = self._divisor(g, run)
            # Every multiple of m is a level: the allocator can then stop close to the target.
            ratios = [k / g.size for k in range(m, g.size + 1, m)] or [1.0]
            lv = budget.levels(g.size, ratios, multiple=m, min_keep=max(g.min_keep, 1))
            # every_group: the first step becomes mandatory when it is a small one (at most a quarter of
            # the group); with a coarse ``multiple`` a 16-channel group's first step is half of it.
            if run.opt("every_group") and len(lv) > 1 and lv[1] >= 0.75 * g.size:
                lv = lv[1:]
            units.append(budget.Unit(g.gid, lv))
        return units

    def _allocate(self, run: PruneRun) -> tuple[dict[int, int], dict[str, Any]]:
        """Kept counts that meet the targets with the least predicted error: errors per unit (measured
        sensitivity, or the fraction removed without data), priced by latency, allocated, optionally
        blended with an even-spread prior and relaxed by the accuracy guard."""
        problem = self._problem(run)
        if run.opt("allocation") == "uniform":
            return self._uniform_to_target(run, problem.relative_cost)
        raw_sens, mode = self._unit_errors(run, problem.units)
        sens, weights = self._latency_weighted(run, problem, raw_sens)
        price, time_stats = (self._time_price(run) if run.opt("latency") == "time"
                             and problem.target_macs is not None else (None, None))

        steps = self._step_price(run, problem)
        near: dict[float, dict[str, Any]] = {}  # target fraction -> near_fastest's stats
        at_target: list[budget.Allocation] = []  # the allocation at the target, its near-ties measured once

        def allocate_at(t: float) -> budget.Allocation:
            if t == 1.0 and at_target:
                return at_target[0]
            if price is None:
                a = budget.allocate(problem.units, sens, problem.cost, t * problem.goal)
            else:
                a = budget.allocate_priced(problem.units, sens, price, problem.cost, t * problem.goal)
            # near_fastest at the target only: the guard's relaxed tries are measured against --max-drop
            # anyway, and measuring near-ties at each would multiply its re-fits by the candidates
            if steps is None or t != 1.0:
                return a
            a, near[t] = self._near_fastest(run, problem, raw_sens, a, steps)
            at_target.append(a)
            return a

        alloc = allocate_at(1.0)
        blend_stats = None
        if run.data is not None and run.opt("blend"):
            alloc, blend_stats = self._choose_blend(run, problem, sens, alloc)
        trace, guard_off = None, None
        if run.ctx.max_drop is not None and run.data is not None and run.data.labels is not None:
            guarded = self._guard(run, allocate_at, problem.full_cost / problem.goal)
            if guarded is None:
                guard_off = "--max-drop: the first graph output is not one row of class scores per sample"
            else:
                alloc, trace = guarded
                if nothing_passed(trace):
                    # nothing tried was within the budget, not even the lightest cut (every_group keeps a
                    # first step even at "no compression"): leave every channel, as sparsify's guard does
                    alloc = budget.Allocation(keep={}, cost=problem.full_cost, predicted_error=0.0, met=False, steps=0)
        full_keep = {g.gid: g.size for g in run.groups}
        full_keep.update({gid: int(v) for gid, v in alloc.keep.items()})
        stats = _allocation_stats(run, problem, alloc, mode, raw_sens)
        if run.sensitivity_stats:
            stats["sensitivity"] = run.sensitivity_stats
        if blend_stats is not None:
            stats["blend"] = blend_stats
        if weights is not None:
            stats["latency_weights"] = {str(k): _r(v) for k, v in sorted(weights.items())}
        if time_stats is not None:
            stats["latency"] = _time_ratio(time_stats, price, problem.units, alloc)
        if 1.0 in near:
            stats["near_fastest"] = near[1.0]
        if nothing_passed(trace):
            stats["not_met"] = "no allocation tried was within --max-drop on the held-out samples: nothing pruned"
        elif not alloc.met:
            stats["not_met"] = _why_not_met(run, problem.units, alloc)
        if trace:
            stats["guard"] = trace
        if guard_off:
            stats["guard_off"] = guard_off
        return full_keep, stats

    @staticmethod
    def _near_fastest(run: PruneRun, problem: AllocationProblem, raw_sens: dict, alloc: budget.Allocation,
                      steps: Callable[[Mapping[int, int]], float]) -> tuple[budget.Allocation, dict[str, Any]]:
        """The allocation at the target: ``alloc`` (the least predicted error) or the fastest of its
        near-ties (:func:`graphopt.compress.budget.near_candidates`: predicted within ``near_fastest`` of
        its error, faster by the step-aware price, at least ``1 − near_fastest_window`` of the MACs asked
        for) that a held-out measurement finds not worse beyond noise, and the stats that say which and why.

        Measured (``near_fastest_candidates`` > 0, with data): ``alloc`` and the fastest
        ``near_fastest_candidates`` near-ties are each pruned and re-fitted on one half of the calibration
        samples and run on the other, both ways (the guard's two folds, :func:`trial_heldout`), so every
        sample is judged once by models not fitted to it; a candidate is taken when
        :class:`graphopt.compress.budget.TieCheck` says it is not worse: its pooled relative output error
        within ``(1 + near_fastest)`` of ``alloc``'s and, when the first output is class scores and the
        data has labels, its top-1 drop against ``alloc`` (paired) at most ``guard_z`` standard errors.
        The fastest such candidate wins; none, ``alloc`` stays. Without data, or at
        ``near_fastest_candidates`` = 0, the prediction decides (the fastest near-tie), and the stats say so.
        """
        found, stats = budget.near_candidates(
            problem.units, raw_sens, problem.cost, alloc, steps, tolerance=float(run.opt("near_fastest")),
            floor=(1.0 - float(run.opt("near_fastest_window"))) * problem.goal)
        n = int(run.opt("near_fastest_candidates"))
        if not found:
            return alloc, stats
        if n == 0 or run.data is None or run.data.n_samples < 2:
            why = " (no calibration samples to measure on)" if n else ""
            stats.update(price_chosen=found[0].price, moved=found[0].moved,
                         check=f"none: the prediction decides{why}")
            return found[0].allocation, stats
        picks = found[:n]
        work, limit = near_check_work(run, len(picks)), float(run.opt("near_fastest_check_tflop")) * 1e12
        stats["check_tflop"] = _r(work / 1e12)
        if work > limit:
            # Unmeasured, the prediction is not trusted (it cost inception 0.45 points): keep the least error.
            stats["chosen"] = (f"least error: measuring {len(picks)} faster near-ties would cost about "
                               f"{work / 1e12:.3g} TFLOP of re-fits (near_fastest_check_tflop = {limit / 1e12:g})")
            return alloc, stats
        tolerance, z = float(run.opt("near_fastest")), float(run.opt("guard_z"))
        first, second = run.data.split(run.data.n_samples // 2)
        folds = [(fit, held, _outputs(run.reference, held, run.batch))
                 for fit, held in ((first, second), (second, first))]
        trials = run.trials(run.data, folds=folds)
        run.ctx.say(f"prune: measuring the least-error allocation and {len(picks)} faster near-ties")
        measured = executor_for(run.ctx).map(trial_heldout, [run.keep_indices(a.keep) for a in
                                                             (alloc, *(c.allocation for c in picks))], context=trials)
        (base_error, base_correct), rest = measured[0], measured[1:]
        stats["check"] = ("measured: re-fitted on one half of the calibration samples, judged on the other, "
                          "both ways")
        # unweighted, as the candidates' (the allocator's own error is divided by the latency weights)
        base_predicted = budget.predicted_error(problem.units, raw_sens, alloc.keep)
        stats["least_error"] = {"predicted_error": _r(base_predicted), "price": _r(stats["price"]),
                                "heldout_rel_error": _r(base_error)}
        rows, chosen = [], None
        for c, (error, correct) in zip(picks, rest):
            drop = (None if base_correct is None or correct is None
                    else budget.HeldOutDrop.of(base_correct, correct, z))
            check = budget.TieCheck(error, base_error, tolerance, drop)
            rows.append({"moved": c.moved, "predicted_error": _r(c.allocation.predicted_error), "price": _r(c.price),
                         "macs_ratio": _r(c.allocation.cost / problem.full_cost), **check.fields()})
            if chosen is None and check.ok:
                chosen = c
        stats["candidates"] = rows
        if chosen is None:
            stats["chosen"] = "least error: no faster near-tie was within its measured error and verdicts"
            return alloc, stats
        stats.update(price_chosen=chosen.price, moved=chosen.moved,
                     chosen="the fastest near-tie not worse beyond noise on the held-out samples")
        return chosen.allocation, stats

    def _problem(self, run: PruneRun) -> AllocationProblem:
        """The units, the cost (a polynomial fit of the analysis when one target is set and the fit is
        exact, else the analysis over the targets) and the goal."""
        units = self._units(run)
        tm, tp = self._targets(run.ctx, run.macs0, run.params0)
        poly = None
        if run.opt("allocation") != "uniform" and (tm is None) != (tp is None):
            which = 0 if tm is not None else 1
            poly = polynomial_cost(run.groups, lambda keep: float(run.analysis.cost(keep)[which]))
        target = (tm * run.macs0) if tm is not None else (tp * run.params0) if tp is not None else 0.0
        analysis, macs0, params0 = run.analysis, run.macs0, run.params0

        def relative_cost(keep: Mapping[int, int]) -> float:
            macs, params = analysis.cost(dict(keep))
            parts = []
            if tm is not None:
                parts.append(macs / (tm * macs0))
            if tp is not None:
                parts.append(params / (tp * params0))
            return max(parts)

        if poly is not None:
            return AllocationProblem(units, tm, tp, poly, target, macs0 if tm is not None else params0, True,
                                     relative_cost)
        return AllocationProblem(units, tm, tp, relative_cost, 1.0, max(1.0 / t for t in (tm, tp) if t is not None),
                                 False, relative_cost)

    def _unit_errors(self, run: PruneRun, units: list[budget.Unit]) -> tuple[dict[int, dict[int, float]], str]:
        """``{gid: {level: error}}`` and how it was obtained: the measured sensitivity, or without data the
        fraction of channels removed."""
        if run.data is None:
            return ({u.key: {k: 1.0 - k / u.levels[0] for k in u.levels} for u in units},
                    "no data: error proxy = fraction removed")
        return self._sensitivity(run, units), "sensitivity"

    @staticmethod
    def _latency_weighted(run: PruneRun, problem: AllocationProblem, sens: dict) -> tuple[dict, dict | None]:
        """With ``latency=ops`` and a MAC target, each group's errors divided by its time-per-MAC weight:
        the greedy's price (error per MAC saved) becomes error per estimated time saved while its budget
        stays in MACs. A params target buys params: no weights."""
        if run.opt("latency") != "ops" or problem.target_macs is None:
            return sens, None
        weights = latency_weights(run.model, run.groups, run.ctx.input_shapes, small_output(targets.of(run.ctx)))
        return {u.key: {k: e / weights[u.key] for k, e in sens[u.key].items()} for u in problem.units}, weights

    @staticmethod
    def _step_price(run: PruneRun, problem: AllocationProblem) -> Callable[[Mapping[int, int]], float] | None:
        """The price ``near_fastest`` compares neighbours by: the target's predicted time of the nodes the
        groups touch at ``latency_batch``, with its steps (channels padded to whole blocks, blocked dense
        convs charged by whole filter sets); MACs with that geometry on an uncalibrated target. ``None``
        when off: no MAC target, a params target too (params are what it buys), or ``near_fastest`` 0."""
        if (problem.target_macs is None or problem.target_params is not None
                or float(run.opt("near_fastest")) <= 0):
            return None
        analysis, model = run.analysis, targets.of(run.ctx).latency
        batch = int(run.opt("latency_batch"))

        def price(keep: Mapping[int, int]) -> float:
            return analysis.time(dict(keep), model, batch, steps=True)
        return price

    def _time_price(self, run: PruneRun):
        """The allocator's price: predicted seconds (:mod:`graphopt.measure.latency`) of the nodes the groups
        touch at ``latency_batch``, as a polynomial of the kept fractions (or the analysis itself when
        it does not fit one), and what the stats say about it."""
        analysis = run.analysis
        target = targets.of(run.ctx)
        model = target.latency
        batch = int(run.opt("latency_batch"))
        poly = polynomial_cost(run.groups, lambda keep: analysis.time(keep, model, batch))
        if poly is None:
            def poly(keep: Mapping[int, int]) -> float:
                return analysis.time(dict(keep), model, batch)
        whole, _ = lat.model_time(analysis.model, model, batch=batch,  # None when a shape is unknown
                                  input_shapes=run.ctx.input_shapes)
        if not target.calibrated:  # the uncalibrated target's model counts MACs, not seconds
            return poly, {"price": f"MACs with {target.name}'s block geometry (uncalibrated)", "batch": batch,
                          "profile": target.profile_line(), "whole": whole}
        return poly, {"price": "predicted time", "batch": batch, "profile": target.profile_line(),
                      "whole": whole}

    @staticmethod
    def _targets(ctx, macs0: int, params0: int) -> tuple[float | None, float | None]:
        """The targets as fractions of *this* model's cost. Under the ``prune`` preset the fractions the
        user gave are of the pipeline's input model (``ctx.baseline``): a cleanup that ran first (BN
        folding) already removed a few percent of the MACs, which must not be counted twice."""
        base = ctx.baseline
        tm, tp = ctx.target_macs, ctx.target_params
        if base is not None:
            if tm is not None and base[0] and macs0:
                tm = min(tm * base[0] / macs0, 1.0)
            if tp is not None and base[1] and params0:
                tp = min(tp * base[1] / params0, 1.0)
        return tm, tp

    def _uniform_to_target(self, run: PruneRun, cost) -> tuple[dict[int, int], dict[str, Any]]:
        """The smallest uniform ratio (bisection, every group the same fraction) that meets the target."""
        def keep_at(r: float) -> dict[int, int]:
            return {g.gid: self._uniform_keep(g, 1.0 - r, run) for g in run.groups}

        def c(r: float) -> float:
            return cost(keep_at(r))

        lo, hi = 0.0, 1.0
        if c(hi) > 1.0:
            keep = keep_at(hi)
            return keep, {"mode": "uniform", "met": False, "ratio": 1.0,
                          "not_met": "the prunable groups cannot reach the target"}
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if c(mid) <= 1.0 else (mid, hi)
        return keep_at(hi), {"mode": "uniform", "met": True, "ratio": _r(hi)}

    def _sensitivity(self, run: PruneRun, units: list[budget.Unit]) -> dict[int, dict[int, float]]:
        """``{gid: {level: error}}``: a few levels per group measured (module docstring), the rest
        interpolated, relative to the unit's first level (the allocator takes it as error 0)."""
        proto, weights = gort.structure(run.reference)   # the weights by reference: no copy of the model
        starts = group_starts(proto.graph, run.groups)
        node_macs = segments.node_macs(run.reference, proto, run.ctx.input_shapes)
        before = np.concatenate([[0.0], np.cumsum(node_macs)])
        suffix = {gid: float(before[-1] - before[p]) for gid, p in starts.items()}
        # Held-out measurement: the consumers are re-fitted on the first samples (fit_grams) and the error
        # is measured on the last ones. Measured on the fitting samples, a Gemm consumer with about as many
        # features as samples fits them almost perfectly, and its group looks far less sensitive than it is.
        split = run.heldout()
        sdata = split[1] if split is not None else run.data
        n_levels, n_samples, table = self._table_size(run, units, suffix, sdata.n_samples)
        if n_samples < sdata.n_samples:
            sdata = sdata.head(n_samples)
        items_units = self._items(run, units, n_levels)
        grams = run.fit_grams if run.fit_grams is not None else run.grams
        context, run.sensitivity_stats = sensitivity_context(
            run.reference, run.groups, {gid: r.order for gid, r in run.rankings.items()}, grams, run.layers,
            sdata, {u.key: len(u.levels) - 1 for u in items_units}, metric=run.opt("sensitivity_metric"),
            input_shapes=run.ctx.input_shapes, heads=run.opt("attention") == "heads",
            proto=proto, starts=starts, node_macs=node_macs, weights=weights)
        run.sensitivity_stats["table"] = table
        run.ctx.say(f"prune: sensitivity of {len(units)} groups")
        workers = int(run.opt("workers"))
        executor = executor_for(run.ctx) if workers == 1 else make_executor(workers)
        measured = budget.sensitivity(items_units, measure_level, executor=executor, context=context)
        return {u.key: _interpolated(measured[u.key], u.levels) for u in units}

    def _items(self, run: PruneRun, units: list[budget.Unit], n_levels: int) -> list[budget.Unit]:
        """The levels measured per unit at ``n_levels`` evenly spaced fractions. The allocator's level 0
        may already be pruned (every_group): they start from the full size, which
        :func:`graphopt.compress.budget.sensitivity` takes as error 0 without evaluating it."""
        measured = [budget.Unit(u.key, self._measured_levels(u, run.size(u.key), n_levels)) for u in units]
        return [budget.Unit(u.key, sorted({run.size(u.key), *u.levels}, reverse=True)) for u in measured]

    def _table_size(self, run: PruneRun, units: list[budget.Unit], suffix: Mapping[int, float],
                    n_samples: int) -> tuple[int, int, dict[str, Any]]:
        """``(levels, samples, stats)`` for the sensitivity table within option ``sensitivity_tmacs``.

        The table's work is ``samples · Σ_g evaluations_g · MACs_g`` (``MACs_g``: one sample through the
        nodes from the group's first node on, the part its evaluations run). Over the budget, fewer samples
        are measured first (down to 16: each still yields a whole output), then fewer levels (down to 4,
        interpolated between), then fewer samples (down to 8); what was measured is in the stats."""
        @cache
        def per_sample(n_levels: int) -> float:
            return sum((len(u.levels) - 1) * suffix.get(u.key, 0.0) for u in self._items(run, units, n_levels))

        return budget.table_size(per_sample, max(int(run.opt("levels")), 1), n_samples,
                                 float(run.opt("sensitivity_tmacs")) * 1e12, min_levels=4)

    @staticmethod
    def _measured_levels(unit: budget.Unit, size: int, n_levels: int) -> list[int]:
        """The levels of ``unit`` nearest to ``n_levels`` evenly spaced fractions of ``size``, plus its first
        and last, descending."""
        pick = []
        n_levels = max(int(n_levels), 1)
        for r in np.linspace(1.0, 1.0 / n_levels, n_levels) if n_levels > 1 else [1.0, 0.5]:
            target = r * size
            k = min(unit.levels, key=lambda lv: abs(lv - target))
            if k not in pick:
                pick.append(k)
        return sorted(set(pick) | {unit.levels[0], unit.levels[-1]}, reverse=True)

    def _choose_blend(self, run: PruneRun, problem: AllocationProblem, sens: dict,
                      alloc: budget.Allocation) -> tuple[budget.Allocation, list[dict] | None]:
        """Allocations from ``(1 − α)·sens/S + α·u/U`` for α in (0, 0.5, 1), ``u(k) = (1 − k/size)²`` a
        prior that spreads the pruning evenly (``S``, ``U``: totals at the deepest levels); each is
        pruned and re-fitted on the first calibration samples and measured (relative output error) on
        the last ``sensitivity_samples`` (held out); the best is returned. The additive sensitivity model
        ignores how errors compound and how well later layers compensate; this measures it."""
        split = run.heldout()
        if split is None:
            return alloc, None
        fit_data, hold = split
        candidates = _blend_candidates(run, problem, sens, alloc)
        if len(candidates) < 2:
            return alloc, None
        trials = run.trials(fit_data, hold=hold, ref_out=_outputs(run.reference, hold, run.batch))
        run.ctx.say(f"prune: measuring {len(candidates)} allocations blended with the prior")
        errors = executor_for(run.ctx).map(trial_error, [run.keep_indices(a.keep) for _, a in candidates],
                                           context=trials)
        trace = [{"prior_weight": alpha, "heldout_rel_error": _r(error), "predicted_error": _r(a.predicted_error)}
                 for (alpha, a), error in zip(candidates, errors)]
        best = min(range(len(candidates)), key=lambda i: (trace[i]["heldout_rel_error"], i))
        trace[best]["chosen"] = True
        return candidates[best][1], trace

    @staticmethod
    def _guard(run: PruneRun, allocate_at: Callable[[float], budget.Allocation],
               full: float) -> tuple[budget.Allocation, list[dict]] | None:
        """:func:`graphopt.compress.budget.guarded` with each try judged on samples it was not fitted to:
        two-fold cross-validation over the calibration samples (re-fitted on one half, judged on the other,
        and the other way round), every sample judged once; accepted when ``drop + guard_z · SE <=
        --max-drop`` (:class:`graphopt.compress.budget.HeldOutDrop`). The tries go through the run's
        executor, several at once when it has several workers (the result is the same). With a single
        sample, fit and judge share it. ``None`` (no guard) when the first graph output is not class
        scores: there are no top-1 verdicts to count."""
        executor = executor_for(run.ctx)
        first, second = run.data.split(run.data.n_samples // 2)
        halves = [(first, second), (second, first)] if second is not None else [(run.data, run.data)]
        folds = []
        for fit, held in halves:
            reference = top1_correct(run.model, held, run.batch)
            if reference is None:
                return None
            folds.append((fit, held, reference))
        trials = run.trials(run.data, folds=folds, z=run.opt("guard_z"))

        def measure_all(allocs: list[budget.Allocation]) -> list[float]:
            return executor.map(trial_drop, [run.keep_indices(a.keep) for a in allocs], context=trials)

        return budget.guarded(allocate_at, lambda a: measure_all([a])[0], run.ctx.max_drop, 1.0, full=full,
                              measure_all=measure_all, width=executor.workers)

    # ---- report -------------------------------------------------------------------------------

    @staticmethod
    def _report(run: PruneRun, keep_idx: dict[int, np.ndarray], costs: dict[str, Any], applied: dict[str, Any],
                allocation_stats: dict[str, Any], left_alone: list) -> dict[str, Any]:
        """The pass stats: per group what it kept and what that cost, the totals, the allocation and
        what the removal and re-fit did."""
        macs0, macs1 = run.macs0, costs["macs"]
        stats: dict[str, Any] = {
            "pruned_groups": len(keep_idx), "prunable_groups": len(run.groups),
            "groups": [_group_report(run, g, keep_idx, costs["saved"][g.gid], applied) for g in run.groups],
            "macs_before": int(macs0), "macs_after": int(macs1), "macs_ratio": _r(macs1 / macs0) if macs0 else None,
            "params_before": int(run.params0), "params_after": int(costs["params"]),
            "channel_units": _unit_stats(run), "allocation": allocation_stats, **applied,
        }
        if left_alone:
            stats["left_alone"] = left_alone
        if notice := guard_notice(allocation_stats.get("guard"), run.ctx.max_drop, stats["macs_ratio"]):
            stats["notice"] = notice
            allocation_stats.setdefault("not_met", notice)   # why the target asked for was not reached
        return stats


# =============================================================================================
# the steps' helpers


def _why_not_met(run: PruneRun, units: Sequence[budget.Unit], alloc: budget.Allocation) -> str:
    """Why the allocation stops above the target: every prunable group at its smallest level, which is
    one of the target CPU's channel units when counts move in them (a count below a unit costs a whole
    one there), or the rest of the model frozen."""
    if units and all(alloc.keep.get(u.key) == u.levels[-1] for u in units):
        keys = {u.key for u in units}
        steps = sorted({v for k, v in run.units.items() if k in keys})
        if not int(run.opt("multiple")) and steps and max(steps) > 1:
            cpu = targets.of(run.ctx).name
            return (f"every prunable group is down to one channel unit of {cpu} ({'/'.join(map(str, steps))} "
                    f"channels: a count below it costs the whole unit there); prune_filters.multiple="
                    f"{max(steps) // 2} allows fewer, at that price")
        return "every prunable group is at its smallest kept count (the rest of the model is frozen)"
    return "the prunable groups cannot reach the target (the rest of the model is frozen)"


def _unit_stats(run: PruneRun) -> dict[str, Any]:
    """The steps kept counts moved in: the target's unit per group, or the fixed ``multiple``."""
    multiple = int(run.opt("multiple"))
    if multiple:
        return {"multiple": multiple}
    return {"target_cpu": targets.of(run.ctx).name, "per_group": {str(k): v for k, v in sorted(run.units.items())}}


def _interpolated(measured: Mapping[int, float], levels: list[int]) -> dict[int, float]:
    """The errors at ``levels``, interpolated linearly between the measured levels and made relative to
    the first level (the allocator takes it as error 0; noise below it is clamped to 0)."""
    ks = np.array(sorted(measured))
    vs = np.array([measured[k] for k in ks])
    errors = {k: float(np.interp(k, ks, vs)) for k in levels}
    base = errors[levels[0]]
    return {k: max(v - base, 0.0) for k, v in errors.items()}


def _blend_candidates(run: PruneRun, problem: AllocationProblem, sens: dict,
                      alloc: budget.Allocation) -> list[tuple[float, budget.Allocation]]:
    """The distinct allocations that meet the goal at prior weights α = 0 (``alloc`` itself), ½ and 1."""
    units = problem.units
    total_s = sum(max(sens[u.key].values()) for u in units) or 1.0
    prior = {u.key: {k: (1.0 - k / max(run.size(u.key), 1)) ** 2 for k in u.levels} for u in units}
    total_u = sum(max(prior[u.key].values()) for u in units) or 1.0
    candidates: list[tuple[float, budget.Allocation]] = []
    seen = set()
    for alpha in (0.0, 0.5, 1.0):
        mixed = {u.key: {k: (1 - alpha) * sens[u.key][k] / total_s + alpha * prior[u.key][k] / total_u
                         for k in u.levels} for u in units}
        a = alloc if alpha == 0.0 else budget.allocate(units, mixed, problem.cost, problem.goal)
        signature = tuple(sorted(a.keep.items()))
        if a.met and signature not in seen:
            seen.add(signature)
            candidates.append((alpha, a))
    return candidates


def _allocation_stats(run: PruneRun, problem: AllocationProblem, alloc: budget.Allocation, mode: str,
                      raw_sens: dict) -> dict[str, Any]:
    """What the allocation reached: met or not, its predicted error (unweighted) and the cost ratios."""
    macs, params = run.analysis.cost({gid: int(v) for gid, v in alloc.keep.items()})
    macs0, params0 = run.macs0, run.params0
    return {"mode": mode, "met": bool(alloc.met), "steps": alloc.steps,
            "cost_model": "polynomial fit of the channel analysis" if problem.fitted else "channel analysis",
            "predicted_error": _r(budget.predicted_error(problem.units, raw_sens, alloc.keep)) if alloc.keep else 0.0,
            "target_macs": problem.target_macs, "target_params": problem.target_params,
            "macs_ratio": _r(macs / macs0) if macs0 else None,
            "params_ratio": _r(params / params0) if params0 else None}


def _time_ratio(time_stats: dict[str, Any], price, units: list[budget.Unit], alloc: budget.Allocation) -> dict:
    """The time price's stats with the predicted time ratio of ``alloc`` in place of the whole model's time."""
    whole = time_stats.pop("whole")
    saved = price({u.key: u.levels[0] for u in units}) - price(alloc.keep)
    time_stats["predicted_time_ratio"] = _r(1.0 - saved / whole) if whole else None
    return time_stats


def _plan_costs(run: PruneRun, keep_idx: dict[int, np.ndarray]) -> dict[str, Any]:
    """MACs and params after the plan, and the MACs each group's cut alone saves."""
    analysis = run.analysis
    macs1, params1 = analysis.cost({gid: len(idx) for gid, idx in keep_idx.items()})
    saved = {g.gid: int(run.macs0 - analysis.cost({g.gid: len(keep_idx[g.gid])})[0]) if g.gid in keep_idx else 0
             for g in run.groups}
    return {"macs": macs1, "params": params1, "saved": saved}


def _group_report(run: PruneRun, g, keep_idx: dict[int, np.ndarray], macs_saved: int,
                  applied: dict[str, Any]) -> dict[str, Any]:
    """One group's line of the stats: channels before/after, which were kept, its ranking, the MACs its
    cut saves and its consumers' relative output error before/after the re-fit."""
    k = len(keep_idx[g.gid]) if g.gid in keep_idx else g.size
    r = run.rankings[g.gid]
    row = {"group": g.gid, "channels_before": g.size, "channels_after": k,
           "kept": [int(i) for i in keep_idx[g.gid]] if g.gid in keep_idx else "all",
           "members": len(g.members), "producers": sorted({p.node for p in g.producers}),
           "scores": r.summary(),
           "macs_saved": macs_saved}
    if r.predicted is not None and k < g.size:
        row["thinet_predicted_rel_error"] = _r(r.predicted[g.size - k - 1])
    if r.notes:
        row["notes"] = r.notes
    consumers = {c.node for c in g.consumers}
    refits = [{key: f[key] for key in ("node", "rel_error_before", "rel_error_after") if key in f}
              for f in applied.get("refit", []) if f["node"] in consumers]
    if refits:
        row["consumer_error"] = refits
    return row


def nothing_passed(trace: list[dict] | None) -> bool:
    """The guard tried allocations and none was within ``--max-drop``."""
    return bool(trace) and not any(t["ok"] for t in trace)


def guard_notice(trace: list[dict] | None, max_drop: float | None, macs_ratio: float | None) -> str | None:
    """One line for the console when the ``--max-drop`` guard relaxed the target: the run asked for
    more compression than it got, and the user should see why without opening the report."""
    if not trace or trace[0]["ok"]:
        return None
    where = f"; the model keeps {macs_ratio:.2f} of the MACs" if macs_ratio is not None else ""
    if nothing_passed(trace):
        return (f"--max-drop {max_drop:g}: no allocation tried was within the budget on the held-out "
                f"calibration samples{where}")
    first = trace[0]
    margin = f", {first['upper']:.2f} with its margin" if "upper" in first and first["upper"] != first["drop"] else ""
    return (f"--max-drop {max_drop:g}: at the target the held-out calibration samples lost {first['drop']:.2f} "
            f"points{margin} (re-fitted on the others), so the target was relaxed{where}")


def _outputs(model: Model, data, batch: int) -> dict[str, np.ndarray]:
    return reference_outputs(model, data, batch_size=batch)


def _frozen_summary(analysis) -> list[dict[str, Any]]:
    """The frozen groups in the ledger's form: reason, count, a few group ids."""
    left = LeftAlone(examples=5)
    for g in analysis.groups:
        if g.frozen:
            left.add(f"group frozen: {g.frozen}", g.gid)
    return left.to_list()


def _r(v: Any) -> Any:
    v = float(v)
    return float(f"{v:.6g}") if np.isfinite(v) else None
