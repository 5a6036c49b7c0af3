"""Original vs optimized: do two models compute the same thing on the same inputs?

:func:`verify` runs the reference and the candidate in onnxruntime with graph optimizations **off**
(ORT's own fusions would otherwise be applied to the reference as well and hide a bug in ours), batch
by batch, and streams per-output metrics, so memory is bounded by one batch.

Metrics, per output ``a`` (reference) / ``b`` (candidate)
----------------------------------------------------------
* ``max_abs_error = max|a - b|`` and ``mean_abs_error`` over all finite elements;
* ``max_rel_error = max|a - b| / R``, the error relative to the output's range
  ``R = max(a) - min(a)`` over all samples (``R = max|a|`` when the output is constant, ``1`` when it
  is all zeros). Element-wise ``allclose`` fails harmless noise on near-zero elements of deep models;
  the range puts every element's error on the scale of the output as a whole.
* cosine similarity of each sample's flattened output, then its minimum and mean over samples
  (two zero vectors count as 1);
* the signal-to-noise ratio ``snr_db = 10 · log10(Σ a² / Σ (a − b)²)`` in dB over the finite elements
  of all samples, and ``snr_db_min``, the same ratio per sample, at the worst sample (``inf`` when
  ``b = a``, ``−inf`` for a difference on an all-zero reference). Unlike the cosine it sees a scale
  error (``b = 1.25 · a`` is 12 dB); unlike the range-relative error it weighs the whole output, not
  its worst element;
* top-1 agreement when the output looks like class scores (2-D ``[N, C]`` float, ``C > 1``);
* with labels, the accuracy of both models on the first class-score output, and the drop
  ``reference − candidate`` in percentage points.

Integer, bool and string outputs must be equal element for element. Non-finite values must sit at
the same places with the same values (NaN matches NaN). Outputs must match by name, element type
and shape; a mismatch fails with a reason instead of raising.

Roles
-----
Each compared output gets a role (``OutputMetrics.role``), which decides its lossy rule:

* ``"class scores"``: a 2-D ``[N, C]`` float output (``C > 1``) that does not end like an embedding
  (:func:`embedding_outputs`: seen through reshapes, casts and Q/DQ, it comes from a normalisation,
  a pooling, a Tanh pooler, a Gather/Slice/Concat or a Relu); with labels, also the output they
  are scored on;
* ``"exact"``: integer, bool and string outputs;
* every other float output by rank: ``"map"`` (rank >= 3: segmentation and probability maps,
  feature maps, per-step logits, boxes per anchor, recurrent state), ``"vector"`` (rank 2:
  embeddings) or ``"scalar"`` (rank <= 1).

Verdict
-------
``mode="equivalence"`` (lossless rewrites) passes when every output is within tolerance:
``max_abs_error <= max(tol.abs, tol.rel · R)``, plus ``cosine_min >= tol.min_cosine`` and
``snr_db >= tol.min_snr_db`` when those are set.

``mode="accuracy"`` (lossy passes) judges every output by the rule of its role and passes when all pass:

1. class scores: with labels, the labelled output by its accuracy drop ``<= tol.max_drop`` points;
   other class scores, and all of them without labels, by top-1 agreement ``>= 1 − max_drop / 100``;
2. exact outputs: equal element for element;
3. every other float output (map, vector, scalar) by similarity, no labels needed:
   ``snr_db >= tol.min_snr_db`` (auto :data:`AUTO_MIN_SNR_DB_ACCURACY`) and
   ``cosine_min >= tol.min_cosine`` (auto :data:`AUTO_MIN_COSINE_ACCURACY`), and no NaN/inf where the
   reference has another value. The SNR bounds the error energy of the output as a whole (and so
   fails a scaled output, whose cosine stays 1); the worst cosine fails a single sample the
   compression turned away, which the SNR over all samples would average out.

The two thresholds were chosen by applying graphopt's lossy presets at several targets, and
deliberate breakages (a wrong sign, a dropped channel, a scaled output, noise), to trained models'
map, embedding and per-step outputs and to zoo classifiers' intermediate feature maps, and comparing
the gate's verdict with the task score a user sees (``tools/bench_verdicts.py``; the numbers and the
rule's misses are in BENCHMARKS.md).

The automatic tolerance
-----------------------
How much float noise a lossless rewrite makes depends on the model: depth, widths, value ranges. The
reference itself tells us: onnxruntime's own graph optimizations (``ORT_ENABLE_ALL``: BN folding,
conv+activation fusion, layout changes) are lossless rewrites too, so the difference they make,
``d_ort = max|a_opt − a| / R`` (max over float outputs, same inputs), measures this model's noise.
The auto tolerance is::

    rel = min(cap, max(floor, k · d_ort)),  floor = max(floor_0, 4 · eps · L)

with ``k = 8``, ``floor_0 = 1e-5`` and ``cap = 5e-4`` for float32/float64 outputs, ``eps`` the float32
machine epsilon and ``L`` the number of Conv/Gemm/MatMul-like nodes on the reference's longest path.
``abs`` auto means no absolute criterion (0); ``min_cosine`` auto is not enforced in equivalence mode.

Measurements behind the constants (onnxruntime 1.31, CPU; standard normal inputs, 64 samples and 3
seeds per conv row, 256 samples and 2 seeds per MLP row; errors relative to the output's range; conv
nets = 3x3 conv-BN-ReLU chains with residual adds, 16 channels unless said; MLPs = MatMul-Add-Mul-Add
chains whose per-feature affine is folded into the weights; BN folded by hand in float64):

===============================  ===============  ===================  ==========================
model                            ``d_ort``        lossless fold        injected bugs
===============================  ===============  ===================  ==========================
conv, 8 layers                   3.3e-7 – 4.2e-7  1.4e-7 – 2.8e-7      ≥ 1.6e-3
conv, 24 layers                  3.1e-7 – 3.9e-7  3.2e-7 – 3.7e-7      ≥ 4.7e-3
conv, 40 layers, 32 channels     3.2e-7 – 6.1e-7  2.7e-7 – 3.5e-7      ≥ 7.9e-3
conv, 64 layers                  1.0e-6 – 2.1e-6  1.0e-6 – 2.3e-6      ≥ 1.2e-2
MLP + erf-GELU, 4 – 100 layers   2.1e-7 – 1.4e-5  5.7e-7 – 2.3e-5      —
MLP + ReLU, 4 – 100 layers       0 (no fusion)    4.0e-7 – 1.0e-5      —
===============================  ===============  ===================  ==========================

Bugs injected in a middle layer: BN folded with a wrong epsilon (1e-3 for 1e-5; the smallest, 1.6e-3),
off-by-one padding (1.6e-2 – 1.8e-1), spatially transposed kernel (3.2e-2 – 1.7e-1), in/out channels
swapped (5.2e-2 – 5.0e-1). So: the fold error is at most 2.6 × ``d_ort`` when ORT changes anything
(``k = 8`` leaves a 3× margin); ORT changes nothing on a plain MLP, where the fold error grows by
about one float32 eps per layer (``4 · eps · L`` leaves a 4× margin, the 1e-5 floor covers shallow
models); and the cap stays 3× below the smallest real bug. A one-channel bias error of 0.1 is
caught when it matters against that layer's activations: 8e-4 – 1e-2 of the output range on the
8 – 24 layer nets, but only 7e-6 – 1e-3 on the 40 – 64 layer ones whose activations grow into the
thousands, where the smallest of them pass: that is the price of never failing a deep model's
lossless rewrite.
float16/bfloat16 outputs use ``floor_0 = 1e-2`` (about ten float16 ulps) and ``cap = 5e-2``, with the
same float32 ``eps`` in the depth term (onnxruntime's CPU kernels accumulate in float32): a guess, not
measured.

First divergence
----------------
When equivalence fails, :func:`first_divergence` names the first tensor, in the reference's
topological order, where the models differ: it exposes every value both models define under the same
name, runs them on the few samples whose outputs differed most, and compares each value that has the
same shape and type in both. A lossless rewrite may legitimately give a name new contents (a folded
conv's output holds the post-BN values under the conv's name); such a difference vanishes at the next
comparable tensors downstream. So a diverging tensor is reported only when a comparable tensor right
after it also diverges, or when nothing comparable follows it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper

from graphopt.core.errors import DataError, GraphoptError, OptionError
from graphopt.core.ir import dims_of
from graphopt.core.onnx_io import by_reference, from_proto
from graphopt.measure import ort as gort
from graphopt.measure import qdq
from graphopt.measure.calibration import (SampleData, check_data, feed_batch_size, input_specs, reference_outputs,
                                          sample_rows)

MODES = ("equivalence", "accuracy")

# The automatic tolerance (see the module docstring for the measurements behind these numbers).
AUTO_K = 8.0
AUTO_DEPTH_EPS = 4.0
_F32_EPS = float(np.finfo(np.float32).eps)
_AUTO_LIMITS = {  # output element type -> (floor_0, cap)
    onnx.TensorProto.FLOAT: (1e-5, 5e-4),
    onnx.TensorProto.DOUBLE: (1e-5, 5e-4),
    onnx.TensorProto.FLOAT16: (1e-2, 5e-2),
    onnx.TensorProto.BFLOAT16: (1e-2, 5e-2),
}
SIMILARITY_ROLES = ("map", "vector", "scalar")  # float outputs the lossy verdict judges by similarity
# The lossy gate for outputs that are not class scores (module docstring, "Verdict"; BENCHMARKS.md).
AUTO_MIN_COSINE_ACCURACY = 0.95
AUTO_MIN_SNR_DB_ACCURACY = 24.0
MAC_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "Gemm", "MatMul", "MatMulInteger",
                     "QLinearMatMul", "Einsum", "Attention", "MultiHeadAttention", "LSTM", "GRU", "RNN"})

DIVERGENCE_SAMPLES = 8
DIVERGENCE_CHUNK = 64  # values exposed per onnxruntime session while searching the first divergence

_FLOAT_TYPES = frozenset(_AUTO_LIMITS)


# ===============================================================================================
# tolerance and report


@dataclass
class Tolerance:
    """What counts as "the same". ``None`` means automatic (see the module docstring).

    Attributes
    ----------
    rel : allowed ``max|a − b|`` as a fraction of the reference output's range.
    abs : allowed ``max|a − b|`` in the output's units; an output passes if within either bound.
    max_drop : allowed accuracy drop in percentage points (accuracy mode).
    min_cosine : required minimum per-sample cosine similarity.
    min_snr_db : required signal-to-noise ratio in dB of each float output that is not class scores.
    """

    rel: float | None = None
    abs: float | None = None
    max_drop: float = 1.0
    min_cosine: float | None = None
    min_snr_db: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, (int, float)) or math.isnan(value) or value < 0):
                raise OptionError(f"tolerance {f.name} must be a non-negative number, got {value!r}")
        if self.min_cosine is not None and self.min_cosine > 1:
            raise OptionError(f"tolerance min_cosine must be at most 1, got {self.min_cosine}")


@dataclass
class OutputMetrics:
    """How one output of the candidate compares with the reference's.

    ``kind`` is ``"float"`` (compared within tolerance) or ``"exact"`` (integers, bool, strings); for an
    output the model declares without a type it is decided by the computed array (``"unknown"`` if
    never computed).
    ``bound`` is the allowed ``max_abs_error`` for this output. ``compared`` is false when the output
    could not be compared at all (missing, other type or shape); ``reason`` then says why.
    ``snr_db`` is the signal-to-noise ratio over all samples and ``snr_db_min`` its worst sample
    (``inf`` when the candidate equals the reference). ``role`` is what the output holds for the
    lossy verdict (``"class scores"``, ``"map"``, ``"vector"``, ``"scalar"``, ``"exact"``), ``rule`` the
    criterion that judged it, and ``passed`` that criterion's verdict in the report's mode.
    """

    name: str
    dtype: str
    shape: list[int | str | None] | None
    kind: str
    compared: bool = True
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    max_rel_error: float | None = None
    ref_range: float | None = None
    bound: float | None = None
    cosine_min: float | None = None
    cosine_mean: float | None = None
    snr_db: float | None = None
    snr_db_min: float | None = None
    top1_agreement: float | None = None
    mismatches: int | None = None
    nonfinite_mismatches: int = 0
    elements: int = 0
    role: str | None = None
    rule: str | None = None
    passed: bool = False
    reason: str | None = None


@dataclass
class Divergence:
    """The first tensor (reference topological order) where the two models differ.

    ``rel_error`` is ``max_abs_error`` relative to the reference tensor's range (``None`` for exact
    types). ``checked`` tensors were compared on ``samples`` samples; ``skipped`` shared a name but not
    a shape or type.
    """

    name: str
    op_type: str
    node: str
    max_abs_error: float | None
    rel_error: float | None
    shape: list[int]
    checked: int
    skipped: int
    samples: int


@dataclass
class VerifyReport:
    """The verdict of :func:`verify` and the numbers behind it. :meth:`to_dict` is JSON-ready.

    Attributes
    ----------
    metrics : reference output name -> :class:`OutputMetrics`.
    tolerance : the tolerance applied: ``rel``, ``abs``, ``max_drop``, ``min_cosine``, ``min_snr_db``, and
        under ``auto`` the derivation of an automatic ``rel`` (``ort_rel_diff``, ``k``, ``floor``, ``cap``,
        ``mac_depth``).
    reasons : one line per cause of failure (empty when passed); each output's own verdict, role and
        rule are in its :class:`OutputMetrics`.
    accuracy_reference, accuracy_candidate, accuracy_drop : percent and percentage points, with labels.
    top1_agreement, class_output : fraction of samples whose top-1 class agrees, on that output.
    first_divergence : on an equivalence failure, where the models first differ (or ``None``).
    notes : what was done to the data or the method (casts, an ignored label file...).
    """

    passed: bool
    mode: str
    n_samples: int
    metrics: dict[str, OutputMetrics]
    tolerance: dict[str, Any]
    reasons: list[str] = field(default_factory=list)
    accuracy_reference: float | None = None
    accuracy_candidate: float | None = None
    accuracy_drop: float | None = None
    top1_agreement: float | None = None
    class_output: str | None = None
    first_divergence: Divergence | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain dicts, lists, str, int, float, bool and None: no numpy types, NaN -> None,
        and the infinite SNR of an output the candidate reproduces exactly -> ``"Infinity"`` (strict JSON
        has no infinity; the same spelling as the optimize report's)."""
        return _plain(asdict(self))

    def summary(self) -> str:
        """One line: the verdict and the worst numbers."""
        verdict = "PASS" if self.passed else "FAIL"
        worst = max((m.max_rel_error for m in self.metrics.values() if m.max_rel_error is not None), default=None)
        parts = [f"{verdict} ({self.mode}, {self.n_samples} samples)"]
        if worst is not None:
            parts.append(f"max error {worst:.2e} of range (tolerance {self.tolerance['rel']:.2e})")
        if self.accuracy_drop is not None:
            parts.append(f"accuracy {self.accuracy_reference:.2f}% -> {self.accuracy_candidate:.2f}%")
        elif self.top1_agreement is not None:
            parts.append(f"top-1 agreement {100 * self.top1_agreement:.2f}%")
        judged = [m.snr_db for m in self.metrics.values() if m.role in SIMILARITY_ROLES and m.snr_db is not None]
        if self.mode == "accuracy" and judged:
            parts.append(f"worst output SNR {min(judged):.1f} dB")
        return ", ".join(parts)


