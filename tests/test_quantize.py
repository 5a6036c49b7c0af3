"""int8 / W4A8 quantization (passes/lossy/quantize.py, compress/quantgrid.py, compress/ortquant.py,
measure/qdq.py) on small graphs and one zoo model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import graphopt
from graphopt.compress import quantgrid
from graphopt.compress.lstsq import CrossGram
from graphopt.core.manager import PassContext, get_pass
from graphopt.core.onnx_io import from_proto, to_proto
from graphopt.measure import ort as gort
from graphopt.measure import qdq
from graphopt.measure.calibration import SampleData
from tests.util import init, make_model, tensor

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def _cnn(seed=0, c1=8, c2=16, opset=17):
    """conv(1->c1) relu -> conv(c1->c2) relu -> GAP -> flatten -> gemm(c2->4)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(c1, 1, 3, 3)).astype(np.float32)
    w2 = (rng.normal(size=(c2, c1, 3, 3)) / np.sqrt(9 * c1)).astype(np.float32)
    w3 = (rng.normal(size=(4, c2)) / np.sqrt(c2)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["a2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], name="fc", transB=1)]
    inits = [init("w1", w1), init("b1", rng.normal(size=c1).astype(np.float32) * 0.1), init("w2", w2),
             init("b2", rng.normal(size=c2).astype(np.float32) * 0.1), init("w3", w3),
             init("b3", np.zeros(4, np.float32))]
    return make_model(nodes, [tensor("x", ["N", 1, 8, 8])], [tensor("logits", ["N", 4])], inits, opset=opset)


def _data(n=128, seed=1):
    return SampleData({"x": np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype(np.float32)})


def _quantize(proto, data=None, **options):
    """The pass on ``proto``; every fused layer quantized (``latency=off``) unless the options say otherwise:
    these tests are about formats, ranges and re-fits, the speed rule has its own (test_int8speed.py)."""
    options.setdefault("latency", "off")
    model = from_proto(proto)
    ctx = PassContext(options={"quantize": options}, data=_data() if data is None else data)
    result = get_pass("quantize").run(model, ctx)
    model.check_invariants()
    return result, to_proto(model)


def _ort(proto, feeds, optimize=False):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _snr(a, b):
    return 10 * np.log10(np.sum(a.astype(np.float64) ** 2) / max(np.sum((a - b).astype(np.float64) ** 2), 1e-30))


def test_quantize_wraps_every_layer_in_qdq_and_runs_as_deployed():
    proto = _cnn()
    result, out = _quantize(proto)
    assert result.changed and result.stats["quantized"] == 3 and result.stats["layers"] == 3
    onnx.checker.check_model(out, full_check=True)
    producer = {o: n for n in out.graph.node for o in n.output}
    for node in (n for n in out.graph.node if n.op_type in ("Conv", "Gemm")):
        assert producer[node.input[0]].op_type == "DequantizeLinear", node.name   # quantized input
        assert producer[node.input[1]].op_type == "DequantizeLinear", node.name   # quantized weight
    assert qdq.is_quantized(out)
    # the format trials: both activation types were built and put through onnxruntime's optimizer
    formats = [t["format"] for t in result.stats["format_trials"] if "layers_left_float" in t]
    assert formats[:2] == ["u8s8", "s8s8"]
    # onnxruntime fuses every layer of the chosen format
    assert not qdq.float_layers(gort.optimized(out))
    feeds = {"x": _data(32, seed=5).inputs["x"]}
    want = _ort(proto, feeds)[0]
    assert _snr(want, _ort(out, feeds, optimize=True)[0]) > 25
    assert _snr(want, _ort(out, feeds)[0]) > 25


def _target(kind: str, host: str):
    """A target of ``kind`` seen from a machine of kind ``host`` (fixed, so the test holds on any machine)."""
    from graphopt.measure import cpu, latency, target

    detection = cpu.Detection(cpu.KINDS[host], "test CPU", cpu.KINDS[host].arch, ())
    return target.Target(cpu.KINDS[kind], latency.Nchwc(cpu.KINDS[kind].block, 4), latency.load(), "shipped",
                         host=detection, native=kind == host)


def _weight_bits(result) -> int:
    return 7 if "7-bit" in result.stats["format"] else 8


@pytest.mark.parametrize("kind,host,bits,measured", [
    ("avx512-vnni", "avx2", 8, False),   # VNNI kernels do not overflow; this machine's would: not measured here
    ("arm64-dot", "avx2", 8, False),
    ("avx2", "avx512-vnni", 7, False),   # the target's kernels can overflow; this machine's cannot show it
    ("avx512", "avx2", None, True),      # both sum pairs in saturating 16 bits: measured here
])
def test_weight_bits_follow_the_target_cpus_int8_kernels(kind, host, bits, measured):
    model = from_proto(_cnn())
    ctx = PassContext(options={"quantize": {"latency": "off"}}, data=_data(), target=_target(kind, host))
    result = get_pass("quantize").run(model, ctx)
    trials = result.stats["format_trials"]
    assert any("deployed_vs_qdq_snr_db" in t for t in trials) == measured
    if not measured:
        decided = next(t for t in trials if "decided_by" in t)
        assert decided["target_cpu"] == kind and _weight_bits(result) == bits
    assert ("notice" in result.stats) == (kind == "avx2")  # int8 buys size, not speed, on AVX2


def test_a_quantized_model_for_another_cpus_kernels_is_verified_as_qdq_arithmetic():
    from graphopt.measure import cpu

    host = cpu.here().kind
    other = "avx2" if host is not None and not host.int8_saturates else "avx512-vnni"  # kernels unlike this one's
    result = graphopt.optimize(_cnn(), preset="int8", data=_data(), target_cpu=other, samples=64,
                               options=["quantize.latency=off"])
    assert result.report["target_cpu"]["name"] == other
    assert any("another CPU's integer kernels" in n for n in result.report["verify"]["notes"])


def test_mse_clip_cuts_a_rare_outlier_and_keeps_a_dense_range():
    """The MSE clip trades rounding noise inside the range against the clipped tail: one value in
    millions far out is not worth widening every step for; a range the data fills is worth keeping;
    and clipping never pays for a tail of many values (their squared error outweighs the rounding)."""
    top, bulk = 100.0, np.zeros(qdq.BINS)
    bulk[:20] = 200_000   # 4 million values in [0, ~1]
    rare = bulk.copy()
    rare[-1] = 1          # one at 100
    assert qdq.mse_clip(rare, top, qdq.Range(0.0, top)) < 25.0   # k c² + (100 − c)² is least at c ≈ 16
    heavy = bulk.copy()
    heavy[-1] = 1000      # a tail that matters
    assert qdq.mse_clip(heavy, top, qdq.Range(0.0, top)) > 0.95 * top
    assert qdq.mse_clip(np.full(qdq.BINS, 50), top, qdq.Range(0.0, top)) > 0.99 * top


def test_percentile_narrows_an_outlier_and_keeps_a_plain_range():
    model = from_proto(_cnn())
    plain = _data(2048, seed=3)
    spiked = plain.inputs["x"].copy()
    spiked[0, 0, 0, 0] = 60.0   # one value of 131,072 far out
    wide = qdq.activation_ranges(model, SampleData({"x": spiked}), ["x"])
    cut = qdq.activation_ranges(model, SampleData({"x": spiked}), ["x"], method="percentile")
    assert wide["x"].hi == pytest.approx(60.0) and cut["x"].hi < 10.0
    assert cut["x"].lo == pytest.approx(max(wide["x"].lo, -cut["x"].hi))   # the same clip below zero
    keep = qdq.activation_ranges(model, plain, ["x"], method="percentile")
    full = qdq.activation_ranges(model, plain, ["x"])
    assert keep["x"].hi > 0.8 * full["x"].hi   # without an outlier the range stays


def test_percentile_is_the_default_calibrator():
    result, _ = _quantize(_cnn())
    assert result.stats["calibrate"] == "percentile"
    minmax, _ = _quantize(_cnn(), calibrate="minmax")
    assert minmax.stats["calibrate"] == "minmax"


def test_float_layers_names_layers_left_float_between_dq_and_q():
    w = init("w_q", np.ones((2, 1, 1, 1), np.int8))
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w_q", "s"], ["wd"], name="wdq"),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="left_float"),
             helper.make_node("Conv", ["xd", "wf"], ["y2"], name="left_float_on_purpose")]
    inits = [w, init("s", np.float32(0.1)), init("z", np.uint8(128)), init("wf", np.ones((2, 1, 1, 1), np.float32))]
    proto = make_model(nodes, [tensor("x", [1, 1, 2, 2])], [tensor("y", [1, 2, 2, 2]), tensor("y2", [1, 2, 2, 2])], inits)
    assert qdq.float_layers(proto) == {"left_float"}
    assert qdq.qdq_aliases(proto) == {"x": "xd"}


def test_refit_beats_round_to_nearest_on_a_layer():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(24, 24))
    x = rng.normal(size=(4000, 24)) @ mix  # correlated inputs: where moving rounding errors pays
    w = rng.normal(size=(24, 6))
    b = rng.normal(size=6)
    xq = x + rng.normal(scale=0.01, size=x.shape)  # the inputs as the quantized model sees them
    gram = CrossGram(bias=True)
    gram.update(xq, x @ w + b)
    for bits in (8, 4):
        rtn = quantgrid.quantize_layer(gram, w, b, bits, "rtn")
        bias = quantgrid.quantize_layer(gram, w, b, bits, "bias")
        fit = quantgrid.quantize_layer(gram, w, b, bits, "weights")
        assert bias.error <= rtn.error + 1e-12
        # at 8 bits the input noise bounds what any weights can recover; at 4 bits the rounding dominates
        assert fit.error < (0.95 if bits == 8 else 0.8) * rtn.error, (bits, fit.error, rtn.error)
        assert np.abs(fit.codes).max() <= quantgrid.qmax(bits)
        np.testing.assert_allclose(fit.weight, fit.codes * fit.scale)


