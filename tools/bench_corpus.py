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

from bench import _onnxslim, measure  # noqa: E402

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated corpus names (default: all)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per candidate")
    parser.add_argument("--batch", type=int, default=8, help="samples per run for batched models")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = parser.parse_args(argv)
    rows = [bench_one(e, args.runs, args.batch) for e in corpus(args.models.split(",") if args.models else None)]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
