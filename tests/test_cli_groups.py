"""``graphopt inspect MODEL --groups``: the channel groups table and its JSON form."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from graphopt.app import cli
from tests import test_channels as tc

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def unknown_path(tmp_path: Path) -> Path:
    path = tmp_path / "lrn.onnx"
    onnx.save(tc.unknown_op(), path)
    return path


def test_groups_json_lists_every_group(unknown_path, capsys):
    code, out, err = run_cli("inspect", unknown_path, "--groups", "--json", capsys=capsys)
    assert code == 0, err
    data = json.loads(out)
    proto = tc.unknown_op()
    lrn = next(n for n in proto.graph.node if n.op_type == "LRN")
    groups = data["groups"]
    assert [g["gid"] for g in groups] == list(range(len(groups)))
    assert data["prunable"] == sum(g["prunable"] for g in groups) and data["prunable"] >= 1
    assert data["frozen"] == sum(g["frozen"] is not None for g in groups) == 2  # the LRN's input, the logits
    frozen = [g for g in groups if g["frozen"]]
    assert any("LRN" in g["frozen"] and lrn.name in g["frozen"] for g in frozen)
    assert any("graph output" in g["frozen"] for g in frozen)
    for g in groups:
        assert g["size"] >= 1 and g["members"] and g["producers"]
        for m in g["members"]:
            assert {"value", "axis", "axes", "per_channel", "param"} <= set(m)
    conv_names = {n.name for n in proto.graph.node if n.op_type == "Conv"}
    assert conv_names <= {p["node"] for g in groups for p in g["producers"]}
    # the conv after the LRN reads channels the analysis does not follow: it is nobody's consumer
    after_lrn = next(n.name for n in proto.graph.node if n.op_type == "Conv" and n.input[0] == lrn.output[0])
    gemm = next(n.name for n in proto.graph.node if n.op_type == "Gemm")
    assert {c["node"] for g in groups for c in g["consumers"]} == {gemm}
    assert after_lrn in {p["node"] for g in groups for p in g["producers"]}


def test_groups_table_shows_status_producers_and_reason(unknown_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run_cli("inspect", unknown_path, "--groups", capsys=capsys)
    assert code == 0, err
    assert "Channel groups: 3, prunable 1, frozen 2" in out
    assert "prunable" in out and "frozen" in out and "LRN" in out
    proto = tc.unknown_op()
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert node.name in out  # every layer appears as a producer or consumer
    assert "graph output" in out


def test_groups_on_a_zoo_model(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, err = run_cli("inspect", ROOT / "models" / "lenet5.onnx", "--groups", "--json", capsys=capsys)
    assert code == 0, err
    data = json.loads(out)
    sizes = sorted(g["size"] for g in data["groups"] if g["prunable"])
    model = onnx.load(ROOT / "models" / "lenet5.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    widths = sorted(inits[n.input[1]].dims[0] for n in model.graph.node if n.op_type == "Conv")
    assert widths == sizes[:len(widths)]  # each conv's filters are a prunable group of that size
    flat = next(m for g in data["groups"] for m in g["members"] if m["per_channel"] > 1)
    assert flat["per_channel"] == 16  # 4x4 feature block per channel in front of the first Gemm


def test_groups_bad_input_is_exit_2(tmp_path, capsys):
    code, out, err = run_cli("inspect", tmp_path / "missing.onnx", "--groups", capsys=capsys)
    assert code == 2 and "error" in err and out == ""
    code, out, err = run_cli("inspect", ROOT / "models" / "lenet5.onnx", "--groups", "-q", capsys=capsys)
    assert code == 0 and out == ""


def test_groups_lossless_lists_the_ids_the_prune_preset_takes(tmp_path, capsys):
    """mobilenetv2's last block's project conv merges into the head conv under the lossless cleanup:
    one group fewer, renumbered. ``--lossless`` lists the ids ``prune_filters.channels`` takes."""
    path = ROOT / "models" / "mobilenetv2.onnx"
    code, out, err = run_cli("inspect", path, "--groups", "--json", capsys=capsys)
    raw = [g for g in json.loads(out)["groups"] if g["prunable"]]
    code, out, err = run_cli("inspect", path, "--groups", "--lossless", "--json", capsys=capsys)
    assert code == 0, err
    cleaned = [g for g in json.loads(out)["groups"] if g["prunable"]]
    assert len(cleaned) == len(raw) - 1
    last = cleaned[-1]
    output = tmp_path / "pruned.onnx"
    code, out, err = run_cli("optimize", path, "--preset", "prune", "-o", output, "--no-verify", "-q",
                             "--report", tmp_path / "r.json",
                             "--option", f"prune_filters.channels={last['gid']}:{last['size'] // 2}",
                             "--option", "prune_filters.refit=false", capsys=capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    stats = next(p["stats"] for p in report["passes"] if p["name"] == "prune_filters")
    after = {g["group"]: g["channels_after"] for g in stats["groups"]}
    assert after[last["gid"]] == last["size"] // 2 and stats["pruned_groups"] == 1
    # The raw listing's last prunable id is the (frozen) logits group of the model prune_filters sees:
    # refused with a pointer to --lossless, nothing written.
    code, out, err = run_cli("optimize", path, "--preset", "prune", "-o", tmp_path / "bad.onnx", "--no-verify",
                             "--option", f"prune_filters.channels={raw[-1]['gid']}:8", capsys=capsys)
    assert code == 2 and "is frozen" in err and "inspect --groups --lossless" in err
    assert not (tmp_path / "bad.onnx").exists()


def test_lossless_without_groups_is_exit_2(capsys):
    code, out, err = run_cli("inspect", ROOT / "models" / "lenet5.onnx", "--lossless", capsys=capsys)
    assert code == 2 and "--lossless only applies with --groups" in err
