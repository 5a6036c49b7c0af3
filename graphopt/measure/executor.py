"""Run many independent evaluations: in this process, in a local pool of processes, or on a Ray cluster.

Data-driven passes (sensitivity analysis for pruning, rank selection for low-rank, the guards'
candidates, calibration statistics gathered in shards) evaluate the same model many times with one
thing changed. Those evaluations are independent, so they go through a small interface that a local
process pool or a Ray cluster (:mod:`graphopt.measure.ray_executor`, the optional extra) can serve
without the passes knowing:

.. code-block:: python

    class Executor(Protocol):
        workers: int
        def map(self, fn, items, *, context=None, progress=None) -> list: ...

``map`` calls ``fn(context, item)`` for every item and returns the results **in item order**.

* :class:`InProcess` runs the calls one after the other in this process (``workers == 1``).
* :class:`ProcessPool` runs them in ``workers`` local processes started with the *spawn* method (a
  forked child would inherit onnxruntime's and OpenBLAS's thread pools in an undefined state).
  ``context`` (typically a serialized model plus sample data, see :class:`EvalContext`) is pickled
  **once** in the parent and unpickled **once per worker** by the pool initializer; the items travel in
  runs of consecutive items (:func:`chunks`), so a worker meets them in the caller's order. Workers run
  with ``OMP_NUM_THREADS=1`` (and the OpenBLAS/MKL equivalents), and every session made in a worker
  through :func:`graphopt.measure.ort.session` gets one intra-op thread (onnxruntime ignores
  ``OMP_NUM_THREADS``), so ``workers`` processes use ``workers`` cores and do not oversubscribe them.
* :class:`~graphopt.measure.ray_executor.RayExecutor` runs them as Ray tasks, the context put in the
  object store once (its module docstring).

:func:`make_executor` picks one from the run's settings (``--executor``, ``--workers``,
``--ray-address``); a pass takes the run's from :func:`executor_for`.

What callers can rely on (every executor):

* results come back in the order of ``items``;
* an evaluation computes the same bits on every executor: inside ``fn`` BLAS keeps one thread
  (:func:`single_core`), in-process too, so the output of a run does not depend on the executor;
* an exception raised by ``fn`` is re-raised in the parent as :class:`TaskError`, which names the item
  (index and a short repr), keeps the original exception as ``original`` and ``__cause__`` (for a
  process pool the cause carries the worker's traceback as text); when several items fail, the one
  reported is the first in item order, so the error is deterministic;
* a worker process that dies (killed, out of memory, ``os._exit``) raises :class:`WorkerDied` instead
  of hanging (Ray retries the task first);
* ``fn``, ``context`` and the items must pickle for a process pool: ``fn`` must be a module-level
  function. Both are checked before any process starts, so the error is immediate and says which.

The pool is created per :meth:`ProcessPool.map` call, because the context is bound to the workers by
the initializer. Starting a worker costs about a second (importing numpy, onnx and onnxruntime), so a
pool pays off for more than a handful of evaluations that each take more than a few milliseconds.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import reprlib
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.core.ir import Model
from graphopt.core.onnx_io import inline_weights

T = TypeVar("T")
R = TypeVar("R")

Progress = Callable[[int, int], None]  # (items done, items in total)

# Thread-count variables set in every worker so numpy's BLAS and OpenMP runtimes start with one thread.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

#: The kinds of executor :func:`make_executor` makes (``--executor``).
KINDS = ("process", "ray")

__all__ = ["KINDS", "WORKER_ENV", "ContextError", "EvalContext", "Executor", "ExecutorError", "InProcess", "ItemFailed",
           "ProcessPool", "RemoteTraceback", "ShippedModel", "TaskError", "WorkerDied", "check_choice", "chunks", "enter_worker",
           "environment", "executor_for", "in_worker", "make_executor", "opened", "portable_exception",
           "relative_error", "run_chunk", "short_repr", "single_core", "worker_threads"]


# ===============================================================================================
# errors


class ExecutorError(Exception):
    """An evaluation could not be run or did not come back (base class)."""


class TaskError(ExecutorError):
    """``fn(context, item)`` raised.

    Attributes
    ----------
    index : position of the item in ``items``.
    item : the item itself.
    original : the exception ``fn`` raised (also ``__cause__``).
    """

    def __init__(self, fn: Callable, index: int, item: Any, original: BaseException):
        self.index = index
        self.item = item
        self.original = original
        name = getattr(fn, "__qualname__", repr(fn))
        first = (str(original).strip().splitlines() or [""])[0]
        super().__init__(f"{name} failed on item {index} ({short_repr(item)}): {type(original).__name__}: {first}")

    def __reduce__(self):  # keep it picklable although __init__ takes other arguments than args
        return (_rebuild_task_error, (self.args, self.index, self.item, self.original))


def _rebuild_task_error(args, index, item, original) -> TaskError:
    exc = TaskError.__new__(TaskError)
    Exception.__init__(exc, *args)
    exc.index, exc.item, exc.original = index, item, original
    return exc


class ContextError(ExecutorError):
    """The context could not be loaded in a worker process (it pickled here but does not unpickle there,
    e.g. its class is defined in a module the worker cannot import)."""


class WorkerDied(ExecutorError):
    """A worker process ended abruptly (killed, out of memory, ``os._exit``) or its initializer failed."""


def short_repr(item: Any) -> str:
    """``item``'s repr, cut short for a one-line message."""
    return _REPR.repr(item)


