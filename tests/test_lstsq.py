"""graphopt.compress.lstsq: streaming ridge least squares and the linear-layer view of Conv/Gemm/MatMul."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.compress.lstsq import CrossGram, LinearLayer, collect
from graphopt.core.onnx_io import from_proto, to_proto
from graphopt.measure.calibration import SampleData
from tests.util import init, make_model, run, tensor

RNG = np.random.default_rng(0)


def _conv_model(strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1), group=1, cin=3, cout=4, k=3, bias=True):
    w = RNG.standard_normal((cout, cin // group, k, k)).astype(np.float32)
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", w)] + ([init("b", RNG.standard_normal(cout).astype(np.float32))] if bias else [])
    node = helper.make_node("Conv", inputs, ["y"], name="conv", strides=list(strides), dilations=list(dilations),
                            pads=list(pads), group=group)
    relu = helper.make_node("Relu", ["y"], ["z"], name="relu")
    return make_model([node, relu], [tensor("x", ["N", cin, 9, 10])], [tensor("z", ["N", cout, "H", "W"])], inits)


def test_crossgram_recovers_an_exact_linear_map_streamed_in_batches():
    x = RNG.standard_normal((500, 6))
    w, b = RNG.standard_normal((6, 3)), RNG.standard_normal(3)
    y = x @ w + b
    gram = CrossGram()
    for part in np.array_split(np.arange(500), 7):
        gram.update(x[part], y[part])
    w_fit, b_fit = gram.solve(ridge=0.0)
    np.testing.assert_allclose(w_fit, w, atol=1e-9)
    np.testing.assert_allclose(b_fit, b, atol=1e-9)
    assert gram.relative_error(w_fit, b_fit) < 1e-6
    assert gram.count == 500 and gram.features == 6 and gram.outputs == 3


def test_crossgram_sse_matches_the_residual_computed_directly():
    x = RNG.standard_normal((200, 5))
    y = RNG.standard_normal((200, 2))
    gram = CrossGram()
    gram.update(x, y)
    cols = [0, 3]
    w, b = gram.solve(ridge=1e-3, columns=cols)
    residual = x[:, cols] @ w + b - y
    np.testing.assert_allclose(gram.sse(w, b, cols), (residual ** 2).sum(axis=0), rtol=1e-9)
    np.testing.assert_allclose(gram.target_ss(), ((y - y.mean(0)) ** 2).sum(axis=0), rtol=1e-9)


def test_crossgram_column_subset_equals_a_fit_on_those_columns_only():
    x = RNG.standard_normal((300, 5))
    y = x @ RNG.standard_normal((5, 2)) + 0.1 * RNG.standard_normal((300, 2))
    full, sub = CrossGram(), CrossGram()
    full.update(x, y)
    sub.update(x[:, [1, 4]], y)
    np.testing.assert_allclose(full.solve(1e-4, [1, 4])[0], sub.solve(1e-4)[0], rtol=1e-8)


def test_crossgram_bias_absorbs_the_mean_of_dropped_inputs():
    """Dropping a constant-ish input moves its mean contribution into the bias (ThiNet's bias fold)."""
    x = np.column_stack([RNG.standard_normal(400), 3.0 + 0.01 * RNG.standard_normal(400)])
    y = (x @ np.array([[1.0], [2.0]])) + 0.5
    gram = CrossGram()
    gram.update(x, y)
    w, b = gram.solve(ridge=0.0, columns=[0])
    np.testing.assert_allclose(b, [0.5 + 2.0 * 3.0], atol=0.01)
    assert gram.relative_error(w, b, [0]) < 0.05


def test_crossgram_without_bias_and_misuse():
    gram = CrossGram(bias=False)
    with pytest.raises(ValueError, match="no rows"):
        gram.solve()
    x = RNG.standard_normal((50, 3))
    gram.update(x, x @ np.ones((3, 1)))
    w, b = gram.solve(ridge=0.0)
    np.testing.assert_allclose(w, np.ones((3, 1)), atol=1e-9)
    assert not b.any()
    with pytest.raises(ValueError, match="same rows"):
        gram.update(x, np.ones((49, 1)))
    with pytest.raises(ValueError, match="out of range"):
        gram.solve(columns=[3])


@pytest.mark.parametrize("strides,dilations,pads", [
    ((1, 1), (1, 1), (1, 1, 1, 1)),
    ((2, 1), (1, 1), (0, 1, 2, 0)),
    ((1, 2), (2, 1), (2, 0, 1, 1)),
    ((2, 2), (2, 2), (0, 0, 0, 0)),
])
def test_conv_rows_times_weight_matrix_is_the_conv(strides, dilations, pads):
    proto = _conv_model(strides, dilations, pads)
    model = from_proto(proto)
    graph = model.graph
    layer = LinearLayer.of(graph, next(n for n in graph.nodes if n.op_type == "Conv"))
    assert isinstance(layer, LinearLayer) and layer.kind == "conv" and layer.features == 27
    x = RNG.standard_normal((2, 3, 9, 10)).astype(np.float32)
    y = run(_with_output(proto, "y"), {"x": x})[1]
    assert layer.positions(x.shape) == y.shape[0] * y.shape[2] * y.shape[3]
    select = np.array([0, 5, layer.positions(x.shape) - 1])
    pred = layer.rows(x, select) @ layer.weight_matrix() + layer.bias_vector()
    np.testing.assert_allclose(pred, layer.target_rows(y, select), rtol=1e-4, atol=1e-5)
    full = layer.rows(x) @ layer.weight_matrix() + layer.bias_vector()
    np.testing.assert_allclose(full, layer.target_rows(y), rtol=1e-4, atol=1e-5)


def _with_output(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    out.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


def _gemm_matmul_model():
    w1 = RNG.standard_normal((4, 6)).astype(np.float32)  # transB: [O, K]
    w2 = RNG.standard_normal((4, 5)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "c1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [tensor("x", ["N", 6])], [tensor("y", ["N", 5])],
                      [init("w1", w1), init("c1", RNG.standard_normal(4).astype(np.float32)), init("w2", w2)])


def test_gemm_and_matmul_views():
    proto = _gemm_matmul_model()
    graph = from_proto(proto).graph
    gemm, matmul = (LinearLayer.of(graph, n) for n in graph.nodes if n.op_type in ("Gemm", "MatMul"))
    assert (gemm.kind, gemm.trans_b, gemm.in_channels, gemm.out_features) == ("gemm", True, 6, 4)
    assert (matmul.kind, matmul.in_channels, matmul.out_features) == ("matmul", 4, 5)
    x = RNG.standard_normal((3, 6)).astype(np.float32)
    y, h, r = run(_with_output(_with_output(proto, "h"), "r"), {"x": x})
    np.testing.assert_allclose(gemm.rows(x) @ gemm.weight_matrix() + gemm.bias_vector(), h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(matmul.rows(r) @ matmul.weight_matrix(), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gemm.channel_columns([2, 0]), [2, 0])


def test_refusals_name_the_reason():
    proto = _conv_model(group=3, cin=3, cout=3)
    graph = from_proto(proto).graph
    conv = next(n for n in graph.nodes if n.op_type == "Conv")
    assert LinearLayer.of(graph, conv) == "grouped conv (group=3)"
    relu = next(n for n in graph.nodes if n.op_type == "Relu")
    assert "not a linear layer" in LinearLayer.of(graph, relu)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)]
    gemm = make_model(nodes, [tensor("x", [6, 2]), tensor("w", [6, 3])], [tensor("y", [2, 3])])
    g = from_proto(gemm).graph
    assert LinearLayer.of(g, g.nodes[0]) == "Gemm with transA"
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    mm = make_model(nodes, [tensor("x", [2, 6]), tensor("w", [6, 3])], [tensor("y", [2, 3])])
    g = from_proto(mm).graph
    assert "not a constant" in LinearLayer.of(g, g.nodes[0])


def test_collect_and_refit_restore_a_damaged_conv_from_a_reference():
    proto = _conv_model(strides=(2, 1), pads=(1, 0, 1, 2))
    reference = from_proto(proto)
    damaged = reference.clone()
    graph = damaged.graph
    conv = next(n for n in graph.nodes if n.op_type == "Conv")
    layer = LinearLayer.of(graph, conv)
    layer.set_weights(graph, layer.weight_matrix() * 0.5 + 0.1, layer.bias_vector() - 1)
    data = SampleData({"x": RNG.standard_normal((40, 3, 9, 10)).astype(np.float32)})
    grams = collect(damaged, {"conv": layer}, data, reference=reference, max_rows=2000, batch_size=16)
    # 3 batches (16, 16, 8 samples x 50 positions), at most ceil(2000 / 3) rows from each
    assert grams["conv"].count == 667 + 667 + 400
    w, b = grams["conv"].solve(ridge=0.0)
    layer.set_weights(graph, w, b)
    out = to_proto(damaged)
    onnx.checker.check_model(out)
    x = data.inputs["x"][:4]
    np.testing.assert_allclose(run(out, {"x": x})[0], run(proto, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_refit_with_fewer_input_channels_writes_a_narrower_weight():
    proto = _conv_model()
    graph = from_proto(proto).graph
    layer = LinearLayer.of(graph, next(n for n in graph.nodes if n.op_type == "Conv"))
    keep = layer.channel_columns([0, 2])
    assert list(keep[:3]) == [0, 1, 2] and list(keep[9:12]) == [18, 19, 20]
    narrow = layer.weight_from_matrix(layer.weight_matrix()[keep])
    np.testing.assert_array_equal(narrow, layer.weight[:, [0, 2]])


def test_set_weights_never_rewrites_a_shared_weight_and_matmul_bias_becomes_an_add():
    w = RNG.standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="m1"),
             helper.make_node("MatMul", ["x", "w"], ["b"], name="m2"),
             helper.make_node("Add", ["a", "b"], ["y"])]
    proto = make_model(nodes, [tensor("x", ["N", 5, 4])], [tensor("y", ["N", 5, 3])], [init("w", w)])
    model = from_proto(proto)
    graph = model.graph
    m1 = next(n for n in graph.nodes if n.name == "m1")
    layer = LinearLayer.of(graph, m1)
    new_w, new_b = np.ones((4, 3)), np.array([1.0, 2.0, 3.0])
    layer.set_weights(graph, new_w, new_b)
    out = to_proto(model)
    onnx.checker.check_model(out)
    x = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    expected = x @ new_w + new_b + x @ w
    np.testing.assert_allclose(run(out, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    assert [n.op_type for n in out.graph.node].count("Add") == 2
    assert np.array_equal(onnx.numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == "w")), w)
    # 3-D input rows flatten the leading axes
    assert layer.rows(x).shape == (10, 4) and layer.positions(x.shape) == 10


def test_merged_statistics_equal_one_pass_over_all_rows():
    x = RNG.standard_normal((120, 4))
    y = x @ RNG.standard_normal((4, 2)) + 0.1 * RNG.standard_normal((120, 2))
    first, second, whole = CrossGram(), CrossGram(), CrossGram()
    first.update(x[:70], y[:70])
    second.update(x[70:], y[70:])
    whole.update(x, y)
    both = first.merge(second)
    assert both.count == 120 and first.count == 70  # the inputs are left as they were
    for a, b in zip(both.solve(1e-3), whole.solve(1e-3)):
        np.testing.assert_allclose(a, b, rtol=1e-10)
    np.testing.assert_allclose(both.target_ss(), whole.target_ss(), rtol=1e-10)
    assert CrossGram().merge(first).count == 70
    with pytest.raises(ValueError, match="bias"):
        first.merge(CrossGram(bias=False))
    other = CrossGram()
    other.update(x[:, :3], y)
    with pytest.raises(ValueError, match="shapes"):
        first.merge(other)


def test_compact_statistics_solve_as_the_float64_ones_and_refuse_more_rows():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 12)) * np.logspace(0, 2, 12)
    y = x @ rng.standard_normal((12, 4)) + rng.standard_normal((400, 4))
    full = CrossGram()
    full.update(x, y)
    w64, b64 = full.solve(1e-3, columns=[0, 2, 5, 7])
    err64 = full.relative_error(w64, b64, columns=[0, 2, 5, 7])
    small = full._copy().compact()
    assert small.xtx.dtype == np.float32 and small.xtx.nbytes * 2 == full.xtx.nbytes
    w32, b32 = small.solve(1e-3, columns=[0, 2, 5, 7])
    assert w32.dtype == np.float64
    np.testing.assert_allclose(w32, w64, rtol=1e-4, atol=1e-6)
    assert small.relative_error(w32, b32, columns=[0, 2, 5, 7]) == pytest.approx(err64, rel=1e-4)
    with pytest.raises(ValueError, match="compact"):
        small.update(x, y)
    merged = full.merge(small)                        # float64 again, and the sums of both
    assert merged.xtx.dtype == np.float64 and merged.count == 2 * full.count
    np.testing.assert_allclose(merged.xtx, 2 * full.xtx, rtol=1e-6)


