"""Tests for graphopt.measure.calibration: sample data, random data, streaming statistics, the Calibrator."""

from __future__ import annotations

import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.errors import DataError, GraphoptError
from graphopt.core.onnx_io import from_proto
from graphopt.measure import ort as gort
from graphopt.measure.calibration import (
    Calibrator,
    ChannelStats,
    Gram,
    Moments,
    SampleData,
    check_data,
    feed_batch_size,
    load_data,
    parse_input_shapes,
    random_data,
    reference_outputs,
)

# ---------------------------------------------------------------------------------------------
# models


def _model(nodes, inputs, outputs, initializers=(), ir_version=8, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version  # onnx 1.23 stamps 14, which onnxruntime 1.31 rejects
    return model


def conv_model(channels: int = 4, batch: int | str = "N") -> onnx.ModelProto:
    """x[N,3,5,5] -> Conv 1x1 (conv_out) -> Relu (relu_out) -> GAP -> Flatten -> Gemm -> logits[N,3]."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((channels, 3, 1, 1)).astype(np.float32)
    b = rng.standard_normal(channels).astype(np.float32)
    fc = rng.standard_normal((3, channels)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["conv_out"], name="conv"),
        helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu_out"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "FC"], ["logits"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B"), numpy_helper.from_array(fc, "FC")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 5, 5])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])], inits)


def conv_numpy(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The 1x1 conv of :func:`conv_model`, in numpy (float64)."""
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    return np.einsum("oc,nchw->nohw", inits["W"][:, :, 0, 0], x.astype(np.float64)) + inits["B"][None, :, None, None]


def multi_input_model() -> onnx.ModelProto:
    """Inputs: x float[N,T,4] (dynamic T), ids int64[N,3], mask bool[N,3]; outputs pass them through."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 4]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3]),
              helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 3])]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in ("x", "ids", "mask")]
    outputs = [helper.make_tensor_value_info(f"{n}_out", t, None)
               for n, t in (("x", TensorProto.FLOAT), ("ids", TensorProto.INT64), ("mask", TensorProto.BOOL))]
    return _model(nodes, inputs, outputs)


def static_batch_model(batch: int = 1) -> onnx.ModelProto:
    """x float[batch,1,4,4] -> Relu -> y: a static batch dim, as exported by many tools."""
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 4, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 1, 4, 4])])


def ir3_model() -> onnx.ModelProto:
    """IR 3 style: the weight ``w`` is a graph input with a default value (an initializer)."""
    w = numpy_helper.from_array(np.ones(4, np.float32), "w")
    return _model([helper.make_node("Add", ["x", "w"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                   helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w], ir_version=3, opset=8)


def _x(n: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 5, 5)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# load_data: the happy paths


def test_load_npz_with_labels(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=_x(10), labels=np.arange(10) % 3)
    data = load_data(path, from_proto(conv_model()))
    assert data.n_samples == 10
    assert data.inputs["x"].dtype == np.float32
    assert data.labels.tolist() == (np.arange(10) % 3).tolist()
    assert data.source == str(path)
    assert "n_samples=10" in repr(data) and "float32[10,3,5,5]" in repr(data) and "labels=int64[10]" in repr(data)


def test_load_npy_for_single_input_model(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, _x(6))
    data = load_data(path, conv_model())
    assert list(data.inputs) == ["x"] and data.n_samples == 6 and data.labels is None


def test_float64_data_is_cast_with_a_note(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=_x(4).astype(np.float64))
    data = load_data(path, conv_model())
    assert data.inputs["x"].dtype == np.float32
    assert any("float64 data cast to float32" in note for note in data.notes)


def test_int32_data_for_int64_input_is_cast(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 5, 4), np.float32), ids=np.ones((2, 3), np.int32), mask=np.ones((2, 3), bool))
    data = load_data(path, multi_input_model())
    assert data.inputs["ids"].dtype == np.int64 and data.notes


def test_dynamic_dims_accept_any_size(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 17, 4), np.float32), ids=np.ones((2, 3), np.int64), mask=np.ones((2, 3), bool))
    assert load_data(path, multi_input_model()).inputs["x"].shape == (2, 17, 4)


def test_initializer_backed_input_needs_no_data(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 4), np.float32))
    data = load_data(path, ir3_model())
    assert list(data.inputs) == ["x"]
    out = reference_outputs(ir3_model(), data)
    np.testing.assert_array_equal(out["y"], np.ones((3, 4), np.float32))


# ---------------------------------------------------------------------------------------------
# load_data: every refusal is a one-line DataError naming the problem


def _save(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.npz", "no such data file"),
    (lambda p: p, "is a directory"),
])
def test_missing_file_and_directory(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_data(make(tmp_path), conv_model())


def test_not_an_npz(tmp_path):
    path = tmp_path / "d.npz"
    path.write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match="not an .npz or .npy file"):
        load_data(path, conv_model())


def test_corrupt_npz(tmp_path):
    good = _save(tmp_path, x=_x(10))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="corrupt"):
        load_data(bad, conv_model())


def test_corrupt_array_inside_a_valid_archive(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=_x(10))  # stored uncompressed: flipping data bytes breaks the CRC, not the directory
    raw = bytearray(path.read_bytes())
    raw[400:410] = b"\xff" * 10
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="array 'x' is corrupt"):
        load_data(path, conv_model())


def test_zip_member_that_is_not_an_array(tmp_path):
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(DataError, match="not a numpy array"):
        load_data(path, conv_model())


def test_object_array_is_refused(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="Python objects"):
        load_data(path, conv_model())


def test_npy_for_multi_input_model(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 5, 4), np.float32))
    with pytest.raises(DataError, match="model has 3 inputs"):
        load_data(path, multi_input_model())


@pytest.mark.parametrize("arrays, message", [
    ({"labels": np.zeros(4, np.int64)}, "no array for model input 'x'"),
    ({"x": _x(4), "y": _x(4)}, "array 'y' matches no model input"),
    ({"x": _x(4).astype(np.int64)}, "holds int64 but the model expects float"),
    ({"x": _x(4)[:, 0]}, r"rank 3\); the model input is \[N,3,5,5\]: expected rank 4"),
    ({"x": np.zeros((4, 3, 6, 5), np.float32)}, "fixes axis 2 to 5"),
    ({"x": np.zeros((0, 3, 5, 5), np.float32)}, "0 samples"),
    ({"x": _x(4), "labels": np.zeros(5, np.int64)}, r"different numbers of samples \(x: 4, labels: 5\)"),
    ({"x": _x(4), "labels": np.zeros(4, np.float32)}, "'labels' has dtype float32; expected integer"),
    ({"x": _x(4), "labels": np.zeros((4, 2), np.int64)}, "one class id per sample"),
    ({"x": _x(4), "labels": -np.ones(4, np.int64)}, "negative class id"),
])
def test_data_refusals(tmp_path, arrays, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_data(path, conv_model())
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_empty_archive(tmp_path):
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w"):
        pass
    with pytest.raises(DataError, match="holds no arrays"):
        load_data(path, conv_model())


def test_different_sample_counts_between_inputs(tmp_path):
    path = _save(tmp_path, x=np.zeros((2, 5, 4), np.float32), ids=np.ones((3, 3), np.int64),
                 mask=np.ones((2, 3), bool))
    with pytest.raises(DataError, match="different numbers of samples"):
        load_data(path, multi_input_model())


def test_integer_values_out_of_range_for_the_input_type(tmp_path):
    model = multi_input_model()
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.INT8
    path = _save(tmp_path, x=np.zeros((1, 5, 4), np.float32), ids=np.full((1, 3), 300, np.int64),
                 mask=np.ones((1, 3), bool))
    with pytest.raises(DataError, match="outside the range"):
        load_data(path, model)


def test_bool_input_refuses_integers(tmp_path):
    path = _save(tmp_path, x=np.zeros((1, 5, 4), np.float32), ids=np.ones((1, 3), np.int64),
                 mask=np.ones((1, 3), np.int64))
    with pytest.raises(DataError, match="input 'mask'.*expects bool"):
        load_data(path, multi_input_model())


def test_static_batch_needs_a_multiple(tmp_path):
    path = _save(tmp_path, x=np.zeros((5, 1, 4, 4), np.float32))
    with pytest.raises(DataError, match="static batch of 2.*not a multiple of 2"):
        load_data(path, static_batch_model(batch=2))


def test_check_data_validates_in_memory_data():
    with pytest.raises(DataError, match="<in-memory data>: array 'z'"):
        check_data(conv_model(), SampleData({"x": _x(2), "z": _x(2)}))


# ---------------------------------------------------------------------------------------------
# random data and --input-shape


def test_random_data_respects_dtypes_and_ranges():
    data = random_data(multi_input_model(), 16, seed=0, input_shapes={"x": (1, 7, 4)})
    assert data.inputs["x"].dtype == np.float32 and data.inputs["x"].shape == (16, 7, 4)
    assert data.inputs["ids"].dtype == np.int64 and 0 <= data.inputs["ids"].min() and data.inputs["ids"].max() < 10
    assert data.inputs["mask"].dtype == bool and data.inputs["mask"].any() and not data.inputs["mask"].all()
    assert abs(float(data.inputs["x"].mean())) < 0.3 and 0.7 < float(data.inputs["x"].std()) < 1.3
    check_data(multi_input_model(), data)  # the model accepts what we generate


def test_random_data_is_deterministic_by_seed():
    a = random_data(conv_model(), 8, seed=3)
    b = random_data(conv_model(), 8, seed=3)
    c = random_data(conv_model(), 8, seed=4)
    np.testing.assert_array_equal(a.inputs["x"], b.inputs["x"])
    assert not np.array_equal(a.inputs["x"], c.inputs["x"])
    assert a.source == "random(seed=3)"


def test_random_data_asks_for_dynamic_dims():
    with pytest.raises(DataError, match=r"dynamic dim 'T' at axis 1; pass --input-shape x:d0,d1,\.\.\."):
        random_data(multi_input_model(), 4, seed=0)


@pytest.mark.parametrize("shapes, message", [
    ({"x": (1, 7)}, "has rank 2"),
    ({"x": (1, 7, 5)}, "fixes it to 4"),
    ({"nope": (1, 2)}, "'nope', which is not a model input"),
])
def test_random_data_refuses_bad_shapes(shapes, message):
    with pytest.raises(DataError, match=message):
        random_data(multi_input_model(), 4, seed=0, input_shapes={"x": (1, 7, 4), **shapes})


def test_random_data_rounds_up_to_the_static_batch():
    assert random_data(static_batch_model(batch=4), 6, seed=0).n_samples == 8
    assert random_data(static_batch_model(batch=1), 6, seed=0).n_samples == 6


def test_random_data_skips_initializer_backed_inputs():
    assert list(random_data(ir3_model(), 2, seed=0).inputs) == ["x"]


def test_parse_input_shapes():
    assert parse_input_shapes(["x:1,3,224,224", "a:b: 2, 3"]) == {"x": (1, 3, 224, 224), "a:b": (2, 3)}


@pytest.mark.parametrize("spec", ["x", ":1,2", "x:", "x:1,,2", "x:1,-2", "x:1,a", "x:0,3"])
def test_parse_input_shapes_refuses_malformed_specs(spec):
    with pytest.raises(DataError, match="input shape"):
        parse_input_shapes([spec])


def test_parse_input_shapes_refuses_duplicates():
    with pytest.raises(DataError, match="given twice"):
        parse_input_shapes(["x:1", "x:2"])


# ---------------------------------------------------------------------------------------------
# streaming statistics equal numpy on the concatenated data


def _uneven_batches(full: np.ndarray, sizes=(3, 1, 7, 5)) -> list[np.ndarray]:
    cuts = np.cumsum(sizes)[:-1]
    return np.split(full, cuts)


@pytest.mark.parametrize("axis", [1, -1])
def test_channel_stats_match_numpy(axis):
    rng = np.random.default_rng(0)
    full = (rng.standard_normal((16, 4, 3, 2)) * 3 + 100).astype(np.float32)  # large mean: tests the merge
    full[full < 99] = 0.0
    stats = ChannelStats(axis=axis)
    for part in _uneven_batches(full):
        stats.update(part)
    rows = np.moveaxis(full.astype(np.float64), axis, -1).reshape(-1, full.shape[axis])
    np.testing.assert_allclose(stats.mean, rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.var, rows.var(0), rtol=1e-10)
    np.testing.assert_allclose(stats.std, rows.std(0), rtol=1e-10)
    np.testing.assert_array_equal(stats.min, rows.min(0))
    np.testing.assert_array_equal(stats.max, rows.max(0))
    np.testing.assert_allclose(stats.mean_abs, np.abs(rows).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.apoz, (rows == 0).mean(0))
    assert stats.count == rows.shape[0] and stats.channels == full.shape[axis]


def test_moments_match_numpy():
    full = np.random.default_rng(1).standard_normal((16, 5)).astype(np.float32)
    moments = Moments()
    for part in _uneven_batches(full):
        moments.update(part)
    flat = full.astype(np.float64).ravel()
    assert moments.count == flat.size
    assert moments.mean == pytest.approx(flat.mean(), rel=1e-12)
    assert moments.var == pytest.approx(flat.var(), rel=1e-10)
    assert moments.min == flat.min() and moments.max == flat.max()
    assert moments.absmax == np.abs(flat).max()
    assert moments.mean_abs == pytest.approx(np.abs(flat).mean(), rel=1e-12)
    assert moments.zero_fraction == 0.0


def test_gram_matches_numpy():
    full = np.random.default_rng(2).standard_normal((16, 3, 2, 2)).astype(np.float32)
    gram = Gram()
    for part in _uneven_batches(full):
        gram.update(part)
    x = np.moveaxis(full.astype(np.float64), 1, -1).reshape(-1, 3)
    np.testing.assert_allclose(gram.xtx, x.T @ x, rtol=1e-12)
    np.testing.assert_allclose(gram.sum, x.sum(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gram.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gram.covariance, np.cov(x.T, bias=True), rtol=1e-10, atol=1e-12)
    assert gram.count == x.shape[0] and gram.features == 3


def test_gram_row_subsampling_is_seeded():
    full = np.random.default_rng(3).standard_normal((16, 3, 4, 4)).astype(np.float32)

    def run(seed):
        gram = Gram(max_rows=10, seed=seed)
        for part in _uneven_batches(full):
            gram.update(part)
        return gram

    a, b, c = run(0), run(0), run(1)
    assert a.count == 4 * 10
    np.testing.assert_array_equal(a.xtx, b.xtx)
    assert not np.array_equal(a.xtx, c.xtx)


def test_gram_custom_rows():
    x = np.random.default_rng(4).standard_normal((5, 6, 2)).astype(np.float32)
    gram = Gram(rows=lambda a: a.reshape(-1, a.shape[-1]))
    gram.update(x)
    flat = x.reshape(-1, 2).astype(np.float64)
    np.testing.assert_allclose(gram.xtx, flat.T @ flat, rtol=1e-12)


def test_stats_refuse_inconsistent_or_missing_data():
    stats = ChannelStats()
    with pytest.raises(ValueError, match="never updated"):
        _ = stats.mean
    stats.update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="4 channels, earlier ones had 3"):
        stats.update(np.zeros((2, 4)))


# ---------------------------------------------------------------------------------------------
# the Calibrator


class _BatchRecorder:
    """A statistic that remembers the size of every batch it was fed."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def update(self, array: np.ndarray) -> None:
        self.sizes.append(array.shape[0])


def test_calibrator_exposes_an_intermediate_value():
    proto = conv_model()
    data = SampleData({"x": _x(23)})
    cal = Calibrator(from_proto(proto), data, batch_size=5)
    stats = cal.collect(["conv_out", "relu_out"], lambda name: ChannelStats(axis=1))
    truth = conv_numpy(proto, data.inputs["x"])
    rows = np.moveaxis(truth, 1, -1).reshape(-1, truth.shape[1])
    np.testing.assert_allclose(stats["conv_out"].mean, rows.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["conv_out"].var, rows.var(0), rtol=1e-5)
    relu = np.maximum(rows, 0)
    np.testing.assert_allclose(stats["relu_out"].apoz, (relu == 0).mean(0))


def test_calibrator_memory_is_bounded_by_one_batch():
    data = SampleData({"x": _x(23)})
    small = Calibrator(from_proto(conv_model()), data, batch_size=4)
    recorder = small.collect(["conv_out"], lambda name: _BatchRecorder())["conv_out"]
    assert recorder.sizes == [4, 4, 4, 4, 4, 3]
    big = Calibrator(from_proto(conv_model()), data, batch_size=100).collect(["conv_out"], lambda n: ChannelStats())
    again = small.collect(["conv_out"], lambda n: ChannelStats())
    np.testing.assert_allclose(again["conv_out"].mean, big["conv_out"].mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(again["conv_out"].var, big["conv_out"].var, rtol=1e-10)


def test_calibrator_runs_the_current_ir():
    model = from_proto(conv_model())
    cal = Calibrator(model, SampleData({"x": _x(4)}))
    before = cal.collect(["conv_out"], lambda n: Moments())["conv_out"].mean
    w = model.graph.initializers["W"]
    model.graph.set_initializer_array(w, w.array * 2)
    model.graph.set_initializer_array(model.graph.initializers["B"], model.graph.initializers["B"].array * 2)
    after = cal.collect(["conv_out"], lambda n: Moments())["conv_out"].mean
    assert after == pytest.approx(2 * before, rel=1e-5)


def test_static_batch_one_model_takes_n_samples():
    model = from_proto(static_batch_model(batch=1))
    data = random_data(model, 7, seed=0)
    assert feed_batch_size(model, 64) == 1
    batches = list(Calibrator(model, data, batch_size=64).run(["y"]))
    assert len(batches) == 7 and all(b["y"].shape == (1, 1, 4, 4) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["y"] for b in batches]), np.maximum(data.inputs["x"], 0))


