"""A calibrated latency model of onnxruntime's CPU kernels: predicted seconds per node, from shapes.

MACs do not say what a layer costs. On the 2-core AVX2 machines graphopt is measured on, a depthwise
3x3 conv takes ~6x the time per MAC of a wide 1x1 conv, a 16-output conv ~2x, and a conv whose input
channels are not a multiple of 4 leaves onnxruntime's blocked (NCHWc) kernels for im2col + GEMM. The
passes that trade error for speed (``prune_filters`` prices channels in time, ``lowrank`` keeps a
factorization only when it is faster) need a cost that knows this, and the same one every run: the
written model must not depend on how loaded the machine was. So the model is *calibrated once* per kind
of CPU (``graphopt calibrate``, :mod:`graphopt.measure.calibrate`, times ~600 kernels with onnxruntime's
profiler) and its coefficients are stored: ``graphopt/data/latency_avx2.json`` ships with graphopt, a
calibration of the machine at hand goes to the user's cache; predictions are a pure function of shapes.
Which profile a run uses is its target CPU's (:mod:`graphopt.measure.target`); a kind no one has
calibrated gets :meth:`LatencyModel.macs_only`: MACs with the kind's block geometry.

The model
---------
Each node is put in a *kind*, the kernel family onnxruntime runs it with (``ENABLE_ALL``, one thread):

==============  ==================================================================================
``pointwise``   Conv 1x1, group 1, on the NCHWc path
``conv``        other group-1 and grouped (not depthwise) Conv on the NCHWc path
``depthwise``   depthwise Conv (``group == Cin == Cout``) on the NCHWc path
``im2col``      a group-1 Conv off the NCHWc path (onnxruntime's im2col + SGEMM ``FusedConv``)
``grouped_im2col`` a grouped or depthwise Conv off the NCHWc path (one small GEMM per group: ~1 ns/MAC,
                ten times a blocked depthwise conv)
``gemm``        Gemm and MatMul with a 2-D constant or activation right operand (MLAS SGEMM)
``elementwise`` everything else that moves data: activations, Add/Mul, BatchNorm, pooling...
==============  ==================================================================================

and costs ``t = c · φ`` with non-negative coefficients ``c`` (seconds per unit) of the features

    ``φ = (1, MACs, output elements, input elements, weight elements, inner calls)``

(for ``elementwise``: ``(1, 0, elements, 0, 0, 0)``, the elements of its largest input or output). The constant is the per-kernel dispatch; MACs the
arithmetic; output elements the per-output work a short reduction does not amortize (what makes small
convs slow per MAC); input and weight elements the memory traffic and packing. Non-negative
coefficients make every prediction grow with every channel count — what the allocator and the
factorization test rely on. *Inner calls* are the kernel's own loop over small pieces of work, each
with a fixed overhead: the NCHWc kernels run once per image, block of 8 output channels and output row
(a 7x7 depthwise conv at batch 64 spends most of its time there: per MAC it is 2x slower than at
14x14), im2col convs once per image and group (a depthwise conv off the blocked path is one tiny
GEMM per channel).

The NCHWc path (read off onnxruntime by :mod:`graphopt.measure.kernels` and stored with the
coefficients): a 2-D Conv goes to the blocked kernels when its input channels are below the block size or
a multiple of ``input_multiple`` (4 with AVX2; :meth:`Nchwc.nchwc` has the grouped cases); the channels
are then padded up to ``block`` (8 with AVX2, 16 with AVX-512), so a 12-channel conv costs like a
16-channel one (``padded=True``). A block of 1 means no blocked kernels at all (ARM64 release builds).
Polynomial costs over channel counts (:func:`graphopt.compress.budget.PolynomialCost`) use
``padded=False``: the allocator only offers counts in whole units of the target
(:mod:`graphopt.compress.channels.units`).

int8
----
onnxruntime's fused int8 kernels (static QDQ after its optimizer, dynamic MatMul) have kinds of their own,
with the same features: ``int8_conv`` (``QLinearConv``, NHWC, no channel blocks: unpadded features,
:func:`int8_work`), ``int8_depthwise``, ``int8_gemm`` (``QLinearMatMul`` / ``QGemm``),
``int8_dynamic_gemm`` (``DynamicQuantizeMatMul``, its input's quantization included) and ``convert`` (a
``QuantizeLinear``, ``DequantizeLinear`` or layout ``Transpose`` / ``Reorder`` over its elements). They
are optional in a profile (:attr:`LatencyModel.has_int8`): one calibrated before them prices no int8
kernel, and the quantize pass then falls back to the CPU kind's int8 rate
(:mod:`graphopt.compress.int8speed`). They are fitted in the float kinds' time base (each int8
kernel timed beside its float twin, :func:`graphopt.measure.calibrate.fit`), so an int8 price compares
with a float one as the two kernels compared on the machine. Measured on the AVX2 machine
(``tools/calibrate_latency.py int8``): an int8 conv costs float's per MAC (2.26e-11 s; float 2.26e-11
pointwise, 2.53e-11 other convs), 2.1x its cost per output element and 2.6x its dispatch: no conv of
the Fashion-MNIST zoo is priced faster as int8 at batch 1, 23 of ResNet-50's 53 at 224 x 224 are.

Refusal: a node whose shapes are unknown costs ``None`` (the caller decides; never a silent 0); an op
in a custom domain or a control-flow op costs ``None``.

A profile was measured on one kind of CPU; on another (AVX-512: 16-channel blocks) its predictions are
deterministic but not that CPU's: graphopt prices for the target CPU's profile, and MACs with the target's
block geometry where it has none (``graphopt calibrate`` on the target makes one).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from math import ceil, prod
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.core.ir import Node, Value

KINDS = ("pointwise", "conv", "depthwise", "im2col", "grouped_im2col", "gemm", "elementwise")
#: The int8 kernels (module docstring, "int8"); optional in a profile: one calibrated before them has none.
INT8_KINDS = ("int8_conv", "int8_depthwise", "int8_gemm", "int8_dynamic_gemm", "convert")
#: Ops of an optimized graph that only convert between float and int8 or between layouts: ``convert``.
CONVERT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Transpose", "ReorderInput", "ReorderOutput"})
FEATURES = ("kernel", "macs", "outputs", "inputs", "weights", "calls")
DEFAULT_PROFILE = Path(__file__).parents[1] / "data" / "latency_avx2.json"

#: Ops that cost nothing at run time in onnxruntime (views, shape arithmetic, constants).
FREE = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Constant", "Dropout",
                  "Size", "ConstantOfShape"})
#: Ops this model does not cost (control flow, whose bodies run an unknown number of times).
UNKNOWN = frozenset({"If", "Loop", "Scan"})

Dims = Sequence[int]


@dataclass(frozen=True)
class Work:
    """What one kernel does: its kind and feature vector (see the module docstring)."""

    kind: str
    features: tuple[float, ...]

    def scaled(self, batch: int) -> Work:
        """The same kernel ``batch`` times over (computed at batch 1): everything but the dispatch and
        the weights scales with the batch."""
        one, macs, outputs, inputs, weights, calls = self.features
        return Work(self.kind, (one, macs * batch, outputs * batch, inputs * batch, weights, calls * batch))


@dataclass(frozen=True)
class Nchwc:
    """Which Conv runs on onnxruntime's blocked NCHWc kernels."""

    block: int = 8
    input_multiple: int = 4
    #: blocks of output channels a blocked dense conv computes per pass over its input (MLAS's NCHWc
    #: conv kernels take up to 4 filter blocks at a time); not stored in profiles
    filter_set: int = 4

    def nchwc(self, cin: int, cout: int, group: int, spatial_dims: int) -> bool:
        """Whether onnxruntime runs this Conv on the blocked kernels (read off onnxruntime 1.31 with AVX2:
        group 1 with fewer input channels than a block or a multiple of ``input_multiple``; depthwise
        with a multiple of ``input_multiple`` channels; other grouped convs with whole blocks per group
        on both sides)."""
        if spatial_dims != 2 or self.block <= 1:  # a block of 1: no NCHWc kernels (ARM64 release builds)
            return False
        if group == 1:
            return cin < self.block or cin % self.input_multiple == 0
        if group == cin == cout:
            return cin % self.input_multiple == 0
        return (cin // group) % self.block == 0 and (cout // group) % self.block == 0

    def pad(self, c: int) -> int:
        return int(ceil(c / self.block) * self.block)

    def pass_factor(self, cout: int) -> float:
        """What a blocked dense conv's MAC-proportional time is charged per MAC, relative to a conv whose
        output channels fill whole filter sets (``block · filter_set``, 32 on AVX2): ``(1 + S·⌈c/S⌉/c)/2``.

        The kernel makes one pass over its input per filter set; half of the MAC-proportional time is that
        pass (reading and broadcasting every input value once for up to ``S`` outputs), half the
        multiply-adds. A partial set pays its whole pass: 8 of 32 channels cost 2.5x per MAC, 40 channels
        (two passes) 1.3x. Measured on AVX2 (3x3 convs with 8-64 outputs at 7x7-28x28, BENCHMARKS.md,
        "Target CPUs": the step-aware price)."""
        width = self.block * self.filter_set
        if cout <= 0 or width <= 1:
            return 1.0
        return 0.5 * (1.0 + width * ceil(cout / width) / cout)


def conv_work(batch: int, cin: int, cout: int, kernel: Dims, in_spatial: Dims, out_spatial: Dims,
              group: int = 1, *, path: Nchwc = Nchwc(), padded: bool = True, blocked: bool | None = None,
              passes: bool = False) -> Work:
    """The :class:`Work` of one Conv (``group`` divides ``cin`` and ``cout``); ``blocked`` overrides the
    NCHWc rule (a pruning cost keeps each conv on the path it has unpruned). ``passes`` charges a
    blocked dense conv's MACs by whole filter sets (:meth:`Nchwc.pass_factor`; the step-aware price of
    ``prune_filters``; the calibrated coefficients were fitted without it)."""
    depthwise = group == cin == cout and group > 1
    if blocked is None:
        blocked = path.nchwc(cin, cout, group, len(kernel))
    if blocked and padded:
        cin_p = cin if (group == 1 and cin < path.block) else path.pad(cin)
        cout_p = path.pad(cout)
        if depthwise:
            cin_p = cout_p = group_p = path.pad(cin)
        else:
            group_p = group
    else:
        cin_p, cout_p, group_p = cin, cout, group
    if not blocked:
        kind = "im2col" if group == 1 else "grouped_im2col"
    elif depthwise:
        kind = "depthwise"
    elif group == 1 and all(k == 1 for k in kernel):
        kind = "pointwise"
    else:
        kind = "conv"
    per_group_in = cin_p / group_p  # a float: an unpadded cost of a pruned plan is a smooth polynomial
    outputs = batch * cout_p * prod(out_spatial)
    weights = cout_p * per_group_in * prod(kernel)
    macs = outputs * per_group_in * prod(kernel)
    if passes and blocked and group == 1:
        macs *= path.pass_factor(cout_p)
    inputs = batch * cin_p * prod(in_spatial)
    if blocked:
        calls = batch * (cout_p / path.block) * (out_spatial[0] if out_spatial else 1)
    else:
        calls = batch * group_p
    return Work(kind, (1.0, float(macs), float(outputs), float(inputs), float(weights), float(calls)))


def gemm_work(m: int, k: int, n: int) -> Work:
    """One [M, K] x [K, N] product (Gemm, or MatMul with its batch dims folded into M)."""
    return Work("gemm", (1.0, float(m * k * n), float(m * n), float(m * k), float(k * n), 0.0))


def elementwise_work(elements: int) -> Work:
    """One data-moving node whose largest input or output has ``elements`` values."""
    return Work("elementwise", (1.0, 0.0, float(elements), 0.0, 0.0, 0.0))


def convert_work(elements: int) -> Work:
    """One ``QuantizeLinear``, ``DequantizeLinear`` or layout ``Transpose``/``Reorder`` of ``elements`` values."""
    return Work("convert", (1.0, 0.0, float(elements), 0.0, 0.0, 0.0))


def int8_work(node: Node, dims: Callable[[Value], Dims | None], *, dynamic: bool = False) -> Work | None:
    """The :class:`Work` of ``node`` (a float Conv, Gemm or MatMul) run as onnxruntime's fused int8 kernel:
    a Conv as ``QLinearConv`` (NHWC, no channel blocks, so its features are the unpadded ones; depthwise
    or not), a Gemm / MatMul as ``QLinearMatMul`` / ``QGemm`` (static) or ``DynamicQuantizeMatMul``
    (``dynamic``: the input's quantization included). ``None`` for any other op or an unknown shape."""
    if node.op_type == "Conv":
        work = _conv_node_work(node, dims, Nchwc(), False, False)
        if work is None:
            return None
        return Work("int8_depthwise" if work.kind == "grouped_im2col" and _depthwise(node, dims) else "int8_conv",
                    work.features)
    if node.op_type in ("Gemm", "MatMul"):
        work = _gemm_node_work(node, dims)
        return None if work is None else Work("int8_dynamic_gemm" if dynamic else "int8_gemm", work.features)
    return None


def _depthwise(node: Node, dims: Callable[[Value], Dims | None]) -> bool:
    x, w = dims(node.inputs[0]), dims(node.inputs[1])
    return x is not None and w is not None and w[1] == 1 and x[1] == w[0] > 1


@dataclass
class LatencyModel:
    """Coefficients per kind (seconds per feature unit) and the NCHWc path rule they were measured with.

    ``meta`` records where the coefficients come from (onnxruntime version, CPU flags, date, command,
    fit quality): the report quotes it.
    """

    coefficients: dict[str, np.ndarray]
    path: Nchwc = field(default_factory=Nchwc)
    meta: dict[str, Any] = field(default_factory=dict)

    def time(self, work: Work | None) -> float | None:
        """Predicted seconds of one kernel (``None`` in, ``None`` out, and for an int8 kind the profile
        has no coefficients for: :attr:`has_int8`)."""
        if work is None or work.kind not in self.coefficients:
            return None
        return float(np.dot(self.coefficients[work.kind], work.features))

    @property
    def has_int8(self) -> bool:
        """The profile prices onnxruntime's int8 kernels (calibrated with them)."""
        return all(k in self.coefficients for k in INT8_KINDS)

    def conv(self, batch: int, cin: int, cout: int, kernel: Dims, in_spatial: Dims, out_spatial: Dims,
             group: int = 1, *, padded: bool = True) -> float:
        return self.time(conv_work(batch, cin, cout, kernel, in_spatial, out_spatial, group, path=self.path,
                                   padded=padded))  # type: ignore[return-value]

    def gemm(self, m: int, k: int, n: int) -> float:
        return self.time(gemm_work(m, k, n))  # type: ignore[return-value]

    def node(self, node: Node, dims: Callable[[Value], Dims | None], *, padded: bool = True) -> float | None:
        """Predicted seconds of ``node`` given concrete shapes (``dims(value)``, ``None`` when unknown)."""
        return self.time(node_work(node, dims, path=self.path, padded=padded))

    # -- storage ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"features": list(FEATURES),
                "path": {"block": self.path.block, "input_multiple": self.path.input_multiple},
                "coefficients": {k: [float(x) for x in v] for k, v in sorted(self.coefficients.items())},
                "meta": self.meta}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LatencyModel:
        if list(data.get("features", [])) != list(FEATURES):
            raise ValueError(f"latency profile: features {data.get('features')} are not {list(FEATURES)}")
        missing = [k for k in KINDS if k not in data["coefficients"]]
        if missing:
            raise ValueError(f"latency profile: no coefficients for {', '.join(missing)}")
        unknown = [k for k in data["coefficients"] if k not in KINDS + INT8_KINDS]
        if unknown:
            raise ValueError(f"latency profile: unknown kernel kinds {', '.join(unknown)}")
        coefficients = {k: np.asarray(v, dtype=np.float64) for k, v in data["coefficients"].items()}
        if any(c.shape != (len(FEATURES),) or (c < 0).any() for c in coefficients.values()):
            raise ValueError(f"latency profile: coefficients must be {len(FEATURES)} non-negative numbers per kind")
        path = Nchwc(int(data["path"]["block"]), int(data["path"]["input_multiple"]))
        return cls(coefficients, path, dict(data.get("meta", {})))

    def to_text(self) -> str:
        """The profile file's text (:meth:`to_json`, sorted, one space of indent)."""
        return json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_text())

    @classmethod
    def macs_only(cls, path: Nchwc, meta: Mapping[str, Any] | None = None) -> LatencyModel:
        """The model of a CPU no one has calibrated: one unit per multiply-accumulate of every conv and
        GEMM kind, nothing for data movement or dispatch, with ``path``'s NCHWc rule: a blocked conv is
        charged its channels padded to whole blocks. Its "seconds" are MACs; only ratios mean anything."""
        unit = np.zeros(len(FEATURES))
        unit[FEATURES.index("macs")] = 1.0
        coefficients = {k: (np.zeros(len(FEATURES)) if k == "elementwise" else unit.copy()) for k in KINDS}
        return cls(coefficients, path, dict(meta or {}, calibrated=False))

    @property
    def calibrated(self) -> bool:
        """Its coefficients were measured (``False`` for :meth:`macs_only`)."""
        return bool(self.meta.get("calibrated", True))


