"""graphopt: a graph-level optimizer for ONNX models, verified with onnxruntime.

``graphopt.optimize``, ``graphopt.verify`` and ``graphopt.inspect`` (see :mod:`graphopt.api`) mirror
the command line. They are imported on first use, so ``import graphopt.ir`` stays light.
"""

from __future__ import annotations

from typing import Any

from .errors import GraphoptError, IRError

__version__ = "0.1.0"

__all__ = ["GraphoptError", "IRError", "__version__", "inspect", "optimize", "verify"]

_API = ("optimize", "verify", "inspect", "OptimizeResult")


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
