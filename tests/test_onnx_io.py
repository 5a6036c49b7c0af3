"""Unit tests of ModelProto <-> IR (graphopt.core.onnx_io): exact round trip, files, external data, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from graphopt.core.errors import ModelLoadError
from graphopt.core.onnx_io import from_proto, load, round_trip, save, to_proto
from tests.util import parse, run

ort = pytest.importorskip("onnxruntime")

OPSET = [helper.make_opsetid("", 18)]


def make_model(graph: onnx.GraphProto, **kwargs) -> onnx.ModelProto:
    kwargs.setdefault("opset_imports", OPSET)
    kwargs.setdefault("ir_version", 10)  # onnx 1.23 would stamp 14, which onnxruntime 1.31 cannot read
    return helper.make_model(graph, **kwargs)


def assert_exact(proto: onnx.ModelProto, tmp_path: Path | None = None) -> onnx.ModelProto:
    """The IR writes ``proto`` back byte for byte (in memory, and through a file when ``tmp_path`` is given)."""
    original = proto.SerializeToString()
    exported = round_trip(proto)
    assert proto.SerializeToString() == original, "from_proto must not modify its input"
    if exported.SerializeToString() != original:
        from google.protobuf import text_format
        assert text_format.MessageToString(exported) == text_format.MessageToString(proto)
        assert exported.SerializeToString() == original
    assert to_proto(from_proto(proto)).SerializeToString() == original  # deterministic
    if tmp_path is not None:
        path = tmp_path / "model.onnx"
        save(load_from(proto, tmp_path), path)
        assert path.read_bytes() == original
    return exported


def load_from(proto: onnx.ModelProto, tmp_path: Path):
    path = tmp_path / "source.onnx"
    path.write_bytes(proto.SerializeToString())
    return load(path)


# ===== exact round trip ========================================================================================
def test_initializers_in_raw_and_typed_layouts(tmp_path):
    tensors = [
        numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "raw_f32"),  # raw_data
        helper.make_tensor("typed_f32", TensorProto.FLOAT, [3], [1.0, -2.5, 3.25]),  # float_data
        helper.make_tensor("typed_f16", TensorProto.FLOAT16, [2], np.array([1.5, -2], np.float16).view(np.uint16)),
        helper.make_tensor("typed_i8", TensorProto.INT8, [3], [-1, 0, 127]),  # int32_data
        helper.make_tensor("typed_bool", TensorProto.BOOL, [2], [True, False]),
        helper.make_tensor("typed_i64", TensorProto.INT64, [2], [2**40, -7]),  # int64_data
        helper.make_tensor("typed_f64", TensorProto.DOUBLE, [1], [np.pi]),  # double_data
        helper.make_tensor("typed_u64", TensorProto.UINT64, [1], [2**63 + 5]),  # uint64_data
        helper.make_tensor("typed_str", TensorProto.STRING, [2], [b"a", b"bc"]),  # string_data
        helper.make_tensor("raw_i32", TensorProto.INT32, [2], np.array([5, 6], np.int32).tobytes(), raw=True),
        helper.make_tensor("scalar", TensorProto.FLOAT, [], [4.0]),
        helper.make_tensor("empty", TensorProto.FLOAT, [0, 3], []),
    ]
    tensors[1].doc_string = "a weight with a doc string"
    helper.set_metadata_props(tensors[2], {"origin": "test"})
    nodes = [helper.make_node("Identity", [t.name], [t.name + "_out"]) for t in tensors]
    graph = helper.make_graph(nodes, "inits", [], [helper.make_value_info(t.name + "_out", onnx.TypeProto())
                                                   for t in tensors], initializer=tensors)
    proto = make_model(graph)
    assert_exact(proto, tmp_path)
    model = from_proto(proto)
    for t in tensors:
        v = model.graph.initializers[t.name]
        got, want = v.array, numpy_helper.to_array(t)
        assert got.dtype == want.dtype and got.shape == want.shape and got.tolist() == want.tolist()
    outs = run(proto, {})
    for t, out in zip(tensors, outs):
        want = numpy_helper.to_array(t)
        if want.dtype == object:
            assert out.tolist() == want.tolist()
        else:
            np.testing.assert_array_equal(out, want)


def test_large_plain_initializers_are_held_as_arrays_only_and_written_back_exactly(tmp_path):
    """A loaded model keeps each large plain weight once, as a read-only array (not also as its proto);
    the file is still written back byte for byte, a clone shares the arrays, and anything that is not
    plain (a doc string, typed fields, small) keeps its proto."""
    rng = np.random.default_rng(0)
    big = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "big")
    big_i64 = numpy_helper.from_array(np.arange(1024, dtype=np.int64), "big_i64")
    documented = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "documented")
    documented.doc_string = "kept with its proto"
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [2048], rng.standard_normal(2048).tolist())
    small = numpy_helper.from_array(np.ones(4, np.float32), "small")
    tensors = [big, big_i64, documented, typed, small]
    nodes = [helper.make_node("Identity", [t.name], [t.name + "_out"]) for t in tensors]
    graph = helper.make_graph(nodes, "g", [], [helper.make_value_info(t.name + "_out", onnx.TypeProto())
                                               for t in tensors], initializer=tensors)
    proto = make_model(graph)
    src = tmp_path / "src.onnx"
    src.write_bytes(proto.SerializeToString())
    model = load(src)
    held = {name for name, v in model.graph.initializers.items() if v.held_array is not None}
    assert held == {"big", "big_i64"}
    value = model.graph.initializers["big"]
    assert value.dtype == TensorProto.FLOAT and value.shape == (64, 32) and not value.array.flags.writeable
    np.testing.assert_array_equal(value.array, numpy_helper.to_array(big))
    assert to_proto(model).SerializeToString() == proto.SerializeToString()
    save(model, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == src.read_bytes()
    copy = model.clone()
    assert copy.graph.initializers["big"].array is value.array  # shared, not copied
    assert to_proto(copy).SerializeToString() == proto.SerializeToString()
    copy.graph.set_initializer_array(copy.graph.initializers["big"], np.zeros((64, 32), np.float32))
    assert not copy.graph.initializers["big"].array.any()
    np.testing.assert_array_equal(model.graph.initializers["big"].array, numpy_helper.to_array(big))
    with pytest.raises(Exception, match="read-only"):
        value.hold_decoded(np.zeros(3, np.float32))


def test_sessions_take_held_weights_by_reference():
    """An IR model's large held weights reach onnxruntime as external initializers over its arrays: the
    proto handed around carries stubs only, the outputs are those of the full model, and a stub whose
    array is not given is refused, never run with garbage."""
    from graphopt.core.onnx_io import MEMORY_LOCATION, is_in_memory, shared_proto
    from graphopt.measure import ort as gort
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b")  # 256 bytes: stays inline
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])], initializer=[w, b])
    proto = make_model(graph)
    model = from_proto(proto)
    model.graph.set_initializer_array(model.graph.initializers["w"], numpy_helper.to_array(w) * 2)
    light, weights = shared_proto(model)
    assert set(weights) == {"w"} and weights["w"] is model.graph.initializers["w"].array
    stubs = {t.name: t for t in light.graph.initializer}
    assert is_in_memory(stubs["w"]) and not stubs["w"].raw_data and not is_in_memory(stubs["b"])
    assert any(e.value == MEMORY_LOCATION for e in stubs["w"].external_data)
    assert light.ByteSize() < 1024
    x = rng.standard_normal((2, 32)).astype(np.float32)
    want = x @ (numpy_helper.to_array(w) * 2) + numpy_helper.to_array(b)
    for sess in (gort.session(model), gort.session(light, weights=weights),
                 gort.session(gort.with_outputs(light, ["h"]), weights=weights, optimize=True)):
        np.testing.assert_allclose(gort.run(sess, {"x": x}, ["y"])["y"], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not given"):
        gort.session(light)


def test_constant_node_weights(tmp_path):
    w = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(2, 4))
    const = helper.make_node("Constant", [], ["w"], value=w, name="w_const")
    scalar = helper.make_node("Constant", [], ["s"], value_float=0.5)
    mul = helper.make_node("Mul", ["w", "s"], ["y"])
    graph = helper.make_graph([const, scalar, mul], "c", [], [helper.make_tensor_value_info("y", 1, [2, 4])])
    proto = make_model(graph)
    assert_exact(proto, tmp_path)
    model = from_proto(proto)
    w_value = model.graph.nodes[0].outputs[0]
    np.testing.assert_array_equal(model.graph.constant_array(w_value), numpy_helper.to_array(w))


def test_model_fields_metadata_and_doc_strings_everywhere(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3], doc_string="the input")
    helper.set_metadata_props(x, {"vi": "input"})
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3], doc_string="the output")
    helper.set_metadata_props(y, {"vi": "output"})
    mid = helper.make_tensor_value_info("mid", TensorProto.FLOAT, ["N", 3], doc_string="in between")
    helper.set_metadata_props(mid, {"vi": "mid"})
    relu = helper.make_node("Relu", ["x"], ["mid"], name="relu", doc_string="node doc")
    helper.set_metadata_props(relu, {"node": "relu"})
    relu.attribute.append(helper.make_attribute("unused_custom", 1))
    relu.attribute[0].doc_string = "attribute doc"
    relu.domain = "com.acme"  # a custom op: arbitrary attributes allowed
    neg = helper.make_node("Neg", ["mid"], ["y"])
    graph = helper.make_graph([relu, neg], "main", [x], [y], value_info=[mid], doc_string="graph doc")
    helper.set_metadata_props(graph, {"graph": "main"})
    graph.quantization_annotation.add(tensor_name="mid").quant_parameter_tensor_names.add(key="SCALE", value="s")
    proto = make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.acme", 3),
                                             helper.make_opsetid("ai.onnx.ml", 4)],
                       producer_name="tests", producer_version="9.9", domain="org.example", model_version=42,
                       doc_string="model doc")
    helper.set_metadata_props(proto, {"author": "me", "license": "none"})
    proto.ir_version = 9
    assert_exact(proto, tmp_path)
    model = from_proto(proto)
    assert model.ir_version == 9 and model.opset("com.acme") == 3 and model.opset("ai.onnx.ml") == 4
    exported = to_proto(model)
    assert exported.producer_name == "tests" and exported.graph.doc_string == "graph doc"
    assert exported.graph.node[0].doc_string == "node doc"


def test_value_info_order_input_output_order_and_names(tmp_path):
    proto = parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] b_in, float[2] a_in, float[2] w) => (float[2] z_out, float[2] a_out, float[2] b_in)
          <float[2] w = {1, 2}> {
          t1 = Add(a_in, w)
          t2 = Mul(t1, b_in)
          t3 = Neg(t2)
          z_out = Relu(t3)
          a_out = Abs(t1)
        }
    """)
    vis = {n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("t1", "t2", "t3")}
    untyped = onnx.ValueInfoProto(name="t2", doc_string="a value_info entry without a type")
    # Out of topological order, with entries that describe an input, an initializer and an output, a
    # name nothing defines, a duplicate, and an entry without a type.
    proto.graph.value_info.extend([vis["t3"], helper.make_tensor_value_info("a_in", TensorProto.FLOAT, [2]),
                                   vis["t1"], helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]),
                                   helper.make_tensor_value_info("a_out", TensorProto.FLOAT, [2]),
                                   helper.make_tensor_value_info("nowhere", TensorProto.FLOAT, [2]),
                                   untyped, vis["t1"]])
    exported = assert_exact(proto, tmp_path)
    assert [i.name for i in exported.graph.input] == ["b_in", "a_in", "w"]
    assert [o.name for o in exported.graph.output] == ["z_out", "a_out", "b_in"]
    b = np.array([1, -1], np.float32)
    a = np.array([2, 3], np.float32)
    z, a_out, b_out = run(exported, {"b_in": b, "a_in": a})
    np.testing.assert_array_equal(z, np.maximum(-(a + [1, 2]) * b, 0))
    np.testing.assert_array_equal(b_out, b)


