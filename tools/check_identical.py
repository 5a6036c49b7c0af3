"""Behaviour-unchanged check for refactorings: every preset on every zoo model and variant, byte for byte.

A restructuring that claims to change no behaviour must give the same output file for every preset on
every model the project ships. This tool runs the command line (a fresh process per run, as a user
would) over ``models/*.onnx`` and ``models/variants/*.onnx`` with each configuration in ``CONFIGS``,
and records per run the exit status and the SHA-256 of the written model (or ``None`` when none was
written), plus the SHA-256 of ``graphopt inspect --json`` and ``inspect --groups --json`` per model.

``record`` writes that table as JSON (of the working tree, or of ``--rev REV`` checked out into a
temporary git worktree); ``compare`` runs the same table on the working tree and prints
every row that differs (exit 1 when any does). ``--base REV`` does both in one go: it checks REV out
into a temporary git worktree, records there, records here, and compares.

Commands::

    python tools/check_identical.py record baseline.json [--rev REV] [--jobs 2] [--models resnet,vgg]
    python tools/check_identical.py compare baseline.json [--jobs 2] [--configs lossless,prune,inspect]
    python tools/check_identical.py --base cd5dbc6          # record REV in a worktree, then compare
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIB = "models/fmnist_calib.npz"
EVAL = "models/fmnist_eval.npz"
FAST = ["--data", CALIB, "--samples", "128"]

# name -> (command-line arguments after the model, canonical models only?)
CONFIGS: dict[str, tuple[list[str], bool]] = {
    "lossless": (["--preset", "lossless"], False),
    "lossless_data": (["--preset", "lossless", "--data", CALIB], False),
    "deeprebirth": (["--preset", "deeprebirth", *FAST], False),
    "prune": (["--preset", "prune", "--target-macs", "0.5", *FAST], False),
    "lowrank": (["--preset", "lowrank", "--target-params", "0.5", *FAST], False),
    "lowrank_plain": (["--preset", "lowrank", "--target-macs", "0.6"], True),
    "compress": (["--preset", "compress", *FAST, "--option", "weight_sharing.encoding=compact"], False),
    "prune_guard": (["--preset", "prune", "--target-macs", "0.5", *FAST, "--max-drop", "1",
                     "--verify-data", EVAL], True),
    "prune_params": (["--preset", "prune", "--target-params", "0.6", *FAST], True),
    "lowrank_guard": (["--preset", "lowrank", "--target-macs", "0.5", *FAST, "--max-drop", "1",
                       "--verify-data", EVAL], True),
}


def models(root: Path, only: set[str] | None) -> list[Path]:
    found = sorted(root.glob("models/*.onnx")) + sorted(root.glob("models/variants/*.onnx"))
    return [p for p in found if only is None or p.name.split(".")[0] in only]


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _environment(root: Path) -> dict[str, str]:
    return dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(root))


def _run_one(root: Path, model: Path, config: str, scratch: Path) -> tuple[str, dict]:
    key = f"{model.relative_to(root)}::{config}"
    out = scratch / (key.replace("/", "_").replace("::", ".") + ".onnx")
    args, _ = CONFIGS[config]
    cmd = [sys.executable, "-m", "graphopt", "optimize", str(model), "-o", str(out), "-q", *args]
    if "--max-drop" not in args:
        cmd.append("--no-verify")
    proc = subprocess.run(cmd, cwd=root, env=_environment(root), capture_output=True, text=True)
    row = {"exit": proc.returncode, "sha256": _digest(out)}
    if proc.returncode not in (0, 1):
        row["stderr"] = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
    out.unlink(missing_ok=True)
    out.with_suffix(".onnx.data").unlink(missing_ok=True)
    return key, row


def _inspect_one(root: Path, model: Path, groups: bool) -> tuple[str, dict]:
    key = f"{model.relative_to(root)}::inspect{'_groups' if groups else ''}"
    cmd = [sys.executable, "-m", "graphopt", "inspect", str(model), "--json", *(["--groups"] if groups else [])]
    proc = subprocess.run(cmd, cwd=root, env=_environment(root), capture_output=True, text=True)
    return key, {"exit": proc.returncode, "sha256": hashlib.sha256(proc.stdout.encode()).hexdigest()}


def record(root: Path, jobs: int, only: set[str] | None, configs: set[str] | None = None) -> dict[str, dict]:
    """Run every configuration (or those in ``configs``; ``inspect`` for the two inspect runs) on every
    model of ``root``'s zoo with ``root``'s code; return the table."""
    files = models(root, only)
    canonical = {p for p in files if p.parent.name == "models"}
    tasks = [(m, c) for m in files for c, (_, canon_only) in CONFIGS.items()
             if (m in canonical or not canon_only) and (configs is None or c in configs)]
    inspect = configs is None or "inspect" in configs
    table: dict[str, dict] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="graphopt-identical-") as tmp, ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(_run_one, root, m, c, Path(tmp)) for m, c in tasks]
        futures += [pool.submit(_inspect_one, root, m, g) for m in files for g in (False, True) if inspect]
        for done, future in enumerate(futures, 1):
            key, row = future.result()
            table[key] = row
            print(f"\r{done}/{len(futures)} runs, {time.monotonic() - started:.0f} s", end="", file=sys.stderr)
    print(file=sys.stderr)
    return dict(sorted(table.items()))


def compare(base: dict[str, dict], here: dict[str, dict]) -> list[str]:
    """The rows that differ between two tables, as printable lines."""
    lines = []
    for key in sorted(set(base) | set(here)):
        a, b = base.get(key), here.get(key)
        if a != b:
            lines.append(f"{key}: base {a} != here {b}")
    return lines


def _worktree(rev: str, into: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(into), rev], cwd=ROOT, check=True,
                   capture_output=True)
    # Before issue 19 the passes lived in /passes, mapped into graphopt.passes by the install; a
    # symlink lets the plain PYTHONPATH import used here find them the same way.
    if (into / "passes").is_dir() and not (into / "graphopt" / "passes").exists():
        (into / "graphopt" / "passes").symlink_to(into / "passes", target_is_directory=True)
    return into


def _selected(key: str, only: set[str] | None, configs: set[str] | None) -> bool:
    path, config = key.split("::")
    model = path.split("/")[-1].split(".")[0]
    config = "inspect" if config.startswith("inspect") else config
    return (only is None or model in only) and (configs is None or config in configs)


def record_rev(rev: str, jobs: int, only: set[str] | None, configs: set[str] | None = None) -> dict[str, dict]:
    """``record`` with the code of git revision ``rev``, checked out into a temporary worktree."""
    with tempfile.TemporaryDirectory(prefix="graphopt-base-") as tmp:
        tree = _worktree(rev, Path(tmp) / "tree")
        try:
            return record(tree, jobs, only, configs)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", nargs="?", choices=("record", "compare"))
    parser.add_argument("table", nargs="?", help="the JSON table to write (record) or read (compare)")
    parser.add_argument("--base", metavar="REV", help="record REV in a temporary worktree, then compare here")
    parser.add_argument("--rev", metavar="REV", help="record: the code of REV (a temporary worktree), not the tree")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--models", help="comma-separated model names (default: all)")
    parser.add_argument("--configs", help=f"comma-separated configurations (default: all): "
                                          f"{', '.join(CONFIGS)}, inspect")
    args = parser.parse_args(argv)
    only = set(args.models.split(",")) if args.models else None
    configs = set(args.configs.split(",")) if args.configs else None
    if configs is not None and not configs <= set(CONFIGS) | {"inspect"}:
        parser.error(f"unknown configuration in --configs: {', '.join(sorted(configs - set(CONFIGS)))}")
    if args.base:
        base = record_rev(args.base, args.jobs, only, configs)
    elif args.action == "record" and args.table:
        table = record_rev(args.rev, args.jobs, only, configs) if args.rev else record(ROOT, args.jobs, only, configs)
        Path(args.table).write_text(json.dumps(table, indent=1) + "\n")
        return 0
    elif args.action == "compare" and args.table:
        base = json.loads(Path(args.table).read_text())
        base = {k: v for k, v in base.items() if _selected(k, only, configs)}
    else:
        parser.error("give record TABLE, compare TABLE or --base REV")
    here = record(ROOT, args.jobs, only, configs)
    diff = compare(base, here)
    for line in diff:
        print(line)
    print(f"{len(here)} runs, {len(diff)} differ")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
