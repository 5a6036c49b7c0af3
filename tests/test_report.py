"""Tests for graphopt.app.report: the JSON, Markdown, HTML and terminal renderings of an optimize report."""

from __future__ import annotations

import copy
import doctest
import html.parser
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from rich.console import Console

import graphopt.app.report
from graphopt.app.report import (
    MAX_TABLE_ROWS,
    format_bytes,
    format_count,
    format_ratio,
    print_summary,
    render_html,
    render_markdown,
    stats_digest,
    write_report,
)
from graphopt.core.errors import GraphoptError, OptionError

EVIL = "<script>alert('x')</script>"


@pytest.fixture
def report() -> dict:
    return {
        "graphopt_version": "0.1.0", "model": "in.onnx", "output": "in.opt.onnx", "preset": "lossless",
        "passes_requested": ["cleanup", "fold_batchnorm", EVIL],
        "before": {"params": 1_234_567, "macs": 456_700_000, "bytes": 4_938_268, "nodes": 120,
                   "file_bytes": 5_000_000},
        "after": {"params": 617_000, "macs": 200_000_000, "bytes": 2_468_000, "nodes": 80, "file_bytes": 2_600_000},
        "passes": [
            {"name": "cleanup", "changed": True, "seconds": 0.0123, "stats": {"removed": 40, "folded": 3}},
            {"name": "fold_batchnorm", "changed": True, "seconds": 0.25,
             "stats": {"folded": 2, "by_kind": {"conv": 2},
                       "skipped": [{"node": "bn_3", "reason": "shared weight | w"},
                                   {"node": "bn_7", "reason": "no conv before", "extra": [1, 2]}]}},
            {"name": EVIL, "changed": False, "seconds": 1.5, "stats": {}},
        ],
        "verify": {"passed": True, "mode": "equivalence", "reasons": [],
                   "metrics": {"outputs": {"logits": {"max_abs": 1.25e-6, "cosine": 0.9999999}}, "samples": 8},
                   "tolerance": {"atol": 1e-4, "rtol": 1e-3}, "first_divergence": None,
                   "accuracy_reference": None, "accuracy_candidate": None},
        "seconds": 2.5,
    }


@pytest.fixture
def failed(report) -> dict:
    bad = copy.deepcopy(report)
    bad["verify"].update(passed=False, reasons=["max_abs 0.31 > atol 0.0001 on 'logits'"],
                         first_divergence="conv_3_out")
    bad["verify"]["metrics"]["outputs"]["logits"]["max_abs"] = 0.31
    return bad


# ------------------------------------------------------------------------------------------------
# formatting


