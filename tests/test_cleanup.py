"""Cleanup passes: dead code, Identity/Dropout, constant folding, Constant nodes, duplicate weights, CSE."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
from onnx import helper

from graphopt.core import onnx_io
from graphopt.core.manager import PassContext, get_pass
from tests.util import apply_pass as apply
from tests.util import apply_pass as apply_with
from tests.util import assert_outputs_close, init, make_model, op_types, run, tensor


def same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds) -> None:
    """Cleanup passes only remove and reconnect: outputs are bit-identical."""
    assert_outputs_close(a, b, feeds, exact=True)


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
    assert result.stats["left_alone"] == [{"rule": "my.ops:Log", "reason": "op of an unknown domain (it may have side "
                                           "effects)", "count": 1, "examples": ["Log"]}]
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
    assert result.stats["left_alone"][0]["reason"] == "'y' is a model output and 'x' (a graph input) cannot take its name"


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
    assert not result.changed and result.stats["left_alone"][0]["reason"] == "training mode or mask is read"
    assert result.stats["left_alone"][0]["rule"] == "Dropout"
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


# =============================================================================================
# fold_constants

def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


def inits(model: onnx.ModelProto | onnx.GraphProto) -> dict[str, np.ndarray]:
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    return {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}


def branch(model: onnx.ModelProto, attr: str, node_index: int = 0) -> onnx.GraphProto:
    return next(a.g for a in model.graph.node[node_index].attribute if a.name == attr)


def test_fold_constants_shape_arithmetic_exactly():
    # Cast(int->float) -> Mul(0.5) -> Cast(->int) is what graphsurgeon's own shape folding rewrites into an
    # integer Mul by int(0.5) = 0 (target [8, 0]); the pass must give [8, 3].
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4, 6] x) => (float[8, 3] y) <float[2] half = {2.0, 0.5}> {
            s = Shape(x)
            sf = Cast<to = 1>(s)
            m = Mul(sf, half)
            mi = Cast<to = 7>(m)
            y = Reshape(x, mi)
        }""")
    result, out = apply("fold_constants", proto)
    assert result.changed
    assert result.stats["folded"] == 1 and result.stats["folded_by_op"] == {"Cast": 1}
    assert result.stats["removed_by_op"] == {"Cast": 2, "Mul": 1, "Shape": 1}
    assert result.stats["bytes_added"] == 16 and "left_alone" not in result.stats
    assert op_types(out) == ["Reshape"] and out.graph.output[0].name == "y"
    assert [a.tolist() for a in inits(out).values()] == [[8, 3]]  # "half" went with the Mul
    same_outputs(proto, out, {"x": np.arange(24, dtype=np.float32).reshape(4, 6)})


def test_fold_constants_folds_only_static_dims_of_a_dynamic_shape():
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y, int64[1] n) <int64 one = {1}, int64[1] zero = {0}> {
            s = Shape(x)
            width = Gather(s, one)
            n = Gather(s, zero)
            wf = Cast<to = 1>(width)
            y = Div(x, wf)
        }""")
    result, out = apply("fold_constants", proto)
    assert result.changed and result.stats["folded_by_op"] == {"Cast": 1}
    assert op_types(out) == ["Shape", "Gather", "Div"]  # the batch dim N stays computed
    assert out.graph.output[1].name == "n"
    same_outputs(proto, out, {"x": np.ones((3, 4), np.float32)})


def test_fold_constants_model_output_keeps_its_name():
    proto = make_model([helper.make_node("Add", ["w", "w"], ["twice"]), helper.make_node("Mul", ["x", "twice"], ["y"])],
                       [tensor("x", [2, 4])], [tensor("y", [2, 4]), tensor("twice", [4])],
                       [init("w", np.arange(4, dtype=np.float32))])
    result, out = apply("fold_constants", proto)
    assert result.changed and result.stats["folded"] == 1
    # An initializer cannot take over an interface name: the folded output is a Constant node.
    assert op_types(out) == ["Constant", "Mul"] and [o.name for o in out.graph.output] == ["y", "twice"]
    assert not out.graph.initializer
    same_outputs(proto, out, X)


def test_fold_constants_refuses_random_too_big_and_overridable():
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[64, 64] x, float[64] d) => (float[64, 64] y) <float[64] d = {1.0}, float[64] w = {2.0},
                                                                int64[2] big = {64, 64}> {
            noise = RandomNormal<shape = [64, 64], seed = 1.0>()
            a = Add(x, noise)
            ones = ConstantOfShape<value = float[1] {1.0}>(big)
            b = Add(a, ones)
            dw = Mul(d, w)
            y = Add(b, dw)
        }""".replace("{1.0}, float[64] w = {2.0}", "{" + ",".join(["1.0"] * 64) + "}, float[64] w = {"
                     + ",".join(["2.0"] * 64) + "}"))
    result, out = apply_with("fold_constants", proto, max_bytes=4096)
    assert not result.changed and out == proto
    why = {d["rule"]: d["reason"] for d in result.stats["left_alone"]}
    assert why == {"RandomNormal": "non-deterministic op RandomNormal",
                   "ConstantOfShape": "too big: 16384 bytes > max_bytes 4096",
                   "Mul": "reads graph input 'd', whose default value the caller may override"}
    # Under the default limit the 16 KiB tensor is folded; the other two still are not.
    result, out = apply("fold_constants", proto)
    assert result.stats["folded_by_op"] == {"ConstantOfShape": 1} and "ConstantOfShape" not in op_types(out)


