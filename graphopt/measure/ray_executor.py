"""Run evaluations as Ray tasks: on a local cluster started for the run, or on a cluster the run joins.

:class:`RayExecutor` serves the :class:`~graphopt.measure.executor.Executor` interface (``map(fn, items,
*, context, progress)``, results in item order) for work that outgrows one machine's process pool.
Ray is an optional extra (``pip install 'graphopt[ray]'``); without it, :func:`require_ray` and every
use of the executor refuse in one line that names the install command (a
:class:`~graphopt.core.errors.GraphoptError`: exit 2 on the command line).

What a ``map`` does
-------------------
* The context goes to the object store **once** (``ray.put``; once for consecutive maps of the same
  context object, which must not change in between); each task carries a reference to it, and a
  worker process fetches and unpickles it once, then reuses it (and the caches it keeps, such as an
  :class:`~graphopt.measure.executor.EvalContext`'s session) for every later task. Only ``fn`` (by
  reference, a module-level function) and the items travel with each task: a run of consecutive items
  (:func:`~graphopt.measure.executor.chunks`, about four per worker), so that a worker meets them in the
  caller's order and keeps what one item built (a unit's session) for the next.
* Results come back **in item order**, whatever order the tasks finish in, so the caller's result (a
  sensitivity table, the file written from it) is the same as :class:`InProcess`'s.
* Workers run with one BLAS/OpenMP thread (``WORKER_ENV``: inherited from the local cluster's start, or
  the job's runtime environment on a cluster joined) and
  :func:`~graphopt.measure.executor.in_worker` true, so sessions they build use one onnxruntime
  thread, as in a process pool: a task uses one CPU, the one Ray reserves for it. A worker keeps the
  last context it loaded (and the sessions it built) until a task of another ``map`` arrives or the
  cluster stops: a local cluster stops with the run.

Faults
------
* A worker that dies (killed, out of memory, ``os._exit``, its node lost) is retried by Ray
  (``retries`` times, 3 by default); a task that still dies raises
  :class:`~graphopt.measure.executor.WorkerDied` naming the item.
* An exception ``fn`` raises is not retried (evaluations are deterministic: it would raise again). It
  is re-raised as :class:`~graphopt.measure.executor.TaskError` naming the item, the first failing
  item in item order, like the other executors; the tasks still outstanding are cancelled.
* ``KeyboardInterrupt`` (Ctrl-C; also the command line's SIGTERM) while waiting cancels every
  outstanding task (forcefully: a running evaluation is stopped) and shuts a local cluster down before
  it propagates.

The cluster
-----------
Without ``address``, the first ``map`` starts a **local** cluster of ``workers`` CPUs (default: one
per core) for this executor: no dashboard, Ray's logs at ERROR, worker output not forwarded, usage
statistics off, and its session files (sockets, logs, spilled objects; Ray's default is ``/tmp/ray``)
in a folder of the run's scratch directory (:mod:`graphopt.core.scratch`), removed with it (under a
``TMPDIR`` too deep for Ray's socket paths, a private folder in ``/tmp`` instead). A random
token in the environment authenticates the local cluster, so Ray does not write one to
``~/.ray/auth_token``. :meth:`RayExecutor.close` (or the end of a ``with`` block) shuts it down; the
API's ``optimize`` closes the executor it made when the run ends, however it ends.

With ``address`` (``host:port`` of a cluster's head, or ``ray://host:port`` through Ray Client), the
executor joins that cluster and leaves it running on close; every node needs graphopt (and the same
versions of onnx, onnxruntime and numpy) installed, since tasks import ``fn`` by its module. A process
already connected to Ray (``ray.is_initialized()``) is used as it is and left connected.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from graphopt.core import scratch
from graphopt.core.errors import GraphoptError
from graphopt.measure.executor import (
    WORKER_ENV,
    ItemFailed,
    Progress,
    TaskError,
    WorkerDied,
    chunks,
    enter_worker,
    environment,
    run_chunk,
    short_repr,
)

T = TypeVar("T")
R = TypeVar("R")

#: What the refusal tells the user to run.
INSTALL = "pip install 'graphopt[ray]'"

#: Ray task retries after a worker died, by default (Ray's own default for tasks).
DEFAULT_RETRIES = 3

# A Unix socket path's limit on Linux, and what Ray adds to its temporary root to reach its longest socket:
# "/session_2026-12-06_16-01-16_879907_<pid, up to 7 digits>/sockets/plasma_store".
_SOCKET_PATH_MAX = 107
_SESSION_SOCKET = 64

__all__ = ["DEFAULT_RETRIES", "INSTALL", "RayExecutor", "require_ray"]


def require_ray() -> Any:
    """The ``ray`` module, or :class:`GraphoptError` with the install command (one line)."""
    try:
        import ray
    except ImportError as exc:
        raise GraphoptError(f"the Ray executor needs Ray, which is not installed ({exc.msg}); "
                            f"install it with {INSTALL}") from None
    return ray


class RayExecutor:
    """Run ``fn(context, item)`` for every item as Ray tasks; results in item order (module docstring).

    Parameters
    ----------
    workers : CPUs of the local cluster (``None``: one per core). With ``address`` it is only what
        :attr:`workers` reports before the cluster is joined; afterwards it is the cluster's CPUs.
    address : a running cluster to join instead of starting a local one.
    retries : Ray task retries after a worker died (``max_retries``).

    Raises
    ------
    GraphoptError : Ray is not installed (here, before anything starts), or the cluster cannot be
        started or joined (at the first :meth:`map`).
    """

    def __init__(self, workers: int | None = None, *, address: str | None = None,
                 retries: int = DEFAULT_RETRIES):
        require_ray()
        count = (os.cpu_count() or 1) if workers is None or workers == 0 else int(workers)
        if count < 1:
            raise ValueError(f"RayExecutor needs at least one worker, got {workers}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if address:
            _check_reachable(address)
        self._workers = count
        self.address = address
        self.retries = int(retries)
        self._owned = False            # this executor started the cluster (and shuts it down)
        self._connected = False
        self._cleanup = contextlib.ExitStack()
        self._lock = threading.Lock()
        self._last: tuple[weakref.ref, _Shared] | None = None   # the last context and its object reference

    def __repr__(self) -> str:
        where = f"address={self.address!r}" if self.address else f"workers={self._workers}"
        return f"RayExecutor({where})"

    @property
    def workers(self) -> int:
        """Tasks that run at once: the local cluster's CPUs, or those of a cluster joined."""
        if self._connected and not self._owned:
            ray = require_ray()
            return max(int(ray.cluster_resources().get("CPU", 1)), 1)
        return self._workers

    # -- the cluster ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start or join the cluster (the first :meth:`map` does it; idempotent)."""
        with self._lock:
            if self._connected:
                return
            ray = require_ray()
            if ray.is_initialized():       # the caller's own connection: used, left as it is
                self._connected = True
                return
            try:
                self._init(ray)
            except BaseException as exc:       # Ctrl-C included: no half-started cluster, no files left
                with contextlib.suppress(Exception):
                    ray.shutdown()
                self._owned = False
                self._cleanup.close()
                signal_exc = _signal_exception(exc)
                if signal_exc is not None and signal_exc is not exc:
                    raise signal_exc from None
                if signal_exc is not None or isinstance(exc, GraphoptError):
                    raise
                # Ray raises many kinds (no GCS, a refused address, a bad version); each is one line here
                where = f"join the Ray cluster at {self.address}" if self.address else "start a local Ray cluster"
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise GraphoptError(f"cannot {where}: {type(exc).__name__}: {first}") from None
            self._connected = True

    def _init(self, ray: Any) -> None:
        common = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        # ray.init replaces the SIGTERM handler with one that exits with code 15; the command line's own
        # (which unwinds the run and exits 143) is put back.
        on_term = _sigterm_handler()
        try:
            if self.address:
                # A cluster's workers get the thread limits through the job's runtime environment.
                ray.init(address=self.address, runtime_env={"env_vars": dict(WORKER_ENV)}, **common)
                return
            folder = self._session_root()
            env = {**WORKER_ENV,
                   # a token in memory instead of ~/.ray/auth_token, and no usage report
                   "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or _local_token(),
                   "RAY_USAGE_STATS_ENABLED": "0",
                   # as a spawned process-pool worker gets its parent's sys.path: a module-level fn the
                   # driver imports from its own path (a script's folder, a test suite) imports there too
                   "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))}
            # The local cluster's processes start inside ray.init and keep what they inherit (workers
            # started from a runtime environment instead took 1.5 s more before the first task).
            with environment(env):
                # "local": always a new cluster, never one found through RAY_ADDRESS or /tmp/ray.
                ray.init(address="local", num_cpus=self._workers, _temp_dir=str(folder), **common)
            self._owned = True
        finally:
            _restore_sigterm(on_term)

    def _session_root(self) -> str:
        """Ray's temporary folder: in the run's scratch directory, or where a Unix socket path fits.

        Ray puts its sockets in ``<root>/session_<date>_<time>_<µs>_<pid>/sockets/plasma_store``, and a
        socket path has at most 107 bytes: under a deep ``TMPDIR`` (macOS's ``/var/folders/…/T/``, a test's
        temporary folder) that does not fit, so the root is then a private folder in ``/tmp``, removed the
        same way."""
        folder = str(self._cleanup.enter_context(scratch.directory("ray")))
        if len(folder) + _SESSION_SOCKET <= _SOCKET_PATH_MAX:
            return folder
        short = tempfile.mkdtemp(prefix="graphopt-ray-", dir="/tmp")
        self._cleanup.callback(shutil.rmtree, short, True)
        return short

    def close(self) -> None:
        """Shut a local cluster down and remove its files; leave a joined cluster running (idempotent)."""
        with self._lock:
            try:
                if self._connected and (self._owned or self.address):
                    require_ray().shutdown()
            finally:
                self._connected = self._owned = False
                self._last = None
                self._cleanup.close()           # the session's files, even when the shutdown failed

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- map -----------------------------------------------------------------------------------

    def map(self, fn: Callable[[Any, T], R], items: Sequence[T], *, context: Any = None,
            progress: Progress | None = None) -> list[R]:
        """``[fn(context, item) for item in items]``, run as Ray tasks.

        Raises
        ------
        TaskError : ``fn`` raised on an item (the first failing item in item order).
        WorkerDied : a task's worker died more than ``retries`` times.
        GraphoptError : the cluster cannot be started or joined.
        """
        items = list(items)
        if not items:
            return []
        self.start()
        ray = require_ray()
        task = _remote_task(ray).options(num_cpus=1, max_retries=self.retries, retry_exceptions=False)
        shared = self._put(ray, context)
        runs = chunks(len(items), self.workers)
        refs = [task.remote(fn, shared, items[start:stop]) for start, stop in runs]
        try:
            results = self._gather(ray, fn, items, runs, refs, progress)
        except BaseException as exc:
            # Ctrl-C (and the command line's SIGTERM) also stops the evaluations running now and a local
            # cluster; after an error the running ones end at their next Python line.
            signal_exc = _signal_exception(exc)
            self._cancel(ray, refs, force=signal_exc is not None)
            self._drain(ray, refs)
            if signal_exc is not None and self._owned:
                self.close()
            if signal_exc is not None and signal_exc is not exc:
                raise signal_exc from None
            raise
        return results

    def _put(self, ray: Any, context: Any) -> _Shared:
        """The context in the object store: put once per ``map``, and once for consecutive maps of the same
        object (a guard's rounds, the chunks of sharded statistics), whose workers then also keep their
        unpickled copy. Such a context must not change between the maps (none of graphopt's does: their
        per-process caches are not pickled). The executor holds the context weakly: once the caller lets
        it go, its object in the store goes too (a context that cannot be weakly held is put per map)."""
        last = self._last
        if last is not None and last[0]() is context:
            return last[1]
        self._last = None                       # the previous context's object can go
        shared = _Shared(ray.put(context))
        with contextlib.suppress(TypeError):    # tuples and the like: no weak reference, no reuse
            self._last = (weakref.ref(context, self._forget), shared)
        return shared

    def _forget(self, _gone: Any) -> None:
        self._last = None

    def _gather(self, ray: Any, fn: Callable, items: list, runs: list[tuple[int, int]], refs: list,
                progress: Progress | None) -> list:
        # One ray.get per run, in item order: the first error met is the first failing item's, and
        # progress counts items as the caller's order finishes them (as the process pool does).
        from ray import exceptions as rex
        results: list = []
        for (start, stop), ref in zip(runs, refs):
            try:
                results.extend(ray.get(ref))
            except rex.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, ItemFailed):
                    raise cause.task_error(fn, items, start) from cause.original
                cause = cause if isinstance(cause, BaseException) else exc
                raise TaskError(fn, start, items[start], cause) from cause
            except rex.RayError as exc:
                first = (str(exc).strip().splitlines() or [""])[0]
                raise WorkerDied(
                    f"a Ray worker died while evaluating {getattr(fn, '__qualname__', fn)} on item {start} "
                    f"({short_repr(items[start])}) and {self.retries} retries did not bring it back: "
                    f"{type(exc).__name__}: {first}") from exc
            if progress is not None:
                progress(stop, len(items))
        return results

    @staticmethod
    def _cancel(ray: Any, refs: list, *, force: bool) -> None:
        # Only the tasks not finished yet: cancelling a finished one makes Ray 2.60's core worker abort
        # the process at shutdown ("Tried to complete task that was not pending").
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in pending:
            with contextlib.suppress(Exception):   # finished meanwhile, or already gone
                ray.cancel(ref, force=force)

    @staticmethod
    def _drain(ray: Any, refs: list) -> None:
        """Wait for the cancelled tasks to end, taking their errors: no task of a failed ``map`` runs on
        after it, and Ray does not log the errors nobody asked for as "unhandled"."""
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.get(ref)


