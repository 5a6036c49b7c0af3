"""Calibrate and check graphopt's latency model (:mod:`graphopt.measure.latency`).

``fit``   — reads onnxruntime's NCHWc path rule off this machine (which Conv shapes it blocks), times a
            fixed, seeded set of ~500 single-kernel models (Conv of every kind, Gemm, element-wise ops)
            with onnxruntime's profiler (ENABLE_ALL, 1 thread, no spinning; per kernel the median over
            runs), fits non-negative coefficients per kind by least squares on the *relative* error,
            and writes the profile (``graphopt/data/latency_cpu.json`` by default) with the fit quality.
``check`` — held-out test: a fresh, differently seeded set of kernels (per-kind error of the stored
            profile), and whole zoo models (after the lossless preset) at batch 1 and 64 (sum of the
            predicted kernel times against the measured sum of kernel times in the profiler, and
            against the wall-clock time).

Commands::

    python tools/calibrate_latency.py fit [--out graphopt/data/latency_cpu.json]
    python tools/calibrate_latency.py check [--profile FILE]

Needs scipy (``pip install -e '.[bench]'``) for the non-negative least squares.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402

from graphopt.measure import latency as lat  # noqa: E402

ZOO = ["vgg", "resnet", "mobilenetv2", "inception", "shufflenet", "senet", "lenet5", "lenet300", "transformer"]


# =============================================================================================
# sessions and profiling


def _session(proto: onnx.ModelProto, profile: bool = True, optimized_path: str | None = None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tempfile.gettempdir(), "graphopt_latency")
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _feeds(sess, batch: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else (batch or 1) for d in i.shape]
        if batch is not None and shape:
            shape[0] = batch
        if "int" in i.type:
            out[i.name] = rng.integers(0, 10, size=shape).astype(np.int64)
        else:
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def profile_kernels(proto: onnx.ModelProto, batch: int | None = None, seconds: float = 0.15, max_runs: int = 200
                    ) -> list[dict]:
    """Kernel events of ``proto`` run ``seconds`` long (at least 7 runs): per node name, the median
    duration (seconds), its op and shapes."""
    sess = _session(proto)
    feeds = _feeds(sess, batch)
    for _ in range(2):
        sess.run(None, feeds)
    t0 = time.perf_counter()
    sess.run(None, feeds)
    once = max(time.perf_counter() - t0, 1e-6)
    runs = int(min(max(seconds / once, 7), max_runs))
    for _ in range(runs):
        sess.run(None, feeds)
    path = sess.end_profiling()
    events = json.loads(Path(path).read_text())
    os.remove(path)
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


# =============================================================================================
# single-kernel models


def _model(nodes, inputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "k", inputs, [helper.make_tensor_value_info(nodes[-1].output[0], 1, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def conv_model(batch, cin, cout, kernel, hw, group, stride, act=True) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((cout, cin // group, *kernel)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "B")
    pads = [kernel[0] // 2, kernel[1] // 2, kernel[0] // 2, kernel[1] // 2]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], kernel_shape=list(kernel), group=group,
                              strides=[stride, stride], pads=pads)]
    if act:
        nodes.append(helper.make_node("Relu", ["y"], ["z"]))
    return _model(nodes, [helper.make_tensor_value_info("x", 1, [batch, cin, hw, hw])], [w, b])


def gemm_model(m, k, n) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "W")
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [helper.make_tensor_value_info("x", 1, [m, k])],
                  [w])


def eltwise_model(op, batch, c, hw) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", 1, [batch, c, hw, hw])
    if op == "Add":
        return _model([helper.make_node("Add", ["x", "x"], ["y"])], [x], [])
    if op == "MaxPool":
        return _model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])], [x], [])
    if op == "GlobalAveragePool":
        return _model([helper.make_node("GlobalAveragePool", ["x"], ["y"])], [x], [])
    if op == "Mul":
        s = numpy_helper.from_array(np.ones((1, c, 1, 1), np.float32), "S")
        return _model([helper.make_node("Mul", ["x", "S"], ["y"])], [x], [s])
    return _model([helper.make_node(op, ["x"], ["y"])], [x], [])


CHANNELS = (1, 3, 8, 12, 16, 24, 32, 40, 48, 64, 72, 96, 128, 160, 192, 256, 320, 384, 512)
ODD = (5, 7, 9, 10, 11, 13, 17, 21, 27, 33, 50, 75, 100, 130)
SPATIAL = (4, 7, 8, 14, 16, 28, 32, 56, 112)
BATCH = (1, 1, 4, 16, 64)


def conv_configs(n: int, seed: int) -> list[tuple]:
    """``n`` (batch, cin, cout, kernel, hw, group, stride) Conv shapes of every kind, 1e4-2e9 MACs."""
    rng = np.random.default_rng(seed)
    out: list[tuple] = []
    # depthwise twice: its cost per MAC varies the most (tiny rows at 7x7 and large batches)
    kinds = ["pointwise", "conv3", "conv5", "spatial", "depthwise", "grouped", "odd", "depthwise"]
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        batch, hw = int(rng.choice(BATCH)), int(rng.choice(SPATIAL))
        stride = 2 if (rng.random() < 0.2 and hw >= 8) else 1
        cin, cout = int(rng.choice(CHANNELS)), int(rng.choice(CHANNELS[2:]))
        kernel, group = (3, 3), 1
        if kind == "pointwise":
            kernel, cin = (1, 1), max(cin, 8)
        elif kind == "conv5":
            kernel = (5, 5)
        elif kind == "spatial":
            kernel = (3, 1) if rng.random() < 0.5 else (1, 3)
            if rng.random() < 0.5:
                cout = int(rng.choice(ODD))  # low-rank intermediates are any size
        elif kind == "depthwise":
            cin = cout = group = int(rng.choice(CHANNELS[2:] + ODD[4:]))
            kernel = (5, 5) if rng.random() < 0.2 else (3, 3)
        elif kind == "grouped":
            group = int(rng.choice((2, 4, 8)))
            cin, cout = max(cin, 8 * group) // group * group, max(cout, 8 * group) // group * group
        elif kind == "odd":
            cin = int(rng.choice(ODD))
            cout = int(rng.choice(ODD + CHANNELS[2:]))
            kernel = (1, 1) if rng.random() < 0.4 else (3, 3)
        out_hw = (hw + stride - 1) // stride
        macs = batch * cout * out_hw * out_hw * (cin // group) * kernel[0] * kernel[1]
        if 1e4 <= macs <= 2e9:
            out.append((batch, cin, cout, kernel, hw, group, stride))
    return out


def gemm_configs(n: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    sizes = (8, 10, 16, 32, 50, 64, 100, 128, 200, 256, 384, 512, 784, 1024)
    out: list[tuple] = []
    while len(out) < n:
        m, k, nn = int(rng.choice((1, 4, 16, 64, 256, 1024, 4096))), int(rng.choice(sizes)), int(rng.choice(sizes))
        if 1e3 <= m * k * nn <= 1e9:
            out.append((m, k, nn))
    return out


def eltwise_configs(n: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    ops = ("Relu", "Add", "Mul", "Sigmoid", "MaxPool", "GlobalAveragePool")
    return [(ops[i % len(ops)], int(rng.choice(BATCH)), int(rng.choice(CHANNELS[2:])), int(rng.choice(SPATIAL)))
            for i in range(n)]


def _conv_record(cfg, sess_events, path: lat.Nchwc) -> dict | None:
    batch, cin, cout, kernel, hw, group, stride = cfg
    ev = [e for e in sess_events if e["op"] in ("Conv", "FusedConv", "NchwcConv")]
    if len(ev) != 1:
        return None
    out_hw = (hw + stride - 1) // stride
    work = lat.conv_work(batch, cin, cout, kernel, (hw, hw), (out_hw, out_hw), group, path=path)
    return {"kind": work.kind, "features": list(work.features), "seconds": ev[0]["seconds"], "config": list(cfg),
            "op": ev[0]["op"]}


def measure(path: lat.Nchwc, seed: int, n_conv: int, n_gemm: int, n_elt: int, say=print) -> list[dict]:
    """Records ``{kind, features, seconds, config}`` of the seeded kernel set."""
    records: list[dict] = []
    convs = conv_configs(n_conv, seed)
    for i, cfg in enumerate(convs):
        batch, cin, cout, kernel, hw, group, stride = cfg
        rec = _conv_record(cfg, profile_kernels(conv_model(batch, cin, cout, kernel, hw, group, stride)), path)
        if rec is not None:
            records.append(rec)
        if i % 50 == 49:
            say(f"  conv {i + 1}/{len(convs)}")
    for m, k, n in gemm_configs(n_gemm, seed):
        ev = [e for e in profile_kernels(gemm_model(m, k, n)) if e["op"] in ("MatMul", "Gemm", "FusedMatMul")]
        if len(ev) == 1:
            w = lat.gemm_work(m, k, n)
            records.append({"kind": w.kind, "features": list(w.features), "seconds": ev[0]["seconds"],
                            "config": [m, k, n], "op": ev[0]["op"]})
    for op, batch, c, hw in eltwise_configs(n_elt, seed):
        ev = [e for e in profile_kernels(eltwise_model(op, batch, c, hw)) if e["op"] == op]
        if len(ev) == 1:
            elements = max(int(np.prod(s)) for s in ev[0]["inputs"] + ev[0]["outputs"])
            w = lat.elementwise_work(elements)
            records.append({"kind": w.kind, "features": list(w.features), "seconds": ev[0]["seconds"],
                            "config": [op, batch, c, hw], "op": op})
    return records


# =============================================================================================
# the NCHWc path rule


def probe_path(block: int) -> lat.Nchwc:
    """The smallest ``input_multiple`` consistent with which Conv shapes onnxruntime blocks."""
    def blocked(cin: int, cout: int, group: int) -> bool:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "opt.onnx")
            _session(conv_model(1, cin, cout, (3, 3), 8, group, 1, act=False), profile=False, optimized_path=path)
            return any(n.op_type == "ReorderOutput" for n in onnx.load(path).graph.node)

    cases = [(c, 16, 1) for c in (3, 4, 6, 8, 9, 12, 20, 21)] + [(c, c, c) for c in (9, 12, 16, 18)]
    cases += [(32, 32, 4), (32, 16, 4), (48, 48, 4), (64, 64, 2), (24, 24, 2)]
    seen = {case: blocked(*case) for case in cases}
    for multiple in (1, 2, 4, 8, 16):
        rule = lat.Nchwc(block, multiple)
        if all(seen[case] == rule.nchwc(*case, 2) for case in cases):
            return rule
    raise SystemExit("calibrate: onnxruntime's NCHWc rule matches no input_multiple; update graphopt.measure.latency.Nchwc")


def _block() -> int:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return 16 if "avx512f" in flags else 8



def profiler_overhead(n: int = 64) -> float:
    """Seconds the profiler adds to every kernel it times: the median profiled duration of a tiny Relu
    minus its share of the wall-clock time of a chain of ``n`` of them (~4 us here, against ~1 us of real
    dispatch). Subtracted from every measurement before the fit, so that a kernel's constant is what a
    run without the profiler pays."""
    x = helper.make_tensor_value_info("x0", 1, [1, 8])
    model = _model([helper.make_node("Relu", [f"x{i}"], [f"x{i + 1}"]) for i in range(n)], [x], [])
    profiled = statistics.median(e["seconds"] for e in profile_kernels(model, seconds=0.5))
    sess = _session(model, profile=False)
    feeds = _feeds(sess)
    for _ in range(10):
        sess.run(None, feeds)
    walls = []
    for _ in range(300):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        walls.append(time.perf_counter() - t0)
    return max(profiled - statistics.median(walls) / n, 0.0)


# =============================================================================================
# fit and report


def fit(records: list[dict], overhead: float) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Per kind: non-negative ``c`` minimizing ``Σ ((φ·c − t) / t)²`` over the profiled times less the
    profiler's ``overhead`` (at least 10% of each time is kept); and the fit's relative errors."""
    from scipy.optimize import nnls

    coefficients, quality = {}, {}
    for kind in lat.KINDS:
        rows = [r for r in records if r["kind"] == kind]
        if not rows:
            raise SystemExit(f"calibrate: no kernel of kind {kind} measured")
        x = np.array([r["features"] for r in rows], dtype=np.float64)
        t = _net(np.array([r["seconds"] for r in rows], dtype=np.float64), overhead)
        scale = np.maximum(np.abs(x).max(axis=0), 1e-30)  # conditioning: features span 1 to 1e9
        c, _ = nnls(x / scale / t[:, None], np.ones(len(t)), maxiter=50 * x.shape[1])
        coefficients[kind] = c / scale
        quality[kind] = _errors(x @ coefficients[kind], t)
    return coefficients, quality


