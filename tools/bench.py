"""Benchmark harness: graphopt against the original model and against the tools users would reach for.

For each candidate model (the original, graphopt's output, and what other tools make from the same input)
it measures, in ONE run:

* params, MACs, node count (graphopt.measure.analysis) and serialized size;
* accuracy on the evaluation set and output error vs the original (onnxruntime, optimizations off);
* onnxruntime latency: the median over ``--runs`` timed runs, for 1 thread and all threads, with graph
  optimizations at the level users deploy (ENABLE_ALL) and off (DISABLE_ALL). Candidates are timed
  round-robin, one run each per round with a rotating start, so machine noise hits them alike; sessions
  never spin (``session.intra_op.allow_spinning = 0``). Ratios are against the original in the same run.

A tool that fails, or emits a model onnxruntime rejects, is recorded as such: that is a result.

Commands::

    python tools/bench.py compare MODEL [--tools onnxsim,onnxslim,onnxoptimizer] [--graphopt "--preset lossless"]
    python tools/bench.py lossless [--models vgg,resnet,...]      # the zoo, lossless tools (issue 4 table)
    python tools/bench.py write BENCHMARKS.md                       # regenerate the lossless section only

Comparison tools are benchmark extras: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphopt  # noqa: E402
from graphopt.app import api, cli  # noqa: E402
from graphopt.core import onnx_io  # noqa: E402
from graphopt.core.errors import GraphoptError  # noqa: E402
from graphopt.measure import analysis, ort  # noqa: E402
from graphopt.measure.calibration import SampleData, feed_batch_size, load_data  # noqa: E402
from graphopt.measure.verify import verify  # noqa: E402

ZOO = ROOT / "models" / "zoo.json"
EVAL = ROOT / "models" / "fmnist_eval.npz"
CALIB = ROOT / "models" / "fmnist_calib.npz"

Producer = Callable[[Path], onnx.ModelProto]

# Latency configurations: (label, threads, optimize).
CONFIGS = {
    "all-1t": (1, True), "all-mt": (None, True), "off-1t": (1, False), "off-mt": (None, False),
}


# ---------------------------------------------------------------------------------------------
# producers: how each candidate is made from the input model


def graphopt_producer(cli_args: str) -> Producer:
    """graphopt's output for the given ``optimize`` arguments (run through the Python API)."""
    args = shlex.split(cli_args)

    def make(path: Path) -> onnx.ModelProto:
        parser = cli.build_parser()
        ns = parser.parse_args(["optimize", str(path), *args])
        passes = [p for p in ns.passes.split(",") if p] if ns.passes else None
        result = graphopt.optimize(path, preset=ns.preset, passes=passes, options=ns.option,
                                   data=ns.data or (CALIB if CALIB.exists() else None),
                                   target_macs=ns.target_macs, target_params=ns.target_params,
                                   max_drop=ns.max_drop, run_verify=False, seed=ns.seed)
        return result.model
    return make


def _onnxsim(path: Path) -> onnx.ModelProto:
    import onnxsim
    model, ok = onnxsim.simplify(onnx.load(path))
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    return model


def _onnxslim(path: Path) -> onnx.ModelProto:
    import onnxslim
    return onnxslim.slim(onnx.load(path))


def _onnxoptimizer(path: Path) -> onnx.ModelProto:
    import onnxoptimizer
    return onnxoptimizer.optimize(onnx.load(path), onnxoptimizer.get_fuse_and_elimination_passes())


def onnxsim_prune(sparsity: float) -> Producer:
    def make(path: Path) -> onnx.ModelProto:
        import onnxsim
        return onnxsim.apply_structured_pruning(onnx.load(path), sparsity=sparsity)
    return make


def onnxsim_kmeans(bits: int) -> Producer:
    def make(path: Path) -> onnx.ModelProto:
        import onnxsim
        return onnxsim.quantize_weight_only_kmeans(onnx.load(path), bits=bits)
    return make


LOSSLESS_TOOLS: dict[str, Producer] = {"onnxsim": _onnxsim, "onnxslim": _onnxslim, "onnxoptimizer": _onnxoptimizer}


# ---------------------------------------------------------------------------------------------
# measurement


