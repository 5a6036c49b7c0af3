"""Tests for graphopt.measure.verify: metrics, the automatic tolerance, accuracy mode, the first divergence."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.errors import DataError, GraphoptError, OptionError
from graphopt.core.onnx_io import from_proto
from graphopt.measure.calibration import SampleData, random_data, reference_outputs
from graphopt.measure.verify import (
    AUTO_MIN_COSINE_ACCURACY,
    AUTO_MIN_SNR_DB_ACCURACY,
    Tolerance,
    auto_tolerance,
    embedding_outputs,
    first_divergence,
    mac_depth,
    verify,
)

DEPTH = 22


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx 1.23 stamps 14, which onnxruntime 1.31 rejects
    return model


def deep_model(depth: int = DEPTH, channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    """``depth`` x (Conv 3x3 -> BatchNorm [-> Add residual] -> Relu), GAP, Gemm -> logits[N, 10].

    Layer ``i`` writes ``conv{i}``, ``bn{i}``, ``relu{i}``; He-initialised weights, BN statistics not
    matched to the data (like a trained model on shifted data), so values and ranges vary per layer.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    x, cin = "x", 3
    for i in range(depth):
        w = rng.standard_normal((channels, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))
        nodes.append(helper.make_node("Conv", [x, init(f"W{i}", w), init(f"B{i}", rng.standard_normal(channels) * .1)],
                                      [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        bn_inputs = [init(f"{p}{i}", v) for p, v in (("gamma", rng.uniform(.5, 1.5, channels)),
                                                    ("beta", rng.standard_normal(channels) * .1),
                                                    ("mean", rng.standard_normal(channels) * .1),
                                                    ("var", rng.uniform(.5, 2., channels)))]
        nodes.append(helper.make_node("BatchNormalization", [f"conv{i}", *bn_inputs], [f"bn{i}"], name=f"bn{i}"))
        pre = f"bn{i}"
        if i % 2 and cin == channels:
            nodes.append(helper.make_node("Add", [pre, x], [f"add{i}"], name=f"add{i}"))
            pre = f"add{i}"
        nodes.append(helper.make_node("Relu", [pre], [f"relu{i}"], name=f"relu{i}"))
        x, cin = f"relu{i}", channels
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
              helper.make_node("Gemm", ["flat", init("FC", rng.standard_normal((10, channels)) / np.sqrt(channels))],
                               ["logits"], name="fc", transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)


def fold_bn(model: onnx.ModelProto, *, keep_conv_names: bool = False, bias_error: tuple[int, int, float] | None = None,
            eps: float | None = None) -> onnx.ModelProto:
    """Fold each BatchNorm into its Conv (float64): W' = W·γ/σ, b' = (b − μ)·γ/σ + β, σ² = var + ε.

    ``keep_conv_names``: the fused conv keeps writing ``conv{i}`` (now post-BN values) and the BN's
    readers are rewired to it, as an IR pass does; otherwise it takes over the name ``bn{i}``.
    ``bias_error = (layer, channel, delta)`` injects a wrong bias; ``eps`` overrides BN's epsilon (a bug).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in out.graph.initializer}
    rename: dict[str, str] = {}
    kept = []
    for node in out.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        if node.op_type != "BatchNormalization":
            kept.append(node)
            continue
        i = int(node.name[2:])
        gamma, beta, mean, var = (inits.pop(n) for n in node.input[1:])
        scale = gamma / np.sqrt(var + (1e-5 if eps is None else eps))
        inits[f"W{i}"] = inits[f"W{i}"] * scale[:, None, None, None]
        inits[f"B{i}"] = (inits[f"B{i}"] - mean) * scale + beta
        if bias_error is not None and bias_error[0] == i:
            inits[f"B{i}"][bias_error[1]] += bias_error[2]
        if keep_conv_names:
            rename[node.output[0]] = node.input[0]
        else:
            next(n for n in kept if n.name == f"conv{i}").output[0] = node.output[0]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    del out.graph.initializer[:]
    out.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items())
    return out


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


@pytest.fixture(scope="module")
def deep():
    return deep_model()


@pytest.fixture(scope="module")
def deep_data(deep):
    return random_data(deep, 32, seed=0)


# ---------------------------------------------------------------------------------------------
# equivalence


def test_identical_models_pass_with_zero_error(deep, deep_data):
    report = verify(deep, deep, deep_data)
    assert report.passed and report.reasons == [] and report.first_divergence is None
    m = report.metrics["logits"]
    assert m.max_abs_error == 0.0 and m.max_rel_error == 0.0 and m.mean_abs_error == 0.0
    assert m.cosine_min == pytest.approx(1.0) and m.top1_agreement == 1.0
    assert report.class_output == "logits" and report.top1_agreement == 1.0


def test_identical_models_accept_paths_and_ir(tmp_path, deep, deep_data):
    path = tmp_path / "m.onnx"
    onnx.save(deep, path)
    assert verify(str(path), from_proto(deep), deep_data).passed


@pytest.mark.parametrize("keep_conv_names", [False, True])
def test_hand_folded_bn_passes_the_auto_tolerance(deep, deep_data, keep_conv_names):
    report = verify(deep, fold_bn(deep, keep_conv_names=keep_conv_names), deep_data)
    assert report.passed, report.reasons
    m = report.metrics["logits"]
    assert 0 < m.max_rel_error < report.tolerance["rel"]
    auto = report.tolerance["auto"]
    assert auto["mac_depth"] == DEPTH + 1 and auto["ort_rel_diff"] is not None
    assert report.tolerance["rel"] == max(auto["floor"], auto["k"] * auto["ort_rel_diff"])


def _pad_off_by_one(model: onnx.ModelProto, layer: int) -> onnx.ModelProto:
    out = fold_bn(model)
    attr = next(a for a in _node(out, f"conv{layer}").attribute if a.name == "pads")
    attr.ints[:] = [2, 1, 0, 1]  # same output size, content shifted one row
    return out


def _transposed_kernel(model: onnx.ModelProto, layer: int) -> onnx.ModelProto:
    out = fold_bn(model)
    for i, t in enumerate(out.graph.initializer):
        if t.name == f"W{layer}":
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(t).transpose(1, 0, 2, 3).copy(), t.name))
    return out


BUGS = {
    "wrong bias in one channel": lambda m: fold_bn(m, bias_error=(9, 3, 0.5)),
    "wrong BN epsilon": lambda m: fold_bn(m, eps=1e-3),
    "off-by-one padding": lambda m: _pad_off_by_one(m, 9),
    "transposed weight": lambda m: _transposed_kernel(m, 9),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_injected_bugs_fail_and_name_the_first_diverging_tensor(deep, deep_data, bug):
    report = verify(deep, BUGS[bug](deep), deep_data)
    assert not report.passed
    assert report.reasons and "logits" in report.reasons[0] and "above the tolerance" in report.reasons[0]
    div = report.first_divergence
    expected = "bn0" if bug == "wrong BN epsilon" else "bn9"  # a wrong epsilon is wrong from the first layer
    assert div is not None and div.name == expected and div.op_type == "BatchNormalization"
    assert div.samples == 8 and div.rel_error > report.tolerance["rel"]


def test_first_divergence_sees_through_renamed_tensors(deep, deep_data):
    """With conv outputs holding post-BN values under their old names, every conv{i} differs before the bug;
    the divergence that persists downstream is the buggy layer's."""
    buggy = fold_bn(deep, keep_conv_names=True, bias_error=(9, 3, 0.5))
    report = verify(deep, buggy, deep_data)
    assert not report.passed
    assert report.first_divergence.name == "conv9" and report.first_divergence.op_type == "Conv"


def test_first_divergence_on_its_own(deep, deep_data):
    div = first_divergence(deep, _pad_off_by_one(deep, 4), deep_data.head(4), rel=1e-5)
    assert div.name == "bn4" and div.node == "bn4" and div.shape == [4, 8, 8, 8]
    assert first_divergence(deep, deep, deep_data.head(4), rel=1e-5) is None


def test_explicit_tolerance_is_used_as_given(deep, deep_data):
    buggy = fold_bn(deep, bias_error=(9, 3, 0.5))
    report = verify(deep, buggy, deep_data, tolerance=Tolerance(rel=0.5))
    assert report.passed and report.tolerance["rel"] == 0.5 and report.tolerance["auto"] is None


def test_to_dict_is_plain_json(deep, deep_data):
    report = verify(deep, _pad_off_by_one(deep, 9), deep_data)
    as_dict = report.to_dict()
    text = json.dumps(as_dict, allow_nan=False)
    assert json.loads(text) == as_dict
    assert as_dict["first_divergence"]["name"] == "bn9" and as_dict["metrics"]["logits"]["passed"] is False
    assert "FAIL" in report.summary()


# ---------------------------------------------------------------------------------------------
# the automatic tolerance


def test_auto_tolerance_floor_scale_and_cap():
    assert auto_tolerance(0.0, 1, TensorProto.FLOAT)["rel"] == 1e-5  # ORT changed nothing: the floor
    deep = auto_tolerance(0.0, 100, TensorProto.FLOAT)
    assert deep["rel"] == pytest.approx(4 * np.finfo(np.float32).eps * 100)  # the floor grows with depth
    assert auto_tolerance(1e-6, 1, TensorProto.FLOAT)["rel"] == pytest.approx(8e-6 if 8e-6 > 1e-5 else 1e-5)
    assert auto_tolerance(3e-6, 1, TensorProto.FLOAT)["rel"] == pytest.approx(2.4e-5)
    assert auto_tolerance(1e-3, 1, TensorProto.FLOAT)["rel"] == 5e-4  # never above the cap
    assert auto_tolerance(None, 1, TensorProto.FLOAT)["rel"] == 1e-5


def test_mac_depth_counts_the_longest_path(deep):
    assert mac_depth(deep) == DEPTH + 1


# ---------------------------------------------------------------------------------------------
# interface mismatches fail cleanly


def _affine(out_name: str = "y", out_type=TensorProto.FLOAT, out_shape=("N", 4), scale: float = 2.0,
            cols: int = 4) -> onnx.ModelProto:
    """y = x * scale (+ a Slice to ``cols`` columns when cols < 4); x float[N, 4]."""
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"])]
    inits = [numpy_helper.from_array(np.full(4, scale, np.float32), "s")]
    last = "m"
    if cols < 4:
        inits += [numpy_helper.from_array(np.array([0], np.int64), "st"),
                  numpy_helper.from_array(np.array([cols], np.int64), "en"),
                  numpy_helper.from_array(np.array([1], np.int64), "ax")]
        nodes.append(helper.make_node("Slice", ["m", "st", "en", "ax"], ["sl"]))
        last = "sl"
    if out_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [last], ["c"], to=out_type))
        last = "c"
    nodes.append(helper.make_node("Identity", [last], [out_name]))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                  [helper.make_tensor_value_info(out_name, out_type, list(out_shape))], inits)