def test_fold_constants_leaves_a_graph_without_constants_unchanged():
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                       [tensor("x", ["N", 4])], [tensor("y", ["N", 3])], [init("w", np.ones((4, 3), np.float32))])
    result, out = apply("fold_constants", proto)
    assert not result.changed and out == proto


def test_fold_constants_inside_if_and_loop_bodies():
    # graphsurgeon exports subgraphs with onnx's newest IR version, which onnxruntime refuses; the pass keeps
    # the model's, so both bodies fold. The RandomNormal in the else branch must stay.
    then_g = helper.make_graph([helper.make_node("Add", ["w", "w"], ["w2"]), helper.make_node("Mul", ["x", "w2"], ["t"])],
                               "then", [], [tensor("t", [2, 4])])
    else_g = helper.make_graph([helper.make_node("RandomNormal", [], ["noise"], shape=[2, 4], seed=3.0),
                                helper.make_node("Add", ["x", "noise"], ["e"])], "else", [], [tensor("e", [2, 4])])
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value_float=1.5), helper.make_node("Mul", ["k", "k"], ["k2"]),
         helper.make_node("Mul", ["acc_in", "k2"], ["acc_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [tensor("i", [], onnx.TensorProto.INT64), tensor("cond_in", [], onnx.TensorProto.BOOL),
                 tensor("acc_in", [2, 4])], [tensor("cond_out", [], onnx.TensorProto.BOOL), tensor("acc_out", [2, 4])])
    proto = make_model([helper.make_node("If", ["c"], ["f"], then_branch=then_g, else_branch=else_g),
                        helper.make_node("Loop", ["n", "", "f"], ["y"], body=body)],
                       [tensor("x", [2, 4]), tensor("c", [], onnx.TensorProto.BOOL)], [tensor("y", [2, 4])],
                       [init("n", np.array(3, np.int64)), init("w", np.full(4, 0.5, np.float32))])
    result, out = apply("fold_constants", proto)
    assert result.changed and result.stats["folded_by_op"] == {"Add": 1, "Mul": 1}
    assert result.stats["left_alone"] == [{"rule": "RandomNormal", "reason": "non-deterministic op RandomNormal",
                                           "count": 1, "examples": ["noise"]}]
    assert "graphsurgeon_warnings" not in result.stats
    then_out = branch(out, "then_branch")
    assert [n.op_type for n in then_out.node] == ["Mul"]
    assert [a.tolist() for a in inits(then_out).values()] == [[1.0] * 4]
    assert [n.op_type for n in branch(out, "else_branch").node] == ["RandomNormal", "Add"]
    body_out = branch(out, "body", 1)
    assert [n.op_type for n in body_out.node] == ["Mul", "Identity"]
    assert [(a.dtype, a.tolist()) for a in inits(body_out).values()] == [(np.float32, 2.25)]
    assert "w" not in inits(out)  # its only reader was folded
    same_outputs(proto, out, {**X, "c": np.array(True)})


# =============================================================================================
# constant_to_initializer