def test_output_that_is_an_input_keeps_its_own_value_info(tmp_path):
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    x_out = helper.make_tensor_value_info("x", TensorProto.FLOAT, None, doc_string="passed through")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x_in],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]), x_out, x_out])
    assert_exact(make_model(graph), tmp_path)


def test_initializer_that_is_also_a_graph_input(tmp_path):
    proto = parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x, float[2] bias) => (float[2] y) <float[2] bias = {10, 20}> {
          y = Add(x, bias)
        }
    """)
    exported = assert_exact(proto, tmp_path)
    model = from_proto(proto)
    bias = model.graph.initializers["bias"]
    assert model.graph.is_graph_input(bias) and model.graph.constant_array(bias) is None
    x = np.array([1, 2], np.float32)
    np.testing.assert_array_equal(run(exported, {"x": x})[0], [11, 22])
    np.testing.assert_array_equal(run(exported, {"x": x, "bias": x})[0], [2, 4])


def _every_attribute_type() -> list[onnx.AttributeProto]:
    t = numpy_helper.from_array(np.array([1.5, 2.5], np.float32), "t")
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([3.0], np.float32), "sv"),
                                       numpy_helper.from_array(np.array([1], np.int64), "si"), [4])
    sub = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "sub",
                            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                            [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    sub2 = helper.make_graph([helper.make_node("Neg", ["c"], ["d"])], "sub2",
                             [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])],
                             [helper.make_tensor_value_info("d", TensorProto.FLOAT, [1])])
    type_proto = helper.make_tensor_type_proto(TensorProto.INT64, ["N", 2])
    seq_type = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, None))
    attrs = [
        helper.make_attribute("f", 0.25),
        helper.make_attribute("i", -3),
        helper.make_attribute("s", b"text"),
        helper.make_attribute("t", t),
        helper.make_attribute("g", sub),
        helper.make_attribute("sparse", sparse),
        helper.make_attribute("tp", type_proto),
        helper.make_attribute("fs", [1.0, float("nan"), -0.0]),
        helper.make_attribute("is", [1, 2, 3]),
        helper.make_attribute("ss", [b"a", b""]),
        helper.make_attribute("ts", [t, t]),
        helper.make_attribute("gs", [sub, sub2]),
        helper.make_attribute("sparses", [sparse, sparse]),
        helper.make_attribute("tps", [type_proto, seq_type]),
        helper.make_attribute("empty_ints", [], attr_type=AttributeProto.INTS),
    ]
    attrs[0].doc_string = "attribute doc"
    return attrs


def test_node_attributes_of_every_type(tmp_path):
    attrs = _every_attribute_type()
    assert {a.type for a in attrs} == set(AttributeProto.AttributeType.values()) - {AttributeProto.UNDEFINED}
    node = helper.make_node("Custom", ["x"], ["y"], domain="com.acme", name="custom")
    node.attribute.extend(attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    proto = make_model(graph, opset_imports=OPSET + [helper.make_opsetid("com.acme", 1)])
    assert_exact(proto, tmp_path)
    model = from_proto(proto)
    custom = model.graph.nodes[0]
    assert list(custom.attrs) == [a.name for a in attrs]  # source order kept
    assert custom.attr("i") == -3 and custom.attr("s") == b"text" and custom.attr("is") == [1, 2, 3]
    assert [g.name for g in custom.attr("gs")] == ["sub", "sub2"] and custom.attr("g").name == "sub"
    assert len(list(model.graphs())) == 4


CONTROL_FLOW = """
<ir_version: 10, opset_import: ["" : 18]>
flow (float[3] x, bool c, int64 trip) => (float[3] out, float[3] loop_out, float[3] scan_last)
  <float[3] w = {1, 2, 3}> {
  k = Add(x, w)
  out = If <
    then_branch = then_g () => (float[3] t) {
      t = Mul(k, x)
    },
    else_branch = else_g () => (float[3] e) {
      inner_c = Constant <value = bool {1}> ()
      e = If <then_branch = deep_then () => (float[3] dt) { dt = Sub(k, w) },
              else_branch = deep_else () => (float[3] de) { de = Identity(x) }> (inner_c)
    }> (c)
  cond0 = Constant <value = bool {1}> ()
  loop_out = Loop <body = body_g (int64 i, bool cin, float[3] acc) => (bool cout, float[3] aout) {
      cout = Identity(cin)
      aout = Add(acc, k)
  }> (trip, cond0, x)
  xs = Unsqueeze(x, axes0)
  axes0 = Constant <value = int64[1] {0}> ()
  scan_last, scanned = Scan <num_scan_inputs = 1,
                             body = scan_g (float[3] state, float[3] item) => (float[3] state_out, float[3] item_out) {
      state_out = Add(state, item)
      item_out = Mul(item, w)
  }> (x, xs)
}
"""


def _control_flow_model() -> onnx.ModelProto:
    proto = parse(CONTROL_FLOW)
    # Node lists must be topologically sorted for an exact round trip: put axes0 before its reader.
    nodes = list(proto.graph.node)
    axes = next(n for n in nodes if n.output[0] == "axes0")
    nodes.remove(axes)
    nodes.insert(nodes.index(next(n for n in nodes if n.op_type == "Unsqueeze")), axes)
    proto.graph.ClearField("node")
    proto.graph.node.extend(nodes)
    return proto


def test_if_loop_scan_subgraphs_with_outer_scope_captures(tmp_path):
    proto = _control_flow_model()
    onnx.checker.check_model(proto, full_check=True)
    exported = assert_exact(proto, tmp_path)
    model = from_proto(proto)
    g = model.graph
    k = next(v for v in g.values() if v.name == "k")
    readers = {n.op_type for n in g.consumers(k)}
    assert readers == {"If", "Loop"}  # through capture edges
    x = np.array([1, -2, 3], np.float32)
    w = np.array([1, 2, 3], np.float32)
    for c in (True, False):
        out, loop_out, scan_last = run(exported, {"x": x, "c": np.array(c), "trip": np.array(2, np.int64)})
        np.testing.assert_array_equal(out, (x + w) * x if c else x)
        np.testing.assert_array_equal(loop_out, x + 2 * (x + w))
        np.testing.assert_array_equal(scan_last, x + x)


def test_sibling_subgraphs_may_reuse_local_names(tmp_path):
    # ONNX forbids shadowing an enclosing scope's name, not reusing a name in a sibling branch.
    proto = parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x, bool c) => (float[2] y) {
          y = If <then_branch = t () => (float[2] r) { tmp = Neg(x)  r = Abs(tmp) },
                  else_branch = e () => (float[2] r2) { tmp = Relu(x)  r2 = Abs(tmp) }> (c)
        }
    """)
    onnx.checker.check_model(proto, full_check=True)
    exported = assert_exact(proto, tmp_path)
    np.testing.assert_array_equal(run(exported, {"x": np.array([-1, 2], np.float32), "c": np.array(False)})[0],
                                  [0, 2])