AFFINE_DATA = SampleData({"x": np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)})


@pytest.mark.parametrize("candidate, message", [
    (_affine(out_name="z"), "the candidate has no output of that name"),
    (_affine(out_type=TensorProto.DOUBLE), "candidate type double, reference float"),
    (_affine(out_shape=("N", 3), cols=3), r"candidate shape \['N', 3\], reference \['N', 4\]"),
    (_affine(out_shape=("N", "M"), cols=3), r"candidate gives float32\[6, 3\], reference float32\[6, 4\]"),
])
def test_interface_mismatch_fails_with_a_reason(candidate, message):
    report = verify(_affine(), candidate, AFFINE_DATA)
    assert not report.passed
    assert any(re.search(message, r) for r in report.reasons), report.reasons
    json.dumps(report.to_dict(), allow_nan=False)


def test_candidate_onnxruntime_rejects_fails_the_verdict():
    broken = _affine()
    broken.graph.node[0].op_type = "NoSuchOp"
    report = verify(_affine(), broken, AFFINE_DATA)
    assert not report.passed and "onnxruntime rejects the model" in report.reasons[0]


def test_candidate_with_other_inputs_fails_the_verdict():
    other = _affine()
    other.graph.input[0].name = "renamed"
    other.graph.node[0].input[0] = "renamed"
    report = verify(_affine(), other, AFFINE_DATA)
    assert not report.passed and "does not accept the reference's inputs" in report.reasons[0]


