"""Unit tests of the IR (graphopt.core.ir): use-def queries, safe mutation, naming, order, invariants."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.errors import IRError
from graphopt.core.ir import CAPTURE, Graph, Namer, Node, Value
from graphopt.core.onnx_io import from_proto, to_proto
from tests.util import parse, run


def value(graph: Graph, name: str) -> Value:
    for v in graph.values():
        if v.name == name:
            return v
    raise KeyError(name)


def node(graph: Graph, name: str) -> Node:
    for n in graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)


def check_model(model) -> onnx.ModelProto:
    """Invariants hold, and the export passes the ONNX checker (full check, with shape inference)."""
    model.check_invariants()
    proto = to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


SQUARE = """
<ir_version: 10, opset_import: ["" : 18]>
square (float[3] x) => (float[3] y) {
  [mul] y = Mul (x, x)
}
"""

CHAIN = """
<ir_version: 10, opset_import: ["" : 18]>
chain (float[4] x) => (float[4] out) {
  [relu] a = Relu (x)
  [neg] b = Neg (a)
  [add] c = Add (a, b)
  [mul] out = Mul (c, a)
}
"""

# y is read by a Loop body nested in an If branch: two levels of capture.
NESTED = """
<ir_version: 10, opset_import: ["" : 18]>
nested (float[2] x, bool c, int64 trip) => (float[2] out) {
  [relu] y = Relu (x)
  [neg] z = Neg (x)
  [if] out = If <
    then_branch = then_g () => (float[2] t) {
      cond0 = Constant <value = bool {1}> ()
      [loop] t = Loop <body = body_g (int64 i, bool cin, float[2] acc) => (bool cout, float[2] aout) {
          cout = Identity(cin)
          [inner_add] aout = Add (acc, y)
      }> (trip, cond0, x)
    },
    else_branch = else_g () => (float[2] e) {
      [else_sub] e = Sub (y, x)
    }> (c)
}
"""


# ===== use-def queries =========================================================================================
def test_mul_x_x_keeps_two_edges():
    model = from_proto(parse(SQUARE))
    g = model.graph
    x, mul = value(g, "x"), node(g, "mul")
    assert g.nx.number_of_edges(x, mul) == 2
    assert sorted(k for _, _, k in g.nx.out_edges(x, keys=True)) == [0, 1]
    assert g.uses(x) == [(mul, 0), (mul, 1)]
    assert g.consumers(x) == [mul]  # distinct nodes
    assert mul.inputs == [x, x]
    # Replacing the second operand only must leave the first edge alone.
    w = g.add_initializer(np.ones(3, np.float32), "w")
    g.set_input(mul, 1, w)
    assert g.uses(x) == [(mul, 0)] and g.uses(w) == [(mul, 1)]
    g.check_invariants()


def test_producer_uses_consumers():
    g = from_proto(parse(CHAIN)).graph
    x, a, b, c, out = (value(g, n) for n in "x a b c out".split())
    relu, neg, add, mul = (node(g, n) for n in "relu neg add mul".split())
    assert g.producer(x) is None  # graph input
    assert g.producer(a) is relu and g.producer(out) is mul
    assert g.uses(a) == [(neg, 0), (add, 0), (mul, 1)]
    assert g.consumers(a) == [neg, add, mul]
    assert g.uses(out) == [] and g.consumers(out) == []
    assert g.is_graph_output(out) and not g.is_graph_output(c)
    assert g.is_graph_input(x) and not g.is_graph_input(a)
    stranger = Value("stranger")
    assert g.producer(stranger) is None and g.uses(stranger) == []


def test_capture_edges_record_subgraph_reads_at_each_level():
    g = from_proto(parse(NESTED)).graph
    y, x = value(g, "y"), value(g, "x")
    if_node = node(g, "if")
    then_g, else_g = if_node.subgraphs["then_branch"], if_node.subgraphs["else_branch"]
    loop = node(then_g, "loop")
    body = loop.subgraphs["body"]
    assert (if_node, (CAPTURE, "y")) in g.uses(y)
    assert g.consumers(y) == [if_node]
    assert then_g.is_captured(y) and (loop, (CAPTURE, "y")) in then_g.uses(y)
    assert body.is_captured(y) and body.consumers(y) == [node(body, "inner_add")]
    assert else_g.consumers(y) == [node(else_g, "else_sub")]
    assert y in then_g.captured_values() and y in else_g.captured_values()
    # The Value object is shared across the scopes, not copied.
    assert value(body, "y") is y
    # x is read by the loop (a direct input in then_g) and by else_sub.
    assert (loop, 2) in then_g.uses(x)
    assert g.toposort().index(node(g, "relu")) < g.toposort().index(if_node)


# ===== replace_all_uses ========================================================================================
def test_replace_all_uses_rewires_direct_reads():
    model = from_proto(parse(CHAIN))
    g = model.graph
    a, x = value(g, "a"), value(g, "x")
    g.replace_all_uses(a, x)
    assert g.uses(a) == []
    assert [n.name for n, _ in g.uses(x)] == ["relu", "neg", "add", "mul"]
    proto = check_model(model)
    feeds = {"x": np.array([-1, 2, -3, 4], np.float32)}
    (got,) = run(proto, feeds)
    xv = feeds["x"]
    np.testing.assert_array_equal(got, (xv - xv) * xv)


def test_replace_all_uses_through_nested_captures():
    model = from_proto(parse(NESTED))
    g = model.graph
    y, z = value(g, "y"), value(g, "z")
    if_node = node(g, "if")
    then_g, else_g = if_node.subgraphs["then_branch"], if_node.subgraphs["else_branch"]
    loop = node(then_g, "loop")
    body = loop.subgraphs["body"]

    g.replace_all_uses(y, z)

    assert g.uses(y) == [] and (if_node, (CAPTURE, "z")) in g.uses(z)
    assert (loop, (CAPTURE, "z")) in then_g.uses(z) and y not in then_g.nx
    assert node(body, "inner_add").inputs[1] is z and y not in body.nx
    assert node(else_g, "else_sub").inputs[0] is z and y not in else_g.nx
    # z is now read before the If: the order must put its producer first.
    order = g.toposort()
    assert order.index(node(g, "neg")) < order.index(if_node)
    proto = check_model(model)
    x = np.array([1.5, -2.0], np.float32)
    for c in (True, False):
        (got,) = run(proto, {"x": x, "c": np.array(c), "trip": np.array(3, np.int64)})
        np.testing.assert_array_equal(got, x + 3 * -x if c else -x - x)


def test_replace_captured_value_inside_subgraph_drops_stale_captures():
    model = from_proto(parse(NESTED))
    g = model.graph
    y = value(g, "y")
    if_node = node(g, "if")
    then_g = if_node.subgraphs["then_branch"]
    loop = node(then_g, "loop")
    body = loop.subgraphs["body"]
    acc = value(body, "acc")
    body.replace_all_uses(y, acc)  # a pass working inside the loop body
    assert y not in body.nx
    # then_g read y only through the loop: its capture edge and its copy of y must go.
    assert y not in then_g.nx and then_g.uses(y) == []
    # The else branch still reads y, so the If keeps its capture edge.
    assert g.consumers(y) == [if_node]
    check_model(model)


def test_replace_graph_output_keeps_the_interface_name():
    model = from_proto(parse(CHAIN))
    g = model.graph
    out, c = value(g, "out"), value(g, "c")
    assert g.can_replace(out, c)
    g.replace_all_uses(out, c)
    assert g.outputs == [c] and c.name == "out"
    assert out.name != "out" and out.name.startswith("out")
    assert node(g, "mul").outputs[0] is out  # now dead, still produced
    g.remove_node(node(g, "mul"))
    proto = check_model(model)
    assert [o.name for o in proto.graph.output] == ["out"]
    assert proto.graph.node[-1].op_type == "Add" and list(proto.graph.node[-1].output) == ["out"]
    x = np.array([1, -2, 3, 0.5], np.float32)
    (got,) = run(proto, {"x": x})
    np.testing.assert_array_equal(got, np.maximum(x, 0) - np.maximum(x, 0))


def test_replace_graph_output_that_is_an_initializer():
    model = from_proto(parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y, float[2] k) <float[2] k = {1, 2}> {
          y = Relu(x)
        }
    """))
    g = model.graph
    k = value(g, "k")
    neg = g.add_node("Neg", [value(g, "x")], name="neg")
    g.replace_all_uses(k, neg.outputs[0])
    assert neg.outputs[0].name == "k" and g.outputs[1] is neg.outputs[0]
    assert g.initializers[k.name] is k and "k" not in g.initializers
    g.remove_initializer(k)
    proto = check_model(model)
    assert [o.name for o in proto.graph.output] == ["y", "k"] and len(proto.graph.initializer) == 0


