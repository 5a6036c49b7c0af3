"""Tests for graphopt.measure.analysis: parameters, MACs and bytes, checked against hand-computed values."""

from __future__ import annotations

import doctest
import json

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt.measure.analysis
from graphopt.core.errors import GraphoptError, OptionError
from graphopt.core.ir import Model
from graphopt.core.onnx_io import from_proto
from graphopt.measure.analysis import LAYER_COLUMNS, analyze, layer_rows, summarize_ops

IR_VERSION = 8  # onnx 1.23 stamps 14 by default, which onnxruntime rejects


def build(text: str, opset: int = 17, **weights: np.ndarray) -> Model:
    """A model from ONNX text (graph only) plus initializers given as arrays.

    A main-graph output written ``float y`` gets an unknown shape (the text format has no way to say
    so), so every shape the analysis sees comes from inference.
    """
    proto = onnx.parser.parse_model(f'<ir_version: {IR_VERSION}, opset_import: ["" : {opset}]>\n{text}')
    proto.graph.initializer.extend(numpy_helper.from_array(np.asarray(a), name) for name, a in weights.items())
    onnx.checker.check_model(proto)
    for out in proto.graph.output:  # after the checker, which insists on a shape
        if not out.type.tensor_type.shape.dim:
            out.type.tensor_type.ClearField("shape")
    return from_proto(proto)


def zeros(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.float32)


def node(cost, op_type: str, index: int = 0):
    return [n for n in cost.per_node if n.op_type == op_type][index]


# ------------------------------------------------------------------------------------------------
# Conv family: MACs = N·Cout·H_out·W_out·(Cin/groups)·kh·kw


@pytest.mark.parametrize("x, w, attrs, macs", [
    # grouped: out 10x10 (pad 1), 16 filters over 8/2 = 4 input channels
    ((1, 8, 10, 10), (16, 4, 3, 3), "group = 2, pads = [1, 1, 1, 1]", 16 * 10 * 10 * 4 * 9),
    # depthwise: 8 groups of one channel, out 8x8 (no pad)
    ((1, 8, 10, 10), (8, 1, 3, 3), "group = 8", 8 * 8 * 8 * 1 * 9),
    # strided: out 16x16 from 32x32 with stride 2, pad 1
    ((1, 3, 32, 32), (16, 3, 3, 3), "strides = [2, 2], pads = [1, 1, 1, 1]", 16 * 16 * 16 * 3 * 9),
    # dilated: effective kernel 5, out 6x6
    ((1, 2, 10, 10), (4, 2, 3, 3), "dilations = [2, 2]", 4 * 6 * 6 * 2 * 9),
    # asymmetric pads [top, left, bottom, right] = [0, 1, 2, 3]: out 5 x 7
    ((1, 1, 5, 5), (1, 1, 3, 3), "pads = [0, 1, 2, 3]", 1 * 5 * 7 * 1 * 9),
    # batch 2 doubles everything
    ((2, 3, 8, 8), (4, 3, 1, 1), "", 2 * 4 * 8 * 8 * 3),
])
def test_conv_macs_and_params(x, w, attrs, macs):
    model = build(f"""g (float{list(x)} x) => (float[?, ?, ?, ?] y) {{
        y = Conv <{attrs or 'group = 1'}> (x, w, b)
    }}""", w=zeros(*w), b=zeros(w[0]))
    cost = analyze(model)
    conv = node(cost, "Conv")
    assert conv.macs == macs
    assert conv.params == np.prod(w) + w[0]  # weight + bias
    assert conv.param_bytes == 4 * conv.params
    assert cost.macs == macs and cost.params == conv.params


@pytest.mark.parametrize("x, w, attrs, macs", [
    # MACs = N·Cin·H_in·W_in·(Cout/groups)·kh·kw
    ((1, 4, 5, 5), (4, 3, 3, 3), "strides = [2, 2]", 4 * 25 * 3 * 9),
    ((1, 4, 5, 5), (4, 2, 3, 3), "group = 2", 4 * 25 * 2 * 9),
])
def test_conv_transpose_macs(x, w, attrs, macs):
    model = build(f"""g (float{list(x)} x) => (float[?, ?, ?, ?] y) {{
        y = ConvTranspose <{attrs}> (x, w)
    }}""", w=zeros(*w))
    cost = analyze(model)
    assert node(cost, "ConvTranspose").macs == macs
    assert cost.params == np.prod(w)


