"""The quantize pass's speed rule (compress/int8speed.py): layers, int8 regions and whole models the
target's latency profile prices slower quantized stay float. Synthetic profiles, so every test holds on
any machine."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.compress import int8speed
from graphopt.core.manager import PassContext, get_pass
from graphopt.core.onnx_io import from_proto, to_proto
from graphopt.measure import cpu, latency, qdq, target
from graphopt.measure.calibration import SampleData
from tests.test_quantize import _ort, _snr
from tests.util import init, make_model, tensor

FEATURES = len(latency.FEATURES)


def _coef(kernel: float = 0.0, macs: float = 0.0, elements: float = 0.0) -> list[float]:
    """Seconds per dispatch, per MAC and per output element (the other features cost nothing)."""
    return [kernel, macs, elements, 0.0, 0.0, 0.0]


def _profile(int8_macs: float | None, *, int8_kernel: float = 1e-6, convert: float = 1e-7) -> latency.LatencyModel:
    """Float kernels at 1e-10 s per MAC and 1 us a dispatch; int8 kernels at ``int8_macs`` s per MAC and
    ``int8_kernel`` a dispatch (``None``: a profile without int8 kinds); conversions ``convert`` each."""
    coefficients = {k: np.array(_coef(1e-6, 1e-10, 0.0 if k != "elementwise" else 1e-10)) for k in latency.KINDS}
    if int8_macs is not None:
        for k in latency.INT8_KINDS:
            coefficients[k] = np.array(_coef(convert, 0.0, 0.0) if k == "convert" else _coef(int8_kernel, int8_macs))
    return latency.LatencyModel(coefficients, latency.Nchwc(8, 4), {"cpu": "synthetic"})


def _target(model: latency.LatencyModel, kind: str = "avx2") -> target.Target:
    k = cpu.KINDS[kind]
    host = cpu.Detection(k, "test CPU", k.arch, ())
    return target.Target(k, latency.Nchwc(k.block if k.block > 1 else 1, 4), model, "calibrated",
                         host=host, native=True)


def _wide_cnn():
    """A conv(1->4) that is too small to gain, then two 32-channel convs that gain."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    w2 = (rng.normal(size=(32, 4, 3, 3)) / 6).astype(np.float32)
    w3 = (rng.normal(size=(32, 32, 3, 3)) / 17).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a1"], name="small", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["a2"], name="wide1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["a3"], name="wide2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a3"], ["y"], name="relu3")]
    return make_model(nodes, [tensor("x", ["N", 1, 16, 16])], [tensor("y", ["N", 32, 16, 16])],
                      [init("w1", w1), init("w2", w2), init("w3", w3)])


def _wide_data(n=64):
    return SampleData({"x": np.random.default_rng(2).normal(size=(n, 1, 16, 16)).astype(np.float32)})


def _run(proto, tgt, data=None, **options):
    model = from_proto(proto)
    ctx = PassContext(options={"quantize": options}, data=data or _wide_data(), target=tgt)
    result = get_pass("quantize").run(model, ctx)
    model.check_invariants()
    return result, to_proto(model)


def _weighted(out: onnx.ModelProto) -> set[str]:
    """Names of the layers whose weight comes from a DequantizeLinear (quantized)."""
    producer = {o: n for n in out.graph.node for o in n.output}
    return {n.name for n in out.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
            and n.input[1] in producer and producer[n.input[1]].op_type == "DequantizeLinear"}


def test_a_layer_priced_slower_quantized_stays_float_and_the_rest_is_quantized():
    # int8 at a third of float's rate per MAC, 3 us a dispatch: the 36-MAC-per-pixel conv loses, the wide ones win
    result, out = _run(_wide_cnn(), _target(_profile(0.33e-10, int8_kernel=3e-6)))
    assert result.changed and result.stats["quantized"] == 2
    assert _weighted(out) == {"wide1", "wide2"}
    left = {e["reason"].split(":")[0]: e for e in result.stats["left_alone"]}
    assert left["slower quantized on avx2"]["examples"] == ["small"]
    speed = result.stats["int8_speed"]
    prices = {p["layer"]: p for p in speed["prices"]}
    assert prices["small"]["int8_us"] >= prices["small"]["float_us"] and not prices["small"]["quantized"]
    assert all(prices[n]["int8_us"] < prices[n]["float_us"] and prices[n]["quantized"] for n in ("wide1", "wide2"))
    assert speed["int8_over_float"] < 1 and speed["priced_by"] == "the profile's int8 kernels"
    onnx.checker.check_model(out, full_check=True)
    feeds = {"x": _wide_data(8).inputs["x"]}
    assert _snr(_ort(_wide_cnn(), feeds)[0], _ort(out, feeds, optimize=True)[0]) > 25