@pytest.mark.parametrize("kind", ["input", "initializer", "other_output"])
def test_replace_graph_output_refuses_to_rename_the_interface(kind):
    model = from_proto(parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y, float[2] y2) <float[2] w = {1, 2}> {
          y = Relu(x)
          y2 = Neg(x)
        }
    """))
    g = model.graph
    y = value(g, "y")
    new = {"input": value(g, "x"), "initializer": value(g, "w"), "other_output": value(g, "y2")}[kind]
    before = to_proto(model).SerializeToString()
    assert not g.can_replace(y, new)
    with pytest.raises(IRError, match="cannot replace"):
        g.replace_all_uses(y, new)
    assert to_proto(model).SerializeToString() == before  # refused without touching anything


def test_replace_subgraph_output_is_positional_but_must_stay_local():
    model = from_proto(parse(NESTED))
    g = model.graph
    else_g = node(g, "if").subgraphs["else_branch"]
    e, x, y = value(else_g, "e"), value(g, "x"), value(g, "y")
    # The ONNX checker refuses an outer value as a subgraph output.
    assert not else_g.can_replace(e, x)
    with pytest.raises(IRError):
        else_g.replace_all_uses(e, x)
    neg = else_g.add_node("Neg", [x], name="else_neg")
    local = neg.outputs[0]
    assert else_g.can_replace(e, local)
    else_g.replace_all_uses(e, local)
    assert else_g.outputs == [local] and local.name == "else_neg"  # no renaming inside subgraphs
    else_g.remove_node(node(else_g, "else_sub"))
    assert y not in else_g.nx  # the branch no longer reads y; the then branch still does
    assert g.consumers(y) == [node(g, "if")]
    proto = check_model(model)
    x_in = np.array([1.5, -2.0], np.float32)
    (got,) = run(proto, {"x": x_in, "c": np.array(False), "trip": np.array(3, np.int64)})
    np.testing.assert_array_equal(got, -x_in)


def test_two_outputs_of_a_subgraph_never_merge_into_one_value():
    # A Loop body whose two scan-like outputs are distinct values: making one read the other would
    # list one name twice among the outputs, which onnxruntime then computes wrongly.
    g = Graph()
    body = Graph(g.namer, parent=Node("Loop"))
    a, b = Value("a"), Value("b")
    for v in (a, b):
        body.add_input(v)
    n1 = body.add_node("Identity", [a], name="id_a")
    n2 = body.add_node("Identity", [b], name="id_b")
    body.outputs = [n1.outputs[0], n2.outputs[0]]
    assert not body.can_replace(n1.outputs[0], n2.outputs[0])
    with pytest.raises(IRError):
        body.replace_all_uses(n1.outputs[0], n2.outputs[0])


def test_constant_array_of_a_function_attribute_reference_is_unknown():
    g = Graph()
    const = g.add_node("Constant", [], name="c")
    attr = onnx.AttributeProto(name="value", ref_attr_name="alpha", type=onnx.AttributeProto.TENSOR)
    const.attrs["value"] = attr
    assert g.constant_array(const.outputs[0]) is None


def test_replace_all_uses_refuses_a_cycle():
    model = from_proto(parse(CHAIN))
    g = model.graph
    a, c = value(g, "a"), value(g, "c")
    with pytest.raises(IRError, match="cycle"):
        g.replace_all_uses(a, c)  # c = Add(a, Neg(a)): reading c where a was read loops
    g.check_invariants()
    assert g.producer(c) is node(g, "add") and node(g, "add").inputs[0] is a


def test_replace_all_uses_with_itself_is_a_no_op():
    model = from_proto(parse(CHAIN))
    before = to_proto(model).SerializeToString()
    a = value(model.graph, "a")
    model.graph.replace_all_uses(a, a)
    assert to_proto(model).SerializeToString() == before


# ===== remove_node =============================================================================================
def test_remove_node_refuses_to_orphan_used_outputs():
    model = from_proto(parse(CHAIN))
    g = model.graph
    before = to_proto(model).SerializeToString()
    for name in ("relu", "neg", "mul"):  # a is read, b is read, out is a graph output
        with pytest.raises(IRError, match="orphan"):
            g.remove_node(node(g, name))
    assert to_proto(model).SerializeToString() == before
    g.check_invariants()


def test_remove_node_deletes_it_and_its_outputs():
    g = from_proto(parse(CHAIN)).graph
    add, mul = node(g, "add"), node(g, "mul")
    c = value(g, "c")
    g.set_input(mul, 0, value(g, "x"))
    g.remove_node(add)
    assert add not in g.nx and c not in g.nx
    assert g.consumers(value(g, "b")) == []
    g.check_invariants()


def test_remove_node_keep_outputs_lets_a_new_producer_take_over():
    model = from_proto(parse(CHAIN))
    g = model.graph
    neg = node(g, "neg")
    b = value(g, "b")
    g.remove_node(neg, keep_outputs=True)
    assert g.producer(b) is None and b in g.nx
    g.add_node("Abs", [value(g, "a")], outputs=[b], name="abs", anchor=None)
    assert g.producer(b).op_type == "Abs"
    check_model(model)


def test_remove_node_with_subgraph_drops_its_captures():
    model = from_proto(parse(NESTED))
    g = model.graph
    if_node = node(g, "if")
    out = value(g, "out")
    identity = g.add_node("Identity", [value(g, "z")], name="id")
    g.replace_all_uses(out, identity.outputs[0])
    g.remove_node(if_node)
    assert not any(isinstance(k, tuple) for _, _, k in g.nx.edges(keys=True))
    assert g.uses(value(g, "y")) == []
    check_model(model)


# ===== construction and naming =================================================================================
def test_add_node_names_are_unique_and_deterministic():
    def build() -> list[str]:
        g = from_proto(parse(CHAIN)).graph
        x = value(g, "x")
        names = []
        for hint in ["relu", "relu", "fused", "fused", "fused_1", "", ""]:
            n = g.add_node("Relu", [x], name=hint)
            names.append(n.name)
            names.append(n.outputs[0].name)
        split = g.add_node("Split", [x], outputs=3, name="split")
        names += [v.name for v in split.outputs]
        named = g.add_node("Relu", [x], outputs=["a", "a"], name="two")
        names += [v.name for v in named.outputs]
        return names

    names = build()
    assert names == build()
    node_names = names[0:14:2]
    assert node_names == ["relu_1", "relu_2", "fused", "fused_1", "fused_2", "Relu", "Relu_1"]
    value_names = names[1:14:2] + names[14:]
    assert len(set(value_names)) == len(value_names)
    assert "a" not in value_names  # taken by the source graph
    assert names[14:17] == ["split_0", "split_1", "split_2"]


@given(st.lists(st.sampled_from(["n", "n_1", "n_2", "conv", "conv_1", "conv_10", "x_1_1", ""]), max_size=40))
def test_namer_never_repeats_a_name(hints):
    namer = Namer()
    names = [namer.value_name(h) for h in hints]
    assert len(set(names)) == len(names)
    assert all(name for name in names)
    again = Namer()
    assert [again.value_name(h) for h in hints] == names  # deterministic


def test_subgraph_names_come_from_the_shared_namer():
    g = from_proto(parse(NESTED)).graph
    body = node(node(g, "if").subgraphs["then_branch"], "loop").subgraphs["body"]
    n = body.add_node("Relu", [value(body, "acc")], name="relu")
    assert n.name == "relu_1"  # "relu" exists in the main graph
    v = body.new_value("y")
    assert v.name == "y_1"


def test_add_initializer_copies_and_freezes_the_array():
    g = from_proto(parse(CHAIN)).graph
    data = np.arange(4, dtype=np.float32)
    w = g.add_initializer(data, "a")
    assert w.name == "a_1" and g.initializers["a_1"] is w
    data[0] = 100
    assert w.array[0] == 0  # no aliasing of the caller's array
    with pytest.raises(ValueError):
        w.array[0] = 5
    assert w.dtype == TensorProto.FLOAT and w.shape == (4,)
    assert g.constant_array(w) is w.array


def test_set_initializer_array_refuses_shared_weights():
    model = from_proto(parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y, float[2] z, float[2] k) <float[2] w = {1, 2}, float[2] solo = {3, 4},
                                                                 float[2] k = {5, 6}> {
          [m1] y = Mul (x, w)
          [m2] z = Add (w, solo)
        }
    """))
    g = model.graph
    w, solo, k = value(g, "w"), value(g, "solo"), value(g, "k")
    with pytest.raises(IRError, match="shared"):
        g.set_initializer_array(w, np.zeros(2, np.float32))
    with pytest.raises(IRError, match="shared"):
        g.set_initializer_array(k, np.zeros(2, np.float32))  # a graph output: the caller sees it
    np.testing.assert_array_equal(w.array, [1, 2])
    g.set_initializer_array(solo, np.array([7, 8], np.float32))
    np.testing.assert_array_equal(g.constant_array(solo), [7, 8])
    proto = check_model(model)
    x = np.ones(2, np.float32)
    y, z, kk = run(proto, {"x": x})
    np.testing.assert_array_equal(z, [8, 10])