# ------------------------------------------------------------------------------------------------
# Gemm and MatMul


@pytest.mark.parametrize("a, b, attrs", [
    ((2, 5), (5, 3), "transB = 0"),
    ((2, 5), (3, 5), "transB = 1"),
    ((5, 2), (5, 3), "transA = 1"),
    ((5, 2), (3, 5), "transA = 1, transB = 1"),
])
def test_gemm_macs_are_m_n_k(a, b, attrs):
    model = build(f"""g (float{list(a)} a) => (float[2, 3] y) {{
        y = Gemm <{attrs}> (a, w, c)
    }}""", w=zeros(*b), c=zeros(3))
    cost = analyze(model)
    assert cost.macs == 2 * 3 * 5  # the bias add is not a MAC
    assert cost.params == 15 + 3


@pytest.mark.parametrize("a, b, macs", [
    ((2, 3, 4, 5), (2, 3, 5, 6), 2 * 3 * 4 * 5 * 6),  # batched
    ((2, 1, 4, 5), (3, 5, 6), 2 * 3 * 4 * 5 * 6),  # broadcast batch dims (2, 1) x (3,) -> (2, 3)
    ((4, 5), (7, 5, 6), 7 * 4 * 5 * 6),  # 2-D left operand broadcast over the right's batch
    ((5,), (5, 6), 5 * 6),  # 1-D left: a row vector
    ((2, 4, 5), (5,), 2 * 4 * 5),  # 1-D right: a column vector
    ((5,), (5,), 5),  # dot product
])
def test_matmul_macs(a, b, macs):
    model = build(f"""g (float{list(a)} a, float{list(b)} b) => (float y) {{
        y = MatMul (a, b)
    }}""")
    assert analyze(model).macs == macs


def test_einsum_macs():
    model = build("""g (float[2, 3, 4] a, float[2, 4, 5] b, float[6, 2, 3, 4] c)
                     => (float y, float z, float t, float s) {
        y = Einsum <equation = "bij,bjk->bik"> (a, b)
        z = Einsum <equation = "...ij,...jk->...ik"> (c, b)
        t = Einsum <equation = "bij->bji"> (a)
        s = Einsum <equation = "bij->b"> (a)
    }""")
    cost = analyze(model)
    assert [n.macs for n in cost.per_node] == [2 * 3 * 4 * 5, 6 * 2 * 3 * 4 * 5, 0, 2 * 3 * 4]


# ------------------------------------------------------------------------------------------------
# other rules


def test_lstm_counts_the_matrix_products():
    # seq 5, batch 2, input 3, hidden 4, bidirectional: per step and direction 4 gates·4·(3 + 4)
    model = build("""g (float[5, 2, 3] x) => (float y) {
        y = LSTM <hidden_size = 4, direction = "bidirectional"> (x, w, r)
    }""", w=zeros(2, 16, 3), r=zeros(2, 16, 4))
    assert analyze(model).macs == 5 * 2 * 2 * 4 * 4 * (3 + 4)


def test_pooling_normalization_softmax_and_elementwise():
    model = build("""g (float[1, 3, 8, 8] x) => (float a, float b, float c, float d, float e, float f) {
        a = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (x)
        b = GlobalAveragePool (x)
        c = BatchNormalization (x, s, s, s, s)
        d = Softmax <axis = 1> (x)
        e = Relu (x)
        f = LayerNormalization <axis = -1> (x, ls, ls)
    }""", s=zeros(3), ls=zeros(8))
    by_op = {n.op_type: n.macs for n in analyze(model).per_node}
    elements = 3 * 8 * 8
    assert by_op == {"MaxPool": 3 * 4 * 4 * 4, "GlobalAveragePool": elements, "BatchNormalization": elements,
                     "Softmax": 3 * elements, "Relu": elements, "LayerNormalization": 3 * elements}


