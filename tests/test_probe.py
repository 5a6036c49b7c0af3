"""Probe shapes and values for models with dynamic dims, scalar and state inputs (graphopt.measure.probe),
the per-sample and shared data layouts, and verification at two shapes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import graphopt
from graphopt.app import api
from graphopt.core.errors import DataError
from graphopt.core.onnx_io import from_proto
from graphopt.measure import probe as probes
from graphopt.measure.calibration import (
    PER_SAMPLE,
    SHARED,
    SampleData,
    check_data,
    input_specs,
    load_data,
    random_data,
    reference_outputs,
    sample_layout,
)
from graphopt.measure.verify import lost_dynamic_dims

OPSET = [h.make_opsetid("", 17)]


def _model(nodes, inputs, outputs, inits=(), opset=OPSET) -> onnx.ModelProto:
    m = h.make_model(h.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=opset)
    onnx.checker.check_model(m)
    return m


def fpn_model() -> onnx.ModelProto:
    """x [batch, 3, H, W] -> stride-2 conv -> 2x2 pool -> x2 upsample -> + conv output: H, W must be
    multiples of 4 (an FPN add lines up only there)."""
    w = nh.from_array(np.random.default_rng(0).standard_normal((3, 3, 3, 3)).astype(np.float32), "w")
    scales = nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    return _model([h.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
                   h.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                   h.make_node("Resize", ["p", "", "scales"], ["r"], mode="nearest"),
                   h.make_node("Add", ["r", "c"], ["y"])],
                  [h.make_tensor_value_info("x", T.FLOAT, ["batch", 3, "H", "W"])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["batch", 3, "H2", "W2"])], [w, scales])


def encoder_model(position_rows: int = 40, type_rows: int = 2) -> onnx.ModelProto:
    """BERT-style embeddings: ids [batch, seq] -> word table (50 rows), token types -> 2-row table, a position
    table of ``position_rows`` sliced to seq and added (seq must fit it), masked by attention_mask."""
    rng = np.random.default_rng(1)
    inits = [nh.from_array(rng.standard_normal((50, 8)).astype(np.float32), "word"),
             nh.from_array(rng.standard_normal((type_rows, 8)).astype(np.float32), "types"),
             nh.from_array(rng.standard_normal((position_rows, 8)).astype(np.float32), "pos"),
             nh.from_array(np.array([0], np.int64), "zero"), nh.from_array(np.array([1], np.int64), "one"),
             nh.from_array(np.array([-1], np.int64), "minus1")]
    nodes = [h.make_node("Gather", ["word", "input_ids"], ["we"]),
             h.make_node("Gather", ["types", "token_type_ids"], ["te"]),
             h.make_node("Shape", ["input_ids"], ["shape"]),
             h.make_node("Gather", ["shape", "one"], ["seq"], axis=0),
             h.make_node("Slice", ["pos", "zero", "seq", "zero"], ["pe"]),
             h.make_node("Add", ["we", "te"], ["s1"]),
             h.make_node("Add", ["s1", "pe"], ["s2"]),
             h.make_node("Cast", ["attention_mask"], ["maskf"], to=T.FLOAT),
             h.make_node("Unsqueeze", ["maskf", "minus1"], ["mask3"]),
             h.make_node("Mul", ["s2", "mask3"], ["y"])]
    ids = [h.make_tensor_value_info(n, T.INT64, ["batch", "sequence"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    return _model(nodes, ids, [h.make_tensor_value_info("y", T.FLOAT, ["batch", "sequence", 8])], inits)


def stateful_model() -> onnx.ModelProto:
    """A streaming cell: chunk [1, 4], state [2, 1, 4] (its own leading axis), sr an int64 scalar compared in
    an If (16000 -> scale 1, else scale 2); outputs a probability [1, 1] and the new state [2, 1, 4]."""
    def branch(name: str, value: float) -> onnx.GraphProto:
        return h.make_graph([h.make_node("Identity", [name + "_c"], [name])], name, [],
                            [h.make_tensor_value_info(name, T.FLOAT, [1])],
                            [nh.from_array(np.array([value], np.float32), name + "_c")])

    then_g, else_g = branch("then", 1.0), branch("else", 2.0)
    inits = [nh.from_array(np.array(16000, np.int64), "sr16k"),
             nh.from_array(np.array([1], np.int64), "axis1")]
    nodes = [h.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
             h.make_node("If", ["is16k"], ["scale"], then_branch=then_g, else_branch=else_g),
             h.make_node("Mul", ["input", "scale"], ["scaled"]),
             h.make_node("Add", ["state", "scaled"], ["new_state"]),
             h.make_node("ReduceMean", ["new_state"], ["m"], keepdims=0),
             h.make_node("Sigmoid", ["m"], ["p"]),
             h.make_node("Reshape", ["p", "one_one"], ["prob"])]
    inits.append(nh.from_array(np.array([1, 1], np.int64), "one_one"))
    return _model(nodes, [h.make_tensor_value_info("input", T.FLOAT, [1, 4]),
                          h.make_tensor_value_info("state", T.FLOAT, [2, 1, 4]),
                          h.make_tensor_value_info("sr", T.INT64, [])],
                  [h.make_tensor_value_info("prob", T.FLOAT, [1, 1]),
                   h.make_tensor_value_info("new_state", T.FLOAT, [2, 1, 4])], inits)


def minus_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """Paddle's form: every dynamic dim of the inputs and outputs stored as dim_value -1."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in list(out.graph.input) + list(out.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = -1
    return out


