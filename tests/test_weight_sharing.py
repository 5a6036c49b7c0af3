"""Weight sharing: k-means, centroid re-fit, packing, the pass (snap and compact) on small graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt.passes.lossy.weight_sharing as ws
from graphopt.compress import kmeans as km
from graphopt.compress.lstsq import CrossGram, penalised
from graphopt.core import onnx_io
from graphopt.core.manager import PassContext
from graphopt.measure.calibration import SampleData
from tests.util import init, make_model, op_types, run, tensor

# ----------------------------------------------------------------------------------------- k-means

@pytest.mark.parametrize("init_method", km.INITS)
def test_kmeans_finds_separated_clusters(init_method):
    rng = np.random.default_rng(0)
    centres = np.array([-2.0, -0.5, 0.7, 3.0])
    values = np.concatenate([c + 0.01 * rng.normal(size=200) for c in centres])
    got, labels = km.kmeans(values, 4, init=init_method, rng=np.random.default_rng(1))
    assert np.allclose(np.sort(got), centres, atol=0.01)
    assert np.all(np.abs(values - got[labels]) < 0.1)


def test_linear_and_density_inits():
    values = np.array([0.0, 0.1, 0.2, 0.3, 10.0])
    assert np.allclose(km.init_centroids(values, 3, "linear"), [0.0, 5.0, 10.0])
    assert np.allclose(km.init_centroids(values, 5, "density"), np.quantile(values, [0.1, 0.3, 0.5, 0.7, 0.9]))


def test_weighted_kmeans_centroid_is_the_weighted_mean():
    values = np.array([0.0, 1.0, 10.0])
    got, labels = km.kmeans(values, 2, importance=np.array([1.0, 3.0, 1.0]), init="linear")
    assert labels[0] == labels[1] != labels[2]
    assert got[labels[0]] == pytest.approx(0.75)


def test_refit_recovers_exact_centroids_and_bias():
    rng = np.random.default_rng(0)
    f, o = 12, 5
    true_c = np.array([-1.0, 0.25, 2.0])
    labels = rng.integers(-1, 3, size=(f, o))            # -1 = pruned (zero)
    w = np.where(labels >= 0, true_c[np.maximum(labels, 0)], 0.0)
    b = rng.normal(size=o)
    x = rng.normal(size=(300, f))
    g = CrossGram()
    g.update(x, x @ w + b)
    h, r, _ = penalised(g, w, b, ridge=0.0)
    c, bias = km.refit_centroids(h, r, labels, 3)
    np.testing.assert_allclose(c, true_c, atol=1e-6)
    np.testing.assert_allclose(bias, b, atol=1e-6)


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip(bits):
    idx = np.random.default_rng(bits).integers(0, 1 << bits, size=101)
    packed = ws.pack_indices(idx, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-101 // (8 // ws.container_bits(bits)))
    assert np.array_equal(ws.unpack_indices(packed, bits, 101), idx)


# ----------------------------------------------------------------------------------------- the pass

def _model(zeros=False, seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    if zeros:
        w1[rng.random(w1.shape) < 0.5] = 0
    w2 = rng.normal(size=(10, 8 * 6 * 6)).astype(np.float32) / 10
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c"], kernel_shape=[3, 3], name="conv"),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "W2", "B2"], ["y"], transB=1, name="fc")]
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 10])],
                      [init("W1", w1), init("B1", np.zeros(8, np.float32)), init("W2", w2),
                       init("B2", np.zeros(10, np.float32))])


def _data(n=96, seed=1):
    return SampleData({"x": np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)})


def _weight(proto, node_name):
    node = next(n for n in proto.graph.node if n.name == node_name)
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}[node.input[1]]


def _apply(proto, data=None, **opts):
    model = onnx_io.from_proto(proto)
    opts.setdefault("min_weights", 64)
    result = ws.WeightSharing().run(model, PassContext(options={"weight_sharing": opts}, data=data))
    out = onnx_io.to_proto(model)
    onnx.checker.check_model(out)
    return out, result


def test_snap_shares_values_and_keeps_zeros_exact():
    proto = _model(zeros=True)
    out, result = _apply(proto, bits=4)
    assert result.changed and op_types(out) == op_types(proto)
    w_old, w_new = _weight(proto, "conv"), _weight(out, "conv")
    assert np.array_equal(w_old == 0, w_new == 0)
    assert np.unique(w_new[w_new != 0]).size <= 15         # one of the 16 codes is the zero
    assert np.unique(_weight(out, "fc")).size <= 16
    x = _data().inputs["x"]
    a, b = run(proto, {"x": x})[0], run(out, {"x": x})[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.2


def test_refit_lowers_the_output_error():
    proto, data, held = _model(), _data(), _data(seed=5)
    errors = {}
    for refit in (False, True):
        out, result = _apply(proto, data if refit else None, bits=2, refit=refit)
        x = held.inputs["x"]
        a, b = run(proto, {"x": x})[0], run(out, {"x": x})[0]
        errors[refit] = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    assert errors[True] < errors[False]
    assert all(rec["rel_error_refit"] <= rec["rel_error_kmeans"] for rec in result.stats["layers"])


def test_compact_decodes_to_the_snapped_weights_exactly():
    proto = _model(zeros=True)
    snapped, _ = _apply(proto, bits=4)
    compact, result = _apply(proto, bits=4, encoding="compact", short_names=False)
    assert "Gather" in op_types(compact) and result.stats["shared"] == 2
    x = _data().inputs["x"]
    import onnxruntime as ort
    decoded = {n.input[1] for n in compact.graph.node if n.op_type in ("Conv", "Gemm")}
    exposed = onnx.ModelProto()
    exposed.CopyFrom(compact)
    for name in sorted(decoded):
        exposed.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        sess = ort.InferenceSession(exposed.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
        for node_name in ("conv", "fc"):
            name = next(n.input[1] for n in compact.graph.node if n.name == node_name)
            assert np.array_equal(outs[name], _weight(snapped, node_name))
        assert np.array_equal(outs["y"], run(snapped, {"x": x})[0]) or np.allclose(outs["y"], run(snapped, {"x": x})[0],
                                                                                  rtol=1e-5, atol=1e-5)
    assert compact.ByteSize() < proto.ByteSize() / 3


def test_small_and_shared_weights_are_left_alone():
    proto = _model()
    out, result = _apply(proto, bits=4, min_weights=10_000)
    assert not result.changed
    assert out.SerializeToString() == onnx_io.to_proto(onnx_io.from_proto(proto)).SerializeToString()
    reasons = {e["reason"] for e in result.stats["left_alone"]}
    assert any("min_weights" in r for r in reasons)
    # a weight read by two nodes is never rewritten
    w = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    shared = make_model([helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("MatMul", ["a", "W"], ["y"])],
                        [tensor("x", ["N", 16])], [tensor("y", ["N", 16])], [init("W", w)])
    out, result = _apply(shared, bits=2, min_weights=16)
    assert not result.changed and result.stats["left_alone"][0]["reason"] == "weight read by several nodes"


def test_compress_preset_prunes_then_shares():
    from graphopt.core.manager import build_pipeline, run_pipeline
    proto = _model()
    model = onnx_io.from_proto(proto)
    pipeline = build_pipeline("compress")
    ctx = PassContext(options={"sparsify": {"density": 0.3, "min_weights": 64, "splice_rounds": 1},
                               "weight_sharing": {"bits": 3, "min_weights": 64}}, data=_data())
    changed, records = run_pipeline(pipeline, model, ctx)
    names = [r.name for r in records]
    assert changed and names.index("sparsify") < names.index("weight_sharing")
    assert names[-1] == "dedupe_initializers" and "fold_constants" not in names[names.index("sparsify"):]
    out = onnx_io.to_proto(model)
    onnx.checker.check_model(out)
    for name in ("conv", "fc"):
        w = _weight(out, name)
        assert (w != 0).mean() == pytest.approx(0.3, abs=0.01)
        assert np.unique(w[w != 0]).size <= 7


def test_onnxruntime_folds_the_decoders_when_the_session_loads(tmp_path):
    import onnxruntime as ort
    compact, _ = _apply(_model(zeros=True), bits=4, encoding="compact")
    assert {"Cast", "Div", "Mod", "Gather"} <= set(op_types(compact))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(compact.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    folded = onnx.load(str(tmp_path / "optimized.onnx"))
    assert sorted(op_types(folded)) == sorted(op_types(_model()))   # only the model's own nodes remain


def test_compact_short_names_keep_the_interface_and_shrink_the_file():
    proto = _model(zeros=True)
    kept, _ = _apply(proto, bits=4, encoding="compact", short_names=False)
    short, result = _apply(proto, bits=4, encoding="compact")
    assert result.stats["renamed"]["nodes"] == len(short.graph.node)
    assert [i.name for i in short.graph.input] == [i.name for i in proto.graph.input]
    assert [o.name for o in short.graph.output] == [o.name for o in proto.graph.output]
    interface = {i.name for i in proto.graph.input} | {o.name for o in proto.graph.output}
    internal = {v for n in short.graph.node for v in list(n.input) + list(n.output)} - interface
    assert internal and all(v.startswith("t") and len(v) <= 4 for v in internal)
    assert op_types(short) == op_types(kept)
    assert short.ByteSize() < kept.ByteSize()
    x = _data().inputs["x"]
    assert np.array_equal(run(short, {"x": x})[0], run(kept, {"x": x})[0])


def test_one_decoder_serves_every_layer():
    compact, result = _apply(_model(zeros=True), bits=3, encoding="compact")
    types = op_types(compact)
    assert types.count("Cast") == 1 and types.count("Split") == 1 and types.count("Gather") == 2
    assert {rec["container_bits"] for rec in result.stats["layers"]} == {4}