def test_reference_problems_raise():
    broken = _affine()
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(GraphoptError, match="onnxruntime rejects the model"):
        verify(broken, _affine(), AFFINE_DATA)
    with pytest.raises(DataError, match="array 'y' matches no model input"):
        verify(_affine(), _affine(), SampleData({"y": AFFINE_DATA.inputs["x"]}))


def test_bad_options():
    with pytest.raises(OptionError, match="unknown verify mode"):
        verify(_affine(), _affine(), AFFINE_DATA, mode="close-enough")
    with pytest.raises(OptionError, match="non-negative"):
        Tolerance(rel=-1.0)


# ---------------------------------------------------------------------------------------------
# exact outputs, non-finite values


def _argmax_model(bias: float) -> onnx.ModelProto:
    """ids = argmax(x + [0, 0, bias]) over axis 1: an int64 output."""
    b = numpy_helper.from_array(np.array([0, 0, bias], np.float32), "b")
    nodes = [helper.make_node("Add", ["x", "b"], ["s"]), helper.make_node("ArgMax", ["s"], ["ids"], axis=1, keepdims=0)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                  [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])], [b])


def test_integer_outputs_are_compared_exactly():
    x = np.array([[0, 0, 1], [1, 0, 0.999], [0, 2, 0], [1, 0, 0]], np.float32)
    data = SampleData({"x": x})
    assert verify(_argmax_model(0.0), _argmax_model(0.0), data).passed
    report = verify(_argmax_model(0.0), _argmax_model(0.01), data)  # sample 1 flips from class 0 to class 2
    m = report.metrics["ids"]
    assert not report.passed and m.kind == "exact" and m.mismatches == 1 and m.elements == 4
    assert "1 of 4 elements differ" in report.reasons[0]
    assert report.first_divergence.name == "s"  # the float sum already differs (beyond 1e-5 of its range)