def _plain(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


# ===============================================================================================
# comparing one output, streamed


def _range_of(lo: float, hi: float) -> float:
    """The denominator of range-relative errors, guarded for constant and all-zero outputs."""
    if hi > lo:
        return hi - lo
    scale = max(abs(lo), abs(hi)) if math.isfinite(lo) and math.isfinite(hi) else 0.0
    return scale if scale > 0 else 1.0


def _float_diff(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(both finite, non-finite mismatch, |a − b| where both are finite else 0)`` of two float64 arrays.

    NaN against NaN and an infinity against the same infinity count as equal; any other place where
    either side is not finite is a mismatch, which no tolerance excuses.
    """
    both = np.isfinite(a) & np.isfinite(b)
    bad = ~both & ~((a == b) | (np.isnan(a) & np.isnan(b)))
    with np.errstate(invalid="ignore"):  # inf - inf at places ``both`` already excludes
        diff = np.where(both, np.abs(a - b), 0.0)
    return both, bad, diff


def _finite_min_max(a: np.ndarray) -> tuple[float, float]:
    """Min and max over the finite elements (``(inf, -inf)`` when there are none)."""
    finite = a[np.isfinite(a)]
    return (float(finite.min()), float(finite.max())) if finite.size else (math.inf, -math.inf)


def _snr_db(signal: np.ndarray | float, noise: np.ndarray | float) -> np.ndarray:
    """``10 · log10(signal / noise)`` of energies: ``inf`` without noise (also for a zero signal),
    ``-inf`` for noise on a zero signal."""
    signal, noise = np.asarray(signal, np.float64), np.asarray(noise, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = 10.0 * np.log10(signal / noise)
    return np.where(noise == 0, np.inf, np.where(signal == 0, -np.inf, ratio))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``[rows, features]`` float64 arrays; two zero rows give 1."""
    dot = np.einsum("ij,ij->i", a, b)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    cos = np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, cos))
    return np.clip(cos, -1.0, 1.0)


