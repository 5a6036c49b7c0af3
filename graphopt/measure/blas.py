"""How many threads numpy's BLAS may use: one for the many small products of the least-squares work, all
cores for the few large ones.

The fits of prune and the other lossy passes are mostly mid-sized products and solves; on a busy machine
OpenBLAS's thread pool spins against other processes, which made a whole prune about twice as slow, so
the passes run with one BLAS thread (:func:`blas_threads`). The largest operations — a ``F × F`` solve
or ``XᵀX`` product with ``F`` in the thousands (ResNet-50's 3x3 convs have ``F = 4608``) — are long
enough for threads to pay, and nothing else runs in the process meanwhile: :func:`for_work` lets them
use every core (on 2 cores the ridge solves of a ResNet-50 re-fit went from 108 s to 78 s), except inside
an executor's evaluations (a sensitivity level, a guard's trial, a shard of statistics), which keep one
thread wherever they run so that their bits do not depend on the executor.
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from graphopt.measure.executor import single_core

#: Floating-point operations from which one BLAS call gets every core.
LARGE = 2e9


def _openblas() -> tuple[object, object] | None:
    """``(get, set)`` thread-count functions of numpy's bundled OpenBLAS, or ``None``."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "*openblas*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", ""), ("scipy_openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                return get, put
    return None


_FNS = _openblas()


@contextmanager
def blas_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` BLAS threads (threadpoolctl when installed, else numpy's OpenBLAS directly;
    unknown BLAS builds: no-op)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        if _FNS is None:
            yield
            return
        get, put = _FNS
        old = int(get())
        put(int(n))
        try:
            yield
        finally:
            put(old)
        return
    with threadpool_limits(n, user_api="blas"):
        yield


def for_work(flops: float):
    """:func:`blas_threads` with every core for an operation of at least :data:`LARGE` flops, else a context
    that changes nothing. Not inside an evaluation (:func:`graphopt.measure.executor.single_core`): a
    worker has one core of its own, and an evaluation must compute the same bits in-process and there."""
    if flops >= LARGE and not single_core():
        return blas_threads(os.cpu_count() or 1)
    return _unchanged()


@contextmanager
def _unchanged() -> Iterator[None]:
    yield