def test_w4a8_refit_has_lower_layer_error_than_rtn_and_writes_int4():
    proto = _cnn()
    rtn, out_rtn = _quantize(proto, weights="int4", refit="rtn")
    fit, out_fit = _quantize(proto, weights="int4")
    assert rtn.changed and fit.changed
    stats = fit.stats["refit"]
    assert stats["method"] == "weights" and stats["layers"] == 3
    assert stats["mean_error"] < stats["mean_rtn_error"]
    codes = [t for t in out_fit.graph.initializer if t.name.endswith("_quantized") and t.data_type == onnx.TensorProto.INT4]
    assert len(codes) == 3
    feeds = {"x": _data(64, seed=7).inputs["x"]}
    want = _ort(proto, feeds)[0]
    assert _snr(want, _ort(out_fit, feeds, optimize=True)[0]) > _snr(want, _ort(out_rtn, feeds, optimize=True)[0])


def test_conv_transpose_weights_are_per_output_channel():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 8, 2, 2)).astype(np.float32)  # [C_in, C_out, kh, kw]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("ConvTranspose", ["r", "w", "b"], ["y"], name="up", strides=[2, 2])]
    inits = [init("w0", rng.normal(size=(4, 1, 3, 3)).astype(np.float32)), init("b0", np.zeros(4, np.float32)),
             init("w", w), init("b", np.zeros(8, np.float32))]
    proto = make_model(nodes, [tensor("x", ["N", 1, 8, 8])], [tensor("y", ["N", 8, 16, 16])], inits)
    result, out = _quantize(proto, keep_unfused=True)
    assert result.changed
    producer = {o: n for n in out.graph.node for o in n.output}
    up = next(n for n in out.graph.node if n.op_type == "ConvTranspose")
    dq = producer[up.input[1]]
    assert dq.op_type == "DequantizeLinear"
    assert next(a.i for a in dq.attribute if a.name == "axis") == 1
    scale = next(t for t in out.graph.initializer if t.name == dq.input[1])
    assert list(scale.dims) == [8]
    feeds = {"x": _data(16, seed=2).inputs["x"]}
    assert _snr(_ort(proto, feeds)[0], _ort(out, feeds)[0]) > 25


