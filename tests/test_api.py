"""The Python API mirrors the CLI: optimize / verify / inspect on paths, ModelProtos and IR models."""

from __future__ import annotations

import onnx
import pytest

import graphopt
from graphopt.core import onnx_io
from graphopt.core.errors import GraphoptError, OptionError
from graphopt.measure.calibration import SampleData
from tests.test_cli import small_cnn


def test_top_level_names_are_the_api_functions():
    assert callable(graphopt.verify) and callable(graphopt.optimize) and callable(graphopt.inspect)


def test_optimize_a_modelproto_leaves_it_untouched():
    proto = small_cnn()
    snapshot = proto.SerializeToString()
    result = graphopt.optimize(proto)
    assert result.passed and result.report["output"] is None
    assert [n.op_type for n in result.model.graph.node].count("Identity") == 0
    assert proto.SerializeToString() == snapshot
    assert result.report["model"] == "<in memory>" and result.report["before"]["nodes"] == 6


def test_optimize_an_ir_model_and_write(tmp_path):
    model = onnx_io.from_proto(small_cnn())
    out = tmp_path / "o.onnx"
    result = graphopt.optimize(model, output=out)
    assert out.exists() and result.report["output"] == str(out)
    assert result.report["after"]["file_bytes"] == out.stat().st_size
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_optimize_with_sample_data_object_and_samples_cap():
    proto = small_cnn()
    data = graphopt.app.api.sample_data(onnx_io.from_proto(proto), None, samples=10, seed=3)
    assert isinstance(data, SampleData) and data.n_samples == 10
    result = graphopt.optimize(proto, data=data, samples=4)
    assert result.report["samples"] == 4


def test_optimize_rejects_bad_options_before_work():
    with pytest.raises(OptionError, match="has no option"):
        graphopt.optimize(small_cnn(), options=["identity.bogus=1"])
    with pytest.raises(OptionError, match="fraction"):
        graphopt.optimize(small_cnn(), target_params=0)
    with pytest.raises(GraphoptError, match="expected a path"):
        graphopt.optimize(42)


def test_verify_and_inspect(tmp_path):
    path = tmp_path / "m.onnx"
    proto = small_cnn()
    onnx.save(proto, path)
    verdict = graphopt.verify(path, proto)
    assert verdict.passed and verdict.to_dict()["passed"] is True
    with pytest.raises(OptionError, match="mode"):
        graphopt.verify(path, path, mode="approximately")
    cost = graphopt.inspect(path)
    assert cost.nodes == 6 and cost.file_bytes == path.stat().st_size
    assert not graphopt.verify(path, small_cnn()).passed  # fresh random weights: a different model


def test_lossy_pipeline_verifies_on_held_out_data_when_given(tmp_path, capsys):
    from pathlib import Path

    from graphopt.app import cli

    models = Path(__file__).resolve().parents[1] / "models"
    model = onnx_io.load(models / "lenet300.onnx")
    calib = graphopt.app.api.sample_data(model, models / "fmnist_calib.npz", samples=128)
    held_out = graphopt.app.api.sample_data(model, models / "fmnist_eval.npz", samples=300)
    kwargs = dict(passes=["lowrank"], options=["lowrank.ratio=0.3"], data=calib, max_drop=100.0)
    on_calib = graphopt.optimize(models / "lenet300.onnx", **kwargs)
    on_held_out = graphopt.optimize(models / "lenet300.onnx", verify_data=held_out, **kwargs)
    assert on_calib.report["verify"]["mode"] == "accuracy"
    assert (on_calib.report["verify"]["held_out"], on_calib.report["verify"]["samples"]) == (False, 128)
    assert (on_held_out.report["verify"]["held_out"], on_held_out.report["verify"]["samples"]) == (True, 300)
    # the same optimized model, judged on different samples
    assert on_calib.model.SerializeToString() == on_held_out.model.SerializeToString()
    assert on_calib.report["verify"]["accuracy_reference"] != on_held_out.report["verify"]["accuracy_reference"]
    code = cli.main(["optimize", str(models / "lenet300.onnx"), "--passes", "lowrank", "--option",
                     "lowrank.ratio=0.3", "--data", str(models / "fmnist_calib.npz"), "--samples", "128",
                     "--verify-data", str(models / "fmnist_eval.npz"), "--max-drop", "100",
                     "-o", str(tmp_path / "out.onnx")])
    assert code == 0 and (tmp_path / "out.onnx").exists()
    assert "on 128 held-out samples" in " ".join(capsys.readouterr().out.split())


def test_a_missed_target_is_reported_with_its_reason_and_writes_nothing(tmp_path):
    # 4 filters cannot be pruned in multiples of 8: nothing can be removed, so 0.2 of the MACs is out of reach
    out = tmp_path / "o.onnx"
    result = graphopt.optimize(small_cnn(), output=out, preset="prune", target_macs=0.2)
    target = result.report["target"]
    assert result.passed and not result.target_met and not out.exists()
    assert target["macs"]["target"] == 0.2 and target["macs"]["reached"] > 0.9 and not target["met"]
    assert target["reason"].startswith("prune_filters:")
    partial = graphopt.optimize(small_cnn(), output=out, preset="prune", target_macs=0.2, allow_partial=True)
    assert not partial.target_met and out.exists()


def test_a_reached_target_and_no_target():
    assert graphopt.optimize(small_cnn()).report["target"] is None
    outcome = graphopt.app.api.target_outcome(0.5, None, {"macs": 100}, {"macs": 52}, [])
    assert outcome == {"macs": {"target": 0.5, "reached": 0.52, "met": True}, "met": True}
    missed = graphopt.app.api.target_outcome(0.5, 0.5, {"macs": 100, "params": 10}, {"macs": None, "params": 9}, [])
    assert not missed["met"] and missed["reason"] == "macs unknown at the analysed shapes"


def test_a_missed_target_names_the_passs_own_reason_first():
    from types import SimpleNamespace as Record
    reason = graphopt.app.api._miss_reason
    frozen = [{"reason": "group frozen: 'logits' is a graph output", "count": 1}]
    # the allocation's own account beats the ledger of what was left alone
    stopped = {"allocation": {"not_met": "every prunable group is down to one channel unit"}, "left_alone": frozen}
    assert reason([Record(name="prune_filters", stats=stopped)]) == \
        "prune_filters: every prunable group is down to one channel unit"
    # with neither, the ledger
    assert reason([Record(name="prune_filters", stats={"left_alone": frozen})]).startswith(
        "prune_filters: 1 left alone, most because group frozen")
