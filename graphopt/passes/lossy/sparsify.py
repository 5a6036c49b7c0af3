"""Unstructured pruning after training (LOSSY): magnitude pruning, OBS/SparseGPT masks, splicing, re-fit.

The layer problem
-----------------
A Conv (2-D, group 1) / Gemm / MatMul with a constant weight computes ``y = x W + b`` per output position
(:class:`graphopt.compress.lstsq.LinearLayer`). Layers are processed in topological order. For each layer the rows
``X`` are read from the model *as pruned so far* and the targets ``Y`` from the *original* model, so a
layer also compensates the error of the layers pruned before it. With ``H = XᵀX`` and ``G = XᵀY`` (a
bias column appended to ``X``, :class:`graphopt.compress.lstsq.CrossGram`) the pass minimises, per output ``o``,

    L(w_o) = ‖X w_o − y_o‖² + λ ‖w_o − w0_o‖²    subject to  w_o[f] = 0 outside the support S_o,

a ridge pulled towards the *original* weights ``w0`` rather than towards zero: with fewer calibration
samples than inputs ``H`` is singular, and a plain least-squares fit
throws away every component of ``w0`` the calibration inputs do not excite, which unseen inputs do.
``λ = ridge · mean(diag H)``; the bias is not penalised. With ``H_λ = H + λI`` and ``R = G + λ W0``,
``L(w) = wᵀH_λw − 2 Rᵀw + c``, minimised on a support by ``w_S = (H_λ)_SS⁻¹ R_S`` (the re-fit).
With ``ridge_grid`` the ridge is chosen per layer: each candidate is fitted on the calibration samples
minus a held-out fraction (``holdout``) and the one with the smallest relative output error on the
held-out samples wins; the final fit then uses every sample.

Choosing the supports (option ``method``)
-----------------------------------------
``magnitude``
    Han et al. 2015: keep the largest ``|w0|`` of the layer (option ``scope=layer``) or of all layers
    under one threshold (``scope=global``; each layer's density is then what the threshold leaves).
``obs``
    SparseGPT (Frantar & Alistarh 2023), the sequential Optimal Brain Surgeon: start from the dense
    optimum ``W* = H_λ⁻¹ R``; walk the input columns in blocks; in each block prune the entries with
    the smallest ``w²/[H_λ⁻¹]_qq²`` (over the whole block, so rows get different densities) and push
    each pruned weight's error onto the columns not yet visited through the Cholesky factor of
    ``H_λ⁻¹``. Only the mask is kept: the re-fit below gives the exact optimum of each support.
    With ``downstream`` the score of output ``o`` is scaled by ``Σ_j W_next[o, j]²`` (how strongly the
    next layer reads it), so weakly-read outputs are pruned harder (off by default: no measurable gain).

Splicing (Dynamic Network Surgery, Guo et al. 2016, after training)
--------------------------------------------------------------------
DNS keeps pruned weights alive and splices back the ones that turn out important. Here, per output,
given the support ``S`` and its optimum ``w_S``: removing ``q ∈ S`` costs exactly ``w_q² / [(H_λ)_SS⁻¹]_qq``
and adding ``p ∉ S`` gains exactly ``(R_p − H_pS w_S)² / (H_pp − H_pS (H_λ)_SS⁻¹ H_Sp)``. Each round swaps the
best additions for the cheapest removals (while gain > cost), re-fits, and keeps the swap only if the
loss ``−Rᵀw`` fell; ``splice_rounds`` rounds. The density of each output is unchanged by splicing.

The accuracy guard (options ``guard``, ``max_drop``, ``guard_z``, ``guard_holdout``, ``guard_steps``)
-----------------------------------------------------------------------------------------------
A density tuned for one model can cost another model many points of accuracy. When the
calibration data has labels and the first graph output is ``[N, classes]`` scores, the pass is on by
default: the budget is the run's ``--max-drop`` or, without one, the option ``max_drop`` (1.0 point,
the verifier's default). The last ``guard_holdout`` fraction of the samples is held out: every try is
fitted on the other samples only, and its top-1 accuracy drop ``d`` is measured on the held-out ones.
One held-out sample is ``100 / n`` points, so the drop alone is too noisy a verdict. A try passes when
``d + guard_z · SE ≤ max_drop`` with the paired standard error ``SE = 100 · sqrt(c) / n`` (``c`` = held-out
samples whose verdict changed, ``n`` = held-out samples): the fewer verdicts a try changes, the more
its measured drop can be trusted. ``guard_z = 2`` (one-sided ~98 %; ``guard_z = 1`` let drops through
that the evaluation samples showed over budget). Few held-out samples accept few changed verdicts: more
labelled calibration samples let the guard prune further. Each layer's density moves towards dense along
``d(t) = d + t (1 − d)``, ``t = 0`` being the requested densities: ``t = 0`` is tried first (as configured);
if it fails, ``t`` is bisected on ``(0, 1)`` for ``guard_steps`` tries (without splicing: at these
densities it makes the search many times slower for no difference the held-out samples see), and the
sparsest try that passes is kept (the model measured is the model returned, not a re-fit on all
samples). If no try passes, the model is left unchanged. ``stats["guard"]["trace"]`` lists every try.
With ``--target-params`` (and no ``density`` option) the starting density is that fraction.

Refused (with the reason in ``left_alone``): layers that :class:`LinearLayer` refuses (grouped convs,
non-constant weights, ``transA``...), layers with fewer than ``min_weights`` weights, a weight read by
another node, no calibration data (nothing is done).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.compress.budget import HeldOutDrop
from graphopt.compress.lstsq import CrossGram, LinearLayer, collect, column_quadratic, penalised
from graphopt.compress.options import calibration, guard
from graphopt.core.ir import Model
from graphopt.core.ledger import LeftAlone
from graphopt.core.manager import Option, Pass, PassContext, PassResult, register
from graphopt.core.ops import LAYER_OPS
from graphopt.measure.calibration import SampleData
from graphopt.measure.verify import top1_correct

# =============================================================================================
# the math, on H [F+1, F+1] (bias last), R [F+1, O], W [F+1, O]


def refit(h: np.ndarray, r: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per output ``o``: ``w_S = H_SS⁻¹ R_S`` on ``S = mask[:, o]`` (the bias row always in); zeros elsewhere."""
    f1, o = r.shape
    w = np.zeros((f1, o))
    mask = mask.copy()
    mask[-1] = True
    for j in range(o):
        s = np.flatnonzero(mask[:, j])
        w[s, j] = _solve(h[np.ix_(s, s)], r[s, j])
    return w


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


