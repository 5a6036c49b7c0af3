"""The optimize report, for machines (JSON) and for people (Markdown, HTML, the terminal).

The pass manager builds one report dict::

    {"graphopt_version", "model", "output", "preset", "passes_requested",
     "before": {"params", "macs", "bytes", "nodes", "file_bytes"}, "after": {...},
     "passes": [{"name", "changed", "seconds", "stats": {...any JSON...}}],
     "verify": {"passed", "mode", "reasons", "metrics", "tolerance", "first_divergence",
                "accuracy_reference", "accuracy_candidate"},
     "seconds"}

Every renderer tolerates missing keys, ``None`` values and extra keys (extra top-level keys are shown
in a final "Other" section). :func:`write_report` picks the format from the file suffix and writes
atomically; :func:`print_summary` is what ``graphopt optimize`` prints.

Rules shared by the renderers:

* ratio = after / before (``0.48×`` means 52 % smaller); no ratio when either side is unknown or
  ``before`` is 0.
* unknown MACs (``None``) read ``unknown``, or ``≥ <macs_known>`` when the analysis gave a lower bound.
* arbitrary stats and metrics are flattened: nested dicts become dotted keys in a key/value table,
  a list of dicts becomes a sub-table (columns = the union of their keys), a list of scalars a
  comma-separated cell; long tables are cut at :data:`MAX_TABLE_ROWS` rows (the JSON report has all).
* JSON is strict: non-finite floats are written as the strings ``"NaN"``, ``"Infinity"``,
  ``"-Infinity"``; numpy scalars and arrays, tuples, sets and paths become plain JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from graphopt.core.errors import GraphoptError, OptionError
from graphopt.core.numbers import format_bytes, format_count, format_ratio, format_seconds
from graphopt.measure.probe import describe_shapes
from graphopt.measure.verify import SIMILARITY_ROLES

MAX_TABLE_ROWS = 100
MAX_LIST_ITEMS = 20

# ====================================================================================================
# option values


def format_value(v: Any) -> str:
    """A scalar, list or nested value as one short line (stats cells, metric values)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        text = f"{v:.6g}"
        # A cosine of 0.9999999 must not read as a perfect 1.
        return f"{v:.10g}" if float(text) != v and float(text).is_integer() else text
    if isinstance(v, (list, tuple)) and all(is_scalar(x) for x in v):
        shown = ", ".join(format_value(x) for x in v[:MAX_LIST_ITEMS])
        more = len(v) - MAX_LIST_ITEMS
        return f"{shown}, … ({more} more)" if more > 0 else shown
    if isinstance(v, str):
        return v
    text = json.dumps(_jsonable(v), ensure_ascii=False)
    return text if len(text) <= 200 else text[:199] + "…"


def is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


# ====================================================================================================
# the report's content, independent of the output format


@dataclass
class _SizeRow:
    label: str
    before: str
    after: str
    ratio: str
    shrank: bool | None  # None: not comparable


_SIZE_METRICS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("params", "Parameters", format_count),
    ("macs", "MACs", format_count),
    ("bytes", "Weight bytes", format_bytes),
    ("nodes", "Nodes", lambda n: "unknown" if n is None else f"{n:,}"),
    ("file_bytes", "File size", format_bytes),
)


def _size_rows(report: Mapping[str, Any]) -> list[_SizeRow]:
    """Before/after rows for the metrics either side reports."""
    before, after = report.get("before") or {}, report.get("after") or {}
    rows = []
    for key, label, fmt in _SIZE_METRICS:
        if key not in before and key not in after:
            continue
        b, a = before.get(key), after.get(key)
        comparable = isinstance(b, (int, float)) and isinstance(a, (int, float)) and b != 0
        rows.append(_SizeRow(label, _side(before, key, fmt), _side(after, key, fmt), format_ratio(b, a),
                             (a < b) if comparable else None))
    return rows


def _side(side: Mapping[str, Any], key: str, fmt: Callable[[Any], str]) -> str:
    value = side.get(key)
    if value is None and key == "macs" and side.get("macs_known") is not None:
        return f"≥ {fmt(side['macs_known'])}"  # the analysis gave a lower bound
    return fmt(value)


@dataclass
class _PassRow:
    index: int
    name: str
    changed: bool | None
    seconds: str
    digest: str
    stats: Any


def _pass_rows(report: Mapping[str, Any]) -> list[_PassRow]:
    return [_PassRow(i, str(p.get("name", "?")), p.get("changed"), format_seconds(p.get("seconds")),
                     stats_digest(p.get("stats")), p.get("stats"))
            for i, p in enumerate(report.get("passes") or [], 1)]