def is_class_scores(array: np.ndarray, rows: int | None = None) -> bool:
    """A float ``[rows, classes]`` array with more than one class (any row count when ``rows`` is None)."""
    return (array.dtype.kind == "f" and array.ndim == 2 and array.shape[1] > 1
            and (rows is None or array.shape[0] == rows))


def top1_correct(model, data: SampleData, batch_size: int = 64) -> np.ndarray | None:
    """Per sample of labelled ``data``, whether the top score of ``model``'s first graph output is the
    label; ``None`` when that output is not class scores (one row per sample): there is no verdict."""
    scores = next(iter(reference_outputs(model, data, batch_size=batch_size).values()))
    if not is_class_scores(scores, data.n_samples):
        return None
    return scores.argmax(axis=1) == data.labels


class _Comparison:
    """Streams one output's comparison; also the reference-vs-ORT-optimized difference for the auto tolerance."""

    def __init__(self, metrics: OutputMetrics, n_samples: int) -> None:
        self.m = metrics
        self.n = n_samples
        self.sample_error = np.zeros(n_samples)  # per-sample max |a-b| (inf for a non-finite mismatch)
        self.ref_lo, self.ref_hi = math.inf, -math.inf
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.finite = 0
        self.cosines: list[np.ndarray] = []
        self.signal = 0.0  # sum of a^2 over the finite elements
        self.noise = 0.0  # sum of (a - b)^2 over the finite elements
        self.sample_snr: list[np.ndarray] = []
        self.rank = 0  # of the reference output array
        self.embedding = False  # an [N, C] output that ends like an embedding (see embedding_outputs)
        self.agree = 0
        self.class_rows = 0
        self.classes = 0
        self.ref_pred: np.ndarray | None = None
        self.cand_pred: np.ndarray | None = None
        self.ort_max_abs = 0.0
        self.broken = False
        self.updated = False

    def update(self, a: np.ndarray, b: np.ndarray, start: int, rows: int, a_opt: np.ndarray | None) -> None:
        if self.broken:
            return
        if a.shape != b.shape or a.dtype != b.dtype:
            self._break(f"output {self.m.name!r}: candidate gives {b.dtype}{list(b.shape)}, "
                        f"reference {a.dtype}{list(a.shape)}")
            return
        if self.m.kind == "unknown":  # the model declares no type: go by what it computes
            self.m.kind = "float" if a.dtype.kind == "f" else "exact"
            self.m.dtype = _type_name(onnx.helper.np_dtype_to_tensor_dtype(a.dtype)) if a.dtype != object else "string"
        self.updated = True
        per_sample = a.ndim > 0 and a.shape[0] == rows
        if self.m.kind == "exact":
            self._update_exact(a, b, start, rows, per_sample)
        else:
            self._update_float(a, b, start, rows, per_sample, a_opt)

    def _break(self, reason: str) -> None:
        self.broken = True
        self.m.compared = False
        self.m.reason = reason

    def _update_exact(self, a: np.ndarray, b: np.ndarray, start: int, rows: int, per_sample: bool) -> None:
        differ = a != b
        self.m.mismatches = (self.m.mismatches or 0) + int(differ.sum())
        self.m.elements += a.size
        if per_sample:
            self.sample_error[start:start + rows] += differ.reshape(rows, -1).sum(axis=1)
        elif differ.any():
            self.sample_error[start:start + rows] += 1

    def _update_float(self, a: np.ndarray, b: np.ndarray, start: int, rows: int, per_sample: bool,
                      a_opt: np.ndarray | None) -> None:
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        both, bad, diff = _float_diff(a64, b64)
        self.m.nonfinite_mismatches += int(bad.sum())
        self.m.elements += a.size
        if a.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.sum_abs += float(diff.sum())
            self.finite += int(both.sum())
            lo, hi = _finite_min_max(a64)
            self.ref_lo, self.ref_hi = min(self.ref_lo, lo), max(self.ref_hi, hi)
        err = np.where(bad, np.inf, diff)
        view_rows = rows if per_sample else 1
        self.rank = a.ndim
        self.sample_error[start:start + rows] = err.reshape(view_rows, -1).max(axis=1, initial=0.0)
        fa, fb = np.where(both, a64, 0.0).reshape(view_rows, -1), np.where(both, b64, 0.0).reshape(view_rows, -1)
        self.cosines.append(_cosines(fa, fb))
        signal, noise = np.einsum("ij,ij->i", fa, fa), np.einsum("ij,ij->i", fa - fb, fa - fb)
        self.signal += float(signal.sum())
        self.noise += float(noise.sum())
        self.sample_snr.append(_snr_db(signal, noise))
        if is_class_scores(a, rows):
            self._update_classes(a64, b64, start, rows)
        if a_opt is not None and a_opt.shape == a.shape:
            _, _, opt_diff = _float_diff(a64, a_opt.astype(np.float64))
            self.ort_max_abs = max(self.ort_max_abs, float(opt_diff.max(initial=0.0)))

    def _update_classes(self, a: np.ndarray, b: np.ndarray, start: int, rows: int) -> None:
        if self.ref_pred is None:
            self.ref_pred = np.full(self.n, -1, dtype=np.int64)
            self.cand_pred = np.full(self.n, -1, dtype=np.int64)
        self.classes = a.shape[1]
        ra, rb = a.argmax(axis=1), b.argmax(axis=1)
        self.ref_pred[start:start + rows] = ra
        self.cand_pred[start:start + rows] = rb
        self.agree += int((ra == rb).sum())
        self.class_rows += rows

    # --- results ------------------------------------------------------------------------------
    @property
    def range(self) -> float:
        return _range_of(self.ref_lo, self.ref_hi)

    @property
    def ort_rel_diff(self) -> float:
        return self.ort_max_abs / self.range

    @property
    def is_class_output(self) -> bool:
        return self.ref_pred is not None and self.class_rows == self.n

    def finish(self, rel: float, abs_tol: float, min_cosine: float | None, min_snr_db: float | None = None) -> None:
        """Fill the metrics and judge this output against the tolerance."""
        m = self.m
        if self.broken or not m.compared or not self.updated:
            m.passed = False
            m.compared = m.compared and self.updated  # never run: nothing to report
            return
        if m.kind == "exact":
            m.mismatches = m.mismatches or 0
            m.passed = m.mismatches == 0
            if not m.passed:
                m.reason = (f"output {m.name!r}: {m.mismatches} of {m.elements} elements differ "
                            f"({m.dtype} outputs must match exactly)")
            return
        self._finish_float(rel, abs_tol, min_cosine, min_snr_db)

    def _finish_float(self, rel: float, abs_tol: float, min_cosine: float | None, min_snr_db: float | None) -> None:
        m = self.m
        m.max_abs_error = self.max_abs
        m.mean_abs_error = self.sum_abs / self.finite if self.finite else 0.0
        m.ref_range = self.range
        m.max_rel_error = self.max_abs / self.range
        m.bound = max(abs_tol, rel * self.range)
        cos = np.concatenate(self.cosines) if self.cosines else np.ones(1)
        m.cosine_min, m.cosine_mean = float(cos.min()), float(cos.mean())
        m.snr_db = float(_snr_db(self.signal, self.noise))
        m.snr_db_min = float(np.concatenate(self.sample_snr).min()) if self.sample_snr else m.snr_db
        if self.class_rows:
            m.top1_agreement = self.agree / self.class_rows
        problems = []
        if m.nonfinite_mismatches:
            problems.append(f"{m.nonfinite_mismatches} NaN/inf values where the other model has a different value")
        if m.max_abs_error > m.bound:
            problems.append(f"max error {m.max_abs_error:.3g} is {m.max_rel_error:.2e} of the output's range "
                            f"{m.ref_range:.3g}, above the tolerance {rel:.2e}")
        if min_cosine is not None and m.cosine_min < min_cosine:
            problems.append(f"min cosine similarity {m.cosine_min:.6f} is below {min_cosine}")
        if min_snr_db is not None and m.snr_db < min_snr_db:
            problems.append(f"SNR {m.snr_db:.1f} dB is below {min_snr_db:g} dB")
        m.passed = not problems
        m.reason = f"output {m.name!r}: " + "; ".join(problems) if problems else None