_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 6


# ===============================================================================================
# the interface


@runtime_checkable
class Executor(Protocol):
    """Runs ``fn(context, item)`` for every item; results in item order (see the module docstring)."""

    workers: int

    def map(self, fn: Callable[[Any, T], R], items: Sequence[T], *, context: Any = None,
            progress: Progress | None = None) -> list[R]: ...


class InProcess:
    """Run every call in this process, in item order. ``workers`` is 1.

    The context is used as is (not copied), so a cache the context keeps (an :class:`EvalContext`'s
    session) lives across the calls of one ``map`` and across ``map`` calls.
    """

    workers = 1

    def map(self, fn: Callable[[Any, T], R], items: Sequence[T], *, context: Any = None,
            progress: Progress | None = None) -> list[R]:
        items = list(items)
        results: list[R] = []
        for index, item in enumerate(items):
            try:
                with _evaluation():
                    results.append(fn(context, item))
            except Exception as exc:
                raise TaskError(fn, index, item, exc) from exc
            if progress is not None:
                progress(index + 1, len(items))
        return results

    def __repr__(self) -> str:
        return "InProcess()"


class ProcessPool:
    """Run the calls in local worker processes (spawn), ``context`` shipped once per worker.

    Parameters
    ----------
    workers : number of processes; ``None`` uses ``os.cpu_count()``. A ``map`` over fewer items
        starts only as many processes as there are items.

    Raises (from :meth:`map`)
    -------------------------
    TaskError : ``fn`` raised on an item (the first failing item in item order is reported).
    ContextError : the context does not unpickle in a worker.
    WorkerDied : a worker process ended abruptly.
    TypeError : ``fn``, ``context`` or an item does not pickle (``fn`` must be a module-level function).
    """

    def __init__(self, workers: int | None = None):
        count = (os.cpu_count() or 1) if workers is None else int(workers)
        if count < 1:
            raise ValueError(f"ProcessPool needs at least one worker, got {workers}")
        self.workers = count

    def __repr__(self) -> str:
        return f"ProcessPool(workers={self.workers})"

    def map(self, fn: Callable[[Any, T], R], items: Sequence[T], *, context: Any = None,
            progress: Progress | None = None) -> list[R]:
        items = list(items)
        if not items:
            return []
        _dumps(fn, "fn (it must be a module-level function, not a lambda or a closure)")
        payload = _dumps(context, "context")
        # pickled here, once, so an item that cannot travel fails now and with its name
        blobs = [_dumps(item, f"item {index} ({short_repr(item)})") for index, item in enumerate(items)]
        runs = chunks(len(items), self.workers)
        workers = min(self.workers, len(runs))
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(payload, WORKER_ENV))
        try:
            # Spawned children copy the parent's environment when they start, which happens inside
            # submit(); numpy loads OpenBLAS (and sizes its thread pool) before the initializer runs.
            with environment(WORKER_ENV):
                futures = [pool.submit(_call, fn, blobs[start:stop]) for start, stop in runs]
            results = _gather(fn, items, runs, futures, progress)
        except BaseException:
            # Do not wait for items in flight or workers still starting: the caller has its answer.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return results


