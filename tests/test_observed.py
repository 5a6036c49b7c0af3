"""Sizes only data decides, read off one onnxruntime run (graphopt.measure.observed)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from graphopt.app import api, cli, report
from graphopt.core.onnx_io import from_proto, load
from graphopt.measure import analysis, observed
from graphopt.measure import ort as gort
from graphopt.measure.calibration import SampleData

# A streaming front end in miniature: at 16 kHz a strided conv halves the 16 frames, otherwise a plain
# conv keeps them; a pointwise conv follows. The If's output length depends on the *value* of `sr`, so
# no static inference sizes it (the branches disagree) and the last conv's MACs are unknown.
FRONT_END = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 4, 16] x, int64 sr) => (float[1, 4, L] y) <int64 rate = {16000}> {
    c = Equal (sr, rate)
    h = If (c) <
        then_branch = t () => (float[1, 4, 8] a) { a = Conv <strides = [2]> (x, w1) },
        else_branch = e () => (float[1, 4, 16] b) { b = Conv (x, w2) }
    >
    y = Conv (h, w3)
}
"""
THEN_MACS, ELSE_MACS = 4 * 8 * 4, 4 * 16 * 4   # |Y|·Cin·k for the branch convs (k = 1)
EQUAL = 1                                       # one comparison


def front_end() -> onnx.ModelProto:
    proto = onnx.parser.parse_model(FRONT_END)
    for name in ("w1", "w2", "w3"):
        proto.graph.initializer.append(numpy_helper.from_array(np.ones((4, 4, 1), np.float32), name))
    onnx.checker.check_model(proto)
    return proto


def sample(sr: int) -> SampleData:
    rng = np.random.default_rng(0)
    return SampleData({"x": rng.standard_normal((1, 4, 16)).astype(np.float32), "sr": np.array(sr)},
                      layout={"sr": "shared"})


def test_static_analysis_cannot_size_the_branch_output():
    cost = analysis.analyze(from_proto(front_end()))
    assert cost.macs is None and cost.macs_known == EQUAL + THEN_MACS + ELSE_MACS   # both branches, downstream unknown
    summary = cost.summary()
    assert summary["unknown_macs_ops"] == {"Conv": 1}
    assert summary["unknown_macs_reason"].startswith("<Conv#5>: ") and "input values decide" in summary["unknown_macs_reason"]


@pytest.mark.parametrize("sr, branch, length", [(16000, THEN_MACS, 8), (8000, ELSE_MACS, 16)])
def test_a_run_sizes_the_branch_output_and_counts_the_branch_that_ran(sr, branch, length):
    model = from_proto(front_end())
    cost = observed.cost_at_sample(model, None, sample(sr))
    assert cost.macs == EQUAL + branch + 4 * length * 4          # the branch that ran, then the conv at its length
    ran, idle = ("then_branch", "else_branch") if sr == 16000 else ("else_branch", "then_branch")
    convs = {n.scope.rsplit(".", 1)[-1] if n.scope else "main": n for n in cost.per_node if n.op_type == "Conv"}
    assert convs[ran].macs == branch and convs[idle].macs == 0 and "did not take" in convs[idle].note
    assert convs["main"].output_shapes == [(1, 4, length)]
    assert cost.params == 3 * 16 + 1                   # the idle branch's weights still count
    assert cost.summary()["observed"] == 3             # the If's and the conv's output sizes, the branch


def test_a_model_sized_statically_is_not_run(monkeypatch):
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) { y = Relu (x) }""")
    monkeypatch.setattr(gort, "session", lambda *a, **k: pytest.fail("a session was built"))
    cost = observed.cost_at_sample(from_proto(proto), None, SampleData({"x": np.ones((1, 4), np.float32)}))
    assert cost.macs == 4 and cost.observed == 0


def test_a_sample_of_another_shape_is_not_used():
    model = from_proto(front_end())
    cost = observed.cost_at_sample(model, {"x": (1, 4, 16)},
                                   SampleData({"x": np.ones((1, 4, 32), np.float32), "sr": np.array(16000)},
                                              layout={"sr": "shared"}))
    assert cost.macs is None and any("not observed" in w for w in cost.warnings)


def test_a_model_onnxruntime_cannot_run_keeps_its_lower_bound():
    proto = front_end()
    proto.graph.node[-1].op_type = "NoSuchOp"
    proto.graph.node[-1].domain = "custom.domain"
    proto.opset_import.append(onnx.helper.make_opsetid("custom.domain", 1))
    cost = observed.cost_at_sample(from_proto(proto), None, sample(16000))
    assert cost.macs is None and any("not observed" in w for w in cost.warnings)


def test_optimize_reports_the_macs_of_the_sample_and_says_so(tmp_path, capsys):
    path = tmp_path / "front.onnx"
    onnx.save(front_end(), path)
    data = tmp_path / "d.npz"
    np.savez(data, x=sample(16000).inputs["x"], **{"shared/sr": np.array(16000)})
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(path), "-o", str(out), "--data", str(data), "--report",
                     str(tmp_path / "r.json")]) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["before"]["macs"] == got["after"]["macs"] == EQUAL + THEN_MACS + 4 * 8 * 4
    assert "MACs at the first sample" in capsys.readouterr().out


def test_the_summary_says_why_macs_are_a_lower_bound():
    cost = analysis.analyze(from_proto(front_end()))
    line = report.macs_line({"before": cost.summary(), "after": cost.summary()})
    assert line.startswith("MACs (before) are a lower bound: 1 nodes unknown (Conv); first: <Conv#5>: ")
    assert report.macs_line({"before": {"macs": 10}, "after": {"macs": 5}}) is None


def test_the_corpus_voice_detector_is_counted_at_its_sample():
    """vad_stream (a TorchScript export with an If on its sample-rate input) has MACs at its sample."""
    model = load("models/corpus/vad_stream.onnx")
    data = api.sample_data(model, "models/corpus/vad_stream.npz")
    static = analysis.analyze(model)
    cost = observed.cost_at_sample(model, None, data)
    assert static.macs is None and cost.macs is not None and cost.observed > 0
    idle = [n for n in cost.per_node if n.note.startswith("in an If branch")]
    assert idle and all(n.macs == 0 for n in idle)
