"""The command line: results, exit codes, and bad input (one line on stderr, exit 2, nothing written)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.app import cli
from graphopt.core import manager
from graphopt.core.manager import Pass, PassResult, register
from tests.util import init, make_model, tensor

RNG = np.random.default_rng(0)


def small_cnn() -> onnx.ModelProto:
    """Conv -> Identity -> Relu -> GlobalAveragePool -> Flatten -> Gemm, dynamic batch."""
    return make_model(
        [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Identity", ["c"], ["c_id"]),
         helper.make_node("Relu", ["c_id"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1)],
        [tensor("input", ["N", 1, 8, 8])], [tensor("logits", ["N", 3])],
        [init("w", RNG.standard_normal((4, 1, 3, 3)).astype(np.float32)),
         init("b", RNG.standard_normal(4).astype(np.float32)),
         init("fc_w", RNG.standard_normal((3, 4)).astype(np.float32)),
         init("fc_b", np.zeros(3, np.float32))])


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)
    return path


def run_cli(*args, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_optimize_writes_default_output_and_reports(model_path, tmp_path, capsys):
    report_json, report_md = tmp_path / "r.json", tmp_path / "r.md"
    code, out, err = run_cli("optimize", model_path, "--report", report_json, "--report", report_md, capsys=capsys)
    assert code == 0, err
    optimized = onnx.load(tmp_path / "cnn.opt.onnx")
    onnx.checker.check_model(optimized, full_check=True)
    assert "Identity" not in [n.op_type for n in optimized.graph.node]
    report = json.loads(report_json.read_text())
    assert report["before"]["nodes"] == 6 and report["after"]["nodes"] == 5
    assert report["verify"]["passed"] is True and report["verify"]["mode"] == "equivalence"
    ran = {p["name"] for p in report["passes"] if not p.get("group")}
    assert {"identity", "dead_code"} <= ran
    assert "PASS" in out
    assert "PASS" in report_md.read_text()


def test_optimize_is_deterministic(model_path, tmp_path, capsys):
    for name in ("a.onnx", "b.onnx"):
        assert run_cli("optimize", model_path, "-o", tmp_path / name, "-q", capsys=capsys)[0] == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_quiet_prints_nothing(model_path, tmp_path, capsys):
    code, out, err = run_cli("optimize", model_path, "-o", tmp_path / "o.onnx", "-q", capsys=capsys)
    assert code == 0 and out == "" and err == ""


def test_optimize_with_data_file(model_path, tmp_path, capsys):
    data = tmp_path / "d.npz"
    np.savez(data, input=RNG.standard_normal((10, 1, 8, 8)).astype(np.float32), labels=np.arange(10) % 3)
    report = tmp_path / "r.json"
    code, _, err = run_cli("optimize", model_path, "--data", data, "--report", report, "-q", capsys=capsys)
    assert code == 0, err
    verdict = json.loads(report.read_text())["verify"]
    assert verdict["accuracy_reference"] == verdict["accuracy_candidate"]


BAD_CASES = {
    "missing": lambda d: (["optimize", d / "nope.onnx"], "no such file"),
    "directory": lambda d: (["optimize", d], "is a directory"),
    "not_onnx": lambda d: (["optimize", _write(d / "x.onnx", b"hello, world" * 10)], "not"),
    "unknown_pass": lambda d: (["optimize", d / "cnn.onnx", "--passes", "nope"], "unknown pass 'nope'"),
    "unknown_preset": lambda d: (["optimize", d / "cnn.onnx", "--preset", "nope"], "unknown preset"),
    "unknown_option": lambda d: (["optimize", d / "cnn.onnx", "--option", "dead_code.x=1"], "has no option"),
    "bad_option_syntax": lambda d: (["optimize", d / "cnn.onnx", "--option", "garbage"], "pass.key=value"),
    "bad_data_file": lambda d: (["optimize", d / "cnn.onnx", "--data", _write(d / "d.npz", b"junk")], "d.npz"),
    "data_wrong_name": lambda d: (["optimize", d / "cnn.onnx", "--data", _npz(d / "d.npz", x=np.zeros((2, 1, 8, 8),
                                                                                                 np.float32))],
                                  "input"),
    "data_wrong_shape": lambda d: (["optimize", d / "cnn.onnx", "--data", _npz(d / "d.npz", input=np.zeros(
        (2, 3, 8, 8), np.float32))], "input"),
    "bad_input_shape": lambda d: (["optimize", d / "cnn.onnx", "--input-shape", "input=1,2"], "input"),
    "data_shared_unknown": lambda d: (["optimize", d / "cnn.onnx", "--data", _npz(d / "d.npz", **{
        "input": np.zeros((2, 1, 8, 8), np.float32), "shared/nope": np.zeros(3, np.float32)})],
        "array 'shared/nope' matches no model input"),
    "data_shared_wrong_rank": lambda d: (["optimize", d / "cnn.onnx", "--data", _npz(d / "d.npz", **{
        "shared/input": np.zeros((2, 2, 1, 8, 8), np.float32)})], "a shared array is one complete input"),
    "data_per_sample_wrong_dims": lambda d: (["optimize", d / "cnn.onnx", "--data", _npz(d / "d.npz", **{
        "input": np.zeros((2, 1, 2, 8, 8), np.float32)})], "fixes axis 1 to 1"),
    "data_scalar_for_tensor": lambda d: (["optimize", d / "cnn.onnx", "--data", _npz(d / "d.npz", **{
        "input": np.array(1.0, np.float32)})], "(rank 0)"),
    "target_out_of_range": lambda d: (["optimize", d / "cnn.onnx", "--target-macs", "2"], "fraction"),
    "zero_samples": lambda d: (["optimize", d / "cnn.onnx", "--samples", "0"], "--samples must be >= 1"),
    "negative_seed": lambda d: (["optimize", d / "cnn.onnx", "--seed", "-1"], "--seed must be >= 0"),
    "option_out_of_range": lambda d: (["optimize", d / "cnn.onnx", "--preset", "prune", "--option",
                                       "prune_filters.max_rows=0"], "prune_filters.max_rows: must be in [1, inf)"),
    "bad_report_suffix": lambda d: (["optimize", d / "cnn.onnx", "--report", d / "r.txt"], "r.txt"),
    "output_is_input": lambda d: (["optimize", d / "cnn.onnx", "-o", d / "cnn.onnx"], "refusing to overwrite"),
    "usage": lambda d: (["optimize"], "required"),
    "unknown_pass_to_describe": lambda d: (["passes", "nope"], "unknown pass 'nope'"),
    "unknown_target_cpu": lambda d: (["optimize", d / "cnn.onnx", "--target-cpu", "pentium"],
                                     "--target-cpu: unknown CPU kind 'pentium'"),
    "target_cpu_not_a_profile": lambda d: (["optimize", d / "cnn.onnx", "--target-cpu", d / "nope.json"],
                                           "cannot read the profile"),
}


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, model_path, tmp_path, capsys):
    original = model_path.read_bytes()
    args, needle = BAD_CASES[case](tmp_path)
    before = files_in(tmp_path)
    code, out, err = run_cli(*args, capsys=capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error:"), err
    assert needle in lines[0]
    assert "Traceback" not in err
    assert files_in(tmp_path) == before  # no output, no temp file
    assert model_path.read_bytes() == original


def test_truncated_model_and_missing_external_data(model_path, tmp_path, capsys):
    data = model_path.read_bytes()
    truncated = _write(tmp_path / "t.onnx", data[: len(data) // 2])
    code, _, err = run_cli("optimize", truncated, capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    onnx.save(small_cnn(), ext_dir / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    os.remove(ext_dir / "m.data")
    code, _, err = run_cli("optimize", ext_dir / "m.onnx", capsys=capsys)
    assert code == 2 and "external data" in err and len(err.strip().splitlines()) == 1
    assert files_in(ext_dir) == {"m.onnx"}


def test_no_traceback_from_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "graphopt", "optimize", str(tmp_path / "missing.onnx")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"graphopt: error: {tmp_path / 'missing.onnx'}: no such file"


def test_verify_exit_codes(model_path, tmp_path, capsys):
    assert run_cli("verify", model_path, model_path, "-q", capsys=capsys)[0] == 0
    broken = small_cnn()
    broken.graph.initializer[1].CopyFrom(init("b", np.full(4, 5.0, np.float32)))  # a real bug: wrong bias
    onnx.save(broken, tmp_path / "broken.onnx")
    code, out, _ = run_cli("verify", model_path, tmp_path / "broken.onnx", capsys=capsys)
    assert code == 1 and "FAIL" in out
    assert run_cli("verify", model_path, tmp_path / "missing.onnx", capsys=capsys)[0] == 2


class BiasBug(Pass):
    """A 'lossless' pass with a real bug: it shifts the conv bias."""

    name = "test_bias_bug"
    summary = "test only"

    def run(self, model, ctx):
        conv = next(n for n in model.graph.toposort() if n.op_type == "Conv")
        bias = model.graph.add_initializer(conv.inputs[2].array + 1.0, "b_shifted")
        model.graph.set_input(conv, 2, bias)
        return PassResult(True)


@pytest.fixture
def bias_bug():
    register(BiasBug)
    yield
    manager._REGISTRY.pop(BiasBug.name)


def test_failed_verification_exits_1_and_writes_no_model(model_path, tmp_path, capsys, bias_bug):
    report = tmp_path / "r.json"
    code, out, err = run_cli("optimize", model_path, "-o", tmp_path / "o.onnx", "--passes", "test_bias_bug",
                             "--report", report, capsys=capsys)
    assert code == 1 and "not written" in err and "FAIL" in out
    assert not (tmp_path / "o.onnx").exists()
    verdict = json.loads(report.read_text())["verify"]
    assert verdict["passed"] is False and verdict["first_divergence"]
    code, _, _ = run_cli("optimize", model_path, "-o", tmp_path / "o.onnx", "--passes", "test_bias_bug",
                         "--write-failed", "-q", capsys=capsys)
    assert code == 1 and (tmp_path / "o.onnx").exists()


def test_inspect_and_passes(model_path, capsys):
    code, out, _ = run_cli("inspect", model_path, "--json", capsys=capsys)
    assert code == 0
    info = json.loads(out)
    assert info["params"] == 4 * 9 + 4 + 12 + 3 and info["nodes"] == 6
    code, out, _ = run_cli("inspect", model_path, capsys=capsys)
    assert code == 0 and "Conv" in out
    code, out, _ = run_cli("passes", capsys=capsys)
    assert code == 0 and "dead_code" in out and "lossless" in out


def test_quiet_silences_onnxruntime_optimizer_warnings(tmp_path, capfd):
    # ShuffleNet's exported Unsqueeze nodes make onnxruntime's optimizer warn (through its global
    # logger, straight to file descriptor 2) when verification measures ORT_ENABLE_ALL's own noise.
    model = Path(__file__).resolve().parents[1] / "models" / "shufflenet.onnx"
    if not model.exists():
        pytest.skip("zoo model not generated")
    code = cli.main(["optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--samples", "8", "-q"])
    captured = capfd.readouterr()
    assert code == 0 and captured.out == "" and captured.err == ""


def test_passes_name_shows_each_option_with_its_range_and_help(capsys):
    code, out, err = run_cli("passes", "prune_filters", capsys=capsys)
    assert code == 0, err
    flat = " ".join(out.split())
    assert "--option prune_filters.KEY=VALUE" in flat
    assert "max_rows" in flat and "[1, inf)" in flat and "sampled" in flat  # key, range, words of its help
    assert "thinet" in flat and "apoz" in flat  # choices
    code, out, _ = run_cli("passes", "simplify", capsys=capsys)
    assert code == 0 and "no options" in out


class LossyScale(Pass):
    """A 'lossy' pass that scales the first Conv's weights by ``factor``: predictions and maps move."""

    name = "test_lossy_scale"
    summary = "test only"
    lossless = False
    factor = -1.5

    def run(self, model, ctx):
        conv = next(n for n in model.graph.toposort() if n.op_type == "Conv")
        weight = model.graph.add_initializer(conv.inputs[1].array * self.factor, "w_scaled")
        model.graph.set_input(conv, 1, weight)
        return PassResult(True)