def load(path: str | Path | None = None) -> LatencyModel:
    """The shipped AVX2 profile (``graphopt/data/latency_avx2.json``), or the one at ``path``.

    Passes price with their run's target CPU (:func:`graphopt.measure.target.resolve`), not with this."""
    return _load(str(path or DEFAULT_PROFILE))


@lru_cache(maxsize=4)
def _load(path: str) -> LatencyModel:
    return LatencyModel.from_json(json.loads(Path(path).read_text()))


# ===============================================================================================
# nodes


def node_work(node: Node, dims: Callable[[Value], Dims | None], *, path: Nchwc = Nchwc(),
              padded: bool = True, like: Callable[[Value], Dims | None] | None = None,
              passes: bool = False) -> Work | None:
    """The :class:`Work` of a node from its shapes; ``None`` when a shape is unknown or the op is not costed.

    Conv reads its kernel and group from the weight and the attributes; Gemm/MatMul fold the left
    operand's leading dims into M; free ops (:data:`FREE`) are a zero :class:`Work`; every other op of
    the default domain is ``elementwise`` over its largest output. With ``like`` (other shapes of the
    same node), the kind is the one the node has at those shapes: a pruning cost keeps each layer's
    kernel family fixed, so that it stays a polynomial in the kept channels. ``passes``: see
    :func:`conv_work`.
    """
    if like is None:
        return _node_work(node, dims, path, padded, passes=passes)
    base = _node_work(node, like, path, padded, passes=passes)
    if base is None:
        return _node_work(node, dims, path, padded, passes=passes)
    work = _node_work(node, dims, path, padded, base.kind not in ("im2col", "grouped_im2col"), passes=passes)
    return None if work is None else Work(base.kind, work.features)


