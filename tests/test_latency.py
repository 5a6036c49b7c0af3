"""graphopt.measure.latency: the stored profile, onnxruntime's NCHWc rule, monotone and deterministic predictions."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from graphopt.compress import channels
from graphopt.core.onnx_io import from_proto, load
from graphopt.measure import latency as lat
from graphopt.passes.lossy.prune import polynomial_cost
from tests.util import init, make_model, tensor

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def profile() -> lat.LatencyModel:
    return lat.load()


def _cpu_flags() -> str:
    p = Path("/proc/cpuinfo")
    return p.read_text() if p.exists() else ""


def test_stored_profile_is_complete_and_says_where_it_comes_from(profile):
    assert set(profile.coefficients) == set(lat.KINDS)
    for kind, c in profile.coefficients.items():
        assert c.shape == (len(lat.FEATURES),) and (c >= 0).all() and c.sum() > 0, kind
    for key in ("onnxruntime", "cpu", "date", "command", "fit"):
        assert key in profile.meta
    assert profile.meta["fit"]["conv"]["n"] > 50


def test_profile_validation_refuses_bad_files(tmp_path, profile):
    data = profile.to_json()
    bad = json.loads(json.dumps(data))
    bad["coefficients"]["conv"][1] = -1.0
    with pytest.raises(ValueError, match="non-negative"):
        lat.LatencyModel.from_json(bad)
    bad = json.loads(json.dumps(data))
    del bad["coefficients"]["gemm"]
    with pytest.raises(ValueError, match="gemm"):
        lat.LatencyModel.from_json(bad)
    path = tmp_path / "p.json"
    profile.save(path)
    again = lat.load(path)
    assert all(np.array_equal(again.coefficients[k], profile.coefficients[k]) for k in lat.KINDS)


def _blocked_by_onnxruntime(cin: int, cout: int, group: int, kernel=(3, 3)) -> bool:
    w = init("W", np.ones((cout, cin // group, *kernel), np.float32))
    node = helper.make_node("Conv", ["x", "W"], ["y"], group=group, kernel_shape=list(kernel),
                            pads=[kernel[0] // 2, kernel[1] // 2] * 2)
    proto = make_model([node], [tensor("x", [1, cin, 8, 8])], [tensor("y", [1, cout, 8, 8])], [w])
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(d, "o.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return any(n.op_type == "ReorderOutput" for n in onnx.load(so.optimized_model_filepath).graph.node)


@pytest.mark.skipif(("avx512f" in _cpu_flags()) or ("avx2" not in _cpu_flags()),
                    reason="the stored profile's NCHWc rule was read off an AVX2 machine")
@pytest.mark.parametrize("cin,cout,group", [(1, 16, 1), (3, 16, 1), (8, 16, 1), (9, 16, 1), (12, 12, 1),
                                            (21, 16, 1), (16, 9, 1), (16, 16, 16), (9, 9, 9), (20, 20, 20),
                                            (32, 32, 4), (32, 16, 4), (48, 48, 4), (64, 64, 2)])
def test_nchwc_rule_is_onnxruntimes(profile, cin, cout, group):
    assert profile.path.nchwc(cin, cout, group, 2) == _blocked_by_onnxruntime(cin, cout, group)


def test_kinds():
    assert lat.conv_work(1, 16, 16, (1, 1), (8, 8), (8, 8)).kind == "pointwise"
    assert lat.conv_work(1, 16, 16, (3, 3), (8, 8), (8, 8)).kind == "conv"
    assert lat.conv_work(1, 16, 16, (3, 1), (8, 8), (8, 8)).kind == "conv"
    assert lat.conv_work(1, 32, 32, (3, 3), (8, 8), (8, 8), 4).kind == "conv"
    assert lat.conv_work(1, 16, 16, (3, 3), (8, 8), (8, 8), 16).kind == "depthwise"
    assert lat.conv_work(1, 9, 16, (3, 3), (8, 8), (8, 8)).kind == "im2col"
    assert lat.conv_work(1, 9, 9, (3, 3), (8, 8), (8, 8), 9).kind == "grouped_im2col"
    assert lat.conv_work(1, 48, 48, (3, 3), (8, 8), (8, 8), 4).kind == "grouped_im2col"
    assert lat.conv_work(1, 16, 16, (3,), (8,), (8,)).kind == "im2col"  # 1-D convs are never blocked


def test_blocked_channels_are_padded_to_whole_blocks(profile):
    t12 = profile.conv(1, 16, 12, (3, 3), (14, 14), (14, 14))
    t16 = profile.conv(1, 16, 16, (3, 3), (14, 14), (14, 14))
    assert t12 == t16
    assert profile.conv(1, 16, 12, (3, 3), (14, 14), (14, 14), padded=False) < t16


@pytest.mark.parametrize("kernel,group", [((1, 1), 1), ((3, 3), 1), ((3, 1), 1), ("dw", 0)])
def test_predictions_grow_with_every_dimension(profile, kernel, group):
    def t(batch=4, c_in=32, c_out=32, hw=14):
        if kernel == "dw":
            return profile.conv(batch, c_in, c_in, (3, 3), (hw, hw), (hw, hw), c_in)
        return profile.conv(batch, c_in, c_out, kernel, (hw, hw), (hw, hw), group)

    base = t()
    assert base > 0
    for bigger in (dict(batch=8), dict(c_in=64), dict(c_out=64), dict(hw=28)):
        if kernel == "dw" and "c_out" in bigger:
            continue
        assert t(**bigger) > base, bigger
    assert profile.gemm(64, 128, 256) > profile.gemm(32, 128, 256)
    assert profile.gemm(64, 128, 256) > profile.gemm(64, 64, 256)
    assert profile.gemm(64, 128, 256) > profile.gemm(64, 128, 128)


def test_what_the_profile_learned(profile):
    """The facts the passes rely on, as the calibration measured them: a depthwise MAC costs more than a
    pointwise one; two kernels cost more than one of the same MACs (the per-kernel constant)."""
    dw = profile.conv(64, 96, 96, (3, 3), (7, 7), (7, 7), 96) / (64 * 96 * 49 * 9)
    pw = profile.conv(64, 96, 96, (1, 1), (7, 7), (7, 7)) / (64 * 96 * 96 * 49)
    assert dw > 2 * pw
    one = profile.gemm(1, 256, 256)
    assert profile.gemm(1, 256, 128) + profile.gemm(1, 128, 256) > one


def test_node_work_reads_onnx_nodes():
    x, w, y = (1, 16, 8, 8), (32, 16, 3, 3), (1, 32, 8, 8)
    shapes = {"x": x, "w": w, "y": y, "z": y, "a": (2, 5, 64), "b": (64, 10), "c": (2, 5, 10), "bt": (10, 64)}
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 16, 8, 8] x, float[2, 5, 64] a) => (float[1, 32, 8, 8] z, float[2, 5, 10] c, float[10] d) {
            y = Conv <pads = [1, 1, 1, 1]> (x, w)
            z = Relu (y)
            c = MatMul (a, b)
            r = Reshape (c, s)
            d = ReduceSum (r)
        }""".replace("g (", "g (float[32, 16, 3, 3] w, float[64, 10] b, int64[1] s, "))
    m = from_proto(proto)
    nodes = {n.op_type: n for n in m.graph.nodes}

    def dims(v):
        return shapes.get(v.name)

    conv = lat.node_work(nodes["Conv"], dims)
    assert conv.kind == "conv" and conv.features[1] == 32 * 64 * 16 * 9
    assert lat.node_work(nodes["Relu"], dims).features[2] == 32 * 64
    mm = lat.node_work(nodes["MatMul"], dims)
    assert mm.kind == "gemm" and mm.features[1] == 10 * 64 * 10
    assert not any(lat.node_work(nodes["Reshape"], dims).features)
    assert lat.node_work(nodes["ReduceSum"], dims) is None  # its output shape is unknown here
    f = conv.features
    assert conv.scaled(4).features == (1.0, f[1] * 4, f[2] * 4, f[3] * 4, f[4], f[5] * 4)


