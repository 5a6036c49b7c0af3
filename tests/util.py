"""Helpers shared by the test modules: build small models, run them in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
from onnx import helper

IR_VERSION = 8  # onnx 1.23 stamps 14 by default; onnxruntime 1.31 reads at most 13


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, **graph_kwargs) -> onnx.ModelProto:
    """A checker-valid ModelProto with an IR version onnxruntime reads."""
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers), **graph_kwargs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def parse(text: str) -> onnx.ModelProto:
    """A model from ONNX text format, with an IR version onnxruntime reads."""
    model = onnx.parser.parse_model(text)
    model.ir_version = 10
    return model


def tensor(name: str, shape, dtype=onnx.TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name: str, array) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(array), name)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` in onnxruntime with graph optimizations off."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def apply_pass(pass_name: str, proto: onnx.ModelProto, **options):
    """Run the registered pass ``pass_name`` (with ``options``) on a copy of ``proto``; check the IR's
    invariants and the full onnx checker on the result. Returns ``(PassResult, ModelProto)``."""
    from graphopt.core import onnx_io
    from graphopt.core.manager import PassContext, get_pass

    model = onnx_io.from_proto(proto)
    result = get_pass(pass_name).run(model, PassContext(options={pass_name: options} if options else {}))
    model.check_invariants()
    out = onnx_io.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return result, out


def assert_outputs_close(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray],
                         *, rtol: float = 1e-5, atol: float = 1e-5, of_range: bool = False,
                         exact: bool = False) -> None:
    """The one output comparison of the tests: both models in onnxruntime (optimizations off) on
    ``feeds``, same number of outputs, same shapes and dtypes, values within ``atol + rtol·|ref|``;
    ``of_range``: ``atol`` is relative to the output's range (``max|ref|``, at least 1), as deep
    models' float noise is; ``exact``: bit for bit, NaNs equal."""
    want, got = run(reference, feeds), run(candidate, feeds)
    assert len(want) == len(got), f"{len(want)} outputs != {len(got)}"
    for i, (a, b) in enumerate(zip(want, got)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"output {i}: {a.shape} {a.dtype} != {b.shape} {b.dtype}"
        if exact:
            np.testing.assert_array_equal(a, b, err_msg=f"output {i}")
        else:
            scale = max(float(np.abs(a).max()), 1.0) if of_range and a.size else 1.0
            np.testing.assert_allclose(b, a, rtol=rtol, atol=atol * scale, err_msg=f"output {i}")
