"""Low-rank factorization (LOSSY): a Gemm/MatMul/Conv becomes two thinner layers, plain or data-aware SVD.

Forms
-----
Every form writes the layer as ``y = Wᵀx + b`` with a matrix ``W [F, O]`` per group and replaces ``W``
by ``P·Q`` of rank ``r`` (:mod:`graphopt.compress.svd`): two layers, the bias on the second.

``dense``  Gemm/MatMul with a constant weight, ``W [K, N]`` (Gemm: ``α·op(B)``, ``β·C`` as the bias, so
           ``transB``, ``α`` and ``β`` are folded in; MatMul: the weight may be stored transposed,
           ``MatMul(x, Transpose(Wᵀ))``; the input may be batched, ``[..., K]``)::

               Gemm(x, B, C)  ->  Gemm(Gemm(x, P), Q, C')        MatMul(x, W)  ->  MatMul(MatMul(x, P), Q)

``channel`` Conv ``k×k`` (groups handled per group, ``F = Cin/g·kh·kw``, ``O = Cout/g``): a ``k×k`` conv to
           ``r`` channels per group with the original strides/pads/dilations, then a ``1×1`` conv.
``spatial`` Conv ``kh×kw`` (both > 1), Jaderberg et al. 2014 scheme 2: ``W[o, c, i, j]`` seen as the matrix
           ``M[(c, i), (o, j)]`` (``Cin·kh × Cout·kw``); ``M ≈ P·Q`` gives a ``kh×1`` conv
           (``V[k, c, i] = P[(c, i), k]``, vertical stride/pad/dilation) to ``r`` channels, then a ``1×kw``
           conv (``H[o, k, j] = Q[k, (o, j)]``, horizontal stride/pad/dilation). Exact at full rank: the
           first conv has no bias, so the horizontal zero padding the second conv adds equals the
           first conv applied to the zero padding of the input.

A layer is factorized only where it saves weights, ``r·(F + O) < F·O`` per group (a depthwise conv's
channel form never does; its spatial form, ``3×1`` then ``1×3`` per channel, does), and never below rank
``min_rank`` (a 10-class head squeezed to rank 4 loses classes).
With ``form=auto`` the pass evaluates the valid forms of a conv and takes, at the same kept-parameter
budget (``select=ratio``/``target``), the one with the smaller output error, otherwise (``energy``,
``error``) the one with fewer MACs (:mod:`graphopt.measure.cost` formulas).

Data-aware (default when the run has calibration data)
------------------------------------------------------
The input statistics of every layer (its rows: the last axis of a Gemm/MatMul input, the im2col patches of
a conv, subsampled) give ``μ`` and ``Σ``; the SVD is taken of ``LᵀW`` (``Σ = LLᵀ``, SVD-LLM's whitening),
which minimises the layer's *output* error ``tr(ΔWᵀΣΔW)`` instead of ``‖ΔW‖_F``, and the bias absorbs the
mean error ``ΔWᵀμ``. For the spatial form the covariance of vertical patches averaged over the kernel
columns stands in for ``Σ`` (the cross terms between columns are dropped); the reported error and the bias
correction use the full patch covariance, so they are exact. With option ``shard_samples`` the statistics
are gathered in shards of samples through the run's executor and added in shard order
(:mod:`graphopt.compress.shards`); with ``--data DIR`` (a directory of ``.npz`` shards) they stream every
shard of it, each read where its task runs, and so do the compensation's
(:func:`compensate_in_shards`), while the sensitivity and the guard use the samples in memory (the
directory's head).

The stats report, per layer, ``rel_output_error = sqrt(E‖ΔWᵀx − δ‖² / E‖Wᵀx‖²)`` on the calibration
inputs (the bias left out of the denominator; ``δ = 0`` for the plain SVD), or ``rel_weight_error =
‖ΔW‖_F / ‖W‖_F`` without data, and with compensation ``rel_error_vs_original_layer`` (the refitted layer
against the original layer's outputs, relative to their variance).

``Σ`` is shrunk towards ``tr(Σ)/F·I`` by ``ridge + shrink·F/R`` (``R`` rows): a Gemm sees one row per
sample, and with about as many samples as features the sample covariance whitens by noise (data-aware
then does worse than plain on unseen data).

Compensation (``compensate``, data-aware only; Zhang et al. 2015's asymmetric reconstruction): the layers
are then factorized in topological order, each refitted from its inputs *in the model factorized so far*
``X_c`` (computed from a cut that moves forward with the factorization) to its outputs in the model before
the pass ``Y`` (row-sampled once, held within a memory budget) — reduced-rank regression: least squares
``W_ls`` from :class:`graphopt.compress.lstsq.CrossGram`, then the whitened truncation of ``W_ls`` by ``X_c``'s
covariance, so each layer also absorbs the error of the layers before it. Layers with fewer than
``refit_min_rows`` rows per feature, or that :class:`graphopt.compress.lstsq.LinearLayer` refuses (grouped convs,
Gemm with α/β ≠ 1, a weight behind a Transpose), keep the plain data-aware factors (the stats say why).

Rank selection (``select``)
---------------------------
``ratio``   keep the fraction ``ratio`` of each layer's weights: ``r = ⌊ratio·F·O/(F + O)⌋``.
``energy``  smallest ``r`` keeping ``energy`` of ``Σ s²`` (of ``LᵀW`` when data-aware: output energy).
``error``   smallest ``r`` with relative error ``sqrt(tail/total) ≤ max_error`` (the output error when
            data-aware, the weight error otherwise).
``target``  the run's ``--target-params`` / ``--target-macs`` (fractions of the whole model, or of the
            candidate layers with ``target_scope=layers``) through :mod:`graphopt.compress.budget`: units are layers,
            levels are ranks, the sensitivity of a level is the model's relative output error with only that
            layer factorized (``sensitivity=model``: its factorized weight written into the unchanged model
            and run from a cached cut, :mod:`graphopt.compress.lowrank_table`; within
            ``sensitivity_tmacs``, ranks not measured scaled from the layer's own error) or the layer's own
            relative output error (``layer``); the table's evaluations run through the run's executor.
            With ``--max-drop`` and labelled data (``guard``), the target is relaxed by bisection
            (:func:`graphopt.compress.budget.guarded`, its tries through the run's executor) until the accuracy
            drop measured on the calibration samples (factors before compensation, so on the safe side) fits;
            the trace is in the stats.
``auto``    ``target`` when the run has a target, else ``ratio``.

Latency
-------
Fewer MACs is not always faster: two small kernels may cost more than one, and a rank whose channel
count is not a multiple of 4 drops a conv off onnxruntime's blocked kernels. By default (``latency=cost``)
a factorization is kept only when :mod:`graphopt.measure.latency` (per-kernel times calibrated once with
onnxruntime's profiler and stored for the run's target CPU, :mod:`graphopt.measure.target`, at
``latency_batch``; MACs with the target's block geometry when no one calibrated it, so a rank between two
of its blocks costs the next block) predicts the pair faster than the layer (with
the global target, the allocator is only offered such ranks): it is deterministic, so the output stays
byte-identical run to run. ``latency=measure`` times each factorization
against the original layer alone instead (a one-layer model at the layer's shape, batch 1, onnxruntime
with all graph optimizations and one thread, A and B alternating, fastest rounds compared); on a loaded
machine repeats of the same layer vary, so decisions may differ between runs. Either way the ratio
is in the stats and a factorization is dropped when it is not below ``max_latency_ratio``;
``latency=off`` keeps every factorization (forces).

Refused (reason in the stats' ``left_alone``): weight not constant or not a float matrix; Gemm with
``transA`` or a bias that is not per output; a constant on the left of a MatMul; a weight of rank > 2 in a
MatMul; convs that are not 2-D or use ``auto_pad=SAME_*``; layers smaller than ``min_weights``; no rank that
saves weights; the chosen rank saving nothing; slower after factorization.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from math import ceil, prod
from typing import Any

import numpy as np
from onnx import helper

from graphopt.compress import budget, lstsq, refit_shards, shards, svd
from graphopt.compress import reconstruct as rec
from graphopt.measure.blas import blas_threads
from graphopt.compress.options import calibration, guard
from graphopt.core.ir import Graph, Model, Node, Value
from graphopt.core.ledger import LeftAlone
from graphopt.core.manager import Option, Pass, PassContext, PassResult, register
from graphopt.core.onnx_io import from_proto
from graphopt.core.ops import LAYER_OPS, ConvInfo, conv_info, drop_unused, is_op, producer_op, sole_consumer
from graphopt.core.shapes import ShapeView
from graphopt.measure import latency as lat
from graphopt.measure import ort as gort
from graphopt.measure.analysis import analyze
from graphopt.measure.calibration import Calibrator, Gram, SampleData, batch_within, feed_batch_size
from graphopt.measure import segments
from graphopt.measure import target as targets
from graphopt.measure.segments import Frontier
from graphopt.measure.executor import EvalContext, ShippedModel, executor_for
from graphopt.compress import lowrank_table as lrt

# =============================================================================================
# sites: the layers the pass can factorize


@dataclass
class Site:
    """One layer seen as ``y = x·W + b`` (dense) or a conv, with what its rewrite needs."""

    node: Node
    kind: str                      # "gemm" | "matmul" | "conv"
    x: Value
    y: Value
    weight: np.ndarray             # dense: W [K, N] with α and transB folded in; conv: [Cout, Cin/g, kh, kw]
    bias: np.ndarray | None        # per output, β folded in (None: no bias)
    dtype: np.dtype
    conv: ConvInfo | None = None
    x_dims: tuple[int, ...] | None = None   # batch read as 1
    y_dims: tuple[int, ...] | None = None
    x_sym: tuple | None = None              # dynamic dims kept symbolic, for new values' types
    y_sym: tuple | None = None

    @property
    def name(self) -> str:
        return self.node.name or self.node.op_type

    @property
    def groups(self) -> int:
        return self.conv.group if self.conv is not None else 1

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0] if self.kind == "conv" else self.weight.shape[1])

    @property
    def params(self) -> int:
        return int(self.weight.size)

    def macs(self) -> int | None:
        if self.kind == "conv":
            if self.y_dims is None:
                return None
            return int(prod(self.y_dims) * prod(self.weight.shape[1:]))
        if self.x_dims is None:
            return None
        return int(prod(self.x_dims[:-1]) * self.weight.size)

    def __getstate__(self) -> dict[str, Any]:
        # A copy sent to an executor's worker (the sensitivity table, the guard) keeps the node's and
        # values' names, not the IR graph they belong to: the plans need only the arrays, and a model
        # copy in the worker finds the layer by name (_with_plans).
        state = dict(self.__dict__)
        state["node"] = Named(self.node.name, self.node.op_type)
        state["x"], state["y"] = Named(self.x.name), Named(self.y.name)
        return state


@dataclass(frozen=True)
class Named:
    """What a pickled :class:`Site` keeps of an IR node or value."""

    name: str
    op_type: str = ""


def _per_output(c: np.ndarray, n: int) -> np.ndarray | None:
    """A Gemm ``C`` broadcast per output column as ``[n]``, or ``None`` when it varies along the rows."""
    if c.size == 1:
        return np.full(n, c.reshape(()).item(), dtype=c.dtype)
    if c.ndim == 1 and c.shape[0] == n or c.ndim == 2 and c.shape == (1, n):
        return c.reshape(n)
    return None


def _no_weight(graph: Graph, x: Value, op: str) -> str:
    """Why a Gemm/MatMul without a constant second operand is refused."""
    if graph.constant_array(x) is not None:
        return f"the constant is the first {op} operand"
    return "weight is not constant"


def find_site(graph: Graph, node: Node, shapes: ShapeView | None, concrete: ShapeView | None = None) -> Site | str:
    """The :class:`Site` of ``node`` or why the pass cannot factorize it.

    ``shapes`` gives the dims new values are typed with (dynamic dims stay dynamic); ``concrete`` (default
    ``shapes``) the sizes costs are counted at, e.g. a dynamic model's probe shape. Types must never come
    from the probe: a Reshape built later from them would only take the probe's size."""
    if not is_op(node, *LAYER_OPS):
        return f"{node.op_type} is not a Gemm, MatMul or Conv"
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return "missing input"
    read = {"Conv": _conv_site, "Gemm": _gemm_site, "MatMul": _matmul_site}[node.op_type]
    site = read(graph, node)
    if isinstance(site, str) or shapes is None:
        return site
    return _with_shapes(graph, site, shapes, concrete or shapes)