def test_set_initializer_array_refuses_a_captured_weight_and_non_initializers():
    model = from_proto(parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x, bool c) => (float[2] y, float[2] o) <float[2] w = {1, 2}> {
          [m1] y = Mul (x, w)
          o = If <then_branch = t () => (float[2] a) { [inner] a = Add (w, x) },
                  else_branch = e () => (float[2] b) { b = Identity(x) }> (c)
        }
    """))
    g = model.graph
    then_g = next(n for n in g.nodes if n.op_type == "If").subgraphs["then_branch"]
    w = value(g, "w")
    # Only one reader inside the branch, but the main graph reads w too.
    with pytest.raises(IRError):
        then_g.set_initializer_array(w, np.zeros(2, np.float32))
    with pytest.raises(IRError, match="not an initializer"):
        g.set_initializer_array(value(g, "y"), np.zeros(2, np.float32))
    np.testing.assert_array_equal(w.array, [1, 2])
    g.check_invariants()


def test_set_initializer_array_on_a_sparse_initializer_makes_it_dense():
    values = numpy_helper.from_array(np.array([5.0], np.float32), "s")
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([1], np.int64), ""), [3])
    graph = helper.make_graph([helper.make_node("Relu", ["s"], ["y"], name="r")], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                              sparse_initializer=[sparse])
    model = from_proto(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)]))
    g = model.graph
    s = value(g, "s")
    np.testing.assert_array_equal(g.constant_array(s), [0, 5, 0])
    g.set_initializer_array(s, np.array([1, 2, 3], np.float32))
    proto = check_model(model)
    assert len(proto.graph.sparse_initializer) == 0 and proto.graph.initializer[0].name == "s"
    (y,) = run(proto, {})
    np.testing.assert_array_equal(y, [1, 2, 3])


# ===== constant_array ==========================================================================================
@pytest.mark.parametrize("attr, expected", [
    (helper.make_attribute("value", numpy_helper.from_array(np.array([[1, 2]], np.int32))),
     np.array([[1, 2]], np.int32)),
    (helper.make_attribute("value_float", 1.5), np.array(1.5, np.float32)),
    (helper.make_attribute("value_floats", [1.5, 2.5]), np.array([1.5, 2.5], np.float32)),
    (helper.make_attribute("value_int", 7), np.array(7, np.int64)),
    (helper.make_attribute("value_ints", [7, 8]), np.array([7, 8], np.int64)),
    (helper.make_attribute("value_string", "hi"), np.array("hi", dtype=object)),
    (helper.make_attribute("value_strings", ["a", "bc"]), np.array(["a", "bc"], dtype=object)),
    (helper.make_attribute("value", helper.make_tensor("s", TensorProto.STRING, [2], [b"a", b"bc"])),
     np.array(["a", "bc"], dtype=object)),
    (helper.make_attribute("sparse_value", helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([4.0, 5.0], np.float32)),
        numpy_helper.from_array(np.array([[0, 1], [1, 0]], np.int64)), [2, 2])),
     np.array([[0, 4], [5, 0]], np.float32)),
])
def test_constant_array_reads_every_constant_attribute_form(attr, expected):
    const = helper.make_node("Constant", [], ["k"], name="const")
    const.attribute.append(attr)
    ident = helper.make_node("Identity", ["k"], ["y"])
    graph = helper.make_graph([const, ident], "g", [], [helper.make_value_info("y", onnx.TypeProto())])
    model = from_proto(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)]))
    g = model.graph
    got = g.constant_array(value(g, "k"))
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.tolist() == expected.tolist()
    assert g.constant_array(value(g, "y")) is None  # Identity output: not folded here
    (y,) = run(to_proto(model), {})  # onnxruntime agrees on what the Constant produces
    assert np.shape(y) == expected.shape
    if expected.dtype == object:
        assert np.asarray(y).reshape(-1).tolist() == expected.reshape(-1).tolist()
    else:
        np.testing.assert_array_equal(y, expected)


def test_constant_array_for_initializers_and_overridable_inputs():
    model = from_proto(parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x, float[2] w_in, bool c) => (float[2] y, float[2] o)
          <float[2] w = {1, 2}, float[2] w_in = {3, 4}> {
          y = Add(w, w_in)
          o = If <then_branch = t () => (float[2] a) { a = Add(w, w_in) },
                  else_branch = e () => (float[2] b) { b = Identity(x) }> (c)
        }
    """))
    g = model.graph
    np.testing.assert_array_equal(g.constant_array(value(g, "w")), [1, 2])
    assert g.constant_array(value(g, "w_in")) is None  # a graph input may override its initializer
    assert g.constant_array(value(g, "x")) is None
    assert g.constant_array(value(g, "y")) is None
    assert g.constant_array(None) is None
    then_g = next(n for n in g.nodes if n.op_type == "If").subgraphs["then_branch"]
    np.testing.assert_array_equal(then_g.constant_array(value(then_g, "w")), [1, 2])
    assert then_g.constant_array(value(then_g, "w_in")) is None  # overridable in the enclosing scope


