"""Calibrating the latency model on the machine at hand (``graphopt calibrate``).

:func:`calibrate` reads onnxruntime's NCHWc rule here (:func:`graphopt.measure.kernels.nchwc_rule`),
times a fixed, seeded set of single-kernel models of every kind of :mod:`graphopt.measure.latency`
(convs of every family, GEMMs, element-wise ops) with onnxruntime's profiler (``ORT_ENABLE_ALL``, one
thread, no spinning; per kernel the median over its runs, less the profiler's own overhead per kernel,
:func:`profiler_overhead`), and fits non-negative coefficients per kind by least squares on the
*relative* error (:func:`fit`). The result is a :class:`~graphopt.measure.latency.LatencyModel` whose
meta says the CPU kind, the CPU, onnxruntime's version, the date and the fit's quality.

The int8 kinds are measured the same way on static QDQ models (a Conv + Relu, a MatMul) and on the
fused ``DynamicQuantizeMatMul``, as onnxruntime's optimizer fuses them; the quantize, transpose and
dequantize nodes around each give the ``convert`` records. A profile calibrated without them (no int8
kernel ran) leaves them out rather than price int8 at zero.

The kernel set has a quota per kind (:data:`QUOTAS`, about 600 kernels: minutes on one core), drawn from
seeded random shapes until every quota is met; ``scale`` shrinks the quotas and caps each kernel's
MACs (``scale=0.01``, the ``--quick`` of the command line: three kernels a kind, seconds, for tests and
a first look). A kind onnxruntime here never runs (the blocked kinds on an ARM64 build without NCHWc
kernels) gets zero coefficients and ``n = 0`` in the fit: no prediction uses it.

The fit needs no SciPy: with six features a kind, the non-negative least-squares optimum is the best
unconstrained least-squares solution over the 63 subsets of features whose coefficients all come out
non-negative (the optimum's positive coefficients solve the unconstrained problem on their own subset).

Profiles written by the command go to the user's cache (:func:`graphopt.measure.target.cached_profile`)
or to ``-o FILE``; profiler files go to a scratch folder of the run.
"""

from __future__ import annotations

import datetime
import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from graphopt.core import scratch
from graphopt.measure import ort as gort
from graphopt.measure import latency as lat
from graphopt.measure.kernels import nchwc_rule

__all__ = ["MAX_ELEMENTS", "QUOTAS", "Kernel", "calibrate", "conv_model", "eltwise_model", "errors", "feeds", "fit", "gemm_model",
           "kernel_set", "measure", "median_wall", "net_seconds", "profile_kernels", "profiler_overhead"]

#: Kernels measured per kind at ``scale=1`` (the shipped AVX2 profile was fitted on about these counts).
QUOTAS = {"pointwise": 64, "conv": 224, "depthwise": 72, "im2col": 48, "grouped_im2col": 72, "gemm": 60,
          "elementwise": 60, "int8_conv": 96, "int8_depthwise": 40, "int8_gemm": 40, "int8_dynamic_gemm": 40}
#: The int8 kinds' kernels are drawn from their own seeded generator (``seed + INT8_SEED_OFFSET``), so the
#: float kinds' set is the one profiles calibrated before int8 kernels were priced used.
INT8_SEED_OFFSET = 1000

Progress = Callable[[int, int, str], None]


# =============================================================================================
# sessions and profiling


