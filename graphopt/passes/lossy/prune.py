"""Filter pruning (LOSSY): remove channels by coupling group, then re-fit the layers that read them.

Steps
-----
1. **Groups.** :func:`graphopt.compress.channels.analyze` splits the channel dimensions of the model into
   coupling groups; frozen groups (an op the analysis cannot follow, graph inputs/outputs) are left
   alone and listed in ``left_alone`` with the op that froze them.
2. **Ranking.** Each prunable group's channels are ranked by a criterion of
   :mod:`graphopt.compress.importance` (option ``criterion``: ``thinet`` (default), ``l1``, ``l2``, ``bn``,
   ``mean``, ``apoz``). ThiNet ranks by the least-squares error of the group's consumers and needs the
   ``XᵀX``/``XᵀY`` of each consumer on the calibration data (one pass over the original model); a group
   whose consumers are not plain linear layers falls back to ``l1``. Keeping ``k`` channels keeps the
   ``k`` best ranked (nested sets).
3. **Budget.** Kept channel counts are multiples of option ``multiple`` (default 8: onnxruntime's
   NCHWc conv kernels work in blocks of 8 channels on AVX2; measured on the zoo at half the MACs,
   arbitrary counts made most models *slower* (0.57x–1.14x) while multiples of 8 gave 1.5x–2.5x; a group
   smaller than the multiple is not pruned). Option ``ratio`` > 0 removes that fraction of every
   prunable group; option ``channels`` (``"3:40,7:64"``) sets kept counts by hand (group ids of the
   model this pass sees — under the ``prune`` preset the lossless cleanup runs first and may merge
   layers, so take them from a run's report or from ``graphopt inspect --groups --lossless``). Otherwise ``--target-macs`` / ``--target-params`` are met by
   :func:`graphopt.compress.budget.allocate`: each group is a unit whose levels are the kept counts that are
   multiples of ``multiple`` (and of the group's divisor); its *sensitivity* at ``sens_levels`` evenly
   spaced kept fractions is measured on ``sens_samples`` calibration samples through
   :mod:`graphopt.measure.executor` (option ``workers``): the model with only that group pruned to that level
   and its consumers re-fitted from the original statistics; error = relative squared error of the
   outputs (:func:`graphopt.measure.executor.relative_error`); levels in between are interpolated linearly.
   The greedy allocator then removes, step by step, the channels that cost the least error per unit
   saved, until the target is met. What a unit is (option ``latency``): ``ops`` (default) — MACs,
   each group's errors divided by a hand-set time-per-MAC weight (:func:`latency_weights`); ``time`` —
   predicted seconds of the nodes the groups touch (:mod:`graphopt.measure.latency`, calibrated per-kernel
   times, at ``latency_batch``), with the time budget chosen by bisection so that the MACs meet the
   target (:func:`graphopt.compress.budget.allocate_priced`); ``macs`` — plain MACs. A params target always buys
   params. ``time`` is the principled one, but measured at batch 64 on the zoo (BENCHMARKS.md) it was
   not better overall: mobilenetv2 1.61x (ops 1.57x) but inception 1.56x (ops 1.63x) and shufflenet
   1.52x; the calibrated model still misses onnxruntime's layout reorders, so ``ops`` stays the default. The MACs/params of a plan come from
   :meth:`ChannelAnalysis.cost`, fitted once to a polynomial (:class:`graphopt.compress.budget.PolynomialCost`,
   checked against the analysis) so the thousands of allocator calls are cheap. The additive error
   model ignores how errors compound and how well the re-fit of later layers compensates, so (option
   ``blend``) allocations that mix the measured errors with an even-spread prior
   (``(1 − α)·sens + α·(1 − k/size)²``, normalised, α ∈ {0, ½, 1}) are each pruned, re-fitted on the
   first calibration samples and measured on the held-out last ones; the best is kept. With option
   ``every_group`` (default) each prunable group loses at least its first step when that step is small
   (at most a quarter of the group). Option
   ``allocation=uniform`` instead bisects one common ratio for all groups. With ``--max-drop`` and
   labels in the data, :func:`graphopt.compress.budget.guarded` relaxes the target until the accuracy drop on
   the calibration data is within the budget. The re-fit saw those samples, which flatters the
   result. But calibration images usually come from the training set, where the original model is
   more accurate, so the drop there is usually overstated: resnet lost 1.95 points on its calibration
   samples where the evaluation set lost 0.90, and the guard stopped at 0.68 MACs.
   Targets are fractions of the pipeline's input model (``ctx.baseline``, recorded by the pass manager), not of
   the model after the cleanup that runs first.
4. **Removal.** :func:`graphopt.compress.shrink.apply` slices every producer/consumer parameter and fixes shape
   constants; surviving values keep their names.
5. **Reconstruction** (option ``reconstruct``): :mod:`graphopt.compress.reconstruct` re-fits, one after the
   other in topological order, every plain linear layer whose input changed (option ``refit``:
   ``consumers`` = only the layers reading a pruned tensor; ``downstream`` (default) = those and every
   plain linear layer after them, the final classifier included), inputs from the pruned model, targets
   from the original at the same value name, ridge towards the pruned weights chosen by
   cross-validation; the bias absorbs the mean of the removed channels. A layer followed by
   ``Relu``/``Clip`` is fitted through the activation (option ``activation_aware``). Layers that are
   not plain (depthwise convs...) are not re-fitted (listed under ``not_refitted``); the next plain one
   downstream compensates.

Refused (model unchanged, reason in the stats): no budget; no prunable group; a target the prunable
groups cannot reach is reported as ``met: false`` with the cost reached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from math import gcd
from typing import Any, ClassVar

import numpy as np

from graphopt.compress import importance as imp
from graphopt.core.ir import Model
from graphopt.core.manager import (
    Option,
    Pass,
    PassContext,
    PassResult,
    register,
)
from graphopt.core.onnx_io import from_proto, to_proto

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
    from graphopt.compress.lstsq import LinearLayer
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
                   max_features: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``XᵀX``/``XᵀY`` of every plain linear consumer of ``groups`` on the (unpruned) ``model``."""
    from graphopt.compress.lstsq import collect
    names = sorted({c.node for g in groups for c in g.consumers})
    layers = {k: v for k, v in _layers_of(model.graph, names).items() if v.features <= max_features}
    if not layers or data is None:
        return {}, layers
    return collect(model, layers, data, max_rows=max_rows, seed=seed, batch_size=batch), layers