# ===============================================================================================
# the verification


@dataclass
class _Model:
    """One side of the comparison: its proto (the structure), the weights its sessions take by reference
    (:func:`graphopt.measure.ort.structure`: an IR model's arrays, or a file's embedded weights decoded
    once), the path sessions load when its weights are in external data files (onnxruntime reads them
    itself, and a model over 2 GiB is never held twice), a name for messages, and its session."""

    proto: onnx.ModelProto
    source: gort.ModelLike
    label: str
    session: Any = None
    weights: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model: gort.ModelLike, role: str) -> _Model:
        label = f"{role} {gort.describe(model)}"
        if isinstance(model, (str, os.PathLike)):
            proto = gort.as_proto(model, external_data=False)
            if any(external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
                return cls(proto, model, label)
            proto, weights = by_reference(proto)
            return cls(proto, None, label, weights=weights)
        proto, weights = gort.structure(model)
        return cls(proto, None, label, weights=weights)

    def runnable(self) -> gort.ModelLike | gort.Structure:
        """What a session or :func:`first_divergence` takes: the path, or the proto and its weights."""
        return self.source if self.source is not None else (self.proto, self.weights)

    def new_session(self, **options: Any) -> Any:
        if self.source is not None:
            return gort.session(self.source, **options)
        return gort.session(self.proto, weights=self.weights, **options)


def _tensor_type(vi: onnx.ValueInfoProto) -> tuple[int | None, list[int | str | None] | None]:
    if not vi.type.HasField("tensor_type"):
        return None, None
    dims = dims_of(vi.type)
    return vi.type.tensor_type.elem_type or None, (None if dims is None else list(dims))


def _type_name(elem_type: int | None) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "unknown"


def _static_conflict(a: list | None, b: list | None) -> bool:
    if a is None or b is None:
        return False
    if len(a) != len(b):
        return True
    return any(isinstance(x, int) and isinstance(y, int) and x > 0 and y > 0 and x != y for x, y in zip(a, b))


def _interface(ref: onnx.ModelProto, cand: onnx.ModelProto, n: int) -> tuple[list[_Comparison], list[str]]:
    """Match the outputs by name; returns a comparison per reference output and interface problems."""
    reasons = []
    cand_outputs = {vi.name: vi for vi in cand.graph.output}
    ref_names = [vi.name for vi in ref.graph.output]
    comparisons = []
    embeddings = embedding_outputs(ref)
    for vi in ref.graph.output:
        dtype, shape = _tensor_type(vi)
        kind = "unknown" if dtype is None else "float" if dtype in _FLOAT_TYPES else "exact"
        metrics = OutputMetrics(vi.name, _type_name(dtype), shape, kind)
        other = cand_outputs.get(vi.name)
        if other is None:
            metrics.compared, metrics.reason = False, f"output {vi.name!r}: the candidate has no output of that name"
        else:
            cdtype, cshape = _tensor_type(other)
            if dtype and cdtype and dtype != cdtype:
                metrics.compared = False
                metrics.reason = (f"output {vi.name!r}: candidate type {_type_name(cdtype)}, "
                                  f"reference {_type_name(dtype)}")
            elif _static_conflict(shape, cshape):
                metrics.compared = False
                metrics.reason = f"output {vi.name!r}: candidate shape {cshape}, reference {shape}"
        if metrics.reason:
            reasons.append(metrics.reason)
        comparisons.append(_Comparison(metrics, n))
        comparisons[-1].embedding = vi.name in embeddings
    for name in cand_outputs:
        if name not in ref_names:
            reasons.append(f"output {name!r}: the candidate has it, the reference does not")
    return comparisons, reasons


# Ops that pass a value on without computing on it: the embedding test looks through them.
_PASS_THROUGH = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Dropout",
                           "QuantizeLinear", "DequantizeLinear"})