def loss(h: np.ndarray, r: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per-output ``wᵀHw − 2Rᵀw`` (the penalised loss up to a constant)."""
    return column_quadratic(h, w) - 2 * (r * w).sum(axis=0)


def magnitude_mask(w: np.ndarray, keep: int) -> np.ndarray:
    """The ``keep`` largest ``|w|`` of the whole matrix (ties broken by position)."""
    flat = np.abs(w).ravel()
    mask = np.zeros(flat.size, dtype=bool)
    if keep > 0:
        mask[np.argsort(-flat, kind="stable")[:keep]] = True
    return mask.reshape(w.shape)


def sparsegpt_mask(h: np.ndarray, r: np.ndarray, keep: int, block: int = 128,
                   row_weight: np.ndarray | None = None) -> np.ndarray:
    """SparseGPT's adaptive mask for ``[F, O]`` weights keeping ``keep`` entries (see the module docstring).

    ``row_weight`` (``[O]``) scales the cost of an error in each output, e.g. by how strongly the next
    layer reads it, so weakly-read outputs are pruned harder.
    """
    f1, o = r.shape
    f = f1 - 1
    w = _solve(h, r).T.copy()                         # [O, F+1], rows = outputs
    hinv = np.linalg.inv(h)
    hinv = (hinv + hinv.T) / 2
    try:
        u = np.linalg.cholesky(hinv).T                # upper: H⁻¹ = UᵀU
    except np.linalg.LinAlgError:
        u = np.linalg.cholesky(hinv + 1e-8 * np.mean(np.diagonal(hinv)) * np.eye(f1)).T
    mask = np.zeros((o, f1), dtype=bool)             # True = kept
    mask[:, f] = True
    fraction = 1.0 - keep / float(f * o)
    pruned_so_far = 0
    for i1 in range(0, f, block):
        i2 = min(i1 + block, f)
        d = np.diagonal(u)[i1:i2]
        w1 = w[:, i1:i2]
        score = w1 ** 2 / d[None, :] ** 2
        if row_weight is not None:
            score = score * row_weight[:, None]
        # prune this block's share, keeping the running total on target
        target = int(round(fraction * o * i2)) - pruned_so_far
        target = min(max(target, 0), score.size)
        drop = np.zeros(score.size, dtype=bool)
        if target:
            drop[np.argsort(score.ravel(), kind="stable")[:target]] = True
        drop = drop.reshape(score.shape)
        pruned_so_far += target
        mask[:, i1:i2] = ~drop
        err = np.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            e = np.where(drop[:, i], col, 0.0) / u[i1 + i, i1 + i]
            w1[:, i:] -= np.outer(e, u[i1 + i, i1 + i:i2])
            err[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return mask.T[:f]


def splice(h: np.ndarray, r: np.ndarray, mask: np.ndarray, rounds: int, swaps: int = 8) -> tuple[np.ndarray, np.ndarray, int]:
    """Prune-and-splice rounds per output (module docstring); returns (mask, re-fitted W, swaps kept)."""
    f1, o = r.shape
    mask = mask.copy()
    mask[-1] = True
    w = np.zeros((f1, o))
    kept_swaps = 0
    for j in range(o):
        s = np.flatnonzero(mask[:, j])
        ws = _solve(h[np.ix_(s, s)], r[s, j])
        best = -float(r[s, j] @ ws)
        m = swaps
        for _ in range(rounds):
            if m < 1 or len(s) <= 1 or len(s) >= f1:
                break
            hs = h[np.ix_(s, s)]
            try:
                inv = np.linalg.inv(hs)
            except np.linalg.LinAlgError:
                break
            is_bias = s == f1 - 1
            cost = ws ** 2 / np.diagonal(inv)
            cost[is_bias] = np.inf
            out = np.ones(f1, dtype=bool)
            out[s] = False
            p = np.flatnonzero(out)
            hps = h[np.ix_(p, s)]
            grad = r[p, j] - hps @ ws
            schur = h[p, p] - ((hps @ inv) * hps).sum(axis=1)
            gain = grad ** 2 / np.maximum(schur, 1e-12 * np.abs(h[p, p]).max())
            add = p[np.argsort(-gain, kind="stable")[:m]]
            add_gain = np.sort(gain)[::-1][:m]
            rem_order = np.argsort(cost, kind="stable")[:m]
            rem_order = rem_order[np.isfinite(cost[rem_order])]
            n_pairs = min(len(add_gain), len(rem_order))
            n = int(np.sum(add_gain[:n_pairs] > cost[rem_order[:n_pairs]]))
            if n == 0:
                break
            trial = np.sort(np.concatenate([np.delete(s, rem_order[:n]), add[:n]]))
            wt = _solve(h[np.ix_(trial, trial)], r[trial, j])
            value = -float(r[trial, j] @ wt)
            if value < best - 1e-12 * abs(best):
                s, ws, best = trial, wt, value
                kept_swaps += n
            else:
                m //= 2
        w[s, j] = ws
        mask[:, j] = False
        mask[s, j] = True
    return mask, w, kept_swaps


def prune_layer(gram: CrossGram, w0: np.ndarray, b0: np.ndarray, density: float, *, method: str = "obs",
                ridge: float = 1e-3, splice_rounds: int = 4, block: int = 128,
                mask: np.ndarray | None = None,
                row_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Prune one layer to ``density``; returns ``(W [F, O], b [O], stats)``.

    ``w0`` is the original ``[F, O]`` weight and ``b0`` its bias. ``mask`` (``[F, O]``) fixes the
    support instead of choosing it (magnitude with ``scope=global`` passes its own).
    """
    h, r, lam = penalised(gram, w0, b0, ridge)
    f, o = w0.shape
    keep = int(round(density * f * o))
    if mask is None:
        if method == "magnitude":
            mask = magnitude_mask(w0, keep)
        elif method == "obs":
            mask = sparsegpt_mask(h, r, keep, block, row_weight)
        else:
            raise ValueError(f"unknown method {method!r}")
    full = np.zeros((f + 1, o), dtype=bool)
    full[:f] = mask
    before = float(loss(h, r, refit(h, r, full)).sum())
    full, w, swaps = splice(h, r, full, splice_rounds) if splice_rounds > 0 else (full, refit(h, r, full), 0)
    after = float(loss(h, r, w).sum())
    err = gram.relative_error(w[:f], w[f])
    return w[:f], w[f], {"density": round(float(full[:f].mean()), 6), "kept": int(full[:f].sum()),
                         "spliced": swaps, "rel_error": round(err, 6),
                         "splice_gain": round((before - after) / max(abs(before), 1e-30), 6), "lambda": lam}


# =============================================================================================
# the pass


def linear_layers(model: Model, min_weights: int, left: LeftAlone) -> list[LinearLayer]:
    """Every prunable layer of the main graph, topological order; refusals go to ``left``."""
    graph = model.graph
    out = []
    for node in graph.toposort():
        if node.op_type not in LAYER_OPS:
            continue
        layer = LinearLayer.of(graph, node)
        if isinstance(layer, str):
            left.add(layer, node.name)
        elif len(graph.consumers(node.inputs[1])) > 1:
            left.add("weight read by another node", node.name)
        elif layer.weight.size < min_weights:
            left.add(f"fewer than min_weights={min_weights} weights", node.name)
        else:
            out.append(layer)
    return out


def downstream_weight(graph, layer: LinearLayer) -> np.ndarray | None:
    """``[O]``: how strongly the next linear layer reads each output (``Σ_j W_next[o, j]²``, mean 1).

    Followed through element-wise activations (Relu, Clip, LeakyRelu) and Flatten when the next layer
    is a Gemm/MatMul on exactly these features; ``None`` (no weighting) otherwise.
    """
    value = layer.y
    for _ in range(4):
        readers = graph.consumers(value)
        if len(readers) != 1 or graph.is_graph_output(value):
            return None
        nxt = readers[0]
        if nxt.op_type in ("Relu", "Clip", "LeakyRelu", "Flatten", "Identity"):
            if nxt.op_type == "Flatten" and layer.kind == "conv":
                return None  # a conv's channel spreads over many features; not worth the bookkeeping
            value = nxt.outputs[0]
            continue
        following = LinearLayer.of(graph, nxt)
        if isinstance(following, str) or following.kind == "conv" and layer.kind != "conv":
            return None
        wn = following.weight_matrix().astype(np.float64)
        if following.kind == "conv":
            if wn.shape[0] != layer.out_features * following.kernel[0] * following.kernel[1]:
                return None
            energy = (wn ** 2).reshape(layer.out_features, -1).sum(axis=1)
        elif wn.shape[0] == layer.out_features:
            energy = (wn ** 2).sum(axis=1)
        else:
            return None
        return energy / max(float(energy.mean()), 1e-30)
    return None


def parse_densities(text: str) -> dict[str, float]:
    """``"fc1=0.08,conv2=0.12"`` -> ``{"fc1": 0.08, "conv2": 0.12}`` (keys match node or weight names)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, val = part.partition("=")
        out[key.strip()] = float(val)
    return out


def layer_key(layer: LinearLayer) -> list[str]:
    """Names a density may be given by: the node name and the weight's name (with and without ``.weight``)."""
    w = layer.node.inputs[1].name
    return [layer.node.name, w, w.removesuffix(".weight")]


@register
class Sparsify(Pass):
    name = "sparsify"
    summary = "LOSSY: unstructured pruning (magnitude / SparseGPT-OBS masks), DNS-style splicing, LS re-fit"
    lossless = False
    options = {
        "density": Option(0.1, "fraction of weights kept per layer (unless densities names the layer)", float,
                          low=0, high=1, low_open=True),
        "densities": Option("", "per-layer densities: name=fraction,... (node or weight names)", str),
        "method": Option("obs", "how supports are chosen", str, ("obs", "magnitude")),
        "scope": Option("layer", "magnitude threshold per layer or one for all layers", str, ("layer", "global")),
        "refit": Option(True, "re-fit the kept weights by least squares (False: plain magnitude pruning)", bool),
        "splice_rounds": Option(4, "prune-and-splice rounds per output (0: none)", int, low=0),
        "downstream": Option(False, "weigh each output's error by the next layer's squared weights when choosing masks",
                             bool),
        "block": Option(128, "SparseGPT column block (0: the whole layer at once)", int, low=0),
        "ridge_grid": Option("", "ridges to choose from per layer on held-out samples, e.g. 0.01,0.1,1 "
                                 "(empty: use ridge)", str),
        **calibration(samples=512, max_rows=16384, min_weights=64,
                      ridge=(0.1, "the re-fit's pull towards the original weights"),
                      holdout=(0.25, "to choose the ridge from ridge_grid")),
        **guard(guard=(True, "the sparsest density within the budget"), max_drop=1.0,
                guard_z=(2.0, "paired, from the held-out samples whose verdict changed"),
                guard_holdout=(0.4, "the tries are fitted on the rest"),
                guard_steps=(4, "after the requested density fails")),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        run = SparsifyRun(model, ctx, lambda key: self.opt(ctx, key))
        run.layers = linear_layers(model, run.opt("min_weights"), run.left)
        if not run.layers:
            return PassResult(False, run.left.into({"pruned": 0}))
        run.densities = plan_densities(run)
        if not run.opt("refit"):
            return PassResult(True, report(run, prune_by_magnitude(run)))
        if ctx.data is None:
            return PassResult(False, {"pruned": 0, "skipped": "no calibration data (the re-fit needs ctx.data)"})
        data = ctx.data.head(min(run.opt("samples"), ctx.data.n_samples))
        guard = guard_setup(run, data)
        if isinstance(guard, Guard):
            return guarded(run, guard)
        job = PruneJob(model, run.layers, run.densities, data, model.clone(), run.opt("splice_rounds"))
        stats = report(run, prune_layers(run, job))
        stats["guard"] = {"off": guard}
        return PassResult(True, stats)


@dataclass
class SparsifyRun:
    """What the steps of one run share: the model, the options, its layers and their densities."""

    model: Model
    ctx: PassContext
    opt: Callable[[str], Any]                     # option key -> the user's value or the default
    left: LeftAlone = field(default_factory=LeftAlone)
    layers: list[LinearLayer] = field(default_factory=list)
    densities: dict[str, float] = field(default_factory=dict)   # node name -> kept fraction


@dataclass
class PruneJob:
    """One pruning of ``model``: ``layers`` at ``densities``, fitted on ``data``, targets from ``reference``."""

    model: Model
    layers: list[LinearLayer]
    densities: dict[str, float]
    data: SampleData
    reference: Model
    splice_rounds: int
    records: list[dict[str, Any]] = field(default_factory=list)
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)   # node -> (W, b)


def plan_densities(run: SparsifyRun) -> dict[str, float]:
    """Each layer's kept fraction: ``densities`` by name, else ``density`` (``--target-params`` when the
    option is not given); with ``scope=global`` what one magnitude threshold over all layers leaves."""
    given = parse_densities(run.opt("densities"))
    default = run.opt("density")
    if run.ctx.target_params is not None and "density" not in run.ctx.options.get(Sparsify.name, {}):
        default = float(run.ctx.target_params)   # the kept fraction of the prunable weights
    out = {}
    for layer in run.layers:
        names = layer_key(layer)
        out[layer.node.name] = next((given[n] for n in names if n in given), default)
    if run.opt("scope") == "global":
        # Han et al.: one magnitude threshold for every layer, keeping `density` of all their weights
        mags = np.concatenate([np.abs(layer.weight).ravel() for layer in run.layers])
        keep = int(round(default * mags.size))
        thr = np.sort(mags)[::-1][max(keep - 1, 0)] if keep else np.inf
        for layer in run.layers:
            out[layer.node.name] = float((np.abs(layer.weight) >= thr).mean())
    return {k: min(max(v, 0.0), 1.0) for k, v in out.items()}


def prune_by_magnitude(run: SparsifyRun) -> list[dict[str, Any]]:
    """``refit=False``: the largest ``|w|`` of each layer kept, nothing re-fitted."""
    records = []
    for layer in run.layers:
        w0 = layer.weight_matrix()
        mask = magnitude_mask(w0, int(round(run.densities[layer.node.name] * w0.size)))
        layer.set_weights(run.model.graph, np.where(mask, w0, 0),
                          layer.bias_vector() if layer.bias is not None else None)
        records.append({"node": layer.node.name, "weights": int(w0.size), "density": round(float(mask.mean()), 6),
                        "kept": int(mask.sum())})
    return records


def prune_layers(run: SparsifyRun, job: PruneJob) -> list[dict[str, Any]]:
    """Prune ``job``'s layers of its model in place, in order; returns the records (the weights in ``job``)."""
    targets = {layer.node.name: layer.y.name for layer in job.layers}
    grid = [float(v) for v in run.opt("ridge_grid").split(",") if v.strip()]
    fit, held = job.data.split(int(round(job.data.n_samples * run.opt("holdout")))) if grid else (job.data, None)
    for layer in job.layers:
        run.ctx.say(f"sparsify: {layer.node.name}")
        _prune_layer(run, job, layer, targets[layer.node.name], fit, held, grid)
    return job.records


def _prune_layer(run: SparsifyRun, job: PruneJob, layer: LinearLayer, target: str, fit: SampleData,
                 held: SampleData | None, grid: list[float]) -> None:
    """One layer: its statistics, the ridge (from ``grid`` on ``held`` when given), the support and the re-fit."""
    key = layer.node.name
    method, density = run.opt("method"), job.densities[key]
    w0, b0 = layer.weight_matrix().astype(np.float64), layer.bias_vector().astype(np.float64)
    mask = magnitude_mask(w0, int(round(density * w0.size))) if method == "magnitude" else None
    gram = collect(job.model, {key: layer}, fit, reference=job.reference, targets={key: target},
                   max_rows=run.opt("max_rows"), seed=run.ctx.seed)[key]
    ridge = run.opt("ridge")
    choice = None
    if held is not None:
        hold = collect(job.model, {key: layer}, held, reference=job.reference, targets={key: target},
                       max_rows=run.opt("max_rows"), seed=run.ctx.seed + 1)[key]
        choice = {}
        for candidate in grid:   # each ridge fitted on ``fit`` and measured on ``held``, without splicing
            wc, bc, _ = prune_layer(gram, w0, b0, density, method=method, ridge=candidate, splice_rounds=0,
                                    mask=mask, block=run.opt("block") or w0.shape[0])
            choice[candidate] = hold.relative_error(wc, bc)
        ridge = min(choice, key=choice.get)
        gram = gram.merge(hold)
    w, b, stats = prune_layer(gram, w0, b0, density, method=method, ridge=ridge, splice_rounds=job.splice_rounds,
                              mask=mask, block=run.opt("block") or w0.shape[0],
                              row_weight=downstream_weight(job.model.graph, layer) if run.opt("downstream")
                              else None)
    layer.set_weights(job.model.graph, w, b)
    job.weights[key] = (w, b)
    if choice is not None:
        stats["ridge"] = ridge
        stats["holdout_error"] = {str(k): round(v, 6) for k, v in choice.items()}
    job.records.append({"node": key, "weights": int(w0.size), **stats})


def report(run: SparsifyRun, records: list[dict[str, Any]]) -> dict[str, Any]:
    total = sum(r["weights"] for r in records)
    kept = sum(r["kept"] for r in records)
    stats: dict[str, Any] = {"pruned": len(records), "layers": records,
                             "density": round(kept / total, 6) if total else 1.0}
    return run.left.into(stats)


# =============================================================================================
# the accuracy guard


@dataclass
class Guard:
    """The guard's held-out split, budget and reference verdicts, and the tries it made."""

    fit: SampleData
    held: SampleData
    max_drop: float
    correct: np.ndarray            # per held-out sample: the reference model's top-1 is right
    reference: float               # the reference accuracy on the held-out samples (percent)
    trace: list[dict[str, Any]] = field(default_factory=list)
    tried: dict[float, tuple[bool, PruneJob]] = field(default_factory=dict)


def guard_setup(run: SparsifyRun, data: SampleData) -> Guard | str:
    """The guard, or why it is off."""
    if not run.opt("guard"):
        return "option guard=False"
    if data.labels is None:
        return "calibration data has no labels"
    fit, held = data.split(int(round(data.n_samples * run.opt("guard_holdout"))))
    if held is None:
        return "guard_holdout leaves no held-out samples"
    correct = top1_correct(run.model, held)
    if correct is None:
        return "the first graph output is not [N, classes] scores"
    max_drop = run.ctx.max_drop if run.ctx.max_drop is not None else run.opt("max_drop")
    return Guard(fit, held, float(max_drop), correct, 100.0 * float(correct.mean()))


def guarded(run: SparsifyRun, guard: Guard) -> PassResult:
    """Bisect ``t`` in ``d(t) = d + t (1 − d)`` (per layer) for the sparsest model within the budget."""
    # the requested densities as asked (with splicing); the bisection's denser tries without it:
    # splicing costs O(rounds * s^3) per output, and at the densities the guard ends up at it makes
    # the search many times slower for no difference the held-out samples see
    best: float | None = 0.0 if attempt(run, guard, 0.0, run.opt("splice_rounds")) else None
    if best is None:
        lo, hi = 0.0, 1.0
        for _ in range(run.opt("guard_steps")):
            mid = (lo + hi) / 2
            if attempt(run, guard, mid, 0):
                best, hi = mid, mid
            else:
                lo = mid
    info = {"max_drop": guard.max_drop, "z": run.opt("guard_z"), "held_out_samples": guard.held.n_samples,
            "fit_samples": guard.fit.n_samples, "reference_accuracy": round(guard.reference, 3),
            "trace": guard.trace}
    if best is None:
        # nothing within the budget: leave the model as it was (no pruning is the only safe density)
        info["chosen"] = None
        stats = report(run, [])
        stats.update(pruned=0, guard=info, skipped="no density tried met the accuracy budget on held-out samples")
        return PassResult(False, stats)
    _, job = guard.tried[best]
    for layer in run.layers:
        if layer.node.name in job.weights:
            w, b = job.weights[layer.node.name]
            layer.set_weights(run.model.graph, w, b)
    info["chosen"] = {"t": round(best, 4),
                      "density": next(e["density"] for e in guard.trace if e["t"] == round(best, 4))}
    stats = report(run, job.records)
    stats["guard"] = info
    return PassResult(True, stats)


def attempt(run: SparsifyRun, guard: Guard, t: float, splice_rounds: int) -> bool:
    """Prune a copy at densities ``d(t)``, fitted on the guard's fit samples; within the budget on the held-out
    ones when ``drop + guard_z · SE <= max_drop`` (``SE`` paired: only changed verdicts carry variance)."""
    trial = run.model.clone()
    trial_layers = [lay for lay in linear_layers(trial, run.opt("min_weights"), LeftAlone())
                    if lay.node.name in run.densities]
    dens = {k: v + t * (1.0 - v) for k, v in run.densities.items()}
    run.ctx.say(f"sparsify guard: t={t:.3f}")
    started = time.perf_counter()
    job = PruneJob(trial, trial_layers, dens, guard.fit, run.model, splice_rounds)
    records = prune_layers(run, job)
    correct = top1_correct(trial, guard.held)
    acc = 100.0 * float(correct.mean())
    measured = HeldOutDrop.of(guard.correct, correct, run.opt("guard_z"))
    ok = measured.upper <= guard.max_drop + 1e-9
    kept = sum(r["kept"] for r in records) / max(sum(r["weights"] for r in records), 1)
    guard.trace.append({"t": round(t, 4), "density": round(kept, 6), "held_out_accuracy": round(acc, 3),
                        **measured.fields(), "ok": ok,
                        "splice_rounds": splice_rounds, "seconds": round(time.perf_counter() - started, 2)})
    guard.tried[t] = (ok, job)
    return ok