def test_shadowing_an_enclosing_name_is_refused():
    proto = parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x, bool c) => (float[2] y) {
          a = Neg(x)
          y = If <then_branch = t () => (float[2] r) { a = Relu(x)  r = Abs(a) },
                  else_branch = e () => (float[2] r2) { r2 = Abs(x) }> (c)
        }
    """)
    with pytest.raises(ModelLoadError, match="shadows"):
        from_proto(proto)


def test_local_functions(tmp_path):
    body = [
        helper.make_node("Constant", [], ["alpha_t"], value_float=1.0, name="alpha_const"),
        helper.make_node("Mul", ["X", "alpha_t"], ["scaled"]),
        helper.make_node("LeakyRelu", ["scaled"], ["Y"], alpha=0.0),
    ]
    body[0].attribute[0].ClearField("f")
    body[0].attribute[0].ref_attr_name = "alpha"
    body[2].attribute[0].ClearField("f")
    body[2].attribute[0].ref_attr_name = "slope"
    fn = helper.make_function("com.acme", "ScaledLeaky", ["X"], ["Y"], body,
                              [helper.make_opsetid("", 18)], attributes=["alpha"], doc_string="function doc")
    fn.attribute_proto.append(helper.make_attribute("slope", 0.1))
    fn.value_info.extend([helper.make_tensor_value_info("scaled", TensorProto.FLOAT, None),
                          helper.make_tensor_value_info("X", TensorProto.FLOAT, None)])
    helper.set_metadata_props(fn, {"fn": "meta"})
    call = helper.make_node("ScaledLeaky", ["x"], ["y"], domain="com.acme", alpha=2.0, name="call")
    graph = helper.make_graph([call], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    proto = make_model(graph, opset_imports=OPSET + [helper.make_opsetid("com.acme", 1)], functions=[fn])
    onnx.checker.check_model(proto, full_check=True)
    exported = assert_exact(proto, tmp_path)
    model = from_proto(proto)
    assert len(model.functions) == 1 and model.functions[0].key == ("com.acme", "ScaledLeaky", "")
    assert [n.op_type for n in model.functions[0].graph.nodes] == ["Constant", "Mul", "LeakyRelu"]
    x = np.array([-1, 0, 2], np.float32)
    np.testing.assert_allclose(run(exported, {"x": x})[0], np.where(2 * x > 0, 2 * x, 0.1 * 2 * x))


def test_sparse_initializers(tmp_path):
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sp")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "sp_idx")
    sparse = helper.make_sparse_tensor(values, indices, [2, 2])
    dense = numpy_helper.from_array(np.ones((2, 2), np.float32), "d")
    graph = helper.make_graph([helper.make_node("Add", ["sp", "d"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
                              initializer=[dense], sparse_initializer=[sparse])
    proto = make_model(graph)
    exported = assert_exact(proto, tmp_path)
    model = from_proto(proto)
    np.testing.assert_array_equal(model.graph.constant_array(model.graph.sparse_initializers["sp"]), [[1, 0], [0, 2]])
    np.testing.assert_array_equal(run(exported, {})[0], [[2, 1], [1, 3]])


def test_training_info_and_unsorted_nodes(tmp_path):
    proto = parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y) {
          a = Relu(x)
          y = Neg(a)
        }
    """)
    proto.training_info.add().algorithm.name = "algo"
    proto.configuration.add(name="cfg")  # field 26: after functions (25) in the file
    assert_exact(proto, tmp_path)
    nodes = list(proto.graph.node)
    proto.graph.ClearField("node")
    proto.graph.node.extend(reversed(nodes))
    exported = round_trip(proto)  # not exact (the file was not sorted, as ONNX requires) but sorted now
    assert [n.op_type for n in exported.graph.node] == ["Relu", "Neg"]
    assert exported.training_info[0].algorithm.name == "algo"