def _folded_pass_rows(report: Mapping[str, Any]) -> list[_PassRow]:
    """One row per pass name for the terminal: a fixed point runs each pass several times.

    ``changed`` is true when any run changed the model; the time is the sum; the digest is that of
    the runs that changed something (joined), or of the last run. The JSON report keeps every run.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in report.get("passes") or []:
        groups.setdefault(str(record.get("name", "?")), []).append(record)
    rows = []
    for index, (name, records) in enumerate(groups.items(), 1):
        changed = [r for r in records if r.get("changed")]
        digest = "; ".join(filter(None, (stats_digest(r.get("stats")) for r in changed))) or \
            stats_digest(records[-1].get("stats"))
        runs = f" ×{len(records)}" if len(records) > 1 else ""
        seconds = sum(float(r.get("seconds") or 0.0) for r in records)
        rows.append(_PassRow(index, name + runs, bool(changed) if records[0].get("changed") is not None else None,
                             format_seconds(seconds), _clip(digest, 60), records[-1].get("stats")))
    return rows


def stats_digest(stats: Any, width: int = 60) -> str:
    """One short line summing up a pass's stats: ``folded=3, removed=12, 4 skipped``.

    Scalars read ``key=value``, lists ``<length> key``, nested dicts their scalar leaves
    (``key.sub=value``); the line is cut at ``width`` characters.
    """
    if stats is None or stats == {}:
        return ""
    if not isinstance(stats, Mapping):
        return _clip(format_value(stats), width)
    parts = []
    for key, value in stats.items():
        if isinstance(value, Mapping):
            parts += [f"{key}.{k}={format_value(v)}" for k, v in value.items() if is_scalar(v)]
        elif isinstance(value, (list, tuple)):
            parts.append(f"{len(value)} {key}")
        else:
            parts.append(f"{key}={_clip(format_value(value), 24)}")
    return _clip(", ".join(parts), width)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


@dataclass
class _Verdict:
    status: str  # "PASS", "FAIL" or "NOT VERIFIED"
    mode: str | None = None
    key_metrics: list[tuple[str, str]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    accuracy: str | None = None
    first_divergence: str | None = None

    @property
    def ok(self) -> bool | None:
        return {"PASS": True, "FAIL": False}.get(self.status)

    def line(self) -> str:
        """``PASS — equivalence: max_abs 1.2e-06, cosine 0.99999`` / ``FAIL — accuracy: <metrics> — <reasons>``."""
        if self.ok is None:
            return f"{self.status} — verification was skipped"
        facts = [f"{k} {v}" for k, v in self.key_metrics]
        if self.accuracy:
            facts.append(self.accuracy)
        line = f"{self.status} — {self.mode or 'verification'}" + (f": {', '.join(facts)}" if facts else "")
        if self.ok is False and self.reasons:
            line += " — " + "; ".join(self.reasons)
        return line


# Metric names (last key of a dotted path) that make the headline, in this order.
KEY_METRICS = ("max_abs", "max_abs_error", "max_abs_diff", "max_rel", "max_rel_error", "rel_range_error",
               "cosine", "min_cosine", "cosine_similarity", "top1_agreement", "top1", "accuracy_delta")


def _verdict(report: Mapping[str, Any]) -> _Verdict:
    verify = report.get("verify")
    if not isinstance(verify, Mapping) or verify.get("passed") is None:
        return _Verdict("NOT VERIFIED")
    return _Verdict(
        status="PASS" if verify["passed"] else "FAIL",
        mode=verify.get("mode"),
        key_metrics=_key_metrics(verify.get("metrics")),
        reasons=[str(r) for r in verify.get("reasons") or []],
        accuracy=_on_data(_accuracy(verify.get("accuracy_reference"), verify.get("accuracy_candidate")), verify),
        first_divergence=verify.get("first_divergence"),
    )


def _key_metrics(metrics: Any, limit: int = 4) -> list[tuple[str, str]]:
    rows, _ = flatten(metrics or {})
    numeric = [(k, v) for k, v in rows if isinstance(v, (int, float)) and not isinstance(v, bool)]
    ranked = sorted((KEY_METRICS.index(k.rsplit(".", 1)[-1]), k, v) for k, v in numeric
                    if k.rsplit(".", 1)[-1] in KEY_METRICS)
    chosen = [(k, v) for _, k, v in ranked] or numeric  # unfamiliar metric names: show the first ones
    return [(k, format_value(v)) for k, v in chosen[:limit]]


def _on_data(accuracy: str | None, verify: Mapping[str, Any]) -> str | None:
    """Say which samples an accuracy was measured on: held-out ones, or the calibration data itself."""
    if accuracy is None or "held_out" not in verify:
        return accuracy
    n = verify.get("samples", "?")
    if verify["held_out"]:
        return f"{accuracy} on {n} held-out samples"
    if verify.get("mode") != "accuracy":  # lossless: nothing was fitted to the samples
        return f"{accuracy} on {n} samples"
    return f"{accuracy} on the {n} calibration samples (lossy passes fit these; --verify-data holds some out)"


def _accuracy(reference: Any, candidate: Any) -> str | None:
    if reference is None and candidate is None:
        return None
    if isinstance(reference, (int, float)) and isinstance(candidate, (int, float)):
        return f"accuracy {reference:.4f} → {candidate:.4f} ({candidate - reference:+.4f})"
    return f"accuracy {format_value(reference)} → {format_value(candidate)}"


@dataclass
class _OutputRow:
    """One output's verdict: what it holds, its similarity numbers (SNR over all samples and its worst
    sample), the rule that judged it."""

    name: str
    kind: str
    cosine_min: str
    cosine_mean: str
    snr_db: str
    snr_db_min: str
    rule: str
    verdict: str
    passed: bool | None


OUTPUT_COLUMNS = ("output", "kind", "cos min", "cos mean", "SNR dB", "worst", "rule", "verdict")


def output_rows(verify: Any) -> list[_OutputRow]:
    """One row per output of a :class:`~graphopt.measure.verify.VerifyReport` dict's ``metrics``.

    ``kind`` is the output's role (class scores, map, vector, scalar, exact) when the verdict gave one;
    metrics that are not per-output dicts (no ``kind``) give no rows.
    """
    metrics = verify.get("metrics") if isinstance(verify, Mapping) else None
    if not isinstance(metrics, Mapping):
        return []
    rows = []
    for name, m in metrics.items():
        if not isinstance(m, Mapping) or "kind" not in m:
            continue
        compared = m.get("compared", True)
        passed = m.get("passed") if compared else None
        rows.append(_OutputRow(
            str(m.get("name", name)), str(m.get("role") or m.get("kind") or "?"), format_cosine(m.get("cosine_min")),
            format_cosine(m.get("cosine_mean")), format_snr(m.get("snr_db")),
            format_snr(m.get("snr_db_min")), str(m.get("rule") or "-"),
            "not compared" if passed is None else "pass" if passed else "fail", passed))
    return rows


def format_cosine(v: Any) -> str:
    """Six decimals, rounded down: a cosine of 0.9999996 must not read as a perfect 1.000000."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "-"
    return f"{math.floor(v * 1e6) / 1e6:.6f}"


