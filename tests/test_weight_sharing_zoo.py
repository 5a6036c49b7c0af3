"""Weight sharing on a zoo model: the compact encoding is valid, small, and decodes to the snapped weights exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from graphopt.core import onnx_io
from graphopt.core.manager import PassContext
from graphopt.measure.calibration import load_data
from graphopt.passes.lossy.weight_sharing import WeightSharing

MODELS = Path(__file__).resolve().parents[1] / "models"


def _share(path: Path, **opts) -> tuple[onnx.ModelProto, dict]:
    model = onnx_io.load(path)
    result = WeightSharing().run(model, PassContext(options={"weight_sharing": {"bits": 4, **opts}}))
    return onnx_io.to_proto(model), result.stats


def _session(proto: onnx.ModelProto, level) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["vgg"])
def test_compact_zoo_model_is_valid_small_and_exact(name):
    path = MODELS / f"{name}.onnx"
    original = onnx.load(str(path))
    snapped, _ = _share(path)
    compact, stats = _share(path, encoding="compact")
    onnx.checker.check_model(compact)
    assert stats["shared"] >= 5
    assert compact.ByteSize() * 6 < original.ByteSize()

    # the decoded weights, exposed as outputs, equal the snapped initializers bit for bit
    snapped_inits = {t.name: onnx.numpy_helper.to_array(t) for t in snapped.graph.initializer}
    # the compact file renames nodes and internal values (short names): pair the layers by position
    layers_c = [n for n in compact.graph.node if n.op_type in ("Conv", "Gemm")]
    layers_s = [n for n in snapped.graph.node if n.op_type in ("Conv", "Gemm")]
    assert [n.op_type for n in layers_c] == [n.op_type for n in layers_s]
    pairs = [(cn.input[1], sn.input[1]) for cn, sn in zip(layers_c, layers_s)]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(compact)
    for decoded, _ in pairs:
        if decoded not in {t.name for t in compact.graph.initializer}:
            exposed.graph.output.append(helper.make_tensor_value_info(decoded, onnx.TensorProto.FLOAT, None))
    data = load_data(MODELS / "fmnist_eval.npz", original)
    x = data.inputs["input"][:16]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        sess = _session(exposed, level)
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
        checked = 0
        for decoded, snapped_name in pairs:
            if decoded in outs:
                assert np.array_equal(outs[decoded], snapped_inits[snapped_name])
                checked += 1
        assert checked == stats["shared"]
        reference = _session(snapped, level).run(None, {"input": x})[0]
        assert np.array_equal(outs["logits"], reference)