def test_fast_statistics_take_float32_products_and_solve_as_the_float64_ones():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3000, 20)) * np.logspace(0, 1.5, 20)).astype(np.float32)
    y = (x @ rng.standard_normal((20, 6)) + rng.standard_normal((3000, 6))).astype(np.float32)
    exact, fast = CrossGram(), CrossGram(fast=True)
    for part in (slice(0, 1500), slice(1500, 3000)):
        exact.update(x[part], y[part])
        fast.update(x[part], y[part])
    assert fast.xtx.dtype == np.float64 and fast.count == exact.count
    scale = np.sqrt(np.outer(np.diag(exact.xtx), np.diag(exact.xtx)))   # each entry against its |x_i|·|x_j|
    assert float(np.max(np.abs(fast.xtx - exact.xtx) / scale)) < 1e-5
    np.testing.assert_allclose(fast.y_sq, exact.y_sq, rtol=1e-12)
    w1, b1 = exact.solve(1e-4)
    w2, b2 = fast.solve(1e-4)
    np.testing.assert_allclose(w2, w1, rtol=1e-4, atol=1e-5)
    # The relative error is (|y|² − 2 w·Xᵀy + w·XᵀX·w) / |y|²: terms of order 1 that cancel to 0.018, so
    # the 1e-5 of the float32 products (above) carries over in absolute terms, not relative to 0.018
    # (OpenBLAS's AVX-512 kernels sum in another order than its AVX2 ones: 7.5e-6 apart there).
    assert fast.relative_error(w2, b2) == pytest.approx(exact.relative_error(w1, b1), abs=2e-5)