def test_refusals_leave_the_model_alone():
    relu = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [tensor("x", ["N", 4])],
                      [tensor("y", ["N", 4])])
    result, out = _quantize(relu, data=SampleData({"x": np.ones((4, 4), np.float32)}))
    assert not result.changed and "no Conv" in result.stats["skipped"]
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    model = from_proto(_cnn())
    result = get_pass("quantize").run(model, PassContext(options={}, data=None))
    assert not result.changed and "sample data" in result.stats["skipped"]
    _, quantized = _quantize(_cnn())
    again, out = _quantize(quantized)
    assert not again.changed and "already quantized" in again.stats["skipped"]
    # a layer with fewer weights than min_weights stays float, with the reason
    result, out = _quantize(_cnn(), min_weights=100)
    assert result.stats["quantized"] == 1  # conv1 has 72 weights, fc 64
    assert any("min_weights" in e["reason"] and e["examples"] == ["conv1", "fc"] for e in result.stats["left_alone"])
    producer = {o: n for n in out.graph.node for o in n.output}
    fc = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert fc.input[1] not in producer  # the float weight itself


def _opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def test_a_model_below_opset_13_is_converted_before_per_channel_quantization():
    """onnxruntime's quantizer writes DequantizeLinear's ``axis`` at any opset; below 13 onnxruntime then
    rejects the model. The pass converts it first and computes what it computes at opset 17."""
    old = _cnn(opset=11)
    result, out = _quantize(old)
    assert result.changed and result.stats["quantized"] == 3
    assert result.stats["opset"].startswith("opset 11 -> 13")
    assert _opset(out) == 13
    onnx.checker.check_model(out, full_check=True)
    sizes = {t.name: int(np.prod(t.dims)) for t in out.graph.initializer}
    per_channel = [n for n in out.graph.node if n.op_type == "DequantizeLinear" and sizes.get(n.input[1], 1) > 1]
    assert len(per_channel) >= 3 and all(any(a.name == "axis" for a in n.attribute) for n in per_channel)
    feeds = {"x": _data(16, seed=7).inputs["x"]}
    _, same = _quantize(_cnn(opset=17))
    np.testing.assert_array_equal(_ort(out, feeds)[0], _ort(same, feeds)[0])  # the same numbers
    assert _snr(_ort(old, feeds)[0], _ort(out, feeds, optimize=True)[0]) > 25