def test_constant_to_initializer_every_attribute_form():
    sparse = helper.make_sparse_tensor(onnx.numpy_helper.from_array(np.array([5.0, 7.0], np.float32), "sv"),
                                       onnx.numpy_helper.from_array(np.array([1, 6], np.int64), "si"), [2, 4])
    consts = [helper.make_node("Constant", [], ["c_value"], value=init("t", np.full((2, 4), 3.0, np.float32))),
              helper.make_node("Constant", [], ["c_float"], value_float=2.0),
              helper.make_node("Constant", [], ["c_floats"], value_floats=[1.0, 2.0, 3.0, 4.0]),
              helper.make_node("Constant", [], ["c_int"], value_int=3),
              helper.make_node("Constant", [], ["c_ints"], value_ints=[4, 2]),
              helper.make_node("Constant", [], ["c_string"], value_string=b"hello"),
              helper.make_node("Constant", [], ["c_strings"], value_strings=[b"a", b"bc"]),
              helper.make_node("Constant", [], ["c_sparse"], sparse_value=sparse)]
    nodes = consts + [
        helper.make_node("Mul", ["x", "c_value"], ["m1"]), helper.make_node("Add", ["m1", "c_float"], ["m2"]),
        helper.make_node("Sub", ["m2", "c_floats"], ["m3"]), helper.make_node("Add", ["m3", "c_sparse"], ["m4"]),
        helper.make_node("Reshape", ["m4", "c_ints"], ["y"]), helper.make_node("Add", ["c_int", "c_int"], ["n"]),
        helper.make_node("Identity", ["c_string"], ["s"]), helper.make_node("Identity", ["c_strings"], ["ss"])]
    proto = make_model(nodes, [tensor("x", [2, 4])],
                       [tensor("y", [4, 2]), tensor("n", [], onnx.TensorProto.INT64),
                        tensor("s", [], onnx.TensorProto.STRING), tensor("ss", [2], onnx.TensorProto.STRING)])
    result, out = apply("constant_to_initializer", proto)
    assert result.changed and result.stats["converted"] == 8
    assert result.stats["by_form"] == {k: 1 for k in ("sparse_value", "value", "value_float", "value_floats",
                                                      "value_int", "value_ints", "value_string", "value_strings")}
    assert "Constant" not in op_types(out) and len(out.graph.initializer) == 8
    assert inits(out)["c_sparse_1"].reshape(-1).tolist() == [0, 5, 0, 0, 0, 0, 7, 0]
    for a, b in zip(run(proto, X), run(out, X)):
        np.testing.assert_array_equal(a, b)


def test_constant_to_initializer_in_subgraphs_and_model_output_stays():
    then_g = helper.make_graph([helper.make_node("Constant", [], ["k"], value_float=2.0),
                                helper.make_node("Mul", ["x", "k"], ["t"])], "then", [], [tensor("t", [2, 4])])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["e"], value=init("e", np.zeros((2, 4), np.float32)))],
                               "else", [], [tensor("e", [2, 4])])
    proto = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
                        helper.make_node("Constant", [], ["z"], value_ints=[1, 2])],
                       [tensor("x", [2, 4]), tensor("c", [], onnx.TensorProto.BOOL)],
                       [tensor("y", [2, 4]), tensor("z", [2], onnx.TensorProto.INT64)])
    result, out = apply("constant_to_initializer", proto)
    assert result.changed and result.stats["converted"] == 2
    assert result.stats["left_alone"] == [{"reason": "model output: an initializer cannot take over its name",
                                           "count": 1, "examples": ["z"]}]
    assert op_types(out) == ["If", "Constant"] and not out.graph.initializer
    then_out, else_out = branch(out, "then_branch"), branch(out, "else_branch")
    assert [n.op_type for n in then_out.node] == ["Mul"] and list(inits(then_out)) == ["k_1"]
    assert not else_out.node and else_out.output[0].name == list(inits(else_out))[0]  # a subgraph output may be one
    for cond in (True, False):
        same_outputs(proto, out, {**X, "c": np.array(cond)})


def test_constant_to_initializer_leaves_a_constant_output_alone():
    proto = make_model([helper.make_node("Constant", [], ["y"], value_float=1.0)], [], [tensor("y", [])])
    result, out = apply("constant_to_initializer", proto)
    assert not result.changed and out == proto


# =============================================================================================
# dedupe_initializers