# How embeddings end and class scores do not: a normalisation (x / |x|, LayerNorm), a pooling over
# positions or space, a Tanh pooler, a picked token, or features still behind their activation.
_EMBEDDING_OPS = frozenset({"Div", "LpNormalization", "LayerNormalization", "ReduceMean", "ReduceSum",
                            "ReduceMax", "ReduceL2", "GlobalAveragePool", "GlobalMaxPool", "Tanh", "Gather",
                            "Slice", "Concat", "Relu"})


def embedding_outputs(proto: onnx.ModelProto) -> set[str]:
    """The graph outputs that hold embeddings: seen through :data:`_PASS_THROUGH` ops, the value comes
    from one of :data:`_EMBEDDING_OPS`.

    An ``[N, C]`` float output (``C > 1``) is taken for class scores (judged by top-1 agreement) unless
    it is listed here (judged by similarity, like a map).
    """
    producer = {name: node for node in proto.graph.node for name in node.output if name}
    found = set()
    for vi in proto.graph.output:
        node = producer.get(vi.name)
        while node is not None and node.op_type in _PASS_THROUGH and node.input:
            node = producer.get(node.input[0])
        if node is not None and node.op_type in _EMBEDDING_OPS:
            found.add(vi.name)
    return found


def _candidate_data(cand: onnx.ModelProto, data: SampleData) -> tuple[SampleData | None, str | None]:
    """The data restricted to the candidate's inputs and checked against them, or the reason it cannot run."""
    names = {s.name for s in input_specs(cand)}
    subset = data.subset(names)
    try:
        return check_data(cand, subset), None
    except DataError as exc:
        return None, f"the candidate does not accept the reference's inputs: {exc}"


def mac_depth(proto: onnx.ModelProto) -> int:
    """The number of Conv/Gemm/MatMul-like nodes on the longest path of the main graph.

    Each such node accumulates long dot products, so float noise grows with this count.
    """
    depth: dict[str, int] = {}
    best = 0
    for node in proto.graph.node:  # ONNX requires topological order, so inputs are seen first
        d = max((depth.get(name, 0) for name in node.input), default=0) + (node.op_type in MAC_OPS)
        for name in node.output:
            depth[name] = d
        best = max(best, d)
    return best


def auto_tolerance(ort_rel_diff: float | None, depth: int, elem_type: int | None) -> dict[str, Any]:
    """The automatic relative tolerance and its derivation (see the module docstring)."""
    floor0, cap = _AUTO_LIMITS.get(elem_type or onnx.TensorProto.FLOAT, _AUTO_LIMITS[onnx.TensorProto.FLOAT])
    eps = _F32_EPS
    floor = max(floor0, AUTO_DEPTH_EPS * eps * depth)
    scaled = AUTO_K * ort_rel_diff if ort_rel_diff is not None else 0.0
    rel = min(cap, max(floor, scaled))
    return {"rel": rel, "ort_rel_diff": ort_rel_diff, "k": AUTO_K, "floor": floor, "floor_0": floor0, "cap": cap,
            "mac_depth": depth, "eps": eps, "dtype": _type_name(elem_type or onnx.TensorProto.FLOAT)}


def _least_precise(comparisons: Sequence[_Comparison]) -> int | None:
    order = [onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16]
    present = [onnx.TensorProto.DataType.Value(c.m.dtype.upper()) for c in comparisons
               if c.m.kind == "float" and c.m.dtype != "unknown"]
    return max(present, key=order.index) if present else None


def verify(reference: gort.ModelLike, candidate: gort.ModelLike, data: SampleData, *,
           tolerance: Tolerance | None = None, mode: str = "equivalence", batch_size: int = 64,
           threads: int | None = None, find_divergence: bool = True,
           as_deployed: bool = True) -> VerifyReport:
    """Compare ``candidate`` against ``reference`` on ``data`` in onnxruntime (optimizations off).

    Parameters
    ----------
    reference, candidate : IR Model, ModelProto, serialized bytes or path.
    data : sample inputs (validated against the reference's inputs); labels enable accuracy.
    tolerance : ``None`` or ``None`` fields: automatic (module docstring).
    mode : ``"equivalence"`` (lossless) or ``"accuracy"`` (lossy).
    batch_size : samples per run (a static batch dim overrides it); memory is bounded by one batch.
    find_divergence : on an equivalence failure, search the first diverging tensor.
    as_deployed : a quantized candidate of a float reference runs with onnxruntime's optimizations on, its
        integer kernels as deployed (default). ``False`` judges its QDQ arithmetic instead: for a target
        CPU whose integer kernels this machine does not have (``graphopt.measure.target``), what this
        machine's kernels would make of it is not what the target's will.

    Returns
    -------
    VerifyReport
        ``passed`` false with ``reasons`` for a failing candidate, including one onnxruntime rejects
        or cannot run, or one whose outputs do not match by name, type or shape.

    Raises
    ------
    GraphoptError
        The *reference* cannot be loaded or run, or the data does not fit it (DataError), or the labels
        name a class the class-score output does not have.
    OptionError
        An unknown ``mode``.
    """
    if mode not in MODES:
        raise OptionError(f"unknown verify mode {mode!r}; expected one of {', '.join(MODES)}")
    tol = tolerance or Tolerance()
    ref = _Model.of(reference, "reference")
    cand = _Model.of(candidate, "candidate")
    data = check_data(ref.proto, data)
    comparisons, blocking = _interface(ref.proto, cand.proto, data.n_samples)
    blocking.extend(lost_dynamic_dims(ref.proto, cand.proto))
    notes = list(data.notes)
    ref.session = ref.new_session(threads=threads)
    quantized = qdq.is_quantized(cand.proto) and not qdq.is_quantized(ref.proto)
    deployed = quantized and as_deployed
    if deployed:
        notes.append("the candidate is quantized: it runs with onnxruntime's graph optimizations on, as deployed "
                     "(its integer kernels are what is judged; the reference runs with them off)")
    elif quantized:
        notes.append("the candidate is quantized for another CPU's integer kernels: its QDQ arithmetic is judged "
                     "(onnxruntime's optimizations off), not this machine's kernels")
    cand.session = _candidate_session(cand, data, threads, blocking, optimize=deployed)
    # The float-noise yardstick (onnxruntime's own optimizations against none) sets the automatic relative
    # tolerance, which only the equivalence verdict applies; a lossy verdict judges by its role rules, so
    # it is not built there (a third full session and a third run of the model on a large one).
    opt_session = (_optimized_session(ref, threads, notes)
                   if tol.rel is None and mode == "equivalence" else None)
    ran, measured = False, False
    if cand.session is not None:
        batch = feed_batch_size(ref.proto, batch_size, data)
        ran, measured = _stream(ref, cand, opt_session, data, comparisons, batch, blocking, notes)
    resolved = _resolve(tol, comparisons, ref.proto, measured, mode)
    for c in comparisons:
        c.finish(resolved["rel"], resolved["abs"], tol.min_cosine, tol.min_snr_db)
    report = VerifyReport(False, mode, data.n_samples, {c.m.name: c.m for c in comparisons}, resolved,
                          list(blocking), notes=notes)
    if ran:
        _accuracy(report, comparisons, data)
    # Interface and run problems fail the candidate in both modes; only then do the metrics decide.
    report.passed = ran and not blocking and _verdict(report, comparisons, tol)
    if (not report.passed and find_divergence and ran
            and any(c.m.compared and not c.m.passed for c in comparisons)):
        # A lossy candidate differs everywhere a little: there a tensor diverges when its SNR falls below
        # the lossy gate's, not when it leaves float noise.
        min_snr = resolved.get("min_snr_db") if mode == "accuracy" else None
        ref.session = cand.session = opt_session = None   # the search builds its own: not four at once
        _locate(report, ref, cand, data, comparisons, resolved, batch_size, threads,
                min_snr_db=(min_snr if min_snr is not None else AUTO_MIN_SNR_DB_ACCURACY) if mode == "accuracy"
                else None)
    return report