def _net(seconds: np.ndarray, overhead: float) -> np.ndarray:
    return np.maximum(seconds - overhead, 0.1 * seconds)


def _errors(pred: np.ndarray, t: np.ndarray) -> dict:
    rel = np.abs(pred / t - 1.0)
    return {"n": int(len(t)), "median_rel_error": round(float(np.median(rel)), 4),
            "p90_rel_error": round(float(np.quantile(rel, 0.9)), 4)}


def cmd_fit(args) -> None:
    path = probe_path(_block())
    print(f"NCHWc rule: block {path.block}, input channels multiple of {path.input_multiple}")
    t0 = time.time()
    if args.records and Path(args.records).exists():
        records = json.loads(Path(args.records).read_text())
    else:
        records = measure(path, args.seed, args.conv, args.gemm, args.eltwise)
        print(f"measured {len(records)} kernels in {time.time() - t0:.0f} s")
        if args.records:
            Path(args.records).write_text(json.dumps(records))
    overhead = profiler_overhead()
    print(f"profiler overhead per kernel: {overhead * 1e6:.2f} us (subtracted)")
    coefficients, quality = fit(records, overhead)
    model = lat.LatencyModel(coefficients, path, {"profiler_overhead_us": round(overhead * 1e6, 3),
        "onnxruntime": ort.__version__, "machine": platform.machine(), "cpu": _cpu_name(),
        "threads": 1, "block": path.block, "date": datetime.date.today().isoformat(),
        "command": "python tools/calibrate_latency.py fit", "seed": args.seed, "fit": quality})
    model.save(args.out)
    _print_quality("fit (training kernels)", quality)
    print(f"wrote {args.out}")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _print_quality(title: str, quality: dict[str, dict]) -> None:
    print(f"\n{title}\n\n| kind | kernels | median rel. error | 90th pct rel. error |\n|---|---|---|---|")
    for kind, q in quality.items():
        print(f"| {kind} | {q['n']} | {q['median_rel_error']:.1%} | {q['p90_rel_error']:.1%} |")


