"""The ``simplify`` pass: shape no-ops removed, Transpose/Squeeze/Reshape pairs cancelled."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import helper

import graphopt.passes.lossless.simplify  # noqa: F401  (registers the pass)
from graphopt.core import onnx_io
from graphopt.core.manager import PassContext, get_pass
from tests.util import init, make_model, op_types, run, tensor

HEADER = '<ir_version: 8, opset_import: ["" : {opset}]>\n'


def parse(body: str, opset: int = 17) -> onnx.ModelProto:
    model = onnx.parser.parse_model(HEADER.format(opset=opset) + body)
    onnx.checker.check_model(model, full_check=True)
    return model


def simplify(proto: onnx.ModelProto):
    model = onnx_io.from_proto(proto)
    result = get_pass("simplify").run(model, PassContext())
    model.check_invariants()
    out = onnx_io.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return result, out


def assert_same(a: onnx.ModelProto, b: onnx.ModelProto, feeds) -> None:
    for x, y in zip(run(a, feeds), run(b, feeds), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def feeds_for(proto: onnx.ModelProto, batch: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for vi in proto.graph.input:
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        out[vi.name] = rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return out


# Each case: graph body, the rules expected to apply, the op types left, and the opset.
POSITIVE = {
    "transpose_pair_cancels": ("""
        g (float[2, 3, 4] x) => (float[2, 3, 4] y) {
            r = Relu(x)
            t = Transpose<perm = [1, 2, 0]>(r)
            y = Transpose<perm = [2, 0, 1]>(t)
        }""", {"transpose_pair": 1}, ["Relu"], 17),
    "transpose_pair_composes": ("""
        g (float[2, 3, 4] x) => (float[3, 4, 2] y) {
            t = Transpose<perm = [1, 0, 2]>(x)
            y = Transpose<perm = [0, 2, 1]>(t)
        }""", {"transpose_pair": 1}, ["Transpose"], 17),
    "transpose_pair_without_perms": ("""
        g (float[2, 3, 4] x) => (float[2, 3, 4] y) {
            r = Relu(x)
            t = Transpose(r)
            y = Transpose(t)
        }""", {"transpose_pair": 1}, ["Relu"], 17),
    "noop_transpose": ("""
        g (float[N, 3] x) => (float[N, 3] y) {
            t = Transpose<perm = [0, 1]>(x)
            y = Relu(t)
        }""", {"noop_transpose": 1}, ["Relu"], 17),
    "squeeze_unsqueeze": ("""
        g (float[2, 1, 4] x) => (float[2, 1, 4] y) <int64[1] a = {1}, int64[1] b = {-2}> {
            r = Relu(x)
            s = Squeeze(r, a)
            y = Unsqueeze(s, b)
        }""", {"squeeze_unsqueeze": 1}, ["Relu"], 17),
    "unsqueeze_squeeze_opset11": ("""
        g (float[N, 4] x) => (float[N, 4] y) {
            r = Relu(x)
            u = Unsqueeze<axes = [0, -1]>(r)
            y = Squeeze<axes = [-1, 0]>(u)
        }""", {"unsqueeze_squeeze": 1}, ["Relu"], 11),
    "unsqueeze_squeeze_without_axes": ("""
        g (float[2, 4] x) => (float[2, 4] y) <int64[1] a = {1}> {
            u = Unsqueeze(x, a)
            s = Squeeze(u)
            y = Relu(s)
        }""", {"unsqueeze_squeeze": 1}, ["Relu"], 17),
    "reshape_chain_resolves_zero": ("""
        g (float[N, 2, 6] x) => (float[N, 3, 2, 2] y) <int64[3] s1 = {0, 3, 4}, int64[4] s2 = {-1, 0, 2, 2}> {
            m = Reshape(x, s1)
            y = Reshape(m, s2)
        }""", {"reshape_chain": 1}, ["Reshape"], 17),
    "flatten_reshape_chain": ("""
        g (float[N, 2, 6] x) => (float[N, 3, 4] y) <int64[3] s = {-1, 3, 4}> {
            f = Flatten<axis = 1>(x)
            y = Reshape(f, s)
        }""", {"reshape_chain": 1}, ["Reshape"], 17),
    "noop_reshape_symbolic_batch": ("""
        g (float[N, 784] x) => (float[N, 784] y) <int64[2] s = {-1, 784}> {
            r = Reshape(x, s)
            y = Relu(r)
        }""", {"noop_reshape": 1}, ["Relu"], 17),
    "noop_reshape_static": ("""
        g (float[2, 3] x) => (float[2, 3] y) <int64[2] s = {2, 3}> {
            r = Reshape(x, s)
            y = Relu(r)
        }""", {"noop_reshape": 1}, ["Relu"], 17),
    "noop_cast_and_castlike": ("""
        g (float[2, 3] x, float[1] like) => (float[2, 3] y) {
            c = Cast<to = 1>(x)
            d = CastLike(c, like)
            y = Relu(d)
        }""", {"noop_cast": 2}, ["Relu"], 17),
    "noop_slice": ("""
        g (float[N, 5] x) => (float[N, 5] y)
          <int64[2] starts = {0, -7}, int64[2] ends = {9223372036854775807, 5}, int64[2] axes = {0, -1}> {
            s = Slice(x, starts, ends, axes)
            y = Relu(s)
        }""", {"noop_slice": 1}, ["Relu"], 17),
    "noop_expand": ("""
        g (float[3, 4] x) => (float[3, 4] y) <int64[2] shape = {1, 4}> {
            e = Expand(x, shape)
            y = Relu(e)
        }""", {"noop_expand": 1}, ["Relu"], 17),
    "noop_pad": ("""
        g (float[2, 3] x) => (float[2, 3] y) <int64[4] pads = {0, 0, 0, 0}> {
            p = Pad<mode = "reflect">(x, pads)
            y = Relu(p)
        }""", {"noop_pad": 1}, ["Relu"], 17),
    "single_concat_and_split": ("""
        g (float[2, 3] x) => (float[2, 3] y) {
            c = Concat<axis = 1>(x)
            s = Split<axis = 0>(c)
            y = Relu(s)
        }""", {"single_concat": 1, "single_split": 1}, ["Relu"], 17),
    "neutral_elements": ("""
        g (float[N, 4] x) => (float[N, 4] y)
          <float one = {1.0}, float[1, 4] ones = {1.0, 1.0, 1.0, 1.0}, float[4] zeros = {0.0, 0.0, 0.0, 0.0}> {
            a = Mul(x, one)
            b = Mul(ones, a)
            c = Add(zeros, b)
            d = Sub(c, zeros)
            e = Div(d, ones)
            y = Relu(e)
        }""", {"neutral_element": 5}, ["Relu"], 17),
}


@pytest.mark.parametrize("case", list(POSITIVE))
def test_rule_applies(case):
    body, applied, ops, opset = POSITIVE[case]
    proto = parse(body, opset)
    result, out = simplify(proto)
    assert result.changed and result.stats["applied"] == applied and result.stats["rewrites"] == sum(applied.values())
    assert op_types(out) == ops
    assert [o.name for o in out.graph.output] == [o.name for o in proto.graph.output]  # the interface survives
    assert_same(proto, out, feeds_for(proto))


def test_composed_transpose_perm():
    _, out = simplify(parse(POSITIVE["transpose_pair_composes"][0]))
    assert helper.get_attribute_value(out.graph.node[0].attribute[0]) == [1, 2, 0]
    assert out.graph.node[0].output[0] == "y"


def test_reshape_chain_writes_the_resolved_target():
    _, out = simplify(parse(POSITIVE["reshape_chain_resolves_zero"][0]))
    assert list(out.graph.node[0].input)[0] == "x"
    shapes = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in out.graph.initializer}
    assert shapes[out.graph.node[0].input[1]] == [-1, 3, 2, 2]  # the 0 copied the middle tensor's static 3
    assert sorted(shapes) == ["s1", "s2_1"]  # s1 is dead_code's to remove; s2 was replaced


def test_reshape_chain_writes_a_copied_dynamic_dim_as_minus_one():
    # [N, 6] -> [N, 2, 3] -> [0, 3, 2]: the 0 copies N; everything else is static with equal products (3·2 = 2·3)
    proto = parse("""
        g (float[N, 6] x) => (float[N, 3, 2] y) <int64[3] s1 = {-1, 2, 3}, int64[3] s2 = {0, 3, 2}> {
            m = Reshape(x, s1)
            r = Reshape(m, s2)
            y = Relu(r)
        }""")
    result, out = simplify(proto)
    assert result.stats["applied"] == {"reshape_chain": 1} and op_types(out) == ["Reshape", "Relu"]
    shapes = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in out.graph.initializer}
    assert shapes[out.graph.node[0].input[1]] == [-1, 3, 2]
    assert_same(proto, out, feeds_for(proto))


# Reshape targets computed from Shape (the shape of a batch-dynamic tensor re-assembled by the exporter).
RESHAPE_FROM_SHAPE = {
    # channel shuffle: [N, 4, 3, 3] -> [N, 2, 2, 3, 3]; the batch entry is x's own dim 0 -> 0
    "own_dim": ("""
        g (float[N, 4, 3, 3] x) => (float[N, 2, 2, 3, 3] y)
          <int64 zero = {0}, int64[1] ax = {0}, int64[4] rest = {2, 2, 3, 3}> {
            s = Shape(x)
            b = Gather(s, zero)
            u = Unsqueeze(b, ax)
            t = Concat<axis = 0>(u, rest)
            y = Reshape(x, t)
        }""", [0, 2, 2, 3, 3]),
    # the batch dim read from another tensor with the same symbol (attention heads: [N, 6, 8] -> [N, 6, 2, 4])
    "same_symbol": ("""
        g (float[N, 6, 8] x) => (float[N, 6, 2, 4] y)
          <int64[1] first = {0}, int64[1] second = {1}, int64[3] heads = {6, 2, 4}> {
            r = Relu(x)
            s = Shape(x)
            b = Slice(s, first, second)
            t = Concat<axis = 0>(b, heads)
            t2 = Concat<axis = 0>(t)
            y = Reshape(r, t2)
        }""", [0, 6, 2, 4]),
    # the dynamic dim moves: [4, N] -> [N, 4]; the element count proves -1 = N
    "moved_dim": ("""
        g (float[4, N] x) => (float[N, 4] y) <int64 one = {1}, int64[1] ax = {0}, int64[1] four = {4}> {
            s = Shape(x)
            n = Gather(s, one)
            u = Unsqueeze(n, ax)
            t = Concat<axis = 0>(u, four)
            y = Reshape(x, t)
        }""", [-1, 4]),
}


@pytest.mark.parametrize("case", list(RESHAPE_FROM_SHAPE))
def test_reshape_target_from_shape_becomes_constant(case):
    body, expected = RESHAPE_FROM_SHAPE[case]
    proto = parse(body)
    result, out = simplify(proto)
    assert result.stats["applied"].get("reshape_shape_target") == 1
    assert "Shape" not in op_types(out) and "Concat" not in op_types(out)  # the shape arithmetic is gone
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    target = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in out.graph.initializer}[reshape.input[1]]
    assert target == expected
    for batch in (1, 3):
        assert_same(proto, out, feeds_for(proto, batch))


@pytest.mark.parametrize("body", [
    # another tensor's symbolic dim, unrelated to x's
    """g (float[N, 4] x, float[M, 2] z) => (float[M, 8] y) <int64 zero = {0}, int64[1] ax = {0}, int64[1] e = {8}> {
            s = Shape(z)
            m = Gather(s, zero)
            u = Unsqueeze(m, ax)
            t = Concat<axis = 0>(u, e)
            y = Reshape(x, t)
        }""",
    # allowzero = 1: a copied dim cannot be written as 0
    """g (float[N, 4] x) => (float[N, 4] y) <int64 zero = {0}, int64[1] ax = {0}, int64[1] e = {4}> {
            s = Shape(x)
            m = Gather(s, zero)
            u = Unsqueeze(m, ax)
            t = Concat<axis = 0>(u, e)
            y = Reshape<allowzero = 1>(x, t)
        }""",
])
def test_reshape_target_from_shape_refused(body):
    proto = parse(body)
    result, out = simplify(proto)
    assert "reshape_shape_target" not in result.stats["applied"]
    assert out == proto


EXPAND_IDIOM = """
        g (float[N, 4] x) => (float[N, 1, 4] y)
          <int64 zero = {0}, int64[1] ax = {0}, int64[1] m1 = {-1}, int64[3] k = {-1, -1, -1},
           int64[3] ones = {1, 1, 1}, float[1, 1, 4] token = {1.0, 2.0, 3.0, 4.0}> {
            s = Shape(x)
            b = Gather(s, zero)
            u = Unsqueeze(b, ax)
            c = Concat<axis = 0>(u, m1, m1)
            e = Equal(c, k)
            w = Where(e, ones, c)
            y = Expand(token, w)
        }"""


def test_expand_shape_idiom_becomes_a_concat():
    # torch's x.expand(B, -1, -1): Where(Equal([B, -1, -1], -1), 1, [B, -1, -1]) is [B, 1, 1] (B >= 0 is no -1)
    proto = parse(EXPAND_IDIOM)
    result, out = simplify(proto)
    assert result.stats["applied"] == {"shape_where_equal": 1}
    assert "Where" not in op_types(out) and "Equal" not in op_types(out)
    for batch in (1, 3):
        assert_same(proto, out, feeds_for(proto, batch))


def test_expand_shape_idiom_with_a_possibly_equal_dim_is_refused():
    proto = parse(EXPAND_IDIOM.replace("k = {-1, -1, -1}", "k = {2, -1, -1}"))  # B == 2 is decided at run time
    result, out = simplify(proto)
    assert "shape_where_equal" not in result.stats["applied"] and out == proto


NEGATIVE = {
    "transpose_inner_read_elsewhere": """
        g (float[2, 3, 4] x) => (float[3, 4, 2] y, float[3, 2, 4] t) {
            t = Transpose<perm = [1, 0, 2]>(x)
            u = Transpose<perm = [0, 2, 1]>(t)
            y = Relu(u)
        }""",
    "input_to_output_bypass": """
        g (float[2, 3] x) => (float[2, 3] y) {
            y = Transpose<perm = [0, 1]>(x)
        }""",
    "squeeze_unsqueeze_other_axes": """
        g (float[2, 1, 1] x) => (float[2, 1, 1] y) <int64[1] a = {1}, int64[1] b = {2}> {
            s = Squeeze(x, a)
            u = Unsqueeze(s, b)
            y = Relu(u)
        }""",
    "squeeze_without_axes_symbolic": """
        g (float[N, 4] x) => (float[N, 4] y) <int64[1] a = {1}> {
            u = Unsqueeze(x, a)
            s = Squeeze(u)
            y = Relu(s)
        }""",
    "reshape_zero_copies_symbolic_dim": """
        g (float[N, 6] x) => (float[N, 6] y) <int64[3] s1 = {-1, 2, 3}, int64[2] s2 = {0, -1}> {
            m = Reshape(x, s1)
            y = Reshape(m, s2)
        }""",
    "reshape_minus_one_with_symbolic_other_dim": """
        g (float[N, 4] x) => (float[N, 4] y) <int64[2] s = {0, -1}> {
            r = Reshape(x, s)
            y = Relu(r)
        }""",
    "cast_changes_type": """
        g (float[2, 3] x) => (double[2, 3] y) {
            y = Cast<to = 11>(x)
        }""",
    "slice_of_symbolic_dim": """
        g (float[N, 5] x) => (float[M, 5] y) <int64[1] starts = {0}, int64[1] ends = {1000}> {
            s = Slice(x, starts, ends)
            y = Relu(s)
        }""",
    "expand_may_broadcast_symbolic_dim": """
        g (float[N, 4] x) => (float[2, 4] y) <int64[2] shape = {2, 4}> {
            e = Expand(x, shape)
            y = Relu(e)
        }""",
    "pad_not_zero": """
        g (float[2, 3] x) => (float[2, 5] y) <int64[4] pads = {0, 1, 0, 1}> {
            p = Pad(x, pads)
            y = Relu(p)
        }""",
    "neutral_constant_broadcasts": """
        g (float[4] x, float[N, K] z) => (float[3, 4] y, float[N, 4] w)
          <float[3, 4] ones = {1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0}, float[1, 4] zeros = {0.0, 0.0, 0.0, 0.0}> {
            m = Mul(x, ones)
            y = Relu(m)
            a = Add(z, zeros)
            w = Relu(a)
        }""",
    "not_neutral": """
        g (float[2, 4] x) => (float[2, 4] y) <float two = {2.0}, float zero = {0.0}> {
            m = Mul(x, two)
            d = Div(zero, m)
            y = Sub(zero, d)
        }""",
}


@pytest.mark.parametrize("case", list(NEGATIVE))
def test_rule_refuses(case):
    proto = parse(NEGATIVE[case])
    result, out = simplify(proto)
    assert not result.changed and result.stats["applied"] == {}
    assert out == proto


def reasons(result) -> set[tuple[str, str]]:
    return {(d["rule"], d["reason"]) for d in result.stats.get("left_alone", [])}


def test_refusals_are_reported_but_absent_patterns_are_not():
    result, _ = simplify(parse(NEGATIVE["reshape_zero_copies_symbolic_dim"]))
    assert reasons(result) == {("reshape_chain", "a 0 entry copies a non-static dim of the middle tensor")}
    result, _ = simplify(parse(NEGATIVE["input_to_output_bypass"]))
    assert reasons(result) == {("noop_transpose", "would rename a model output")}
    result, _ = simplify(parse(NEGATIVE["neutral_constant_broadcasts"]))
    assert reasons(result) == {("neutral_element", "broadcast meets a non-static dim")}  # x * ones[3, 4] is no match
    result, _ = simplify(parse(NEGATIVE["slice_of_symbolic_dim"]))
    assert reasons(result) == {("noop_slice", "bounds meet a non-static dim")}
    # Ordinary nodes (other axes, real pads, x * 2, a real Cast) are not "left alone": nothing to report.
    result, _ = simplify(parse(NEGATIVE["transpose_inner_read_elsewhere"]))
    assert reasons(result) == {("transpose_pair", "inner Transpose has other readers and the pair does not cancel")}
    for case in ("squeeze_unsqueeze_other_axes", "pad_not_zero", "not_neutral", "cast_changes_type"):
        assert "left_alone" not in simplify(parse(NEGATIVE[case]))[0].stats, case


def test_rules_inside_if_and_loop_bodies():
    then_g = helper.make_graph([helper.make_node("Cast", ["x"], ["xc"], to=onnx.TensorProto.FLOAT),
                                helper.make_node("Relu", ["xc"], ["t"])], "then", [], [tensor("t", [2, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e0"]), helper.make_node("Mul", ["e0", "one"], ["e"])],
                               "else", [], [tensor("e", [2, 4])], [init("one", np.array(1.0, np.float32))])
    body = helper.make_graph(
        [helper.make_node("Transpose", ["acc_in"], ["t1"], perm=[1, 0]),
         helper.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0]), helper.make_node("Exp", ["t2"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [tensor("i", [], onnx.TensorProto.INT64), tensor("cond_in", [], onnx.TensorProto.BOOL),
                 tensor("acc_in", [2, 4])], [tensor("cond_out", [], onnx.TensorProto.BOOL), tensor("acc_out", [2, 4])])
    proto = make_model([helper.make_node("If", ["c"], ["f"], then_branch=then_g, else_branch=else_g),
                        helper.make_node("Loop", ["n", "", "f"], ["y"], body=body)],
                       [tensor("x", [2, 4]), tensor("c", [], onnx.TensorProto.BOOL)], [tensor("y", [2, 4])],
                       [init("n", np.array(2, np.int64))])
    result, out = simplify(proto)
    assert result.stats["applied"] == {"neutral_element": 1, "noop_cast": 1, "transpose_pair": 1}
    attrs = {a.name: a.g for a in out.graph.node[0].attribute}
    assert [n.op_type for n in attrs["then_branch"].node] == ["Relu"]
    # The Mul produced the else branch's output; subgraph outputs are positional, so Neg's output takes the slot.
    assert [n.op_type for n in attrs["else_branch"].node] == ["Neg"] and attrs["else_branch"].output[0].name == "e0"
    assert [n.op_type for n in out.graph.node[1].attribute[0].g.node] == ["Exp", "Identity"]
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    for cond in (True, False):
        assert_same(proto, out, {"x": x, "c": np.array(cond)})