def _candidate_session(cand: _Model, data: SampleData, threads: int | None, blocking: list[str],
                       optimize: bool = False) -> Any:
    """The candidate's session, or ``None`` with the reason in ``blocking`` (it cannot take the data or load)."""
    _, problem = _candidate_data(cand.proto, data)
    if problem:
        blocking.append(problem)
        return None
    try:
        return cand.new_session(threads=threads, optimize=optimize)
    except GraphoptError as exc:
        blocking.append(f"candidate: {exc}")
        return None


def _optimized_session(model: _Model, threads: int | None, notes: list[str]) -> Any:
    try:
        return model.new_session(optimize=True, threads=threads)
    except GraphoptError as exc:
        notes.append(f"auto tolerance: onnxruntime's optimized session failed ({exc}); using the floor")
        return None


def _stream(ref: _Model, cand: _Model, opt_session: Any, data: SampleData, comparisons: list[_Comparison],
            batch: int, blocking: list[str], notes: list[str]) -> tuple[bool, bool]:
    """Run both models (and the ORT-optimized reference) batch by batch, feeding every comparison.

    Returns ``(ran, measured)``: ``ran`` is false when the candidate fails to run (the reason is
    appended to ``blocking``); ``measured`` says the optimized reference ran on every batch.
    """
    names = [c.m.name for c in comparisons]
    wanted = [c for c in comparisons if c.m.compared]
    for start, stop in data.spans(batch):
        feeds = data.feed(start, stop)
        a = _rows(gort.run(ref.session, feeds, names, what=ref.label), data)
        try:
            b = _rows(gort.run(cand.session, feeds, [c.m.name for c in wanted], what=cand.label), data)
        except GraphoptError as exc:
            blocking.append(f"candidate: {exc}")
            return False, False
        a_opt = None
        if opt_session is not None:
            try:
                a_opt = _rows(gort.run(opt_session, feeds, names, what=ref.label), data)
            except GraphoptError as exc:
                notes.append(f"auto tolerance: the optimized reference failed to run ({exc}); using the floor")
                opt_session = None
        for c in wanted:
            c.update(a[c.m.name], b[c.m.name], start, stop - start, None if a_opt is None else a_opt[c.m.name])
    blocking.extend(c.m.reason for c in wanted if c.broken)
    return True, opt_session is not None


def _rows(outputs: dict[str, np.ndarray], data: SampleData) -> dict[str, np.ndarray]:
    return {name: sample_rows(array, data) for name, array in outputs.items()}


def _resolve(tol: Tolerance, comparisons: Sequence[_Comparison], ref: onnx.ModelProto, measured: bool,
             mode: str) -> dict[str, Any]:
    """The tolerance actually applied, with the derivation of every automatic value."""
    resolved: dict[str, Any] = {"rel": tol.rel, "abs": tol.abs if tol.abs is not None else 0.0,
                                "max_drop": tol.max_drop, "min_cosine": tol.min_cosine,
                                "min_snr_db": tol.min_snr_db, "auto": None}
    if tol.rel is None:
        floats = [c for c in comparisons if c.m.kind == "float" and c.m.compared and not c.broken]
        diff = max((c.ort_rel_diff for c in floats), default=0.0) if measured else None
        auto = auto_tolerance(diff, mac_depth(ref), _least_precise(comparisons))
        resolved["rel"], resolved["auto"] = auto["rel"], auto
    if tol.min_cosine is None and mode == "accuracy":
        resolved["min_cosine"] = AUTO_MIN_COSINE_ACCURACY
    if tol.min_snr_db is None and mode == "accuracy":
        resolved["min_snr_db"] = AUTO_MIN_SNR_DB_ACCURACY
    return resolved


def _accuracy(report: VerifyReport, comparisons: Sequence[_Comparison], data: SampleData) -> None:
    """Top-1 agreement and, with labels, both accuracies on the first class-score output.

    Class scores are ``[N, C]`` floats (``C > 1``) that do not end like an embedding (see
    :func:`embedding_outputs`); with labels, the first ``[N, C]`` float output serves when all end so
    (the labels say it holds classes).
    """
    shaped = [c for c in comparisons if c.m.compared and not c.broken and c.is_class_output]
    cls = next((c for c in shaped if not c.embedding), shaped[0] if shaped and data.labels is not None else None)
    if cls is None:
        if data.labels is not None:
            report.notes.append("labels ignored: no output looks like class scores ([N, C] float, C > 1)")
        return
    report.class_output = cls.m.name
    report.top1_agreement = cls.agree / cls.class_rows
    if data.labels is None:
        return
    top = int(data.labels.max())
    if top >= cls.classes:
        raise DataError(f"{data.source}: labels hold class id {top} but output {cls.m.name!r} has "
                        f"{cls.classes} classes")
    n = len(data.labels)
    ref_right, cand_right = int((cls.ref_pred == data.labels).sum()), int((cls.cand_pred == data.labels).sum())
    report.accuracy_reference = 100.0 * ref_right / n
    report.accuracy_candidate = 100.0 * cand_right / n
    report.accuracy_drop = 100.0 * (ref_right - cand_right) / n  # from the counts: 20.0, not 20.000000000000004


def _verdict(report: VerifyReport, comparisons: Sequence[_Comparison], tol: Tolerance) -> bool:
    """The metrics' verdict for the report's mode; appends the reasons of a failure."""
    _assign_roles(report, comparisons)
    if report.mode == "equivalence":
        for c in comparisons:
            c.m.rule = _equivalence_rule(c.m, report.tolerance)
        report.reasons.extend(c.m.reason for c in comparisons if not c.m.passed and c.m.reason)
        return all(c.m.passed for c in comparisons)
    return _lossy_verdict(report, comparisons, tol)


def _assign_roles(report: VerifyReport, comparisons: Sequence[_Comparison]) -> None:
    """What each compared output holds: class scores (the class output and any other ``[N, C]`` head),
    exact values, or a float map (rank >= 3), vector (rank 2) or scalar (rank <= 1) per sample."""
    for c in comparisons:
        m = c.m
        if not m.compared:
            continue
        if m.kind == "exact":
            m.role = "exact"
        elif m.name == report.class_output or (c.is_class_output and not c.embedding):
            m.role = "class scores"
        else:
            # The declared rank when there is one: the arrays may carry a sample axis the model has not.
            rank = len(m.shape) if m.shape is not None else c.rank
            m.role = "map" if rank >= 3 else "vector" if rank == 2 else "scalar"