def test_untyped_output_is_judged_by_what_it_computes():
    untyped = _affine()
    untyped.graph.output[0].ClearField("type")
    report = verify(untyped, _affine(scale=2.0 * (1 + 1e-7)), AFFINE_DATA)
    m = report.metrics["y"]
    assert report.passed and m.kind == "float" and m.dtype == "float" and m.max_abs_error > 0


def test_nan_in_the_same_place_matches_and_elsewhere_fails():
    x = np.array([[np.nan, 1, 2, 3], [0, 1, 2, 3]], np.float32)
    data = SampleData({"x": x})
    same = verify(_affine(), _affine(), data)
    assert same.passed and same.metrics["y"].nonfinite_mismatches == 0
    report = verify(_affine(), _affine(scale=2.5), SampleData({"x": np.array([[np.inf, 1, 2, 3]], np.float32)}))
    assert not report.passed and report.metrics["y"].nonfinite_mismatches == 0  # inf*2 == inf*2.5
    json.dumps(report.to_dict(), allow_nan=False)


# ---------------------------------------------------------------------------------------------
# accuracy mode


def _scores_model(weights) -> onnx.ModelProto:
    """scores = x * weights (per class): x float[N, 3] are the reference's class scores."""
    w = numpy_helper.from_array(np.asarray(weights, np.float32), "w")
    return _model([helper.make_node("Mul", ["x", "w"], ["scores"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                  [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])], [w])


# 10 samples. Reference predictions = argmax(x); the candidate triples class 2's score, which moves
# samples 6-9 (class-2 score 0.5 > 1/3 of the winner) to class 2.
ACC_X = np.array([[3, 1, 0.1], [1, 3, 0.1], [0.1, 1, 3], [3, 0, 0.2], [0, 3, 0.2], [0.2, 0, 3],
                  [1, 0, 0.5], [1, 0, 0.5], [0, 1, 0.5], [0, 1, 0.5]], np.float32)
ACC_LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 2, 1, 1])  # reference wrong on sample 7; candidate on 6, 8, 9


def test_accuracy_mode_with_labels():
    data = SampleData({"x": ACC_X}, labels=ACC_LABELS)
    report = verify(_scores_model([1, 1, 1]), _scores_model([1, 1, 3]), data, mode="accuracy",
                    tolerance=Tolerance(max_drop=10.0))
    assert report.accuracy_reference == pytest.approx(90.0)
    assert report.accuracy_candidate == pytest.approx(70.0)
    assert report.accuracy_drop == pytest.approx(20.0)
    assert report.top1_agreement == pytest.approx(0.6)
    assert not report.passed and "accuracy dropped 20.00 points (90.00% -> 70.00%)" in report.reasons[0]
    assert verify(_scores_model([1, 1, 1]), _scores_model([1, 1, 3]), data, mode="accuracy",
                  tolerance=Tolerance(max_drop=20.0)).passed  # a drop equal to the allowance passes
    # equivalence mode still reports both accuracies
    eq = verify(_scores_model([1, 1, 1]), _scores_model([1, 1, 3]), data)
    assert not eq.passed and eq.accuracy_drop == pytest.approx(20.0)