def test_dedupe_initializers_merges_identical_bytes_only():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    proto = make_model(
        [helper.make_node("Add", ["x", "a"], ["s1"]), helper.make_node("Add", ["s1", "b"], ["s2"]),
         helper.make_node("Add", ["s2", "pos_zero"], ["s3"]), helper.make_node("Add", ["s3", "neg_zero"], ["s4"]),
         helper.make_node("Reshape", ["flat", "shape"], ["r"]), helper.make_node("Add", ["s4", "r"], ["y"]),
         helper.make_node("Cast", ["as_double"], ["d"], to=onnx.TensorProto.FLOAT),
         helper.make_node("Add", ["y", "d"], ["out"])],
        [tensor("x", [2, 3])], [tensor("out", [2, 3]), tensor("a", [2, 3])],
        [init("a", w), init("b", w.copy()), init("pos_zero", np.zeros(3, np.float32)),
         init("neg_zero", -np.zeros(3, np.float32)), init("flat", w.reshape(-1)), init("shape", np.array([2, 3])),
         init("as_double", w.astype(np.float64))])
    result, out = apply("dedupe_initializers", proto)
    assert result.changed and result.stats == {"merged": 1, "bytes_saved": 24}
    assert list(out.graph.node[1].input) == ["s1", "a"]  # "a" survives: it is also a model output
    assert sorted(inits(out)) == ["a", "as_double", "flat", "neg_zero", "pos_zero", "shape"]
    same_outputs(proto, out, {"x": np.ones((2, 3), np.float32)})


def test_dedupe_initializers_within_subgraph_scope_and_never_input_defaults():
    then_g = helper.make_graph([helper.make_node("Add", ["x", "p"], ["t0"]), helper.make_node("Add", ["t0", "q"], ["t"])],
                               "then", [], [tensor("t", [2])],
                               [init("p", np.ones(2, np.float32)), init("q", np.ones(2, np.float32))])
    else_g = helper.make_graph([helper.make_node("Add", ["x", "r"], ["e"])], "else", [], [tensor("e", [2])],
                               [init("r", np.ones(2, np.float32))])
    proto = make_model([helper.make_node("Add", ["x", "d"], ["xd"]),
                        helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
                        helper.make_node("Add", ["xd", "o"], ["z"])],
                       [tensor("x", [2]), tensor("c", [], onnx.TensorProto.BOOL), tensor("d", [2])],
                       [tensor("y", [2]), tensor("z", [2])],
                       [init("d", np.ones(2, np.float32)), init("o", np.ones(2, np.float32))])
    result, out = apply("dedupe_initializers", proto)
    assert result.changed and result.stats["merged"] == 1  # q -> p in the then branch only
    then_out = branch(out, "then_branch", 1)
    assert list(inits(then_out)) == ["p"] and list(then_out.node[1].input) == ["t0", "p"]
    assert sorted(inits(out)) == ["d", "o"] and sorted(inits(branch(out, "else_branch", 1))) == ["r"]
    for cond in (True, False):
        same_outputs(proto, out, {"x": np.ones(2, np.float32), "c": np.array(cond), "d": np.full(2, 5, np.float32)})


def test_dedupe_initializers_leaves_distinct_weights_unchanged():
    proto = make_model([helper.make_node("Add", ["x", "a"], ["s"]), helper.make_node("Add", ["s", "d"], ["y"])],
                       [tensor("x", [2]), tensor("d", [2])], [tensor("y", [2])],
                       [init("a", np.ones(2, np.float32)), init("d", np.ones(2, np.float32))])
    result, out = apply("dedupe_initializers", proto)  # "d" equals "a" but is an overridable input default
    assert not result.changed and out == proto


# =============================================================================================
# cse