# ===== files ===================================================================================================
def _cnn(size: int = 64) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((size, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, size, 1, 1)).astype(np.float32), "w2")
    b = numpy_helper.from_array(np.arange(8, dtype=np.float32), "b")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b"], ["c2"], name="conv2"),
             helper.make_node("Reshape", ["c2", "shape"], ["y"], name="flatten")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])],
                              initializer=[w1, w2, b, shape])
    return make_model(graph, producer_name="tests")


def test_save_and_load_round_trip_exactly(tmp_path):
    proto = _cnn()
    src = tmp_path / "cnn.onnx"
    src.write_bytes(proto.SerializeToString())
    model = load(src)
    assert not model.uses_external_data
    dst = tmp_path / "out" / "copy.onnx"
    dst.parent.mkdir()
    save(model, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dst.parent.iterdir()) == ["copy.onnx"]


def test_streamed_save_writes_exactly_what_to_proto_serializes(tmp_path):
    proto = _control_flow_model()
    proto.graph.initializer.append(numpy_helper.from_array(np.ones((40, 40), np.float32), "big"))
    proto.graph.node.append(helper.make_node("Identity", ["big"], ["big_out"]))
    proto.graph.output.append(helper.make_tensor_value_info("big_out", TensorProto.FLOAT, [40, 40]))
    proto.functions.append(helper.make_function("com.acme", "F", ["a"], ["b"], [helper.make_node("Neg", ["a"], ["b"])],
                                                OPSET))
    proto.opset_import.append(helper.make_opsetid("com.acme", 1))
    helper.set_metadata_props(proto, {"k": "v"})
    model = from_proto(proto)
    g = model.graph
    # Edited weights: a new one, a rewritten one, a renamed one.
    x = g.inputs[0]
    w_new = g.add_initializer(np.full(3, 7, np.float32), "w")
    g.add_node("Add", [x, w_new], name="extra")
    g.set_initializer_array(g.initializers["big"], np.zeros((40, 40), np.float32))
    g.rename_value(g.initializers["w"], "weights")
    path = tmp_path / "streamed.onnx"
    save(model, path)
    assert path.read_bytes() == to_proto(model).SerializeToString()
    assert load(path).graph.initializers["w_1"].array.tolist() == [7, 7, 7]


