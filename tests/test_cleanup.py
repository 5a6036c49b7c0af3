"""Cleanup passes: dead code and Identity/Dropout elimination."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphopt import onnx_io
from graphopt.manager import PassContext, get_pass
from tests.util import init, make_model, op_types, run, tensor


def apply(pass_name: str, proto: onnx.ModelProto):
    model = onnx_io.from_proto(proto)
    result = get_pass(pass_name).run(model, PassContext())
    model.check_invariants()
    out = onnx_io.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return result, out


def same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds) -> None:
    for x, y in zip(run(a, feeds), run(b, feeds)):
        np.testing.assert_array_equal(x, y)


X = {"x": np.arange(8, dtype=np.float32).reshape(2, 4) - 3}


def test_dead_code_removes_unused_nodes_and_initializers():
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["x", "w"], ["dead"]),
         helper.make_node("Exp", ["dead"], ["dead2"])],
        [tensor("x", [2, 4]), tensor("unused_input", [1])], [tensor("r", [2, 4])],
        [init("w", np.ones(4, np.float32)), init("orphan", np.zeros(3, np.float32))])
    result, out = apply("dead_code", proto)
    assert result.changed
    assert result.stats["removed_by_op"] == {"Exp": 1, "Mul": 1} and result.stats["removed_initializers"] == 2
    assert op_types(out) == ["Relu"] and not out.graph.initializer
    assert [i.name for i in out.graph.input] == ["x", "unused_input"]  # the interface stays
    same_outputs(proto, out, {**X, "unused_input": np.zeros(1, np.float32)})


def test_dead_code_keeps_unknown_domain_ops_and_says_why():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]),
                               helper.make_node("Log", ["x"], ["l"], domain="my.ops")],
                              "g", [tensor("x", [2, 4])], [tensor("r", [2, 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)],
                              ir_version=8)
    model = onnx_io.from_proto(proto)
    result = get_pass("dead_code").run(model, PassContext())
    assert not result.changed
    assert result.stats["kept_unknown_domain"] == ["my.ops:Log ''"]
    assert [n.op_type for n in model.graph.toposort()] == ["Relu", "Log"]


def test_dead_code_leaves_a_fully_live_graph_unchanged():
    proto = make_model([helper.make_node("Relu", ["x"], ["r"])], [tensor("x", [2, 4])], [tensor("r", [2, 4])])
    result, out = apply("dead_code", proto)
    assert not result.changed and out == proto


def test_dead_code_inside_an_if_branch():
    then_g = helper.make_graph([helper.make_node("Neg", ["x"], ["unused"]), helper.make_node("Abs", ["x"], ["t"])],
                               "then", [], [tensor("t", [2, 4])])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "else", [], [tensor("e", [2, 4])])
    proto = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                       [tensor("x", [2, 4]), tensor("c", [], onnx.TensorProto.BOOL)], [tensor("y", [2, 4])])
    result, out = apply("dead_code", proto)
    assert result.changed and result.stats["removed_by_op"] == {"Neg": 1}
    then_out = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_out.node] == ["Abs"]
    for cond in (True, False):
        same_outputs(proto, out, {**X, "c": np.array(cond)})


def test_identity_chain_removed_and_output_name_kept():
    proto = make_model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["b"]),
                        helper.make_node("Dropout", ["b"], ["c"]), helper.make_node("Identity", ["c"], ["y"])],
                       [tensor("x", [2, 4])], [tensor("y", [2, 4])])
    result, out = apply("identity", proto)
    assert result.changed and result.stats["removed"] == {"Dropout": 1, "Identity": 2}
    assert op_types(out) == ["Relu"]
    assert out.graph.node[0].output[0] == "y" and out.graph.output[0].name == "y"
    same_outputs(proto, out, X)


def test_identity_from_input_to_output_is_left_alone():
    proto = make_model([helper.make_node("Identity", ["x"], ["y"])], [tensor("x", [2, 4])], [tensor("y", [2, 4])])
    result, out = apply("identity", proto)
    assert not result.changed and out == proto
    assert "cannot take its name" in result.stats["left_alone"][0]["why"]


def test_dropout_with_read_mask_or_training_mode_stays():
    mask_read = make_model([helper.make_node("Dropout", ["x"], ["y", "mask"])], [tensor("x", [2, 4])],
                           [tensor("y", [2, 4]), tensor("mask", [2, 4], onnx.TensorProto.BOOL)])
    result, out = apply("identity", mask_read)
    assert not result.changed and out == mask_read
    training = make_model([helper.make_node("Dropout", ["x", "ratio", "train"], ["d"]),
                           helper.make_node("Relu", ["d"], ["y"])],
                          [tensor("x", [2, 4])], [tensor("y", [2, 4])],
                          [init("ratio", np.array(0.5, np.float32)), init("train", np.array(True))])
    result, _ = apply("identity", training)
    assert not result.changed and result.stats["left_alone"][0]["why"] == "training mode or mask is read"
    inference = make_model([helper.make_node("Dropout", ["x", "ratio", "train"], ["d"]),
                            helper.make_node("Relu", ["d"], ["y"])],
                           [tensor("x", [2, 4])], [tensor("y", [2, 4])],
                           [init("ratio", np.array(0.5, np.float32)), init("train", np.array(False))])
    result, out = apply("identity", inference)
    assert result.changed and op_types(out) == ["Relu"]
    same_outputs(inference, out, X)


def test_identity_in_loop_body_reading_outer_value():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["w"], ["w_copy"]),
         helper.make_node("Add", ["acc_in", "w_copy"], ["acc_out"])],
        "body", [tensor("i", [], onnx.TensorProto.INT64), tensor("cond_in", [], onnx.TensorProto.BOOL),
                 tensor("acc_in", [2, 4])],
        [tensor("cond_out", [], onnx.TensorProto.BOOL), tensor("acc_out", [2, 4])])
    proto = make_model([helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
                       [tensor("x", [2, 4])], [tensor("y", [2, 4])],
                       [init("n", np.array(3, np.int64)), init("w", np.full((2, 4), 0.5, np.float32))])
    result, out = apply("identity", proto)
    assert result.changed and result.stats["removed"] == {"Identity": 2}
    body_out = out.graph.node[0].attribute[0].g
    assert [n.op_type for n in body_out.node] == ["Add"] and list(body_out.node[0].input) == ["acc_in", "w"]
    assert body_out.output[0].name == "cond_in"
    same_outputs(proto, out, X)