@dataclass
class Row:
    """Everything measured for one candidate."""

    name: str
    status: str = "ok"
    params: int | None = None
    macs: int | None = None
    nodes: int | None = None
    file_bytes: int | None = None
    accuracy: float | None = None
    max_abs_error: float | None = None
    rel_error: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    ratio: dict[str, float] = field(default_factory=dict)


def _static(row: Row, proto: onnx.ModelProto, shapes: dict | None = None) -> None:
    cost = analysis.analyze(onnx_io.from_proto(proto), input_shapes=shapes)
    row.params, row.macs, row.nodes = cost.params, cost.macs, cost.nodes
    row.file_bytes = proto.ByteSize()


def _quality(row: Row, original: onnx.ModelProto, proto: onnx.ModelProto, data: SampleData,
             reference_accuracy: list[float | None]) -> None:
    report = verify(original, proto, data, mode="accuracy")
    if report.reasons and not report.metrics:
        raise RuntimeError("; ".join(report.reasons))
    first = next(iter(report.metrics.values()))
    if not first.compared:
        raise RuntimeError(first.reason or "outputs not comparable")
    row.max_abs_error, row.rel_error = first.max_abs_error, first.max_rel_error
    row.accuracy = report.accuracy_candidate
    reference_accuracy[0] = report.accuracy_reference


def _timer(clock: str, threads: int | None) -> Callable[[], float]:
    """``wall``: elapsed time. ``cpu``: this process's CPU time, for 1-thread configurations only.

    With one intra-op thread onnxruntime runs every kernel on the calling thread and never spins, so the
    process's CPU time is the work done; unlike elapsed time it does not grow while the process waits for
    a core another process holds, which on a shared machine is most of the noise.
    """
    return time.process_time if clock == "cpu" and threads == 1 else time.perf_counter


def _latency(rows: list[Row], protos: dict[str, onnx.ModelProto], feeds: dict[str, np.ndarray],
             configs: Sequence[str], runs: int, warmup: int, clock: str = "wall") -> None:
    for config in configs:
        threads, optimize = CONFIGS[config]
        timer = _timer(clock, threads)
        sessions = {}
        for row in rows:
            if row.status == "ok":
                sessions[row.name] = ort.session(protos[row.name], optimize=optimize, threads=threads)
        names = list(sessions)
        for name in names:
            for _ in range(warmup):
                sessions[name].run(None, feeds)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(runs):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]  # rotate who goes first: no position bias
                start = timer()
                sessions[name].run(None, feeds)
                times[name].append(timer() - start)
        for row in rows:
            if row.name in times:
                row.latency_ms[config] = statistics.median(times[row.name]) * 1e3
    base = rows[0].latency_ms
    for row in rows:
        row.ratio = {c: base[c] / v for c, v in row.latency_ms.items() if c in base and v > 0}


def measure(model: Path, candidates: dict[str, Producer], *, data: SampleData | None, batch: int, runs: int,
            warmup: int = 3, configs: Sequence[str] = tuple(CONFIGS),
            clock: str = "wall") -> tuple[list[Row], float | None]:
    """Make every candidate from ``model`` and measure them all in one run. Row 0 is the original."""
    original = onnx.load(model)
    ir = onnx_io.from_proto(original)
    data, probe = api.probe_inputs(ir, data, samples=None if data is not None else batch)
    feeds = next(data.batches(feed_batch_size(ir, batch, data)))
    shapes = dict(probe.shapes) if probe.dynamic else None
    rows = [Row("original")]
    protos = {"original": original}
    reference_accuracy: list[float | None] = [None]
    for name, produce in candidates.items():
        row = Row(name)
        rows.append(row)
        try:
            protos[name] = produce(model)
        except Exception as exc:  # a tool failing is a result, not a crash of the benchmark
            row.status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    for row in rows:
        if row.status != "ok":
            continue
        try:
            ort.session(protos[row.name])
        except GraphoptError as exc:
            row.status = f"rejected by onnxruntime: {str(exc)[:160]}"
            continue
        _static(row, protos[row.name], shapes)
        try:
            _quality(row, original, protos[row.name], data, reference_accuracy)
        except Exception as exc:
            row.status = f"cannot compare: {str(exc)[:160]}"
    _latency(rows, protos, feeds, configs, runs, warmup, clock)
    return rows, reference_accuracy[0]


# ---------------------------------------------------------------------------------------------
# tables