def make_executor(workers: int | None, kind: str = "process", *, address: str | None = None) -> Executor:
    """The executor for ``workers`` at once, of ``kind``.

    ``process``: ``None`` or ``1`` -> :class:`InProcess`; ``0`` -> one process per core
    (:class:`InProcess` on a one-core machine); ``n > 1`` -> :class:`ProcessPool` of ``n``.
    ``ray``: a :class:`~graphopt.measure.ray_executor.RayExecutor` on a local cluster of ``workers``
    CPUs (``None`` or ``0``: one per core), or on the cluster at ``address``. Close it when done
    (:meth:`~graphopt.measure.ray_executor.RayExecutor.close`).

    Raises
    ------
    ValueError : a negative count, an unknown kind, an address for the process kind.
    graphopt.core.errors.GraphoptError : ``ray`` without Ray installed (the message says how to install it).
    """
    check_choice(kind, workers, address)
    if kind == "ray":
        from graphopt.measure.ray_executor import RayExecutor
        return RayExecutor(workers, address=address)
    if workers is None or workers == 1:
        return InProcess()
    if workers == 0:
        workers = os.cpu_count() or 1
        if workers == 1:
            return InProcess()
    return ProcessPool(workers)


def check_choice(kind: str | None, workers: int | None, address: str | None) -> None:
    """Refuse what :func:`make_executor` cannot make (``ValueError``): an unknown kind, a negative worker
    count, an address with the process kind. ``kind=None`` means the default (ray with an address)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"the executor must be one of {', '.join(KINDS)}, got {kind!r}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0 (0: one per core), got {workers}")
    if address is not None and kind == "process":
        raise ValueError("a Ray address needs the ray executor")


@contextmanager
def opened(executor: str | Executor | None = None, workers: int | None = None, *,
           address: str | None = None) -> Iterator[Executor]:
    """The executor of one run, for the block: an :class:`Executor` given is used as it is (its owner
    closes it); a kind (``process``, ``ray``; ``None``: ``ray`` with an ``address``, else ``process``)
    is made by :func:`make_executor` and closed when the block exits, however it exits (a local Ray
    cluster is shut down)."""
    if executor is not None and not isinstance(executor, str):
        yield executor
        return
    kind = executor or ("ray" if address else "process")
    made = make_executor(workers, kind, address=address)
    try:
        yield made
    finally:
        close = getattr(made, "close", None)
        if close is not None:
            close()


def executor_for(ctx: Any) -> Executor:
    """The run's executor: ``ctx.executor`` of a :class:`~graphopt.core.manager.PassContext` (set by the
    API from ``--executor`` / ``--workers``), :class:`InProcess` when the run set none."""
    executor = getattr(ctx, "executor", None)
    return executor if executor is not None else InProcess()


def _gather(fn: Callable, items: list, runs: list[tuple[int, int]], futures: list[concurrent.futures.Future],
            progress: Progress | None) -> list:
    results: list = []
    for (start, stop), future in zip(runs, futures):
        try:
            results.extend(future.result())
        except BrokenProcessPool as exc:
            pending = sum(b - a for (a, b), f in zip(runs, futures) if not (f.done() and f.exception() is None))
            raise WorkerDied(
                f"a worker process died while evaluating {getattr(fn, '__qualname__', fn)} "
                f"(killed, out of memory, os._exit); "
                f"{pending} of {len(items)} items did not finish, the first is item {start} "
                f"({short_repr(items[start])}): {exc}") from exc
        except ContextError:
            raise  # not the item's fault: every item would fail the same way
        except ItemFailed as exc:
            raise exc.task_error(fn, items, start) from exc.original
        except Exception as exc:
            raise TaskError(fn, start, items[start], exc) from exc
        if progress is not None:
            progress(stop, len(items))
    return results


def chunks(n: int, workers: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: the items in runs of consecutive items, one run per task, about four per
    worker. A worker then meets items in the caller's order: a sensitivity table's items come unit by unit,
    and a worker keeps a unit's session for the unit's next level (items handed out one by one alternated
    units between two workers, and two workers were slower than one). Four per worker keeps the last
    run's wait short."""
    size = max(1, -(-n // (4 * max(int(workers), 1))))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


class ItemFailed(Exception):
    """``fn`` raised on the item at ``position`` of a run, in a worker: carries the exception (made
    picklable) and the worker's traceback as text to the parent."""

    def __init__(self, position: int, original: BaseException, text: str = ""):
        super().__init__(position, original, text)
        self.position, self.original, self.text = position, original, text

    def task_error(self, fn: Callable, items: list, start: int) -> TaskError:
        """The :class:`TaskError` of the item, for a run that began at ``start``."""
        if self.text and self.original.__cause__ is None:
            self.original.__cause__ = RemoteTraceback(self.text)
        index = start + self.position
        return TaskError(fn, index, items[index], self.original)


class RemoteTraceback(Exception):
    """A worker's traceback, as text (the cause of the exception it raised)."""

    def __str__(self) -> str:
        return f"\n{self.args[0]}" if self.args else ""


def run_chunk(fn: Callable, context: Any, items: Sequence[Any]) -> list:
    """``fn(context, item)`` for a run of items, in a worker; the first failure as :class:`ItemFailed`."""
    out = []
    for position, item in enumerate(items):
        try:
            out.append(fn(context, item))
        except Exception as exc:  # noqa: BLE001 - carried to the parent, made picklable
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            raise ItemFailed(position, portable_exception(exc), text) from None
    return out


def _dumps(obj: Any, what: str) -> bytes:
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - pickling raises whatever the object's reducers raise
        raise TypeError(f"{what} cannot be sent to a worker process: {type(exc).__name__}: {exc}") from None


_ENV_LOCK = threading.Lock()


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block (for children started inside it)."""
    with _ENV_LOCK:
        saved = {name: os.environ.get(name) for name in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for name, old in saved.items():
                if old is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old


# ===============================================================================================
# the worker side

_CONTEXT: Any = None
_CONTEXT_ERROR: str | None = None
_IN_WORKER = False


def enter_worker(env: Mapping[str, str]) -> None:
    """Mark this process as an executor's worker (:func:`in_worker`) and set ``env`` for anything it starts.

    Called by the process pool's initializer and by every Ray task (cheap when already done)."""
    global _IN_WORKER
    if not _IN_WORKER:
        os.environ.update(env)
        _IN_WORKER = True


def _init_worker(payload: bytes, env: Mapping[str, str]) -> None:
    """Pool initializer: runs once per worker process, before any item.

    A context that fails to unpickle is remembered and reported by every item as a
    :class:`ContextError`: an exception escaping an initializer only breaks the pool, and the parent
    would learn nothing but "a process in the initializer failed".
    """
    global _CONTEXT, _CONTEXT_ERROR
    enter_worker(env)
    try:
        _CONTEXT = pickle.loads(payload)
    except Exception as exc:  # noqa: BLE001 - reported to the parent by every item
        _CONTEXT_ERROR = f"{type(exc).__name__}: {exc}"


def _call(fn: Callable, blobs: list[bytes]) -> list:
    if _CONTEXT_ERROR is not None:
        raise ContextError(f"the context failed to load in a worker process: {_CONTEXT_ERROR}")
    return run_chunk(fn, _CONTEXT, [pickle.loads(blob) for blob in blobs])


def portable_exception(exc: BaseException) -> BaseException:
    """``exc`` when it survives a pickle round trip, else a RuntimeError that carries its text.

    An exception whose class cannot be rebuilt from its args would otherwise fail to unpickle in the
    parent's result thread, which breaks the whole pool with a misleading message.
    """
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any failure means it cannot travel
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return RuntimeError(f"{type(exc).__qualname__}: {exc} (unpicklable exception; worker traceback:\n{text})")


class _Evaluating(threading.local):
    depth = 0


_EVALUATING = _Evaluating()


@contextmanager
def _evaluation() -> Iterator[None]:
    _EVALUATING.depth += 1
    try:
        yield
    finally:
        _EVALUATING.depth -= 1


def single_core() -> bool:
    """True where an evaluation runs: in an executor's worker, or inside :class:`InProcess`'s call of ``fn``.

    Large BLAS operations take every core only elsewhere (:func:`graphopt.measure.blas.for_work`): the
    bits of a threaded LAPACK solve depend on its thread count (a ResNet-18 sensitivity table differed
    in-process and in a pool at 6 of 60 entries, by 5e-6 relative), so an evaluation computes the same
    bits wherever it runs, and the written model does not depend on the executor."""
    return _IN_WORKER or _EVALUATING.depth > 0


def in_worker() -> bool:
    """True inside an executor's worker process (a :class:`ProcessPool`'s, a Ray worker running a task)."""
    return _IN_WORKER


def worker_threads() -> int | None:
    """onnxruntime intra-op threads for a session made here: 1 in a pool worker, else ``None``
    (onnxruntime's default, all cores)."""
    return 1 if _IN_WORKER else None


# ===============================================================================================
# an evaluation context most callers want


@dataclass(eq=False)
class EvalContext:
    """A picklable evaluation context: one serialized model, sample data, and per-process caches.

    Ship it as ``context`` to :meth:`Executor.map`; a worker unpickles it once and then reuses, for
    every item, the parsed model, the onnxruntime session and the reference outputs it caches. The
    caches are not pickled (``__getstate__`` drops them), so each process builds its own, once.

    Parameters
    ----------
    model : the serialized ``ModelProto`` (``proto.SerializeToString()``), the ``ModelProto`` itself,
        kept parsed (not copied: do not change it afterwards) and serialized only when pickled, or an IR
        model, whose large weights are then held by reference (:func:`graphopt.measure.ort.structure`:
        its arrays, not a copy; :attr:`weights`) and written into the bytes only when pickled.
    data : the sample inputs (``graphopt.measure.calibration.SampleData``).
    batch_size : samples per onnxruntime run (a model with a static batch dim is fed at that size).
    overridable : initializer names made overridable: they become graph inputs (with their value as the
        default), so :meth:`run` can feed a modified weight without building a new session. With
        onnxruntime's graph optimizations off (graphopt's default) nothing is folded into them.
    outputs : the output names compared by :meth:`error`; ``None`` = every graph output.
    threads : onnxruntime intra-op threads of sessions made in this process (``None``: onnxruntime's
        default, all cores). Inside a pool worker sessions always use 1 thread.

    Notes
    -----
    ``cache`` is a per-process dict for the caller's own memos (e.g. a
    parsed IR), keyed as the caller likes.
    """

    model: bytes | None
    data: Any
    batch_size: int = 256
    overridable: tuple[str, ...] = ()
    outputs: tuple[str, ...] | None = None
    threads: int | None = None
    cache: dict = field(default_factory=dict, repr=False)
    weights: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._memo: dict[str, Any] = {}
        if isinstance(self.model, Model):
            from graphopt.measure import ort as gort
            self.model, self.weights = gort.structure(self.model)
        if isinstance(self.model, onnx.ModelProto):
            # Kept parsed; serialized only when pickled for a pool: a large model held as both bytes and a
            # parsed proto doubled its share of an in-process run's memory.
            self._memo["proto"] = self.model
            self.model = None
        self.overridable = tuple(self.overridable)
        if self.outputs is not None:
            self.outputs = tuple(self.outputs)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["model"] = self.model_bytes()
        state["weights"] = {}
        state["_memo"] = {}
        state["cache"] = {}
        return state

    # -- the model ----------------------------------------------------------------------------

    def model_bytes(self) -> bytes:
        """The serialized model (its by-reference weights written in)."""
        if self.model is not None:
            return self.model
        if not self.weights:
            return self._memo["proto"].SerializeToString()
        return inline_weights(self._memo["proto"], self.weights).SerializeToString()

    def proto(self) -> onnx.ModelProto:
        """The model, parsed once per process. Shared: do not mutate it (see :meth:`fresh_proto`)."""
        if "proto" not in self._memo:
            self._memo["proto"] = self.fresh_proto()
        return self._memo["proto"]

    def fresh_model(self) -> Model:
        """A new IR of the model, the caller's to change (by-reference weights shared, read-only)."""
        from graphopt.core.onnx_io import from_proto
        return from_proto(self.fresh_proto(), weights=self.weights)

    def initializer(self, name: str) -> np.ndarray:
        """A main-graph initializer of the model as an array."""
        if name in self.weights:
            return self.weights[name]
        return numpy_helper.to_array(next(t for t in self.proto().graph.initializer if t.name == name))

    def fresh_proto(self) -> onnx.ModelProto:
        """A new copy of the model, the caller's to mutate (by-reference stubs stay stubs: sessions of it
        need :attr:`weights`)."""
        proto = onnx.ModelProto()
        if self.model is None:
            proto.CopyFrom(self._memo["proto"])
        else:
            proto.ParseFromString(self.model)
        return proto

    def output_names(self) -> list[str]:
        return list(self.outputs) if self.outputs is not None else [o.name for o in self.proto().graph.output]

    def session(self):
        """The onnxruntime session of the model (with :attr:`overridable` initializers as inputs),
        built once per process."""
        if "session" not in self._memo:
            from graphopt.measure import ort as gort
            self._memo["session"] = gort.session(self._overridable_proto(), threads=self._threads(),
                                                 weights=self.weights)
        return self._memo["session"]

    def _threads(self) -> int | None:
        return 1 if in_worker() else self.threads

    def _overridable_proto(self) -> onnx.ModelProto:
        if not self.overridable:
            return self.proto()
        proto = self.fresh_proto()
        inits = {t.name: t for t in proto.graph.initializer}
        present = {vi.name for vi in proto.graph.input}
        for name in self.overridable:
            if name not in inits:
                raise ValueError(f"overridable {name!r} is not an initializer of the main graph")
            if name not in present:
                t = inits[name]
                proto.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        proto.ir_version = max(proto.ir_version, 4)
        return proto

    # -- running ------------------------------------------------------------------------------

    def run(self, overrides: Mapping[str, np.ndarray] | None = None, *, model: Any = None) -> dict[str, np.ndarray]:
        """Outputs (:meth:`output_names`) over all samples, concatenated along the first axis.

        Parameters
        ----------
        overrides : new values for :attr:`overridable` initializers (fed to the cached session).
        model : run this model instead (a ModelProto, an IR Model or bytes); a session is built for it
            and not cached. ``overrides`` then apply to that model's overridable initializers.

        Raises
        ------
        ValueError : an override of an initializer not listed in :attr:`overridable`.
        """
        from graphopt.measure import ort as gort
        from graphopt.measure.calibration import feed_batch_size, sample_rows
        if overrides and model is None:
            unknown = sorted(set(overrides) - set(self.overridable))
            if unknown:
                raise ValueError(f"not overridable (list them in EvalContext.overridable): {unknown}")
        if model is None:
            sess = self.session()
            batch = self._memo.setdefault("batch", feed_batch_size(self.proto(), self.batch_size, self.data))
        else:
            proto = gort.as_proto(model)
            sess = gort.session(proto, threads=self._threads())
            batch = feed_batch_size(proto, self.batch_size, self.data)
        names = self.output_names()
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        extra = dict(overrides or {})
        for feed in self.data.batches(batch):
            out = gort.run(sess, {**feed, **extra}, names)
            for name in names:
                parts[name].append(sample_rows(out[name], self.data))
        return {name: np.concatenate(chunks, axis=0) for name, chunks in parts.items()}

    def set_reference(self, outputs: Mapping[str, np.ndarray]) -> None:
        """Take the unmodified model's outputs from a run the caller already made (same samples, same
        order, as :meth:`run` concatenates them) instead of computing them again."""
        self._memo["reference"] = dict(outputs)

    def reference(self) -> dict[str, np.ndarray]:
        """The unmodified model's outputs, computed once per process."""
        if "reference" not in self._memo:
            self._memo["reference"] = self.run()
            if not self.overridable:   # only run() without a model needs it again: rebuilt then, not held
                self._memo.pop("session", None)
        return self._memo["reference"]

    def error(self, outputs: Mapping[str, np.ndarray]) -> float:
        """:func:`relative_error` of ``outputs`` against :meth:`reference`."""
        return relative_error(self.reference(), outputs)

    def accuracy(self, outputs: Mapping[str, np.ndarray]) -> float | None:
        """Top-1 accuracy in percent of the first compared output against the data's labels
        (``None`` without labels)."""
        labels = getattr(self.data, "labels", None)
        if labels is None:
            return None
        logits = outputs[self.output_names()[0]]
        return float(np.mean(logits.reshape(len(labels), -1).argmax(axis=1) == labels) * 100.0)


@dataclass(eq=False)
class ShippedModel:
    """An IR model in an executor's context: used as it is in this process; pickled for a worker, it
    travels as its serialized proto (not the IR's graph objects) and is parsed once per worker process.
    Never mutated (a worker that changes the model works on ``ir().clone()``)."""

    model: Any                             # graphopt.core.ir.Model here; bytes after a pickle round trip

    def __getstate__(self) -> dict:
        if isinstance(self.model, bytes):
            return {"model": self.model}
        from graphopt.core.onnx_io import to_proto
        return {"model": to_proto(self.model).SerializeToString()}

    def ir(self) -> Any:
        """The model (parsed on first use after travelling)."""
        if isinstance(self.model, bytes):
            from graphopt.core.onnx_io import from_proto
            self.model = from_proto(onnx.load_from_string(self.model))
        return self.model


def relative_error(reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> float:
    """Relative squared error ``sum_o ||y_o - r_o||^2 / sum_o ||r_o||^2`` over the outputs of ``reference``.

    0 for identical outputs, 1 for an all-zero candidate; scale-free, so errors of different models
    and outputs are comparable. Computed in float64. A reference of all zeros gives the absolute
    squared error instead (no division by zero).
    """
    num = den = 0.0
    for name, ref in reference.items():
        r = np.asarray(ref, dtype=np.float64)
        y = np.asarray(outputs[name], dtype=np.float64)
        if r.shape != y.shape:
            raise ValueError(f"output {name!r}: shape {list(y.shape)} differs from the reference's {list(r.shape)}")
        num += float(np.sum((y - r) ** 2))
        den += float(np.sum(r * r))
    return num / den if den > 0 else num