def rank_group(graph, group, criterion: str, grams: dict, layers: dict, act_stats: dict,
               ridge: float) -> Ranking:
    """Order the channels of ``group`` by ``criterion`` (falling back to ``l1``, then to index order)."""
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
            res = imp.thinet(problems, group.size, ridge=ridge, min_keep=1)
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
    from graphopt.measure.calibration import Calibrator, ChannelStats
    wanted = sorted({(v, a) for g in groups for v, a, _ in imp.activation_members(g)})
    if not wanted or data is None:
        return {}
    stats = {key: ChannelStats(axis=key[1]) for key in wanted}
    for b in Calibrator(model, data, batch).run(sorted({v for v, _ in wanted})):
        for (v, a), st in stats.items():
            st.update(b[v])
    return stats


# =============================================================================================
# removal + reconstruction


def layer_out_keep(analysis, graph, keep_idx: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Node name -> original output channels it keeps, for linear layers whose output is pruned."""
    from graphopt.compress.lstsq import LinearLayer
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
               reconstruct: bool, refit_scope: str, max_rows: int, seed: int, batch: int,
               min_ridge: float = 1e-5, activation_aware: bool = True, progress=None) -> dict[str, Any]:
    """Shrink ``model`` (mutated) to ``keep_idx`` and re-fit; returns the shrink and re-fit stats."""
    from graphopt.compress import reconstruct as rec
    from graphopt.compress.channels import shrink
    from graphopt.compress.lstsq import LinearLayer

    graph = model.graph
    out_keep = layer_out_keep(analysis, graph, keep_idx)
    consumers = {c.node for gid in keep_idx for c in analysis.group(gid).consumers}
    # Layers sliced along a pruned group that are not one linear map (depthwise / grouped convs): they
    # keep their sliced weights, and the next plain layer downstream is re-fitted instead.
    by_name = {n.name: n for n in graph.nodes}
    sliced = {p.node for gid in keep_idx for p in analysis.group(gid).producers} | consumers
    not_plain = {}
    for name in sorted(sliced):
        node = by_name.get(name)
        if node is not None and node.op_type in ("Conv", "Gemm", "MatMul"):
            why = LinearLayer.of(graph, node)
            if isinstance(why, str):
                not_plain[name] = why
    stats: dict[str, Any] = {"shrink": shrink.apply(model, analysis, keep_idx)}
    if not_plain:
        stats["not_refitted"] = {"reason": "not a plain conv/gemm/matmul: its weights are only sliced; the next "
                                           "plain layer downstream is re-fitted and compensates",
                                 "nodes": not_plain}
    if not reconstruct or data is None:
        return stats
    if refit_scope == "downstream":
        nodes = rec.linear_nodes_from(graph, consumers)
    else:
        nodes = [n for n in graph.toposort() if n.name in consumers]
    targets = [rec.RefitTarget(n.name, out_keep.get(n.name)) for n in nodes]
    ridges = [r for r in rec.RIDGES if r >= min_ridge] or [min_ridge]
    usage: dict[str, int] = {}
    stats["refit"] = rec.refit(model, reference, targets, data, max_rows=max_rows, seed=seed, batch_size=batch,
                               ridges=ridges, activation_aware=activation_aware, progress=progress, usage=usage)
    stats["refit_target_bytes"] = usage
    return stats


# =============================================================================================
# sensitivity (runs in executor workers: module-level, picklable)


@dataclass
class SensitivityContext:
    """What a worker needs to measure one (group, level): the model, data and per-group plans."""

    ev: Any                                # graphopt.measure.executor.EvalContext (model bytes + data)
    orders: dict[int, np.ndarray]          # gid -> removal order
    refits: dict[int, list]                # gid -> [(node, CrossGram, blocks)]
    ridge: float = 1e-3
    metric: str = "rel"                    # "rel": relative squared output error; "kl": softmax KL


def measure_level(ctx: SensitivityContext, item: tuple[str, int]) -> float:
    """Relative output error of the model with only group ``item[0]`` kept at ``item[1]`` channels."""
    from graphopt.compress import channels
    from graphopt.compress.channels import shrink
    from graphopt.compress.lstsq import LinearLayer

    key, k = item
    gid = int(key.split(":")[1])
    model = from_proto(ctx.ev.fresh_proto())
    analysis = channels.analyze(model)
    order = ctx.orders[gid]
    kept = np.sort(order[len(order) - int(k):])
    dropped = np.sort(order[:len(order) - int(k)])
    refit_plan = []
    for node, gram, blocks in ctx.refits.get(gid, []):
        removed_cols = np.concatenate([blocks[c] for c in dropped]) if len(dropped) else np.zeros(0, np.int64)
        cols = np.setdiff1d(np.arange(gram.features), removed_cols)
        refit_plan.append((node, gram.solve(ctx.ridge, cols)))
    shrink.apply(model, analysis, {gid: kept})
    by_name = {n.name: n for n in model.graph.nodes}
    for node, (w, b) in refit_plan:
        layer = LinearLayer.of(model.graph, by_name[node])
        if not isinstance(layer, str) and layer.weight_matrix().shape == w.shape:
            layer.set_weights(model.graph, w, b)
    outputs = ctx.ev.run(model=model)
    if ctx.metric == "kl":
        return kl_error(ctx.ev.reference(), outputs)
    return float(ctx.ev.error(outputs))


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
    from graphopt.compress import budget

    full = {f"group:{g.gid}": g.size for g in groups}
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
        cost.add(linear, f"group:{g.gid}")
        if q:
            cost.add(q, f"group:{g.gid}", f"group:{g.gid}")
        constant -= linear + q
    for (a_, c_), b in pair.items():
        cost.add(b, f"group:{a_}", f"group:{c_}")
        constant -= b
    cost.add(constant)
    rng = np.random.default_rng(0)
    for _ in range(4):  # the fit must reproduce the analysis exactly, else do not use it
        keep = {g.gid: int(rng.integers(1, g.size + 1)) for g in groups}
        want = f(keep)
        got = cost({f"group:{k}": v for k, v in keep.items()})
        if abs(got - want) > 1e-6 * max(abs(want), 1.0):
            return None
    return cost


#: Time saved per MAC saved by onnxruntime's CPU conv kernels (NCHWc, AVX2, 1 thread), relative to a
#: large dense conv, from per-node profiles of the original and pruned zoo models at batch 64: a dense
#: conv with at most two output blocks of 8 channels has a large fixed part (inception's 5x5 convs,
#: 16 -> 8 output channels: MACs / 2, time x0.88), so removing its output channels buys little time.
#: Depthwise convs take ~0.20 ns/MAC against ~0.03-0.04 for dense ones, but weighting them x5 moved
#: mobilenetv2's channels from the residual streams to the expand groups for no measured speed-up and
#: 0.6 points of accuracy, so they count as dense.
SMALL_OUTPUT_WEIGHT = 0.3
SMALL_OUTPUT = 16


def _node_weight(node, cout: int, produces: bool) -> float:
    """Marginal time-per-MAC weight of one node for a group it produces (``produces``) or reads."""
    if node.op_type == "Conv" and produces and cout <= SMALL_OUTPUT:
        return SMALL_OUTPUT_WEIGHT
    return 1.0


def latency_weights(model: Model, groups: list) -> dict[int, float]:
    """Estimated time saved per MAC saved by pruning each group: ``w_g = Σ_n ρ_n MACs_n / Σ_n MACs_n``.

    ``n`` runs over the group's producers and consumers (the nodes whose MACs shrink with it) and
    ``ρ_n`` is :func:`_node_weight` at the original channel counts (a node producing the group counts
    as a producer); a group whose nodes have no MACs gets 1. First order: pruning a fraction of the
    group's channels removes that fraction of each node's MACs, so the time saved per MAC saved is
    ``w_g`` (in units of a large dense conv's time per MAC).
    """
    from graphopt.measure import analysis as ana

    per = {n.name: n for n in ana.analyze(model).per_node}
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
                rho = _node_weight(node, int(shape[0]), name in produced)
            num += rho * cost.macs
            den += cost.macs
        out[g.gid] = num / den if den else 1.0
    return out


def _round_down(k: float, multiple: int) -> int:
    return int(np.floor(k / multiple) * multiple)


def _lcm(a: int, b: int) -> int:
    return a * b // gcd(a, b)


@register
class PruneFilters(Pass):
    name = "prune_filters"
    summary = ("LOSSY: remove filters by channel coupling group (ThiNet/L1/BN/APoZ ranking, sensitivity-allocated "
               "to --target-macs/--target-params) and re-fit the layers after them by least squares")
    lossless = False
    options: ClassVar[dict[str, Option]] = {
        "criterion": Option("thinet", "channel ranking", str, choices=imp.CRITERIA),
        "ratio": Option(0.0, "uniform fraction of channels removed from every prunable group (0: use the global "
                             "--target-macs/--target-params)", float, low=0, high=1, high_open=True),
        "multiple": Option(8, "kept channel counts are multiples of this (8: onnxruntime's CPU conv kernels work in "
                              "blocks of 8 channels; other counts ran slower than the unpruned model)", int,
                           choices=(1, 2, 4, 8, 16)),
        "channels": Option("", "explicit kept channel counts, 'group:count,...' (ids of the groups of the model "
                               "this pass sees: under the prune preset, after the lossless cleanup; a run's report "
                               "lists them); groups not named keep all their channels; replaces the ratio and "
                               "the targets' allocation", str),
        "allocation": Option("sensitivity", "how a global target is split between groups", str,
                             choices=("sensitivity", "uniform")),
        "blend": Option(False, "choose between the sensitivity allocation and ones blended with an even-spread "
                              "prior by the held-out error of the pruned, re-fitted model", bool),
        "latency": Option("ops", "what the allocator buys with each channel removed: MACs weighted by a "
                                  "hand-set time per MAC (ops: see :func:`latency_weights`), predicted time "
                                  "(time: graphopt.measure.latency's calibrated kernel times), or MACs (macs); the MAC "
                                  "target is met either way", str,
                          choices=("macs", "ops", "time")),
        "latency_batch": Option(1, "batch size the time price (latency=time) is predicted at", int, low=1),
        "every_group": Option(True, "every prunable group loses at least its first step when that step removes "
                                    "at most a quarter of the group (global target)", bool),
        "workers": Option(1, "processes for the sensitivity measurements (1: in this process)", int, low=0),
        "reconstruct": Option(True, "re-fit the layers after the pruned tensors by least squares", bool),
        "activation_aware": Option(True, "fit a layer followed by Relu/Clip through the activation (targets "
                                         "where the original is clipped only need the same side of the bound)", bool),
        "refit": Option("downstream", "which layers to re-fit", str, choices=("consumers", "downstream")),
        "samples": Option(512, "calibration samples used for statistics and re-fitting", int, low=1),
        "sens_samples": Option(256, "calibration samples the sensitivity is measured on (the last ones, at most "
                                    "half; the consumers are re-fitted on the others)", int, low=1),
        "sens_metric": Option("rel", "sensitivity error: relative squared output error, or the KL divergence "
                                     "of the softmax of the (class-score) output", str, choices=("rel", "kl")),
        "sens_levels": Option(8, "kept fractions measured per group (evenly spaced; the rest interpolated)", int,
                              low=1),
        "max_rows": Option(65536, "least-squares rows sampled per layer (fewer for layers with very many "
                                  "features, see graphopt.compress.reconstruct.layer_rows)", int, low=1),
        "min_ridge": Option(1e-5, "smallest re-fit ridge tried (relative to the mean diagonal of X^T X; the ridge "
                                  "pulls towards the pruned weights and is chosen by 2-fold cross-validation)", float,
                            low=0),
        "thinet_ridge": Option(1e-3, "ridge of the ThiNet selection, relative to the mean diagonal of X^T X", float,
                               low=0),
        "max_features": Option(4096, "largest consumer (features) ThiNet and the re-fit statistics take", int, low=1),
    }

    # -----------------------------------------------------------------------------------------

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        from graphopt.compress.reconstruct import blas_threads
        with blas_threads(1):
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        from graphopt.compress import channels

        ratio = float(self.opt(ctx, "ratio"))
        explicit = str(self.opt(ctx, "channels")).strip()
        if ratio <= 0 and not explicit and ctx.target_macs is None and ctx.target_params is None:
            return PassResult(False, {"skipped": "no budget: give --target-macs, --target-params or the option "
                                                 "prune_filters.ratio or prune_filters.channels"})
        if not 0 <= ratio < 1:
            return PassResult(False, {"skipped": f"ratio {ratio} is not in [0, 1)"})
        analysis = channels.analyze(model)
        groups = analysis.prunable()
        left_alone = _frozen_summary(analysis)
        if not groups:
            stats = {"pruned_groups": 0, "skipped": "no prunable group"}
            if left_alone:
                stats["left_alone"] = left_alone
            return PassResult(False, stats)

        batch = 64
        data = ctx.data.head(min(self.opt(ctx, "samples"), ctx.data.n_samples)) if ctx.data is not None else None
        seed = int(ctx.rng(self.name).integers(2 ** 31))
        reference = from_proto(to_proto(model))
        criterion = self.opt(ctx, "criterion")
        ctx.say(f"prune: ranking {len(groups)} groups by {criterion}")
        grams, layers = ({}, {})
        if data is not None and (criterion == "thinet" or (ratio <= 0 and self.opt(ctx, "allocation") == "sensitivity")):
            # The sensitivity measurement fits its own statistics on the non-held-out samples: statistics
            # of all samples are only needed by ThiNet or when nothing can be held out.
            full = criterion == "thinet" or self._heldout(data, ctx) is None
            grams, layers = consumer_grams(reference, groups, data if full else None,
                                           max_rows=self.opt(ctx, "max_rows"), seed=seed, batch=batch,
                                           max_features=self.opt(ctx, "max_features"))
        act = activation_stats(reference, groups, data, batch) if criterion in ("mean", "apoz") else {}
        rankings = {g.gid: rank_group(reference.graph, g, criterion, grams, layers, act,
                                      self.opt(ctx, "thinet_ridge")) for g in groups}
        macs0, params0 = analysis.cost({})

        # ---- budget
        allocation_stats: dict[str, Any]
        if explicit:
            keep = self._explicit_keep(explicit, groups, analysis)
            allocation_stats = {"mode": "explicit", "channels": explicit}
        elif ratio > 0:
            keep = {g.gid: self._uniform_keep(g, 1.0 - ratio, ctx) for g in groups}
            allocation_stats = {"mode": "uniform", "ratio": ratio}
        else:
            keep, allocation_stats = self._allocate(model, analysis, groups, rankings, grams, layers, data, ctx,
                                                    reference, macs0, params0, batch, seed)
        keep_idx = {gid: rankings[gid].kept(k) for gid, k in keep.items() if k < analysis.group(gid).size}
        if not keep_idx:
            stats = {"pruned_groups": 0, "allocation": allocation_stats,
                     "skipped": "the budget removes no channel", "left_alone": left_alone}
            if notice := guard_notice(allocation_stats.get("guard"), ctx.max_drop, 1.0):
                stats["notice"] = notice
            return PassResult(False, stats)

        # ---- removal + reconstruction
        macs1, params1 = analysis.cost({gid: len(idx) for gid, idx in keep_idx.items()})
        saved = {g.gid: int(macs0 - analysis.cost({g.gid: len(keep_idx[g.gid])})[0]) if g.gid in keep_idx else 0
                 for g in groups}
        ctx.say(f"prune: removing channels from {len(keep_idx)} groups")
        applied = apply_plan(model, analysis, keep_idx, reference, data, seed=seed, batch=batch,
                             progress=ctx.progress, **self._refit_options(ctx))
        per_group = []
        for g in groups:
            k = len(keep_idx[g.gid]) if g.gid in keep_idx else g.size
            r = rankings[g.gid]
            rec = {"group": g.gid, "channels_before": g.size, "channels_after": k,
                   "kept": [int(i) for i in keep_idx[g.gid]] if g.gid in keep_idx else "all",
                   "members": len(g.members), "producers": sorted({p.node for p in g.producers}),
                   "scores": r.summary(),
                   "macs_saved": saved[g.gid]}
            if r.predicted is not None and k < g.size:
                rec["thinet_predicted_rel_error"] = _r(r.predicted[g.size - k - 1])
            if r.notes:
                rec["notes"] = r.notes
            consumers = {c.node for c in g.consumers}
            refits = [{k: f[k] for k in ("node", "rel_error_before", "rel_error_after") if k in f}
                      for f in applied.get("refit", []) if f["node"] in consumers]
            if refits:
                rec["consumer_error"] = refits  # relative output error of its consumers before/after the re-fit
            per_group.append(rec)
        stats: dict[str, Any] = {
            "pruned_groups": len(keep_idx), "prunable_groups": len(groups), "groups": per_group,
            "macs_before": int(macs0), "macs_after": int(macs1), "macs_ratio": _r(macs1 / macs0) if macs0 else None,
            "params_before": int(params0), "params_after": int(params1),
            "allocation": allocation_stats, **applied,
        }
        if left_alone:
            stats["left_alone"] = left_alone
        if notice := guard_notice(allocation_stats.get("guard"), ctx.max_drop, stats["macs_ratio"]):
            stats["notice"] = notice
        return PassResult(True, stats)

    # -----------------------------------------------------------------------------------------

    def _refit_options(self, ctx) -> dict[str, Any]:
        """The reconstruction options :func:`apply_plan` takes, as this run set them."""
        return {"reconstruct": self.opt(ctx, "reconstruct"), "refit_scope": self.opt(ctx, "refit"),
                "max_rows": self.opt(ctx, "max_rows"), "min_ridge": self.opt(ctx, "min_ridge"),
                "activation_aware": self.opt(ctx, "activation_aware")}

    @staticmethod
    def _explicit_keep(text: str, groups: list, analysis) -> dict[int, int]:
        """Parse option ``channels`` (``"3:40,7:64"``) into kept counts per group.

        Refused (:class:`~graphopt.core.errors.OptionError`): malformed text, a group that is frozen or does
        not exist, a count outside ``[min_keep, size]`` or not a multiple of the group's divisor (a
        grouped conv's group count): such a model could not be built. The option's ``multiple`` is not
        enforced: an explicit count is the user's choice."""
        from graphopt.core.errors import OptionError

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

    def _divisor(self, group, ctx) -> int:
        return _lcm(int(self.opt(ctx, "multiple")), max(group.divisor, 1))

    def _uniform_keep(self, group, fraction: float, ctx) -> int:
        m = self._divisor(group, ctx)
        k = _round_down(round(group.size * fraction), m) if group.size >= m else group.size
        low = max(group.min_keep, 1)
        low = int(np.ceil(low / m) * m) if group.size >= m else low
        return int(min(max(k, low), group.size))

    def _units(self, groups, ctx):
        from graphopt.compress import budget
        units = []
        for g in groups:
            m = self._divisor(g, ctx)
            # Every multiple of m is a level: the allocator can then stop close to the target.
            ratios = [k / g.size for k in range(m, g.size + 1, m)] or [1.0]
            lv = budget.levels(g.size, ratios, multiple=m, min_keep=max(g.min_keep, 1))
            # every_group: the first step becomes mandatory when it is a small one (at most a quarter of
            # the group); with a coarse ``multiple`` a 16-channel group's first step is half of it.
            if self.opt(ctx, "every_group") and len(lv) > 1 and lv[1] >= 0.75 * g.size:
                lv = lv[1:]
            units.append(budget.Unit(f"group:{g.gid}", lv))
        return units

    def _allocate(self, model, analysis, groups, rankings, grams, layers, data, ctx, reference, macs0, params0,
                  batch, seed) -> tuple[dict[int, int], dict[str, Any]]:
        from graphopt.compress import budget

        units = self._units(groups, ctx)
        tm, tp = self._targets(ctx, macs0, params0)
        mode = self.opt(ctx, "allocation")
        poly = None
        if mode != "uniform" and (tm is None) != (tp is None):
            which = 0 if tm is not None else 1
            poly = polynomial_cost(groups, lambda keep: float(analysis.cost(keep)[which]))
        target = (tm * macs0) if tm is not None else (tp * params0) if tp is not None else 0.0

        def slow_cost(keep: dict[str, int]) -> float:
            macs, params = analysis.cost({int(k.split(":")[1]): v for k, v in keep.items()})
            parts = []
            if tm is not None:
                parts.append(macs / (tm * macs0))
            if tp is not None:
                parts.append(params / (tp * params0))
            return max(parts)

        if poly is not None:
            cost, goal, full_cost = poly, target, (macs0 if tm is not None else params0)
        else:
            cost, goal, full_cost = slow_cost, 1.0, max(1.0 / t for t in (tm, tp) if t is not None)

        if mode == "uniform":
            return self._uniform_to_target(groups, analysis, ctx, slow_cost)
        if data is None:
            sens = {u.key: {k: 1.0 - k / u.levels[0] for k in u.levels} for u in units}
            note = "no data: error proxy = fraction removed"
        else:
            sens = self._sensitivity(units, groups, rankings, grams, layers, data, ctx, reference)
            note = "sensitivity"
        weights, raw_sens = None, sens
        if self.opt(ctx, "latency") == "ops" and tm is not None:
            # Dividing a group's errors by its time-per-MAC weight makes the greedy's price (error per MAC
            # saved) error per estimated time saved, while its budget stays in MACs. (A params target
            # buys params: no weights.)
            weights = latency_weights(model, groups)
            sens = {u.key: {k: e / weights[int(u.key.split(":")[1])] for k, e in sens[u.key].items()}
                    for u in units}
        price, time_stats = None, None
        if self.opt(ctx, "latency") == "time" and tm is not None:
            price, time_stats = self._time_price(analysis, groups, ctx)

        def allocate_at(t: float) -> budget.Allocation:
            if price is None:
                return budget.allocate(units, sens, cost, t * goal)
            return budget.allocate_priced(units, sens, price, cost, t * goal)

        alloc = allocate_at(1.0)
        blend_stats = None
        if data is not None and self.opt(ctx, "blend"):
            alloc, blend_stats = self._choose_blend(model, units, groups, sens, cost, goal, rankings, reference,
                                                    data, ctx, batch, seed, alloc)
        trace = None
        if ctx.max_drop is not None and data is not None and data.labels is not None:
            def measure_drop(a) -> float:
                return self._measure_drop(model, analysis, rankings, a, reference, data, ctx, batch, seed)

            alloc, trace = budget.guarded(allocate_at, measure_drop, ctx.max_drop, 1.0, full=full_cost / goal)
        keep = {int(k.split(":")[1]): int(v) for k, v in alloc.keep.items()}
        full_keep = {g.gid: g.size for g in groups}
        full_keep.update(keep)
        macs, params = analysis.cost(keep)
        out = {"mode": note, "met": bool(alloc.met), "steps": alloc.steps,
               "cost_model": "polynomial fit of the channel analysis" if poly is not None else "channel analysis",
               "predicted_error": _r(budget.predicted_error(units, raw_sens, alloc.keep)),
               "target_macs": tm, "target_params": tp,
               "macs_ratio": _r(macs / macs0) if macs0 else None,
               "params_ratio": _r(params / params0) if params0 else None}
        if blend_stats is not None:
            out["blend"] = blend_stats
        if weights is not None:
            out["latency_weights"] = {str(k): _r(v) for k, v in sorted(weights.items())}
        if time_stats is not None:
            whole = time_stats.pop("whole_seconds")
            saved = price({u.key: u.levels[0] for u in units}) - price(alloc.keep)
            time_stats["predicted_time_ratio"] = _r(1.0 - saved / whole) if whole else None
            out["latency"] = time_stats
        if not alloc.met:
            out["not_met"] = "the prunable groups cannot reach the target (the rest of the model is frozen)"
        if trace:
            out["guard"] = trace
        return full_keep, out

    def _time_price(self, analysis, groups, ctx):
        """The allocator's price: predicted seconds (:mod:`graphopt.measure.latency`) of the nodes the groups
        touch at ``latency_batch``, as a polynomial of the kept fractions (or the analysis itself when
        it does not fit one), and what the stats say about it."""
        from graphopt.measure import latency as lat

        model = lat.load()
        batch = int(self.opt(ctx, "latency_batch"))
        poly = polynomial_cost(groups, lambda keep: analysis.time(keep, model, batch))
        if poly is None:
            def poly(keep: dict[str, int]) -> float:
                return analysis.time({int(k.split(":")[1]): v for k, v in keep.items()}, model, batch)
        whole, _ = lat.model_time(analysis.model, model, batch=batch)  # None when a shape is unknown
        return poly, {"price": "predicted time", "batch": batch, "profile": model.meta.get("cpu", "?"),
                      "whole_seconds": whole}

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

    def _uniform_to_target(self, groups, analysis, ctx, cost) -> tuple[dict[int, int], dict[str, Any]]:
        """The smallest uniform ratio (bisection, every group the same fraction) that meets the target."""
        def keep_at(r: float) -> dict[int, int]:
            return {g.gid: self._uniform_keep(g, 1.0 - r, ctx) for g in groups}

        def c(r: float) -> float:
            return cost({f"group:{gid}": k for gid, k in keep_at(r).items()})

        lo, hi = 0.0, 1.0
        if c(hi) > 1.0:
            keep = keep_at(hi)
            return keep, {"mode": "uniform", "met": False, "ratio": 1.0,
                          "not_met": "the prunable groups cannot reach the target"}
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if c(mid) <= 1.0 else (mid, hi)
        return keep_at(hi), {"mode": "uniform", "met": True, "ratio": _r(hi)}

    def _heldout(self, data, ctx):
        """``(fit, held_out)``: the last ``sens_samples`` samples (at most half) held out; ``None`` if none can be."""
        n = data.n_samples
        n_eval = min(int(self.opt(ctx, "sens_samples")), n // 2) if n > 1 else n
        fit, held = data.split(n_eval)
        return None if held is None else (fit, held)

    def _sensitivity(self, units, groups, rankings, grams, layers, data, ctx, reference) -> dict[str, dict[int, float]]:
        from graphopt.compress import budget
        from graphopt.measure.executor import EvalContext, make_executor

        by_gid = {g.gid: g for g in groups}
        measured_units = []
        for u in units:
            size = by_gid[int(u.key.split(":")[1])].size
            # Measure a few levels (at fixed fractions of the full size), interpolate the rest.
            pick = []
            n_levels = max(int(self.opt(ctx, "sens_levels")), 1)
            for r in np.linspace(1.0, 1.0 / n_levels, n_levels) if n_levels > 1 else [1.0, 0.5]:
                target = r * size
                k = min(u.levels, key=lambda lv: abs(lv - target))
                if k not in pick:
                    pick.append(k)
            pick = sorted(set(pick) | {u.levels[0], u.levels[-1]}, reverse=True)
            measured_units.append(budget.Unit(u.key, pick))
        # Held-out measurement: the consumers are re-fitted on the first samples and the error is
        # measured on the last ones. Measured on the fitting samples, a Gemm consumer with about as
        # many features as samples fits them almost perfectly, and its group looks far less sensitive
        # than it is (the MobileNetV2 head conv was cut to a quarter that way).
        split = self._heldout(data, ctx)
        if split is not None:
            fit_data, sdata = split
            grams, _ = consumer_grams(reference, groups, fit_data, max_rows=self.opt(ctx, "max_rows"),
                                      seed=int(ctx.rng(self.name + ".sensitivity").integers(2 ** 31)), batch=64,
                                      max_features=self.opt(ctx, "max_features"))
        else:
            sdata = data
        refits: dict[int, list] = {}
        for g in groups:
            plans = []
            for c in g.consumers:
                if c.node in grams and c.node in layers:
                    plans.append((c.node, grams[c.node], consumer_blocks(layers[c.node], c)))
            refits[g.gid] = plans
        ev = EvalContext(to_proto(reference).SerializeToString(), sdata, batch_size=256)
        context = SensitivityContext(ev, {gid: r.order for gid, r in rankings.items()}, refits,
                                     metric=self.opt(ctx, "sens_metric"))
        ctx.say(f"prune: sensitivity of {len(units)} groups")
        executor = make_executor(self.opt(ctx, "workers"))
        # The allocator's level 0 may already be pruned (every_group): measure from the full size, which
        # budget.sensitivity takes as error 0 without evaluating it.
        items_units = [budget.Unit(u.key, sorted({by_gid[int(u.key.split(':')[1])].size, *u.levels}, reverse=True))
                       for u in measured_units]
        measured = budget.sensitivity(items_units, measure_level, executor=executor, context=context)
        sens: dict[str, dict[int, float]] = {}
        for u in units:
            m = measured[u.key]
            ks = np.array(sorted(m))
            vs = np.array([m[k] for k in ks])
            sens[u.key] = {k: float(np.interp(k, ks, vs)) for k in u.levels}
            base = sens[u.key][u.levels[0]]
            # The allocator takes level 0 as error 0: errors are relative to the unit's first level.
            sens[u.key] = {k: max(v - base, 0.0) for k, v in sens[u.key].items()}
        return sens

    def _choose_blend(self, model, units, groups, sens, cost, goal, rankings, reference, data, ctx, batch, seed,
                      alloc):
        """Allocations from ``(1 − α)·sens/S + α·u/U`` for α in (0, 0.5, 1), ``u(k) = (1 − k/size)²`` a
        prior that spreads the pruning evenly (``S``, ``U``: totals at the deepest levels); each is
        pruned and re-fitted on the first calibration samples and measured (relative output error) on
        the last ``sens_samples`` (held out); the best is returned. The additive sensitivity model
        ignores how errors compound and how well later layers compensate; this measures it."""
        from graphopt.compress import budget, channels
        from graphopt.measure.executor import relative_error

        split = self._heldout(data, ctx)
        if split is None:
            return alloc, None
        fit_data, hold = split
        total_s = sum(max(sens[u.key].values()) for u in units) or 1.0
        prior = {u.key: {k: (1.0 - k / max(by_size, 1)) ** 2 for k in u.levels}
                 for u in units for by_size in [next(g.size for g in groups if f"group:{g.gid}" == u.key)]}
        total_u = sum(max(prior[u.key].values()) for u in units) or 1.0
        candidates: list[tuple[float, Any]] = []
        seen = set()
        for alpha in (0.0, 0.5, 1.0):
            mixed = {u.key: {k: (1 - alpha) * sens[u.key][k] / total_s + alpha * prior[u.key][k] / total_u
                             for k in u.levels} for u in units}
            a = alloc if alpha == 0.0 else budget.allocate(units, mixed, cost, goal)
            signature = tuple(sorted(a.keep.items()))
            if a.met and signature not in seen:
                seen.add(signature)
                candidates.append((alpha, a))
        if len(candidates) < 2:
            return alloc, None
        ref_out = _outputs(reference, hold, batch)
        trace = []
        for alpha, a in candidates:
            ctx.say(f"prune: measuring the allocation with prior weight {alpha}")
            trial = from_proto(to_proto(model))
            keep_idx = {int(k.split(":")[1]): rankings[int(k.split(":")[1])].kept(v) for k, v in a.keep.items()
                        if v < next(g.size for g in groups if f"group:{g.gid}" == k)}
            if keep_idx:
                apply_plan(trial, channels.analyze(trial), keep_idx, reference, fit_data, seed=seed, batch=batch,
                           **self._refit_options(ctx))
            trace.append({"prior_weight": alpha, "heldout_rel_error": _r(relative_error(ref_out,
                                                                                        _outputs(trial, hold, batch))),
                          "predicted_error": _r(a.predicted_error)})
        best = min(range(len(candidates)), key=lambda i: (trace[i]["heldout_rel_error"], i))
        trace[best]["chosen"] = True
        return candidates[best][1], trace

    def _measure_drop(self, model, analysis, rankings, alloc, reference, data, ctx, batch, seed) -> float:
        from graphopt.measure.verify import Tolerance, verify
        trial = from_proto(to_proto(model))
        keep_idx = {int(k.split(":")[1]): rankings[int(k.split(":")[1])].kept(v) for k, v in alloc.keep.items()
                    if v < analysis.group(int(k.split(":")[1])).size}
        if keep_idx:
            from graphopt.compress import channels
            trial_analysis = channels.analyze(trial)  # same model, same group ids; shrink needs its own
            apply_plan(trial, trial_analysis, keep_idx, reference, data, seed=seed, batch=batch,
                       **self._refit_options(ctx))
        report = verify(reference, trial, data, mode="accuracy", tolerance=Tolerance(max_drop=100.0), batch_size=batch)
        return float(report.accuracy_drop) if report.accuracy_drop is not None else float("inf")


def guard_notice(trace: list[dict] | None, max_drop: float | None, macs_ratio: float | None) -> str | None:
    """One line for the console when the ``--max-drop`` guard relaxed the target: the run asked for
    more compression than it got, and the user should see why without opening the report."""
    if not trace or trace[0]["ok"]:
        return None
    where = f"; the model keeps {macs_ratio:.2f} of the MACs" if macs_ratio is not None else ""
    if not any(t["ok"] for t in trace):
        return (f"--max-drop {max_drop:g}: no allocation tried was within the budget on the calibration "
                f"samples{where}")
    return (f"--max-drop {max_drop:g}: at the target the calibration samples lost {trace[0]['drop']:.2f} points "
            f"(the guard re-fits and measures on them), so the target was relaxed{where}")


def _outputs(model: Model, data, batch: int) -> dict[str, np.ndarray]:
    from graphopt.measure.calibration import reference_outputs
    return reference_outputs(to_proto(model), data, batch_size=batch)


def _frozen_summary(analysis) -> list[dict[str, Any]]:
    reasons: dict[str, list[int]] = {}
    for g in analysis.groups:
        if g.frozen:
            reasons.setdefault(str(g.frozen), []).append(g.gid)
    return [{"reason": f"group frozen: {r}", "count": len(ids), "examples": ids[:5]}
            for r, ids in sorted(reasons.items(), key=lambda kv: -len(kv[1]))]


def _r(v: Any) -> Any:
    v = float(v)
    return float(f"{v:.6g}") if np.isfinite(v) else None