class LossyScaleUp(LossyScale):
    name = "test_lossy_scale_up"
    factor = 1.5


@pytest.fixture
def lossy_scale():
    register(LossyScale)
    register(LossyScaleUp)
    yield
    manager._REGISTRY.pop(LossyScale.name)
    manager._REGISTRY.pop(LossyScaleUp.name)


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def _seeded_cnn() -> onnx.ModelProto:
    """small_cnn with weights of its own seed: the tests below do not depend on the shared RNG's state."""
    model, rng = small_cnn(), np.random.default_rng(3)  # a seed whose predictions the -1.5 scale moves
    for t in model.graph.initializer:
        t.CopyFrom(init(t.name, rng.standard_normal(tuple(t.dims)).astype(np.float32)))
    return model


def test_failed_lossy_run_says_what_to_do_on_its_last_line(tmp_path, capsys, lossy_scale):
    out_path, model_path = tmp_path / "o.onnx", tmp_path / "cnn.onnx"
    onnx.save(_seeded_cnn(), model_path)
    code, _, err = run_cli("optimize", model_path, "-o", out_path, "--passes", "test_lossy_scale", capsys=capsys)
    last = _last_line(err)
    assert code == 1 and last.startswith(f"graphopt: verification failed; {out_path} not written; ")
    assert "to accept the loss: --max-drop " in last  # random inputs, class scores judged by agreement
    assert "to verify on real samples: --data / --verify-data FILE.npz" in last
    assert last.endswith("; to write it anyway: --write-failed")
    drop = float(last.split("--max-drop ")[1].split(";")[0])
    assert run_cli("optimize", model_path, "-o", out_path, "--passes", "test_lossy_scale", "--max-drop", drop, "-q",
                   capsys=capsys)[0] == 0  # the budget the line names is enough
    # real samples without labels: labels would let the accuracy drop decide; written anyway: no such hint
    data = tmp_path / "d.npz"
    np.savez(data, input=RNG.standard_normal((16, 1, 8, 8)).astype(np.float32))
    code, _, err = run_cli("optimize", model_path, "-o", out_path, "--passes", "test_lossy_scale", "--data", data,
                           "--write-failed", capsys=capsys)
    last = _last_line(err)
    assert code == 1 and "written anyway" in last and "to write it anyway" not in last
    assert "to judge class scores by the accuracy drop: --verify-data FILE.npz with 'labels'" in last


