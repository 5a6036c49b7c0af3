"""Test session setup.

BLAS runs single-threaded: the tests run onnxruntime sessions and numpy solves side by side on a
2-core machine, and a multi-threaded BLAS fighting for the cores made small SVDs 50x slower.
This must happen before numpy is imported.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
