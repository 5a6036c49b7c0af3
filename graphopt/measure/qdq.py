"""Quantized models as onnxruntime runs them: activation ranges, and what its optimizer fuses.

Activation ranges (:func:`activation_ranges`)
---------------------------------------------
Static quantization maps each float activation ``x`` to 8 bits with a scale and zero point chosen from
its range ``[lo, hi]`` over calibration data. Three calibrators, all streamed through
:class:`~graphopt.measure.calibration.Calibrator` (one batch of activations alive at a time, memory
bounded by the batch and ``BINS`` counters per tensor, never by the sample count):

``minmax``      ``lo = min x``, ``hi = max x`` over all samples (one pass).
``percentile``  the ``p``-th percentile of ``|x|`` (``p = 99.999`` by default) as ``hi`` (and
                ``lo = max(min x, −hi)``: the same clip below zero; the clipped tail is
                the rare outliers that would otherwise widen every step of the grid). Two passes: the
                first finds ``max |x|``, the second counts ``|x|`` in ``BINS`` equal bins below it.
``mse``         the clip ``c`` of ``|x|`` with the least expected squared 8-bit error from the same
                histogram (:func:`mse_clip`): rounding noise ``n(|x| ≤ c) · Δ²/12`` with
                ``Δ = (min(hi, c) − max(lo, −c)) / 255``, plus the clipped tail ``Σ (|x| − c)²``.

Measured on the zoo (BENCHMARKS.md, "int8 quantization"): both clipping calibrators lower every
layer's error against MinMax; ``percentile`` is the quantize pass's default.

onnxruntime's own Entropy and Distribution calibrators are not offered: measured on the zoo, Entropy
with its defaults gives the MinMax ranges at 30-90× the time with more bins, and Distribution loses
70 points at int8 (issue 18).

What onnxruntime fuses (:func:`float_layers`)
-----------------------------------------------
A QDQ model is a float model with ``QuantizeLinear`` / ``DequantizeLinear`` pairs; it is fast only where
onnxruntime's optimizer (``ORT_ENABLE_ALL``) turns ``DQ → Conv → Q`` into an integer kernel
(``QLinearConv``, ``QGemm``, ``QLinearMatMul``, ``MatMulIntegerToFloat``). A layer it cannot fuse runs
as a float layer between a dequantize and a quantize: slower than the float model.
:func:`graphopt.measure.ort.optimized` reads the graph onnxruntime actually runs (written into a scratch
folder of the run, never the current directory); :func:`float_layers` names the layers left float there. Node names survive the optimizer for nodes it does not fuse, which is what makes the
answer per layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.core.errors import GraphoptError
from graphopt.core.ir import Model
from graphopt.measure import ort as gort
from graphopt.measure.calibration import RUN_BYTES, Calibrator, SampleData, batch_within

__all__ = ["BINS", "CALIBRATORS", "QUANT_OPS", "Range", "activation_ranges", "deployed_snr_db", "float_layers", "is_quantized",
           "qdq_aliases"]

CALIBRATORS = ("minmax", "percentile", "mse")
BINS = 2048

# Ops whose presence makes a model a quantized one (for verification: run it as deployed).
QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits",
                       "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul",
                       "MatMulIntegerToFloat", "QGemm"})

# Float kernels of the layers quantization is for, as onnxruntime's optimizer may leave (or rename) them.
_FLOAT_LAYER_OPS = frozenset({"Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"})


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float


def activation_ranges(model: Model, data: SampleData, names: Iterable[str], *, method: str = "minmax",
                      percentile: float = 99.999, batch_size: int = 64, threads: int | None = 1,
                      run_bytes: int = RUN_BYTES) -> dict[str, Range]:
    """``name -> Range`` of each float tensor in ``names`` over ``data`` (module docstring). One run holds
    every tensor of ``names`` for its batch, so the batch shrinks to keep that within ``run_bytes``
    (:data:`graphopt.measure.calibration.RUN_BYTES`; ResNet-50 at 224 x 224: a run of 32 images held
    7.6 GB). The ranges do not depend on the batch: minima, maxima and histogram counts add up."""
    if method not in CALIBRATORS:
        raise GraphoptError(f"unknown calibrator {method!r} (known: {', '.join(CALIBRATORS)})")
    names = list(dict.fromkeys(names))
    lo = dict.fromkeys(names, np.inf)
    hi = dict.fromkeys(names, -np.inf)
    calibrator = Calibrator(model, data, batch_within(model, names, data, batch_size, run_bytes), threads=threads)
    for batch in calibrator.run(names):
        for name, array in batch.items():
            if array.size:
                lo[name] = min(lo[name], float(np.min(array)))
                hi[name] = max(hi[name], float(np.max(array)))
    ranges = {n: Range(float(lo[n]), float(hi[n])) for n in names if np.isfinite(lo[n]) and np.isfinite(hi[n])}
    if method == "minmax":
        return ranges
    top = {n: max(abs(r.lo), abs(r.hi)) for n, r in ranges.items()}
    counts = {n: np.zeros(BINS, dtype=np.int64) for n in ranges}
    for batch in calibrator.run(list(ranges)):
        for name, array in batch.items():
            if top[name] > 0:
                counts[name] += np.histogram(np.abs(array), bins=BINS, range=(0.0, top[name]))[0]
    out = {}
    for name, r in ranges.items():
        total = counts[name].sum()
        if total == 0 or top[name] == 0:
            out[name] = r
            continue
        if method == "mse":
            clip = mse_clip(counts[name], top[name], r)
        else:
            edge = int(np.searchsorted(np.cumsum(counts[name]), percentile / 100.0 * total))
            clip = min(top[name], (edge + 1) * top[name] / BINS)
        out[name] = Range(max(r.lo, -clip) if r.lo < 0 else r.lo, min(r.hi, clip))
    return out


def mse_clip(counts: np.ndarray, top: float, r: Range, levels: int = 255) -> float:
    """The clip ``c`` of ``|x|`` (a bin edge of the histogram ``counts`` over ``[0, top]``) that minimises
    the expected squared 8-bit quantization error: rounding, ``n(|x| <= c) · Δ(c)² / 12`` with
    ``Δ(c) = (min(hi, c) − max(lo, −c)) / 255``, plus clipping, ``Σ_{|x| > c} (|x| − c)²`` (bin centres).
    Never below ``top / 16``."""
    counts = counts.astype(np.float64)
    width = top / len(counts)
    centres = (np.arange(len(counts)) + 0.5) * width
    edges = (np.arange(len(counts)) + 1) * width
    # sums over the bins above each edge: n, Σ centre, Σ centre²
    above = [np.concatenate([np.cumsum(v[::-1])[::-1][1:], [0.0]]) for v in (counts, counts * centres,
                                                                            counts * centres ** 2)]
    clipped = above[2] - 2 * edges * above[1] + edges ** 2 * above[0]
    lo = np.where(r.lo < 0, np.maximum(r.lo, -edges), r.lo)
    step = (np.minimum(r.hi, edges) - lo) / levels
    inside = counts.sum() - above[0]
    cost = inside * step ** 2 / 12 + clipped
    first = len(counts) // 16 - 1
    return float(edges[first + int(np.argmin(cost[first:]))])


def is_quantized(proto: onnx.ModelProto) -> bool:
    """The main graph holds quantization ops (Q/DQ pairs, integer kernels, 4-bit MatMuls)."""
    return any(node.op_type in QUANT_OPS for node in proto.graph.node)


def deployed_snr_db(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], *, threads: int | None = 1) -> float:
    """How closely onnxruntime's fused integer kernels (``ORT_ENABLE_ALL``) reproduce the QDQ model's own
    arithmetic (``ORT_DISABLE_ALL``: dequantize, float op, quantize) on ``feeds``: the SNR in dB of the
    float outputs, lowest over outputs (``inf`` when equal).

    Measured in issue 18 on an AVX2 CPU without VNNI: 8-bit weights against unsigned 8-bit activations
    overflow the int16 pair sums of the u8×s8 multiply (``vpmaddubsw``); deployed and simulated outputs
    then agree at 11-28 dB (resnet −6 points as deployed, while the simulated model loses none), and at
    50-55 dB with 7-bit weights."""
    sim = gort.session(proto, threads=threads)
    dep = gort.session(proto, threads=threads, optimize=True)
    worst = float("inf")
    for a, b in zip(sim.run(None, feeds), dep.run(None, feeds)):
        if a.dtype.kind != "f" or a.shape != b.shape:
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        noise = float(np.sum((a64 - b64) ** 2))
        if noise > 0:
            worst = min(worst, 10.0 * np.log10(max(float(np.sum(a64 ** 2)), 1e-30) / noise))
    return worst


def qdq_aliases(proto: onnx.ModelProto) -> dict[str, str]:
    """Tensor name -> the output of the ``QuantizeLinear → DequantizeLinear`` pair after it: the value the
    quantized model's consumers read in its place."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out = {}
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        dq = next((c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"), None)
        if dq is not None:
            out[node.input[0]] = dq.output[0]
    return out


def float_layers(optimized_proto: onnx.ModelProto) -> set[str]:
    """Names of the Conv / ConvTranspose / Gemm / MatMul nodes onnxruntime's optimized graph still runs in
    float on a dequantized weight (its weight produced by a ``DequantizeLinear``): quantized, but not fused
    into an integer kernel, so the quantization only adds work there. (A layer left float on purpose reads
    its float weight and is not counted.)"""
    producer = {out: node for node in optimized_proto.graph.node for out in node.output}
    names = set()
    for node in optimized_proto.graph.node:
        if node.op_type not in _FLOAT_LAYER_OPS or len(node.input) < 2:
            continue
        weight = producer.get(node.input[1])
        if weight is not None and weight.op_type == "DequantizeLinear":
            names.add(node.name)
    return names