def test_calibrator_run_yields_graph_inputs_and_outputs_too():
    data = SampleData({"x": _x(3)})
    (batch,) = Calibrator(from_proto(conv_model()), data).run(["x", "logits"])
    np.testing.assert_array_equal(batch["x"], data.inputs["x"])
    assert batch["logits"].shape == (3, 3)


def test_calibrator_unknown_value():
    cal = Calibrator(from_proto(conv_model()), SampleData({"x": _x(2)}))
    with pytest.raises(ValueError, match="no such value"):
        next(cal.run(["nope"]))


def test_calibrator_checks_the_data():
    cal = Calibrator(from_proto(conv_model()), SampleData({"x": _x(2)[:, :2]}))
    with pytest.raises(DataError, match="fixes axis 1 to 3"):
        next(cal.run(["conv_out"]))


def test_reference_outputs_concatenates_batches():
    data = SampleData({"x": _x(11)})
    out = reference_outputs(conv_model(), data, batch_size=4)
    (whole,) = Calibrator(from_proto(conv_model()), data, batch_size=100).run(["logits"])
    np.testing.assert_allclose(out["logits"], whole["logits"], rtol=1e-6)


def test_onnxruntime_rejection_is_one_line():
    bad = conv_model()
    bad.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(GraphoptError, match="onnxruntime rejects the model") as info:
        reference_outputs(bad, SampleData({"x": _x(2)}))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# graphopt.measure.ort, the session factory the Calibrator relies on


