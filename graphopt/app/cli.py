"""The ``graphopt`` command line.

Exit codes: 0 success / verification passed; 1 verification failed; 2 bad input (a missing or
broken model, bad data, an unknown pass or option); 3 internal error (a bug: please report it);
130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Errors are one line on stderr; ``--debug`` shows
the traceback instead. A command is one scratch run (:mod:`graphopt.core.scratch`): whatever the exit
code, it leaves no file but the outputs it wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from graphopt import __version__
from graphopt.app import api, report
from graphopt.core import manager, scratch
from graphopt.core.errors import GraphoptError, OptionError
from graphopt.core.progress import Steps
from graphopt.measure import analysis, calibration, cpu, executor
from graphopt.measure import target as targets
from graphopt.measure.verify import Tolerance

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_TARGET_MISSED = 0, 1, 2, 3, 4


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2 (its own default is 2 too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"graphopt: error: {message} (see {self.prog} --help)\n")


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="FILE.npz|DIR", help="sample inputs keyed by input name (+ optional 'labels'); "
                   "or a directory of such .npz shards, its first --samples (512) in memory and the summed "
                   "statistics streamed over every shard")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="fix the dynamic dims of an input (repeatable)")
    p.add_argument("--samples", type=int, metavar="N", help="use at most N samples")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs and passes (default 0)")
    p.add_argument("--rel-tol", type=_fraction, metavar="X", help="max error relative to the output range")
    p.add_argument("--abs-tol", type=_fraction, metavar="X", help="max absolute error")
    p.add_argument("--max-drop", type=_fraction, metavar="POINTS", help="max accuracy drop for lossy pipelines")
    p.add_argument("--min-snr-db", type=_fraction, metavar="DB",
                   help="lossy: min SNR in dB of outputs that are not class scores (maps, embeddings...)")
    p.add_argument("--min-cosine", type=_fraction, metavar="C",
                   help="min per-sample cosine similarity (lossy: of outputs that are not class scores)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--debug", action="store_true", help="check the IR after every pass; tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphopt", description="Graph-level optimizer for ONNX models, verified with onnxruntime.")
    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("optimize", help="optimize a model and verify the result")
    p.add_argument("model", help="input .onnx file (never overwritten)")
    p.add_argument("-o", "--output", help="output file (default: MODEL with .opt.onnx)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", help="a named pipeline (default: lossless); see `graphopt passes`")
    group.add_argument("--passes", help="comma-separated pass names, run in order")
    p.add_argument("--option", action="append", default=[], metavar="PASS.KEY=VALUE", help="set a pass option")
    p.add_argument("--quantize", choices=api.QUANTIZE, help="quantize after the pipeline (last): int8 (W8A8) or "
                                                            "w4a8 (4-bit weights, 8-bit activations)")
    p.add_argument("--target-macs", type=_fraction, metavar="R", help="keep this fraction of the MACs (lossy passes)")
    p.add_argument("--target-params", type=_fraction, metavar="R", help="keep this fraction of the parameters")
    p.add_argument("--target-cpu", metavar="KIND|FILE.json",
                   help=f"the CPU the model is for: auto (this machine; the default, or ${targets.ENV}), one of "
                        f"{', '.join(cpu.KINDS)}, or a profile from `graphopt calibrate -o`; channel counts, "
                        "ranks and int8 weights are priced for it")
    p.add_argument("--report", action="append", default=[], metavar="FILE.json|.md|.html",
                   help="write a report (repeatable)")
    p.add_argument("--dump-dir", metavar="DIR", help="write the model after every pass into DIR")
    p.add_argument("--verify-data", metavar="FILE.npz",
                   help="held-out samples to verify on (default: --data; lossy passes fit to --data)")
    p.add_argument("--train-data", metavar="FILE.npz|DIR",
                   help="unlabeled inputs for +finetune: a .npz file or a directory of .npz shards (streamed); "
                        "default: --data")
    p.add_argument("--executor", choices=executor.KINDS,
                   help="where independent evaluations (sensitivity tables, guard candidates, sharded statistics) "
                        "run: local processes (process, the default) or Ray tasks (ray; needs "
                        "pip install 'graphopt[ray]'); the output is the same")
    p.add_argument("--workers", type=int, metavar="N",
                   help="evaluations at once: processes (default 1: this process; 0: one per core) or the CPUs of "
                        "the local Ray cluster (default: one per core)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="run the evaluations on the Ray cluster at ADDR (host:port or ray://host:port) instead of a "
                        "local one; implies --executor ray")
    p.add_argument("--no-verify", action="store_true", help="skip verification (not recommended)")
    p.add_argument("--write-failed", action="store_true",
                   help="write the output even if verification fails or a target is missed")
    p.add_argument("--allow-partial", action="store_true",
                   help="a missed --target-macs/--target-params still writes the output and exits 0")
    _add_data_args(p)
    _add_common(p)

    p = sub.add_parser("verify", help="compare two models with onnxruntime (exit 0 pass, 1 fail, 2 bad input)")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--mode", choices=("equivalence", "accuracy"), default="equivalence",
                   help="equivalence: outputs within float noise; accuracy: accuracy drop within --max-drop")
    p.add_argument("--report", action="append", default=[], metavar="FILE.json", help="write the metrics as JSON")
    _add_data_args(p)
    _add_common(p)

    p = sub.add_parser("inspect", help="op histogram, params, MACs, size and a per-layer table")
    p.add_argument("model")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    p.add_argument("--groups", action="store_true",
                   help="list the channel pruning groups (members, producers, consumers, why frozen)")
    p.add_argument("--lossless", action="store_true",
                   help="analyze the model after the lossless preset: the group ids prune_filters sees "
                        "under the prune preset (for its option channels)")
    p.add_argument("--heads", action="store_true",
                   help="with --groups: attention channels are whole heads (prune_filters.attention=heads)")
    _add_common(p)

    p = sub.add_parser("calibrate", help="measure this machine's latency profile (minutes) and cache it for "
                                         "--target-cpu auto")
    p.add_argument("--quick", action="store_true", help="a few small kernels per kind (seconds; a rough profile)")
    p.add_argument("--scale", type=_fraction, metavar="X",
                   help="kernels measured, as a fraction of the full set of about 600 (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kernel shapes (default 0)")
    p.add_argument("-o", "--output", metavar="FILE.json",
                   help=f"write the profile here instead of the cache ({targets.cache_dir()}); "
                        "give the file to --target-cpu on another machine")
    _add_common(p)

    p = sub.add_parser("passes", help="list the registered passes and presets, or one pass's options")
    p.add_argument("name", nargs="?", help="a pass: its options with type, default, allowed values and help")
    _add_common(p)
    return parser


@contextlib.contextmanager
def _status(console: Console, quiet: bool) -> Iterator[Any]:
    """A spinner with the current step on stderr (silent with -q or when stderr is not a terminal)."""
    if quiet or not console.is_terminal:
        yield lambda message: None
        return
    with console.status("starting") as status:
        yield lambda message: status.update(_renderable(message))


def _renderable(message: str) -> Any:
    """A :class:`~graphopt.core.progress.Steps` message as a bar with its fields; other text as it is."""
    if not isinstance(message, Steps) or message.total <= 0:
        return message
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    row = Table.grid(padding=(0, 1))
    row.add_row(message.what, ProgressBar(total=message.total, completed=message.done, width=30),
                f"{message.done}/{message.total}", message.fields)
    return row


def _tolerance(args: argparse.Namespace) -> Tolerance | None:
    if all(v is None for v in (args.rel_tol, args.abs_tol, args.max_drop, args.min_snr_db, args.min_cosine)):
        return None
    kwargs = {"rel": args.rel_tol, "abs": args.abs_tol, "min_snr_db": args.min_snr_db, "min_cosine": args.min_cosine}
    if args.max_drop is not None:
        kwargs["max_drop"] = args.max_drop
    return Tolerance(**kwargs)


def cmd_optimize(args: argparse.Namespace, out: Console, err: Console) -> int:
    output = Path(args.output) if args.output else api.default_output(args.model)
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    if args.passes is not None and not passes:
        raise GraphoptError("--passes needs at least one pass name")
    for path in args.report:
        report.check_report_path(path)
    with _status(err, args.quiet) as progress:
        result = api.optimize(
            args.model, output=output, preset=args.preset, passes=passes, options=args.option, data=args.data,
            quantize=args.quantize,
            input_shapes=calibration.parse_input_shapes(args.input_shape), target_macs=args.target_macs,
            target_params=args.target_params, max_drop=args.max_drop, tolerance=_tolerance(args),
            samples=args.samples, seed=args.seed, run_verify=not args.no_verify, write_failed=args.write_failed,
            debug=args.debug, dump_dir=args.dump_dir, verify_data=args.verify_data,
            allow_partial=args.allow_partial, train_data=args.train_data, target_cpu=args.target_cpu,
            executor=args.executor, workers=args.workers, ray_address=args.ray_address, progress=progress)
    for path in args.report:
        report.write_report(result.report, path)
    if not args.quiet:
        report.print_summary(result.report, out)
    kept = "written anyway (--write-failed)" if args.write_failed else "not written"
    if not result.passed:
        if not args.quiet:
            hints = report.failure_hints(result.report.get("verify"), random_data=args.data is None
                                         and args.verify_data is None, write_failed=args.write_failed)
            err.print("; ".join([f"graphopt: verification failed; {output} {kept}", *hints]))
        return EXIT_FAILED
    if not result.target_met and not args.allow_partial:
        if not args.quiet:
            err.print(f"graphopt: {report.target_line(result.report)}; {output} {kept}; "
                      f"--allow-partial writes a model that misses its target")
        return EXIT_TARGET_MISSED
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, out: Console, err: Console) -> int:
    verdict = api.verify(args.reference, args.candidate, data=args.data,
                         input_shapes=calibration.parse_input_shapes(args.input_shape), mode=args.mode,
                         tolerance=_tolerance(args), samples=args.samples, seed=args.seed)
    for path in args.report:
        report.write_report(verdict.to_dict(), path)
    if not args.quiet:
        report.print_verdict(verdict.to_dict(), out)
        hints = report.failure_hints(verdict.to_dict(), random_data=args.data is None, write_failed=None,
                                     data_flag="--data")
        if hints:
            err.print("; ".join(["graphopt: verification failed", *hints]))
    return EXIT_OK if verdict.passed else EXIT_FAILED


def cmd_inspect(args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.groups:
        return _inspect_groups(args, out)
    if args.lossless or args.heads:
        err.print(f"graphopt: error: {'--lossless' if args.lossless else '--heads'} only applies with --groups")
        return EXIT_BAD_INPUT
    cost = api.inspect(args.model, input_shapes=calibration.parse_input_shapes(args.input_shape))
    if args.json:
        out.print_json(json.dumps(cost.to_dict()))
    elif not args.quiet:
        print_inspection(cost, out)
    return EXIT_OK


def print_inspection(cost: analysis.ModelCost, console: Console) -> None:
    """Totals, inputs/outputs, the op histogram and the per-layer table of ``graphopt inspect``."""
    from rich.table import Table
    from rich.text import Text
    totals = Table(title="Model", title_justify="left", show_header=False)
    totals.add_row("params", report.format_count(cost.params))
    totals.add_row("MACs", report.format_count(cost.macs) if cost.macs is not None
                   else f">= {report.format_count(cost.macs_known)} (some unknown)")
    totals.add_row("weight bytes", report.format_bytes(cost.param_bytes))
    if cost.file_bytes is not None:
        totals.add_row("file size", report.format_bytes(cost.file_bytes))
    totals.add_row("nodes", str(cost.nodes))
    for kind, tensors in (("input", cost.inputs), ("output", cost.outputs)):
        for t in tensors:
            totals.add_row(kind, Text(f"{t.name}: {t.dtype} {list(t.shape) if t.shape is not None else '?'}"))
    console.print(totals)
    ops = Table(title="Ops", title_justify="left")
    for col in ("op", "count", "params", "MACs"):
        ops.add_column(col, justify="left" if col == "op" else "right")
    for row in analysis.summarize_ops(cost):
        ops.add_row(Text(row.op_type), str(row.count), report.format_count(row.params),
                    report.format_count(row.macs) if row.macs is not None
                    else f">= {report.format_count(row.macs_known)}")
    console.print(ops)
    layers = Table(title="Layers", title_justify="left")
    for col in analysis.LAYER_COLUMNS:
        layers.add_column(col)
    for row in analysis.layer_rows(cost):
        layers.add_row(*(Text(c) for c in row))
    console.print(layers)


def _inspect_groups(args: argparse.Namespace, out: Console) -> int:
    from graphopt.compress import channels
    shapes = calibration.parse_input_shapes(args.input_shape) or None
    if args.lossless:
        # The prune preset runs the lossless cleanup first, which can merge layers and so renumber groups.
        ir = api.optimize(args.model, preset="lossless", input_shapes=shapes, run_verify=False).ir
    else:
        ir, _ = api.load_model(args.model)
    result = channels.analyze(ir, shapes or api.probe_shapes(ir), heads=args.heads)
    if args.json:
        out.print_json(json.dumps(result.to_dict()))
    elif not args.quiet:
        print_groups(result, out)
    return EXIT_OK


def print_groups(result: Any, console: Console) -> None:
    """The channel groups table of ``graphopt inspect --groups``: one row per group."""
    from rich.table import Table
    from rich.text import Text
    prunable = result.prunable()
    title = (f"Channel groups: {len(result.groups)}, prunable {len(prunable)}, "
             f"frozen {len(result.frozen())}")
    table = Table(title=title, title_justify="left", show_lines=True)
    for col in ("gid", "size", "status", "producers", "consumers", "members"):
        table.add_column(col, justify="right" if col in ("gid", "size") else "left",
                         overflow="fold", no_wrap=col in ("gid", "size"))
    for g in result.groups:
        if g.frozen is not None:
            status = Text(f"frozen: {g.frozen}", style="yellow")
        elif g.size < 2:
            status = Text("single channel", style="dim")
        else:
            status = Text("prunable", style="green")
        producers = sorted({p.node for p in g.producers})
        consumers = sorted({c.node for c in g.consumers})
        # value[axes], and "xK" when a channel is K positions there (a flattened block, a shuffle's groups)
        members = [f"{m.value}[{','.join(map(str, m.axes))}]"
                   + (f" x{m.index_map.shape[1]}" if m.index_map.shape[1] > 1 else "")
                   for m in g.members if not m.is_param]
        table.add_row(str(g.gid), str(g.size), status, Text("\n".join(producers) or "-"),
                      Text("\n".join(consumers) or "-"), Text("\n".join(members) or "-"))
    console.print(table)


def cmd_passes(args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.quiet:
        return EXIT_OK
    from rich.table import Table
    if args.name:
        return _print_pass_options(args.name, out)
    table = Table(title="passes", show_lines=False)
    for col in ("name", "kind", "summary", "options"):
        table.add_column(col)
    for name, cls in manager.registered().items():
        opts = ", ".join(f"{k}={o.default!r}" for k, o in cls.options.items())
        table.add_row(name, "lossless" if cls.lossless else "lossy", cls.summary, opts)
    out.print(table)
    presets = Table(title="presets")
    presets.add_column("name")
    presets.add_column("passes")
    presets.add_column("summary")
    for name, build in manager.presets().items():
        presets.add_row(name, ", ".join(p.name for p in build().leaves()), build.summary)
    out.print(presets)
    return EXIT_OK


def _print_pass_options(name: str, out: Console) -> int:
    """One pass's options: ``--option NAME.key=value`` takes these."""
    from rich.table import Table
    from rich.text import Text
    cls = manager.registered().get(name)
    if cls is None:
        raise OptionError(f"unknown pass {name!r} (graphopt passes lists them)")
    out.print(Text(f"{name}: {cls.summary}"))
    if not cls.options:
        out.print(Text("no options"))
        return EXIT_OK
    table = Table(title=f"options (--option {name}.KEY=VALUE)", title_justify="left")
    for col in ("key", "type", "default", "allowed"):
        table.add_column(col)
    table.add_column("meaning", overflow="fold")  # every word of the help: it is the only place it is shown
    for key, opt in cls.options.items():
        allowed = (", ".join(map(str, opt.choices)) if opt.choices is not None
                   else opt.bounds() if opt.type in (int, float) else "")
        table.add_row(*(Text(str(v)) for v in (key, opt.type.__name__, repr(opt.default), allowed, opt.help)))
    out.print(table)
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace, out: Console, err: Console) -> int:
    """``graphopt calibrate``: the profile of this machine, with a progress bar on stderr."""
    scale = 0.01 if args.quick else (1.0 if args.scale is None else args.scale)
    with _progress_bar(err, args.quiet) as advance:
        result = api.calibrate(output=args.output, scale=scale, seed=args.seed, progress=advance)
    if not args.quiet:
        report.print_calibration(result, out)
    return EXIT_OK