# ===== order ===================================================================================================
def test_toposort_reproduces_source_order():
    model = parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] out) {
          k = Constant <value_float = 2.0> ()
          [late_name_first] b = Neg (x)
          [a_relu] a = Relu (x)
          c = Add(b, a)
          k2 = Constant <value_float = 3.0> ()
          out = Mul(c, k2)
        }
    """)
    g = from_proto(model).graph
    assert [n.op_type for n in g.toposort()] == [n.op_type for n in model.graph.node]
    assert g.toposort() == g.toposort() and g.nodes == g.toposort()


def test_toposort_puts_added_nodes_at_their_anchor():
    g = from_proto(parse(CHAIN)).graph
    relu, neg = node(g, "relu"), node(g, "neg")
    g.add_node("Abs", [value(g, "x")], name="late")
    g.add_node("Abs", [value(g, "a")], name="anchored", anchor=relu)
    order = [n.name for n in g.toposort()]
    assert order == ["relu", "anchored", "neg", "add", "mul", "late"]
    assert order.index("anchored") < order.index(neg.name)


def test_toposort_sorts_an_unsorted_source():
    model = parse(CHAIN)
    nodes = list(model.graph.node)
    model.graph.ClearField("node")
    model.graph.node.extend(reversed(nodes))
    g = from_proto(model).graph
    assert [n.name for n in g.toposort()] == ["relu", "neg", "add", "mul"]


def _random_dag(draw_ops: list[tuple[str, int, int]]) -> onnx.ModelProto:
    """A graph of elementwise ops; op i reads two earlier values (indices taken modulo the count so far)."""
    names = ["x0", "x1"]
    nodes = []
    for i, (op, a, b) in enumerate(draw_ops):
        inputs = [names[a % len(names)]] if op in ("Relu", "Neg", "Abs") else [names[a % len(names)],
                                                                               names[b % len(names)]]
        out = f"v{i}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"n{i}"))
        names.append(out)
    used = {i for n in nodes for i in n.input}
    outputs = [n for n in names[2:] if n not in used] or ["x0"]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("x0", "x1")]
    graph = helper.make_graph(nodes, "dag", vi, [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3])
                                                 for n in outputs])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])


dag_ops = st.lists(st.tuples(st.sampled_from(["Add", "Mul", "Sub", "Relu", "Neg", "Max", "Abs"]),
                             st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(dag_ops, st.randoms(use_true_random=False))
def test_random_dags_round_trip_and_toposort_respects_edges(ops, rng):
    proto = _random_dag(ops)
    model = from_proto(proto)
    assert to_proto(model).SerializeToString() == proto.SerializeToString()
    # Shuffle the file's node order: the export must still be a valid topological order, deterministically.
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(proto)
    nodes = list(shuffled.graph.node)
    rng.shuffle(nodes)
    shuffled.graph.ClearField("node")
    shuffled.graph.node.extend(nodes)
    g = from_proto(shuffled).graph
    order = g.toposort()
    position = {n: i for i, n in enumerate(order)}
    for n in order:
        for v in n.inputs:
            p = g.producer(v)
            assert p is None or position[p] < position[n]
    assert [n.name for n in order] == [n.name for n in from_proto(shuffled).graph.toposort()]
    g.check_invariants()


# ===== invariants ==============================================================================================
def _broken(how: str) -> Graph:
    g = from_proto(parse(NESTED)).graph
    relu, neg, if_node = node(g, "relu"), node(g, "neg"), node(g, "if")
    x, y, z = value(g, "x"), value(g, "y"), value(g, "z")
    if how == "input_without_edge":
        relu.inputs.append(z)
    elif how == "edge_without_input":
        g.nx.add_edge(z, relu, key=3)
    elif how == "two_producers":
        g.nx.add_edge(neg, y, key=0)
    elif how == "cycle":
        g.nx.add_edge(y, relu, key=1)
        relu.inputs.append(y)
    elif how == "producer_of_input":
        g.nx.add_edge(relu, x, key=1)
        relu.outputs.append(x)
    elif how == "missing_capture_edge":
        for key in [k for _, _, k in g.nx.out_edges(y, keys=True) if isinstance(k, tuple)]:
            g.nx.remove_edge(y, if_node, key=key)
    elif how == "stale_capture_edge":
        g.add_capture(if_node, z)
    elif how == "duplicate_name":
        z.name = "y"
    elif how == "initializer_key":
        w = g.add_initializer(np.zeros(1, np.float32), "w")
        w.name = "renamed"
    elif how == "foreign_node":
        relu.graph = if_node.subgraphs["else_branch"]
    elif how == "output_not_in_graph":
        g.outputs.append(Value("ghost"))
    elif how == "broken_subgraph":
        else_g = if_node.subgraphs["else_branch"]
        node(else_g, "else_sub").inputs[1] = z
    return g


@pytest.mark.parametrize("how", ["input_without_edge", "edge_without_input", "two_producers", "cycle",
                                 "producer_of_input", "missing_capture_edge", "stale_capture_edge",
                                 "duplicate_name", "initializer_key", "foreign_node", "output_not_in_graph",
                                 "broken_subgraph"])
def test_check_invariants_catches_a_broken_graph(how):
    from_proto(parse(NESTED)).graph.check_invariants()  # the intact graph passes
    with pytest.raises(IRError):
        _broken(how).check_invariants()


def test_toposort_reports_a_cycle_as_irerror():
    with pytest.raises(IRError, match="cycle"):
        _broken("cycle").toposort()


# ===== misc ====================================================================================================
def test_node_attr_accessors():
    g = from_proto(parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[1,1,4,4] x) => (float[1,1,2,2] y) {
          y = MaxPool <kernel_shape = [2, 2], strides = [2, 2], auto_pad = "VALID"> (x)
        }
    """)).graph
    pool = g.nodes[0]
    assert pool.attr("kernel_shape") == [2, 2] and pool.attr("auto_pad") == b"VALID"
    assert pool.attr("dilations", "default") == "default"
    pool.set_attr("strides", [1, 1])
    assert list(pool.attrs) == ["kernel_shape", "strides", "auto_pad"]  # position kept
    pool.del_attr("auto_pad")
    assert pool.attr("auto_pad") is None