def test_failed_lossy_run_on_a_map_names_the_similarity_flags(tmp_path, capsys, lossy_scale):
    cnn = _seeded_cnn()
    del cnn.graph.output[:]
    cnn.graph.output.append(tensor("r", ["N", 4, 8, 8]))  # the ReLU map is the output
    path, out_path = tmp_path / "map.onnx", tmp_path / "o.onnx"
    onnx.save(cnn, path)
    code, out, err = run_cli("optimize", path, "-o", out_path, "--passes", "test_lossy_scale_up",
                             "--report", tmp_path / "r.json", capsys=capsys)
    last = _last_line(err)
    assert code == 1 and "--max-drop" not in last and "to accept the error: --min-snr-db " in last
    verdict = json.loads((tmp_path / "r.json").read_text())["verify"]["metrics"]["r"]
    assert verdict["role"] == "map" and verdict["passed"] is False and verdict["rule"].startswith("SNR >= ")
    assert "map" in out and "fail" in out  # the per-output table
    snr = float(last.split("--min-snr-db ")[1].split()[0].rstrip(";"))
    assert snr == math.floor(verdict["snr_db"] * 10) / 10
    assert run_cli("optimize", path, "-o", out_path, "--passes", "test_lossy_scale_up", "--min-snr-db", snr, "-q",
                   capsys=capsys)[0] == 0  # the value the line names is enough
    # noise above the signal: no tolerance accepts it, so no flag is offered for it
    code, _, err = run_cli("optimize", path, "-o", out_path, "--passes", "test_lossy_scale", capsys=capsys)
    assert code == 1 and "to accept" not in _last_line(err) and "--write-failed" in _last_line(err)