@contextlib.contextmanager
def _progress_bar(console: Console, quiet: bool) -> Iterator[Any]:
    """A bar of kernels measured, on stderr (silent with -q or when stderr is not a terminal)."""
    if quiet or not console.is_terminal:
        yield lambda done, total, what: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    with Progress(TextColumn("calibrating {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("", total=None)

        def advance(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        yield advance


COMMANDS = {"optimize": cmd_optimize, "verify": cmd_verify, "inspect": cmd_inspect, "calibrate": cmd_calibrate,
            "passes": cmd_passes}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors, --help, --version: argparse has printed what it had to
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    out = Console()
    err = Console(stderr=True, soft_wrap=True)  # stderr lines are for logs and grep: never wrapped
    # onnxruntime's graph optimizers warn through its process-wide logger, not the session's (whose level
    # ort.py sets). The command line owns its process, so it silences them; a library user keeps control.
    import onnxruntime
    onnxruntime.set_default_logger_severity(3)
    try:
        with _sigterm_unwinds(), scratch.run():  # the handler outlives the run, so cleanup finishes too
            return COMMANDS[args.command](args, out, err)
    except GraphoptError as exc:
        if args.debug:
            raise
        print(f"graphopt: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("graphopt: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception as exc:  # a bug: one line, and the way to see more
        if args.debug:
            raise
        print(f"graphopt: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the "
              f"traceback)", file=sys.stderr)
        return EXIT_INTERNAL


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread so the run unwinds (scratch files removed, no output)."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the command runs, SIGTERM raises :class:`Terminated` instead of killing the process on the
    spot, so every ``finally`` runs, as for Ctrl-C. Only the main thread can take signals; elsewhere
    (``main`` called from a thread) nothing changes."""
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