def test_external_data_save_and_load(tmp_path):
    proto = _cnn()
    model = from_proto(proto)
    path = tmp_path / "ext.onnx"
    save(model, path, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    assert path.stat().st_size < 4096 < (tmp_path / "ext.onnx.data").stat().st_size
    loaded = load(path)
    assert loaded.uses_external_data
    for name in ("w1", "w2", "b", "shape"):
        want = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))
        np.testing.assert_array_equal(loaded.graph.initializers[name].array, want)
    x = np.random.default_rng(1).standard_normal((1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(to_proto(loaded), {"x": x})[0], run(proto, {"x": x})[0])
    # A model loaded with external data is saved with external data again (default), data intact.
    again = tmp_path / "again" / "ext2.onnx"
    again.parent.mkdir()
    save(loaded, again)
    assert (again.parent / "ext2.onnx.data").exists()
    reloaded = load(again)
    np.testing.assert_array_equal(reloaded.graph.initializers["w1"].array, loaded.graph.initializers["w1"].array)
    # onnxruntime reads the saved pair from disk too.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(again), options, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], run(proto, {"x": x})[0])


def test_external_data_with_only_small_tensors_writes_no_data_file(tmp_path):
    proto = _cnn(4)
    save(from_proto(proto), tmp_path / "small.onnx", external_data=True, size_threshold=10**6)
    assert [p.name for p in tmp_path.iterdir()] == ["small.onnx"]
    assert (tmp_path / "small.onnx").read_bytes() == proto.SerializeToString()


def test_missing_external_data_file_is_a_load_error(tmp_path):
    path = tmp_path / "ext.onnx"
    save(from_proto(_cnn()), path, external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match="external data"):
        load(path)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    model = from_proto(_cnn())
    path = tmp_path / "m.onnx"
    save(model, path)
    save(model, path)  # overwriting works too
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    for external in (False, True):
        with pytest.raises(OSError, match="disk full"):
            save(model, tmp_path / "new.onnx", external_data=external)
        with pytest.raises(OSError, match="disk full"):
            save(model, path, external_data=external)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
        assert path.read_bytes() == before  # the old file is untouched


def test_save_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    model = from_proto(_cnn())
    monkeypatch.setattr(onnx.TensorProto, "SerializeToString", lambda self, **kw: 1 / 0, raising=False)
    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", lambda self, **kw: 1 / 0, raising=False)
    with pytest.raises(ZeroDivisionError):
        save(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_save_accepts_a_modelproto_without_touching_it(tmp_path):
    proto = _cnn()
    before = proto.SerializeToString()
    save(proto, tmp_path / "p.onnx", external_data=True)
    assert proto.SerializeToString() == before
    np.testing.assert_array_equal(load(tmp_path / "p.onnx").graph.initializers["w2"].array,
                                  numpy_helper.to_array(proto.graph.initializer[1]))


def test_weights_false_writes_data_less_stubs():
    proto = _cnn()
    model = from_proto(proto)
    stub = to_proto(model, weights=False)
    by_name = {t.name: t for t in stub.graph.initializer}
    w1 = by_name["w1"]  # 64*3*3*3 floats: a stub
    assert list(w1.dims) == [64, 3, 3, 3] and w1.data_type == TensorProto.FLOAT
    assert not w1.raw_data and not w1.float_data and w1.ByteSize() < 64
    # Small tensors and integer tensors stay whole (shape inference may read them).
    assert by_name["b"] == proto.graph.initializer[2] and by_name["shape"] == proto.graph.initializer[3]
    assert [t.name for t in stub.graph.initializer] == ["w1", "w2", "b", "shape"]
    inferred = onnx.shape_inference.infer_shapes(stub, strict_mode=True)
    assert inferred.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 128
    assert to_proto(model).SerializeToString() == proto.SerializeToString()  # the IR kept its weights


# ===== bad input ===============================================================================================
def test_load_missing_path_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="directory"):
        load(tmp_path)


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all\n", bytes(range(256)) * 4,
                                     b"\x08\x07", b"PK\x03\x04" + b"\x00" * 100])