def format_snr(v: Any) -> str:
    """An SNR in dB with one decimal; ``∞`` for an output reproduced exactly (``"Infinity"`` in JSON)."""
    if v in ("Infinity", math.inf):
        return "∞"
    if v in ("-Infinity", -math.inf):
        return "-∞"
    return f"{v:.1f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _row_cells(r: _OutputRow) -> list[str]:
    return [r.name, r.kind, r.cosine_min, r.cosine_mean, r.snr_db, r.snr_db_min, r.rule, r.verdict]


def flatten(obj: Any, prefix: str = "") -> tuple[list[tuple[str, Any]], list[tuple[str, list[dict]]]]:
    """Split nested JSON into key/value rows (dotted keys) and sub-tables (lists of dicts).

    >>> flatten({"n": 3, "out": {"max_abs": 0.5}, "skipped": [{"node": "a", "why": "shared"}]})
    ([('n', 3), ('out.max_abs', 0.5)], [('skipped', [{'node': 'a', 'why': 'shared'}])])
    """
    if isinstance(obj, Mapping) and (obj or not prefix):
        rows: list[tuple[str, Any]] = []
        tables: list[tuple[str, list[dict]]] = []
        for key, value in obj.items():
            r, t = flatten(value, f"{prefix}.{key}" if prefix else str(key))
            rows += r
            tables += t
        return rows, tables
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(x, Mapping) for x in obj):
        return [], [(prefix, list(obj))]
    return [(prefix or "value", obj)], []