def test_accuracy_mode_without_labels_uses_agreement():
    data = SampleData({"x": ACC_X})
    report = verify(_scores_model([1, 1, 1]), _scores_model([1, 1, 3]), data, mode="accuracy",
                    tolerance=Tolerance(max_drop=40.0))
    assert report.passed and report.top1_agreement == pytest.approx(0.6) and report.accuracy_drop is None
    assert not verify(_scores_model([1, 1, 1]), _scores_model([1, 1, 3]), data, mode="accuracy").passed


def _scale3d(scale: float) -> onnx.ModelProto:
    """y = x * scale with x float[N, 2, 2]: no output looks like class scores."""
    s = numpy_helper.from_array(np.array(scale, np.float32), "s")
    return _model([helper.make_node("Mul", ["x", "s"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 2])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 2])], [s])


def test_accuracy_mode_without_class_scores_uses_cosine():
    data = SampleData({"x": AFFINE_DATA.inputs["x"].reshape(6, 2, 2)})
    report = verify(_scale3d(2.0), _scale3d(2.1), data, mode="accuracy")
    assert report.passed and report.tolerance["min_cosine"] == AUTO_MIN_COSINE_ACCURACY  # a scale keeps the direction
    assert report.top1_agreement is None and report.class_output is None
    flipped = verify(_scale3d(2.0), _scale3d(-2.0), data, mode="accuracy")
    assert not flipped.passed
    assert f"min cosine similarity -1.000000 is below {AUTO_MIN_COSINE_ACCURACY}" in flipped.reasons[0]


def test_labels_out_of_range_are_a_data_error():
    data = SampleData({"x": ACC_X}, labels=np.full(10, 3))
    with pytest.raises(DataError, match="class id 3 but output 'scores' has 3 classes"):
        verify(_scores_model([1, 1, 1]), _scores_model([1, 1, 1]), data)


# ---------------------------------------------------------------------------------------------
# static batch


def test_static_batch_one_model_is_fed_sample_by_sample():
    model = _affine(out_shape=(1, 4))
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    report = verify(model, _affine(scale=2.5, out_shape=(1, 4)), AFFINE_DATA)
    assert report.n_samples == 6 and not report.passed
    assert report.first_divergence is not None and report.first_divergence.samples == 6


# ---------------------------------------------------------------------------------------------
# outputs that are not class scores: SNR, roles, the per-output lossy verdict

MAP_RNG = np.random.default_rng(7)
MAP_W = MAP_RNG.standard_normal((3, 18)).astype(np.float32)
MAP_DATA = SampleData({"x": MAP_RNG.standard_normal((7, 2, 3, 3)).astype(np.float32)})


def _outputs_model(map_scale: float = 1.0, map_shift=None, emb_scale: float = 1.0, class_w=MAP_W,
                   outputs=("map", "scores", "emb")) -> onnx.ModelProto:
    """x float[N, 2, 3, 3] -> map = x·map_scale (+ map_shift), scores = Gemm(flatten(x), W) [N, 3],
    emb = flatten(x)·emb_scale / 2 [N, 18] (ends in Div: an embedding)."""
    inits = [numpy_helper.from_array(np.array(map_scale, np.float32), "ms"),
             numpy_helper.from_array(np.asarray(class_w, np.float32), "W"),
             numpy_helper.from_array(np.array(emb_scale, np.float32), "es"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("Mul", ["x", "ms"], ["map" if map_shift is None else "mapm"])]
    if map_shift is not None:
        inits.append(numpy_helper.from_array(np.asarray(map_shift, np.float32), "shift"))
        nodes.append(helper.make_node("Add", ["mapm", "shift"], ["map"]))
    nodes += [helper.make_node("Flatten", ["x"], ["flat"]),
              helper.make_node("Gemm", ["flat", "W"], ["scores"], transB=1),
              helper.make_node("Mul", ["flat", "es"], ["embm"]),
              helper.make_node("Div", ["embm", "two"], ["emb"])]
    shapes = {"map": ["N", 2, 3, 3], "scores": ["N", 3], "emb": ["N", 18]}
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3])],
                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes[o]) for o in outputs], inits)


def _numpy_similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    with np.errstate(divide="ignore"):  # an unchanged output: no noise, infinite SNR
        per_sample_snr = 10 * np.log10((a ** 2).sum(1) / ((a - b) ** 2).sum(1))
        snr = 10 * np.log10((a ** 2).sum() / ((a - b) ** 2).sum())
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"snr_db": snr, "snr_db_min": per_sample_snr.min(), "cosine_min": cos.min(), "cosine_mean": cos.mean()}