def test_int8_kernels_priced_slower_everywhere_quantize_nothing_and_say_why():
    proto = _wide_cnn()
    result, out = _run(proto, _target(_profile(2e-10)))
    assert not result.changed and result.stats["quantized"] == 0
    assert "no layer is priced faster quantized on avx2" in result.stats["skipped"]
    assert "quantize.latency=off" in result.stats["skipped"]
    assert not qdq.is_quantized(out)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in proto.graph.node]
    # the same model for size: every fused layer
    forced, out = _run(proto, _target(_profile(2e-10)), latency="off")
    assert forced.changed and forced.stats["quantized"] == 3 and "int8_speed" not in forced.stats


def test_an_int8_region_whose_conversions_cost_more_than_its_kernels_save_stays_float():
    # kernels a little cheaper, but each quantize / transpose / dequantize costs a millisecond
    result, out = _run(_wide_cnn(), _target(_profile(0.9e-10, int8_kernel=1e-6, convert=1e-3)))
    assert not result.changed and result.stats["quantized"] == 0
    reasons = " ".join(e["reason"] for e in result.stats["left_alone"])
    assert "its int8 region (3 layers) saves" in reasons and "quantize / transpose / dequantize" in reasons
    assert not qdq.is_quantized(out)


@pytest.mark.parametrize("kind,quantized", [("avx512-vnni", 3), ("arm64-dot", 3), ("avx512", 0), ("arm64", 0)])
def test_a_profile_without_int8_prices_uses_the_kinds_int8_rate(kind, quantized):
    """Half of float's price with int8 dot products (VNNI, sdot), float's price without: never faster."""
    tgt = _target(latency.LatencyModel.macs_only(latency.Nchwc(cpu.KINDS[kind].block, 4)), kind)
    result, _ = _run(_wide_cnn(), tgt)
    assert result.stats["quantized"] == quantized
    assert result.stats["int8_speed"]["priced_by"] == \
        f"float prices x {int8speed.int8_rate(cpu.KINDS[kind])} (the profile has no int8 kernels)"


def test_a_matmul_model_is_priced_with_the_dynamic_int8_kernel():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    proto = make_model(nodes, [tensor("x", ["N", 64])], [tensor("y", ["N", 64])],
                       [init("w1", rng.normal(size=(64, 64)).astype(np.float32)),
                        init("w2", rng.normal(size=(64, 64)).astype(np.float32))])
    data = SampleData({"x": rng.normal(size=(32, 64)).astype(np.float32)})
    cheap = _profile(0.2e-10, int8_kernel=1e-7)
    result, out = _run(proto, _target(cheap), data)
    assert result.stats["format"] == "dynamic" and result.stats["quantized"] == 2
    assert result.stats["int8_speed"]["int8_over_float"] < 1
    dear = _profile(0.2e-10, int8_kernel=1e-4)
    result, out = _run(proto, _target(dear), data)
    assert result.stats["quantized"] == 0 and not result.changed
    assert {n.op_type for n in out.graph.node} == {"MatMul", "Relu"}


def test_an_optimized_node_maps_back_to_its_layer():
    layers = {"conv", "conv_1", "/a/Conv"}
    assert int8speed.layer_of("/a/Conv_token_7", layers) == "/a/Conv"
    assert int8speed.layer_of("conv_1", layers) == "conv_1"
    assert int8speed.layer_of("conv_1_quant", layers) == "conv_1"     # the longest name that fits
    assert int8speed.layer_of("conv_quant", layers) == "conv"
    assert int8speed.layer_of("other", layers) is None


def test_regions_split_where_the_tensors_are_float():
    """Two quantized convs with a float one between them: two int8 regions, each with its own
    conversions (read off onnxruntime's optimized graph on one sample)."""
    from graphopt.compress import ortquant

    proto = _wide_cnn()

    ranges = {n: qdq.Range(-4.0, 4.0) for n in ("x", "a1", "r1", "a2", "r2", "a3", "y")}
    built = ortquant.static_qdq(ortquant.named(proto), ranges, fmt="u8s8", weight_bits=7, exclude={"wide1"})
    dep = int8speed.deployed(built, {"x": _wide_data(1).inputs["x"]})
    regions = int8speed.regions(dep, {"small", "wide2"}, {"relu1", "relu2", "relu3"})
    assert sorted(sorted(r.layers) for r in regions if r.layers) == [["small"], ["wide2"]]
    assert all(r.conversions for r in regions if r.layers)
    assert all(dep.elements[n.output[0]] > 0 for r in regions for n in r.conversions)


def test_latency_profiles_keep_int8_kinds_optional():
    base = latency.load()
    data = base.to_json()
    data["coefficients"] = {k: v for k, v in data["coefficients"].items() if k in latency.KINDS}
    old = latency.LatencyModel.from_json(data)
    assert not old.has_int8
    assert old.time(latency.Work("int8_conv", (1.0,) * FEATURES)) is None
    data["coefficients"]["int9_conv"] = [0.0] * FEATURES
    with pytest.raises(ValueError, match="unknown kernel kinds int9_conv"):
        latency.LatencyModel.from_json(data)
    assert base.has_int8  # the shipped AVX2 profile prices int8


