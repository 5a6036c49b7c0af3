"""graphopt.measure.latency: the shipped AVX2 profile (a fixed profile: the tests hold on any machine), the
detected target's NCHWc rule against what onnxruntime does here, the uncalibrated MAC model, monotone and
deterministic predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.compress import channels
from graphopt.core.onnx_io import from_proto, load
from graphopt.measure import kernels
from graphopt.measure import latency as lat
from graphopt.measure import target as targets
from graphopt.passes.lossy.prune import polynomial_cost

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def profile() -> lat.LatencyModel:
    return lat.load()


def test_stored_profile_is_complete_and_says_where_it_comes_from(profile):
    assert set(profile.coefficients) == set(lat.KINDS + lat.INT8_KINDS)
    for kind, c in profile.coefficients.items():
        assert c.shape == (len(lat.FEATURES),) and (c >= 0).all() and c.sum() > 0, kind
    for key in ("onnxruntime", "cpu", "date", "command", "fit"):
        assert key in profile.meta
    assert profile.meta["fit"]["conv"]["n"] > 50
    # the int8 kinds were measured later, by their own command, on the same machine
    int8 = profile.meta["int8"]
    assert int8["command"].startswith("python tools/calibrate_latency.py int8") and int8["onnxruntime"]
    assert all(int8["fit"][k]["n"] >= 40 for k in lat.INT8_KINDS)


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


def test_shipped_profile_rule_is_the_avx2_kind(profile):
    assert (profile.path.block, profile.path.input_multiple) == (8, 4)
    assert profile.meta["kind"] == "avx2"


# Conv shapes around a block of b channels, (cin, cout, group) as functions of b, so they hold for 8, 16
# or no blocked kernels at all.
_RULE_CASES = {
    "group1 cin 1": lambda b: (1, 2 * b, 1), "group1 cin 3": lambda b: (3, 2 * b, 1),
    "group1 cin b": lambda b: (b, 2 * b, 1), "group1 cin b+1": lambda b: (b + 1, 2 * b, 1),
    "group1 cin b+4": lambda b: (b + 4, b + 4, 1), "group1 cin 2b+5": lambda b: (2 * b + 5, 2 * b, 1),
    "group1 cout b+1": lambda b: (2 * b, b + 1, 1), "depthwise 2b": lambda b: (2 * b, 2 * b, 2 * b),
    "depthwise b+1": lambda b: (b + 1, b + 1, b + 1), "depthwise 2b+4": lambda b: (2 * b + 4, 2 * b + 4, 2 * b + 4),
    "grouped 4b/4": lambda b: (4 * b, 4 * b, 4), "grouped 4b->2b/4": lambda b: (4 * b, 2 * b, 4),
    "grouped 6b/4": lambda b: (6 * b, 6 * b, 4), "grouped 8b/2": lambda b: (8 * b, 8 * b, 2),
}


@pytest.mark.parametrize("case", list(_RULE_CASES))
def test_detected_targets_nchwc_rule_is_onnxruntimes(case):
    """On any machine: the NCHWc rule the detected target prices with says which convs onnxruntime here
    runs blocked (compared with the optimized graph onnxruntime writes)."""
    target = targets.resolve("auto")
    cin, cout, group = _RULE_CASES[case](max(target.path.block, 8))  # no blocked kernels: any shapes say so
    assert target.path.nchwc(cin, cout, group, 2) == kernels.blocked(cin, cout, group)


def test_detected_block_is_onnxruntimes():
    target = targets.resolve("auto")
    assert target.path.block == kernels.block()
    if target.host.kind is not None and not target.notes:
        assert target.kind.block == kernels.block()


def test_without_blocked_kernels_no_conv_is_blocked():
    path = lat.Nchwc(1, 1)
    assert not any(path.nchwc(c, c, g, 2) for c in (4, 8, 16, 64) for g in (1, c))
    assert lat.conv_work(1, 16, 16, (3, 3), (8, 8), (8, 8), path=path).kind == "im2col"
    assert lat.conv_work(1, 16, 16, (3, 3), (8, 8), (8, 8), 16, path=path).kind == "grouped_im2col"


def test_uncalibrated_model_counts_padded_macs():
    """A CPU no one calibrated is priced in MACs with its block geometry: 17 or 24 channels cost what 32
    do with 16-channel blocks, 24 what 24 does with 8-channel ones."""
    m16 = lat.LatencyModel.macs_only(lat.Nchwc(16, 4))
    m8 = lat.LatencyModel.macs_only(lat.Nchwc(8, 4))
    assert not m16.calibrated and lat.load().calibrated

    def t(model, cout):
        return model.conv(1, 32, cout, (3, 3), (8, 8), (8, 8))

    assert t(m16, 17) == t(m16, 24) == t(m16, 32) == 32 * 32 * 9 * 64
    assert t(m8, 24) == 24 * 32 * 9 * 64 < t(m8, 32)
    assert m16.gemm(4, 8, 10) == 4 * 8 * 10
    assert m16.time(lat.elementwise_work(1000)) == 0.0


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


def test_filter_set_passes_charge_a_partial_set_its_whole_pass(profile):
    """With ``passes`` a blocked dense conv's MACs are charged by whole filter sets (4 blocks: 32 channels
    on AVX2): 8 of 32 outputs cost 2.5x per MAC, 40 (two passes) 1.3x, whole sets 1x; depthwise and
    im2col convs, and every conv without ``passes``, are charged as before."""
    path = lat.Nchwc(8, 4)
    assert [path.pass_factor(c) for c in (8, 16, 24, 32, 40, 64)] == pytest.approx(
        [2.5, 1.5, 7 / 6, 1.0, 1.3, 1.0])
    assert lat.Nchwc(16, 4).pass_factor(64) == 1.0 and lat.Nchwc(16, 4).pass_factor(32) == 1.5

    def macs(cin, cout, group=1, passes=True):
        return lat.conv_work(64, cin, cout, (3, 3), (7, 7), (7, 7), group, path=path, passes=passes).features[1]

    assert macs(56, 40) == pytest.approx(1.3 * macs(56, 40, passes=False))
    assert macs(56, 32) == macs(56, 32, passes=False)
    assert macs(56, 56, 56) == macs(56, 56, 56, passes=False)  # depthwise: no filter sets
    assert macs(9, 40) == macs(9, 40, passes=False)  # im2col: off the blocked path
    # the price steps: 32 -> 40 outputs costs more than 24 -> 32, and never less with more channels
    t = [profile.time(lat.conv_work(64, 56, c, (3, 3), (7, 7), (7, 7), path=path, passes=True))
         for c in (24, 32, 40, 48)]
    assert t[2] - t[1] > t[1] - t[0] > 0 and t == sorted(t)


def test_step_aware_channel_time_sees_the_filter_set_boundary(profile):
    """``ChannelAnalysis.time(..., steps=True)`` prices plans with the target's steps: on resnet the
    residual group of the last stage costs a pass more at 40 channels than at 32, which the smooth
    polynomial price does not see (its step is one eighth of the 32->40 one)."""
    m = load(str(MODELS / "resnet.onnx"))
    analysis = channels.analyze(m)
    last = max(analysis.prunable(), key=lambda g: g.gid)
    smooth = [analysis.time({last.gid: k}, profile, 64) for k in (24, 32, 40)]
    steps = [analysis.time({last.gid: k}, profile, 64, steps=True) for k in (24, 32, 40)]
    assert steps[2] - steps[1] > 1.5 * (steps[1] - steps[0]) > 0
    assert smooth[2] - smooth[1] == pytest.approx(smooth[1] - smooth[0], rel=0.2)
    assert analysis.time({}, profile, 64, steps=True) >= analysis.time({}, profile, 64)


@pytest.mark.parametrize("name", ["resnet", "inception", "mobilenetv2"])
def test_a_neighbour_priced_from_the_last_plan_costs_what_a_fresh_count_says(profile, name):
    """``time(steps=True)`` prices a plan one or two groups away from the last one it priced in full by
    re-timing only those groups' nodes (near_fastest's thousands of neighbours); the price must equal a
    fresh analysis's count of the same plan, for moves up and down, on residual, concat and depthwise
    groups; and a group cut under its minimum is still refused."""
    m = load(str(MODELS / f"{name}.onnx"))
    analysis, fresh = channels.analyze(m), channels.analyze(m)
    groups = analysis.prunable()
    rng = np.random.default_rng(3)
    keep = {g.gid: max(g.size // 2, g.min_keep) for g in groups}
    base = analysis.time(keep, profile, 64, steps=True)
    assert base == pytest.approx(fresh.time(keep, profile, 64, steps=True), rel=1e-12)
    for _ in range(12):
        trial = dict(keep)
        for g in rng.choice(groups, size=2, replace=False):
            trial[g.gid] = int(rng.integers(g.min_keep, g.size + 1))
        got = analysis.time(trial, profile, 64, steps=True)
        want = channels.analyze(m).time(trial, profile, 64, steps=True)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert analysis.time(keep, profile, 64, steps=True) == pytest.approx(base, rel=1e-12)
    small = min(groups, key=lambda g: g.min_keep)
    if small.min_keep > 1:
        with pytest.raises(Exception, match="at least"):
            analysis.time({**keep, small.gid: small.min_keep - 1}, profile, 64, steps=True)
