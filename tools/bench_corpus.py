"""The real-world corpus (``models/corpus``): graphopt's lossless preset with no flags, against the original
and against onnxslim.

For each model of ``models/corpus/corpus.json`` it runs ``graphopt.optimize`` exactly as a user would
(no ``--input-shape``, no ``--data``) and records the flags needed (none, or the one-line refusal), the
probe shapes graphopt chose, whether verification passed at both of them, and the node counts. Then it
times the original, graphopt's output and onnxslim's output in one interleaved run
(``tools/bench.py``'s ``measure``: onnxruntime ENABLE_ALL, 1 thread, no spinning, rotating start) at the
first probe shape and prints the latency ratios.

    python tools/bench_corpus.py                       # every corpus model, table on stdout
    python tools/bench_corpus.py --models db_detector --runs 100
    python tools/bench_corpus.py --markdown out.md     # the table as Markdown too
    python tools/bench_corpus.py --lossy               # each lossy preset the manifest lists: the default gate

``--lossy`` runs every lossy preset a corpus entry lists (prune at ``--target-macs 0.7``, lowrank at
``--target-params 0.7``, compress with its defaults; random inputs at the probe shape, no flags) and prints
the verdict of the default gate per output (role, SNR over all samples and at the worst sample, worst
cosine) with the target reached: what a user running the preset without data sees.

onnxslim is a benchmark extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench import _onnxslim, emit_table, measure  # noqa: E402

import graphopt  # noqa: E402
from graphopt.core.errors import GraphoptError  # noqa: E402
from graphopt.measure.probe import describe_shapes  # noqa: E402

MANIFEST = ROOT / "models" / "corpus" / "corpus.json"
COLUMNS = ("model", "flags", "probe shapes", "verified", "nodes", "graphopt / original", "onnxslim / original",
           "graphopt / onnxslim", "seconds")


def corpus(names: list[str] | None) -> list[dict]:
    entries = json.loads(MANIFEST.read_text())["models"]
    return [e for e in entries if names is None or e["name"] in names]


def bench_one(entry: dict, runs: int, batch: int) -> list[str]:
    """One table row: the no-flags run, then latency against the original and onnxslim."""
    path = ROOT / entry["file"]
    started = time.perf_counter()
    try:
        result = graphopt.optimize(path)
    except GraphoptError as exc:
        return [entry["name"], f"refused: {exc}", "-", "no", "-", "-", "-", "-", f"{time.perf_counter() - started:.1f}"]
    seconds = time.perf_counter() - started
    report = result.report
    shapes = report["verify"].get("shapes") or [report["probe"]["shapes"]]
    verified = ("yes" if result.passed else "NO") + (f" ({len(shapes)} shapes)" if len(shapes) > 1 else "")
    rows, _ = measure(path, {"graphopt": lambda _p: result.model, "onnxslim": _onnxslim}, data=None, batch=batch,
                      runs=runs, configs=("all-1t",))
    ratio = {row.name: (row.latency_ms.get("all-1t"), row.status) for row in rows}

    def speed(name: str, base: str) -> str:
        (t, status), (t0, _) = ratio[name], ratio[base]
        return f"{t0 / t:.2f}x" if t and t0 and status == "ok" else status.split(":")[0]

    return [entry["name"], "none", "; ".join(describe_shapes(s) for s in shapes), verified,
            f"{report['before']['nodes']} -> {report['after']['nodes']}",
            speed("graphopt", "original"), speed("onnxslim", "original"), speed("graphopt", "onnxslim"),
            f"{seconds:.1f}"]


LOSSY_TARGETS = {"prune": {"target_macs": 0.7}, "lowrank": {"target_params": 0.7}, "compress": {}}
LOSSY_COLUMNS = ("model", "preset", "target reached", "output", "role", "SNR dB", "worst SNR", "worst cos", "verdict",
                 "seconds")


def lossy_rows(entry: dict) -> list[list[str]]:
    """One row per output of every lossy preset the entry lists (or one refusal row)."""
    rows = []
    for preset in [p for p in entry.get("presets", []) if p in LOSSY_TARGETS]:
        started = time.perf_counter()
        try:
            result = graphopt.optimize(ROOT / entry["file"], preset=preset, allow_partial=True,
                                       **LOSSY_TARGETS[preset])
        except GraphoptError as exc:
            rows.append([entry["name"], preset, "-", "-", "-", "-", "-", "-", f"refused: {exc}", "-"])
            continue
        seconds = f"{time.perf_counter() - started:.1f}"
        target = result.report.get("target") or {}
        reached = "; ".join(f"{k} {v['reached']}" for k, v in target.items() if isinstance(v, dict)) or "-"
        for name, m in (result.report["verify"].get("metrics") or {}).items():
            rows.append([entry["name"], preset, reached, name, str(m.get("role", "?")), _num(m.get("snr_db")),
                         _num(m.get("snr_db_min")), _num(m.get("cosine_min"), 4),
                         "pass" if m.get("passed") else "FAIL", seconds])
    return rows


def _num(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated corpus names (default: all)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per candidate")
    parser.add_argument("--batch", type=int, default=8, help="samples per run for batched models")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    parser.add_argument("--lossy", action="store_true", help="the lossy presets' default gate instead of latency")
    args = parser.parse_args(argv)
    entries = corpus(args.models.split(",") if args.models else None)
    if args.lossy:
        columns = LOSSY_COLUMNS
        rows = [row for e in entries for row in lossy_rows(e)]
    else:
        columns = COLUMNS
        rows = [bench_one(e, args.runs, args.batch) for e in entries]
    emit_table(columns, rows, args.markdown)


if __name__ == "__main__":
    main()