# ===============================================================================================
# the worker side


class _Shared:
    """The context's object reference, wrapped so that Ray passes the reference instead of resolving it
    for every task: the worker fetches and unpickles the context once (:func:`_context`)."""

    def __init__(self, ref: Any):
        self.ref = ref


_TASK: Any = None
_CACHED: tuple[str | None, Any] = (None, None)   # (object id, context) in a worker process


def _remote_task(ray: Any) -> Any:
    global _TASK
    if _TASK is None:
        _TASK = ray.remote(_run)
    return _TASK


def _run(fn: Callable, shared: _Shared, items: list) -> list:
    """The task: ``fn(context, item)`` for a run of items, with the context of this ``map`` loaded once
    per worker; a failure as :class:`~graphopt.measure.executor.ItemFailed` (picklable, Ray sends it back)."""
    enter_worker(WORKER_ENV)
    return run_chunk(fn, _context(shared), items)


def _context(shared: _Shared) -> Any:
    global _CACHED
    key = shared.ref.hex()
    if _CACHED[0] != key:
        import ray
        _CACHED = (None, None)               # the last map's context goes before this one's arrives
        _CACHED = (key, ray.get(shared.ref))
    return _CACHED[1]


def _check_reachable(address: str) -> None:
    """Refuse an address nothing listens at, in one line and at once: Ray's driver would retry joining it
    without end (logging a warning every few seconds)."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return                                  # "auto" and the like: Ray resolves them
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise GraphoptError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


_TOKEN: str | None = None


def _local_token() -> str:
    """One token per process for the local clusters it starts: Ray's driver keeps the first token it
    read, so a second cluster (after a shutdown) must get the same one or its driver cannot connect."""
    global _TOKEN
    if _TOKEN is None:
        _TOKEN = uuid.uuid4().hex
    return _TOKEN


# ===============================================================================================
# signals


def _signal_exception(exc: BaseException) -> BaseException | None:
    """The exception a signal handler raised (``KeyboardInterrupt``, the command line's ``Terminated``),
    or ``None`` for an error. A handler that raises while Ray's C code runs makes that code fail with a
    ``SystemError`` whose context is the handler's exception (seen with SIGTERM in ``ray.get``)."""
    if not isinstance(exc, Exception):
        return exc
    inner = exc.__context__
    if isinstance(exc, SystemError) and isinstance(inner, BaseException) and not isinstance(inner, Exception):
        return inner
    return None


def _sigterm_handler() -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.getsignal(signal.SIGTERM)


def _restore_sigterm(handler: Any) -> None:
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
