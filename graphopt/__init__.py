"""graphopt: a graph-level optimizer for ONNX models, verified with onnxruntime.

``graphopt.optimize``, ``graphopt.verify``, ``graphopt.inspect`` and ``graphopt.calibrate`` mirror the
command line (see :mod:`graphopt.app.api`).

The code is layered; each sub-package imports only from those before it (``tests/test_layers.py``
enforces it): :mod:`graphopt.core` (IR, I/O, shapes, the pass contract, the rule engine),
:mod:`graphopt.measure` (onnxruntime, calibration, verification, analysis, latency, executors),
:mod:`graphopt.compress` (the math of the lossy passes), :mod:`graphopt.passes` (the passes and
presets) and :mod:`graphopt.app` (the API, the command line, reports).
"""

from __future__ import annotations

import os

# onnxruntime (1.32 on Linux) records usage telemetry on import: a `.ses` file in TMPDIR and a device
# id and an event database under ~/.cache/Microsoft. graphopt writes no file but its outputs, so it
# turns that off before onnxruntime is first imported; a user who sets the variable keeps their value.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"  # before the imports: api.py reads it

from graphopt.app.api import OptimizeResult, calibrate, inspect, optimize, verify  # noqa: E402
from graphopt.core.errors import GraphoptError, IRError  # noqa: E402

__all__ = ["GraphoptError", "IRError", "OptimizeResult", "__version__", "calibrate", "inspect", "optimize", "verify"]