def test_shape_ops_are_free():
    model = build("""g (float[2, 3, 4] x) => (float y) {
        s = Shape (x)
        t = Transpose <perm = [0, 2, 1]> (x)
        y = Reshape (t, shape)
    }""", shape=np.array([2, 12], np.int64))
    cost = analyze(model)
    assert cost.macs == 0
    assert cost.params == 2 and cost.param_bytes == 16  # non-float constants are weights too


# ------------------------------------------------------------------------------------------------
# weights


def test_shared_weight_is_counted_once_at_its_first_consumer():
    model = build("""g (float[1, 4] x) => (float y) {
        h = MatMul (x, w)
        y = MatMul (h, w)
    }""", w=zeros(4, 4))
    cost = analyze(model)
    assert [n.params for n in cost.per_node] == [16, 0]
    assert cost.params == 16 and cost.param_bytes == 64


def test_constant_node_weights_are_counted():
    model = build("""g (float[1, 4] x) => (float y, float k) {
        w = Constant <value = float[4, 2] {1, 2, 3, 4, 5, 6, 7, 8}> ()
        y = MatMul (x, w)
        k = Constant <value_floats = [1.0, 2.0, 3.0]> ()
    }""")
    cost = analyze(model)
    assert [n.params for n in cost.per_node] == [0, 8, 3]  # an unread Constant keeps its own tensor
    assert cost.params == 11 and cost.param_bytes == 44


def test_unused_and_int8_initializers_count_in_the_totals():
    model = build("""g (float[1, 4] x) => (float y) {
        y = MatMul (x, w)
    }""", w=zeros(4, 4), orphan=np.zeros(10, np.int8))
    cost = analyze(model)
    assert cost.unused_initializers == ["orphan"]
    assert cost.params == 16 + 10 and cost.param_bytes == 64 + 10


def test_initializer_listed_as_input_is_a_weight():
    # IR < 4 models list every weight among the graph inputs; they are still stored weights.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x, w],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(zeros(4, 3), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    cost = analyze(from_proto(proto), batch=5)
    assert cost.params == 12 and cost.macs == 5 * 4 * 3
    assert [i.name for i in cost.inputs] == ["x"]


def test_weight_captured_by_a_subgraph_goes_to_the_node_reading_it():
    model = build("""g (float[1, 4] x, bool c) => (float y) {
        w = Constant <value = float[4, 4] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}> ()
        y = If (c) <then_branch = t () => (float[1, 4] o) { o = MatMul (x, w) },
                    else_branch = e () => (float[1, 4] o2) { o2 = Identity (x) }>
    }""")
    cost = analyze(model)
    assert node(cost, "MatMul").params == 16
    assert node(cost, "MatMul").scope.endswith("then_branch")
    assert cost.params == 16


# ------------------------------------------------------------------------------------------------
# dynamic dims and unknowns


def test_dynamic_batch_uses_batch_argument():
    model = build("""g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
        y = Conv (x, w)
    }""", w=zeros(4, 3, 1, 1))
    one, four = analyze(model).macs, analyze(model, batch=4).macs
    assert one == 4 * 64 * 3 and four == 4 * one
    assert analyze(model).outputs[0].shape == ("N", 4, 8, 8)  # the declared interface, not batch 1