# --- dims ---------------------------------------------------------------------------------------


def test_dims_sharing_a_name_share_a_group_and_unnamed_dims_stand_alone():
    groups = probes.dim_groups(input_specs(encoder_model()))
    assert [(g.name, g.members) for g in groups] == [
        ("batch", [("input_ids", 0), ("attention_mask", 0), ("token_type_ids", 0)]),
        ("sequence", [("input_ids", 1), ("attention_mask", 1), ("token_type_ids", 1)])]
    paddle = probes.dim_groups(input_specs(minus_one(fpn_model())))
    assert [(g.name, g.members, g.is_batch) for g in paddle] == [
        (None, [("x", 0)], True), (None, [("x", 2)], False), (None, [("x", 3)], False)]


def test_a_dim_stored_as_minus_one_is_dynamic():
    specs = input_specs(from_proto(minus_one(fpn_model())))
    assert specs[0].shape == (None, 3, None, None)


def test_probe_picks_sizes_the_original_runs_on_and_a_second_shape_that_differs_everywhere():
    probe = probes.choose(from_proto(fpn_model()))
    assert probe.shapes == {"x": (1, 3, 64, 64)}
    h2, w2 = probe.alternate["x"][2:]
    assert h2 != 64 and w2 != 64 and h2 != w2 and h2 % 4 == 0 and w2 % 4 == 0
    assert probe.dynamic and probe.probed == {"x:2": 64, "x:3": 64}


def test_probe_sequence_fits_the_position_table():
    probe = probes.choose(from_proto(encoder_model(position_rows=40)))
    seq = probe.shapes["input_ids"][1]
    assert seq <= 40 and probe.shapes["attention_mask"][1] == seq == probe.shapes["token_type_ids"][1]
    assert probe.alternate is None or probe.alternate["input_ids"][1] <= 40


def test_no_probe_size_runs_names_the_input_and_dim():
    # a [3, 2] weight multiplied from the right: only a width of 3 works, and 3 is not on the ladder
    model = _model([h.make_node("MatMul", ["x", "t"], ["y"])],
                   [h.make_tensor_value_info("x", T.FLOAT, ["batch", "seq"])],
                   [h.make_tensor_value_info("y", T.FLOAT, ["batch", 2])],
                   [nh.from_array(np.ones((3, 2), np.float32), "t")])
    with pytest.raises(DataError, match=r"input 'x' dim 'seq' \(axis 1\).*pass --input-shape x:d0,d1"):
        probes.choose(from_proto(model))


def test_given_shapes_win_and_are_not_probed():
    probe = probes.choose(from_proto(fpn_model()), {"x": (1, 3, 32, 48)})
    assert probe.shapes == {"x": (1, 3, 32, 48)} and probe.probed == {}
    assert probe.alternate is not None and probe.alternate["x"][2:] != (32, 48)


def test_batch_only_models_need_no_probe_run():
    model = _model([h.make_node("Relu", ["x"], ["y"])], [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
                   [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])])
    probe = probes.choose(from_proto(model))
    assert probe.shapes == {"x": (1, 4)} and probe.alternate is None and not probe.dynamic and not probe.notes


# --- values -------------------------------------------------------------------------------------