def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "err":
        return f"{v:.1e}"
    if kind == "acc":
        return f"{v:.2f}"
    if kind == "ms":
        return f"{v:.2f}"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "kb":
        return f"{v / 1024:.0f}"
    return str(v)


def markdown(model_name: str, rows: list[Row], configs: Sequence[str]) -> list[str]:
    head = ["model", "candidate", "nodes", "params", "MACs", "KiB", "acc %", "max abs err", "rel err"]
    for c in configs:
        head += [f"{c} ms", f"{c} speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row.status != "ok":
            lines.append(f"| {model_name} | {row.name} | {row.status} |" + " |" * (len(head) - 3))
            continue
        cells = [model_name, row.name, _fmt(row.nodes), _fmt(row.params), _fmt(row.macs), _fmt(row.file_bytes, "kb"),
                 _fmt(row.accuracy, "acc"), _fmt(row.max_abs_error, "err"), _fmt(row.rel_error, "err")]
        for c in configs:
            cells += [_fmt(row.latency_ms.get(c), "ms"), _fmt(row.ratio.get(c), "x")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def emit_table(columns: Sequence[str], rows: Sequence[Sequence[str]], markdown_path: str | None = None) -> None:
    """Print a markdown table and, with ``markdown_path``, write it there too."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    print("\n".join(lines))
    if markdown_path:
        Path(markdown_path).write_text("\n".join(lines) + "\n")


def print_table(model_name: str, rows: list[Row], configs: Sequence[str]) -> None:
    print("\n".join(markdown(model_name, rows, configs)), flush=True)


# ---------------------------------------------------------------------------------------------
# suites


def zoo_models(names: Sequence[str] | None = None) -> list[tuple[str, Path]]:
    """Canonical zoo models (``models/<arch>.onnx``), optionally filtered by architecture."""
    entries = json.loads(ZOO.read_text())["models"]
    out = [(e["arch"], ROOT / e["file"]) for e in entries if e.get("form") == "canonical" or e.get("form") == [
        "canonical"]]
    if names:
        out = [(a, p) for a, p in out if a in names]
    return out


def suite_lossless(args: argparse.Namespace) -> list[str]:
    configs = ["all-1t", "off-1t"]
    lines = []
    data = load_data(EVAL, onnx_io.load(zoo_models()[0][1])) if EVAL.exists() else None
    for arch, path in zoo_models(args.models.split(",") if args.models else None):
        candidates = {"graphopt": graphopt_producer("--preset lossless"), **LOSSLESS_TOOLS}
        rows, _ = measure(path, candidates, data=data.head(args.samples) if data else None, batch=args.batch,
                          runs=args.runs, configs=configs, clock=args.clock)
        table = markdown(arch, rows, configs)
        lines += table if not lines else table[2:]
        if not args.quiet:
            print_table(arch, rows, configs)
    return lines


def cmd_compare(args: argparse.Namespace) -> None:
    candidates: dict[str, Producer] = {}
    if args.graphopt is not None:
        candidates["graphopt"] = graphopt_producer(args.graphopt)
    for tool in filter(None, args.tools.split(",")):
        if tool not in LOSSLESS_TOOLS:
            raise SystemExit(f"unknown tool {tool!r} (known: {', '.join(LOSSLESS_TOOLS)})")
        candidates[tool] = LOSSLESS_TOOLS[tool]
    if args.prune is not None:
        candidates[f"onnxsim-prune-{args.prune}"] = onnxsim_prune(args.prune)
    if args.kmeans is not None:
        candidates[f"onnxsim-kmeans-{args.kmeans}b"] = onnxsim_kmeans(args.kmeans)
    for spec in args.candidate:
        name, _, file = spec.partition("=")
        candidates[name] = lambda _path, file=file: onnx.load(file)
    model = Path(args.model)
    data = load_data(args.data, onnx_io.load(model)) if args.data else None
    rows, _ = measure(model, candidates, data=data.head(args.samples) if data else None, batch=args.batch,
                      runs=args.runs, configs=list(CONFIGS), clock=args.clock)
    print_table(model.stem, rows, list(CONFIGS))
    if args.json:
        Path(args.json).write_text(json.dumps([row.__dict__ for row in rows], indent=2))


def cmd_lossless(args: argparse.Namespace) -> None:
    suite_lossless(args)


BEGIN, END = "<!-- lossless:begin -->", "<!-- lossless:end -->"
LOSSLESS_TITLE = "## Lossless preset on the model zoo (issue 4)"


def lossless_section(args: argparse.Namespace, lines: list[str] | None = None) -> str:
    """The marked block this script owns in BENCHMARKS.md: title, command, machine, table."""
    command = (f"python tools/bench.py lossless --runs {args.runs} --batch {args.batch} --samples {args.samples} "
               f"--clock {args.clock}")
    clock = ("process CPU time per run (`--clock cpu`: with one intra-op thread onnxruntime computes on the calling "
             "thread, and CPU time does not count the waits for a core that other processes cause)"
             if args.clock == "cpu" else "elapsed time per run")
    body = [BEGIN, LOSSLESS_TITLE, "",
            f"Latency: median of timed runs, {clock}; candidates interleaved round-robin in one process, onnxruntime "
            "with `allow_spinning = 0`; `all` = ORT_ENABLE_ALL, `off` = ORT_DISABLE_ALL, `1t` = one intra-op thread. "
            "Speedup = original latency / candidate latency in the same run. Errors are against the original "
            "with onnxruntime's optimizations off.", "",
            f"Command: `{command}`", "", f"Machine: {_machine()}", ""]
    body += lines if lines is not None else suite_lossless(args)
    body.append(END)
    return "\n".join(body)


def replace_section(text: str, section: str) -> str:
    """``text`` with the marked block replaced by ``section``; everything outside the markers is kept.

    Without markers, an unmarked section with the same title (up to the next ``## `` heading) is replaced,
    so an older file is converted once; otherwise the block is appended.
    """
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        return head + section + rest.split(END, 1)[1]
    lines = text.splitlines()
    if LOSSLESS_TITLE in lines:
        i = lines.index(LOSSLESS_TITLE)
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
        tail = lines[j:]
        return "\n".join(lines[:i] + section.splitlines() + ([""] + tail if tail else [])) + "\n"
    sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    return text + sep + section + "\n"


def cmd_write(args: argparse.Namespace) -> None:
    """Regenerate this script's section of BENCHMARKS.md (between its markers); the rest stays as it is."""
    path = Path(args.path)
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    path.write_text(replace_section(text, lossless_section(args)))
    print(f"wrote the lossless section of {args.path}")


def _machine() -> str:
    import os
    import platform

    import onnxruntime
    return (f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--runs", type=int, default=30, help="timed runs per candidate and configuration")
    common.add_argument("--batch", type=int, default=64, help="batch size for latency")
    common.add_argument("--samples", type=int, default=2000, help="evaluation samples for accuracy/error")
    common.add_argument("-q", "--quiet", action="store_true")
    common.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: process CPU time for 1-thread configurations (robust on a "
                             "shared machine; multi-thread configurations always use elapsed time)")
    p = sub.add_parser("compare", parents=[common], help="one model: the original vs candidates")
    p.add_argument("model")
    p.add_argument("--graphopt", metavar="ARGS", help='graphopt optimize arguments, e.g. "--preset lossless"')
    p.add_argument("--tools", default="onnxsim,onnxslim,onnxoptimizer", help="comma-separated comparison tools")
    p.add_argument("--prune", type=float, metavar="SPARSITY", help="also onnxsim's apply_structured_pruning")
    p.add_argument("--kmeans", type=int, metavar="BITS", help="also onnxsim's k-means weight clustering")
    p.add_argument("--candidate", action="append", default=[], metavar="NAME=FILE", help="an extra model to measure")
    p.add_argument("--data", help="evaluation data (.npz with labels)")
    p.add_argument("--json", help="write the rows as JSON")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("lossless", parents=[common], help="zoo: graphopt lossless vs onnxsim/onnxslim/onnxoptimizer")
    p.add_argument("--models", help="comma-separated architectures (default: all canonical zoo models)")
    p.set_defaults(func=cmd_lossless)
    p = sub.add_parser("write", parents=[common], help="regenerate the lossless section of BENCHMARKS.md (between "
                                                       "<!-- lossless:begin --> and <!-- lossless:end -->)")
    p.add_argument("path")
    p.add_argument("--models", help="comma-separated architectures (default: all canonical zoo models)")
    p.set_defaults(func=cmd_write)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