def test_verify_accuracy_mode_hint_names_data_not_write_failed(tmp_path, capsys):
    cnn = _seeded_cnn()
    del cnn.graph.output[:]
    cnn.graph.output.append(tensor("r", ["N", 4, 8, 8]))
    scaled = onnx.ModelProto()
    scaled.CopyFrom(cnn)
    scaled.graph.initializer[0].CopyFrom(init("w", onnx.numpy_helper.to_array(cnn.graph.initializer[0]) * 1.5))
    onnx.save(cnn, tmp_path / "ref.onnx")
    onnx.save(scaled, tmp_path / "cand.onnx")
    code, out, err = run_cli("verify", tmp_path / "ref.onnx", tmp_path / "cand.onnx", "--mode", "accuracy",
                             capsys=capsys)
    last = _last_line(err)
    assert code == 1 and last.startswith("graphopt: verification failed; to accept the error: --min-snr-db ")
    assert last.endswith("; to verify on real samples: --data FILE.npz") and "--write-failed" not in last
    assert "rules: r: SNR >= 24 dB, cos >= 0.95" in " ".join(out.split())  # the per-output verdict


def test_a_missed_target_exits_4_says_why_and_writes_nothing(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, stdout, err = run_cli("optimize", model_path, "--preset", "prune", "--target-macs", "0.2", "-o", out,
                                capsys=capsys)
    assert code == 4 and not out.exists()
    assert "target MACs 0.20: reached" in stdout and "missed: prune_filters:" in stdout
    last = err.strip().splitlines()[-1]
    assert last.startswith("graphopt: target MACs 0.20") and "--allow-partial" in last
    code, _, _ = run_cli("optimize", model_path, "--preset", "prune", "--target-macs", "0.2", "-o", out,
                         "--allow-partial", "-q", capsys=capsys)
    assert code == 0 and out.exists()


@pytest.mark.parametrize("kind,source", [("avx512", "uncalibrated"), ("arm64", "uncalibrated"), ("avx2", "shipped")])
def test_target_cpu_is_named_in_the_report_and_the_summary(kind, source, model_path, tmp_path, capsys):
    report_json = tmp_path / "r.json"
    code, out, err = run_cli("optimize", model_path, "--preset", "prune", "--option", "prune_filters.remove_fraction=0.5",
                             "--target-cpu", kind, "-o", tmp_path / "o.onnx", "--report", report_json, capsys=capsys)
    assert code == 0, err
    target = json.loads(report_json.read_text())["target_cpu"]
    assert (target["name"], target["profile"]["source"], target["requested"]) == (kind, source, kind)
    text = " ".join(out.split())
    assert f"target CPU: {kind} (profile: {source})" in text          # the header
    assert f"target CPU {kind} (asked for; this machine:" in text        # the line under the verdict
    if source == "uncalibrated":
        assert "prices are MACs" in text
