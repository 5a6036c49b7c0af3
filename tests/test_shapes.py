"""The one shape view (graphopt.core.shapes.ShapeView) and the one TypeProto -> dims (dims_of)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from graphopt.core import onnx_io
from graphopt.core.ir import dims_of
from graphopt.core.shapes import ShapeView
from tests.util import make_model, tensor

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_dims_of_reads_static_named_and_unknown_dims():
    vi = tensor("x", ["batch", 3, None])
    assert dims_of(vi.type) == ("batch", 3, None)
    assert dims_of(onnx.TypeProto()) is None  # not a tensor
    rankless = helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None)
    assert dims_of(rankless) is None


def _chain():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Flatten", ["r"], ["y"], axis=1)]
    return onnx_io.from_proto(make_model(nodes, [tensor("x", ["n", 3, 4])], [tensor("y", ["n", 12])]))


def test_inference_fills_what_the_ir_does_not_carry():
    model = _chain()
    r = next(v for v in model.graph.values() if v.name == "r")
    assert r.shape is None  # the IR has no type for the intermediate
    view = ShapeView(model)
    assert view.shape(r) == ("n", 3, 4)
    assert view.dims(r) == (None, 3, 4) and view.rank(r) == 3
    assert view.concrete(r) == (1, 3, 4)  # a dynamic leading dim reads as batch 1
    assert view.static_shape(r) is None
    assert view.dtype(r) == onnx.TensorProto.FLOAT


def test_a_static_size_wins_over_a_symbol_and_the_irs_rank_over_inference():
    model = _chain()
    x = model.graph.inputs[0]
    view = ShapeView(model)
    assert view.shape(x) == ("n", 3, 4)
    x.type = tensor("x", [2, 3, 4]).type  # the IR now knows the batch
    assert view.shape(x) == (2, 3, 4) and view.static_bytes(x) == 2 * 3 * 4 * 4


def test_lazy_view_infers_on_first_question_and_concrete_refuses_unknown_inner_dims():
    model = onnx_io.from_proto(make_model([helper.make_node("Relu", ["x"], ["y"])],
                                          [tensor("x", [1, "c", 4])], [tensor("y", [1, "c", 4])]))
    view = ShapeView(model, lazy=True)
    assert view._inferred is None
    y = model.graph.outputs[0]
    assert view.shape(y) == (1, "c", 4) and view.concrete(y) is None
    assert view._inferred is not None


def test_symbols_relate_dims_of_a_real_export():
    """The zoo transformer (TorchScript export, dynamic batch computed through Shape/Gather/Concat):
    the symbolic engine knows the batch of the head-split reshape is the input's batch."""
    model = onnx_io.load(MODELS / "transformer.onnx")
    view = ShapeView(model)
    batch = view.symbols(model.graph.inputs[0])[0]
    assert isinstance(batch, str) and batch.startswith("s:")
    logits = model.graph.outputs[0]
    assert view.symbols(logits)[0] == batch
    assert view.dims(logits) == (None, 10)


def test_the_output_comparison_catches_a_difference():
    """tests.util.assert_outputs_close must fail on a model that computes something else."""
    import numpy as np
    import pytest

    from tests.util import assert_outputs_close
    relu = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", [2])])
    neg = make_model([helper.make_node("Neg", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", [2])])
    feeds = {"x": np.array([1.0, -2.0], np.float32)}
    assert_outputs_close(relu, relu, feeds, exact=True)
    with pytest.raises(AssertionError):
        assert_outputs_close(relu, neg, feeds)
    with pytest.raises(AssertionError):
        assert_outputs_close(relu, neg, feeds, of_range=True, atol=0.1)


def test_inference_never_fixes_a_graph_output_dim_the_model_leaves_dynamic():
    from graphopt.core.shapes import infer_shapes
    # Concat of [batch, 4] and [batch, 5] is [batch, 9], but the exporter declared the width open
    proto = make_model([helper.make_node("Concat", ["a", "b"], ["y"], axis=1)],
                       [tensor("a", ["batch", 4]), tensor("b", ["batch", 5])], [tensor("y", ["batch", "width"])])
    model = onnx_io.from_proto(proto)
    infer_shapes(model, reset=True)
    assert model.graph.outputs[0].shape == ("batch", "width")
    fixed = onnx_io.from_proto(make_model([helper.make_node("Concat", ["a", "b"], ["y"], axis=1)],
                                          [tensor("a", ["batch", 4]), tensor("b", ["batch", 5])],
                                          [tensor("y", ["batch", 9])]))
    infer_shapes(fixed, reset=True)
    assert fixed.graph.outputs[0].shape == ("batch", 9)


def test_a_minus_one_dim_is_unknown():
    vi = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [-1, 3, -1, -1])
    assert dims_of(vi.type) == (None, 3, None, None)


def test_minus_one_dims_are_not_sizes_to_inference():
    # onnx reads a -1 height literally: a 2x2 pool would come out 0 high and every cost after it vanish
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Relu", ["p"], ["y"])]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [-1, 3, -1, -1])],
                       [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [-1, 3, -1, -1])])
    model = onnx_io.from_proto(proto)
    pooled = ShapeView(model).shape(model.graph.nodes[0].outputs[0])
    assert pooled is not None and pooled[1] == 3 and not any(d == 0 for d in pooled)
    concrete = ShapeView(model, input_shapes={"x": (1, 3, 8, 6)}).shape(model.graph.nodes[0].outputs[0])
    assert concrete == (1, 3, 4, 3)