@pytest.mark.parametrize("n, text", [
    (0, "0"), (999, "999"), (1000, "1.00k"), (45_678, "45.7k"), (456_700, "456.7k"), (999_990, "1.00M"),
    (1_234_567, "1.23M"), (4.1e9, "4.10G"), (-2500, "-2.50k"), (None, "unknown"),
])
def test_format_count(n, text):
    assert format_count(n) == text


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (1536, "1.50 KiB"), (102_500_000, "97.8 MiB"), (3 * 2**30, "3.00 GiB"),
    (None, "unknown"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_format_ratio_and_digest():
    assert format_ratio(200, 100) == "0.5×"
    assert format_ratio(0, 5) == format_ratio(None, 5) == "-"
    assert stats_digest({"folded": 2, "skipped": [{}, {}], "by": {"conv": 1}}) == "folded=2, 2 skipped, by.conv=1"
    assert len(stats_digest({f"k{i}": i for i in range(50)}, width=40)) == 40


# ------------------------------------------------------------------------------------------------
# JSON


def test_json_round_trips(report, tmp_path):
    path = write_report(report, tmp_path / "r.json")
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert loaded == report
    assert list(loaded) == list(report)  # the producer's key order is kept


def test_json_is_strict_and_converts_numpy(report, tmp_path):
    report["verify"]["metrics"] = {"max_rel": float("inf"), "nan": float("nan"), "np": np.float32(0.5),
                                   "arr": np.arange(3), "shape": (1, 2)}
    text = write_report(report, tmp_path / "r.json").read_text(encoding="utf-8")
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert metrics["verify"]["metrics"] == {"max_rel": "Infinity", "nan": "NaN", "np": 0.5, "arr": [0, 1, 2],
                                            "shape": [1, 2]}


# ------------------------------------------------------------------------------------------------
# Markdown


def test_markdown_has_verdict_numbers_and_stats(report, tmp_path):
    md = write_report(report, tmp_path / "r.md").read_text(encoding="utf-8")
    assert md.splitlines()[2].startswith("**PASS**")
    for text in ("1.23M", "617.0k", "456.7M", "0.5×", "4.71 MiB", "| 120 | 80 |", "`fold_batchnorm`",
                 "max\\_abs 1.250e-06", "0.9999999"):
        assert text in md, text
    assert "| node | reason | extra |" in md  # a list of dicts becomes a sub-table
    assert "shared weight \\| w" in md  # a pipe in a cell must not split it
    assert EVIL not in md.replace(f"`{EVIL}`", "")  # raw only inside code spans, which render literally


def test_markdown_failure_lists_reasons(failed):
    md = render_markdown(failed)
    assert "**FAIL**" in md
    assert "max\\_abs 0.31 &gt; atol 0.0001 on 'logits'" in md
    assert "`conv_3_out`" in md


def test_markdown_cuts_long_tables(report):
    report["passes"][1]["stats"]["skipped"] = [{"node": f"n{i}", "reason": "r"} for i in range(MAX_TABLE_ROWS + 5)]
    md = render_markdown(report)
    assert f"| n{MAX_TABLE_ROWS - 1} |" in md and f"| n{MAX_TABLE_ROWS} |" not in md
    assert "5 more rows" in md


def test_missing_parts_render(report):
    del report["verify"], report["passes"]
    report["after"].update(macs=None, macs_known=150_000_000)
    report["extra_section"] = {"note": "added by a newer graphopt"}
    md = render_markdown(report)
    assert "NOT VERIFIED" in md and "≥ 150.0M" in md and "added by a newer graphopt" in md
    assert "NOT VERIFIED" in render_html(report)


# ------------------------------------------------------------------------------------------------
# HTML


class _TagBalance(html.parser.HTMLParser):
    """Fails on any end tag that does not close the innermost open element."""

    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass  # <meta ... /> opens and closes itself

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


@pytest.mark.parametrize("which", ["report", "failed"])
def test_html_is_well_formed_and_escaped(which, request, tmp_path):
    page = write_report(request.getfixturevalue(which), tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    checker = _TagBalance()
    checker.feed(page)
    checker.close()
    assert checker.stack == []
    root = ET.fromstring(page.split("\n", 1)[1])  # XHTML-compatible: parses as XML too
    assert root.tag == "html"
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "src=" not in page and "<link" not in page  # self-contained
    assert root.find(".//svg") is not None or root.find(".//{http://www.w3.org/2000/svg}svg") is not None
    verdict = root.find(".//p[@class]")
    assert verdict is not None and verdict.findtext("strong") == ("PASS" if which == "report" else "FAIL")


# ------------------------------------------------------------------------------------------------
# writing


def test_unknown_suffix_raises_option_error(report, tmp_path):
    with pytest.raises(OptionError, match=r"\.txt"):
        write_report(report, tmp_path / "r.txt")
    with pytest.raises(OptionError):
        write_report(report, tmp_path / "report")
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(report, tmp_path, monkeypatch):
    for suffix in (".json", ".md", ".html", ".HTML"):
        write_report(report, tmp_path / f"r{suffix}")
    write_report(report, tmp_path / "r.json")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.HTML", "r.html", "r.json", "r.md"]
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(GraphoptError, match="No space left"):
        write_report(report, tmp_path / "new.md")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.HTML", "r.html", "r.json", "r.md"]


def test_missing_folder_is_a_user_error(report, tmp_path):
    with pytest.raises(GraphoptError, match="cannot write report"):
        write_report(report, tmp_path / "nope" / "r.json")


# ------------------------------------------------------------------------------------------------
# terminal


def _printed(report: dict) -> str:
    console = Console(record=True, width=120)
    print_summary(report, console)
    return console.export_text()


def test_print_summary_pass(report):
    report["passes"][0]["name"] = "[bold]cleanup[/bold]"  # must print as written, not as rich markup
    text = _printed(report)
    assert "PASS — equivalence" in text and "1.250e-06" in text
    for expected in ("1.23M", "617.0k", "0.5×", "4.71 MiB", "[bold]cleanup[/bold]", EVIL, "removed=40", "12 ms"):
        assert expected in text, expected


def test_print_summary_prints_a_pass_notice_in_full(report):
    long = "--max-drop 1: at the target the calibration samples lost 1.95 points " + "x" * 80
    report["passes"][0]["stats"]["notice"] = long
    text = _printed(report).replace("\n", "")
    assert f"{report['passes'][0]['name']}: {long}" in text  # whole, though the table clips digests at 60
    del report["passes"][0]["stats"]["notice"]
    assert "--max-drop" not in _printed(report)


def test_print_summary_fail(failed):
    text = _printed(failed)
    assert "FAIL — equivalence" in text
    assert "max_abs 0.31 > atol 0.0001 on 'logits'" in text
    assert "conv_3_out" in text


def test_docstring_examples_run():
    assert doctest.testmod(graphopt.app.report).failed == 0


def test_terminal_summary_folds_fixed_point_rounds_into_one_row_per_pass():
    from rich.console import Console

    from graphopt.app.report import format_seconds, print_summary
    report = {"model": "m.onnx", "passes": [
        {"name": "fold", "changed": True, "seconds": 0.5, "stats": {"folded": 3}},
        {"name": "dce", "changed": False, "seconds": 0.25, "stats": {"removed": 0}},
        {"name": "fold", "changed": False, "seconds": 0.5, "stats": {"folded": 0}},
        {"name": "dce", "changed": False, "seconds": 0.25, "stats": {"removed": 0}}],
        "verify": {"passed": True, "mode": "equivalence"}}
    console = Console(record=True, width=120)
    print_summary(report, console)
    text = console.export_text()
    assert "fold ×2" in text and "dce ×2" in text
    assert "folded=3" in text and "folded=0" not in text  # the digest of the run that changed
    assert format_seconds(1.0) in text  # the two runs of fold (0.5 s each) are summed


@pytest.mark.parametrize("mode,held_out,expected", [
    ("accuracy", True, "on 300 held-out samples"),
    ("accuracy", False, "on the 300 calibration samples (lossy passes fit these"),
    ("equivalence", False, "on 300 samples"),
])
def test_verdict_says_which_samples_the_accuracy_was_measured_on(mode, held_out, expected):
    console = Console(record=True, width=400)
    verify = {"passed": True, "mode": mode, "metrics": {}, "reasons": [], "accuracy_reference": 90.0,
              "accuracy_candidate": 89.5, "samples": 300, "held_out": held_out}
    graphopt.app.report.print_verdict(verify, console)
    text = console.export_text()
    assert expected in text
    assert ("calibration" in text) == (mode == "accuracy" and not held_out)


# ------------------------------------------------------------------------------------------------
# the per-output verdict and the hints after a failed lossy run


def _lossy_verify(**changes) -> dict:
    verify = {"passed": False, "mode": "accuracy", "reasons": ["x"], "class_output": "logits",
              "accuracy_drop": None, "tolerance": {"max_drop": 1.0, "min_snr_db": 20.0, "min_cosine": 0.99},
              "metrics": {
                  "logits": {"name": "logits", "kind": "float", "role": "class scores", "compared": True,
                             "cosine_min": 0.97, "cosine_mean": 0.995, "snr_db": 21.93, "snr_db_min": 13.0,
                             "top1_agreement": 0.958, "rule": "top-1 agreement >= 99%", "passed": False},
                  "mask": {"name": "mask", "kind": "float", "role": "map", "compared": True, "cosine_min": 0.9999996,
                           "cosine_mean": 0.9999999, "snr_db": "Infinity", "snr_db_min": "Infinity",
                           "rule": "SNR >= 20 dB, cos >= 0.99", "passed": True},
                  "ids": {"name": "ids", "kind": "exact", "role": "exact", "compared": False, "rule": None,
                          "passed": False}}}
    verify.update(changes)
    return verify


def test_per_output_table_in_the_terminal_markdown_and_html():
    wide, narrow = Console(record=True, width=160), Console(record=True, width=80)
    for console in (wide, narrow):
        graphopt.app.report.print_verdict(_lossy_verify(), console)
    text = wide.export_text()
    row = next(line for line in text.splitlines() if line.strip().startswith("logits"))
    for cell in ("class scores", "0.970000", "0.995000", "21.9", "13.0", "top-1 agreement >= 99%", "fail"):
        assert cell in row, cell
    row = next(line for line in text.splitlines() if line.strip().startswith("mask"))
    assert "0.999999" in row and "1.000000" not in row and "∞" in row and "pass" in row
    assert "not compared" in next(line for line in text.splitlines() if line.strip().startswith("ids"))
    assert "rules: logits: top-1 agreement >= 99%; mask: SNR >= 20 dB, cos >= 0.99" in \
        narrow.export_text().replace("\n", " ")
    report = {"model": "m.onnx", "verify": _lossy_verify()}
    assert "| logits | class scores | 0.970000 |" in render_markdown(report)
    assert "<td>top-1 agreement &gt;= 99%</td><td>fail</td>" in render_html(report)


def test_no_output_table_for_metrics_that_are_not_per_output(report):
    assert graphopt.app.report.output_rows(report["verify"]) == []
    assert "Outputs" not in _printed(report)


@pytest.mark.parametrize("changes, random_data, write_failed, expected", [
    ({}, True, False, ["to accept the loss: --max-drop 4.2", "to verify on real samples: --data / --verify-data "
                       "FILE.npz", "to write it anyway: --write-failed"]),
    ({}, False, True, ["to accept the loss: --max-drop 4.2",
                       "to judge class scores by the accuracy drop: --verify-data FILE.npz with 'labels'"]),
    ({"accuracy_drop": 2.34}, False, None, ["to accept the loss: --max-drop 2.4"]),
    ({"passed": True}, True, False, []),
    ({"mode": "equivalence"}, True, False, []),
])
def test_failure_hints_name_only_what_applies(changes, random_data, write_failed, expected):
    hints = graphopt.app.report.failure_hints(_lossy_verify(**changes), random_data=random_data,
                                              write_failed=write_failed)
    assert hints == expected


def test_failure_hints_for_similarity_give_the_values_that_pass():
    verify = _lossy_verify()
    verify["metrics"]["logits"]["passed"] = True
    verify["metrics"]["mask"].update(passed=False, snr_db=17.46, cosine_min=0.98765)
    hints = graphopt.app.report.failure_hints(verify, random_data=False, write_failed=None)
    assert hints == ["to accept the error: --min-snr-db 17.4 --min-cosine 0.9876"]
    verify["metrics"]["mask"].update(snr_db=-3.0)  # more noise than signal: nothing to offer
    assert graphopt.app.report.failure_hints(verify, random_data=False, write_failed=None) == []