@pytest.mark.parametrize("batch_size", [2, 64])
def test_snr_and_cosine_match_numpy_streamed_over_batches(batch_size):
    shift = MAP_RNG.standard_normal((2, 3, 3)) * 0.3
    ref, cand = _outputs_model(), _outputs_model(map_scale=1.1, map_shift=shift, emb_scale=0.9)
    report = verify(ref, cand, MAP_DATA, mode="accuracy", batch_size=batch_size)
    a, b = reference_outputs(ref, MAP_DATA), reference_outputs(cand, MAP_DATA)
    for name in ("map", "emb", "scores"):
        m = report.metrics[name]
        for key, value in _numpy_similarity(a[name], b[name]).items():
            assert getattr(m, key) == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)


def test_identical_outputs_have_infinite_snr_spelled_for_json():
    report = verify(_outputs_model(), _outputs_model(), MAP_DATA, mode="accuracy")
    assert report.passed and report.metrics["map"].snr_db == math.inf and report.metrics["map"].snr_db_min == math.inf
    as_dict = report.to_dict()
    assert as_dict["metrics"]["map"]["snr_db"] == "Infinity"
    json.dumps(as_dict, allow_nan=False)


def test_roles_class_scores_embedding_map_exact():
    report = verify(_outputs_model(), _outputs_model(), MAP_DATA, mode="accuracy")
    assert {n: m.role for n, m in report.metrics.items()} == {"map": "map", "scores": "class scores",
                                                              "emb": "vector"}
    assert embedding_outputs(_outputs_model()) == {"emb"}
    assert verify(_argmax_model(0.0), _argmax_model(0.0), SampleData({"x": ACC_X}),
                  mode="accuracy").metrics["ids"].role == "exact"


@pytest.mark.parametrize("scale, passed", [(1.05, True), (1.25, False), (-1.0, False)])
def test_lossy_gate_on_a_map_by_snr_and_worst_cosine(scale, passed):
    report = verify(_outputs_model(), _outputs_model(map_scale=scale), MAP_DATA, mode="accuracy")
    m = report.metrics["map"]
    expected_snr = -20 * math.log10(abs(scale - 1))  # b − a = (scale − 1)·a
    assert m.snr_db == pytest.approx(expected_snr) and m.cosine_min == pytest.approx(1.0 if scale > 0 else -1.0)
    assert report.passed is passed and m.passed is passed
    assert m.rule == f"SNR >= {AUTO_MIN_SNR_DB_ACCURACY:g} dB, cos >= {AUTO_MIN_COSINE_ACCURACY:g}"
    assert report.tolerance["min_snr_db"] == AUTO_MIN_SNR_DB_ACCURACY
    if not passed:
        assert report.reasons == [m.reason] and f"SNR {expected_snr:.1f} dB is below" in m.reason
        assert (f"min cosine similarity -1.000000 is below {AUTO_MIN_COSINE_ACCURACY}" in m.reason) is (scale < 0)


def test_lossy_gate_thresholds_are_options():
    ref, cand = _outputs_model(), _outputs_model(map_scale=1.25)  # SNR 12.04 dB, cosine 1
    assert verify(ref, cand, MAP_DATA, mode="accuracy", tolerance=Tolerance(min_snr_db=12.0)).passed
    assert not verify(ref, cand, MAP_DATA, mode="accuracy", tolerance=Tolerance(min_snr_db=12.1)).passed
    shift = np.zeros((2, 3, 3))
    shift[0] = 0.8  # channel 0 moves: some samples turn away from the reference
    turned = _outputs_model(map_shift=shift)
    worst = verify(ref, turned, MAP_DATA, mode="accuracy", tolerance=Tolerance(min_snr_db=0.0)).metrics["map"]
    assert worst.cosine_min < AUTO_MIN_COSINE_ACCURACY
    assert verify(ref, turned, MAP_DATA, mode="accuracy",
                  tolerance=Tolerance(min_snr_db=0.0, min_cosine=worst.cosine_min)).passed
    with pytest.raises(OptionError, match="min_snr_db must be a non-negative number"):
        Tolerance(min_snr_db=-1.0)