def test_a_model_at_opset_13_or_later_keeps_its_opset_and_a_failed_conversion_refuses(monkeypatch):
    result, out = _quantize(_cnn(opset=17))
    assert result.changed and "opset" not in result.stats and _opset(out) == 17
    from graphopt.compress import ortquant
    proto = _cnn(opset=17)
    assert ortquant.at_per_channel_opset(proto) == (proto, None)

    def broken(model, version):
        raise RuntimeError("No Adapter For Something")

    monkeypatch.setattr(onnx.version_converter, "convert_version", broken)
    old = _cnn(opset=11)
    result, out = _quantize(old)
    assert not result.changed and result.stats["quantized"] == 0
    assert "version converter failed (No Adapter For Something)" in result.stats["skipped"]
    assert _opset(out) == 11 and not qdq.is_quantized(out)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in old.graph.node]


def test_prune_then_quantize_composes():
    # for this machine ("auto"): its integer kernels are the target's, so the verdict runs them as deployed
    result = graphopt.optimize(_cnn(), preset="prune", quantize="int8", data=_data(), target_macs=0.6,
                               target_cpu="auto", options=["prune_filters.multiple=1", "quantize.latency=off"],
                               run_verify=True)
    names = [p["name"] for p in result.report["passes"]]
    assert names.index("prune_filters") < names.index("quantize") == len(names) - 1
    assert result.report["quantize"] == "int8"
    assert qdq.is_quantized(result.model)
    assert "deployed" in " ".join(result.report["verify"]["notes"])
    with pytest.raises(graphopt.GraphoptError):
        graphopt.optimize(_cnn(), passes=["quantize", "dead_code"], quantize="int8", data=_data())


