"""The finetune pass's torch interpreter (compress/distill/ops.py, interpreter.py) equals onnxruntime,
op by op on small graphs and on the zoo models after the lossless preset."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from graphopt.app.api import optimize  # noqa: E402
from graphopt.compress.distill.interpreter import EngineError, TorchGraph  # noqa: E402
from graphopt.compress.distill.ops import OPS, unsupported_ops  # noqa: E402
from graphopt.core.onnx_io import from_proto  # noqa: E402
from graphopt.measure.calibration import load_data  # noqa: E402
from tests.util import IR_VERSION, init, make_model, run  # noqa: E402

R = np.random.default_rng(0)


def x(*shape):
    return R.normal(size=shape).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


# (id, op, feeds {name: array}, initializers {name: array}, attrs, outputs [(name, dtype)], opset)
# Every input named in ``feeds`` is a graph input; in ``inits`` an initializer; "" an omitted one.
CASES = [
    ("conv-asym-pads-group-dilation", "Conv", {"a": x(2, 4, 9, 8)}, {"w": x(6, 2, 3, 3), "b": x(6)},
     dict(pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2], group=2), None, 17),
    ("conv-same-upper", "Conv", {"a": x(1, 3, 7, 7)}, {"w": x(4, 3, 3, 3)}, dict(auto_pad="SAME_UPPER", strides=[2, 2]),
     None, 17),
    ("conv-1d", "Conv", {"a": x(2, 3, 10)}, {"w": x(5, 3, 3)}, dict(pads=[1, 1]), None, 17),
    ("conv-depthwise", "Conv", {"a": x(2, 4, 6, 6)}, {"w": x(4, 1, 3, 3), "b": x(4)}, dict(group=4, pads=[1, 1, 1, 1]),
     None, 17),
    ("conv-transpose", "ConvTranspose", {"a": x(2, 4, 5, 5)}, {"w": x(4, 3, 3, 3), "b": x(3)},
     dict(strides=[2, 2], pads=[1, 0, 1, 0], output_padding=[1, 1]), None, 17),
    ("gemm-trans-alpha-beta", "Gemm", {"a": x(5, 3)}, {"w": x(4, 5), "c": x(4)},
     dict(transA=1, transB=1, alpha=0.5, beta=2.0), None, 17),
    ("matmul-3d", "MatMul", {"a": x(2, 3, 4)}, {"w": x(4, 5)}, {}, None, 17),
    ("batchnorm", "BatchNormalization", {"a": x(2, 3, 4, 4)},
     {"s": x(3), "bb": x(3), "m": x(3), "v": np.abs(x(3)) + 0.5}, dict(epsilon=1e-3), None, 17),
    ("layernorm", "LayerNormalization", {"a": x(2, 3, 8)}, {"s": x(8), "bb": x(8)}, dict(axis=-1), None, 17),
    ("instancenorm", "InstanceNormalization", {"a": x(2, 3, 4, 4)}, {"s": x(3), "bb": x(3)}, {}, None, 17),
    ("maxpool-ceil-pads", "MaxPool", {"a": x(2, 3, 9, 9)}, {}, dict(kernel_shape=[3, 3], strides=[2, 2],
                                                                     pads=[1, 1, 1, 1], ceil_mode=1), None, 17),
    ("avgpool-exclude-pad", "AveragePool", {"a": x(2, 3, 8, 8)}, {}, dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
     None, 17),
    ("avgpool-include-pad", "AveragePool", {"a": x(2, 3, 8, 8)}, {},
     dict(kernel_shape=[2, 2], strides=[2, 2], count_include_pad=1), None, 17),
    ("gap", "GlobalAveragePool", {"a": x(2, 3, 5, 4)}, {}, {}, None, 17),
    ("gmp", "GlobalMaxPool", {"a": x(2, 3, 5, 4)}, {}, {}, None, 17),
    ("relu", "Relu", {"a": x(3, 4)}, {}, {}, None, 17),
    ("sigmoid", "Sigmoid", {"a": x(3, 4)}, {}, {}, None, 17),
    ("tanh", "Tanh", {"a": x(3, 4)}, {}, {}, None, 17),
    ("erf", "Erf", {"a": x(3, 4)}, {}, {}, None, 17),
    ("gelu", "Gelu", {"a": x(3, 4)}, {}, {}, None, 20),
    ("gelu-tanh", "Gelu", {"a": x(3, 4)}, {}, dict(approximate="tanh"), None, 20),
    ("clip", "Clip", {"a": x(3, 4)}, {"lo": np.array(0, np.float32), "hi": np.array(0.5, np.float32)}, {}, None, 17),
    ("clip-opset6", "Clip", {"a": x(3, 4)}, {}, dict(min=-0.2, max=0.3), None, 6),
    ("leakyrelu", "LeakyRelu", {"a": x(3, 4)}, {}, dict(alpha=0.2), None, 17),
    ("hardsigmoid", "HardSigmoid", {"a": x(3, 4)}, {}, {}, None, 17),
    ("hardswish", "HardSwish", {"a": x(3, 4)}, {}, {}, None, 17),
    ("prelu", "PRelu", {"a": x(2, 3, 4)}, {"slope": x(3, 1)}, {}, None, 17),
    ("softmax-axis1", "Softmax", {"a": x(2, 3, 4)}, {}, dict(axis=1), None, 17),
    ("softmax-opset11", "Softmax", {"a": x(2, 3, 4)}, {}, dict(axis=1), None, 11),
    ("logsoftmax", "LogSoftmax", {"a": x(2, 5)}, {}, {}, None, 17),
    ("add-broadcast", "Add", {"a": x(2, 3, 4)}, {"b": x(3, 1)}, {}, None, 17),
    ("sub", "Sub", {"a": x(2, 3)}, {"b": x(3)}, {}, None, 17),
    ("mul", "Mul", {"a": x(2, 3)}, {"b": x(2, 1)}, {}, None, 17),
    ("div", "Div", {"a": x(2, 3)}, {"b": np.abs(x(3)) + 1}, {}, None, 17),
    ("div-int", "Div", {"a": i64(7, -7, 9)}, {"b": i64(2, 2, -4)}, {}, [("y", TensorProto.INT64)], 17),
    ("mod-int", "Mod", {"a": i64(7, -7, 9)}, {"b": i64(2, 3, -4)}, {}, [("y", TensorProto.INT64)], 17),
    ("mod-fmod", "Mod", {"a": x(2, 3)}, {"b": np.abs(x(3)) + 0.5}, dict(fmod=1), None, 17),
    ("pow", "Pow", {"a": np.abs(x(2, 3)) + 0.1}, {"b": np.array(2.0, np.float32)}, {}, None, 17),
    ("sqrt", "Sqrt", {"a": np.abs(x(2, 3))}, {}, {}, None, 17),
    ("max", "Max", {"a": x(2, 3), "b": x(2, 3)}, {}, {}, None, 17),
    ("min", "Min", {"a": x(2, 3), "b": x(1, 3)}, {}, {}, None, 17),
    ("reshape-zero-minus-one", "Reshape", {"a": x(2, 3, 4)}, {"s": i64(0, -1)}, {}, None, 17),
    ("flatten-axis2", "Flatten", {"a": x(2, 3, 4, 5)}, {}, dict(axis=2), None, 17),
    ("transpose", "Transpose", {"a": x(2, 3, 4)}, {}, dict(perm=[2, 0, 1]), None, 17),
    ("concat", "Concat", {"a": x(2, 3), "b": x(2, 2)}, {}, dict(axis=1), None, 17),
    ("split-sizes", "Split", {"a": x(2, 7)}, {"s": i64(3, 4)}, dict(axis=1), [("y", 1), ("z", 1)], 17),
    ("split-even", "Split", {"a": x(6, 2)}, {}, {}, [("y", 1), ("z", 1), ("w", 1)], 17),
    ("slice-neg-step", "Slice", {"a": x(5, 6)}, {"st": i64(-1, 1), "en": i64(-10, 5), "ax": i64(0, 1),
                                                 "sp": i64(-2, 2)}, {}, None, 17),
    ("slice-clamped", "Slice", {"a": x(5, 6)}, {"st": i64(1), "en": i64(1000), "ax": i64(-1)}, {}, None, 17),
    ("gather-neg", "Gather", {"a": x(3, 5)}, {"i": i64(-1, 0, 2)}, dict(axis=1), None, 17),
    ("gather-2d-idx", "Gather", {"a": x(6, 4)}, {"i": np.array([[0, 5], [2, 2]], np.int64)}, {}, None, 17),
    ("squeeze", "Squeeze", {"a": x(2, 1, 3, 1)}, {"ax": i64(1, -1)}, {}, None, 17),
    ("unsqueeze", "Unsqueeze", {"a": x(2, 3)}, {"ax": i64(0, -1)}, {}, None, 17),
    ("shape-start", "Shape", {"a": x(2, 3, 4)}, {}, dict(start=1), [("y", TensorProto.INT64)], 17),
    ("cast", "Cast", {"a": x(2, 3) * 5}, {}, dict(to=TensorProto.INT64), [("y", TensorProto.INT64)], 17),
    ("expand", "Expand", {"a": x(3, 1)}, {"s": i64(2, 3, 4)}, {}, None, 17),
    ("tile", "Tile", {"a": x(2, 3)}, {"r": i64(2, 1)}, {}, None, 17),
    ("constant-of-shape", "ConstantOfShape", {}, {"s": i64(2, 3)},
     dict(value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.5])), None, 17),
    ("range", "Range", {}, {"a": np.array(1, np.int64), "b": np.array(9, np.int64), "c": np.array(3, np.int64)}, {},
     [("y", TensorProto.INT64)], 17),
    ("pad-constant", "Pad", {"a": x(1, 2, 3, 3)}, {"p": i64(0, 0, 1, 2, 0, 0, 2, 1), "v": np.array(0.5, np.float32)},
     {}, None, 17),
    ("pad-reflect", "Pad", {"a": x(1, 2, 4, 4)}, {"p": i64(0, 0, 1, 2, 0, 0, 2, 1)}, dict(mode="reflect"), None, 17),
    ("resize-nearest", "Resize", {"a": x(1, 2, 3, 4)}, {"roi": np.zeros(0, np.float32),
                                                        "sc": np.array([1, 1, 2, 2], np.float32)},
     dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), None, 17),
    ("resize-linear", "Resize", {"a": x(1, 2, 3, 4)}, {"roi": np.zeros(0, np.float32),
                                                       "sc": np.array([1, 1, 2, 2], np.float32)},
     dict(mode="linear"), None, 17),
    ("resize-linear-sizes-align", "Resize", {"a": x(1, 2, 3, 4)}, {"roi": "", "sc": "", "sz": i64(1, 2, 5, 7)},
     dict(mode="linear", coordinate_transformation_mode="align_corners"), None, 17),
    ("reducemean-18", "ReduceMean", {"a": x(2, 3, 4)}, {"ax": i64(-1)}, {}, None, 18),
    ("reducesum-nokeep", "ReduceSum", {"a": x(2, 3, 4)}, {"ax": i64(0, 2)}, dict(keepdims=0), None, 17),
    ("where", "Where", {"c": np.array([[True, False, True]]), "a": x(2, 3), "b": x(2, 3)}, {}, {}, None, 17),
    ("equal", "Equal", {"a": i64(1, 2, 3)}, {"b": i64(1, 0, 3)}, {}, [("y", TensorProto.BOOL)], 17),
    ("identity", "Identity", {"a": x(2, 3)}, {}, {}, None, 17),
    ("dropout", "Dropout", {"a": x(2, 3)}, {}, {}, None, 17),
]


def _case_model(op, feeds, inits, attrs, outputs, opset):
    names = list(feeds) + list(inits)
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
              for k, v in feeds.items()]
    initializers = [init(k, v) for k, v in inits.items() if not isinstance(v, str)]
    node_inputs = ["" if isinstance(inits.get(k), str) else k for k in names]
    outputs = outputs or [("y", TensorProto.FLOAT)]
    node = helper.make_node(op, node_inputs, [name for name, _ in outputs], **attrs)
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT if t == 1 else t, None) for name, t in outputs]
    graph = helper.make_graph([node], "case", inputs, outs, initializers)
    # outputs without shapes: the full checker wants them, onnxruntime does not
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def _torch_outputs(proto, feeds):
    graph = TorchGraph(from_proto(proto), {})
    with torch.no_grad():
        out = graph({k: torch.from_numpy(v) for k, v in feeds.items()})
    return [out[o.name].numpy() for o in proto.graph.output]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_op_equals_onnxruntime(case):
    _, op, feeds, inits, attrs, outputs, opset = case
    proto = _case_model(op, feeds, inits, attrs, outputs, opset)
    want = run(proto, feeds)
    got = _torch_outputs(proto, feeds)
    assert len(got) == len(want)
    for a, b in zip(want, got):
        assert a.shape == b.shape, (a.shape, b.shape)
        if a.dtype.kind in "ib":
            np.testing.assert_array_equal(b.astype(a.dtype), a)
        else:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_every_op_in_the_table_has_a_case():
    tested = {c[1] for c in CASES}
    # trivial element-wise wrappers of one torch function each, and Constant (folded by every preset)
    untested = set(OPS) - tested - {"Neg", "Abs", "Exp", "Log", "Reciprocal", "Sum", "Less", "Greater", "Not", "And",
                                    "Or", "Elu", "Softplus", "ReduceMax", "ReduceMin", "Constant"}
    assert not untested, f"no equality case for {sorted(untested)}"


ZOO = ["vgg", "resnet", "mobilenetv2", "senet", "shufflenet", "inception", "transformer", "lenet5"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_models_after_the_lossless_preset_equal_onnxruntime(name):
    path = f"models/{name}.onnx"
    proto = optimize(path, preset="lossless", run_verify=False).model
    assert unsupported_ops(from_proto(proto)) == []
    feeds = load_data("models/fmnist_eval.npz", proto).head(8).feed(0, 8)
    want = run(proto, feeds)[0]
    got = _torch_outputs(proto, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_unknown_ops_are_named_not_run():
    proto = make_model([helper.make_node("LSTM", ["a", "w", "r"], ["y"], hidden_size=2),
                        helper.make_node("Relu", ["y"], ["z"])],
                       [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 1, 2])],
                       [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 1, 1, 2])],
                       [init("w", x(1, 8, 2)), init("r", x(1, 8, 2))])
    assert unsupported_ops(from_proto(proto)) == ["LSTM"]


def test_unsupported_attributes_raise_an_engine_error_naming_the_node():
    proto = _case_model("MaxPool", {"a": x(1, 1, 4, 4)}, {}, dict(kernel_shape=[2, 2]),
                        [("y", 1), ("idx", TensorProto.INT64)], 17)
    with pytest.raises(EngineError, match="MaxPool node"):
        _torch_outputs(proto, {"a": x(1, 1, 4, 4)})