def test_cse_merges_chains_commuted_operands_and_keeps_output_names():
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x, float[2, 4] z) => (float[2, 4] y, float[2, 4] r2) {
            r1 = Relu(x)
            e1 = Exp(r1)
            s1 = Add(e1, z)
            r2 = Relu(x)
            e2 = Exp(r2)
            s2 = Add(z, e2)
            sm1 = Softmax<axis = 1>(s1)
            sm2 = Softmax<axis = 1>(s2)
            sm3 = Softmax<axis = 0>(s2)
            t = Add(sm1, sm2)
            y = Add(t, sm3)
        }""")
    result, out = apply("cse", proto)
    assert result.changed
    assert result.stats["merged_by_op"] == {"Add": 1, "Exp": 1, "Relu": 1, "Softmax": 1}
    assert op_types(out) == ["Relu", "Exp", "Add", "Softmax", "Softmax", "Add", "Add"]  # axis 0 differs
    assert out.graph.node[0].output[0] == "r2" and [o.name for o in out.graph.output] == ["y", "r2"]
    same_outputs(proto, out, {"x": X["x"], "z": np.ones((2, 4), np.float32)})


def test_cse_inside_a_loop_body():
    body = helper.make_graph(
        [helper.make_node("Sqrt", ["acc_in"], ["a"]), helper.make_node("Sqrt", ["acc_in"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["acc_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [tensor("i", [], onnx.TensorProto.INT64), tensor("cond_in", [], onnx.TensorProto.BOOL),
                 tensor("acc_in", [2, 4])], [tensor("cond_out", [], onnx.TensorProto.BOOL), tensor("acc_out", [2, 4])])
    proto = make_model([helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)], [tensor("x", [2, 4])],
                       [tensor("y", [2, 4])], [init("n", np.array(2, np.int64))])
    result, out = apply("cse", proto)
    assert result.changed and result.stats["merged_by_op"] == {"Sqrt": 1}
    body_out = branch(out, "body")
    assert [n.op_type for n in body_out.node] == ["Sqrt", "Add", "Identity"]
    assert list(body_out.node[1].input) == ["a", "a"]
    same_outputs(proto, out, {"x": np.abs(X["x"])})


def test_cse_never_merges_random_ops_or_two_outputs():
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y, float[2, 4] e1, float[2, 4] e2) <bool train = {1}, float ratio = {0.5}> {
            n1 = RandomNormalLike(x)
            n2 = RandomNormalLike(x)
            d1 = Dropout(x, ratio, train)
            d2 = Dropout(x, ratio, train)
            a = Add(n1, n2)
            b = Add(d1, d2)
            y = Add(a, b)
            e1 = Exp(x)
            e2 = Exp(x)
        }""")
    result, out = apply("cse", proto)
    assert not result.changed and out == proto
    assert result.stats["left_alone"] == [{"reason": "both outputs are graph outputs", "count": 1,
                                           "examples": ["Exp (same as Exp)"]}]


# =============================================================================================
# robustness shared by the passes


def test_fold_constants_retries_with_partitions_when_one_node_cannot_be_evaluated():
    # The then branch is never taken at run time, but its constant Gather reads out of bounds: evaluating it
    # fails in onnxruntime, which would block the whole branch; the retry isolates it and folds the rest.
    then_g = helper.make_graph([helper.make_node("Gather", ["w", "bad"], ["g"]), helper.make_node("Add", ["w", "w"], ["w2"]),
                                helper.make_node("Mul", ["x", "w2"], ["t0"]), helper.make_node("Add", ["t0", "g"], ["t"])],
                               "then", [], [tensor("t", [4])], [init("bad", np.array([7], np.int64))])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [tensor("e", [4])])
    proto = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                       [tensor("x", [4]), tensor("c", [], onnx.TensorProto.BOOL)], [tensor("y", [4])],
                       [init("w", np.arange(4, dtype=np.float32))])
    result, out = apply("fold_constants", proto)
    assert result.changed and result.stats["folded_by_op"] == {"Add": 1} and result.stats["partitioned_retry"]
    assert any("Inference failed" in w for w in result.stats["graphsurgeon_warnings"])
    assert [n.op_type for n in branch(out, "then_branch").node] == ["Gather", "Mul", "Add"]
    same_outputs(proto, out, {"x": np.ones(4, np.float32), "c": np.array(False)})


def test_fold_constants_drops_a_result_found_too_big_only_after_evaluation():
    # NonZero's output size depends on the data: no static shape, so the size is known only once evaluated.
    proto = make_model([helper.make_node("NonZero", ["w"], ["nz"]), helper.make_node("ReduceSum", ["nz"], ["s"], keepdims=0),
                        helper.make_node("Cast", ["s"], ["sf"], to=onnx.TensorProto.FLOAT),
                        helper.make_node("Add", ["x", "sf"], ["y"])],
                       [tensor("x", [2, 4])], [tensor("y", [2, 4])], [init("w", np.ones(2000, np.float32))])
    result, out = apply_with("fold_constants", proto, max_bytes=1024)
    assert result.changed and result.stats["folded_by_op"] == {"Cast": 1}  # only the frontier value is stored
    result, out = apply_with("fold_constants", make_model(
        [helper.make_node("NonZero", ["w"], ["nz"]), helper.make_node("Cast", ["nz"], ["y"], to=onnx.TensorProto.FLOAT)],
        [], [tensor("y", [1, None])], [init("w", np.ones(2000, np.float32))]), max_bytes=1024)
    assert not result.changed  # the Cast stays, so it needs its input, which is too big as well
    assert result.stats["left_alone"] == [
        {"rule": "Cast", "reason": "too big: 8000 bytes > max_bytes 1024", "count": 1, "examples": ["y"]},
        {"rule": "NonZero", "reason": "too big: 16000 bytes > max_bytes 1024", "count": 1, "examples": ["nz"]}]