def test_anonymous_dynamic_batch_dim():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                              [numpy_helper.from_array(zeros(4, 3), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    assert analyze(from_proto(proto), batch=2).macs == 2 * 4 * 3


def test_unknown_macs_are_none_never_zero():
    model = build("""g (float[N, S, 16] x) => (float y) {
        h = MatMul (x, w)
        s = Shape (h)
        y = Relu (h)
    }""", w=zeros(16, 8))
    cost = analyze(model)
    assert node(cost, "MatMul").macs is None and "dynamic" in node(cost, "MatMul").note
    assert node(cost, "Shape").macs == 0  # free whatever the shape
    assert cost.macs is None
    assert len(cost.unknown_macs_nodes) == 2 and cost.macs_known == 0
    assert cost.summary()["macs"] is None and cost.summary()["macs_known"] == 0

    fixed = analyze(model, input_shapes={"x": (1, 10, 16)})
    assert fixed.macs == 10 * 16 * 8 + 10 * 8 and fixed.unknown_macs_nodes == []


def test_failed_shape_inference_falls_back_to_stored_shapes(monkeypatch):
    def fail(*args, **kwargs):
        raise GraphoptError("shape inference failed: boom")

    monkeypatch.setattr(graphopt.core.shapes, "inferred_types", fail)
    model = build("""g (float[1, 4] x) => (float[1, 3] y) { y = MatMul (x, w) }""", w=zeros(4, 3))
    cost = analyze(model)
    assert cost.macs == 12 and "boom" in cost.warnings[0]


def test_op_without_rule_is_unknown():
    proto = onnx.parser.parse_model(f"""<ir_version: {IR_VERSION}, opset_import: ["" : 17, "custom" : 1]>
        g (float[1, 4] x) => (float y) {{ y = custom.Magic (x) }}""")
    cost = analyze(from_proto(proto))
    assert cost.per_node[0].macs is None and "custom:Magic" in cost.per_node[0].note
    assert cost.op_histogram == {"custom:Magic": 1}


@pytest.mark.parametrize("shapes, message", [
    ({"nope": (1, 2)}, "unknown input"),
    ({"x": (1, 3)}, "rank"),
    ({"x": (1, 5, 8)}, "conflicts"),
])
def test_bad_input_shapes_raise_option_error(shapes, message):
    model = build("""g (float[N, 4, S] x) => (float y) { y = Relu (x) }""")
    with pytest.raises(OptionError, match=message):
        analyze(model, input_shapes=shapes)


# ------------------------------------------------------------------------------------------------
# subgraphs


def test_if_branch_nodes_are_counted():
    model = build("""g (float[1, 4] x, bool c) => (float y) {
        y = If (c) <then_branch = t () => (float[1, 4] o) { h = Relu (x)  o = Sigmoid (h) },
                    else_branch = e () => (float[1, 4] o2) { o2 = Neg (x) }>
    }""")
    cost = analyze(model)
    assert cost.nodes == 4
    assert cost.op_histogram == {"If": 1, "Relu": 1, "Sigmoid": 1, "Neg": 1}
    assert cost.macs == 3 * 4  # both branches: an upper bound
    assert [n.op_type for n in cost.per_node] == ["If", "Relu", "Sigmoid", "Neg"]


def test_loop_body_macs_are_unknown():
    model = build("""g (int64 n, bool c, float[2] x) => (float[2] y) {
        y = Loop (n, c, x) <body = b (int64 i, bool ci, float[2] acc) => (bool co, float[2] out) {
            co = Identity (ci)
            out = Add (acc, acc)
        }>
    }""")
    cost = analyze(model)
    assert cost.nodes == 3
    assert node(cost, "Identity").macs == 0  # free on every iteration
    assert node(cost, "Add").macs is None and "Loop" in node(cost, "Add").note
    assert cost.macs is None


# ------------------------------------------------------------------------------------------------
# a whole model


RESNETISH = """g (float[N, 3, 16, 16] x) => (float[N, 10] y) {
    c1 = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2)
    n2 = BatchNormalization (c2, g2, be2, m2, v2)
    r2 = Relu (n2)
    c3 = Conv <pads = [1, 1, 1, 1]> (r2, w3)
    s = Add (c3, r1)
    r3 = Relu (s)
    p = GlobalAveragePool (r3)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, fw, fb)
}"""


def resnetish() -> Model:
    c = 8
    return build(RESNETISH, w1=zeros(c, 3, 3, 3), b1=zeros(c), w2=zeros(c, c, 3, 3),
                 g2=zeros(c), be2=zeros(c), m2=zeros(c), v2=zeros(c), w3=zeros(c, c, 3, 3),
                 fw=zeros(10, c), fb=zeros(10))


def test_resnetish_total_is_the_sum_of_its_parts():
    cost = analyze(resnetish())
    hw = 8 * 8  # 16x16 at stride 2
    expected_macs = {
        "Conv": [8 * hw * 3 * 9, 8 * hw * 8 * 9, 8 * hw * 8 * 9],
        "Relu": [8 * hw] * 3, "BatchNormalization": [8 * hw], "Add": [8 * hw],
        "GlobalAveragePool": [8 * hw], "Flatten": [0], "Gemm": [8 * 10],
    }
    for op, macs in expected_macs.items():
        assert [n.macs for n in cost.per_node if n.op_type == op] == macs, op
    expected_params = (8 * 27 + 8) + 8 * 72 + 4 * 8 + 8 * 72 + (80 + 10)
    assert cost.params == sum(n.params for n in cost.per_node) == expected_params
    assert cost.param_bytes == 4 * expected_params
    assert cost.macs == sum(n.macs for n in cost.per_node) == sum(map(sum, expected_macs.values()))
    assert cost.nodes == 11
    assert [i.name for i in cost.inputs] == ["x"] and cost.inputs[0].dtype == "float32"


def test_to_dict_is_json_and_tables_render():
    cost = analyze(resnetish())
    cost.file_bytes = 1234
    data = json.loads(json.dumps(cost.to_dict()))
    assert data["params"] == cost.params and data["file_bytes"] == 1234
    assert data["per_node"][0]["output_shapes"] == [[1, 8, 8, 8]]
    assert "per_node" not in cost.to_dict(per_node=False)

    rows = layer_rows(cost, sort_by="macs", limit=3)
    assert len(rows) == 3 and all(len(r) == len(LAYER_COLUMNS) for r in rows)
    assert rows[0][2] == "Conv"
    ops = summarize_ops(cost)
    assert ops[0].op_type == "Conv" and ops[0].count == 3
    assert sum(o.count for o in ops) == cost.nodes
    with pytest.raises(OptionError):
        layer_rows(cost, sort_by="size")


def test_analysis_does_not_change_the_model():
    model = resnetish()
    before = graphopt.core.onnx_io.to_proto(model).SerializeToString()
    analyze(model, batch=3)
    assert graphopt.core.onnx_io.to_proto(model).SerializeToString() == before


def test_docstring_examples_run():
    assert doctest.testmod(graphopt.measure.analysis).failed == 0


def _position_table_model() -> onnx.ModelProto:
    """x [batch, seq, 8] + table[position_ids[:, :seq]] as the TorchScript exporter writes a BERT position
    embedding (the Slice's end from Shape -> Gather -> Unsqueeze, the ids a Constant), then a MatMul by [8, 4]:
    onnx's inference cannot size the Slice, so without evaluating the shape arithmetic the rows are open."""
    rng = np.random.default_rng(0)

    def const(name, array):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name + "_v"))

    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             const("one", np.array(1, np.int64)),
             helper.make_node("Gather", ["shape", "one"], ["seq"], axis=0),
             const("ids", np.arange(128, dtype=np.int64)[None]),
             const("axis", np.array([1], np.int64)), const("start", np.array([0], np.int64)),
             const("zero", np.array([0], np.int64)), const("step", np.array([1], np.int64)),
             helper.make_node("Unsqueeze", ["seq", "zero"], ["end"]),
             helper.make_node("Slice", ["ids", "start", "end", "axis", "step"], ["pos_ids"]),
             helper.make_node("Gather", ["table", "pos_ids"], ["pe"]),
             helper.make_node("Add", ["x", "pe"], ["s"]),
             helper.make_node("MatMul", ["s", "w"], ["y"])]
    inits = [numpy_helper.from_array(rng.standard_normal((128, 8)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_shape_arithmetic_is_evaluated_at_the_analysed_shape():
    cost = analyze(from_proto(_position_table_model()), input_shapes={"x": (1, 16, 8)})
    assert cost.unknown_macs_nodes == [] and cost.macs is not None
    matmul = next(n for n in cost.per_node if n.op_type == "MatMul")
    assert matmul.macs == 16 * 8 * 4
    # without a size for seq the MatMul stays unknown (a lower bound), it is not guessed
    assert analyze(from_proto(_position_table_model())).macs is None