def test_integer_inputs_are_drawn_from_what_they_index():
    ir = from_proto(encoder_model(type_rows=2))
    rules = probes.value_rules(ir)
    assert (rules["input_ids"].kind, rules["input_ids"].high) == ("range", 50)
    assert (rules["token_type_ids"].kind, rules["token_type_ids"].high) == ("range", 2)
    assert rules["attention_mask"].kind == "mask"
    data = random_data(ir, 16, seed=0, input_shapes={n: (1, 12) for n in rules}, values=rules)
    assert data.inputs["token_type_ids"].max() <= 1 and data.inputs["input_ids"].max() < 50
    mask = data.inputs["attention_mask"]
    assert set(np.unique(mask)) <= {0, 1} and mask[:, 0].all()
    assert (np.diff(mask, axis=1) <= 0).all()  # ones, then zeros
    reference_outputs(encoder_model(), data)  # the original runs on them


def test_a_scalar_compared_with_constants_cycles_through_them():
    rules = probes.value_rules(from_proto(stateful_model()))
    assert rules["sr"].kind == "choices" and rules["sr"].choices == (16000,)


def test_without_rules_integers_keep_the_default_draws():
    ir = from_proto(encoder_model())
    plain = random_data(ir, 4, seed=0, input_shapes={"input_ids": (1, 5), "attention_mask": (1, 5),
                                                     "token_type_ids": (1, 5)})
    assert plain.inputs["input_ids"].max() < 10 and plain.inputs["token_type_ids"].max() >= 2


# --- layouts ------------------------------------------------------------------------------------


def test_inputs_that_cannot_share_a_sample_axis_get_one_feed_per_sample():
    model = stateful_model()
    assert sample_layout(model) == PER_SAMPLE
    data = random_data(model, 5, seed=0, values=probes.value_rules(from_proto(model)))
    assert data.one_per_run and data.n_samples == 5
    assert data.inputs["state"].shape == (5, 2, 1, 4) and data.inputs["sr"].shape == (5,)
    feeds = list(data.batches(64))
    assert len(feeds) == 5 and feeds[0]["sr"].shape == () and feeds[0]["state"].shape == (2, 1, 4)
    out = reference_outputs(model, data)
    assert out["prob"].shape == (5, 1) and out["new_state"].shape == (5, 2, 1, 4)


def test_npz_layouts_per_sample_and_shared(tmp_path):
    model = stateful_model()
    path = tmp_path / "stream.npz"
    rng = np.random.default_rng(0)
    np.savez(path, input=rng.standard_normal((3, 1, 4)).astype(np.float32),
             state=np.zeros((3, 2, 1, 4), np.float32), **{"shared/sr": np.array(8000, np.int64)})
    data = load_data(path, model)
    assert data.layout == {"input": PER_SAMPLE, "state": PER_SAMPLE, "sr": SHARED} and data.n_samples == 3
    feed = next(iter(data.batches(8)))
    assert feed["sr"].shape == () and int(feed["sr"]) == 8000 and feed["input"].shape == (1, 4)
    assert check_data(model, data.head(2)).n_samples == 2  # layouts survive re-validation and slicing
    out = reference_outputs(model, data)
    np.testing.assert_allclose(out["new_state"][:, 0, 0], 2 * data.inputs["input"][:, 0], rtol=1e-6)