def feeds(sess: ort.InferenceSession, batch: int | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs of ``sess`` (dynamic dims 1, the first dim ``batch`` when given)."""
    rng = np.random.default_rng(0)
    out = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else (batch or 1) for d in i.shape]
        if batch is not None and shape:
            shape[0] = batch
        out[i.name] = (rng.integers(0, 10, size=shape).astype(np.int64) if "int" in i.type
                       else rng.standard_normal(shape).astype(np.float32))
    return out


def profile_kernels(proto: onnx.ModelProto, batch: int | None = None, seconds: float = 0.15,
                    max_runs: int = 200) -> list[dict]:
    """Kernel events of ``proto`` run about ``seconds`` long (at least 7 runs, after 2 warm-ups), with
    graph optimizations on and one thread: per node, its op, input and output shapes and the median
    duration (seconds)."""
    with scratch.directory("profile") as folder:
        sess = gort.session(proto, optimize=True, threads=1, profile_dir=folder)
        inputs = feeds(sess, batch)
        for _ in range(2):
            sess.run(None, inputs)
        t0 = time.perf_counter()
        sess.run(None, inputs)
        once = max(time.perf_counter() - t0, 1e-6)
        for _ in range(int(min(max(seconds / once, 7), max_runs))):
            sess.run(None, inputs)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_node: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        a = e["args"]
        rec = by_node.setdefault(e["name"][:-len("_kernel_time")], {
            "op": a["op_name"], "durs": [],
            "inputs": [list(d.values())[0] for d in a.get("input_type_shape", [])],
            "outputs": [list(d.values())[0] for d in a.get("output_type_shape", [])]})
        rec["durs"].append(e["dur"] * 1e-6)
    out = []
    for name, rec in by_node.items():
        durs = rec.pop("durs")[2:]  # the warm-up runs
        if durs:
            out.append({"name": name, **rec, "seconds": statistics.median(durs)})
    return out


def profiler_overhead(n: int = 64, seconds: float = 0.5, runs: int = 300) -> float:
    """Seconds the profiler adds to every kernel it times: the median profiled duration of a tiny Relu
    less its share of the wall-clock time of a chain of ``n`` of them (about 4 us on the AVX2 machine,
    against about 1 us of real dispatch). Subtracted before the fit, so that a kernel's constant is what
    a run without the profiler pays."""
    x = helper.make_tensor_value_info("x0", onnx.TensorProto.FLOAT, [1, 8])
    model = _model([helper.make_node("Relu", [f"x{i}"], [f"x{i + 1}"]) for i in range(n)], [x], [])
    profiled = statistics.median(e["seconds"] for e in profile_kernels(model, seconds=seconds))
    sess = gort.session(model, optimize=True, threads=1)
    return max(profiled - median_wall(sess, feeds(sess), runs, warmup=10) / n, 0.0)


def median_wall(sess: ort.InferenceSession, inputs: dict[str, np.ndarray], runs: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``runs`` runs of ``sess`` on ``inputs``, after ``warmup`` runs."""
    for _ in range(warmup):
        sess.run(None, inputs)
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, inputs)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


# =============================================================================================
# single-kernel models