def test_sessions_run_without_graph_optimizations_unless_asked():
    plain = gort.session(conv_model()).get_session_options()
    assert plain.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert plain.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    tuned = gort.session(conv_model(), optimize=True, threads=1).get_session_options()
    assert tuned.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert tuned.intra_op_num_threads == 1


def test_with_outputs_declares_the_element_type_only():
    proto = conv_model()
    proto.graph.value_info.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, [9, 9]))  # stale
    exposed = gort.with_outputs(proto, ["conv_out", "relu_out", "logits"])
    added = {vi.name: vi for vi in exposed.graph.output}
    assert list(added) == ["logits", "conv_out", "relu_out"] and len(proto.graph.output) == 1
    assert added["conv_out"].type.tensor_type.elem_type == TensorProto.FLOAT
    assert not added["conv_out"].type.tensor_type.HasField("shape")  # a stale shape is never copied
    assert not added["relu_out"].HasField("type")  # unknown type: onnxruntime infers it
    out = gort.run(gort.session(exposed), {"x": _x(2)}, ["conv_out", "relu_out"])
    assert out["conv_out"].shape == (2, 4, 5, 5)
    with pytest.raises(ValueError, match="no such value"):
        gort.with_outputs(proto, ["nope"])


def test_session_errors_are_one_line(tmp_path):
    with pytest.raises(GraphoptError, match="no such model file"):
        gort.session(tmp_path / "missing.onnx")
    sess = gort.session(conv_model())
    with pytest.raises(GraphoptError, match="the model: onnxruntime failed to run") as info:
        gort.run(sess, {"x": np.zeros((1, 2, 5, 5), np.float32)})
    assert "\n" not in str(info.value)


def test_split_holds_out_the_last_samples_as_views():
    data = SampleData({"x": np.arange(10, dtype=np.float32).reshape(10, 1)}, np.arange(10), "d")
    fit, held = data.split(3)
    assert (fit.n_samples, held.n_samples) == (7, 3)
    assert held.inputs["x"][:, 0].tolist() == [7, 8, 9] and held.labels.tolist() == [7, 8, 9]
    assert np.shares_memory(held.inputs["x"], data.inputs["x"]) and held.source == "d[7:]"
    assert data.split(0) == (data, None) and data.split(10) == (data, None)
