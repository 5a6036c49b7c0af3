"""The ``fuse_patterns`` pass (decomposed LayerNorm / GELU -> standard ops) and the protection of those chains."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

import graphopt.passes.lossless.fusion  # noqa: F401  (registers the pass)
from tests.util import apply_pass as apply
from tests.util import assert_outputs_close, op_types, run

HEADER = '<ir_version: 8, opset_import: ["" : {opset}]>\n'
RNG = np.random.default_rng(0)


def parse(body: str, opset: int) -> onnx.ModelProto:
    model = onnx.parser.parse_model(HEADER.format(opset=opset) + body)
    onnx.checker.check_model(model, full_check=True)
    return model


def assert_close(a: onnx.ModelProto, b: onnx.ModelProto, shape=(3, 5, 8)) -> None:
    assert_outputs_close(a, b, {"x": RNG.standard_normal(shape).astype(np.float32) * 3}, rtol=1e-5, atol=1e-5)


def layer_norm(opset: int, affine: bool = True, axes: str = "-1", square: str = "Pow(d, two)") -> onnx.ModelProto:
    reduce = (f"ReduceMean<axes = [{axes}]>" if opset < 18 else "ReduceMean")
    axes_in = "" if opset < 18 else ", ax"
    tail = """
            g = Mul(n, gamma)
            y = Add(g, beta)""" if affine else """
            y = Identity(n)"""
    return parse(f"""
        g (float[N, 5, 8] x) => (float[N, 5, 8] y)
          <float two = {{2.0}}, float eps = {{1e-5}}, int64[1] ax = {{{axes}}},
           float[8] gamma = {{1.0, 2.0, 0.5, -1.0, 3.0, 0.25, 1.5, -2.0}},
           float[8] beta = {{0.1, 0.2, 0.3, 0.4, -0.5, 0.6, 0.7, 0.8}}> {{
            m = {reduce}(x{axes_in})
            d = Sub(x, m)
            q = {square}
            v = {reduce}(q{axes_in})
            e = Add(v, eps)
            s = Sqrt(e)
            n = Div(d, s){tail}
        }}""", opset)


GELU_ERF = """
        g (float[N, 5, 8] x) => (float[N, 5, 8] y) <float rt2 = {1.4142135381698608}, float one = {1.0},
                                                   float half = {0.5}> {
            a = Div(x, rt2)
            e = Erf(a)
            b = Add(e, one)
            m = Mul(x, b)
            y = Mul(m, half)
        }"""
GELU_ERF_REGROUPED = """
        g (float[N, 5, 8] x) => (float[N, 5, 8] y) <float inv = {0.7071067690849304}, float one = {1.0},
                                                   float half = {0.5}> {
            h = Mul(half, x)
            a = Mul(x, inv)
            e = Erf(a)
            b = Add(one, e)
            y = Mul(h, b)
        }"""
GELU_TANH = """
        g (float[N, 5, 8] x) => (float[N, 5, 8] y) <float three = {3.0}, float c = {0.044715},
                 float k = {0.7978845834732056}, float one = {1.0}, float half = {0.5}> {
            p = Pow(x, three)
            q = Mul(p, c)
            r = Add(x, q)
            u = Mul(r, k)
            t = Tanh(u)
            b = Add(t, one)
            m = Mul(x, b)
            y = Mul(m, half)
        }"""


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("opset", [17, 18])
def test_layer_norm_fused(opset, affine):
    proto = layer_norm(opset, affine)
    result, out = apply("fuse_patterns", proto)
    assert result.changed and result.stats["applied"] == {"layer_norm": 1}
    ops = op_types(out)
    assert ops[0] == "LayerNormalization" and set(ops) <= {"LayerNormalization", "Identity"}
    assert [o.name for o in out.graph.output] == ["y"]
    assert_close(proto, out)


def test_layer_norm_with_mul_square_and_two_axes():
    proto = layer_norm(17, True, axes="-2, -1", square="Mul(d, d)")
    # gamma/beta of shape [8] broadcast over the normalised [5, 8]
    result, out = apply("fuse_patterns", proto)
    assert result.stats["applied"] == {"layer_norm": 1}
    ln = next(n for n in out.graph.node if n.op_type == "LayerNormalization")
    assert onnx.helper.get_attribute_value(next(a for a in ln.attribute if a.name == "axis")) == -2
    assert_close(proto, out)


@pytest.mark.parametrize("proto", [
    layer_norm(17, axes="1"),          # not the trailing axis
    layer_norm(11),                    # LayerNormalization does not exist at opset 11
], ids=["middle_axis", "opset11"])
def test_layer_norm_refused(proto):
    result, out = apply("fuse_patterns", proto)
    assert not result.changed and out == proto


@pytest.mark.parametrize("body, approximate", [(GELU_ERF, None), (GELU_ERF_REGROUPED, None), (GELU_TANH, b"tanh")],
                         ids=["erf", "erf_regrouped", "tanh"])
def test_gelu_fused_at_opset_20(body, approximate):
    proto = parse(body, 20)
    result, out = apply("fuse_patterns", proto)
    assert result.stats["applied"] == {"gelu": 1}
    assert op_types(out) == ["Gelu"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert attrs.get("approximate") == approximate
    assert_close(proto, out)


def test_gelu_left_alone_below_opset_20_and_with_wrong_constants():
    result, out = apply("fuse_patterns", parse(GELU_ERF, 17))
    assert not result.changed
    wrong = parse(GELU_ERF.replace("half = {0.5}", "half = {0.6}"), 20)
    result, out = apply("fuse_patterns", wrong)
    assert not result.changed and out == wrong


def followed_by_matmul(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with its output ``y`` fed to a MatMul by a constant [8, 4] weight (the new output ``z``)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    out.graph.initializer.append(onnx.numpy_helper.from_array(RNG.standard_normal((8, 4)).astype(np.float32), "w"))
    out.graph.node.append(onnx.helper.make_node("MatMul", ["y", "w"], ["z"]))
    del out.graph.output[:]
    out.graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 5, 4]))
    onnx.checker.check_model(out, full_check=True)
    return out


@pytest.mark.parametrize("proto", [followed_by_matmul(parse(GELU_ERF, 17)), followed_by_matmul(layer_norm(11))],
                         ids=["gelu", "layer_norm"])
def test_fold_affine_keeps_gelu_and_layer_norm_chains(proto):
    # The 0.5 of a GELU and the beta of a LayerNorm would fold exactly into the MatMul after them, but
    # onnxruntime would then no longer run the chain as one fused kernel: fold_affine leaves them alone.
    result, out = apply("fold_affine", proto)
    assert not result.changed and out == proto
    reasons = [r["reason"] for r in result.stats.get("left_alone", [])]
    assert any("decomposed" in r for r in reasons), reasons


def test_fold_affine_still_folds_a_scale_outside_such_chains():
    proto = followed_by_matmul(parse("""
        g (float[N, 5, 8] x) => (float[N, 5, 8] y) <float half = {0.5}> {
            r = Relu(x)
            y = Mul(r, half)
        }""", 17))
    result, out = apply("fold_affine", proto)
    assert result.changed and op_types(out) == ["Relu", "MatMul"]
    assert_close(proto, out)


CLS_TOKEN = """
        g (float[N, 4, 8] x) => (float[N, 5, 8] y)
          <float[1, 1, 8] cls = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}, int64[1] zero = {0},
           int64[1] one = {1}, int64[2] ones = {1, 1}, float[1, 5, 8] pos = {POS}> {
            n = Shape(x)
            b = Slice(n, zero, one)
            s = Concat<axis = 0>(b, ones)
            e = Expand(cls, s)
            c = Concat<axis = 1>(e, x)
            y = Add(c, pos)
        }""".replace("POS", ", ".join(str(0.1 * i) for i in range(40)))


def test_add_through_concat_folds_into_the_expanded_token():
    # [cls; x] + pos = [cls + pos[:, :1]; x + pos[:, 1:]]: the token absorbs its row, the Add shrinks by one row
    proto = parse(CLS_TOKEN, 17)
    result, out = apply("fuse_patterns", proto)
    assert result.stats["applied"] == {"add_through_concat": 1}
    assert op_types(out)[-3:] == ["Expand", "Add", "Concat"]
    assert [o.name for o in out.graph.output] == ["y"]
    feeds = {"x": RNG.standard_normal((3, 4, 8)).astype(np.float32)}
    for a, b in zip(run(proto, feeds), run(out, feeds), strict=True):
        np.testing.assert_array_equal(a, b)  # each element gets the same single addition


def test_add_through_concat_needs_a_piece_that_absorbs():
    proto = parse("""
        g (float[N, 4, 8] x, float[N, 1, 8] t) => (float[N, 5, 8] y) <float[8] bias = {1, 2, 3, 4, 5, 6, 7, 8}> {
            c = Concat<axis = 1>(t, x)
            y = Add(c, bias)
        }""", 17)
    result, out = apply("fuse_patterns", proto)
    assert not result.changed and out == proto
