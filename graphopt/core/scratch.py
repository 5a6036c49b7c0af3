"""Scratch files: one private temporary directory per run, removed however the run ends.

The rule: graphopt writes files in two places only.

1. The paths the user names: the output model and its ``.data`` file, reports, ``--dump-dir``. Each
   is written to a temporary name beside it and moved into place, so a failed run leaves none of them.
2. The run's scratch directory, for files that live only while the run does: a model over protobuf's
   2 GiB limit that onnxruntime or onnx's checker and shape inference must read from a path, and
   least-squares targets spilled to disk.

Nothing goes to the current directory, and nothing is left in ``TMPDIR``. Code that needs a file asks
:func:`directory` for a fresh folder and works inside its ``with`` block; a library that would write
on its own is called so that it does not (``docs/decisions/scratch-files.md`` lists them and how).

:func:`run` is entered once per command, by the API's functions and by the command line. The run's
directory (``graphopt-XXXXXXXX`` in ``TMPDIR``, private to the user as ``mkdtemp`` makes it) is
created at the first :func:`directory` call, so a run that needs no scratch file creates nothing,
and it is removed when the ``with`` block exits: on return, on an exception, on ``KeyboardInterrupt``.
The command line turns ``SIGTERM`` into an exception so that it unwinds the same way; only
``SIGKILL`` can leave the directory behind, and its name says what it is.

A ``TMPDIR`` where no folder can be made is bad input (:class:`~graphopt.core.errors.GraphoptError`,
exit 2 on the command line), raised when the first scratch file is needed.

Outside a run (a pass called directly from Python, or another thread: runs are per thread),
:func:`directory` makes a standalone temporary folder in ``TMPDIR`` with the same lifetime: its
``with`` block.

Example
-------
>>> with run():
...     with directory("ort") as folder:
...         _ = (folder / "model.onnx").write_bytes(b"")
...     with directory("ort") as other:
...         same_run = folder.parent == other.parent
>>> same_run, folder.exists(), folder.parent.exists()
(True, False, False)
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from graphopt.core.errors import GraphoptError

PREFIX = "graphopt-"


class _Run:
    """The active run: its directory, made on first use."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def folder(self) -> Path:
        if self.path is None:
            self.path = _mkdtemp(PREFIX, None)
        return self.path


def _mkdtemp(prefix: str, parent: Path | None) -> Path:
    """``tempfile.mkdtemp``; an unusable ``TMPDIR`` is the user's to fix, so it is one line, not a traceback."""
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as exc:
        where = parent if parent is not None else (tempfile.tempdir or "TMPDIR")
        raise GraphoptError(f"cannot create a temporary directory in {where} ({exc.strerror or exc}); "
                            f"set TMPDIR to a writable folder") from None


class _Runs(threading.local):
    """The thread's active run (at most one: a nested ``run()`` joins the outer one). Per thread, so
    two API calls in two threads never share, or remove, each other's directory."""

    def __init__(self) -> None:
        self.stack: list[_Run] = []


_runs = _Runs()


@contextlib.contextmanager
def run() -> Iterator[None]:
    """Group every scratch file made inside the block into one directory, removed when it exits.

    Re-entrant: inside a run, ``run()`` joins it (the API's ``optimize`` called by the command line
    makes one directory, not two). Usable as a decorator.
    """
    if _runs.stack:
        yield
        return
    current = _Run()
    _runs.stack.append(current)
    try:
        yield
    finally:
        _runs.stack.remove(current)
        if current.path is not None:
            shutil.rmtree(current.path, ignore_errors=True)


@contextlib.contextmanager
def directory(purpose: str) -> Iterator[Path]:
    """A fresh, empty folder for ``purpose`` (a word in its name), removed when the block exits.

    Inside a run it is a subfolder of the run's directory; outside, a folder in ``TMPDIR``.
    """
    if _runs.stack:
        path = _mkdtemp(f"{purpose}-", _runs.stack[-1].folder())
    else:
        path = _mkdtemp(f"{PREFIX}{purpose}-", None)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def current() -> Path | None:
    """The active run's directory, or ``None`` outside a run or before its first scratch file."""
    return _runs.stack[-1].path if _runs.stack else None