def test_model_queries():
    model = from_proto(parse(NESTED))
    assert model.opset("") == 18 and model.opset("ai.onnx") == 18 and model.opset("com.x") is None
    assert model.ir_version == 10
    graphs = list(model.graphs())
    assert graphs[0] is model.graph and len(graphs) == 4  # main, then, loop body, else
    assert model.node_count() == 3 + 2 + 2 + 1


# ===== cycle checks stay cheap and sound =======================================================================
def test_identity_elimination_needs_no_graph_search(monkeypatch):
    # Replacing a value by one computed upstream of it can never close a cycle; the depth cache must
    # prove that without a search (a search per replacement made this quadratic on large graphs).
    nodes, prev = [], "x"
    for i in range(300):
        nodes += [helper.make_node("Relu", [prev], [f"r{i}"]), helper.make_node("Identity", [f"r{i}"], [f"i{i}"])]
        prev = f"i{i}"
    nodes.append(helper.make_node("Neg", [prev], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = from_proto(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)]))
    g = model.graph
    searches = []
    monkeypatch.setattr("graphopt.core.ir.nx.has_path", lambda *a: searches.append(a) or False)
    for n in [n for n in g.nodes if n.op_type == "Identity"]:
        fused = g.add_node("Relu", [n.inputs[0]], name="fresh")  # a new node, as a fusion would add
        g.replace_all_uses(n.outputs[0], fused.outputs[0])
        g.remove_node(n)
    assert searches == []
    assert [n.op_type for n in g.nodes].count("Identity") == 0
    monkeypatch.undo()
    check_model(model)