def _node_work(node: Node, dims: Callable[[Value], Dims | None], path: Nchwc, padded: bool,
               blocked: bool | None = None, passes: bool = False) -> Work | None:
    """The work features of one node by its kind (conv, gemm, element-wise); None when unknown."""
    if node.domain not in ("", "ai.onnx") or node.op_type in UNKNOWN:
        return None
    if node.op_type in FREE:
        return Work("elementwise", (0.0,) * len(FEATURES))
    if node.op_type == "Conv":
        return _conv_node_work(node, dims, path, padded, blocked, passes)
    if node.op_type in ("Gemm", "MatMul"):
        return _gemm_node_work(node, dims)
    sizes = [dims(v) for v in (*node.inputs, *node.outputs) if v is not None]
    if not node.outputs or any(s is None for s in sizes):
        return None
    return elementwise_work(max(prod(s) for s in sizes))  # type: ignore[arg-type]


def _conv_node_work(node: Node, dims: Callable[[Value], Dims | None], path: Nchwc, padded: bool,
                    blocked: bool | None, passes: bool = False) -> Work | None:
    x, w, y = (dims(node.inputs[0]), dims(node.inputs[1]) if len(node.inputs) > 1 else None,
               dims(node.outputs[0]))
    if x is None or w is None or y is None or len(x) < 3:
        return None
    # the group count from the shapes, not the attribute: a pruning plan shrinks a depthwise conv's
    # channels (and so its group) before the attribute is rewritten
    group = x[1] // w[1] if w[1] and x[1] % w[1] == 0 else int(node.attr("group", 1) or 1)
    return conv_work(x[0], x[1], w[0], w[2:], x[2:], y[2:], group, path=path, padded=padded, blocked=blocked,
                     passes=passes)


