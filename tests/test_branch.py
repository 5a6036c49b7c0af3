"""DeepRebirth branch slimming (passes/branch.py): concat merge, horizontal fusion, sum merge."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt.passes.lossless.branch as branch
from graphopt.core import onnx_io
from graphopt.core.manager import PassContext
from graphopt.measure.calibration import SampleData
from graphopt.measure.verify import verify
from tests.util import init, make_model, op_types, run, tensor

RNG = np.random.default_rng(0)


def weights(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def conv(name, x, cout, cin, k, *, pads=None, strides=None, dilations=None, group=1, bias=True, out=None):
    """A Conv node and its initializers; ``k`` is an int (square) or a tuple."""
    k = (k, k) if isinstance(k, int) else tuple(k)
    pads = [(k[0] - 1) // 2, (k[1] - 1) // 2] * 2 if pads is None else pads
    attrs = {"kernel_shape": list(k), "pads": pads, "group": group}
    if strides:
        attrs["strides"] = strides
    if dilations:
        attrs["dilations"] = dilations
    inits = [init(f"{name}_w", weights(cout, cin // group, *k))]
    inputs = [x, f"{name}_w"]
    if bias:
        inits.append(init(f"{name}_b", weights(cout)))
        inputs.append(f"{name}_b")
    return helper.make_node("Conv", inputs, [out or name], name=name, **attrs), inits


def build(specs, extra_nodes, inputs, outputs, opset=17, pre=()):
    """A model of ``pre`` nodes, then the convs of ``specs``, then ``extra_nodes``."""
    nodes, inits = list(pre), []
    for node, ws in specs:
        nodes.append(node)
        inits += ws
    return make_model(nodes + extra_nodes, inputs, outputs, inits, opset=opset)


def apply(pass_cls, proto, **options):
    model = onnx_io.from_proto(proto)
    ctx = PassContext(options={pass_cls.name: options} if options else {})
    result = pass_cls().run(model, ctx)
    model.check_invariants()
    out = onnx_io.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return result, out


def assert_equivalent(a, b, feeds):
    for x, y in zip(run(a, feeds), run(b, feeds)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
    data = SampleData(dict(feeds))
    report = verify(a, b, data)
    assert report.passed, report.reasons


def conv_weights(model, node):
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return inits[node.input[1]]


def the(model, op):
    found = [n for n in model.graph.node if n.op_type == op]
    assert len(found) == 1, op_types(model)
    return found[0]


X = {"x": RNG.standard_normal((2, 4, 8, 8)).astype(np.float32)}
XI = [tensor("x", ["N", 4, 8, 8])]


# =============================================================================================
# merge_concat_convs


def test_concat_of_1x1_and_3x3_becomes_one_3x3_conv():
    proto = build([conv("a", "x", 3, 4, 1), conv("b", "x", 5, 4, 3, bias=False)],
                  [helper.make_node("Concat", ["a", "b"], ["y"], axis=1)], XI, [tensor("y", ["N", 8, 8, 8])])
    result, out = apply(branch.MergeConcatConvsPass, proto)
    assert result.changed and result.stats["applied"] == {"merge_concat_convs": 1}
    assert op_types(out) == ["Conv"]
    merged = the(out, "Conv")
    w = conv_weights(out, merged)
    assert w.shape == (8, 4, 3, 3)
    assert list(helper.get_attribute_value(next(a for a in merged.attribute if a.name == "pads"))) == [1, 1, 1, 1]
    np.testing.assert_array_equal(w[:3, :, [0, 2], :], 0)  # the 1x1 sits in the centre
    assert out.graph.output[0].name == "y" and len(out.graph.initializer) == 2
    assert_equivalent(proto, out, X)


def test_concat_through_a_shared_activation_keeps_one_activation():
    proto = build([conv("a", "x", 3, 4, 3), conv("b", "x", 5, 4, 3)],
                  [helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Relu", ["b"], ["rb"]),
                   helper.make_node("Concat", ["ra", "rb"], ["y"], axis=-3)], XI, [tensor("y", ["N", 8, 8, 8])])
    result, out = apply(branch.MergeConcatConvsPass, proto)
    assert result.changed and op_types(out) == ["Conv", "Relu"]
    assert conv_weights(out, the(out, "Conv")).shape == (8, 4, 3, 3)
    assert_equivalent(proto, out, X)


def test_only_adjacent_conv_inputs_merge_and_the_order_is_kept():
    # concat(x, a(x), b(x), c(y)): a and b merge; x and c(y) keep their places.
    proto = build([conv("a", "x", 2, 4, 3), conv("b", "x", 3, 4, 3), conv("c", "z", 2, 4, 3)],
                  [helper.make_node("Concat", ["x", "a", "b", "c"], ["y"], axis=1)],
                  XI, [tensor("y", ["N", 11, 8, 8])], pre=[helper.make_node("Relu", ["x"], ["z"])])
    result, out = apply(branch.MergeConcatConvsPass, proto)
    assert result.changed and result.stats["rewrites"] == 1
    concat = the(out, "Concat")
    assert concat.input[0] == "x" and concat.input[2] == "c" and len(concat.input) == 3
    assert sorted(op_types(out)) == ["Concat", "Conv", "Conv", "Relu"]
    assert_equivalent(proto, out, X)


def test_weights_in_constant_nodes_are_read_and_dropped():
    nodes = [helper.make_node("Constant", [], [f"{n}_w"], value=init(f"{n}_w", weights(3, 4, 3, 3))) for n in "ab"]
    nodes += [helper.make_node("Conv", ["x", f"{n}_w"], [n], pads=[1, 1, 1, 1]) for n in "ab"]
    nodes.append(helper.make_node("Concat", ["a", "b"], ["y"], axis=1))
    proto = make_model(nodes, XI, [tensor("y", ["N", 6, 8, 8])])
    result, out = apply(branch.MergeConcatConvsPass, proto)
    assert result.changed and op_types(out) == ["Conv"]
    assert_equivalent(proto, out, X)


def test_cost_model_merges_same_kernels_and_leaves_the_5x5_alone():
    x = {"x": RNG.standard_normal((1, 16, 16, 16)).astype(np.float32)}
    proto = build([conv("a", "x", 16, 16, 1), conv("b", "x", 16, 16, 1), conv("c", "x", 16, 16, 5)],
                  [helper.make_node("Concat", ["a", "b", "c"], ["y"], axis=1)],
                  [tensor("x", [1, 16, 16, 16])], [tensor("y", [1, 48, 16, 16])])
    result, out = apply(branch.MergeConcatConvsPass, proto)
    assert result.changed
    shapes = sorted(conv_weights(out, n).shape for n in out.graph.node if n.op_type == "Conv")
    assert shapes == [(16, 16, 5, 5), (32, 16, 1, 1)]
    assert_equivalent(proto, out, x)


def test_negative_cost_model_refuses_padding_a_1x1_to_5x5():
    proto = build([conv("a", "x", 16, 16, 1), conv("c", "x", 16, 16, 5)],
                  [helper.make_node("Concat", ["a", "c"], ["y"], axis=1)],
                  [tensor("x", [1, 16, 16, 16])], [tensor("y", [1, 32, 16, 16])])
    result, out = apply(branch.MergeConcatConvsPass, proto)
    assert not result.changed and out == proto
    reasons = [r["reason"] for r in result.stats["left_alone"]]
    assert any("zero-padding 1x1/5x5 to 5x5 does not pay" in r for r in reasons), reasons


def test_negative_padding_disabled_by_option():
    proto = build([conv("a", "x", 3, 4, 1), conv("b", "x", 5, 4, 3)],
                  [helper.make_node("Concat", ["a", "b"], ["y"], axis=1)], XI, [tensor("y", ["N", 8, 8, 8])])
    result, out = apply(branch.MergeConcatConvsPass, proto, allow_padding=False)
    assert not result.changed and out == proto


def test_negative_different_strides():
    proto = build([conv("a", "x", 3, 4, 1, strides=[2, 2]), conv("b", "x", 5, 4, (1, 5), strides=[2, 1], pads=[0] * 4)],
                  [helper.make_node("Concat", ["a", "b"], ["y"], axis=1)], XI, [tensor("y", ["N", 8, 4, 4])])
    result, out = apply(branch.MergeConcatConvsPass, proto)
    assert not result.changed and out == proto


def test_negative_conv_output_with_a_second_reader():
    proto = build([conv("a", "x", 3, 4, 3), conv("b", "x", 5, 4, 3)],
                  [helper.make_node("Concat", ["a", "b"], ["y"], axis=1), helper.make_node("Relu", ["a"], ["r"])],
                  XI, [tensor("y", ["N", 8, 8, 8]), tensor("r", ["N", 3, 8, 8])])
    result, out = apply(branch.MergeConcatConvsPass, proto)
    assert not result.changed and out == proto
    assert any("second reader" in r["reason"] for r in result.stats["left_alone"])


def test_negative_misaligned_padding():
    # Dilation 2 with begin pads 2 and 1: the two convs sample interleaved pixels, no common kernel exists.
    proto = build([conv("a", "x", 3, 4, 3, dilations=[2, 2], pads=[2, 2, 2, 2]),
                   conv("b", "x", 5, 4, 3, dilations=[2, 2], pads=[1, 1, 3, 3])],
                  [helper.make_node("Concat", ["a", "b"], ["y"], axis=1)], XI, [tensor("y", ["N", 8, 8, 8])])
    result, out = apply(branch.MergeConcatConvsPass, proto)
    assert not result.changed and out == proto
    assert any("misaligned" in r["reason"] for r in result.stats["left_alone"])


def test_negative_grouped_convs_are_not_stacked():
    proto = build([conv("a", "x", 4, 4, 3, group=2), conv("b", "x", 4, 4, 3, group=2)],
                  [helper.make_node("Concat", ["a", "b"], ["y"], axis=1)], XI, [tensor("y", ["N", 8, 8, 8])])
    result, out = apply(branch.MergeConcatConvsPass, proto)
    assert not result.changed and out == proto


def test_asymmetric_pads_with_stride_align_when_the_output_sizes_agree():
    # 1x1 pad 0 and 2x2 pad 0, stride 2 on 8x8: both give 4x4 reading windows that start at 2o.
    proto = build([conv("a", "x", 3, 4, 1, strides=[2, 2], pads=[0, 0, 0, 0]),
                   conv("b", "x", 5, 4, 2, strides=[2, 2], pads=[0, 0, 0, 0])],
                  [helper.make_node("Concat", ["a", "b"], ["y"], axis=1)], [tensor("x", [2, 4, 8, 8])],
                  [tensor("y", [2, 8, 4, 4])])
    result, out = apply(branch.MergeConcatConvsPass, proto)
    assert result.changed and op_types(out) == ["Conv"]
    assert conv_weights(out, the(out, "Conv")).shape == (8, 4, 2, 2)
    assert_equivalent(proto, out, X)


# =============================================================================================
# horizontal_fusion


def inception_reductions(opset=17):
    """Three 1x1 convs + Relu of one input, feeding different consumers (the Inception case)."""
    relus = [helper.make_node("Relu", [f"r{k}"], [f"a{k}"]) for k in (1, 3, 5)]
    reductions = [conv("r1", "x", 4, 4, 1), conv("r3", "x", 3, 4, 1), conv("r5", "x", 2, 4, 1)]
    c3, c3w = conv("c3", "a3", 4, 3, 3)
    c5, c5w = conv("c5", "a5", 2, 2, 5)
    return build(reductions + [(relus[0], []), (relus[1], []), (relus[2], []), (c3, c3w), (c5, c5w)],
                 [helper.make_node("Concat", ["a1", "c3", "c5"], ["y"], axis=1)],
                 XI, [tensor("y", ["N", 10, 8, 8])], opset=opset)


@pytest.mark.parametrize("opset", [17, 11])
def test_horizontal_fusion_of_inception_reductions(opset):
    # Without the blocked-layout charge (a runtime whose convs run in plain NCHW) the fusion pays.
    proto = inception_reductions(opset)
    result, out = apply(branch.HorizontalFusionPass, proto, blocked_layout=False)
    assert result.changed and result.stats["applied"] == {"horizontal_fusion": 1}
    assert sorted(op_types(out)) == ["Concat", "Conv", "Conv", "Conv", "Relu", "Split"]
    split = the(out, "Split")
    fused = next(n for n in out.graph.node if n.op_type == "Conv" and n.input[0] == "x")
    assert conv_weights(out, fused).shape == (9, 4, 1, 1)
    if opset >= 13:
        sizes = next(t for t in out.graph.initializer if t.name == split.input[1])
        assert onnx.numpy_helper.to_array(sizes).tolist() == [4, 3, 2]
    else:
        assert len(split.input) == 1
        assert list(helper.get_attribute_value(next(a for a in split.attribute if a.name == "split"))) == [4, 3, 2]
    assert list(split.output) == ["a1", "a3", "a5"]  # the readers' values keep their names
    assert_equivalent(proto, out, X)


def test_negative_conv_split_refused_for_blocked_layout_runtimes():
    # onnxruntime CPU runs convs in NCHWc and has no blocked Split: the reorders cost more than the fusion saves
    # (measured on the Inception zoo model: 12-25% slower at batch 64 with ORT_ENABLE_ALL).
    proto = inception_reductions()
    result, out = apply(branch.HorizontalFusionPass, proto)
    assert not result.changed and out == proto
    assert any("NCHWc" in r["reason"] for r in result.stats["left_alone"])


def qkv_matmuls(k: int, n: int) -> onnx.ModelProto:
    nodes, inits = [], []
    for name in "qkv":
        inits += [init(f"w{name}", weights(k, n)), init(f"b{name}", weights(n))]
        nodes += [helper.make_node("MatMul", ["x", f"w{name}"], [f"m{name}"]),
                  helper.make_node("Add", [f"b{name}", f"m{name}"], [name])]
    nodes.append(helper.make_node("Concat", ["q", "k", "v"], ["y"], axis=0))
    return make_model(nodes, [tensor("x", ["B", 5, k])], [tensor("y", ["B3", 5, n])], inits)


def test_horizontal_fusion_of_matmuls_with_bias():
    # A wide input read three times costs more than copying the narrow outputs once: fused.
    x = {"x": RNG.standard_normal((2, 5, 40)).astype(np.float32)}
    proto = qkv_matmuls(40, 6)
    result, out = apply(branch.HorizontalFusionPass, proto)
    assert result.changed and op_types(out) == ["MatMul", "Add", "Split", "Concat"]
    assert conv_weights(out, the(out, "MatMul")).shape == (40, 18)
    assert helper.get_attribute_value(the(out, "Split").attribute[0]) == 2
    assert_equivalent(proto, out, x)


def test_negative_attention_projections_are_not_fused():
    # q/k/v projections as wide as their input (the transformer case): the Split would copy more data than
    # the fusion saves; measured 3 % slower on the transformer zoo model at batch 64.
    proto = qkv_matmuls(8, 8)
    result, out = apply(branch.HorizontalFusionPass, proto)
    assert not result.changed and out == proto
    assert any("moves more data" in r["reason"] for r in result.stats["left_alone"])


def test_horizontal_fusion_of_gemms_folds_alpha_beta_and_transb():
    x = {"x": RNG.standard_normal((3, 16)).astype(np.float32)}
    inits = [init("b1", weights(4, 16)), init("c1", weights(4)), init("b2", weights(16, 5)),
             init("c2", weights(1, 5)), init("b3", weights(16, 2))]
    nodes = [helper.make_node("Gemm", ["x", "b1", "c1"], ["g1"], transB=1, alpha=0.5, beta=2.0),
             helper.make_node("Gemm", ["x", "b2", "c2"], ["g2"]),
             helper.make_node("Gemm", ["x", "b3"], ["y3"], alpha=3.0),
             helper.make_node("Tanh", ["g1"], ["y1"]), helper.make_node("Sigmoid", ["g2"], ["y2"])]
    proto = make_model(nodes, [tensor("x", [3, 16])], [tensor("y1", [3, 4]), tensor("y2", [3, 5]),
                                                       tensor("y3", [3, 2])], inits)
    result, out = apply(branch.HorizontalFusionPass, proto)
    assert result.changed and sorted(op_types(out)) == ["Gemm", "Sigmoid", "Split", "Tanh"]
    assert conv_weights(out, the(out, "Gemm")).shape == (16, 11)
    assert [o.name for o in out.graph.output] == ["y1", "y2", "y3"]
    assert_equivalent(proto, out, x)


def test_negative_two_small_gemms_with_different_activations_do_not_pay():
    # One Gemm + Split is no fewer nodes than two Gemms: the cost model says no.
    inits = [init("b1", weights(6, 4)), init("b2", weights(6, 5))]
    nodes = [helper.make_node("Gemm", ["x", "b1"], ["g1"]), helper.make_node("Gemm", ["x", "b2"], ["g2"]),
             helper.make_node("Tanh", ["g1"], ["y1"]), helper.make_node("Sigmoid", ["g2"], ["y2"])]
    proto = make_model(nodes, [tensor("x", [3, 6])], [tensor("y1", [3, 4]), tensor("y2", [3, 5])], inits)
    result, out = apply(branch.HorizontalFusionPass, proto)
    assert not result.changed and out == proto
    assert any("does not pay" in r["reason"] for r in result.stats["left_alone"])


def test_negative_horizontal_siblings_with_different_strides():
    proto = build([conv("a", "x", 3, 4, 1, strides=[2, 2]), conv("b", "x", 5, 4, 1)], [],
                  XI, [tensor("a", ["N", 3, 4, 4]), tensor("b", ["N", 5, 8, 8])])
    result, out = apply(branch.HorizontalFusionPass, proto)
    assert not result.changed and out == proto


# =============================================================================================
# merge_sum_branches


def test_repvgg_3x3_plus_1x1_plus_identity_becomes_one_conv():
    proto = build([conv("k3", "x", 4, 4, 3), conv("k1", "x", 4, 4, 1)],
                  [helper.make_node("Add", ["k3", "k1"], ["s"]), helper.make_node("Add", ["s", "x"], ["y"])],
                  XI, [tensor("y", ["N", 4, 8, 8])])
    result, out = apply(branch.MergeSumBranchesPass, proto)
    assert result.changed and result.stats["applied"] == {"merge_sum_branches": 1}
    assert op_types(out) == ["Conv"] and out.graph.output[0].name == "y"
    assert conv_weights(out, the(out, "Conv")).shape == (4, 4, 3, 3)
    assert_equivalent(proto, out, X)


def test_acnet_3x3_plus_3x1_plus_1x3():
    proto = build([conv("sq", "x", 6, 4, 3), conv("ver", "x", 6, 4, (3, 1)), conv("hor", "x", 6, 4, (1, 3))],
                  [helper.make_node("Sum", ["sq", "ver", "hor"], ["y"])], XI, [tensor("y", ["N", 6, 8, 8])])
    result, out = apply(branch.MergeSumBranchesPass, proto)
    assert result.changed and op_types(out) == ["Conv"]
    assert conv_weights(out, the(out, "Conv")).shape == (6, 4, 3, 3)
    assert_equivalent(proto, out, X)


def test_depthwise_plus_identity_uses_an_identity_kernel_per_group():
    proto = build([conv("dw", "x", 4, 4, 3, group=4, bias=False)],
                  [helper.make_node("Add", ["x", "dw"], ["y"])], XI, [tensor("y", ["N", 4, 8, 8])])
    result, out = apply(branch.MergeSumBranchesPass, proto)
    assert result.changed and op_types(out) == ["Conv"]
    merged = the(out, "Conv")
    assert conv_weights(out, merged).shape == (4, 1, 3, 3)
    assert helper.get_attribute_value(next(a for a in merged.attribute if a.name == "group")) == 4
    assert_equivalent(proto, out, X)


def test_sum_keeps_other_terms():
    proto = build([conv("a", "x", 4, 4, 3), conv("b", "x", 4, 4, 3), conv("c", "z", 4, 4, 1)],
                  [helper.make_node("Add", ["a", "c"], ["s"]), helper.make_node("Add", ["s", "b"], ["y"])],
                  XI, [tensor("y", ["N", 4, 8, 8])], pre=[helper.make_node("Relu", ["x"], ["z"])])
    result, out = apply(branch.MergeSumBranchesPass, proto)
    assert result.changed and sorted(op_types(out)) == ["Add", "Conv", "Conv", "Relu"]
    assert_equivalent(proto, out, X)


def test_negative_add_of_convs_reading_different_tensors():
    proto = build([conv("a", "x", 4, 4, 3), conv("b", "z", 4, 4, 3)],
                  [helper.make_node("Add", ["a", "b"], ["y"])],
                  XI, [tensor("y", ["N", 4, 8, 8])], pre=[helper.make_node("Relu", ["x"], ["z"])])
    result, out = apply(branch.MergeSumBranchesPass, proto)
    assert not result.changed and out == proto


def test_negative_identity_branch_with_channel_change():
    # Cout != Cin: Add(conv(x), x) broadcasts only if shapes agree, so use a 1-channel output.
    proto = build([conv("a", "x", 1, 4, 3)], [helper.make_node("Add", ["a", "x"], ["y"])],
                  XI, [tensor("y", ["N", 4, 8, 8])])
    result, out = apply(branch.MergeSumBranchesPass, proto)
    assert not result.changed and out == proto
    assert any("Cin == Cout" in r["reason"] for r in result.stats["left_alone"])


def test_passes_are_deterministic():
    proto = inception_reductions()
    a = apply(branch.HorizontalFusionPass, proto, blocked_layout=False)[1]
    b = apply(branch.HorizontalFusionPass, proto, blocked_layout=False)[1]
    assert a.SerializeToString() == b.SerializeToString()


def test_negative_sum_of_1x5_and_5x1_is_not_padded_to_5x5():
    # 5 + 5 taps would become 25: the cost model refuses.
    x = {"x": RNG.standard_normal((1, 16, 16, 16)).astype(np.float32)}
    proto = build([conv("h", "x", 16, 16, (1, 5)), conv("v", "x", 16, 16, (5, 1))],
                  [helper.make_node("Add", ["h", "v"], ["y"])], [tensor("x", [1, 16, 16, 16])],
                  [tensor("y", [1, 16, 16, 16])])
    result, out = apply(branch.MergeSumBranchesPass, proto)
    assert not result.changed and out == proto
    assert any("does not pay" in r["reason"] for r in result.stats["left_alone"])
    assert run(proto, x)[0].shape == (1, 16, 16, 16)


# =============================================================================================
# pool_through_concat


def pooled_concat(pool: onnx.NodeProto, axis: int = 1, extra_reader: bool = False,
                  out_shape=("N", 8, 4, 4)) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["x"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=axis), pool]
    outputs = [tensor("y", list(out_shape))]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["c"], ["z"]))
        outputs.append(tensor("z", ["N", 8, 8, 8]))
    return make_model(nodes, XI, outputs)


@pytest.mark.parametrize("pool, out_shape", [
    (helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2]), ("N", 8, 4, 4)),
    (helper.make_node("AveragePool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
     ("N", 8, 4, 4)),
    (helper.make_node("GlobalAveragePool", ["c"], ["y"]), ("N", 8, 1, 1)),
], ids=["maxpool", "avgpool_padded", "global"])
def test_pool_moves_before_the_concat(pool, out_shape):
    proto = pooled_concat(pool, out_shape=out_shape)
    result, out = apply(branch.PoolThroughConcatPass, proto)
    assert result.changed and result.stats["rewrites"] == 1
    assert op_types(out) == ["Relu", "Sigmoid", pool.op_type, pool.op_type, "Concat"]
    assert [o.name for o in out.graph.output] == ["y"]
    feeds = {"x": RNG.standard_normal((2, 4, 8, 8)).astype(np.float32)}
    for x, y in zip(run(proto, feeds), run(out, feeds), strict=True):
        np.testing.assert_array_equal(x, y)  # every plane pooled with the same arithmetic: bit-identical


@pytest.mark.parametrize("proto", [
    pooled_concat(helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  out_shape=("N", 8, 8, 8)),
    pooled_concat(helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2]), axis=2,
                  out_shape=("N", 4, 8, 4)),
    pooled_concat(helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2]), extra_reader=True),
], ids=["stride_1_saves_nothing", "spatial_axis", "concat_read_elsewhere"])
def test_negative_pool_stays_after_the_concat(proto):
    result, out = apply(branch.PoolThroughConcatPass, proto)
    assert not result.changed and out == proto
    assert result.stats.get("left_alone")
