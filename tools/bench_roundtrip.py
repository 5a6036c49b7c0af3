#!/usr/bin/env python3
"""Round-trip benchmark: time and peak memory of load -> IR -> export.

Two synthetic models from ``tools/synthetic_models.py``:

* a ~100 MB CNN (``vgg16``; ``--cnn resnet18`` for the 47 MB one) — targets: load + save under 2 s,
  peak memory growth under 2.5x the file size;
* a ~10,000-node graph (``chain``) — target: load + save under 5 s.

Every measurement runs in a fresh Python process, so one run's memory cannot hide in another's. The
child imports everything, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``; without it
the baseline is the peak so far), then times the load and the export, and reports the peak resident
set (``VmHWM``, or ``ru_maxrss``) minus the baseline. Two exports are measured:

* ``save``: :func:`graphopt.core.onnx_io.save`, which streams the initializers (what the CLI does);
* ``to_proto``: :func:`graphopt.core.onnx_io.to_proto` then ``SerializeToString()`` — an in-memory
  ModelProto and its bytes, so at least the IR plus two copies of the weights (informational, no
  memory target).

Each export is checked to be byte-identical to the source file. Times are the best of ``--repeat``
runs; memory is the worst.

    python tools/bench_roundtrip.py                 # both models, table on stdout
    python tools/bench_roundtrip.py --check         # exit 1 when a target is missed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
MODES = ("save", "to_proto")


@dataclass
class Target:
    seconds: float
    memory_ratio: float | None  # peak growth / file size; None = not a target


TARGETS = {("cnn", "save"): Target(2.0, 2.5), ("chain", "save"): Target(5.0, None)}


# ----------------------------------------------------------------------------------------------- child
def _read_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    peak = _read_status("VmHWM")
    if peak is not None:
        return peak
    import resource
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_peak() -> int:
    """Reset the peak-RSS counter if the kernel lets us; return the baseline to subtract."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _read_status("VmRSS") or _peak_rss()
    except OSError:
        return _peak_rss()


def child(path: Path, mode: str, out_dir: Path) -> dict:
    import graphopt.core.onnx_io as onnx_io  # noqa: F401 - imported before the baseline on purpose

    baseline = _reset_peak()
    start = time.perf_counter()
    model = onnx_io.load(path)
    loaded = time.perf_counter()
    out = out_dir / f"{path.stem}.{mode}.onnx"
    if mode == "save":
        onnx_io.save(model, out)
    else:
        data = onnx_io.to_proto(model).SerializeToString()
    done = time.perf_counter()
    peak = _peak_rss() - baseline
    # Checked after the measurement: reading both files back must not count.
    if mode == "save":
        exact = out.read_bytes() == path.read_bytes()
        out.unlink()
    else:
        exact = hashlib.sha256(data).digest() == hashlib.sha256(path.read_bytes()).digest()
    return {"load": loaded - start, "export": done - loaded, "total": done - start, "peak": peak,
            "exact": exact, "nodes": model.node_count()}


# ---------------------------------------------------------------------------------------------- parent
def build_models(cnn: str, nodes: int, folder: Path) -> dict[str, Path]:
    sys.path.insert(0, str(TOOLS))
    import onnx
    import synthetic_models

    paths = {}
    for kind, build in (("cnn", lambda: getattr(synthetic_models, cnn)()),
                        ("chain", lambda: synthetic_models.chain(n_nodes=nodes))):
        path = folder / f"{kind}.onnx"
        onnx.save_model(build(), str(path))
        paths[kind] = path
    return paths


def measure(path: Path, mode: str, repeat: int, folder: Path) -> dict:
    runs = []
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, __file__, "--child", str(path), mode, str(folder)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"benchmark child failed on {path.name} ({mode}):\n{proc.stderr}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["total"])
    return {**best, "peak": max(r["peak"] for r in runs), "exact": all(r["exact"] for r in runs)}


def render(rows: list[dict], markdown: bool = False) -> bool:
    ok_all = True
    header = ["model", "file MB", "nodes", "export", "load s", "export s", "total s", "peak MB", "peak/size",
              "exact", "target", "verdict"]
    table_rows = []
    for r in rows:
        target = TARGETS.get((r["kind"], r["mode"]))
        ratio = r["peak"] / r["size"]
        verdict, target_text = "-", "-"
        if target is not None:
            ok = r["total"] < target.seconds and (target.memory_ratio is None or ratio < target.memory_ratio)
            ok = ok and r["exact"]
            ok_all &= ok
            verdict = "PASS" if ok else "FAIL"
            target_text = f"< {target.seconds:g} s" + (f", < {target.memory_ratio:g}x" if target.memory_ratio else "")
        table_rows.append([r["name"], f"{r['size'] / 1e6:.1f}", str(r["nodes"]), r["mode"], f"{r['load']:.2f}",
                           f"{r['export']:.2f}", f"{r['total']:.2f}", f"{r['peak'] / 1e6:.0f}", f"{ratio:.2f}x",
                           "yes" if r["exact"] else "NO", target_text, verdict])
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in table_rows:
            print("| " + " | ".join(row) + " |")
        return ok_all
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in table_rows)) for i, h in enumerate(header)]
        for row in [header] + table_rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    else:
        table = Table(title="graphopt round trip: load -> IR -> export (fresh process per run)")
        for h in header:
            table.add_column(h, justify="left" if h in ("model", "export", "target", "verdict") else "right")
        for row in table_rows:
            table.add_row(*row)
        Console(width=160).print(table)
    return ok_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cnn", default="vgg16", choices=["vgg16", "resnet18"], help="the CNN to build")
    parser.add_argument("--nodes", type=int, default=10000, help="node count of the chain model")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best time, worst memory)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for BENCHMARKS.md)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        path, mode, folder = args.child
        print(json.dumps(child(Path(path), mode, Path(folder))))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_roundtrip.") as tmp:
        folder = Path(tmp)
        paths = build_models(args.cnn, args.nodes, folder)
        rows = []
        for kind, path in paths.items():
            name = args.cnn if kind == "cnn" else f"chain({args.nodes})"
            for mode in MODES:
                rows.append({"kind": kind, "name": name, "mode": mode, "size": os.path.getsize(path),
                             **measure(path, mode, args.repeat, folder)})
    ok = render(rows, markdown=args.markdown)
    print(("\n" if args.markdown else "") + ("targets met" if ok else "TARGET MISSED"))
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