def _equivalence_rule(m: OutputMetrics, tolerance: Mapping[str, Any]) -> str | None:
    if not m.compared:
        return None
    if m.kind == "exact":
        return "equal"
    rel = f"{tolerance['rel']:.1e} of range"
    parts = [f"error <= max({tolerance['abs']:g}, {rel})" if tolerance.get("abs") else f"error <= {rel}"]
    if tolerance.get("min_cosine") is not None:
        parts.append(f"cos >= {tolerance['min_cosine']:g}")
    if tolerance.get("min_snr_db") is not None:
        parts.append(f"SNR >= {tolerance['min_snr_db']:g} dB")
    return ", ".join(parts) or None


def _lossy_verdict(report: VerifyReport, comparisons: Sequence[_Comparison], tol: Tolerance) -> bool:
    """Every compared output passes the rule of its role (module docstring, "Verdict")."""
    ok = True
    for c in comparisons:
        m = c.m
        if not m.compared:
            continue
        if m.kind == "exact":
            m.rule = "equal"  # finish() judged it
        elif m.role == "class scores":
            _judge_class_scores(report, m, tol)
        else:
            _judge_similarity(m, report.tolerance["min_snr_db"], report.tolerance["min_cosine"])
        if not m.passed:
            ok = False
            report.reasons.append(m.reason or f"output {m.name!r}: failed")
    return ok


def _judge_class_scores(report: VerifyReport, m: OutputMetrics, tol: Tolerance) -> None:
    """The labelled class output by its accuracy drop, any other class scores by top-1 agreement."""
    m.reason = None
    if m.name == report.class_output and report.accuracy_drop is not None:
        m.rule = f"accuracy drop <= {tol.max_drop:g} pt"
        m.passed = report.accuracy_drop <= tol.max_drop
        if not m.passed:
            m.reason = (f"accuracy dropped {report.accuracy_drop:.2f} points ({report.accuracy_reference:.2f}% -> "
                        f"{report.accuracy_candidate:.2f}%), above the allowed {tol.max_drop}")
        return
    need = 1.0 - tol.max_drop / 100.0
    m.rule = f"top-1 agreement >= {100 * need:.4g}%"
    m.passed = m.top1_agreement is not None and m.top1_agreement >= need
    if not m.passed:
        m.reason = (f"top-1 agreement on {m.name!r} is {100 * (m.top1_agreement or 0.0):.2f}%, "
                    f"below {100 * need:.2f}% (1 - max_drop/100)")


def _judge_similarity(m: OutputMetrics, min_snr_db: float, min_cosine: float) -> None:
    """A float output that is not class scores: ``snr_db >= min_snr_db``, ``cosine_min >= min_cosine``
    and no NaN/inf where the reference has another value."""
    m.rule = f"SNR >= {min_snr_db:g} dB, cos >= {min_cosine:g}"
    problems = []
    if m.nonfinite_mismatches:
        problems.append(f"{m.nonfinite_mismatches} NaN/inf values where the other model has a different value")
    if m.snr_db is not None and m.snr_db < min_snr_db:
        problems.append(f"SNR {m.snr_db:.1f} dB is below {min_snr_db:g} dB")
    if m.cosine_min is not None and m.cosine_min < min_cosine:
        problems.append(f"min cosine similarity {m.cosine_min:.6f} is below {min_cosine}")
    m.passed = not problems
    m.reason = f"output {m.name!r}: " + "; ".join(problems) if problems else None


def _worst_samples(comparisons: Sequence[_Comparison], n: int, count: int) -> np.ndarray:
    """Indices of the ``count`` samples whose outputs differ most (range-relative, over all outputs)."""
    score = np.zeros(n)
    for c in comparisons:
        if c.m.compared and not c.broken:
            scale = c.range if c.m.kind == "float" else 1.0
            score = np.maximum(score, c.sample_error / scale)
    order = np.argsort(-score, kind="stable")
    return np.sort(order[:count])