def test_load_non_onnx_bytes(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_every_truncation_of_a_model_is_a_load_error(tmp_path):
    proto = _control_flow_model()
    proto.opset_import.append(helper.make_opsetid("com.acme", 1))
    proto.graph.node.append(helper.make_node("Custom", ["x"], ["custom_out"], domain="com.acme"))
    proto.graph.output.append(helper.make_tensor_value_info("custom_out", TensorProto.FLOAT, [3]))
    data = proto.SerializeToString()
    assert load_from(proto, tmp_path).node_count() > 0  # the whole file loads
    path = tmp_path / "cut.onnx"
    cuts = sorted(set(range(0, len(data), 7)) | set(range(len(data) - 40, len(data))))
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError):
            load(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_corrupt_bytes_load_or_raise_model_load_error(tmp_path, data):
    # Bytes flipped anywhere (names become invalid UTF-8, lengths lie, tags change...): either a model
    # that loads and exports, or ModelLoadError, never another exception.
    blob = bytearray(_corruption_target().SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(bytes(blob))
    try:
        model = load(path)
    except ModelLoadError:
        return
    to_proto(model)


def _corruption_target() -> onnx.ModelProto:
    node = helper.make_node("Custom", ["x"], ["y"], domain="com.acme", name="custom")
    node.attribute.extend(_every_attribute_type())
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return make_model(graph, opset_imports=OPSET + [helper.make_opsetid("com.acme", 1)])


def test_truncation_at_a_metadata_boundary_is_undetectable(tmp_path):
    # Protobuf has no length or checksum at the top level: a file cut exactly between two trailing
    # metadata entries is a complete, valid model with one entry less. Documented, not an error.
    proto = _cnn(4)
    helper.set_metadata_props(proto, {"a": "1", "b": "2"})
    data = proto.SerializeToString()
    last = onnx.ModelProto(metadata_props=[proto.metadata_props[-1]]).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[:-len(last)])
    assert [p.key for p in to_proto(load(path)).metadata_props] == ["a"]


def test_undefined_names_are_load_errors():
    proto = parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y) {
          y = Add(x, ghost)
        }
    """)
    with pytest.raises(ModelLoadError, match="reads 'ghost', which nothing defines"):
        from_proto(proto)
    proto = parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x, bool c) => (float[2] y) {
          y = If <then_branch = t () => (float[2] r) { r = Neg(phantom) },
                  else_branch = e () => (float[2] r2) { r2 = Abs(x) }> (c)
        }
    """)
    with pytest.raises(ModelLoadError, match="phantom"):
        from_proto(proto)
    proto = parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] nobody) {
          y = Neg(x)
        }
    """)
    with pytest.raises(ModelLoadError, match="graph output reads 'nobody'"):
        from_proto(proto)


def test_duplicate_definitions_are_load_errors():
    proto = parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y) {
          y = Neg(x)
          y = Abs(x)
        }
    """)
    with pytest.raises(ModelLoadError, match="defined twice"):
        from_proto(proto)