def cmd_check(args) -> None:
    model = lat.load(args.profile)
    records = measure(model.path, args.seed, args.conv, args.gemm, args.eltwise, say=lambda *_: None)
    overhead = profiler_overhead()
    quality = {}
    for kind in lat.KINDS:
        rows = [r for r in records if r["kind"] == kind]
        if rows:
            pred = np.array([model.time(lat.Work(kind, tuple(r["features"]))) for r in rows])
            quality[kind] = _errors(pred, _net(np.array([r["seconds"] for r in rows]), overhead))
    _print_quality(f"held-out kernels (seed {args.seed})", quality)
    print(f"\nwhole models: predicted vs measured (kernels = sum of the kernel times in onnxruntime's profiler, "
          f"less its {overhead * 1e6:.1f} us per kernel; wall = median run)\n\n"
          "| model | batch | predicted ms | kernels ms | wall ms | predicted / kernels | predicted / wall |\n"
          "|---|---|---|---|---|---|---|")
    from graphopt.core.manager import PassContext, build_pipeline, run_pipeline
    from graphopt.core.onnx_io import load as load_model
    from graphopt.core.onnx_io import to_proto
    for name in args.models.split(","):
        # after the lossless preset, as the lossy passes see a model: shape-computed Reshape targets are
        # constants there, so every shape is known
        ir = load_model(str(ROOT / "models" / f"{name}.onnx"))
        run_pipeline(build_pipeline("lossless"), ir, PassContext())
        proto = to_proto(ir)
        for batch in (1, 64):
            pred, _ = lat.model_time(ir, model, batch=batch)
            kernels = float(sum(_net(np.array([e["seconds"] for e in profile_kernels(proto, batch)]), overhead)))
            wall = _wall(proto, batch)
            ratios = ["—", "—"] if pred is None else [f"{pred / kernels:.2f}", f"{pred / wall:.2f}"]
            print(f"| {name} | {batch} | {'—' if pred is None else f'{pred * 1e3:.3f}'} | {kernels * 1e3:.3f} | "
                  f"{wall * 1e3:.3f} | {ratios[0]} | {ratios[1]} |", flush=True)


def _wall(proto: onnx.ModelProto, batch: int, runs: int = 30) -> float:
    sess = _session(proto, profile=False)
    feeds = _feeds(sess, batch)
    sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit")
    f.add_argument("--out", default=str(lat.DEFAULT_PROFILE))
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--records", default=None, help="keep the measurements in this JSON file (and re-fit from it "
                                                    "when it exists)")
    c = sub.add_parser("check")
    c.add_argument("--profile", default=None)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--models", default=",".join(ZOO))
    for p in (f, c):
        p.add_argument("--conv", type=int, default=480)
        p.add_argument("--gemm", type=int, default=60)
        p.add_argument("--eltwise", type=int, default=60)
    args = ap.parse_args()
    {"fit": cmd_fit, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    main()