@settings(max_examples=60, deadline=None)
@given(dag_ops, st.lists(st.tuples(st.booleans(), st.integers(0, 200), st.integers(0, 200)), max_size=30))
def test_replace_all_uses_raises_exactly_when_a_cycle_would_form(ops, edits):
    import networkx as nx

    model = from_proto(_random_dag(ops))
    g = model.graph
    for add, a, b in edits:
        values = sorted((v for v in g.values() if g.producer(v) is not None or g.is_graph_input(v)),
                        key=lambda v: v.name)
        if add:  # a new node reading two existing values
            g.add_node("Add", [values[a % len(values)], values[b % len(values)]], name="new")
            continue
        old, new = values[a % len(values)], values[b % len(values)]
        if old is new or not g.can_replace(old, new):
            continue
        producer = g.producer(new)
        cycle = producer is not None and any(r is producer or nx.has_path(g.nx, r, producer)
                                             for r in g.consumers(old))
        if cycle:
            with pytest.raises(IRError, match="cycle"):
                g.replace_all_uses(old, new)
        else:
            g.replace_all_uses(old, new)
        g.check_invariants()
        depth = g._depth
        if depth is not None:  # a valid cache orders every edge
            for n in g.nodes:
                assert all(depth[p] < depth[n] for p in g._readers_of(n))
    to_proto(model)


def test_clone_is_an_independent_exact_copy():
    from onnx import helper as h

    from graphopt.core import onnx_io
    from tests.util import make_model, tensor
    proto = make_model([h.make_node("Neg", ["x"], ["a"]), h.make_node("Exp", ["a"], ["y"])],
                       [tensor("x", [3])], [tensor("y", [3])])
    model = onnx_io.from_proto(proto)
    model.uses_external_data = True
    copy = model.clone()
    assert onnx_io.to_proto(copy) == proto and copy.uses_external_data
    exp = next(n for n in copy.graph.nodes if n.op_type == "Exp")
    # a change to the copy ...
    copy.graph.set_input(exp, 0, copy.graph.inputs[0])
    assert onnx_io.to_proto(copy) != proto
    assert onnx_io.to_proto(model) == proto  # ... leaves the original as it was
