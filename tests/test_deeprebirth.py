"""The approximate DeepRebirth step (passes/deeprebirth.py): fit, measure, keep or roll back."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt.passes.lossy.deeprebirth as dr
from graphopt.core import onnx_io
from graphopt.core.manager import PassContext
from graphopt.core.shapes import ShapeView
from graphopt.measure.calibration import SampleData
from tests.util import init, make_model, op_types, run, tensor

N = 256


def tiny_net(tail: list[onnx.NodeProto], pooled: int, seed: int = 0) -> tuple[onnx.ModelProto, SampleData]:
    """input [N,1,10,10] -> Conv 4x3x3 (pad 1) -> ``tail`` -> Flatten -> Gemm(4·pooled² -> 5).

    "Trained" in the only sense the test needs: the labels are the model's own top-1 classes, so the
    reference accuracy is 100% and any decision the approximation flips costs accuracy.
    """
    rng = np.random.default_rng(seed)
    smooth = rng.standard_normal((N, 1, 12, 12)).astype(np.float32)
    x = (smooth[:, :, :-2, :-2] + smooth[:, :, 1:-1, 1:-1] + smooth[:, :, 2:, 2:]) / 3  # correlated pixels
    nodes = [helper.make_node("Conv", ["input", "cw", "cb"], ["c"], name="conv1", kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]), *tail,
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1)]
    inits = [init("cw", rng.standard_normal((4, 1, 3, 3)).astype(np.float32)),
             init("cb", rng.standard_normal(4).astype(np.float32) * 0.1),
             init("fw", rng.standard_normal((5, 4 * pooled * pooled)).astype(np.float32) * 0.3),
             init("fb", np.zeros(5, np.float32))]
    proto = make_model(nodes, [tensor("input", ["N", 1, 10, 10])], [tensor("logits", ["N", 5])], inits)
    labels = run(proto, {"input": x})[0].argmax(axis=1)
    return proto, SampleData({"input": x}, labels.astype(np.int64))


def conv_relu_maxpool():
    return tiny_net([helper.make_node("Relu", ["c"], ["r"], name="relu1"),
                     helper.make_node("MaxPool", ["r"], ["p"], name="pool1", kernel_shape=[2, 2], strides=[2, 2])], 5)


def apply(proto, data, max_drop, **options):
    model = onnx_io.from_proto(proto)
    ctx = PassContext(data=data, max_drop=max_drop, options={"deeprebirth_approx": options})
    result = dr.DeepRebirthApprox().run(model, ctx)
    model.check_invariants()
    out = onnx_io.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return result, out


def test_pass_is_declared_lossy():
    assert dr.DeepRebirthApprox.lossless is False


def test_conv_relu_maxpool_becomes_one_strided_conv_and_reports_its_error():
    proto, data = conv_relu_maxpool()
    result, out = apply(proto, data, max_drop=100.0, max_drop_per_merge=100.0, max_block_error=1.0)
    assert result.changed and result.stats["replaced"] == 1
    assert op_types(out) == ["Conv", "Relu", "Flatten", "Gemm"]
    conv = out.graph.node[0]
    w = next(t for t in out.graph.initializer if t.name == conv.input[1])
    assert list(w.dims) == [4, 1, 4, 4]  # 3x3 conv + 2x2/2 pool -> one 4x4 stride-2 conv
    assert list(next(a.ints for a in conv.attribute if a.name == "strides")) == [2, 2]
    merge = result.stats["merges"][0]
    assert merge["accepted"] and merge["block"] == "conv1 -> Relu -> MaxPool"
    assert 0 < merge["rel_rms_error"] < 1 and "drop" in merge and "top1_agreement" in merge
    assert merge["macs_after"] < merge["macs_before"]
    assert out.graph.output[0].name == "logits"
    names = {i.name for i in out.graph.initializer}
    assert names >= {"fw", "fb"} and not names & {"cw", "cb"}  # the old conv weights are gone
    logits = run(out, {"input": data.inputs["input"]})[0]
    assert (logits.argmax(axis=1) == data.labels).mean() > 0.5  # an approximation, not noise


def test_zero_budget_rolls_the_lossy_merge_back():
    proto, data = conv_relu_maxpool()
    result, out = apply(proto, data, max_drop=0.0, max_drop_per_merge=100.0, max_block_error=1.0)
    assert not result.changed and result.stats["replaced"] == 0
    assert out == proto  # rolled back: the model is untouched
    merge = result.stats["merges"][0]
    assert not merge["accepted"] and merge["drop"] > 0
    assert "budget 0.0" in merge["rolled_back"]


def test_per_merge_error_budget_rolls_back():
    proto, data = conv_relu_maxpool()
    result, out = apply(proto, data, max_drop=100.0, max_drop_per_merge=100.0, max_block_error=1e-3)
    assert not result.changed and out == proto
    assert "max_block_error" in result.stats["merges"][0]["rolled_back"]


def test_conv_averagepool_is_linear_so_the_fit_is_exact_and_passes_a_zero_budget():
    proto, data = tiny_net([helper.make_node("AveragePool", ["c"], ["p"], name="pool1", kernel_shape=[2, 2],
                                             strides=[2, 2])], 5)
    result, out = apply(proto, data, max_drop=0.0)
    assert result.changed and op_types(out) == ["Conv", "Flatten", "Gemm"]
    merge = result.stats["merges"][0]
    assert merge["accepted"] and merge["rel_rms_error"] < 1e-4 and merge["drop"] <= 0
    np.testing.assert_allclose(run(out, {"input": data.inputs["input"]})[0],
                               run(proto, {"input": data.inputs["input"]})[0], rtol=1e-3, atol=1e-3)


def test_lrn_block_keeps_the_conv_geometry():
    proto, data = tiny_net([helper.make_node("LRN", ["c"], ["p"], name="lrn", size=3)], 10)
    model = onnx_io.from_proto(proto)
    block = dr.find_block(model.graph, model.graph.toposort()[0], ShapeView(model))
    assert isinstance(block, dr.Block)
    assert (block.kernel, block.strides, block.pads_begin, block.pads_end) == ((3, 3), (1, 1), (1, 1), (1, 1))
    result, out = apply(proto, data, max_drop=100.0, max_drop_per_merge=100.0, max_block_error=1.0)
    assert result.changed and op_types(out) == ["Conv", "Flatten", "Gemm"]


def test_geometry_of_padded_overlapping_pool():
    # 3x3 conv (pad 1) + 3x3/2 max pool (pad 1) on 10x10: K' = 2·1 + 3 = 5, S' = 2, P'_b = 1 + 1 = 2, output 5x5.
    proto, _ = tiny_net([helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[3, 3], strides=[2, 2],
                                          pads=[1, 1, 1, 1])], 5)
    model = onnx_io.from_proto(proto)
    block = dr.find_block(model.graph, model.graph.toposort()[0], ShapeView(model))
    assert (block.kernel, block.strides, block.pads_begin, block.out_spatial) == ((5, 5), (2, 2), (2, 2), (5, 5))
    assert (10 + 2 + block.pads_end[0] - 5) // 2 + 1 == 5


def test_without_data_nothing_happens():
    proto, _ = conv_relu_maxpool()
    model = onnx_io.from_proto(proto)
    result = dr.DeepRebirthApprox().run(model, PassContext())
    assert not result.changed and "no calibration data" in result.stats["skipped"]
    assert onnx_io.to_proto(model) == proto


def test_max_rows_is_refused_with_a_pointer_to_batch_rows():
    """deeprebirth_approx counts rows per calibration batch, not per layer as max_rows does elsewhere."""
    from graphopt.core.manager import OptionError, build_pipeline, parse_options

    pipeline = build_pipeline("deeprebirth")
    with pytest.raises(OptionError, match="deeprebirth_approx.max_rows is now deeprebirth_approx.batch_rows"):
        parse_options(["deeprebirth_approx.max_rows=64"], pipeline)
    assert parse_options(["deeprebirth_approx.batch_rows=64"], pipeline) == {"deeprebirth_approx": {"batch_rows": 64}}