def _locate(report: VerifyReport, ref: _Model, cand: _Model, data: SampleData, comparisons: Sequence[_Comparison],
            resolved: dict[str, Any], batch_size: int, threads: int | None, min_snr_db: float | None = None) -> None:
    unit = feed_batch_size(ref.proto, 1, data)  # a static batch dim, else 1: take whole batches of samples
    count = min(data.n_samples, -(-DIVERGENCE_SAMPLES // unit) * unit)
    subset = data.take(_worst_samples(comparisons, data.n_samples, count))
    try:
        report.first_divergence = first_divergence(ref.runnable(), cand.runnable(), subset,
                                                   rel=resolved["rel"] or 0.0, abs_tol=resolved["abs"],
                                                   batch_size=batch_size, threads=threads, min_snr_db=min_snr_db)
    except GraphoptError as exc:
        report.notes.append(f"first divergence not searched: {exc}")


# ===============================================================================================
# first divergence


@dataclass
class _Check:
    diverged: bool
    max_abs: float | None
    rel: float | None
    shape: list[int]


def first_divergence(reference: gort.ModelLike, candidate: gort.ModelLike, data: SampleData, *, rel: float,
                     abs_tol: float = 0.0, batch_size: int = 64, threads: int | None = None,
                     chunk: int = DIVERGENCE_CHUNK, min_snr_db: float | None = None) -> Divergence | None:
    """The first tensor of ``reference`` (topological order) where ``candidate`` differs beyond tolerance.

    Compares every value both models define under the same name (the reference's node outputs; the
    candidate's node outputs or initializers) that has the same shape and type in both, on ``data``
    (keep it small: every compared tensor of a chunk of ``chunk`` values is held at once). A value
    diverges when ``max|a − b| > max(abs_tol, rel · range(a))``, or for exact types when any element
    differs. It is reported only when one of the nearest comparable values after it also diverges or
    none follows (see the module docstring). Returns ``None`` when nothing diverges.

    With ``min_snr_db`` (lossy candidates), a float value diverges when its SNR against the reference is
    below it instead. A quantized candidate's value is read where the model uses it: through the
    QuantizeLinear → DequantizeLinear pair after it (:func:`graphopt.measure.qdq.qdq_aliases`; the quantizer
    folds a Relu into the quantization range, so the raw tensor before the pair is not the reference's).
    """
    (ref_proto, ref_weights), (cand_proto, cand_weights) = gort.structure(reference), gort.structure(candidate)
    graph = from_proto(_topology(ref_proto)).graph
    order = graph.toposort()
    cand_defined = ({name for node in cand_proto.graph.node for name in node.output if name}
                    | {t.name for t in cand_proto.graph.initializer})
    producer = {v.name: node for node in order for v in node.outputs if v is not None}
    names = [name for name in producer if name in cand_defined]
    alias = qdq.qdq_aliases(cand_proto)
    checks: dict[str, _Check] = {}
    ref_data = check_data(ref_proto, data)
    cand_data, problem = _candidate_data(cand_proto, ref_data)
    if problem:
        raise GraphoptError(problem)
    # One sample per run (a static batch dim: one batch): every exposed value of a chunk is compared and
    # dropped batch by batch, so memory holds one sample of a chunk's values (a BERT-base search held
    # 8 samples of 64 values in each model at once, beside two sessions).
    batch = feed_batch_size(ref_proto, 1, ref_data)
    for start in range(0, len(names), chunk):
        part = names[start:start + chunk]
        cand_names = list(dict.fromkeys(alias.get(n, n) for n in part))
        ref_sess = gort.session(gort.with_outputs(ref_proto, part), threads=threads, weights=ref_weights)
        cand_sess = gort.session(gort.with_outputs(cand_proto, cand_names), threads=threads, weights=cand_weights)
        diffs = {name: _RunningDiff() for name in part}
        for ref_feed, cand_feed in zip(ref_data.batches(batch), cand_data.batches(batch)):
            a = gort.run(ref_sess, ref_feed, part, what="reference")
            b = gort.run(cand_sess, cand_feed, cand_names, what="candidate")
            for name in part:
                diffs[name].add(sample_rows(a[name], ref_data), sample_rows(b[alias.get(name, name)], cand_data))
        del ref_sess, cand_sess
        for name in part:
            check = diffs[name].check(rel, abs_tol, min_snr_db)
            if check is not None:
                checks[name] = check
    for name in names:
        check = checks.get(name)
        if check is None or not check.diverged:
            continue
        frontier = _next_comparable(graph, producer[name], name, checks)
        if not frontier or any(checks[f].diverged for f in frontier):
            node = producer[name]
            return Divergence(name, node.op_type, node.name, check.max_abs, check.rel, check.shape,
                              checked=len(checks), skipped=len(names) - len(checks), samples=data.n_samples)
    return None


def _topology(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with every initializer's data left out (name, type and dims kept): what the search walks
    is the graph's topology, and a copy of a large model's weights in an IR was most of its memory."""
    light = onnx.ModelProto()
    light.ir_version = proto.ir_version
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    graph = light.graph
    for field_name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, field_name).extend(getattr(proto.graph, field_name))
    graph.name = proto.graph.name
    for t in proto.graph.initializer:
        stub = graph.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
    return light


class _RunningDiff:
    """The comparison of one intermediate tensor, accumulated over batches: max |a − b|, the reference's
    finite range, its energy and the error's, and whether any non-finite value or (exact types) any
    element differs. The rule (:meth:`check`): a float tensor diverges on a non-finite mismatch or on
    ``max|a − b| > max(abs_tol, rel · range(a))`` (with ``min_snr_db``: an SNR below it); an exact type
    when any element differs; ``None`` when a batch had another shape or type in the two models."""

    def __init__(self) -> None:
        self.comparable = True
        self.shape: list[int] | None = None
        self.exact: bool | None = None
        self.bad = False
        self.max_abs, self.lo, self.hi = 0.0, math.inf, -math.inf
        self.signal = self.noise = 0.0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if not self.comparable:
            return
        if a.shape != b.shape or a.dtype != b.dtype:
            self.comparable = False
            return
        if self.shape is None:
            self.shape, self.exact = list(a.shape), a.dtype.kind not in "fc"
        elif a.ndim and self.shape and a.shape[1:] == tuple(self.shape[1:]):
            self.shape[0] += a.shape[0]                 # samples along the batch axis
        if self.exact:
            self.bad = self.bad or bool(np.any(a != b))
            return
        a64 = a.astype(np.float64)
        _, bad, diff = _float_diff(a64, b.astype(np.float64))
        lo, hi = _finite_min_max(a64)
        self.bad = self.bad or bool(bad.any())
        self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.signal += float(np.sum(a64[np.isfinite(a64)] ** 2))
        self.noise += float(np.sum(diff ** 2))

    def check(self, rel: float, abs_tol: float, min_snr_db: float | None) -> _Check | None:
        if not self.comparable or self.shape is None:
            return None
        if self.exact:
            return _Check(self.bad, None, None, self.shape)
        scale = _range_of(self.lo, self.hi)
        if min_snr_db is not None:
            diverged = self.bad or float(_snr_db(self.signal, self.noise)) < min_snr_db
        else:
            diverged = self.bad or self.max_abs > max(abs_tol, rel * scale)
        return _Check(diverged, self.max_abs, self.max_abs / scale, self.shape)


def _next_comparable(graph, node, name: str, checks: Mapping[str, _Check]) -> set[str]:
    """The comparable values nearest after ``name``: walk consumers through values that cannot be compared."""
    value = next(v for v in node.outputs if v is not None and v.name == name)
    frontier: set[str] = set()
    stack, seen = [value], {value}
    while stack:
        current = stack.pop()
        for consumer in graph.consumers(current):
            for out in consumer.outputs:
                if out is None or out in seen:
                    continue
                seen.add(out)
                if out.name in checks:
                    frontier.add(out.name)
                else:
                    stack.append(out)
    return frontier


__all__ = ["Tolerance", "OutputMetrics", "Divergence", "VerifyReport", "verify", "first_divergence",
           "auto_tolerance", "mac_depth", "embedding_outputs", "run_alike", "lost_dynamic_dims", "is_class_scores",
           "top1_correct"]


# ===============================================================================================
# shape-only checks


def run_alike(reference: gort.ModelLike, candidate: gort.ModelLike, data: SampleData, *,
              threads: int | None = None) -> list[str]:
    """Problems found running both models on ``data``: the candidate fails, or an output's shape or element
    type differs from the reference's (values are not compared). Empty when they run alike."""
    (ref, ref_weights), (cand, cand_weights) = gort.structure(reference), gort.structure(candidate)
    data = check_data(ref, data)
    cand_data, problem = _candidate_data(cand, data)
    if problem:
        return [problem]
    names = [vi.name for vi in ref.graph.output]
    ref_session = gort.session(ref, threads=threads, weights=ref_weights)
    try:
        cand_session = gort.session(cand, threads=threads, weights=cand_weights)
    except GraphoptError as exc:
        return [f"candidate: {exc}"]
    for feeds in data.batches(feed_batch_size(ref, 64, data)):
        a = gort.run(ref_session, feeds, names, what="reference")
        try:
            b = gort.run(cand_session, {k: v for k, v in feeds.items() if k in cand_data.inputs}, names,
                         what="candidate")
        except GraphoptError as exc:
            return [f"candidate: {exc}"]
        problems = [f"output {n!r}: candidate {b[n].dtype}{list(b[n].shape)}, reference {a[n].dtype}{list(a[n].shape)}"
                    for n in names if a[n].shape != b[n].shape or a[n].dtype != b[n].dtype]
        if problems:
            return problems
    return []


def lost_dynamic_dims(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> list[str]:
    """Graph inputs and outputs whose dynamic dim (a name, unnamed or ``-1``) the candidate fixed to a size: the
    optimized model must take every shape the original took."""
    problems = []
    for kind, ref_vis, cand_vis in (("input", reference.graph.input, candidate.graph.input),
                                    ("output", reference.graph.output, candidate.graph.output)):
        cand_dims = {vi.name: dims_of(vi.type) for vi in cand_vis}
        for vi in ref_vis:
            before, after = dims_of(vi.type), cand_dims.get(vi.name)
            if before is None or after is None or len(before) != len(after):
                continue
            for axis, (a, b) in enumerate(zip(before, after)):
                if not isinstance(a, int) and isinstance(b, int):
                    problems.append(f"{kind} {vi.name!r} axis {axis} was dynamic ({a or '?'}) and is fixed to {b}")
    return problems
