"""Streamline slimming: BN / affine / Pad folds and linear-layer merges (passes/streamline.py).

Every rule: a small graph where it applies (count, remaining ops, onnxruntime outputs, onnx.checker),
plus graphs it must leave alone (the exported model is then identical to the input).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt.passes.lossless.streamline as streamline
from graphopt.core import onnx_io
from graphopt.core.manager import PassContext
from tests.util import apply_pass as optimize
from tests.util import init, make_model, op_types, run, tensor

PASSES = {p.name: p for p in (streamline.FoldBatchNorm, streamline.FoldAffine, streamline.FusePad,
                              streamline.MergeLinear, streamline.GemmRows)}


def assert_same(proto: onnx.ModelProto, out: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for a, b in zip(run(proto, feeds), run(out, feeds)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(a).max())))


def assert_unchanged(pass_name: str, proto: onnx.ModelProto, reason: str) -> dict:
    result, out = optimize(pass_name, proto)
    assert not result.changed and out == proto
    reasons = [entry["reason"] for entry in result.stats.get("left_alone", [])]
    assert reason in reasons, reasons
    return result.stats


def applied(result) -> dict[str, int]:
    return result.stats["applied"]


def rand(rng: np.random.Generator, *shape: int, low: float | None = None, high: float | None = None) -> np.ndarray:
    if low is not None:
        return rng.uniform(low, high, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def bn(prefix: str, x: str, y: str, c: int, rng: np.random.Generator, **attrs):
    """A BatchNormalization node with non-trivial statistics (var != 1, mean != 0) and its initializers."""
    names = [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")]
    inits = [init(names[0], rand(rng, c, low=0.5, high=2.0)), init(names[1], rand(rng, c)),
             init(names[2], rand(rng, c)), init(names[3], rand(rng, c, low=0.3, high=3.0))]
    return helper.make_node("BatchNormalization", [x, *names], [y], epsilon=1e-3, **attrs), inits


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# =============================================================================================
# fold_batchnorm


@pytest.mark.parametrize("with_bias", [True, False])
def test_bn_after_grouped_conv(with_bias):
    rng = np.random.default_rng(1)
    bn_node, bn_inits = bn("bn", "c", "y", 6, rng)
    conv_inputs = ["x", "w", "b"] if with_bias else ["x", "w"]
    inits = [init("w", rand(rng, 6, 2, 3, 3)), *bn_inits] + ([init("b", rand(rng, 6))] if with_bias else [])
    proto = make_model([helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1], group=2), bn_node],
                       [tensor("x", ["N", 4, 6, 6])], [tensor("y", ["N", 4 + 2, 6, 6])], inits)
    result, out = optimize("fold_batchnorm", proto)
    assert result.changed and applied(result) == {"bn_into_preceding_layer": 1}
    assert result.stats["sites"] == {"after Conv": 1}
    assert op_types(out) == ["Conv"] and len(out.graph.node[0].input) == 3  # a bias was created if absent
    assert out.graph.output[0].name == "y"
    assert all(t.data_type == TensorProto.FLOAT for t in out.graph.initializer)
    assert len(out.graph.initializer) == 2  # BN's parameters are gone
    assert_same(proto, out, {"x": rand(rng, 2, 4, 6, 6)})


def test_bn_after_grouped_conv_transpose():
    rng = np.random.default_rng(2)
    bn_node, bn_inits = bn("bn", "c", "y", 6, rng)
    proto = make_model([helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], strides=[2, 2], group=2), bn_node],
                       [tensor("x", [2, 4, 5, 5])], [tensor("y", [2, 6, 11, 11])],
                       [init("w", rand(rng, 4, 3, 3, 3)), init("b", rand(rng, 6)), *bn_inits])
    result, out = optimize("fold_batchnorm", proto)
    assert applied(result) == {"bn_into_preceding_layer": 1} and op_types(out) == ["ConvTranspose"]
    assert_same(proto, out, {"x": rand(rng, 2, 4, 5, 5)})


@pytest.mark.parametrize("trans_b,c_shape", [(0, None), (1, None), (0, [5]), (1, [1, 5]), (0, []), (1, [3, 5])])
def test_bn_after_gemm(trans_b, c_shape):
    rng = np.random.default_rng(3)
    bn_node, bn_inits = bn("bn", "g", "y", 5, rng)
    w = rand(rng, 5, 4) if trans_b else rand(rng, 4, 5)
    inits = [init("w", w), *bn_inits]
    gemm_inputs = ["x", "w"]
    if c_shape is not None:
        inits.append(init("c", rand(rng, *c_shape)))
        gemm_inputs.append("c")
    proto = make_model([helper.make_node("Gemm", gemm_inputs, ["g"], transB=trans_b, alpha=0.7, beta=1.3), bn_node],
                       [tensor("x", [3, 4])], [tensor("y", [3, 5])], inits)
    result, out = optimize("fold_batchnorm", proto)
    assert applied(result) == {"bn_into_preceding_layer": 1} and op_types(out) == ["Gemm"]
    assert_same(proto, out, {"x": rand(rng, 3, 4)})


def test_bn_after_2d_matmul_becomes_gemm():
    rng = np.random.default_rng(4)
    bn_node, bn_inits = bn("bn", "m", "y", 5, rng)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), bn_node],
                       [tensor("x", ["N", 4])], [tensor("y", ["N", 5])], [init("w", rand(rng, 4, 5)), *bn_inits])
    result, out = optimize("fold_batchnorm", proto)
    assert applied(result) == {"bn_into_preceding_layer": 1} and result.stats["sites"] == {"after MatMul": 1}
    assert op_types(out) == ["Gemm"] and out.graph.output[0].name == "y"
    assert_same(proto, out, {"x": rand(rng, 3, 4)})


def test_bn_before_unpadded_conv_and_gemm():
    rng = np.random.default_rng(5)
    bn1, inits1 = bn("bn1", "x", "a", 4, rng)
    bn2, inits2 = bn("bn2", "f", "b", 16, rng)
    proto = make_model([bn1, helper.make_node("Conv", ["a", "w"], ["c"], strides=[2, 2], group=2),
                        helper.make_node("Flatten", ["c"], ["f"]), bn2,
                        helper.make_node("Gemm", ["b", "g", "gc"], ["y"], transB=1, alpha=0.5)],
                       [tensor("x", ["N", 4, 5, 5])], [tensor("y", ["N", 3])],
                       [init("w", rand(rng, 4, 2, 3, 3)), init("g", rand(rng, 3, 16)), init("gc", rand(rng, 3)),
                        *inits1, *inits2])
    result, out = optimize("fold_batchnorm", proto)
    assert applied(result) == {"bn_into_following_layer": 2}
    assert result.stats["sites"] == {"before Conv": 1, "before Gemm": 1}
    assert op_types(out) == ["Conv", "Flatten", "Gemm"]
    assert_same(proto, out, {"x": rand(rng, 2, 4, 5, 5)})


def test_bn_before_padded_conv_with_zero_shift_and_into_two_readers():
    rng = np.random.default_rng(6)
    bn_node, bn_inits = bn("bn", "x", "a", 3, rng)
    scale, bias, mean, var = (numpy_helper.to_array(t) for t in bn_inits)
    # beta = mean·gamma/sigma makes the shift t zero, so the padded conv's border stays exact.
    beta = (mean.astype(np.float64) * scale / np.sqrt(var.astype(np.float64) + 1e-3)).astype(np.float32)
    bn_inits[1] = init("bn_bias", beta)
    proto = make_model([bn_node, helper.make_node("Conv", ["a", "w1"], ["c1"], pads=[1, 1, 1, 1]),
                        helper.make_node("Conv", ["a", "w2"], ["c2"], pads=[2, 2, 2, 2], dilations=[2, 2]),
                        helper.make_node("Add", ["c1", "c2"], ["y"])],
                       [tensor("x", ["N", 3, 6, 6])], [tensor("y", ["N", 2, 6, 6])],
                       [init("w1", rand(rng, 2, 3, 3, 3)), init("w2", rand(rng, 2, 3, 3, 3)), *bn_inits])
    result, out = optimize("fold_batchnorm", proto)
    assert applied(result) == {"bn_into_following_layer": 1} and result.stats["sites"] == {"before Conv": 2}
    assert op_types(out) == ["Conv", "Conv", "Add"]
    assert_same(proto, out, {"x": rand(rng, 2, 3, 6, 6)})


def test_bn_with_constant_node_weights_inside_an_if_branch():
    rng = np.random.default_rng(7)
    bn_node, bn_inits = bn("bn", "c", "t", 3, rng)
    consts = [helper.make_node("Constant", [], [t.name], value=t)
              for t in [init("w", rand(rng, 3, 2, 1, 1)), *bn_inits]]
    then_g = helper.make_graph([*consts, helper.make_node("Conv", ["x", "w"], ["c"]), bn_node], "then", [],
                               [tensor("t", [1, 3, 4, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e0"]),
                                helper.make_node("Concat", ["e0", "x", "e0"], ["e1"], axis=1),
                                helper.make_node("Slice", ["e1", "s0", "s1", "s2"], ["e"])],
                               "else", [], [tensor("e", [1, 3, 4, 4])])
    proto = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                       [tensor("x", [1, 2, 4, 4]), tensor("cond", [], TensorProto.BOOL)], [tensor("y", [1, 3, 4, 4])],
                       [init("s0", np.array([0], np.int64)), init("s1", np.array([3], np.int64)),
                        init("s2", np.array([1], np.int64))])
    result, out = optimize("fold_batchnorm", proto)
    assert applied(result) == {"bn_into_preceding_layer": 1}
    then_out = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    # The weights stay Constant nodes (the model's form); BN's four parameters are gone.
    assert [n.op_type for n in then_out.node] == ["Constant", "Constant", "Conv"]
    for cond in (True, False):
        assert_same(proto, out, {"x": rand(rng, 1, 2, 4, 4), "cond": np.array(cond)})


def test_bn_fold_with_a_shared_weight_leaves_the_other_reader_alone():
    rng = np.random.default_rng(8)
    bn_node, bn_inits = bn("bn", "c1", "b1", 3, rng)
    w = rand(rng, 3, 3, 3, 3)
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["c1"], pads=[1, 1, 1, 1]), bn_node,
                        helper.make_node("Conv", ["b1", "w"], ["y"], pads=[1, 1, 1, 1])],
                       [tensor("x", ["N", 3, 5, 5])], [tensor("y", ["N", 3, 5, 5])], [init("w", w), *bn_inits])
    result, out = optimize("fold_batchnorm", proto)
    assert applied(result) == {"bn_into_preceding_layer": 1}
    assert op_types(out) == ["Conv", "Conv"]
    first, second = out.graph.node
    assert first.input[1] != "w" and second.input[1] == "w"
    np.testing.assert_array_equal(weights(out)["w"], w)  # the other reader still sees the old weight
    assert_same(proto, out, {"x": rand(rng, 2, 3, 5, 5)})


def test_bn_float64_model_keeps_its_dtype():
    rng = np.random.default_rng(9)
    params = [rng.uniform(0.5, 2, 2), rng.normal(size=2), rng.normal(size=2), rng.uniform(0.3, 3, 2)]
    names = ["s", "b", "m", "v"]
    proto = make_model([helper.make_node("Gemm", ["x", "w"], ["c"]),
                        helper.make_node("BatchNormalization", ["c", *names], ["y"])],
                       [tensor("x", [3, 2], TensorProto.DOUBLE)], [tensor("y", [3, 2], TensorProto.DOUBLE)],
                       [init("w", rng.normal(size=(2, 2))), *[init(n, p) for n, p in zip(names, params)]])
    result, out = optimize("fold_batchnorm", proto)
    assert result.changed and op_types(out) == ["Gemm"]
    assert all(t.data_type == TensorProto.DOUBLE for t in out.graph.initializer)
    x = rng.normal(size=(3, 2))
    np.testing.assert_allclose(run(out, {"x": x})[0], run(proto, {"x": x})[0], rtol=1e-12, atol=1e-12)


def test_bn_training_mode_is_left_alone():
    rng = np.random.default_rng(10)
    bn_node, bn_inits = bn("bn", "c", "y", 2, rng, training_mode=1)
    bn_node.output.extend(["rm", "rv"])
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node],
                       [tensor("x", [2, 2, 3, 3])], [tensor("y", [2, 2, 3, 3]), tensor("rm", [2]), tensor("rv", [2])],
                       [init("w", rand(rng, 2, 2, 1, 1)), *bn_inits])
    assert_unchanged("fold_batchnorm", proto, "training mode (batch statistics)")


def test_bn_with_training_outputs_before_opset_14_is_left_alone():
    rng = np.random.default_rng(11)
    bn_node, bn_inits = bn("bn", "c", "y", 2, rng)
    bn_node.output.extend(["m", "v", "saved_m", "saved_v"])
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node],
                       [tensor("x", [2, 2, 3, 3])], [tensor("y", [2, 2, 3, 3])],
                       [init("w", rand(rng, 2, 2, 1, 1)), *bn_inits], opset=13)
    assert_unchanged("fold_batchnorm", proto, "training outputs present (the training form before opset 14)")


def test_bn_before_padded_conv_with_shift_is_left_alone():
    rng = np.random.default_rng(12)
    bn_node, bn_inits = bn("bn", "x", "a", 3, rng)
    proto = make_model([bn_node, helper.make_node("Conv", ["a", "w"], ["y"], pads=[1, 1, 1, 1])],
                       [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 2, 4, 4])],
                       [init("w", rand(rng, 2, 3, 3, 3)), *bn_inits])
    assert_unchanged("fold_batchnorm", proto, "shift before a padded Conv (zero padding of the shifted input is "
                                              "not the shift of zero padding)")


def test_bn_with_non_constant_statistics_is_left_alone():
    rng = np.random.default_rng(13)
    bn_node, bn_inits = bn("bn", "c", "y", 2, rng)
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node],
                       [tensor("x", [1, 2, 3, 3]), tensor("bn_scale", [2])], [tensor("y", [1, 2, 3, 3])],
                       [init("w", rand(rng, 2, 2, 1, 1)), *bn_inits[1:]])
    assert_unchanged("fold_batchnorm", proto, "scale, bias, mean or variance is not constant")


def test_bn_whose_conv_output_has_another_reader_is_left_alone():
    rng = np.random.default_rng(14)
    bn_node, bn_inits = bn("bn", "c", "b", 2, rng)
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node,
                        helper.make_node("Add", ["b", "c"], ["y"])],
                       [tensor("x", [1, 2, 3, 3])], [tensor("y", [1, 2, 3, 3])],
                       [init("w", rand(rng, 2, 2, 1, 1)), *bn_inits])
    stats = assert_unchanged("fold_batchnorm", proto, "the layer's output has other readers")
    assert ("bn_into_following_layer", f"a reader is not {streamline._LAYERS}") in [
        (e["rule"], e["reason"]) for e in stats["left_alone"]]


def test_bn_after_3d_matmul_is_left_alone():
    rng = np.random.default_rng(15)
    bn_node, bn_inits = bn("bn", "m", "y", 3, rng)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), bn_node],
                       [tensor("x", [2, 3, 4])], [tensor("y", [2, 3, 5])], [init("w", rand(rng, 4, 5)), *bn_inits])
    assert_unchanged("fold_batchnorm", proto,
                     "BatchNormalization after a MatMul whose output is not 2-D (axis 1 is not the feature axis)")


# =============================================================================================
# fold_affine


def conv_then(op: str, const: np.ndarray, rng, swap: bool = False, bias: bool = True):
    inputs = ["k", "c"] if swap else ["c", "k"]
    conv_in = ["x", "w", "b"] if bias else ["x", "w"]
    inits = [init("w", rand(rng, 4, 3, 3, 3)), init("k", const)] + ([init("b", rand(rng, 4))] if bias else [])
    return make_model([helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1]),
                       helper.make_node(op, inputs, ["y"])],
                      [tensor("x", ["N", 3, 5, 5])], [tensor("y", ["N", 4, 5, 5])], inits)


@pytest.mark.parametrize("op,shape,swap,bias", [
    ("Mul", [4, 1, 1], False, True), ("Mul", [1, 4, 1, 1], True, False), ("Mul", [], False, True),
    ("Add", [1, 4, 1, 1], False, False), ("Add", [4, 1, 1], True, True), ("Sub", [4, 1, 1], False, True),
    ("Sub", [1, 4, 1, 1], True, True), ("Div", [4, 1, 1], False, False), ("Mul", [1], False, True)])
def test_affine_after_conv(op, shape, swap, bias):
    rng = np.random.default_rng(20)
    proto = conv_then(op, rand(rng, *shape, low=0.5, high=2.0), rng, swap, bias)
    result, out = optimize("fold_affine", proto)
    assert applied(result) == {"affine_into_preceding_layer": 1} and result.stats["sites"] == {"after Conv": 1}
    assert op_types(out) == ["Conv"] and out.graph.output[0].name == "y"
    assert_same(proto, out, {"x": rand(rng, 2, 3, 5, 5)})


def test_affine_after_gemm_and_matmul_layers():
    rng = np.random.default_rng(21)
    proto = make_model([helper.make_node("Gemm", ["x", "w1"], ["g"], transB=1),
                        helper.make_node("Mul", ["g", "s1"], ["g1"]), helper.make_node("Sub", ["g1", "t1"], ["g2"]),
                        helper.make_node("Reshape", ["g2", "shape"], ["r"]),
                        helper.make_node("MatMul", ["r", "w2"], ["m"]), helper.make_node("Div", ["m", "s2"], ["m1"]),
                        helper.make_node("Add", ["m1", "b2"], ["m2"]), helper.make_node("Mul", ["m2", "s3"], ["y"])],
                       [tensor("x", ["N", 4])], [tensor("y", ["N", 2, 3])],
                       [init("w1", rand(rng, 6, 4)), init("s1", rand(rng, 6)), init("t1", rand(rng, 1, 6)),
                        init("shape", np.array([-1, 2, 3], np.int64)), init("w2", rand(rng, 3, 3)),
                        init("s2", rand(rng, 3, low=0.5, high=2)), init("b2", rand(rng, 3)),
                        init("s3", rand(rng, 1, 1, 3))])
    result, out = optimize("fold_affine", proto)
    # Mul, Sub into the Gemm; Div into the 3-D MatMul's weight; Mul into the MatMul + bias Add. The bias Add
    # of the bare 3-D MatMul is a layer's bias already and stays.
    assert applied(result) == {"affine_into_preceding_layer": 4}
    assert result.stats["sites"] == {"after Gemm": 2, "after MatMul": 2}
    assert op_types(out) == ["Gemm", "Reshape", "MatMul", "Add"]
    assert_same(proto, out, {"x": rand(rng, 3, 4)})


def test_affine_before_conv_gemm_and_matmul():
    rng = np.random.default_rng(22)
    proto = make_model([helper.make_node("Mul", ["x", "s"], ["a"]),  # scale only: exact before a padded conv
                        helper.make_node("Conv", ["a", "w"], ["c"], pads=[1, 1, 1, 1], group=3),
                        helper.make_node("Relu", ["c"], ["d"]),
                        helper.make_node("Add", ["d", "t"], ["e"]),  # shift before an unpadded conv
                        helper.make_node("Conv", ["e", "w2", "b2"], ["f"]),
                        helper.make_node("Flatten", ["f"], ["g"]), helper.make_node("Relu", ["g"], ["h"]),
                        helper.make_node("Div", ["h", "d1"], ["i"]), helper.make_node("Gemm", ["i", "gw"], ["j"]),
                        helper.make_node("Relu", ["j"], ["k"]),
                        helper.make_node("Sub", ["k", "d2"], ["l"]), helper.make_node("MatMul", ["l", "mw"], ["y"])],
                       [tensor("x", ["N", 3, 4, 4])], [tensor("y", ["N", 2])],
                       [init("s", rand(rng, 3, 1, 1)), init("w", rand(rng, 6, 1, 3, 3)),
                        init("t", rand(rng, 1, 6, 1, 1)), init("w2", rand(rng, 2, 6, 1, 1)), init("b2", rand(rng, 2)),
                        init("d1", rand(rng, 32, low=0.5, high=2)),
                        init("gw", rand(rng, 32, 5)), init("d2", rand(rng, 5)), init("mw", rand(rng, 5, 2))])
    result, out = optimize("fold_affine", proto)
    assert applied(result) == {"affine_into_following_layer": 4}
    assert result.stats["sites"] == {"before Conv": 2, "before Gemm": 1, "before MatMul": 1}
    assert op_types(out) == ["Conv", "Relu", "Conv", "Flatten", "Relu", "Gemm", "Relu", "Gemm"]
    assert_same(proto, out, {"x": rand(rng, 2, 3, 4, 4)})


def test_affine_before_grouped_conv_transpose_and_shift_before_gemm():
    rng = np.random.default_rng(32)
    proto = make_model([helper.make_node("Mul", ["x", "s"], ["a"]),
                        helper.make_node("ConvTranspose", ["a", "w", "b"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1],
                                         group=2),
                        helper.make_node("Flatten", ["c"], ["f"]), helper.make_node("Sub", ["f", "t"], ["g"]),
                        helper.make_node("Gemm", ["g", "gw", "gc"], ["y"], alpha=0.5, beta=2.0)],
                       [tensor("x", ["N", 4, 3, 3])], [tensor("y", ["N", 3])],
                       [init("s", rand(rng, 1, 4, 1, 1)), init("w", rand(rng, 4, 1, 3, 3)),
                        init("b", rand(rng, 2)), init("t", rand(rng, 50)), init("gw", rand(rng, 50, 3)),
                        init("gc", rand(rng, 1, 3))])
    result, out = optimize("fold_affine", proto)
    assert applied(result) == {"affine_into_following_layer": 2}
    assert result.stats["sites"] == {"before ConvTranspose": 1, "before Gemm": 1}
    assert op_types(out) == ["ConvTranspose", "Flatten", "Gemm"]
    assert_same(proto, out, {"x": rand(rng, 2, 4, 3, 3)})


def test_affine_shift_before_conv_transpose_is_left_alone():
    rng = np.random.default_rng(33)
    proto = make_model([helper.make_node("Add", ["x", "t"], ["a"]),
                        helper.make_node("ConvTranspose", ["a", "w"], ["y"])],
                       [tensor("x", [1, 2, 3, 3])], [tensor("y", [1, 2, 5, 5])],
                       [init("t", rand(rng, 2, 1, 1)), init("w", rand(rng, 2, 2, 3, 3))])
    assert_unchanged("fold_affine", proto,
                     "shift before a ConvTranspose (the number of taps reaching an output varies)")


def test_affine_before_matmuls_with_bias_and_a_shape_reader():
    # LayerNorm's gamma/beta as opset 11 exports it, read by two projections and a Shape.
    rng = np.random.default_rng(28)
    proto = make_model([helper.make_node("Mul", ["x", "gamma"], ["a"]),
                        helper.make_node("Add", ["a", "beta"], ["b"]),
                        helper.make_node("MatMul", ["b", "wq"], ["q"]), helper.make_node("Add", ["q", "bq"], ["q1"]),
                        helper.make_node("MatMul", ["b", "wk"], ["k"]), helper.make_node("Add", ["bk", "k"], ["k1"]),
                        helper.make_node("Shape", ["b"], ["shape"]),
                        helper.make_node("Reshape", ["q1", "shape"], ["r"]),
                        helper.make_node("Add", ["r", "k1"], ["y"])],
                       [tensor("x", ["N", 5, 4])], [tensor("y", ["N", 5, 4])],
                       [init("gamma", rand(rng, 4)), init("beta", rand(rng, 4)), init("wq", rand(rng, 4, 4)),
                        init("bq", rand(rng, 4)), init("wk", rand(rng, 4, 4)), init("bk", rand(rng, 1, 1, 4))])
    result, out = optimize("fold_affine", proto)
    assert applied(result) == {"affine_into_following_layer": 2} and result.stats["sites"] == {"before MatMul": 4}
    assert op_types(out) == ["MatMul", "Add", "MatMul", "Add", "Shape", "Reshape", "Add"]
    assert_same(proto, out, {"x": rand(rng, 2, 5, 4)})


def test_affine_whose_broadcast_widens_its_input_is_left_alone():
    rng = np.random.default_rng(29)
    proto = make_model([helper.make_node("Mul", ["x", "s"], ["a"]), helper.make_node("Conv", ["a", "w"], ["y"])],
                       [tensor("x", [1, 1, 3, 3])], [tensor("y", [1, 2, 3, 3])],
                       [init("s", rand(rng, 1, 3, 1, 1)), init("w", rand(rng, 2, 3, 1, 1))])
    assert_unchanged("fold_affine", proto, "broadcasting changes the input's shape (or the input's shape is unknown)")


def test_affine_shared_weight_gets_a_new_initializer():
    rng = np.random.default_rng(23)
    w = rand(rng, 3, 4)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Mul", ["m", "s"], ["a"]),
                        helper.make_node("MatMul", ["x", "w"], ["b"]), helper.make_node("Add", ["a", "b"], ["y"])],
                       [tensor("x", ["N", 3])], [tensor("y", ["N", 4])], [init("w", w), init("s", rand(rng, 4))])
    result, out = optimize("fold_affine", proto)
    assert applied(result) == {"affine_into_preceding_layer": 1} and op_types(out) == ["MatMul", "MatMul", "Add"]
    np.testing.assert_array_equal(weights(out)["w"], w)
    assert [n.input[1] for n in out.graph.node[:2]].count("w") == 1
    assert_same(proto, out, {"x": rand(rng, 2, 3)})


def test_affine_with_non_constant_scale_is_left_alone():
    rng = np.random.default_rng(24)
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "s"], ["y"])],
                       [tensor("x", [1, 2, 3, 3]), tensor("s", [2, 1, 1])], [tensor("y", [1, 2, 3, 3])],
                       [init("w", rand(rng, 2, 2, 1, 1))])
    assert_unchanged("fold_affine", proto, "no constant operand")


def test_affine_not_per_channel_is_left_alone():
    rng = np.random.default_rng(25)
    proto = conv_then("Mul", rand(rng, 1, 1, 5, 5), rng)
    assert_unchanged("fold_affine", proto, "the constant is not per-channel (it varies along another axis)")


def test_affine_shift_before_padded_conv_is_left_alone():
    rng = np.random.default_rng(26)
    proto = make_model([helper.make_node("Add", ["x", "t"], ["a"]),
                        helper.make_node("Conv", ["a", "w"], ["y"], pads=[1, 1, 1, 1])],
                       [tensor("x", [1, 2, 3, 3])], [tensor("y", [1, 2, 3, 3])],
                       [init("t", rand(rng, 2, 1, 1)), init("w", rand(rng, 2, 2, 3, 3))])
    assert_unchanged("fold_affine", proto, "shift before a padded Conv (zero padding of the shifted input is not "
                                           "the shift of zero padding)")


def test_affine_division_by_zero_is_left_alone():
    rng = np.random.default_rng(27)
    proto = conv_then("Div", np.array([1, 0, 2, 3], np.float32).reshape(4, 1, 1), rng)
    assert_unchanged("fold_affine", proto, "the divisor has zeros")


# =============================================================================================
# fuse_pad


def test_pad_into_conv_opset_17_with_axes_and_opset_10_attributes():
    rng = np.random.default_rng(30)
    w = init("w", rand(rng, 2, 3, 3, 3))
    new = make_model([helper.make_node("Pad", ["x", "pads", "", "axes"], ["p"]),
                      helper.make_node("Conv", ["p", "w"], ["y"], pads=[1, 0, 0, 1], strides=[2, 1])],
                     [tensor("x", ["N", 3, 5, 6])], [tensor("y", ["n", "c", "h", "w"])],
                     [w, init("pads", np.array([1, 2, 0, 1], np.int64)), init("axes", np.array([-2, -1], np.int64))],
                     opset=18)
    old = make_model([helper.make_node("Pad", ["x"], ["p"], pads=[0, 0, 1, 2, 0, 0, 0, 1]),
                      helper.make_node("Conv", ["p", "w"], ["y"], auto_pad="VALID", strides=[2, 1])],
                     [tensor("x", ["N", 3, 5, 6])], [tensor("y", ["n", "c", "h", "w"])], [w], opset=10)
    for proto, pads in ((new, [2, 2, 0, 2]), (old, [1, 2, 0, 1])):
        result, out = optimize("fuse_pad", proto)
        assert applied(result) == {"pad_into_layer": 1} and result.stats["sites"] == {"into Conv": 1}
        assert op_types(out) == ["Conv"] and list(helper.get_attribute_value(
            next(a for a in out.graph.node[0].attribute if a.name == "pads"))) == pads
        assert not any(a.name == "auto_pad" and a.s == b"VALID" for a in out.graph.node[0].attribute)
        assert [t.name for t in out.graph.initializer] == ["w"]
        assert_same(proto, out, {"x": rand(rng, 2, 3, 5, 6)})


@pytest.mark.parametrize("count_include_pad,own_pads", [(1, [1, 0, 1, 0]), (0, [0, 0, 0, 0])])
def test_pad_into_average_pool(count_include_pad, own_pads):
    rng = np.random.default_rng(31)
    proto = make_model([helper.make_node("Pad", ["x", "pads"], ["p"]),
                        helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                         pads=own_pads, count_include_pad=count_include_pad)],
                       [tensor("x", [2, 3, 6, 7])], [tensor("y", ["n", "c", "h", "w"])],
                       [init("pads", np.array([0, 0, 1, 0, 0, 0, 1, 2], np.int64))])
    result, out = optimize("fuse_pad", proto)
    assert applied(result) == {"pad_into_layer": 1} and op_types(out) == ["AveragePool"]
    assert_same(proto, out, {"x": rand(rng, 2, 3, 6, 7)})


@pytest.mark.parametrize("producer,value", [("Relu", 0.0), ("Clip", -1.0), ("Neg", -np.inf)])
def test_pad_into_max_pool_when_the_pad_value_cannot_win(producer, value):
    rng = np.random.default_rng(32)
    first = (helper.make_node("Clip", ["x", "lo"], ["r"]) if producer == "Clip"
             else helper.make_node(producer, ["x"], ["r"]))
    proto = make_model([first, helper.make_node("Pad", ["r", "pads", "v"], ["p"]),
                        helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 0, 0])],
                       [tensor("x", [2, 3, 6, 6])], [tensor("y", ["n", "c", "h", "w"])],
                       [init("pads", np.array([0, 0, 1, 0, 0, 0, 1, 2], np.int64)),
                        init("v", np.array(value, np.float32)), init("lo", np.array(-0.5, np.float32))])
    result, out = optimize("fuse_pad", proto)
    assert applied(result) == {"pad_into_layer": 1} and op_types(out) == [producer, "MaxPool"]
    assert_same(proto, out, {"x": rand(rng, 2, 3, 6, 6)})


def test_pad_into_max_pool_without_proof_is_left_alone():
    proto = make_model([helper.make_node("Pad", ["x", "pads"], ["p"]),
                        helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[2, 2])],
                       [tensor("x", [1, 1, 4, 4])], [tensor("y", [1, 1, 5, 5])],
                       [init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    assert_unchanged("fuse_pad", proto, "MaxPool: the pad value is not provably <= the input (MaxPool pads with -inf)")


@pytest.mark.parametrize("pads,mode,value,reader,reason", [
    ([0, 0, 1, 1, 0, 0, 1, 1], "reflect", 0.0, "Conv", "reflect mode"),
    ([0, 1, 1, 1, 0, 0, 1, 1], "constant", 0.0, "AveragePool", "pads the batch or channel axis"),
    ([0, 0, -1, 1, 0, 0, 1, 1], "constant", 0.0, "Conv", "negative pads (cropping)"),
    ([0, 0, 1, 1, 0, 0, 1, 1], "constant", 1.0, "Conv", "the pad value is not zero"),
    ([0, 0, 1, 1, 0, 0, 1, 1], "constant", 0.0, "AveragePool",
     "AveragePool with count_include_pad=0 and pads of its own (the divisors would differ)"),
    ([0, 0, 0, 0, 0, 0, 1, 1], "constant", 0.0, "CeilPool", "pool with ceil_mode=1"),
    ([0, 0, 1, 1, 0, 0, 1, 1], "constant", 0.0, "IncludePool",
     "pool: the summed pads would not be smaller than the kernel (onnxruntime requires it)"),
])
def test_pad_left_alone(pads, mode, value, reader, reason):
    rng = np.random.default_rng(33)
    layer = {"Conv": helper.make_node("Conv", ["p", "w"], ["y"]),
             "AveragePool": helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[2, 2], pads=[1, 1, 1, 1]),
             "CeilPool": helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                          count_include_pad=1, ceil_mode=1),
             "IncludePool": helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[2, 2], pads=[1, 1, 1, 1],
                                             count_include_pad=1)}[reader]
    proto = make_model([helper.make_node("Pad", ["x", "pads", "v"], ["p"], mode=mode), layer],
                       [tensor("x", [1, 2, 4, 4])], [tensor("y", ["n", "c", "h", "w"])],
                       [init("pads", np.array(pads, np.int64)), init("v", np.array(value, np.float32)),
                        init("w", rand(rng, 2, 2, 3, 3))])
    assert_unchanged("fuse_pad", proto, reason)


# =============================================================================================
# merge_linear


def test_matmul_add_to_gemm():
    rng = np.random.default_rng(40)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["b", "m"], ["y"])],
                       [tensor("x", ["N", 3])], [tensor("y", ["N", 4])],
                       [init("w", rand(rng, 3, 4)), init("b", rand(rng, 1, 4))])
    result, out = optimize("merge_linear", proto)
    assert applied(result) == {"matmul_add_to_gemm": 1} and op_types(out) == ["Gemm"]
    assert out.graph.output[0].name == "y"
    assert_same(proto, out, {"x": rand(rng, 2, 3)})


def test_matmul_add_on_3d_input_is_left_alone():
    rng = np.random.default_rng(41)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                       [tensor("x", ["N", 2, 3])], [tensor("y", ["N", 2, 4])],
                       [init("w", rand(rng, 3, 4)), init("b", rand(rng, 4))])
    assert_unchanged("merge_linear", proto, "the MatMul is not 2-D x 2-D")


def test_matmul_add_on_3d_input_becomes_gemm_on_rows():
    rng = np.random.default_rng(45)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["b", "m"], ["y"])],
                       [tensor("x", ["N", 2, 3])], [tensor("y", ["N", 2, 4])],
                       [init("w", rand(rng, 3, 4)), init("b", rand(rng, 4))])
    result, out = optimize("gemm_rows", proto)
    assert applied(result) == {"matmul_add_to_gemm_rows": 1} and op_types(out) == ["Reshape", "Gemm", "Reshape"]
    shapes = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in out.graph.initializer}
    assert [shapes[n.input[1]] for n in out.graph.node if n.op_type == "Reshape"] == [[-1, 3], [-1, 2, 4]]
    assert [o.name for o in out.graph.output] == ["y"]
    for batch in (1, 3):
        assert_same(proto, out, {"x": rand(rng, batch, 2, 3)})


def test_gemm_rows_refusals():
    rng = np.random.default_rng(46)
    # 2-D: matmul_add_to_gemm's case (merge_linear), not this rule's
    flat = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                      [tensor("x", ["N", 3])], [tensor("y", ["N", 4])], [init("w", rand(rng, 3, 4)), init("b", rand(rng, 4))])
    assert_unchanged("gemm_rows", flat, "2-D (merge_linear's case)")
    # two dynamic leading dims: the result's shape cannot be written as a constant
    two = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                     [tensor("x", ["N", "T", 3])], [tensor("y", ["N", "T", 4])],
                     [init("w", rand(rng, 3, 4)), init("b", rand(rng, 4))])
    assert_unchanged("gemm_rows", two, "more than one leading dim is dynamic (the result's shape cannot be "
                                       "written back)")
    # the biased output feeds a GELU: onnxruntime's BiasGelu takes the Add
    gelu = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["h"]),
                       helper.make_node("Div", ["h", "rt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                       helper.make_node("Add", ["e", "one"], ["p"]), helper.make_node("Mul", ["h", "p"], ["q"]),
                       helper.make_node("Mul", ["q", "half"], ["y"])],
                      [tensor("x", ["N", 2, 3])], [tensor("y", ["N", 2, 4])],
                      [init("w", rand(rng, 3, 4)), init("b", rand(rng, 4)), init("rt2", np.float32(np.sqrt(2))),
                       init("one", np.float32(1)), init("half", np.float32(0.5))])
    assert_unchanged("gemm_rows", gelu, "feeds a GELU (onnxruntime fuses the bias Add into BiasGelu)")


def test_gemm_chain_merges():
    rng = np.random.default_rng(42)
    proto = make_model([helper.make_node("Gemm", ["x", "w1", "c1"], ["h"], transB=1, alpha=0.5, beta=2.0),
                        helper.make_node("Gemm", ["h", "w2"], ["y"], alpha=1.5)],
                       [tensor("x", ["N", 8])], [tensor("y", ["N", 4])],
                       [init("w1", rand(rng, 16, 8)), init("c1", rand(rng, 16)), init("w2", rand(rng, 16, 4))])
    result, out = optimize("merge_linear", proto)
    assert applied(result) == {"dense_chain": 1} and op_types(out) == ["Gemm"]
    assert len(out.graph.initializer) == 2
    assert_same(proto, out, {"x": rand(rng, 3, 8)})


def test_matmul_chain_with_biases_on_3d_input():
    rng = np.random.default_rng(43)
    proto = make_model([helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"]),
                        helper.make_node("MatMul", ["h", "w2"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["a"]),
                        helper.make_node("MatMul", ["a", "w3"], ["y"])],
                       [tensor("x", ["N", 5, 6])], [tensor("y", ["N", 5, 3])],
                       [init("w1", rand(rng, 6, 8)), init("b1", rand(rng, 8)), init("w2", rand(rng, 8, 4)),
                        init("b2", rand(rng, 1, 1, 4)), init("w3", rand(rng, 4, 3))])
    result, out = optimize("merge_linear", proto)
    assert applied(result) == {"dense_chain": 2} and op_types(out) == ["MatMul", "Add"]
    assert_same(proto, out, {"x": rand(rng, 2, 5, 6)})


def test_bottleneck_gemm_chain_is_refused_by_the_cost_model():
    rng = np.random.default_rng(44)
    proto = make_model([helper.make_node("Gemm", ["x", "w1"], ["h"]), helper.make_node("Gemm", ["h", "w2"], ["y"])],
                       [tensor("x", ["N", 256])], [tensor("y", ["N", 256])],
                       [init("w1", rand(rng, 256, 8)), init("w2", rand(rng, 8, 256))])
    assert_unchanged("merge_linear", proto, "cost model: the merged layer costs more than the two layers")


@pytest.mark.parametrize("first,second", [
    (dict(k=3, pads=[1, 1, 1, 1], strides=[2, 2], group=2), dict(k=1)),                   # k×k -> 1×1
    (dict(k=1, group=2), dict(k=3, pads=[1, 1, 1, 1], strides=[2, 2], zero_first_bias=True)),  # 1×1 -> padded k×k
    (dict(k=1), dict(k=3, dilations=[2, 2], group=1)),                                     # 1×1 -> unpadded k×k
])
def test_conv_chain_merges(first, second):
    rng = np.random.default_rng(45)
    c0, c1, c2 = 4, 4, 2
    b1 = np.zeros(c1, np.float32) if second.pop("zero_first_bias", False) else rand(rng, c1)
    k1, k2 = first.pop("k"), second.pop("k")
    g1, g2 = first.get("group", 1), second.get("group", 1)
    proto = make_model([helper.make_node("Conv", ["x", "w1", "b1"], ["h"], **first),
                        helper.make_node("Conv", ["h", "w2", "b2"], ["y"], **second)],
                       [tensor("x", ["N", c0, 8, 8])], [tensor("y", ["n", "c", "h", "w"])],
                       [init("w1", rand(rng, c1, c0 // g1, k1, k1)), init("b1", b1),
                        init("w2", rand(rng, c2, c1 // g2, k2, k2)), init("b2", rand(rng, c2))])
    result, out = optimize("merge_linear", proto)
    assert applied(result) == {"conv_chain": 1} and op_types(out) == ["Conv"]
    assert helper.get_attribute_value(next(a for a in out.graph.node[0].attribute if a.name == "group")) == 1
    assert_same(proto, out, {"x": rand(rng, 2, c0, 8, 8)})


def test_conv_chain_left_alone_when_inexact_or_expensive():
    rng = np.random.default_rng(46)
    biased = make_model([helper.make_node("Conv", ["x", "w1", "b1"], ["h"]),
                         helper.make_node("Conv", ["h", "w2"], ["y"], pads=[1, 1, 1, 1])],
                        [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 2, 4, 4])],
                        [init("w1", rand(rng, 2, 2, 1, 1)), init("b1", rand(rng, 2)),
                         init("w2", rand(rng, 2, 2, 3, 3))])
    assert_unchanged("merge_linear", biased,
                     "1x1 conv with bias before a padded conv (the padding would not see the bias)")
    depthwise = make_model([helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], group=32),
                            helper.make_node("Conv", ["h", "w2"], ["y"])],
                           [tensor("x", [1, 32, 16, 16])], [tensor("y", [1, 32, 16, 16])],
                           [init("w1", rand(rng, 32, 1, 3, 3)), init("w2", rand(rng, 32, 32, 1, 1))])
    assert_unchanged("merge_linear", depthwise, "cost model: the merged conv costs more than the two convs")


# =============================================================================================
# every graph, determinism


def test_fold_inside_a_model_local_function_uses_constant_nodes():
    rng = np.random.default_rng(50)
    w, s = init("w", rand(rng, 3, 2, 3, 3)), init("s", rand(rng, 3, 1, 1))
    fn = helper.make_function("local", "ConvScale", ["x"], ["y"],
                              [helper.make_node("Constant", [], ["w"], value=w),
                               helper.make_node("Constant", [], ["s"], value=s),
                               helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                               helper.make_node("Sub", ["s", "c"], ["y"])],  # -c + s: new weight and bias
                              [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("ConvScale", ["x"], ["y"], domain="local")], "g",
                              [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 3, 4, 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[fn], ir_version=8)
    result, out = optimize("fold_affine", proto)
    assert applied(result) == {"affine_into_preceding_layer": 1}
    assert [n.op_type for n in out.functions[0].node] == ["Constant", "Constant", "Conv"]  # no initializers there
    assert not out.functions[0].value_info  # an IR 10 field; this model is IR 8
    assert_same(proto, out, {"x": rand(rng, 1, 2, 4, 4)})


def test_output_is_deterministic():
    rng = np.random.default_rng(51)
    bn_node, bn_inits = bn("bn", "c", "b", 4, rng)
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]), bn_node,
                        helper.make_node("Conv", ["b", "w2"], ["d"], kernel_shape=[1, 1]),
                        helper.make_node("Mul", ["d", "s"], ["y"])],
                       [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3, 4, 4])],
                       [init("w", rand(rng, 4, 2, 3, 3)), init("w2", rand(rng, 3, 4, 1, 1)),
                        init("s", rand(rng, 3, 1, 1)), *bn_inits])
    outputs = []
    for _ in range(2):
        model = onnx_io.from_proto(proto)
        for name in ("fold_batchnorm", "fold_affine", "merge_linear"):
            assert PASSES[name]().run(model, PassContext()).changed
        outputs.append(onnx_io.to_proto(model).SerializeToString())
    assert outputs[0] == outputs[1]
    out = onnx.load_from_string(outputs[0])
    assert op_types(out) == ["Conv"]  # BN and Mul folded, then the 3x3 -> 1x1 pair merged
    assert [list(a.ints) for a in out.graph.node[0].attribute if a.name == "kernel_shape"] == [[3, 3]]
    assert_same(proto, out, {"x": rand(rng, 2, 2, 6, 6)})


@pytest.mark.parametrize("c1,c2,merges", [(8, 2, True), (2, 8, False)])
def test_conv_chain_with_unknown_spatial_sizes_merges_only_when_cheaper_per_pixel(c1, c2, merges):
    rng = np.random.default_rng(47)
    proto = make_model([helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
                        helper.make_node("Conv", ["h", "w2", "b2"], ["y"])],
                       [tensor("x", ["N", 4, "H", "W"])], [tensor("y", ["N", c2, "H", "W"])],
                       [init("w1", rand(rng, c1, 4, 3, 3)), init("b1", rand(rng, c1)),
                        init("w2", rand(rng, c2, c1, 1, 1)), init("b2", rand(rng, c2))])
    if not merges:
        assert_unchanged("merge_linear", proto, "spatial sizes unknown and the merged conv has more MACs per pixel "
                                                "than the one it replaces")
        return
    result, out = optimize("merge_linear", proto)
    assert applied(result) == {"conv_chain": 1} and op_types(out) == ["Conv"]
    assert_same(proto, out, {"x": rand(rng, 2, 4, 7, 5)})