def test_every_output_is_judged_by_its_own_rule():
    # the class scores agree, the embedding is scaled twice: the verdict fails on the embedding alone
    report = verify(_outputs_model(), _outputs_model(emb_scale=2.0), MAP_DATA, mode="accuracy")
    m = report.metrics
    assert not report.passed and m["scores"].passed and m["map"].passed and not m["emb"].passed
    assert m["scores"].rule == "top-1 agreement >= 99%" and report.top1_agreement == 1.0
    assert report.reasons == [m["emb"].reason] and "output 'emb': SNR 0.0 dB is below" in m["emb"].reason
    assert "worst output SNR 0.0 dB" in report.summary()
    # the embedding's argmax is not a class: an embedding that keeps its argmax but not its values fails
    assert verify(_outputs_model(outputs=("emb",)), _outputs_model(emb_scale=1.5, outputs=("emb",)), MAP_DATA,
                  mode="accuracy").reasons[0].startswith("output 'emb': SNR")


def test_class_scores_with_labels_are_judged_by_the_drop_and_the_rest_by_similarity():
    data = SampleData(MAP_DATA.inputs, labels=np.array([0, 1, 2, 0, 1, 2, 0]))
    w = MAP_W.copy()
    w[0] *= -1  # class 0 scores negated: predictions move
    report = verify(_outputs_model(), _outputs_model(class_w=w, map_scale=1.01), data, mode="accuracy",
                    tolerance=Tolerance(max_drop=100.0))
    assert report.passed and report.class_output == "scores"
    assert report.metrics["scores"].rule == "accuracy drop <= 100 pt" and report.metrics["map"].passed


def test_nonfinite_mismatch_fails_the_similarity_gate():
    ref = _outputs_model(outputs=("map",))
    x = MAP_DATA.inputs["x"].copy()
    x[0, 0, 0, 0] = np.inf
    shift = np.zeros((2, 3, 3))
    shift[0, 0, 0] = -np.inf  # inf + -inf = NaN where the reference has inf
    report = verify(ref, _outputs_model(map_shift=shift, outputs=("map",)), SampleData({"x": x}), mode="accuracy")
    assert not report.passed and "NaN/inf values" in report.reasons[0]


def test_equivalence_verdict_ignores_the_lossy_gate_unless_asked():
    ref, cand = _outputs_model(), _outputs_model(map_scale=1 + 1e-7)
    report = verify(ref, cand, MAP_DATA)
    assert report.passed and report.tolerance["min_snr_db"] is None
    assert report.metrics["map"].rule.startswith("error <= ") and report.metrics["map"].snr_db > 100
    strict = verify(ref, cand, MAP_DATA, tolerance=Tolerance(min_snr_db=200.0))
    assert not strict.passed and "SNR" in strict.reasons[0]


def test_divergence_statistics_stream_over_batches_as_over_all_samples():
    from graphopt.measure.verify import _RunningDiff

    def whole_at_once(a, b, **kwargs):
        diff = _RunningDiff()
        diff.add(a, b)
        return diff.check(**kwargs)

    rng = np.random.default_rng(5)
    a = rng.standard_normal((8, 4, 5)).astype(np.float32)
    b = a + rng.standard_normal(a.shape).astype(np.float32) * 0.01
    b[3, 1, 2] = np.nan
    for kwargs in ({"rel": 1e-3, "abs_tol": 0.0, "min_snr_db": None}, {"rel": 1.0, "abs_tol": 0.0, "min_snr_db": 30.0}):
        whole = whole_at_once(a, b, **kwargs)
        running = _RunningDiff()
        for i in range(8):
            running.add(a[i:i + 1], b[i:i + 1])
        streamed = running.check(**kwargs)
        assert streamed == whole and streamed.shape == [8, 4, 5] and streamed.diverged
    assert whole_at_once(a, b[:, :3], rel=1e-3, abs_tol=0.0, min_snr_db=None) is None   # other shape


def test_divergence_search_walks_a_topology_without_weights():
    from graphopt.core.onnx_io import from_proto
    from graphopt.measure.verify import _topology

    from pathlib import Path

    proto = onnx.load(str(Path(__file__).resolve().parent.parent / "models" / "resnet.onnx"))
    light = _topology(proto)
    assert all(not t.raw_data and not t.float_data for t in light.graph.initializer)
    assert light.ByteSize() < proto.ByteSize() / 20
    order = [n.name for n in from_proto(light).graph.toposort()]
    assert order == [n.name for n in from_proto(proto).graph.toposort()]