@pytest.mark.parametrize("arrays, message", [
    ({"input": np.zeros((2, 1, 4), np.float32), "state": np.zeros((2, 2, 1, 4), np.float32),
      "shared/nope": np.array(1)}, "array 'shared/nope' matches no model input"),
    ({"input": np.zeros((2, 1, 4), np.float32), "state": np.zeros((2, 2, 1, 4), np.float32),
      "shared/sr": np.array([1, 2])}, r"a shared array is one complete input \[\] \(rank 0\)"),
    ({"input": np.zeros((2, 1, 4), np.float32), "state": np.zeros((2, 2, 1, 4), np.float32),
      "sr": np.array(16000)}, "for a scalar input; give one value per sample"),
    ({"input": np.zeros((2, 1, 4), np.float32), "state": np.zeros((2, 1, 2, 1, 4), np.float32),
      "sr": np.zeros(2, np.int64)}, r"expected rank 3 \(samples on its first axis\) or 4"),
    ({"input": np.zeros((2, 1, 4), np.float32), "state": np.zeros((3, 2, 1, 4), np.float32),
      "sr": np.zeros(2, np.int64)}, "different numbers of samples"),
    ({"input": np.zeros((2, 1, 4), np.float32), "state": np.zeros((2, 2, 1, 4), np.float32),
      "sr": np.zeros(2, np.int64), "shared/state": np.zeros((2, 1, 4), np.float32)}, "given twice"),
])
def test_malformed_layouts_fail_in_one_line(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_data(path, stateful_model())
    assert "\n" not in str(info.value)


def test_inputs_with_different_fixed_first_dims_cannot_be_stacked():
    data = SampleData({"input": np.zeros((2, 4), np.float32), "state": np.zeros((2, 1, 4), np.float32),
                       "sr": np.zeros(2, np.int64)})
    with pytest.raises(DataError):
        check_data(stateful_model(), data)


# --- end to end ---------------------------------------------------------------------------------


def test_optimize_takes_a_dynamic_model_without_flags_and_verifies_at_two_shapes():
    result = graphopt.optimize(fpn_model())
    assert result.passed
    shapes = result.report["verify"]["shapes"]
    assert shapes[0] == {"x": [1, 3, 64, 64]} and shapes[1] != shapes[0]
    assert result.report["verify"]["second_shape"]["passed"]
    assert result.report["before"]["macs"] and result.report["probe"]["chosen"] == {"x:2": 64, "x:3": 64}
    assert [d.dim_param for d in result.model.graph.input[0].type.tensor_type.shape.dim] == ["batch", "", "H", "W"]


def test_optimize_keeps_minus_one_dims(tmp_path):
    src = tmp_path / "paddle.onnx"
    onnx.save(minus_one(fpn_model()), src)
    result = graphopt.optimize(src, output=tmp_path / "out.onnx")
    assert result.passed
    written = onnx.load(tmp_path / "out.onnx")
    assert [d.dim_value for d in written.graph.input[0].type.tensor_type.shape.dim] == [-1, 3, -1, -1]


def test_optimize_takes_scalar_and_state_inputs_from_random_data_and_from_npz(tmp_path):
    assert graphopt.optimize(stateful_model()).passed
    path = tmp_path / "stream.npz"
    np.savez(path, input=np.ones((4, 1, 4), np.float32), state=np.zeros((4, 2, 1, 4), np.float32),
             **{"shared/sr": np.array(16000, np.int64)})
    result = graphopt.optimize(stateful_model(), data=path)
    assert result.passed and result.report["samples"] == 4


def _bake_reshape(model: onnx.ModelProto, target) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == "target":
            t.CopyFrom(nh.from_array(np.array(target, np.int64), "target"))
    return out


def test_a_rewrite_right_at_one_shape_only_fails_at_the_second():
    # y = Reshape(x, [1, -1]) for x [1, n]; a "rewrite" bakes the probe's n = 64 into the target
    model = _model([h.make_node("Reshape", ["x", "target"], ["r"]), h.make_node("Relu", ["r"], ["y"])],
                   [h.make_tensor_value_info("x", T.FLOAT, [1, "n"])],
                   [h.make_tensor_value_info("y", T.FLOAT, [1, "n"])],
                   [nh.from_array(np.array([1, -1], np.int64), "target")])
    honest = api.verify(model, model)
    assert honest.passed and any("also verified at" in n for n in honest.notes)
    baked = api.verify(model, _bake_reshape(model, [1, 64]))
    assert not baked.passed and any("at the second shape" in r for r in baked.reasons)


def test_a_candidate_that_fixes_a_dynamic_dim_fails():
    ref = fpn_model()
    cand = onnx.ModelProto()
    cand.CopyFrom(ref)
    cand.graph.output[0].type.tensor_type.shape.dim[0].Clear()
    cand.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    assert lost_dynamic_dims(ref, cand) == ["output 'y' axis 0 was dynamic (batch) and is fixed to 1"]
    assert not api.verify(ref, cand).passed


def test_cli_on_a_dynamic_model_needs_no_flags(tmp_path):
    src = tmp_path / "enc.onnx"
    onnx.save(encoder_model(), src)
    proc = subprocess.run([sys.executable, "-m", "graphopt", "optimize", str(src), "-o", str(tmp_path / "o.onnx"),
                           "--report", str(tmp_path / "r.json")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verify"]["passed"] and len(report["verify"]["shapes"]) == 2
    assert set(report["probe"]["values"]) == {"input_ids", "token_type_ids", "attention_mask"}