def test_identity_keeps_two_outputs_of_a_subgraph_apart():
    # Two outputs of one subgraph must stay two values: the checker accepts a repeated output name, but
    # onnxruntime then computes wrong results (measured: the first output came back as zeros).
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["b"])],
                               "then", [], [tensor("a", [2, 4]), tensor("b", [2, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["c"]), helper.make_node("Abs", ["x"], ["d"])], "else", [],
                               [tensor("c", [2, 4]), tensor("d", [2, 4])])
    proto = make_model([helper.make_node("If", ["cond"], ["y", "z"], then_branch=then_g, else_branch=else_g)],
                       [tensor("x", [2, 4]), tensor("cond", [], onnx.TensorProto.BOOL)], [tensor("y", [2, 4]), tensor("z", [2, 4])])
    result, out = apply("identity", proto)
    assert not result.changed and out == proto
    assert result.stats["left_alone"][0]["reason"] == "'b' and 'a' are both outputs of graph 'then'"


def function_model() -> onnx.ModelProto:
    """A local function whose Constant reads the function's attribute (``ref_attr_name``)."""
    fn = helper.make_function("my", "Scale", ["x"], ["y"],
                              [helper.make_node("Constant", [], ["k"]), helper.make_node("Mul", ["x", "k"], ["m"]),
                               helper.make_node("Mul", ["x", "k"], ["m2"]), helper.make_node("Add", ["m", "m2"], ["y"])],
                              [helper.make_opsetid("", 17)], attributes=["alpha"])
    fn.node[0].attribute.append(onnx.AttributeProto(name="value", ref_attr_name="alpha", type=onnx.AttributeProto.TENSOR))
    graph = helper.make_graph([helper.make_node("Scale", ["x"], ["y"], domain="my",
                                                alpha=helper.make_tensor("a", onnx.TensorProto.FLOAT, [], [1.0]))],
                              "g", [tensor("x", [2, 4])], [tensor("y", [2, 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my", 1)],
                              functions=[fn], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_passes_take_a_function_constant_reading_an_attribute_as_unknown():
    proto = function_model()
    result, out = apply("cse", proto)  # the two Mul(x, k) in the body are one
    assert result.changed and [n.op_type for n in out.functions[0].node] == ["Constant", "Mul", "Add"]
    same_outputs(proto, out, X)
    for name in ("constant_to_initializer", "fold_constants", "dedupe_initializers"):
        result, again = apply(name, proto)
        assert not result.changed and again == proto, name
    assert result.stats.get("left_alone") is None


def test_whole_cleanup_is_deterministic():
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) <float[4] a = {1.0, 2.0, 3.0, 4.0}, float[4] b = {1.0, 2.0, 3.0, 4.0}> {
            k = Constant<value_float = 2.0>()
            ab = Add(a, b)
            abk = Mul(ab, k)
            s = Shape(x)
            w = Gather<axis = 0>(s, one)
            one = Constant<value_int = 1>()
            wf = Cast<to = 1>(w)
            p = Mul(x, abk)
            q = Mul(x, abk)
            r = Add(p, q)
            y = Div(r, wf)
        }""".replace("""            w = Gather<axis = 0>(s, one)
            one = Constant<value_int = 1>()""", """            one = Constant<value_int = 1>()
            w = Gather<axis = 0>(s, one)"""))
    outputs = []
    for _ in range(2):
        model = onnx_io.from_proto(proto)
        for name in ("constant_to_initializer", "fold_constants", "dedupe_initializers", "cse", "dead_code"):
            get_pass(name).run(model, PassContext())
        outputs.append(onnx_io.to_proto(model).SerializeToString())
    assert outputs[0] == outputs[1]
    out = onnx.load_from_string(outputs[0])
    assert op_types(out) == ["Mul", "Add", "Div"]
    same_outputs(proto, out, {"x": np.ones((3, 4), np.float32)})