def _conv_site(graph: Graph, node: Node) -> Site | str:
    info = conv_info(graph, node)
    if isinstance(info, str):
        return info
    if info.weight.ndim != 4:
        return "only 2-D convs"
    return Site(node, "conv", node.inputs[0], node.outputs[0], info.weight, info.bias, info.weight.dtype, conv=info)


def _gemm_site(graph: Graph, node: Node) -> Site | str:
    """``W = α·op(B)`` and the bias ``β·C`` per output column; refused with ``transA`` or a bias varying by row."""
    x = node.inputs[0]
    if node.attr("transA", 0):
        return "Gemm with transA (the activation is transposed)"
    b = graph.constant_array(node.inputs[1])
    if b is None:
        return _no_weight(graph, x, "Gemm")
    if b.ndim != 2 or b.dtype.kind != "f":
        return "weight is not a float matrix"
    w = (b.T if node.attr("transB", 0) else b) * np.asarray(node.attr("alpha", 1.0), dtype=b.dtype)
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = graph.constant_array(node.inputs[2])
        if c is None:
            return "Gemm bias is not constant"
        c = _per_output(c, w.shape[1])
        if c is None:
            return "Gemm bias is not per output column"
        bias = c * np.asarray(node.attr("beta", 1.0), dtype=c.dtype)
    return Site(node, "gemm", x, node.outputs[0], w, bias, b.dtype)


def _matmul_site(graph: Graph, node: Node) -> Site | str:
    """The constant right operand, or the constant behind a ``Transpose`` (a weight stored transposed)."""
    w = graph.constant_array(node.inputs[1])
    if w is None:
        w = _transposed_weight(graph, node.inputs[1])
    if w is None:
        return _no_weight(graph, node.inputs[0], "MatMul")
    if w.ndim != 2 or w.dtype.kind != "f":
        return "MatMul weight is not a float matrix (batched weights are not factorized)"
    return Site(node, "matmul", node.inputs[0], node.outputs[0], w, None, w.dtype)


def _transposed_weight(graph: Graph, value: Value) -> np.ndarray | None:
    """``Wᵀᵀ`` when ``value`` is ``Transpose(Wᵀ)`` of a constant matrix (perm absent or ``[1, 0]``)."""
    t = producer_op(graph, value, "Transpose")
    if t is None:
        return None
    wt = graph.constant_array(t.inputs[0])
    perm = t.attr("perm")
    if wt is not None and wt.ndim == 2 and (perm is None or list(perm) == [1, 0]):
        return wt.T
    return None


def _with_shapes(graph: Graph, site: Site, shapes: ShapeView, concrete: ShapeView) -> Site | str:
    """``site`` with its input/output dims; the output's are derived from the input (its own type may be symbolic)."""
    site.x_dims = concrete.concrete(site.x)
    site.y_dims = concrete.concrete(site.y)
    site.x_sym = shapes.shape(site.x)
    site.y_sym = shapes.shape(site.y)
    if site.kind != "conv" and site.x_dims is not None and site.x_dims[-1] != site.weight.shape[0]:
        return "input features disagree with the weight"
    if site.x_dims is None:
        return site
    if site.kind != "conv":
        site.y_dims = tuple(site.x_dims[:-1]) + (site.out_features,)
        return site
    if len(site.x_dims) != 4:
        return "conv input is not 4-D"
    c = site.conv
    site.y_dims = (site.x_dims[0], site.out_features) + tuple(
        svd.conv_out_size(site.x_dims[2 + a], c.kernel[a], c.strides[a], c.dilations[a],
                          c.pads_begin[a], c.pads_end[a]) for a in range(2))
    return site


# =============================================================================================
# forms: the matrices to factorize, per group