def test_cli_resnet_int8_end_to_end_writes_no_scratch_files(tmp_path):
    """The int8 preset on a zoo model from an empty working directory, the model in a folder of its own:
    the verdict passes on held-out data, and the only new file is the output. Every fused layer
    quantized (``latency=off``): the speed rule's own end-to-end check is the next test."""
    cwd, models, tmp = tmp_path / "cwd", tmp_path / "models", tmp_path / "tmp"
    for folder in (cwd, models, tmp):
        folder.mkdir()
    shutil.copy(MODELS / "resnet.onnx", models / "resnet.onnx")
    out = tmp_path / "resnet.int8.onnx"
    env = {**os.environ, "TMPDIR": str(tmp), "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           "GRAPHOPT_TARGET_CPU": "avx2"}
    cmd = [sys.executable, "-m", "graphopt", "optimize", str(models / "resnet.onnx"), "--preset", "int8",
           "--data", str(MODELS / "fmnist_calib.npz"), "--verify-data", str(MODELS / "fmnist_eval.npz"),
           "--samples", "512", "-o", str(out), "--report", str(tmp_path / "r.json"), "-q",
           "--option", "quantize.latency=off"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(cwd)) == [] and sorted(os.listdir(tmp)) == []
    assert sorted(os.listdir(models)) == ["resnet.onnx"]
    import json
    report = json.loads((tmp_path / "r.json").read_text())
    stats = next(p for p in report["passes"] if p["name"] == "quantize")["stats"]
    assert stats["quantized"] == stats["layers"] == 10
    assert report["verify"]["passed"] and report["verify"]["accuracy_drop"] <= 0.5
    # forcing signed activations: onnxruntime leaves some convs float; they stay float, each with the reason
    result = graphopt.optimize(str(MODELS / "resnet.onnx"), preset="int8", data=str(MODELS / "fmnist_calib.npz"),
                               options=["quantize.format=s8s8", "quantize.refit=rtn", "quantize.latency=off"],
                               samples=64, run_verify=False)
    stats = next(p for p in result.report["passes"] if p["name"] == "quantize")["stats"]
    left = [e for e in stats["left_alone"] if "fuses no int8 kernel" in e["reason"]]
    assert left and sum(e["count"] for e in left) == 10 - stats["quantized"]
    producer = {o: n for n in result.model.graph.node for o in n.output}
    floats = {n.name for n in result.model.graph.node if n.op_type == "Conv" and n.input[1] not in producer}
    assert len(floats) == 10 - stats["quantized"]  # the written model keeps their float weights


def test_resnet_int8_for_the_avx2_profile_stays_float_and_says_why(tmp_path, monkeypatch):
    """The shipped AVX2 profile (the same on any machine) prices resnet's int8 convs no faster than its
    float ones at batch 1, kernels, conversions and all: nothing is quantized, the model written is the
    lossless one, and the stats give every layer's prices and the reason."""
    monkeypatch.setenv("GRAPHOPT_TARGET_CPU", "avx2")
    result = graphopt.optimize(str(MODELS / "resnet.onnx"), preset="int8", data=str(MODELS / "fmnist_calib.npz"),
                               samples=64, run_verify=False)
    stats = next(p for p in result.report["passes"] if p["name"] == "quantize")["stats"]
    assert stats["quantized"] == 0 and "no layer is priced faster quantized on avx2" in stats["skipped"]
    speed = stats["int8_speed"]
    assert speed["target"] == "avx2" and speed["layers_faster"] == 0 and len(speed["prices"]) == 10
    assert speed["priced_by"] == "the profile's int8 kernels"
    assert not qdq.is_quantized(result.model)
    reasons = {e["reason"].split(" (")[0].split(":")[0] for e in stats["left_alone"]}
    assert reasons <= {"slower quantized on avx2", "its int8 region", "the whole model is priced no faster as int8 on avx2"}
    assert sum(e["count"] for e in stats["left_alone"]) == 10


def test_cli_refuses_an_unknown_quantize_value(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "graphopt", "optimize", str(MODELS / "resnet.onnx"),
                           "--quantize", "int16", "-o", str(tmp_path / "x.onnx")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "int16" in proc.stderr


def _matmul_mlp(k=64):
    """x[N, k] -> MatMul(k x 64) -> Relu -> MatMul(64 x 64) -> Gemm(64 -> 4): a layer stack without convs."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
             helper.make_node("Gemm", ["h2", "w3"], ["logits"], name="fc", transB=1)]
    inits = [init("w1", (rng.normal(size=(k, 64)) / np.sqrt(k)).astype(np.float32)),
             init("w2", (rng.normal(size=(64, 64)) / 8).astype(np.float32)),
             init("w3", (rng.normal(size=(4, 64)) / 8).astype(np.float32))]
    return make_model(nodes, [tensor("x", ["N", k])], [tensor("logits", ["N", 4])], inits)


def test_w4a8_without_convs_is_blockwise_matmulnbits_with_int8_activations():
    from graphopt.measure.analysis import analyze

    proto = _matmul_mlp()
    data = SampleData({"x": np.random.default_rng(3).normal(size=(64, 64)).astype(np.float32)})
    result, out = _quantize(proto, data=data, weights="int4")
    assert result.changed and result.stats["quantized"] == 2
    assert result.stats["format"].startswith("dynamic (MatMulNBits: 4-bit weights, 32 a scale")
    nbits = [n for n in out.graph.node if n.op_type == "MatMulNBits"]
    assert [n.domain for n in nbits] == ["com.microsoft"] * 2
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    assert all((a["bits"], a["block_size"], a["accuracy_level"], a["K"], a["N"]) == (4, 32, 4, 64, 64)
               for a in attrs)
    left = [e for e in result.stats["left_alone"] if "MatMulNBits" in e["reason"]]
    assert left and left[0]["examples"] == ["fc"]   # the Gemm stays float
    assert [n.op_type for n in out.graph.node if n.name == "fc"] == ["Gemm"]
    onnx.checker.check_model(out)
    feeds = {"x": np.random.default_rng(4).normal(size=(16, 64)).astype(np.float32)}
    want = _ort(proto, feeds)[0]
    blockwise = _snr(want, _ort(out, feeds, optimize=True)[0])
    # 4-bit weights: about 17 dB through two layers; beats static W4A8 with a scale per output channel
    _, per_channel = _quantize(proto, data=data, weights="int4", format="u8s8", refit="rtn")
    assert blockwise > 14 and blockwise > _snr(want, _ort(per_channel, feeds, optimize=True)[0])
    # its MACs are counted (a MatMulNBits is the MatMul it replaces)
    assert analyze(from_proto(out), batch=8).macs == analyze(from_proto(proto), batch=8).macs
    _, out16 = _quantize(proto, data=data, weights="int4", block_size=16)
    assert {helper.get_attribute_value(a) for n in out16.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "block_size"} == {16}


def test_w4a8_of_a_gemm_only_stack_stays_static_qdq():
    """MatMulNBits takes MatMuls only: a Gemm MLP gets 4-bit weights in static QDQ, as a CNN does."""
    result, out = _quantize(_cnn(), weights="int4")
    assert result.stats["format"].startswith("u8s8")
    assert not any(n.op_type == "MatMulNBits" for n in out.graph.node)


def test_dynamic_int8_leaves_the_second_factor_of_a_low_rank_pair_float():
    """x U V with nothing between (what --preset lowrank writes): V stays float, U quantizes; with a Relu
    between, the two are separate layers and both quantize."""
    rng = np.random.default_rng(0)
    data = SampleData({"x": rng.normal(size=(64, 64)).astype(np.float32)})

    def model(between: bool):
        nodes = [helper.make_node("MatMul", ["x", "u"], ["h"], name="u_factor")]
        if between:
            nodes.append(helper.make_node("Relu", ["h"], ["r"], name="relu"))
        nodes.append(helper.make_node("MatMul", ["r" if between else "h", "v"], ["y"], name="v_factor"))
        return make_model(nodes, [tensor("x", ["N", 64])], [tensor("y", ["N", 64])],
                          [init("u", rng.normal(size=(64, 8)).astype(np.float32)),
                           init("v", rng.normal(size=(8, 64)).astype(np.float32))])

    result, out = _quantize(model(False), data=data)
    assert result.stats["format"] == "dynamic" and result.stats["quantized"] == 1
    left = [e for e in result.stats["left_alone"] if "second factor of a low-rank pair" in e["reason"]]
    assert left and left[0]["examples"] == ["v_factor"]
    assert [n.op_type for n in out.graph.node if n.name == "v_factor"] == ["MatMul"]
    onnx.checker.check_model(out)
    result, _ = _quantize(model(True), data=data)
    assert result.stats["quantized"] == 2
    assert not any("low-rank" in e["reason"] for e in result.stats.get("left_alone", []))


def test_dynamic_int8_leaves_an_excluded_gemm_float():
    """onnxruntime's dynamic quantizer renames every Gemm ``<name>_MatMul`` before it reads the names to
    exclude; a Gemm below min_weights must still stay float."""
    data = SampleData({"x": np.random.default_rng(3).normal(size=(64, 64)).astype(np.float32)})
    result, out = _quantize(_matmul_mlp(), data=data, min_weights=1000)   # fc has 256 weights
    assert result.stats["format"] == "dynamic" and result.stats["quantized"] == 2
    integer = [n for n in out.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert len(integer) == 2 and not any(n.name.startswith("fc") for n in integer)
    # the quantizer's rewrite leaves it a float MatMul on the transposed weight (same numbers)
    assert any(n.op_type in ("MatMul", "Gemm") and any(i.startswith("w3") for i in n.input) for n in out.graph.node)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_activation_ranges_stay_within_the_run_budget_and_do_not_depend_on_it(method, monkeypatch):
    """Every tensor of a run is held at once: a budget of two samples' tensors gives runs of two
    samples, and the same ranges as one run of all 128."""
    from graphopt.measure import calibration

    model, data = from_proto(_cnn()), _data()
    names = ["x", "a1", "r1", "a2", "r2", "logits"]
    per_sample = sum(a.nbytes for a in calibration.first_sample(model, names, data).values())
    batches = []
    real = calibration.Calibrator.__init__

    def spy(self, model, data, batch_size=64, **kw):
        batches.append(batch_size)
        real(self, model, data, batch_size, **kw)

    monkeypatch.setattr(calibration.Calibrator, "__init__", spy)
    small = qdq.activation_ranges(model, data, names, method=method, batch_size=128, run_bytes=2 * per_sample)
    whole = qdq.activation_ranges(model, data, names, method=method, batch_size=128)
    assert batches == [2, 128]
    assert small.keys() == whole.keys()
    for name in whole:
        assert (small[name].lo, small[name].hi) == pytest.approx((whole[name].lo, whole[name].hi), rel=1e-6)


def test_w4a8_without_convs_refuses_in_one_line_when_the_matmulnbits_quantizer_cannot_load(monkeypatch):
    from graphopt.compress import ortquant

    monkeypatch.setitem(sys.modules, "onnxruntime.quantization.matmul_nbits_quantizer", None)  # import fails
    with pytest.raises(graphopt.GraphoptError, match="pip install onnx-ir"):
        ortquant.blockwise_4bit(_matmul_mlp(), block_size=32)