def _columns(records: Iterable[Mapping[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for record in records:
        cols.update(dict.fromkeys(map(str, record)))
    return list(cols)


def _meta_facts(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Run facts for the header line: (label, value); values are plain text to be escaped."""
    facts = []
    if report.get("preset"):
        facts.append(("preset", str(report["preset"])))
    if report.get("passes_requested"):
        facts.append(("passes requested", ", ".join(map(str, report["passes_requested"]))))
    if report.get("target_cpu"):
        facts.append(("target CPU", target_cpu_fact(report["target_cpu"])))
    if report.get("graphopt_version"):
        facts.append(("graphopt", str(report["graphopt_version"])))
    if report.get("seconds") is not None:
        facts.append(("time", format_seconds(report["seconds"])))
    return facts


_KNOWN_KEYS = {"graphopt_version", "model", "output", "preset", "passes_requested", "before", "after",
               "passes", "verify", "seconds"}


def target_cpu_fact(target: Mapping[str, Any]) -> str:
    """``avx2 (profile: shipped)``: the target CPU and where its prices came from, short."""
    return f"{target.get('name', '?')} (profile: {(target.get('profile') or {}).get('source', '?')})"


def _other(report: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in _KNOWN_KEYS}


# ====================================================================================================
# JSON


def render_json(report: Mapping[str, Any]) -> str:
    """The report as strict JSON (indent 2, the dict's own key order, trailing newline)."""
    return json.dumps(_jsonable(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [_jsonable(v) for v in sorted(obj, key=str)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return _jsonable(obj.tolist())
    return str(obj)  # paths, enums...


# ====================================================================================================
# Markdown


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as GitHub-flavoured Markdown: verdict, before/after, passes, verification."""
    verdict = _verdict(report)
    out = [f"# graphopt report: {_md_code(report.get('model', '?'))}", "", f"**{verdict.status}** — "
           + _md_text(verdict.line().split(" — ", 1)[1]), ""]
    out += _md_header_line(report)
    out += _md_sizes(report)
    out += _md_passes(report)
    out += _md_verification(verdict, report.get("verify"))
    other = _other(report)
    if other:
        out += ["## Other", ""] + _md_block(other)
    return "\n".join(out).rstrip() + "\n"


def _md_header_line(report: Mapping[str, Any]) -> list[str]:
    target = f"{_md_code(report.get('model', '?'))} → {_md_code(report['output'])}" if report.get("output") \
        else _md_code(report.get("model", "?"))
    facts = [target] + [f"{label}: {_md_text(value)}" for label, value in _meta_facts(report)]
    return [" · ".join(facts), ""]


def _md_sizes(report: Mapping[str, Any]) -> list[str]:
    rows = _size_rows(report)
    if not rows:
        return []
    return ["## Size", ""] + _md_table(["", "before", "after", "ratio"], [[r.label, r.before, r.after, r.ratio]
                                                                          for r in rows],
                                       align="lrrr") + [""]


def _md_passes(report: Mapping[str, Any]) -> list[str]:
    rows = _pass_rows(report)
    if not rows:
        return []
    out = ["## Passes", ""]
    out += _md_table(["#", "pass", "changed", "time", "summary"],
                     [[str(r.index), _md_code(r.name, table=True), format_value(r.changed), r.seconds,
                       _md_text(r.digest)] for r in rows], align="rlcrl", escape=False)
    out.append("")
    for r in rows:
        if r.stats not in (None, {}, []):
            out += [f"### {r.index}. {_md_code(r.name)}", ""] + _md_block(r.stats)
    return out


def _md_verification(verdict: _Verdict, verify: Any) -> list[str]:
    out = ["## Verification", ""]
    if verdict.ok is None:
        return out + ["Not verified: the verification step was skipped.", ""]
    out += [f"**{verdict.status}** ({_md_text(verdict.mode or 'unknown mode')})", ""]
    if verdict.reasons:
        out += ["Reasons:", ""] + [f"- {_md_text(r)}" for r in verdict.reasons] + [""]
    if verdict.first_divergence:
        out += [f"First diverging tensor: {_md_code(verdict.first_divergence)}", ""]
    if verdict.accuracy:
        out += [_md_text(verdict.accuracy.capitalize()), ""]
    rows = output_rows(verify)
    if rows:
        out += ["### Outputs", ""] + _md_table(list(OUTPUT_COLUMNS), [_row_cells(r) for r in rows],
                                               align="llrrrrll") + [""]
    for key, title in (("metrics", "Metrics"), ("tolerance", "Tolerance")):
        if isinstance(verify, Mapping) and verify.get(key):
            out += [f"### {title}", ""] + _md_block(verify[key])
    return out


def _md_block(obj: Any) -> list[str]:
    """Key/value table of the scalar leaves, then one sub-table per list of dicts."""
    rows, tables = flatten(obj)
    out: list[str] = []
    if rows:
        out += _md_table(["key", "value"], [[k, format_value(v)] for k, v in rows], align="ll") + [""]
    for key, records in tables:
        cols = _columns(records)
        body = [[format_value(rec.get(c)) for c in cols] for rec in records[:MAX_TABLE_ROWS]]
        out += [f"**{_md_text(key)}** ({len(records)})", ""] + _md_table(cols, body, align="l" * len(cols))
        if len(records) > MAX_TABLE_ROWS:
            out.append(f"\n… {len(records) - MAX_TABLE_ROWS} more rows in the JSON report")
        out.append("")
    return out


def _md_table(header: list[str], rows: list[list[str]], align: str, escape: bool = True) -> list[str]:
    cell = _md_text if escape else str
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(_md_text(h) for h in header) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


# Characters Markdown would read as markup; escaped with a backslash. & < > become entities so that
# a name like "<script>" is shown, never interpreted as raw HTML by the Markdown renderer.
_MD_SPECIAL = "\\`*_[]|~"


def _md_text(text: Any) -> str:
    text = html.escape(str(text), quote=False)
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in text).replace("\n", " ")


def _md_code(text: Any, table: bool = False) -> str:
    """Inline code (identifiers stay readable); the fence outgrows any backtick run inside."""
    text = str(text).replace("\n", " ")
    if table:
        text = text.replace("|", "\\|")  # GFM splits table cells on | even inside code spans
    fence = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _longest_backtick_run(text: str) -> int:
    best = current = 0
    for c in text:
        current = current + 1 if c == "`" else 0
        best = max(best, current)
    return best


# ====================================================================================================
# HTML


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1080px;margin:0 auto;padding:24px}
h1{font-size:1.5em;margin:0 0 12px}h2{font-size:1.2em;margin:28px 0 8px;border-bottom:1px solid #d9dde5}
h3{font-size:1em;margin:16px 0 6px}
code{font-family:ui-monospace,Menlo,Consolas,monospace;background:#eceff4;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;margin:6px 0 12px;background:#fff}
th,td{border:1px solid #d9dde5;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#eef1f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{font-size:1.1em;padding:10px 14px;border-radius:6px;margin:8px 0}
.verdict.pass{background:#e3f5e8;border:1px solid #7cc48f}.verdict.fail{background:#fbe5e5;border:1px solid #e08a8a}
.verdict.none{background:#f1f1f1;border:1px solid #bbb}
.meta{color:#555}.better{color:#1b7f3b}.worse{color:#b3261e}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
"""


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained XHTML-compatible page (inline CSS and SVG, no external assets)."""
    verdict = _verdict(report)
    title = f"graphopt report: {report.get('model', '?')}"
    body = [f"<h1>graphopt report <code>{_h(report.get('model', '?'))}</code></h1>",
            _html_verdict(verdict), _html_meta(report)]
    body += _html_sizes(report) + _html_passes(report) + _html_verification(verdict, report.get("verify"))
    other = _other(report)
    if other:
        body += ["<section><h2>Other</h2>", *_html_block(other), "</section>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\n"
            f"<title>{_h(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_verdict(verdict: _Verdict) -> str:
    css = {True: "pass", False: "fail", None: "none"}[verdict.ok]
    rest = verdict.line().split(" — ", 1)[1]
    return f"<p class=\"verdict {css}\"><strong>{_h(verdict.status)}</strong> — {_h(rest)}</p>"


def _html_meta(report: Mapping[str, Any]) -> str:
    target = f"<code>{_h(report.get('model', '?'))}</code>"
    if report.get("output"):
        target += f" → <code>{_h(report['output'])}</code>"
    facts = [target] + [f"{_h(label)}: {_h(value)}" for label, value in _meta_facts(report)]
    return "<p class=\"meta\">" + " · ".join(facts) + "</p>"


def _html_sizes(report: Mapping[str, Any]) -> list[str]:
    rows = _size_rows(report)
    if not rows:
        return []
    trs = []
    for r in rows:
        css = "" if r.shrank is None else (" better" if r.shrank else " worse")
        trs.append(f"<tr><th>{_h(r.label)}</th><td class=\"num\">{_h(r.before)}</td>"
                   f"<td class=\"num\">{_h(r.after)}</td><td class=\"num{css}\">{_h(r.ratio)}</td></tr>")
    table = ["<table><thead><tr><th></th><th>before</th><th>after</th><th>ratio</th></tr></thead><tbody>",
             *trs, "</tbody></table>"]
    return ["<section><h2>Size</h2>", *table, _svg_chart(report), "</section>"]


def _svg_chart(report: Mapping[str, Any]) -> str:
    """Horizontal bars, before vs after, for each size metric known on both sides."""
    before, after = report.get("before") or {}, report.get("after") or {}
    bars = [(label, before[key], after[key], fmt) for key, label, fmt in _SIZE_METRICS
            if key != "nodes" and isinstance(before.get(key), (int, float)) and isinstance(after.get(key), (int, float))
            and before[key] > 0]
    if not bars:
        return ""
    width, label_w, bar_h, gap = 560, 110, 14, 12
    scale_w = width - label_w - 90
    height = len(bars) * (2 * bar_h + gap) + gap
    parts = [f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" role=\"img\" "
             f"aria-label=\"size before and after\" font-family=\"sans-serif\" font-size=\"11\">"]
    for i, (label, b, a, fmt) in enumerate(bars):
        top = gap + i * (2 * bar_h + gap)
        biggest = max(b, a)
        parts.append(f"<text x=\"0\" y=\"{top + bar_h + 4}\">{_h(label)}</text>")
        for j, (value, color) in enumerate(((b, "#9aa5b8"), (a, "#3b7dd8"))):
            y, w = top + j * bar_h, max(1.0, scale_w * value / biggest)
            parts.append(f"<rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1f}\" height=\"{bar_h - 2}\" "
                         f"fill=\"{color}\"><title>{'before' if j == 0 else 'after'}: {_h(fmt(value))}</title></rect>")
            parts.append(f"<text x=\"{label_w + w + 4:.1f}\" y=\"{y + bar_h - 3}\">{_h(fmt(value))}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _html_passes(report: Mapping[str, Any]) -> list[str]:
    rows = _pass_rows(report)
    if not rows:
        return []
    trs = [f"<tr><td class=\"num\">{r.index}</td><td><code>{_h(r.name)}</code></td>"
           f"<td>{_h(format_value(r.changed))}</td><td class=\"num\">{_h(r.seconds)}</td><td>{_h(r.digest)}</td></tr>"
           for r in rows]
    out = ["<section><h2>Passes</h2>",
           "<table><thead><tr><th>#</th><th>pass</th><th>changed</th><th>time</th><th>summary</th></tr></thead>"
           "<tbody>", *trs, "</tbody></table>"]
    for r in rows:
        if r.stats not in (None, {}, []):
            out += [f"<details><summary>{r.index}. {_h(r.name)}</summary>", *_html_block(r.stats), "</details>"]
    return out + ["</section>"]


def _html_verification(verdict: _Verdict, verify: Any) -> list[str]:
    out = ["<section><h2>Verification</h2>"]
    if verdict.ok is None:
        return out + ["<p>Not verified: the verification step was skipped.</p>", "</section>"]
    out.append(f"<p><strong>{_h(verdict.status)}</strong> ({_h(verdict.mode or 'unknown mode')})</p>")
    if verdict.reasons:
        out += ["<ul>", *[f"<li>{_h(r)}</li>" for r in verdict.reasons], "</ul>"]
    if verdict.first_divergence:
        out.append(f"<p>First diverging tensor: <code>{_h(verdict.first_divergence)}</code></p>")
    if verdict.accuracy:
        out.append(f"<p>{_h(verdict.accuracy.capitalize())}</p>")
    rows = output_rows(verify)
    if rows:
        out += ["<h3>Outputs</h3>", _html_table(list(OUTPUT_COLUMNS), [_row_cells(r) for r in rows])]
    for key, title in (("metrics", "Metrics"), ("tolerance", "Tolerance")):
        if isinstance(verify, Mapping) and verify.get(key):
            out += [f"<h3>{title}</h3>", *_html_block(verify[key])]
    return out + ["</section>"]


def _html_block(obj: Any) -> list[str]:
    rows, tables = flatten(obj)
    out: list[str] = []
    if rows:
        out.append(_html_table(["key", "value"], [[k, format_value(v)] for k, v in rows]))
    for key, records in tables:
        cols = _columns(records)
        body = [[format_value(rec.get(c)) for c in cols] for rec in records[:MAX_TABLE_ROWS]]
        out += [f"<p><strong>{_h(key)}</strong> ({len(records)})</p>", _html_table(cols, body)]
        if len(records) > MAX_TABLE_ROWS:
            out.append(f"<p>… {len(records) - MAX_TABLE_ROWS} more rows in the JSON report</p>")
    return out


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_h(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ====================================================================================================
# writing


_RENDERERS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    ".json": render_json, ".md": render_markdown, ".html": render_html,
}


def check_report_path(path: str | os.PathLike) -> None:
    """Fail early (before any work) when ``path``'s suffix names no report format or its folder is missing."""
    path = Path(path)
    if path.suffix.lower() not in _RENDERERS:
        raise OptionError(f"cannot write report {str(path)!r}: unknown format {path.suffix or '(no suffix)'!r}; "
                          f"use {', '.join(_RENDERERS)}")
    if not path.parent.is_dir():
        raise OptionError(f"cannot write report {str(path)!r}: folder {str(path.parent)!r} does not exist")


def write_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report`` to ``path`` in the format its suffix names (``.json``, ``.md``, ``.html``).

    The file is written to a temporary file in the same folder and moved into place with
    ``os.replace``, so a reader never sees half a report and a failure leaves nothing behind.

    Raises
    ------
    OptionError
        The suffix names no known format.
    GraphoptError
        The file cannot be written (missing folder, permissions...).
    """
    path = Path(path)
    check_report_path(path)
    write_text_atomic(path, _RENDERERS[path.suffix.lower()](report))
    return path


def write_text_atomic(path: Path, text: str, what: str = "report") -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, so a failed write leaves no file.

    Raises
    ------
    GraphoptError
        The file cannot be written (``what`` names it in the message).
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise GraphoptError(f"cannot write {what} {str(path)!r}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        # mkstemp makes the file private (0600); a report is meant to be shared like any output file.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise GraphoptError(f"cannot write {what} {str(path)!r}: {exc.strerror or exc}") from None
        raise


# ====================================================================================================
# terminal


_STATUS_STYLE = {"PASS": "bold green", "FAIL": "bold red", "NOT VERIFIED": "bold yellow"}


def print_summary(report: Mapping[str, Any], console: Console) -> None:
    """Print what ``graphopt optimize`` shows: header, before/after, passes and the verdict line.

    Every string from the report is printed as plain text (never parsed as rich markup), so a pass
    or tensor name like ``[bold]`` shows as written.
    """
    console.print(_rich_header(report))
    sizes = _size_rows(report)
    if sizes:
        console.print(_rich_sizes(sizes))
    passes = _folded_pass_rows(report)
    if passes:
        console.print(_rich_passes(passes))
    for name, notice in pass_notices(report):
        console.print(Text.assemble((f"{name}: ", "bold yellow"), notice))
    _print_outputs(report.get("verify"), console)
    console.print(_rich_verdict(_verdict(report)))
    for line in (macs_line(report), shapes_line(report), target_line(report), target_cpu_line(report)):
        if line:
            console.print(Text(line))


def macs_line(report: Mapping[str, Any]) -> str | None:
    """Why a MAC count is a lower bound (``MACs ≥: 4 nodes unknown (Relu ×2, Conv, ReduceMean): ...``),
    or that sizes were read off a sample; ``None`` when every size was known statically."""
    for key in ("before", "after"):
        side = report.get(key) or {}
        if side.get("macs") is None and side.get("unknown_macs_nodes"):
            ops = ", ".join(op if n == 1 else f"{op} ×{n}" for op, n in (side.get("unknown_macs_ops") or {}).items())
            return (f"MACs ({key}) are a lower bound: {side['unknown_macs_nodes']} nodes unknown ({ops}); "
                    f"first: {side.get('unknown_macs_reason', '?')}")
    seen = (report.get("before") or {}).get("observed")
    if seen:
        return f"MACs at the first sample: {seen} sizes or If branches only data decides were read off a run of it"
    return None


def shapes_line(report: Mapping[str, Any]) -> str | None:
    """``verified at input[1,3,64,64]; input[1,3,96,128]`` when the model was verified at probe shapes."""
    shapes = (report.get("verify") or {}).get("shapes")
    if not shapes:
        return None
    return "verified at " + "; ".join(describe_shapes(s) for s in shapes)


def target_line(report: Mapping[str, Any]) -> str | None:
    """``target MACs 0.70: reached 0.956 (missed: prune_filters: ...)`` when a target was given."""
    target = report.get("target")
    if not target:
        return None
    parts = []
    for key, label in (("macs", "MACs"), ("params", "params")):
        t = target.get(key)
        if t:
            reached = "unknown" if t["reached"] is None else f"{t['reached']:.3f}"
            parts.append(f"{label} {t['target']:.2f}: reached {reached}")
    verdict = "met" if target["met"] else f"missed: {target.get('reason', '?')}"
    return f"target {', '.join(parts)} ({verdict})"


def print_calibration(result: Any, console: Console) -> None:
    """What ``graphopt calibrate`` shows: the fit's quality per kernel kind, where the profile went and
    who will use it (``result``: :class:`graphopt.app.api.CalibrationResult`)."""
    meta = result.profile.meta
    table = Table(title=f"Latency profile of {meta.get('cpu', '?')} ({result.kind}, onnxruntime "
                        f"{meta.get('onnxruntime', '?')}, {meta.get('kernels', '?')} kernels in "
                        f"{format_seconds(result.seconds)})", title_justify="left")
    for col in ("kind", "kernels", "median rel. error", "90th pct rel. error"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for kind, q in (meta.get("fit") or {}).items():
        if q.get("n"):
            table.add_row(kind, str(q["n"]), f"{q['median_rel_error']:.1%}", f"{q['p90_rel_error']:.1%}")
        else:
            table.add_row(kind, "0", "-", "-")
    console.print(table)
    use = (f"--target-cpu auto and --target-cpu {result.kind} use it on this machine" if result.cached
           else f"give it to --target-cpu {result.path}")
    console.print(Text(f"wrote {result.path}: {use}"))


def target_cpu_line(report: Mapping[str, Any]) -> str | None:
    """``target CPU avx2 (detected: ...); profile shipped (...)`` for a lossy run (the lossless passes
    price nothing per CPU, and the header names the target anyway)."""
    target = report.get("target_cpu")
    if not target or (report.get("verify") or {}).get("mode") != "accuracy":
        return None
    notes = "; ".join(target.get("notes") or [])
    return str(target.get("summary") or target_cpu_fact(target)) + (f"; {notes}" if notes else "")


def pass_notices(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(pass, text)`` for every pass run whose stats carry a ``notice``: something the user asked
    for and did not get, said in full (the passes table clips its digests)."""
    return [(str(r.get("name", "?")), str(r["stats"]["notice"])) for r in report.get("passes") or []
            if isinstance(r.get("stats"), Mapping) and r["stats"].get("notice")]


def print_verdict(verify: Mapping[str, Any], console: Console) -> None:
    """Print what ``graphopt verify`` shows: the per-output table, the verdict line, reasons and the
    first diverging tensor."""
    _print_outputs(verify, console)
    console.print(_rich_verdict(_verdict({"verify": verify})))


def _print_outputs(verify: Any, console: Console) -> None:
    rows = output_rows(verify)
    if not rows:
        return
    # A narrow terminal (80 columns, a pipe) cannot hold the rule column: the rules follow the table.
    wide = console.width >= 110
    table = Table(title="Outputs", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in OUTPUT_COLUMNS:
        if col == "rule" and not wide:
            continue
        left = col in ("output", "rule")
        table.add_column(col, justify="left" if left or col in ("kind", "verdict") else "right",
                         overflow="fold", no_wrap=not left)
    for r in rows:
        style = "dim" if r.passed is None else "green" if r.passed else "red"
        values = _row_cells(r)
        if not wide:
            del values[OUTPUT_COLUMNS.index("rule")]
        cells = [Text(c) for c in values]
        cells[-1].stylize(style)
        table.add_row(*cells)
    console.print(table)
    if not wide:
        rules = [f"{r.name}: {r.rule}" for r in rows if r.rule != "-"]
        if rules:
            console.print(Text("rules: " + "; ".join(rules), style="dim"))


def failure_hints(verify: Any, *, random_data: bool, write_failed: bool | None,
                  data_flag: str = "--verify-data") -> list[str]:
    """What the user can do after a lossy run failed its gate: one short phrase per option that applies.

    * ``--max-drop D`` when class scores failed, ``D`` the smallest budget that passes (their accuracy
      drop with labels, else ``100 · (1 − top-1 agreement)``), rounded up to 0.1 point;
    * ``--min-snr-db`` / ``--min-cosine`` with the measured values (rounded down) when another float
      output failed on them, unless one of them cannot be accepted (SNR < 0 dB, cosine <= 0, NaN/inf);
    * ``data_flag FILE.npz`` when the verdict judged class scores without labels, or real samples
      (``--data / --verify-data``) when it ran on random inputs;
    * ``--write-failed`` when ``write_failed`` is false (``None``: the command has no such flag).

    Nothing for a lossless (equivalence) or passing run: a lossless rewrite that fails is a bug.
    """
    if not isinstance(verify, Mapping) or verify.get("passed") is not False or verify.get("mode") != "accuracy":
        return []
    metrics = verify.get("metrics") if isinstance(verify.get("metrics"), Mapping) else {}
    failed = [m for m in metrics.values() if isinstance(m, Mapping) and m.get("compared", True)
              and m.get("passed") is False]
    classes = [m for m in failed if m.get("role") == "class scores"]
    hints = []
    drop = _drop_needed(verify, classes)
    if drop is not None:
        hints.append(f"to accept the loss: --max-drop {drop:g}")
    similarity = _similarity_needed([m for m in failed if m.get("role") in SIMILARITY_ROLES],
                                    verify.get("tolerance") or {})
    if similarity:
        hints.append("to accept the error: " + " ".join(similarity))
    unlabelled = any(m.get("name") != verify.get("class_output") or verify.get("accuracy_drop") is None
                     for m in classes)
    if random_data:
        real = "--data / --verify-data" if data_flag == "--verify-data" else data_flag
        hints.append(f"to verify on real samples: {real} FILE.npz")
    elif unlabelled:
        hints.append(f"to judge class scores by the accuracy drop: {data_flag} FILE.npz with 'labels'")
    if write_failed is False:
        hints.append("to write it anyway: --write-failed")
    return hints


def _drop_needed(verify: Mapping[str, Any], classes: list[Mapping[str, Any]]) -> float | None:
    needs = []
    for m in classes:
        if m.get("name") == verify.get("class_output") and isinstance(verify.get("accuracy_drop"), (int, float)):
            needs.append(verify["accuracy_drop"])
        elif isinstance(m.get("top1_agreement"), (int, float)):
            needs.append(100.0 * (1.0 - m["top1_agreement"]))
    # round(…, 6) first: 100 · (1 − 0.958) is 4.2000000000000002, which must read 4.2, not 4.3
    return math.ceil(round(max(needs) * 10, 6)) / 10 if needs else None


def _similarity_needed(failed: list[Mapping[str, Any]], tolerance: Mapping[str, Any]) -> list[str]:
    """The flags that accept every failed similarity, or none when one cannot be accepted (noise above
    the signal, a cosine at or below 0, NaN/inf where the reference has numbers)."""
    hopeless = [m for m in failed if m.get("nonfinite_mismatches")
                or not isinstance(m.get("snr_db"), (int, float)) or m["snr_db"] < 0
                or not isinstance(m.get("cosine_min"), (int, float)) or m["cosine_min"] <= 0]
    if hopeless:
        return []
    flags = []
    snrs = [m.get("snr_db") for m in failed if isinstance(m.get("snr_db"), (int, float))]
    min_snr = tolerance.get("min_snr_db")
    if snrs and isinstance(min_snr, (int, float)) and min(snrs) < min_snr:
        flags.append(f"--min-snr-db {math.floor(min(snrs) * 10) / 10:g}")
    cosines = [m.get("cosine_min") for m in failed if isinstance(m.get("cosine_min"), (int, float))]
    min_cos = tolerance.get("min_cosine")
    if cosines and isinstance(min_cos, (int, float)) and min(cosines) < min_cos:
        flags.append(f"--min-cosine {math.floor(min(cosines) * 1e4) / 1e4:g}")
    return flags


def _rich_header(report: Mapping[str, Any]) -> Text:
    text = Text.assemble(("graphopt ", "bold"), str(report.get("model", "?")))
    if report.get("output"):
        text.append(f" → {report['output']}")
    facts = [f"{label}: {value}" for label, value in _meta_facts(report) if label != "passes requested"]
    if facts:
        text.append(f"  ({', '.join(facts)})", style="dim")
    return text


def _rich_sizes(rows: list[_SizeRow]) -> Table:
    table = Table(title="Size", title_justify="left")
    table.add_column("")
    for name in ("before", "after", "ratio"):
        table.add_column(name, justify="right")
    for r in rows:
        style = "" if r.shrank is None else ("green" if r.shrank else "red")
        table.add_row(Text(r.label), Text(r.before), Text(r.after), Text(r.ratio, style=style))
    return table


def _rich_passes(rows: list[_PassRow]) -> Table:
    table = Table(title="Passes", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("pass")
    table.add_column("changed", justify="center")
    table.add_column("time", justify="right")
    table.add_column("stats", overflow="fold")
    for r in rows:
        changed = Text(format_value(r.changed), style="green" if r.changed else "dim")
        table.add_row(str(r.index), Text(r.name), changed, r.seconds, Text(r.digest))
    return table


def _rich_verdict(verdict: _Verdict) -> Text:
    """The verdict line; on failure each reason follows on its own line (they can be long)."""
    head = dataclasses.replace(verdict, reasons=[])
    status, _, rest = head.line().partition(" — ")
    text = Text.assemble((status, _STATUS_STYLE[verdict.status]), " — ", rest)
    if verdict.ok is False:
        for reason in verdict.reasons:
            text.append(f"\n  ✗ {reason}", style="red")
    if verdict.first_divergence:
        text.append(f"\n  first diverging tensor: {verdict.first_divergence}")
    return text