@dataclass
class Form:
    """A way to write a site as ``groups`` matrices ``[F, O]`` whose rank-``r`` factors are two layers."""

    name: str                     # "dense" | "channel" | "spatial"
    site: Site
    mats: list[np.ndarray]        # per group, [F, O] in this form's layout (the weight's dtype)
    facs: list[svd.Factorization] = field(default_factory=list)
    # per group: the output variance tr(Wᵀ(Σ + μμᵀ)W) and the whitened error terms (svd.whitened_errors),
    # computed once per factorization and shared by every rank
    terms: dict[int, tuple] = field(default_factory=dict, repr=False)

    @property
    def f(self) -> int:
        return int(self.mats[0].shape[0])

    @property
    def o(self) -> int:
        return int(self.mats[0].shape[1])

    @property
    def groups(self) -> int:
        return len(self.mats)

    def params(self, rank: int) -> int:
        return self.groups * rank * (self.f + self.o)

    @property
    def max_rank(self) -> int:
        """Largest ``r`` with ``r·(F + O) < F·O``."""
        return int(ceil(self.f * self.o / (self.f + self.o))) - 1

    @property
    def full_rank(self) -> int:
        return min(self.f, self.o)

    def macs(self, rank: int) -> int | None:
        s = self.site
        if s.kind != "conv":
            return None if s.x_dims is None else int(prod(s.x_dims[:-1]) * rank * (self.f + self.o))
        if s.y_dims is None or s.x_dims is None:
            return None
        _, _, ho, wo = s.y_dims
        if self.name == "channel":
            return int(ho * wo * self.groups * rank * (self.f + self.o))
        kh, kw = s.weight.shape[2:]
        cin_g, og = s.weight.shape[1], s.weight.shape[0] // self.groups
        return int(self.groups * rank * (cin_g * kh * ho * s.x_dims[3] + og * kw * ho * wo))

    def seconds(self, rank: int, latency: lat.LatencyModel, batch: int = 1) -> float | None:
        """Predicted time (:mod:`graphopt.measure.latency`) of the two layers at ``batch``."""
        s = self.site
        if s.kind != "conv":
            if s.x_dims is None:
                return None
            m = int(prod(s.x_dims[:-1])) * batch
            return latency.gemm(m, self.f, rank) + latency.gemm(m, rank, self.o)
        if s.y_dims is None or s.x_dims is None:
            return None
        _, cin, h, w = s.x_dims
        _, cout, ho, wo = s.y_dims
        g, kh, kw = self.groups, s.weight.shape[2], s.weight.shape[3]
        if self.name == "channel":
            return (latency.conv(batch, cin, g * rank, (kh, kw), (h, w), (ho, wo), g)
                    + latency.conv(batch, g * rank, cout, (1, 1), (ho, wo), (ho, wo), g))
        return (latency.conv(batch, cin, g * rank, (kh, 1), (h, w), (ho, w), g)
                + latency.conv(batch, g * rank, cout, (1, kw), (ho, w), (ho, wo), g))

    def reconstruct(self, g: int, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Group ``g``'s approximation ``P·Q`` in the layer's own ``[F_full, O]`` layout (patch ``(c, i, j)``)."""
        m = p @ q
        if self.name != "spatial":
            return m
        cin_g, kh, kw = self.site.weight.shape[1:]
        og = self.site.weight.shape[0] // self.groups
        return m.reshape(cin_g, kh, og, kw).transpose(0, 1, 3, 2).reshape(cin_g * kh * kw, og)

    def original(self, g: int) -> np.ndarray:
        """Group ``g``'s weight in the ``[F_full, O]`` layout."""
        s = self.site
        if s.kind != "conv":
            return np.asarray(s.weight, dtype=np.float64)
        og = s.weight.shape[0] // self.groups
        return np.asarray(s.weight[g * og:(g + 1) * og], dtype=np.float64).reshape(og, -1).T


def forms_of(site: Site, which: str) -> list[Form]:
    """The valid forms of ``site`` (``which``: ``auto`` = all, or one form name)."""
    # In the weight's own dtype (a float32 view of a dense weight costs nothing; svd.factorize computes in float64).
    if site.kind != "conv":  # ``which`` chooses among conv forms; a dense layer has one
        return [Form("dense", site, [site.weight])]
    w = site.weight
    g = site.groups
    og = w.shape[0] // g
    out = []
    if which in ("auto", "channel"):
        out.append(Form("channel", site, [w[i * og:(i + 1) * og].reshape(og, -1).T for i in range(g)]))
    kh, kw = w.shape[2:]
    if which in ("auto", "spatial") and kh > 1 and kw > 1:
        cin_g = w.shape[1]
        out.append(Form("spatial", site, [w[i * og:(i + 1) * og].transpose(1, 2, 0, 3).reshape(cin_g * kh, og * kw)
                                          for i in range(g)]))
    return out


# =============================================================================================
# statistics


@dataclass
class Stats:
    """Input statistics of one site: moments of its rows (dense features or im2col patches, all groups)."""

    moments: Gram  # over the rows of site_rows (already 2-D: the default rows view keeps them)

    def release(self) -> None:
        """Drop ``XᵀX`` once every form's error terms are cached (``Form.terms``): what the plans still
        read is there, and on BERT-base the statistics were 0.9 GB held through the table."""
        self.moments.xtx = None

    def group(self, site: Site, g: int) -> tuple[np.ndarray, np.ndarray]:
        """``(Σ, μ)`` of group ``g``'s features in the ``[F_full]`` layout."""
        if site.kind != "conv":
            return self.moments.covariance, self.moments.mean
        cin_g = site.weight.shape[1]
        taps = site.weight.shape[2] * site.weight.shape[3]
        idx = np.arange(g * cin_g * taps, (g + 1) * cin_g * taps)
        return self.moments.covariance[np.ix_(idx, idx)], self.moments.mean[idx]


def site_rows(site: Site, x: np.ndarray, rng: np.random.Generator, max_rows: int) -> np.ndarray:
    """At most ``max_rows`` rows (features) of one batch of the site's input, drawn uniformly."""
    if site.kind != "conv":
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > max_rows:
            flat = flat[np.sort(rng.choice(flat.shape[0], size=max_rows, replace=False))]
        return flat
    c = site.conv
    # lstsq's im2col view; built directly because LinearLayer.of refuses grouped convs, whose rows are
    # the same patches over all input channels (each group reads its own block of features).
    layer = lstsq.LinearLayer(site.node, "conv", site.x, site.y, site.weight, site.bias,
                              kernel=tuple(site.weight.shape[2:]), strides=tuple(c.strides),
                              dilations=tuple(c.dilations), pads_begin=tuple(c.pads_begin),
                              pads_end=tuple(c.pads_end))
    n = layer.positions(x.shape)
    positions = None if n <= max_rows else np.sort(rng.choice(n, size=max_rows, replace=False))
    return layer.rows(x, positions)


def collect_stats(model: Model, sites: list[Site], data: SampleData, rng: np.random.Generator, max_rows: int,
                  batch_size: int = 64) -> dict[int, Stats]:
    """Stream every site's input rows over ``data`` (one onnxruntime run for all); keyed by ``id(node)``.
    Dense sites reading one tensor (attention's query/key/value) share one :class:`Stats`: their rows are
    the same."""
    shared: dict[str, Stats] = {}
    stats: dict[int, Stats] = {}
    first: list[Site] = []               # the site that feeds each statistic
    for s in sites:
        if s.kind == "conv":
            stats[id(s.node)] = Stats(Gram())
            first.append(s)
        else:
            if s.x.name not in shared:
                shared[s.x.name] = Stats(Gram())
                first.append(s)
            stats[id(s.node)] = shared[s.x.name]
    names = sorted({s.x.name for s in sites})
    # One run holds every site's input for a batch: fewer samples per run for a large model.
    batch_size = batch_within(model, names, data, batch_size)
    batches = max(1, ceil(data.n_samples / batch_size))
    per_batch = max(1, ceil(max_rows / batches))
    for batch in Calibrator(model, data, batch_size).run(names):
        for s in first:
            stats[id(s.node)].moments.update(site_rows(s, batch[s.x.name], rng, per_batch))
    return stats


def gather_stats(run: LowRankRun, sites: list[Site], rng: np.random.Generator) -> dict[int, Stats]:
    """:func:`collect_stats` over the run's samples; in shards of option ``shard_samples`` through the run's
    executor when there are more (:mod:`graphopt.compress.shards`; the shards' rows drawn from a seed
    this ``rng`` gives), the statistics of sites that share one keeping one :class:`Stats`."""
    data, shard_samples = run.statistics_samples(), int(run.opt("shard_samples"))
    if shards.unsharded(data, shard_samples):
        return collect_stats(run.model, sites, data, rng, run.opt("max_rows"))
    context = StatsShards(ShippedModel(run.model), sites, shards.count(data), run.opt("max_rows"),
                          int(rng.integers(2 ** 31)))
    grams = shards.gather(data, stats_shard, _merge_grams, context=context, executor=executor_for(run.ctx),
                          shard_samples=shard_samples)
    slots = _stat_slots(sites)
    shared = [Stats(gram) for gram in grams]
    return {id(site.node): shared[slot] for site, slot in zip(sites, slots)}


def _stat_slots(sites: list[Site]) -> list[int]:
    """Per site, the index of its statistic among the distinct ones :func:`collect_stats` makes (dense sites
    reading one tensor share one), in the order it makes them."""
    first: dict[str, int] = {}
    slots = []
    for s in sites:
        key = f"node {id(s.node)}" if s.kind == "conv" else f"input {s.x.name}"
        slots.append(first.setdefault(key, len(first)))
    return slots


@dataclass
class StatsShards:
    """What a worker needs for :func:`collect_stats` on one shard (the sites travel without their IR)."""

    model: ShippedModel
    sites: list[Site]
    n_samples: int
    max_rows: int
    seed: int


def stats_shard(ctx: StatsShards, item: tuple[int, Any]) -> list[Gram]:
    """One shard's input moments, one per distinct statistic in :func:`_stat_slots` order (runs in workers;
    a directory's shard is read here)."""
    index, piece = item
    model = ctx.model.ir()
    shard = shards.load(piece, model)
    stats = collect_stats(model, ctx.sites, shard, shards.rng(ctx.seed, index),
                          shards.rows_share(ctx.max_rows, shard, ctx.n_samples))
    slots = _stat_slots(ctx.sites)
    grams: list[Gram | None] = [None] * (max(slots) + 1)
    for site, slot in zip(ctx.sites, slots):
        grams[slot] = stats[id(site.node)].moments
    return grams


def _merge_grams(total: list[Gram], part: list[Gram]) -> list[Gram]:
    return [a.merge(b) for a, b in zip(total, part)]


# =============================================================================================
# a chosen factorization


@dataclass
class Plan:
    """A form at a rank, with its factors per group and the new bias."""

    form: Form
    rank: int
    factors: list[tuple[np.ndarray, np.ndarray]]
    bias: np.ndarray | None
    rel_error: float | None = None        # relative output error (data) or weight error (no data)
    error_kind: str = "weight"
    latency_ratio: float | None = None

    @property
    def site(self) -> Site:
        return self.form.site

    def record(self) -> dict[str, Any]:
        s = self.site
        out = {"node": s.name, "op": s.node.op_type, "form": self.form.name, "rank": self.rank,
               "full_rank": self.form.full_rank, "groups": self.form.groups,
               "params_before": s.params, "params_after": self.form.params(self.rank),
               "macs_before": s.macs(), "macs_after": self.form.macs(self.rank)}
        if self.rel_error is not None:
            out[f"rel_{self.error_kind}_error"] = float(f"{self.rel_error:.6g}")
        if self.latency_ratio is not None:
            out["latency_ratio"] = float(f"{self.latency_ratio:.4g}")
        return out


def make_plan(form: Form, rank: int, stats: Stats | None, correct_bias: bool, *, factors: bool = True) -> Plan:
    """Truncate ``form``'s factorizations at ``rank``; the bias absorbs the mean error when ``stats`` exist.

    ``factors=False`` leaves ``Plan.factors`` empty (the error and bias only: what a table of many ranks
    needs; the factors of a large layer at every rank would not fit in memory)."""
    site = form.site
    if stats is not None and form.name != "spatial" and all(f.whitened for f in form.facs):
        return _plan_from_spectrum(form, rank, stats, correct_bias, factors)
    pairs = [fac.factors(rank) for fac in form.facs]
    bias = None if site.bias is None else np.asarray(site.bias, dtype=np.float64).copy()
    err_num = err_den = 0.0
    og = site.out_features // form.groups
    for g, (p, q) in enumerate(pairs):
        w = form.original(g)
        dw = w - form.reconstruct(g, p, q)
        if stats is not None:
            cov, mean = stats.group(site, g)
            if correct_bias:
                if bias is None:
                    bias = np.zeros(site.out_features)
                bias[g * og:(g + 1) * og] += dw.T @ mean
                err_num += svd.output_error(dw, cov)
            else:
                err_num += svd.output_error(dw, cov + np.outer(mean, mean))
            err_den += svd.output_error(w, cov + np.outer(mean, mean))
        else:
            err_num += float(np.sum(dw ** 2))
            err_den += float(np.sum(w ** 2))
    rel = float(np.sqrt(err_num / err_den)) if err_den > 0 else 0.0
    return Plan(form, rank, pairs if factors else [], bias, rel, "output" if stats is not None else "weight")


def _plan_from_spectrum(form: Form, rank: int, stats: Stats, correct_bias: bool, factors: bool) -> Plan:
    """:func:`make_plan` of a whitened form by the closed forms of :meth:`graphopt.compress.svd.Factorization.
    whitened_errors` (the same numbers up to rounding, at ``O(k·O)`` per rank instead of ``O(F²·O)``); valid
    where the whitener was built from the covariance the error is measured with (not the spatial form's
    column average)."""
    site = form.site
    bias = None if site.bias is None else np.asarray(site.bias, dtype=np.float64).copy()
    og = site.out_features // form.groups
    err_num = err_den = 0.0
    for g, fac in enumerate(form.facs):
        if g not in form.terms:
            cov, mean = stats.group(site, g)
            w = form.original(g)
            form.terms[g] = (svd.output_error(w, cov) + float(np.sum((w.T @ mean) ** 2)),
                             *fac.whitened_errors(mean))
        den, energy, along = form.terms[g]
        shift = fac.vt[rank:].T @ along[rank:]           # ΔWᵀμ
        err_den += den
        err_num += float(np.sum(energy[rank:]))
        if correct_bias:
            if bias is None:
                bias = np.zeros(site.out_features)
            bias[g * og:(g + 1) * og] += shift
        else:
            err_num += float(shift @ shift)
    rel = float(np.sqrt(max(err_num, 0.0) / err_den)) if err_den > 0 else 0.0
    pairs = [fac.factors(rank) for fac in form.facs] if factors else []
    return Plan(form, rank, pairs, bias, rel, "output")


def shrunk_ridge(ridge: float, shrink: float, features: int, rows: int) -> float:
    """Relative ridge for a covariance of ``features`` estimated from ``rows`` rows: ``ridge + shrink·F/R``.

    With few rows per feature (a Gemm sees one row per sample) the sample covariance is nearly singular
    and whitening by it fits the calibration set, not the data; shrinking it towards ``tr(Σ)/F·I`` in
    proportion to ``F/R`` pulls the factorization back towards the plain SVD exactly when the statistics
    are weak.
    """
    return ridge + shrink * features / max(rows, 1)


def factorize_form(form: Form, stats: Stats | None, ridge: float, shrink: float = 0.0) -> None:
    """SVD of each group (whitened by the form's input covariance when ``stats`` are given)."""
    form.facs = []
    form.terms = {}
    s = form.site
    for g, mat in enumerate(form.mats):
        cov, lam = None, ridge
        if stats is not None:
            cov, _ = stats.group(s, g)
            rows = stats.moments.count
            if form.name == "spatial":
                cin_g, kh, kw = s.weight.shape[1:]
                cov = svd.column_average(cov, cin_g, kh, kw)
            lam = shrunk_ridge(ridge, shrink, mat.shape[0], rows)
        form.facs.append(svd.factorize(mat, cov, lam))


def group_rel_error(form: Form, rank: int) -> float:
    """``sqrt(Σ_g tail_g / Σ_g total_g)`` from the spectra (the whitened metric when data-aware)."""
    total = sum(f.total for f in form.facs)
    return float(np.sqrt(sum(f.tail(rank) for f in form.facs) / total)) if total > 0 else 0.0


def rank_for(form: Form, select: str, ratio: float, energy: float, max_error: float) -> int:
    if select == "ratio":
        return max(1, int(ratio * form.f * form.o / (form.f + form.o)))
    bound = (1.0 - energy) if select == "energy" else max_error ** 2
    for r in range(1, form.full_rank + 1):
        if group_rel_error(form, r) ** 2 <= bound + 1e-12:
            return r
    return form.full_rank


# =============================================================================================
# rewriting


def _conv_attrs(kernel, strides, pads_begin, pads_end, dilations, group) -> dict[str, Any]:
    return {"dilations": list(dilations), "group": int(group), "kernel_shape": list(kernel),
            "pads": list(pads_begin) + list(pads_end), "strides": list(strides)}


def _intermediate_dims(plan: Plan) -> list | None:
    s = plan.site
    if s.x_sym is None:
        return None
    if s.kind != "conv":
        return list(s.x_sym[:-1]) + [plan.rank]
    if s.y_sym is None or len(s.y_sym) != 4 or len(s.x_sym) != 4:
        return None
    # the symbolic (not the concrete, probe-shape) spatial dims: the height is the output's; the width the
    # output's after a full (channel) factorization, the input's after the vertical half of a spatial one
    width = s.y_sym[3] if plan.form.name == "channel" else s.x_sym[3]
    return [s.x_sym[0], plan.form.groups * plan.rank, s.y_sym[2], width]


def _foldable_add(graph: Graph, value: Value, n: int) -> tuple[Node, int, np.ndarray] | None:
    """The ``Add`` reading ``value`` alone, with a constant per-output other operand (a bias), if any."""
    add = sole_consumer(graph, value)
    if not is_op(add, "Add") or len(add.inputs) != 2:
        return None
    slot = 1 if add.inputs[0] is value else 0
    if add.inputs[1 - slot] is not value:
        return None
    c = graph.constant_array(add.inputs[slot])
    if c is None or c.size != n or (c.ndim and c.shape[-1] != n):
        return None
    return add, slot, c


def apply_plan(graph: Graph, plan: Plan) -> list[Node]:
    """Replace the site's node by the two factor layers; the output value keeps its name and readers."""
    s = plan.site
    node, dtype, name = s.node, s.dtype, s.name
    onnx_dtype = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    old_inputs = list(node.inputs[1:])
    weight_producer = graph.producer(node.inputs[1])
    graph.remove_node(node, keep_outputs=True)
    h = graph.new_value(f"{name}_lowrank", onnx_dtype, _intermediate_dims(plan))
    out: Value = s.y
    nodes: list[Node] = []
    if s.kind in ("gemm", "matmul"):
        (p, q), = plan.factors
        pv = graph.add_initializer(p.astype(dtype), f"{name}_U")
        qv = graph.add_initializer(q.astype(dtype), f"{name}_V")
        if s.kind == "gemm":
            nodes.append(graph.add_node("Gemm", [s.x, pv], [h], name=f"{name}_lr1", anchor=node))
            inputs = [h, qv]
            if plan.bias is not None:
                inputs.append(graph.add_initializer(plan.bias.astype(dtype), f"{name}_B"))
            nodes.append(graph.add_node("Gemm", inputs, [out], name=f"{name}_lr2", anchor=node))
        else:
            nodes.append(graph.add_node("MatMul", [s.x, pv], [h], name=f"{name}_lr1", anchor=node))
            corr = plan.bias
            if corr is not None and np.any(corr):
                add = _foldable_add(graph, out, s.out_features)
                if add is not None:  # fold the mean correction into the existing bias (a new initializer)
                    add_node, slot, c = add
                    old = add_node.inputs[slot]
                    graph.set_input(add_node, slot, graph.add_initializer(
                        (c + corr.reshape(c.shape)).astype(c.dtype), f"{name}_bias"))
                    drop_unused(graph, [old])
                    corr = None
            if corr is not None and np.any(corr):
                mid = graph.new_value(f"{name}_nobias", onnx_dtype, out.shape)
                nodes.append(graph.add_node("MatMul", [h, qv], [mid], name=f"{name}_lr2", anchor=node))
                bv = graph.add_initializer(corr.astype(dtype), f"{name}_B")
                nodes.append(graph.add_node("Add", [mid, bv], [out], name=f"{name}_bias", anchor=node))
            else:
                nodes.append(graph.add_node("MatMul", [h, qv], [out], name=f"{name}_lr2", anchor=node))
    else:
        c = s.conv
        g, r = plan.form.groups, plan.rank
        cin_g, kh, kw = s.weight.shape[1:]
        og = s.weight.shape[0] // g
        if plan.form.name == "channel":
            first = np.concatenate([p.T.reshape(r, cin_g, kh, kw) for p, _ in plan.factors])
            second = np.concatenate([q.T.reshape(og, r, 1, 1) for _, q in plan.factors])
            a1 = _conv_attrs((kh, kw), c.strides, c.pads_begin, c.pads_end, c.dilations, g)
            a2 = _conv_attrs((1, 1), (1, 1), (0, 0), (0, 0), (1, 1), g)
        else:
            first = np.concatenate([p.reshape(cin_g, kh, r).transpose(2, 0, 1)[..., None] for p, _ in plan.factors])
            second = np.concatenate([q.reshape(r, og, kw).transpose(1, 0, 2)[:, :, None, :] for _, q in plan.factors])
            a1 = _conv_attrs((kh, 1), (c.strides[0], 1), (c.pads_begin[0], 0), (c.pads_end[0], 0),
                             (c.dilations[0], 1), g)
            a2 = _conv_attrs((1, kw), (1, c.strides[1]), (0, c.pads_begin[1]), (0, c.pads_end[1]),
                             (1, c.dilations[1]), g)
        w1 = graph.add_initializer(first.astype(dtype), f"{name}_W1")
        w2 = graph.add_initializer(second.astype(dtype), f"{name}_W2")
        nodes.append(graph.add_node("Conv", [s.x, w1], [h], a1, name=f"{name}_lr1", anchor=node))
        inputs = [h, w2]
        if plan.bias is not None:
            inputs.append(graph.add_initializer(plan.bias.astype(dtype), f"{name}_B"))
        nodes.append(graph.add_node("Conv", inputs, [out], a2, name=f"{name}_lr2", anchor=node))
    # A Transpose that only fed this weight is dead now; the old weights go when nothing reads them.
    if is_op(weight_producer, "Transpose") and not graph.uses(weight_producer.outputs[0]) \
            and not graph.is_graph_output(weight_producer.outputs[0]):
        old_inputs.append(weight_producer.inputs[0])
        graph.remove_node(weight_producer)
    drop_unused(graph, old_inputs)
    return nodes


# =============================================================================================
# compensation: asymmetric refit (Zhang et al. 2015)


def refit_plan(plan: Plan, gram: Any, ridge: float, shrink: float = 0.0,
               min_rows: float = 4.0) -> tuple[Plan, float] | str:
    """The plan's form and rank refitted to ``min ‖X_c W' + b' − Y‖`` (rank ``W' ≤ r``) from ``gram``.

    ``gram`` (:class:`graphopt.compress.lstsq.CrossGram`) holds ``X_c``, the layer's inputs in the model with the
    layers before it factorized, against ``Y``, the layer's outputs in the model before the pass.
    Reduced-rank regression: the least squares ``W_ls``, then the rank-``r`` truncation of ``W_ls``
    whitened by ``X_c``'s covariance, with the mean error in the bias. Returns the new plan and its relative
    output error against ``Y``, or why it was not refitted.
    """
    from dataclasses import replace

    site = plan.site
    if gram.count < min_rows * gram.features:
        return f"not refitted: {gram.count} rows for {gram.features} features (the refit would fit noise)"
    w_ls, b_ls = gram.solve(ridge)
    moments = Gram()
    moments.xtx, moments.sum, moments.count = gram.xtx[:-1, :-1], gram.xtx[:-1, -1], gram.count
    weight = w_ls if site.kind != "conv" else w_ls.T.reshape(site.weight.shape)
    refit_site = replace(site, weight=weight, bias=b_ls)
    form = forms_of(refit_site, plan.form.name if site.kind == "conv" else "auto")[0]
    stats = Stats(moments)
    factorize_form(form, stats, ridge, shrink)
    new = make_plan(form, plan.rank, stats, True)
    new.latency_ratio = plan.latency_ratio
    p, q = new.factors[0]
    bias = new.bias if new.bias is not None else np.zeros(site.out_features)
    return new, gram.relative_error(form.reconstruct(0, p, q), bias)


def compensate(model: Model, plans: list[Plan], data: SampleData, *, ridge: float, shrink: float, min_rows: float,
               max_rows: int, rng: np.random.Generator, say=None, batch_size: int = 64) -> list[dict[str, Any]]:
    """Apply ``plans`` in order, refitting each to the original outputs from the inputs of the model so far.

    The targets (each layer's output before the pass, at the rows sampled for it) come from one run of
    the model before the pass, held in a :class:`graphopt.compress.reconstruct.TargetStore` (in memory up
    to its budget, the rest in the run's scratch folder). Each layer's inputs are computed from a cut
    that moves forward as layers are factorized (:class:`graphopt.measure.segments.Frontier`): every node
    before the first layer still to factorize is final, so the model runs about twice in all instead of
    once per layer. Layers reading the same tensor (attention's query/key/value) are refitted from one
    pass. Returns one record per plan.
    """
    graph = model.graph
    layers = {p.site.name: lstsq.LinearLayer.of(graph, p.site.node) for p in plans}
    fitted = {name: layer for name, layer in layers.items() if not isinstance(layer, str)}
    batch_size = batch_within(model, {layer.y.name for layer in fitted.values()}, data, batch_size)
    seed = int(rng.integers(2**31))
    records: list[dict[str, Any]] = []
    with rec.TargetStore() as store:
        rec.reference_targets(model, {name: (layer.y.name, None, layer) for name, layer in fitted.items()}, data,
                              store, max_rows=max_rows, seed=seed, batch_size=batch_size)
        frontier = Frontier(data, feed_batch_size(model, batch_size, data))
        pending = [p.site.name for p in plans]
        i = 0
        while i < len(plans):
            group = [plans[i]]
            while i + len(group) < len(plans) and plans[i + len(group)].site.x is plans[i].site.x:
                group.append(plans[i + len(group)])
            i += len(group)
            grams: dict[int, lstsq.CrossGram] = {}
            too_few: dict[int, str] = {}
            rows: dict[int, list] = {}
            for k, p in enumerate(group):
                if p.site.name not in fitted:
                    continue
                rows[k] = store.pop(p.site.name)
                count, features = sum(r.shape[0] for _, r in rows[k]), fitted[p.site.name].features
                if count < min_rows * features:   # refit_plan would refuse: no statistics to gather
                    too_few[k] = f"not refitted: {count} rows for {features} features (the refit would fit noise)"
                    del rows[k]
            names = sorted(rows)
            if names:
                if say is not None:
                    say(f"lowrank: refitting {', '.join(group[k].site.name for k in names)}")
                proto, weights = gort.structure(model)   # by reference: no copy of the model per layer
                position = {n.name: idx for idx, n in enumerate(proto.graph.node)}
                frontier.advance(proto, min(position[n] for n in pending if n in position), weights)
                grams = _group_grams(frontier, proto, [fitted[group[k].site.name] for k in names],
                                     [rows.pop(k) for k in names], names, weights)
                del proto, weights
            for k, plan in enumerate(group):
                pending.remove(plan.site.name)
                why = too_few.get(k) or (None if k in grams else f"not refitted: {layers[plan.site.name]}")
                plan, record = _refitted(plan, grams.get(k), why, ridge, shrink, min_rows)
                records.append(record)
                apply_plan(graph, plan)
    return records


def _refitted(plan: Plan, gram: lstsq.CrossGram | None, why: str | None, ridge: float, shrink: float,
              min_rows: float) -> tuple[Plan, dict[str, Any]]:
    """``plan`` re-fitted on ``gram`` (:func:`refit_plan`) and its record; ``why`` (or the re-fit's own
    refusal) is recorded instead when it is not re-fitted."""
    if why is None:
        refit = refit_plan(plan, gram, ridge, shrink, min_rows)
        if not isinstance(refit, str):
            plan, err = refit
            return plan, {**plan.record(), "rel_error_vs_original_layer": float(f"{err:.6g}")}
        why = refit
    return plan, {**plan.record(), "refit": why}


def compensate_in_shards(model: Model, plans: list[Plan], stream: Any, head: SampleData, *, executor: Any,
                         ridge: float, shrink: float, min_rows: float, max_rows: int, rng: np.random.Generator,
                         say=None, batch_size: int = 64) -> list[dict[str, Any]]:
    """:func:`compensate` on a calibration set in shards (the slices of a ``--data DIR``): the statistics
    of each group of layers reading one tensor are gathered shard by shard through ``executor``
    (:func:`graphopt.compress.refit_shards.gather_layers`; inputs from the model factorized so far,
    targets from a copy of the model before the pass), summed in shard order; ``head`` (samples in memory)
    bounds the batch size. The same bits on every executor; another sample of rows than :func:`compensate`."""
    graph = model.graph
    reference = model.clone()     # the outputs before the pass (weights shared: the plans replace, never write)
    layers = {p.site.name: lstsq.LinearLayer.of(graph, p.site.node) for p in plans}
    fitted = {name: layer for name, layer in layers.items() if not isinstance(layer, str)}
    batch_size = batch_within(model, {layer.y.name for layer in fitted.values()}, head, batch_size)
    seed = int(rng.integers(2**31))
    records: list[dict[str, Any]] = []
    i = 0
    while i < len(plans):
        group = [plans[i]]
        while i + len(group) < len(plans) and plans[i + len(group)].site.x is plans[i].site.x:
            group.append(plans[i + len(group)])
        keys = [k for k, p in enumerate(group) if p.site.name in fitted]
        grams: dict[int, lstsq.CrossGram] = {}
        if keys:
            if say is not None:
                say(f"lowrank: refitting {', '.join(group[k].site.name for k in keys)} (in shards)")
            chosen = [fitted[group[k].site.name] for k in keys]
            parts = refit_shards.gather_layers(
                model, reference, chosen, stream, executor=executor, batch_size=batch_size, fast=True,
                rows=[rec.layer_rows(max_rows, layer.features, layer.out_features) for layer in chosen],
                seed=int(np.random.default_rng([seed, i]).integers(2**31)))   # rows of its own per group
            grams = {k: part[0][0] for k, part in zip(keys, parts)}
        i += len(group)
        for k, plan in enumerate(group):
            why = None if k in grams else f"not refitted: {layers[plan.site.name]}"
            plan, record = _refitted(plan, grams.get(k), why, ridge, shrink, min_rows)
            records.append(record)
            apply_plan(graph, plan)
    return records


def _group_grams(frontier: Frontier, proto: Any, layers: list[lstsq.LinearLayer], targets: list[list],
                 keys: list[int], weights: Mapping[str, np.ndarray] | None = None) -> dict[int, lstsq.CrossGram]:
    """``X_cᵀ[X_c, Y]`` of layers reading one input: ``X_c`` from the frontier (one pass), ``Y`` the stored
    target rows of each layer (the same rows of ``X_c`` as were sampled for the targets). Dense layers whose
    targets kept the same rows (every row, when none had to be sampled: BERT's query/key/value) are gathered
    as one ``[Y₁ Y₂ …]`` and split, so ``X_cᵀX_c`` is computed once."""
    x_name = layers[0].x.name
    batches = list(zip(*targets)) if targets else []
    same_rows = (all(layer.kind != "conv" for layer in layers)       # a conv's rows depend on its geometry
                 and all(all(_same_select(rows[0][0], r[0]) for r in rows) for rows in batches))
    # float32 products (CrossGram.fast): the refit's ridge and the rank truncation are far coarser than them
    joint = lstsq.CrossGram(bias=True, fast=True) if same_rows and len(keys) > 1 else None
    grams = {} if joint is not None else {k: lstsq.CrossGram(bias=True, fast=True) for k in keys}
    for b, batch in enumerate(frontier.batches(proto, [x_name], weights)):
        x = batch[x_name]
        if joint is not None:
            select = batches[b][0][0]
            joint.update(layers[0].rows(x, select), np.concatenate([r[1] for r in batches[b]], axis=1))
            continue
        for k, layer, rows in zip(keys, layers, targets):
            select, y_rows = rows[b]
            grams[k].update(layer.rows(x, select), y_rows)
    if joint is not None:
        return dict(zip(keys, joint.split([layer.out_features for layer in layers])))
    return grams


def _same_select(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


# =============================================================================================
# latency


def _one_layer_model(site: Site) -> Model | None:
    """The site's layer alone (weights as initializers) at its batch-1 shape, as an IR model."""
    if site.x_dims is None or site.y_dims is None:
        return None
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(site.dtype))
    inits = []
    if site.kind == "conv":
        c = site.conv
        inits.append(helper.make_tensor("W", elem, site.weight.shape, site.weight.astype(site.dtype).tobytes(), raw=True))
        ins = ["x", "W"]
        if site.bias is not None:
            inits.append(helper.make_tensor("B", elem, site.bias.shape, site.bias.astype(site.dtype).tobytes(), raw=True))
            ins.append("B")
        node = helper.make_node("Conv", ins, ["y"], **_conv_attrs(site.weight.shape[2:], c.strides, c.pads_begin,
                                                                  c.pads_end, c.dilations, c.group))
    else:
        w = site.weight.astype(site.dtype)
        inits.append(helper.make_tensor("W", elem, w.shape, w.tobytes(), raw=True))
        ins = ["x", "W"]
        if site.kind == "gemm" and site.bias is not None:
            inits.append(helper.make_tensor("B", elem, site.bias.shape, site.bias.astype(site.dtype).tobytes(),
                                            raw=True))
            ins.append("B")
        node = helper.make_node("Gemm" if site.kind == "gemm" else "MatMul", ins, ["y"])
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", elem, list(site.x_dims))],
                              [helper.make_tensor_value_info("y", elem, list(site.y_dims))], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return from_proto(proto)


def measure_latency(plan: Plan, rounds: int = 11, target_seconds: float = 0.005) -> float | None:
    """Time of the factorized layer over the original's: one-layer models at the layer's batch-1 shape,
    onnxruntime with all graph optimizations and one thread, A and B alternating (order flipped every
    round), each round a loop of about ``target_seconds``. The ratio of the *fastest* rounds: on a shared
    machine noise only ever adds time, so the minimum is the stable estimate of what the layer costs.
    """
    import time

    a = _one_layer_model(plan.site)
    if a is None:
        return None
    b = _one_layer_model(plan.site)
    site_b = find_site(b.graph, b.graph.nodes[0], ShapeView(b))
    if isinstance(site_b, str):
        return None
    apply_plan(b.graph, Plan(replace_form(plan.form, site_b), plan.rank, plan.factors, plan.bias))
    sessions = [gort.session(m, optimize=True, threads=1) for m in (a, b)]
    feeds = {"x": np.random.default_rng(0).standard_normal(plan.site.x_dims).astype(plan.site.dtype)}
    for sess in sessions:  # warm up
        sess.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(3):
        sessions[0].run(None, feeds)
    once = max((time.perf_counter() - t0) / 3, 1e-6)
    inner = int(min(max(target_seconds / once, 1), 5000))
    best = [float("inf"), float("inf")]
    for r in range(rounds):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            for _ in range(inner):
                sessions[k].run(None, feeds)
            best[k] = min(best[k], time.perf_counter() - t0)
    return best[1] / best[0]


def replace_form(form: Form, site: Site) -> Form:
    return Form(form.name, site, form.mats, form.facs)


# =============================================================================================
# global target: the allocator of graphopt.compress.budget


def _unit_levels(form: Form, steps: int, min_rank: int = 1) -> list[int]:
    """``[full rank (unfactorized), then ranks >= min_rank that save weights, descending]``."""
    top = form.max_rank
    ranks = sorted({max(1, int(round(top * (k / steps)))) for k in range(1, steps + 1)}, reverse=True)
    ranks = [r for r in ranks if r >= min_rank]
    return [form.full_rank] + ranks


def _with_plans(ectx: Any, plans: list[Plan]) -> Model:
    """A fresh copy of the evaluation context's model with ``plans`` applied (nodes found by name)."""
    model = ectx.fresh_model()
    by_name = {n.name: n for n in model.graph.nodes}
    for plan in plans:
        site = find_site(model.graph, by_name[plan.site.node.name], None)
        apply_plan(model.graph, Plan(replace_form(plan.form, site), plan.rank, plan.factors, plan.bias))
    return model


def _model_error(context: Any, item: tuple[int, int]) -> float:
    """Relative output error of the model with only unit ``item[0]`` factorized at rank ``item[1]``, on a
    copy of the model with the layer split in two (units whose weights cannot be overridden)."""
    ectx, units = context
    key, level = item
    return ectx.error(ectx.run(model=_with_plans(ectx, [units.plan(key, level)])))


# =============================================================================================
# the pass


@dataclass
class Candidate:
    """A site the pass may factorize and its forms that can save weights."""

    site: Site
    forms: list[Form]


@dataclass
class LowRankRun:
    """What the steps of one run share: the model, the pass's options, the resolved settings and the ledger."""

    model: Model
    ctx: PassContext
    opt: Callable[[str], Any]      # option key -> the user's value or the default
    select: str                    # ratio | energy | error | target ("auto" resolved)
    aware: bool                    # data-aware factorization
    left: LeftAlone = field(default_factory=LeftAlone)
    candidates: list[Candidate] = field(default_factory=list)
    stats: dict[int, Stats] = field(default_factory=dict)   # id(node) -> input statistics

    def leave(self, node: Node, reason: str) -> None:
        self.left.add(reason, node.name or node.op_type)

    @property
    def correct_bias(self) -> bool:
        return self.opt("correct_bias") and self.aware

    def samples(self, key: str = "samples") -> SampleData:
        """The first ``opt(key)`` calibration samples."""
        return self.ctx.data.head(min(self.opt(key), self.ctx.data.n_samples))

    def statistics_samples(self) -> Any:
        """What the input statistics stream: every shard of a ``--data DIR`` (their sum needs no sample in
        memory), else :meth:`samples`."""
        stream = self.ctx.data_dir
        return self.samples() if stream is None else stream.slices()

    def site_stats(self, site: Site) -> Stats | None:
        return self.stats.get(id(site.node))

    @property
    def latency(self) -> lat.LatencyModel:
        """The run's target CPU's latency model (MACs with its block geometry when it is uncalibrated)."""
        return targets.of(self.ctx).latency


@register
class LowRank(Pass):
    name = "lowrank"
    summary = "LOSSY: Gemm/MatMul/Conv -> two thin layers by truncated SVD (data-aware whitening with calibration data)"
    lossless = False
    renamed = {"min_params": "min_weights"}
    options = {
        "ops": Option("Gemm,MatMul,Conv", "comma-separated op types to factorize", str),
        "select": Option("auto", "rank selection", str, ("auto", "ratio", "energy", "error", "target")),
        "ratio": Option(0.5, "select=ratio: fraction of each layer's weights kept", float,
                        low=0, high=1, low_open=True),
        "energy": Option(0.95, "select=energy: fraction of the (whitened) spectrum's energy kept", float,
                         low=0, high=1, low_open=True),
        "max_error": Option(0.2, "select=error: largest relative (output) error per layer", float, low=0),
        "form": Option("auto", "conv factorization", str, ("auto", "channel", "spatial")),
        "data_aware": Option("auto", "whiten by the input covariance (auto: when the run has data)", str,
                             ("auto", "on", "off")),
        "correct_bias": Option(True, "data-aware: fold the mean output error into the bias", bool),
        "min_rank": Option(8, "never factorize below this rank (a 10-class head squeezed to rank 4 loses classes)",
                           int, low=1),
        "latency": Option("cost", "drop factorizations that are not faster: by the calibrated latency model "
                                  "(graphopt.measure.latency; deterministic), measured (onnxruntime, not "
                                  "deterministic), or off (keep all)", str, ("cost", "measure", "off")),
        "latency_batch": Option(1, "batch size the latency model predicts at (latency=cost)", int, low=1),
        "max_latency_ratio": Option(1.0, "keep a factorization when factorized/original time is below this", float,
                                    low=0, low_open=True),
        "shrink": Option(0.5, "covariance shrinkage: ridge + shrink * features / rows (weak statistics -> plain SVD)",
                         float, low=0),
        "refit_min_rows": Option(4.0, "compensate: refit only layers with at least this many rows per feature",
                                 float, low=0),
        "target_scope": Option("model", "select=target: fraction of the whole model or of the candidate layers",
                               str, ("model", "layers")),
        "sensitivity": Option("model", "select=target: error per level of the model outputs or of the layer",
                              str, ("model", "layer")),
        "compensate": Option(True, "data-aware: refit each layer, in order, from the inputs of the model "
                                   "factorized so far to the original layer's outputs (asymmetric, Zhang et al. 2015)",
                             bool),
        **calibration(samples=(512, "for the statistics, the compensation and the guard"),
                      max_rows=(8192, "the input rows of the statistics, subsampled"),
                      ridge=(1e-4, "here of the input covariance, added to it before whitening"), min_weights=1024,
                      levels=(8, "select=target: ranks tried per layer"),
                      sensitivity_samples=(256, "select=target, sensitivity=model"),
                      shard_samples=(0, "the input statistics")),
        "sensitivity_tmacs": Option(3.0, "select=target, sensitivity=model: most multiply-accumulates (in 10^12) "
                                         "the table may spend: over it, fewer samples, then fewer measured "
                                         "ranks (the rest from the layer errors, scaled)", float, low=0),
        **guard(guard=(True, "select=target with --max-drop: relax the target until the accuracy drop on the "
                             "calibration samples fits")),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        # One BLAS thread for the many mid-sized products (graphopt.measure.blas); the large ones take every core.
        with blas_threads(1):
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        run = self.start(model, ctx)
        if isinstance(run, str):
            return PassResult(False, {"factorized": 0, "skipped": run})
        select_candidates(run)
        fit_forms(run)
        plans, allocation = plan_for_target(run) if run.select == "target" else (plan_by_rule(run), None)
        kept = keep_faster(run, plans)
        records = apply_plans(run, kept)
        return report(run, plans, kept, records, allocation)

    def start(self, model: Model, ctx: PassContext) -> LowRankRun | str:
        """The run's settings (``select=auto`` and ``data_aware=auto`` resolved), or why the pass does nothing."""
        has_target = ctx.target_params is not None or ctx.target_macs is not None
        select = self.opt(ctx, "select")
        if select == "auto":
            select = "target" if has_target else "ratio"
        if select == "target" and not has_target:
            return "select=target without --target-params/--target-macs"
        aware = self.opt(ctx, "data_aware")
        if aware == "on" and ctx.data is None:
            return "data_aware=on but the run has no data"
        aware = aware == "on" or (aware == "auto" and ctx.data is not None)
        return LowRankRun(model, ctx, lambda key: self.opt(ctx, key), select, aware)


# =============================================================================================
# the steps of a run: select -> fit -> plan -> keep the faster -> apply -> report


def select_candidates(run: LowRankRun) -> None:
    """The layers of ``ops`` (topological order) with a form that saves weights; the rest go to the ledger."""
    graph = run.model.graph
    ops = {o.strip() for o in run.opt("ops").split(",") if o.strip()}
    shapes = ShapeView(run.model)
    concrete = ShapeView(run.model, input_shapes=run.ctx.input_shapes) if run.ctx.input_shapes else shapes
    form_opt = run.opt("form")
    for node in graph.toposort():
        if not is_op(node, *LAYER_OPS) or node.op_type not in ops:
            continue
        site = find_site(graph, node, shapes, concrete)
        if isinstance(site, str):
            run.leave(node, site)
        elif site.params < run.opt("min_weights"):
            run.leave(node, f"fewer than min_weights={run.opt('min_weights')} weights")
        else:
            _add_candidate(run, site, form_opt)


def _add_candidate(run: LowRankRun, site: Site, form_opt: str) -> None:
    forms = forms_of(site, form_opt)
    saving = [f for f in forms if f.max_rank >= 1]
    if saving:
        run.candidates.append(Candidate(site, saving))
    elif forms:
        run.leave(site.node, "no rank saves weights (r(F+O) >= F·O at r = 1)")
    else:
        run.leave(site.node, f"no {form_opt} form for this layer (kernel {list(site.weight.shape[2:])})")


def fit_forms(run: LowRankRun) -> None:
    """Input statistics of every candidate (with data), then the SVD of each form (whitened when data-aware)."""
    ctx = run.ctx
    if ctx.data is not None and run.candidates:
        ctx.say(f"lowrank: input statistics of {len(run.candidates)} layers")
        run.stats = gather_stats(run, [c.site for c in run.candidates], ctx.rng(LowRank.name))
    ridge, shrink = run.opt("ridge"), run.opt("shrink")
    for c in run.candidates:
        for form in c.forms:
            factorize_form(form, run.site_stats(c.site) if run.aware else None, ridge, shrink)


def plan_by_rule(run: LowRankRun) -> list[Plan]:
    """``select`` = ratio / energy / error: per layer, the best valid form at the rank the rule gives."""
    plans = []
    for c in run.candidates:
        plan = _rule_plan(run, c)
        if isinstance(plan, str):
            run.leave(c.site.node, plan)
        else:
            plans.append(plan)
    return plans


def _rule_plan(run: LowRankRun, c: Candidate) -> Plan | str:
    """The candidate's plan: among forms whose rank saves weights and is >= ``min_rank``, the least error
    (``ratio``: the same weights kept by every form) or the fewest MACs (``energy``/``error``)."""
    st = run.site_stats(c.site)
    ranked = [(form, rank_for(form, run.select, run.opt("ratio"), run.opt("energy"), run.opt("max_error")))
              for form in c.forms]
    valid = [make_plan(form, r, st, run.correct_bias) for form, r in ranked if r <= form.max_rank]
    if not valid:
        return f"the selected rank does not save weights (needs r < {ranked[0][0].max_rank + 1})"
    min_rank = run.opt("min_rank")
    valid = [p for p in valid if p.rank >= min_rank]
    if not valid:
        return f"the selected rank is below min_rank={min_rank}"
    if run.select == "ratio":
        return min(valid, key=lambda p: (p.rel_error, p.form.macs(p.rank) or 0))
    return min(valid, key=lambda p: (p.form.macs(p.rank) or 0, p.rel_error))


def keep_faster(run: LowRankRun, plans: list[Plan]) -> list[Plan]:
    """The plans whose factorized layers are faster (``latency`` = cost or measure); all with ``latency=off``."""
    mode = run.opt("latency")
    limit = run.opt("max_latency_ratio")
    kept: list[Plan] = []
    for plan in plans:
        if mode == "measure":
            plan.latency_ratio = measure_latency(plan)
        elif mode == "cost":
            plan.latency_ratio = predicted_ratio(plan.form, plan.rank, run.latency, run.opt("latency_batch"))
        if mode != "off" and plan.latency_ratio is not None and plan.latency_ratio >= limit:
            run.leave(plan.site.node, f"factorized layer is not faster ({mode})")
            continue
        kept.append(plan)
    return kept


def apply_plans(run: LowRankRun, plans: list[Plan]) -> list[dict[str, Any]]:
    """Rewrite the graph; with ``compensate`` (data-aware) each layer is refitted in topological order first."""
    if run.opt("compensate") and run.aware and plans and run.ctx.data_dir is not None:
        # --data DIR: the refit's statistics read every shard, each where its task runs
        return compensate_in_shards(run.model, plans, run.ctx.data_dir.slices(), run.samples(),
                                    executor=executor_for(run.ctx), ridge=run.opt("ridge"),
                                    shrink=run.opt("shrink"), min_rows=run.opt("refit_min_rows"),
                                    max_rows=run.opt("max_rows"), rng=run.ctx.rng(LowRank.name + ".refit"),
                                    say=run.ctx.say)
    if run.opt("compensate") and run.aware and plans:
        return compensate(run.model, plans, run.samples(), ridge=run.opt("ridge"), shrink=run.opt("shrink"),
                          min_rows=run.opt("refit_min_rows"), max_rows=run.opt("max_rows"),
                          rng=run.ctx.rng(LowRank.name + ".refit"), say=run.ctx.say)
    records = []
    for plan in plans:
        records.append(plan.record())
        apply_plan(run.model.graph, plan)
    return records


def report(run: LowRankRun, plans: list[Plan], kept: list[Plan], records: list[dict[str, Any]],
           allocation: dict[str, Any] | None) -> PassResult:
    out: dict[str, Any] = {"factorized": len(kept), "select": run.select, "data_aware": run.aware, "layers": records,
                           "params_before": sum(p.site.params for p in kept),
                           "params_after": sum(p.form.params(p.rank) for p in kept)}
    if run.opt("latency") == "cost":
        out["latency_profile"] = targets.of(run.ctx).line()
    if allocation is not None:
        out["allocation"] = allocation
        if len(kept) < len(plans):
            allocation["note"] = (f"{len(plans) - len(kept)} allocated layers were left alone (latency); "
                                  "the target may not be met: latency=off forces them")
    return PassResult(bool(kept), run.left.into(out))


# =============================================================================================
# select=target: ranks from the allocator of graphopt.compress.budget


@dataclass
class TargetUnits:
    """The allocator's units: unit ``k`` (its key is ``k``) is ``forms[k]`` at a rank. ``plans[k][rank]``
    holds each rank's error and bias without the factors (all ranks of every layer would not fit in
    memory on a large model); :meth:`plan` makes the full plan of one."""

    units: list[budget.Unit] = field(default_factory=list)
    forms: list[Form] = field(default_factory=list)
    plans: list[dict[int, Plan]] = field(default_factory=list)
    stats: list[Stats | None] = field(default_factory=list)
    correct_bias: bool = True

    def plan(self, key: int, rank: int) -> Plan:
        return make_plan(self.forms[key], rank, self.stats[key], self.correct_bias)

    def chosen(self, alloc: budget.Allocation) -> list[Plan]:
        """The plans of the units the allocation factorizes, in unit order."""
        return [self.plan(u.key, alloc.keep[u.key]) for u in self.units if alloc.keep[u.key] != u.levels[0]]


def plan_for_target(run: LowRankRun) -> tuple[list[Plan], dict[str, Any] | None]:
    """Ranks for ``--target-params`` / ``--target-macs`` from :func:`graphopt.compress.budget.allocate`
    (relaxed by :func:`graphopt.compress.budget.guarded` under ``--max-drop`` with labelled data)."""
    ctx = run.ctx
    by_params = ctx.target_params is not None
    target = ctx.target_params if by_params else ctx.target_macs
    units = target_units(run, target, by_params)
    if not units.units:
        return [], None
    # target_units cached every whitened unit form's error terms (make_plan at every level); a spatial
    # form computes its error from the statistics at every plan, so those stay.
    keep = {id(st) for st, form in zip(units.stats, units.forms)
            if form.name == "spatial" or not all(f.whitened for f in form.facs)}
    for st in {id(st): st for st in units.stats if st is not None and id(st) not in keep}.values():
        st.release()
    cost = _target_cost(run, units, by_params)
    sens, sens_stats = _sensitivities(run, units)

    def allocate_at(t: float) -> budget.Allocation:
        return budget.allocate(units.units, sens, cost, t)

    guarded = run.opt("guard") and ctx.max_drop is not None and ctx.data is not None and ctx.data.labels is not None
    alloc, guard_info = _guarded(run, units, allocate_at, target) if guarded else (allocate_at(target), None)
    info: dict[str, Any] = {"target": target, "kind": "params" if by_params else "macs",
                            "scope": run.opt("target_scope"), "cost": round(alloc.cost, 6),
                            "met": alloc.met, "predicted_error": alloc.predicted_error, "sensitivity": sens_stats}
    if guard_info is not None:
        info["guard"] = guard_info
    return units.chosen(alloc), info


def target_units(run: LowRankRun, target: float, by_params: bool) -> TargetUnits:
    """One unit per candidate in its best form; levels are ranks (the full rank first: not factorized)."""
    out = TargetUnits(correct_bias=run.correct_bias)
    for c in run.candidates:
        form = _target_form(run, c, target)
        levels = _target_levels(run, form, by_params)
        if isinstance(levels, str):
            run.leave(c.site.node, levels)
            continue
        st = run.site_stats(c.site)
        out.units.append(budget.Unit(len(out.units), levels))
        out.forms.append(form)
        out.stats.append(st)
        out.plans.append({lv: make_plan(form, lv, st, run.correct_bias, factors=False) for lv in levels[1:]})
    return out


def _target_form(run: LowRankRun, c: Candidate, target: float) -> Form:
    """The form with the smaller error at the target's share of the weights (the first on a tie)."""
    st = run.site_stats(c.site)
    best = None
    for form in c.forms:
        r = min(form.max_rank, max(1, int(target * form.f * form.o / (form.f + form.o))))
        p = make_plan(form, r, st, run.correct_bias, factors=False)
        if best is None or p.rel_error < best.rel_error:
            best = p
    return best.form


def _target_levels(run: LowRankRun, form: Form, by_params: bool) -> list[int] | str:
    """The unit's levels, or why the layer is not a unit. With ``latency=cost`` only ranks the cost model
    finds faster are offered."""
    if not by_params and form.macs(1) is None:
        return "MACs unknown (shapes)"
    levels = _unit_levels(form, run.opt("levels"), run.opt("min_rank"))
    if len(levels) == 1:
        return f"no rank >= min_rank={run.opt('min_rank')} saves weights"
    if run.opt("latency") != "cost":
        return levels
    limit = run.opt("max_latency_ratio")
    fast = [lv for lv in levels[1:]
            if (ratio := predicted_ratio(form, lv, run.latency, run.opt("latency_batch"))) is None or ratio < limit]
    if not fast:
        return "factorized layer is not faster at any rank (cost)"
    return [levels[0], *fast]


def _target_cost(run: LowRankRun, units: TargetUnits, by_params: bool) -> Callable[[dict[int, int]], float]:
    """``keep -> cost`` as a fraction of the whole model (``target_scope=model``) or of the candidate layers."""
    total = analyze(run.model, input_shapes=run.ctx.input_shapes)
    whole = float(total.params if by_params else total.macs)

    def unit_cost(form: Form, level: int, full: bool) -> float:
        s = form.site
        if full:
            return float(s.params if by_params else s.macs())
        return float(form.params(level) if by_params else form.macs(level))

    base = [unit_cost(units.forms[u.key], u.levels[0], True) for u in units.units]
    of_model = run.opt("target_scope") == "model"
    scope = whole if of_model else sum(base)
    rest = whole - sum(base)

    def cost(keep: dict[int, int]) -> float:
        total_cost = rest if of_model else 0.0
        for u in units.units:
            lv = keep.get(u.key, u.levels[0])
            total_cost += unit_cost(units.forms[u.key], lv, lv == u.levels[0])
        return total_cost / scope

    return cost


def _sensitivities(run: LowRankRun, units: TargetUnits) -> tuple[dict[int, dict[int, float]], dict[str, Any]]:
    """Per unit and level: the model's relative output error with that layer alone factorized
    (``sensitivity=model``, with data; :mod:`graphopt.compress.lowrank_table`) or the layer's own
    squared relative error; and the table's stats."""
    ctx = run.ctx
    layer_sq = {u.key: {u.levels[0]: 0.0, **{lv: units.plans[u.key][lv].rel_error ** 2 for lv in u.levels[1:]}}
                for u in units.units}
    if run.opt("sensitivity") != "model" or ctx.data is None:
        return layer_sq, {"kind": "layer"}
    proto, weights = gort.structure(run.model)   # the weights by reference, not a copy of the model
    position = {n.name: i for i, n in enumerate(proto.graph.node)}
    starts = {u.key: position[units.forms[u.key].site.node.name] for u in units.units}
    node_macs = segments.node_macs(run.model, proto, ctx.input_shapes)
    before = np.concatenate([[0.0], np.cumsum(node_macs)])
    suffix = {k: float(before[-1] - before[p]) for k, p in starts.items()}
    data = run.samples("sensitivity_samples")

    def per_sample(n_levels: int) -> float:
        return sum(len(_measured_ranks(u, n_levels)) * suffix[u.key] for u in units.units)

    n_levels, n_samples, table_stats = budget.table_size(
        per_sample, max(len(u.levels) - 1 for u in units.units), data.n_samples,
        float(run.opt("sensitivity_tmacs")) * 1e12, min_levels=1)
    data = data.head(n_samples)
    measured_units = [budget.Unit(u.key, [u.levels[0], *_measured_ranks(u, n_levels)]) for u in units.units]
    slots, by_model = {}, {}
    for u in units.units:
        site = units.forms[u.key].site
        spec = lrt.weight_slots(run.model.graph, site)
        if isinstance(spec, str):
            by_model.setdefault(spec, []).append(site.name)
        elif spec.bias is None and run.correct_bias:
            by_model.setdefault("no bias to write the mean correction to", []).append(site.name)
        else:
            slots[u.key] = spec
    table, stats = lrt.build_table(proto, data, slots, units.plan, starts,
                                   {u.key: len(u.levels) - 1 for u in measured_units}, node_macs,
                                   weights=weights)
    del proto, weights
    ctx.say(f"lowrank: sensitivity of {len(units.units)} layers")
    executor = executor_for(ctx)
    measured = budget.sensitivity([u for u in measured_units if u.key in slots], lrt.measure_by_override,
                                  executor=executor, context=table)
    table.held = None
    rest = [u for u in measured_units if u.key not in slots]
    if rest:   # on a factorized copy, through the table's context (its reference is already there)
        measured.update(budget.sensitivity(rest, _model_error, executor=executor, context=(table.ev, units)))
    stats.update(table=table_stats, by_overrides=len(slots))
    if by_model:
        stats["by_model"] = by_model
    return ({u.key: lrt.gain_filled(measured[u.key], layer_sq[u.key], u.levels) for u in units.units},
            {"kind": "model", **stats})


def _measured_ranks(unit: budget.Unit, n_levels: int) -> list[int]:
    """``n_levels`` of the unit's ranks (its levels after the first), evenly spread from the highest to
    the lowest (one: the middle one)."""
    ranks = unit.levels[1:]
    if n_levels >= len(ranks):
        return list(ranks)
    if n_levels == 1:
        return [ranks[len(ranks) // 2]]
    picks = np.linspace(0, len(ranks) - 1, n_levels).round().astype(int)
    return [ranks[i] for i in sorted(set(picks.tolist()))]


def _guarded(run: LowRankRun, units: TargetUnits, allocate_at: Callable[[float], budget.Allocation],
             target: float) -> tuple[budget.Allocation, dict[str, Any]]:
    """``--max-drop``: relax the target (bisection) until the accuracy drop on the calibration samples fits."""
    ctx = run.ctx
    data = run.samples()
    gctx = EvalContext(run.model, data, batch_size=64)
    context = (gctx, units, gctx.accuracy(gctx.reference()))
    executor = executor_for(ctx)

    def measure_all(allocs: list[budget.Allocation]) -> list[float]:
        return executor.map(_guard_drop, allocs, context=context)

    ctx.say("lowrank: accuracy guard")
    alloc, trace = budget.guarded(allocate_at, lambda a: measure_all([a])[0], ctx.max_drop, target,
                                  measure_all=measure_all, width=executor.workers)
    return alloc, {"max_drop": ctx.max_drop, "samples": data.n_samples,
                   "trace": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in t.items()} for t in trace]}


def _guard_drop(context: Any, alloc: budget.Allocation) -> float:
    """The guard's measurement (runs in executor workers): accuracy drop of the model with ``alloc``'s
    factorizations, on the guard's samples."""
    gctx, units, reference_acc = context
    return reference_acc - gctx.accuracy(gctx.run(model=_with_plans(gctx, units.chosen(alloc))))


def site_seconds(site: Site, latency: lat.LatencyModel, batch: int = 1) -> float | None:
    """Predicted time of the layer as it is."""
    if site.kind != "conv":
        if site.x_dims is None:
            return None
        return latency.gemm(int(prod(site.x_dims[:-1])) * batch, site.weight.shape[0], site.weight.shape[1])
    if site.x_dims is None or site.y_dims is None:
        return None
    c = site.conv
    return latency.conv(batch, c.cin, c.cout, c.kernel, site.x_dims[2:], site.y_dims[2:], c.group)


def predicted_ratio(form: Form, rank: int, latency: lat.LatencyModel, batch: int) -> float | None:
    """Factorized over original predicted time (``None`` when a shape is unknown)."""
    after, before = form.seconds(rank, latency, batch), site_seconds(form.site, latency, batch)
    return None if after is None or not before else after / before
