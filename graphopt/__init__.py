"""graphopt: a graph-level optimizer for ONNX models, verified with onnxruntime.

``graphopt.optimize``, ``graphopt.verify`` and ``graphopt.inspect`` mirror the command line (see
:mod:`graphopt.api`).

Note: ``graphopt.verify`` is the function. The module of the same name is reached with
``from graphopt.verify import ...``; ``import graphopt.verify as v`` would give the function.
"""

from __future__ import annotations

__version__ = "0.1.0"  # before the imports: api.py reads it

from .api import OptimizeResult, inspect, optimize, verify  # noqa: E402
from .errors import GraphoptError, IRError  # noqa: E402

__all__ = ["GraphoptError", "IRError", "OptimizeResult", "__version__", "inspect", "optimize", "verify"]