def _gemm_node_work(node: Node, dims: Callable[[Value], Dims | None]) -> Work | None:
    a, b = dims(node.inputs[0]), dims(node.inputs[1])
    if a is None or b is None or len(b) != 2 or not a:
        return None
    trans_a = node.op_type == "Gemm" and int(node.attr("transA", 0) or 0)
    trans_b = node.op_type == "Gemm" and int(node.attr("transB", 0) or 0)
    k = a[0] if trans_a else a[-1]
    m = a[-1] if trans_a else prod(a[:-1])
    n = b[0] if trans_b else b[1]
    return gemm_work(int(m), int(k), int(n))


def concrete_dims(table: Any) -> Callable[[Value], Dims | None]:
    """``value -> its dims`` from a :func:`graphopt.measure.analysis.shape_table`, ``None`` unless every
    dim is a number (what :func:`node_work` takes)."""
    def dims(v: Value) -> Dims | None:
        d = table.shape(v)
        return None if d is None or not all(isinstance(t, int) for t in d) else tuple(int(t) for t in d)
    return dims


def model_time(model: Any, latency: LatencyModel | None = None, *, batch: int = 1,
               input_shapes: Mapping[str, Sequence[int]] | None = None, table: Any = None
               ) -> tuple[float | None, dict[str, float]]:
    """Predicted seconds of the whole main graph and per node (``None`` total when a node is unknown);
    ``table``: the shape table to read (one :func:`graphopt.measure.analysis.shape_table` of ``model``
    at ``batch`` and ``input_shapes``, made here when not given)."""
    from graphopt.measure.analysis import shape_table

    latency = latency or load()
    if table is None:
        table = shape_table(model, input_shapes, batch)
    graph = model.graph
    dims = concrete_dims(table)
    per: dict[str, float] = {}
    total: float | None = 0.0
    for node in graph.toposort():
        t = latency.node(node, dims)
        if t is None:
            total = None
            continue
        per[node.name] = t
        if total is not None:
            total += t
    return total, per