def test_an_open_sequence_length_is_priced_at_the_samples_shape():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    proto = make_model(nodes, [tensor("x", ["N", "T", 64])], [tensor("y", ["N", "T", 64])],
                       [init("w1", rng.normal(size=(64, 64)).astype(np.float32)),
                        init("w2", rng.normal(size=(64, 64)).astype(np.float32))])
    data = SampleData({"x": rng.normal(size=(8, 12, 64)).astype(np.float32)})
    result, _ = _run(proto, _target(_profile(0.2e-10, int8_kernel=1e-7)), data)
    prices = result.stats["int8_speed"]["prices"]
    # at batch 1 and the sample's 12 steps: 12 x 64 x 64 MACs at 1e-10 s, plus the 1 us dispatch
    assert [p["float_us"] for p in prices] == [pytest.approx(1 + 12 * 64 * 64 * 1e-4, abs=0.01)] * 2
    assert all(p["quantized"] for p in prices) and result.stats["quantized"] == 2


def test_the_console_notice_says_what_the_speed_rule_did():
    nothing, _ = _run(_wide_cnn(), _target(_profile(2e-10)))
    assert nothing.stats["notice"].startswith("nothing quantized: on avx2 no layer is priced faster as int8")
    part, _ = _run(_wide_cnn(), _target(_profile(0.33e-10, int8_kernel=3e-6)))
    assert part.stats["notice"] == "2 layers int8, 1 left float: priced slower as int8 on avx2 (stats int8_speed)"


def _pooled_cnn():
    """:func:`_wide_cnn` with a 2x2 MaxPool between the small conv and the wide ones (inception's stem)."""
    proto = _wide_cnn()
    graph = proto.graph
    wide1 = next(n for n in graph.node if n.name == "wide1")
    wide1.input[0] = "p1"
    at = [n.name for n in graph.node].index("wide1")
    graph.node.insert(at, helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2],
                                           strides=[2, 2]))
    del graph.output[:]
    graph.output.extend([tensor("y", ["N", 32, 8, 8])])
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_the_float_layer_feeding_an_8_bit_nchw_pool_is_quantized_after_all():
    # as in the first test the small conv is priced slower quantized; left float, its MaxPool would run on
    # 8-bit tensors in NCHW (onnxruntime's generic pooling), so it is quantized for the pool's sake
    result, out = _run(_pooled_cnn(), _target(_profile(0.33e-10, int8_kernel=3e-6)))
    assert result.changed and _weighted(out) == {"small", "wide1", "wide2"}
    speed = result.stats["int8_speed"]
    assert list(speed["quantized_for_pools"]) == ["small"] and "pool1" in speed["quantized_for_pools"]["small"]
    assert not int8speed.deployed(out, {"x": _wide_data(1).inputs["x"]}).nchw_pools()
    assert "small" not in str(result.stats.get("left_alone", ""))
    onnx.checker.check_model(out, full_check=True)
    feeds = {"x": _wide_data(8).inputs["x"]}
    assert _snr(_ort(_pooled_cnn(), feeds)[0], _ort(out, feeds, optimize=True)[0]) > 25


def test_an_8_bit_nchw_pool_no_layer_can_be_quantized_for_leaves_the_model_float(monkeypatch):
    # no float layer found to feed the pool: the pool would stay 8-bit NCHW, which the prices do not
    # cover, so nothing is quantized, and the reason says why
    monkeypatch.setattr(int8speed, "feeding_layer", lambda *a, **k: None)
    result, out = _run(_pooled_cnn(), _target(_profile(0.33e-10, int8_kernel=3e-6)))
    assert not result.changed and result.stats["quantized"] == 0 and not qdq.is_quantized(out)
    reasons = [e["reason"] for e in result.stats["left_alone"]]
    assert any("pool1 on 8-bit tensors in NCHW" in r and "no float layer left feeds it" in r for r in reasons)


def test_feeding_layer_walks_back_through_activations_and_quantize_nodes_only():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv_token_3"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"], name="q"),
             helper.make_node("MaxPool", ["q"], ["p"], name="pool", kernel_shape=[2, 2]),
             helper.make_node("Add", ["x", "x"], ["a"], name="add"),
             helper.make_node("MaxPool", ["a"], ["p2"], name="pool2", kernel_shape=[2, 2]),
             helper.make_node("MaxPool", ["x"], ["p3"], name="pool3", kernel_shape=[2, 2])]
    dep = int8speed.Deployed(helper.make_model(helper.make_graph(nodes, "g", [], [])), {}, {"q", "a"})
    assert int8speed.feeding_layer(dep, nodes[3], {"c0": "conv", "o": "other"}) == "conv"   # by the name
    assert int8speed.feeding_layer(dep, nodes[3], {"c": "conv"}) == "conv"                  # by the output
    assert int8speed.feeding_layer(dep, nodes[5], {"c0": "conv"}) is None    # an Add is not a layer's kernel
    assert int8speed.feeding_layer(dep, nodes[6], {"c0": "conv"}) is None    # a graph input
    assert [n.name for n in dep.nchw_pools()] == ["pool", "pool2"]     # 8-bit inputs, default domain