def _model(nodes: list, inputs: list, inits: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "k", inputs, [helper.make_tensor_value_info(nodes[-1].output[0], 1, None)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def conv_model(batch: int, cin: int, cout: int, kernel: tuple[int, int], hw: int, group: int, stride: int,
               act: bool = True) -> onnx.ModelProto:
    """One Conv (and a Relu onnxruntime fuses into it) on a ``batch x cin x hw x hw`` input."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((cout, cin // group, *kernel)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "B")
    pads = [kernel[0] // 2, kernel[1] // 2, kernel[0] // 2, kernel[1] // 2]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], kernel_shape=list(kernel), group=group,
                              strides=[stride, stride], pads=pads)]
    if act:
        nodes.append(helper.make_node("Relu", ["y"], ["z"]))
    return _model(nodes, [helper.make_tensor_value_info("x", 1, [batch, cin, hw, hw])], [w, b])


def gemm_model(m: int, k: int, n: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "W")
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [helper.make_tensor_value_info("x", 1, [m, k])],
                  [w])


def eltwise_model(op: str, batch: int, c: int, hw: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", 1, [batch, c, hw, hw])
    if op == "Add":
        return _model([helper.make_node("Add", ["x", "x"], ["y"])], [x], [])
    if op == "MaxPool":
        return _model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])], [x], [])
    if op == "Mul":
        s = numpy_helper.from_array(np.ones((1, c, 1, 1), np.float32), "S")
        return _model([helper.make_node("Mul", ["x", "S"], ["y"])], [x], [s])
    return _model([helper.make_node(op, ["x"], ["y"])], [x], [])


def _qdq(name: str, scale: float, zero_point: int) -> tuple[list, list]:
    """``name`` through a uint8 ``QuantizeLinear → DequantizeLinear`` pair (static activation quantization)."""
    inits = [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
             numpy_helper.from_array(np.array(zero_point, np.uint8), f"{name}_z")]
    nodes = [helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
             helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"])]
    return nodes, inits


def _int8_weight(w: np.ndarray, axis: int) -> tuple[list, list]:
    """A per-channel symmetric int8 weight (7-bit codes, as graphopt writes them for AVX2) and its
    ``DequantizeLinear`` along ``axis``."""
    scale = np.maximum(np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis)), 1e-8) / 63
    shape = [1] * w.ndim
    shape[axis] = -1
    codes = np.clip(np.round(w / scale.reshape(shape)), -64, 63).astype(np.int8)
    inits = [numpy_helper.from_array(codes, "Wq"), numpy_helper.from_array(scale.astype(np.float32), "Ws"),
             numpy_helper.from_array(np.zeros(len(scale), np.int8), "Wz")]
    return [helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["W"], axis=axis)], inits


def int8_conv_model(batch: int, cin: int, cout: int, kernel: tuple[int, int], hw: int, group: int,
                    stride: int) -> onnx.ModelProto:
    """:func:`conv_model`'s Conv + Relu in static QDQ form (uint8 activations, per-channel int8 weights,
    int32 bias): onnxruntime fuses it into one NHWC ``QLinearConv`` between a quantize and a transpose in,
    a transpose and a dequantize out."""
    float_model = conv_model(batch, cin, cout, kernel, hw, group, stride)
    conv = float_model.graph.node[0]
    w, b = (numpy_helper.to_array(t) for t in float_model.graph.initializer)
    x_scale = 3.0 / 127
    x_nodes, x_inits = _qdq("x", x_scale, 128)
    w_nodes, w_inits = _int8_weight(w, 0)
    bias_scale = (x_scale * numpy_helper.to_array(w_inits[1])).astype(np.float32)
    b_inits = [numpy_helper.from_array(np.round(b / bias_scale).astype(np.int32), "Bq"),
               numpy_helper.from_array(bias_scale, "Bs")]
    b_nodes = [helper.make_node("DequantizeLinear", ["Bq", "Bs"], ["B"], axis=0)]
    z_nodes, z_inits = _qdq("z", 0.1, 0)
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    layer = [helper.make_node("Conv", ["x_dq", "W", "B"], ["y"], **attrs), helper.make_node("Relu", ["y"], ["z"])]
    return _model([*x_nodes, *w_nodes, *b_nodes, *layer, *z_nodes],
                  [helper.make_tensor_value_info("x", 1, [batch, cin, hw, hw])],
                  [*x_inits, *w_inits, *b_inits, *z_inits])


def int8_gemm_model(m: int, k: int, n: int, dynamic: bool) -> onnx.ModelProto:
    """A ``[m, k] x [k, n]`` MatMul with a per-channel int8 weight: static QDQ (onnxruntime fuses
    ``QLinearMatMul``) or, ``dynamic``, the fused ``DynamicQuantizeMatMul`` dynamic quantization becomes."""
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    w_nodes, w_inits = _int8_weight(w, 1)
    x = helper.make_tensor_value_info("x", 1, [m, k])
    if dynamic:
        node = helper.make_node("DynamicQuantizeMatMul", ["x", "Wq", "Ws", "Wz"], ["y"], domain="com.microsoft")
        model = _model([node], [x], w_inits)
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return model
    x_nodes, x_inits = _qdq("x", 3.0 / 127, 128)
    y_nodes, y_inits = _qdq("y", 0.5, 128)
    return _model([*x_nodes, *w_nodes, helper.make_node("MatMul", ["x_dq", "W"], ["y"]), *y_nodes], [x],
                  [*x_inits, *w_inits, *y_inits])


CHANNELS = (1, 3, 8, 12, 16, 24, 32, 40, 48, 64, 72, 96, 128, 160, 192, 256, 320, 384, 512)
ODD = (5, 7, 9, 10, 11, 13, 17, 21, 27, 33, 50, 75, 100, 130)
SPATIAL = (4, 7, 8, 14, 16, 28, 32, 56, 112)
BATCH = (1, 1, 4, 16, 64)
GEMM_SIZES = (8, 10, 16, 32, 50, 64, 100, 128, 200, 256, 384, 512, 784, 1024)
ELTWISE_OPS = ("Relu", "Add", "Mul", "Sigmoid", "MaxPool", "GlobalAveragePool")


#: The profiler's op names of a float conv and a float GEMM kernel (onnxruntime fuses and renames them).
FLOAT_CONV_OPS = ("Conv", "FusedConv", "NchwcConv")
FLOAT_GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul")


@dataclass(frozen=True)
class Kernel:
    """One kernel to time: its latency kind, its feature vector, the model and the ops that are it."""

    kind: str
    features: tuple[float, ...]
    config: tuple
    ops: tuple[str, ...]
    build: Callable[[], onnx.ModelProto]
    #: an int8 kernel's float twin (the same layer in float) and its work: timed beside it, so that its
    #: price is fitted in the float prices' time base (:func:`fit`)
    twin: Callable[[], onnx.ModelProto] | None = None
    twin_work: lat.Work | None = None
    twin_ops: tuple[str, ...] = ()


def _convs(rng: np.random.Generator, path: lat.Nchwc) -> Iterator[Kernel]:
    """Endless seeded Conv shapes of every family (pointwise, kxk, spatial 3x1/1x3, depthwise, grouped,
    odd channel counts), classified by ``path``."""
    families = ["pointwise", "conv3", "conv5", "spatial", "depthwise", "grouped", "odd", "depthwise"]
    for i in itertools.count():
        family = families[i % len(families)]
        batch, hw = int(rng.choice(BATCH)), int(rng.choice(SPATIAL))
        stride = 2 if (rng.random() < 0.2 and hw >= 8) else 1
        cin, cout = int(rng.choice(CHANNELS)), int(rng.choice(CHANNELS[2:]))
        kernel, group = (3, 3), 1
        if family == "pointwise":
            kernel, cin = (1, 1), max(cin, 8)
        elif family == "conv5":
            kernel = (5, 5)
        elif family == "spatial":
            kernel = (3, 1) if rng.random() < 0.5 else (1, 3)
            if rng.random() < 0.5:
                cout = int(rng.choice(ODD))  # low-rank intermediates are any size
        elif family == "depthwise":
            cin = cout = group = int(rng.choice(CHANNELS[2:] + ODD[4:]))
            kernel = (5, 5) if rng.random() < 0.2 else (3, 3)
        elif family == "grouped":
            group = int(rng.choice((2, 4, 8)))
            cin, cout = max(cin, 8 * group) // group * group, max(cout, 8 * group) // group * group
        elif family == "odd":
            cin = int(rng.choice(ODD))
            cout = int(rng.choice(ODD + CHANNELS[2:]))
            kernel = (1, 1) if rng.random() < 0.4 else (3, 3)
        out = (hw + stride - 1) // stride
        work = lat.conv_work(batch, cin, cout, kernel, (hw, hw), (out, out), group, path=path)
        config = (batch, cin, cout, kernel, hw, group, stride)
        yield Kernel(work.kind, work.features, config, FLOAT_CONV_OPS,
                     lambda c=config: conv_model(*c))


def _gemms(rng: np.random.Generator) -> Iterator[Kernel]:
    while True:
        m, k, n = int(rng.choice((1, 4, 16, 64, 256, 1024, 4096))), int(rng.choice(GEMM_SIZES)), \
            int(rng.choice(GEMM_SIZES))
        yield Kernel("gemm", lat.gemm_work(m, k, n).features, (m, k, n), FLOAT_GEMM_OPS,
                     lambda m=m, k=k, n=n: gemm_model(m, k, n))


def _eltwise(rng: np.random.Generator) -> Iterator[Kernel]:
    for i in itertools.count():
        op, batch = ELTWISE_OPS[i % len(ELTWISE_OPS)], int(rng.choice(BATCH))
        c, hw = int(rng.choice(CHANNELS[2:])), int(rng.choice(SPATIAL))
        # the features come from the shapes the profiler reports (a pool's output is smaller than its
        # input); until then, the input's elements stand in for the size checks
        yield Kernel("elementwise", (1.0, 0.0, 0.0, float(batch * c * hw * hw), 0.0, 0.0), (op, batch, c, hw),
                     (op,), lambda a=(op, batch, c, hw): eltwise_model(*a))


def _int8_convs(rng: np.random.Generator, path: lat.Nchwc) -> Iterator[Kernel]:
    """:func:`_convs`'s shapes as fused int8 convs (``int8_conv``, ``int8_depthwise``): NHWC, unblocked,
    so their features are the unpadded ones (:func:`graphopt.measure.latency.int8_work`); each with its
    float twin on ``path``."""
    for kernel in _convs(rng, lat.Nchwc(1, 1)):
        batch, cin, cout, size, hw, group, stride = kernel.config
        out = (hw + stride - 1) // stride
        work = lat.conv_work(batch, cin, cout, size, (hw, hw), (out, out), group, blocked=False, padded=False)
        twin = lat.conv_work(batch, cin, cout, size, (hw, hw), (out, out), group, path=path)
        kind = "int8_depthwise" if group == cin == cout > 1 else "int8_conv"
        yield Kernel(kind, work.features, kernel.config, ("QLinearConv",),
                     lambda c=kernel.config: int8_conv_model(*c), lambda c=kernel.config: conv_model(*c), twin,
                     FLOAT_CONV_OPS)


def _int8_gemms(rng: np.random.Generator) -> Iterator[Kernel]:
    for i in itertools.count():
        m, k, n = int(rng.choice((1, 4, 16, 64, 256, 1024, 4096))), int(rng.choice(GEMM_SIZES)), \
            int(rng.choice(GEMM_SIZES))
        dynamic = i % 2 == 1
        ops = ("DynamicQuantizeMatMul",) if dynamic else ("QLinearMatMul", "QGemm", "MatMulIntegerToFloat")
        yield Kernel("int8_dynamic_gemm" if dynamic else "int8_gemm", lat.gemm_work(m, k, n).features,
                     (m, k, n, dynamic), ops, lambda a=(m, k, n, dynamic): int8_gemm_model(*a),
                     lambda a=(m, k, n): gemm_model(*a), lat.gemm_work(m, k, n), FLOAT_GEMM_OPS)


#: Largest input or output (elements) a calibration kernel may have: 2^25 floats are 128 MiB, which
#: keeps the whole calibration's memory near 1 GB (an unbounded element-wise op at batch 64 reached 4 GB).
MAX_ELEMENTS = 2 ** 25


def kernel_set(path: lat.Nchwc, seed: int = 0, scale: float = 1.0, max_macs: float = 2e9,
               tries: int = 200_000) -> list[Kernel]:
    """Seeded kernels until every kind has ``max(3, round(QUOTAS[kind] * scale))`` of them, each between
    1e4 and ``max_macs`` MACs (element-wise ops: any) with no input or output over :data:`MAX_ELEMENTS`;
    a kind ``path`` never produces (no blocked kinds without NCHWc) stays short after ``tries`` draws.
    Deterministic for a seed and a path."""
    rng, rng8 = np.random.default_rng(seed), np.random.default_rng(seed + INT8_SEED_OFFSET)
    want = {kind: max(3, int(round(q * scale))) for kind, q in QUOTAS.items()}
    got: dict[str, list[Kernel]] = {kind: [] for kind in QUOTAS}
    sources = {"conv": _convs(rng, path), "gemm": _gemms(rng), "elementwise": _eltwise(rng),
               "int8_conv": _int8_convs(rng8, path), "int8_gemm": _int8_gemms(rng8)}
    for _ in range(tries):
        if all(len(got[k]) >= want[k] for k in got):
            break
        for source in sources.values():
            kernel = next(source)
            _, macs, outputs, inputs, _, _ = kernel.features
            sized = kernel.kind == "elementwise" or 1e4 <= macs <= max_macs
            if len(got[kernel.kind]) < want[kernel.kind] and sized and max(outputs, inputs) <= MAX_ELEMENTS:
                got[kernel.kind].append(kernel)
    return [k for kind in QUOTAS for k in got[kind]]


def measure(kernels: list[Kernel], seconds: float = 0.15, progress: Progress | None = None) -> list[dict]:
    """Records ``{kind, features, seconds, config, op}``: each kernel profiled alone (its model's one
    kernel of the expected op; a model onnxruntime splits into several kernels is skipped). An int8
    kernel's model also yields one ``convert`` record per quantize, dequantize or layout transpose
    around it (:data:`graphopt.measure.latency.CONVERT_OPS`), over the larger of its input and output."""
    records: list[dict] = []
    for i, kernel in enumerate(kernels):
        if progress is not None:
            progress(i, len(kernels), kernel.kind)
        profiled = profile_kernels(kernel.build(), seconds=seconds)
        events = [e for e in profiled if e["op"] in kernel.ops]
        if len(events) != 1:
            continue
        twin: dict[str, Any] = {}
        if kernel.twin is not None and kernel.twin_work is not None:
            float_events = [e for e in profile_kernels(kernel.twin(), seconds=seconds) if e["op"] in kernel.twin_ops]
            if len(float_events) != 1:
                continue
            twin = {"twin_kind": kernel.twin_work.kind, "twin_features": list(kernel.twin_work.features),
                    "twin_seconds": float_events[0]["seconds"]}
        if kernel.kind.startswith("int8_"):
            for e in (e for e in profiled if e["op"] in lat.CONVERT_OPS):
                elements = max(int(np.prod(s)) for s in e["inputs"] + e["outputs"])
                records.append({"kind": "convert", "features": list(lat.convert_work(elements).features),
                                "seconds": e["seconds"], "config": list(map(str, kernel.config)), "op": e["op"],
                                **twin})
        features = kernel.features
        if kernel.kind == "elementwise":  # its largest input or output, as the profiler saw it
            features = lat.elementwise_work(max(int(np.prod(s)) for s in events[0]["inputs"]
                                                + events[0]["outputs"])).features
        records.append({"kind": kernel.kind, "features": list(features), "seconds": events[0]["seconds"],
                        "config": list(map(str, kernel.config)), "op": events[0]["op"], **twin})
    if progress is not None:
        progress(len(kernels), len(kernels), "done")
    return records


# =============================================================================================
# fit


def net_seconds(seconds: np.ndarray, overhead: float) -> np.ndarray:
    """Measured times less the profiler's overhead; at least a tenth of each is kept."""
    return np.maximum(seconds - overhead, 0.1 * seconds)


def errors(pred: np.ndarray, t: np.ndarray) -> dict:
    """``n``, median and 90th percentile of the relative error of ``pred`` against ``t``."""
    rel = np.abs(pred / t - 1.0)
    return {"n": int(len(t)), "median_rel_error": round(float(np.median(rel)), 4),
            "p90_rel_error": round(float(np.quantile(rel, 0.9)), 4)}


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin ||a x - b||`` over ``x >= 0`` (few columns: every subset of them; module docstring)."""
    best, best_res = np.zeros(a.shape[1]), float(np.sum(b * b))
    for size in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), size):
            sub = a[:, cols]
            x, *_ = np.linalg.lstsq(sub, b, rcond=None)
            if (x < 0).any():
                continue
            res = float(np.sum((sub @ x - b) ** 2))
            if res < best_res - 1e-12 * max(best_res, 1.0):
                best, best_res = np.zeros(a.shape[1]), res
                best[list(cols)] = x
    return best


def fit(records: list[dict], overhead: float, reference: lat.LatencyModel | None = None
        ) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Per kind: non-negative ``c`` minimizing ``sum(((phi . c - t) / t)^2)`` over the measured times less the
    profiler's ``overhead``, and the fit's relative errors (a kind without records: zeros, ``n = 0``).

    The int8 kinds are fitted in the time base of the float prices they are compared with: a record
    timed beside its float twin counts as ``t · p / t_twin``, with ``p`` the twin's price by
    ``reference`` (the float kinds fitted here when none is given). Its measured int8 / float ratio is
    kept whatever the machine's speed that day: a profile's float kinds fitted on another day (the
    shipped AVX2 one: 16 % slower convs than the machine measures now) against int8 kinds fitted today
    priced DenseNet-121's int8 model at 0.94 of float's time; it ran at 1.18."""
    coefficients, quality = {}, {}
    for kind in lat.KINDS + lat.INT8_KINDS:
        if kind == lat.INT8_KINDS[0]:
            base = reference or lat.LatencyModel({k: coefficients[k] for k in lat.KINDS})
        rows = [r for r in records if r["kind"] == kind]
        if not rows and kind in lat.INT8_KINDS:
            continue  # a profile without int8 prices (zeros would make int8 free)
        if not rows:
            coefficients[kind], quality[kind] = np.zeros(len(lat.FEATURES)), {"n": 0}
            continue
        x = np.array([r["features"] for r in rows], dtype=np.float64)
        t = net_seconds(np.array([r["seconds"] for r in rows], dtype=np.float64), overhead)
        if kind in lat.INT8_KINDS:
            t = t * np.array([_time_base(r, base, overhead) for r in rows])
        scale = np.maximum(np.abs(x).max(axis=0), 1e-30)  # conditioning: features span 1 to 1e9
        coefficients[kind] = _nnls(x / scale / t[:, None], np.ones(len(t))) / scale
        quality[kind] = errors(x @ coefficients[kind], t)
    return coefficients, quality


def _time_base(record: dict, reference: lat.LatencyModel, overhead: float) -> float:
    """The factor that takes an int8 record's time into ``reference``'s time base: its float twin's
    price over the twin's measured time (1 for a record without a twin, or a twin ``reference`` cannot
    price)."""
    if "twin_seconds" not in record:
        return 1.0
    price = reference.time(lat.Work(record["twin_kind"], tuple(record["twin_features"])))
    measured = float(net_seconds(np.array([record["twin_seconds"]]), overhead)[0])
    return price / measured if price and measured > 0 else 1.0


# =============================================================================================
# the whole calibration


def calibrate(kind: str, cpu_name: str, *, seed: int = 0, scale: float = 1.0, command: str = "graphopt calibrate",
              progress: Progress | None = None) -> lat.LatencyModel:
    """The latency profile of this machine (module docstring); ``kind`` and ``cpu_name`` go to its meta.

    ``scale`` < 1 measures fewer, smaller kernels for less time on each (``--quick``: 0.01)."""
    path, matched = nchwc_rule()
    quick = scale < 0.1
    kernels = kernel_set(path, seed, scale, max_macs=2e7 if quick else 2e9)
    records = measure(kernels, seconds=0.02 if quick else 0.15, progress=progress)
    overhead = profiler_overhead(runs=60 if quick else 300, seconds=0.1 if quick else 0.5)
    coefficients, quality = fit(records, overhead)
    meta: dict[str, Any] = {
        "kind": kind, "cpu": cpu_name, "machine": platform.machine(), "onnxruntime": ort.__version__,
        "threads": 1, "block": path.block, "date": datetime.date.today().isoformat(), "command": command,
        "seed": seed, "scale": scale, "kernels": len(records), "profiler_overhead_us": round(overhead * 1e6, 3),
        "fit": quality}
    if not matched:
        meta["nchwc_rule"] = f"onnxruntime's rule matched no input multiple; {path.input_multiple} assumed"
    return lat.LatencyModel(coefficients, path, meta)