def test_node_domain_without_opset_import_is_a_load_error():
    proto = parse("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y) {
          y = com.acme.Custom(x)
        }
    """)
    with pytest.raises(ModelLoadError, match="com.acme"):
        from_proto(proto)


@pytest.mark.parametrize("field", ["node_name", "op_type", "domain", "value_name", "graph_name", "doc_string"])
def test_names_that_are_not_utf8_are_load_errors(tmp_path, field):
    # protobuf hands out bytes for a string field that is not UTF-8: the loader must say so, not crash later.
    marker = "qqqq"
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    opsets = list(OPSET)
    outputs = ["y"]
    graph_name, doc = "g", ""
    if field == "node_name":
        node.name = marker
    elif field == "op_type":
        node.op_type = marker
    elif field == "domain":
        node.domain = marker
        opsets.append(helper.make_opsetid(marker, 1))
    elif field == "value_name":
        node.output[0] = outputs[0] = marker
    elif field == "graph_name":
        graph_name = marker
    elif field == "doc_string":
        doc = marker
    graph = helper.make_graph([node], graph_name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info(outputs[0], TensorProto.FLOAT, [2])], doc_string=doc)
    blob = make_model(graph, opset_imports=opsets).SerializeToString()
    path = tmp_path / "bad_utf8.onnx"
    path.write_bytes(blob.replace(marker.encode(), b"\xe2qqq"))
    with pytest.raises(ModelLoadError, match="UTF-8"):
        load(path)


def test_a_value_info_entry_of_a_reshaped_initializer_follows_the_tensor():
    # the dynamo exporter lists initializers in value_info; a pruned weight must not keep its old dims there
    w = onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", None])], [w])
    graph.value_info.append(onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 3]))
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model = from_proto(proto)
    assert to_proto(model).graph.value_info[0] == proto.graph.value_info[0]  # untouched: verbatim
    model.graph.set_initializer_array(model.graph.initializers["w"], np.ones((4, 2), np.float32))
    out = to_proto(model)
    assert [d.dim_value for d in out.graph.value_info[0].type.tensor_type.shape.dim] == [4, 2]
    onnx.shape_inference.infer_shapes(out, strict_mode=True)