def test_model_time_is_the_sum_of_its_nodes_and_deterministic(profile):
    m = load(str(MODELS / "mobilenetv2.onnx"))
    total, per = lat.model_time(m, profile, batch=64)
    assert total is not None and total == pytest.approx(sum(per.values()))
    assert lat.model_time(m, profile, batch=64)[0] == total
    small, _ = lat.model_time(m, profile, batch=1)
    assert small < total
    depthwise = [n for n in m.graph.nodes if n.op_type == "Conv" and (n.attr("group", 1) or 1) > 1]
    dw_share = sum(per[n.name] for n in depthwise) / total
    assert 0.15 < dw_share < 0.7  # measured ~30% of the kernel time at batch 64 (tools/calibrate_latency.py)


def test_channel_time_is_an_exact_polynomial_and_falls_with_pruning(profile):
    m = load(str(MODELS / "mobilenetv2.onnx"))
    analysis = channels.analyze(m)
    groups = analysis.prunable()
    full = analysis.time({}, profile, 64)
    half = analysis.time({g.gid: max(g.size // 2, 1) for g in groups}, profile, 64)
    assert 0 < half < full
    poly = polynomial_cost(groups, lambda keep: analysis.time(keep, profile, 64))
    assert poly is not None
    rng = np.random.default_rng(1)
    for _ in range(5):
        keep = {g.gid: int(rng.integers(1, g.size + 1)) for g in groups}
        assert poly(keep) == pytest.approx(analysis.time(keep, profile, 64))
