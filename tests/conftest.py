"""Test session setup.

The target CPU is pinned to ``avx2`` (the shipped, calibrated profile) and the user cache moved to a
temporary folder, so that no result depends on the machine the tests run on or on a profile its user
calibrated; the tests of detection and calibration ask for ``auto`` and set their own cache.

BLAS runs single-threaded: the tests run onnxruntime sessions and numpy solves side by side on a
2-core machine, and a multi-threaded BLAS fighting for the cores made small SVDs 50x slower.
This must happen before numpy is imported.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _machine_independent(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("GRAPHOPT_TARGET_CPU", "avx2")
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()
