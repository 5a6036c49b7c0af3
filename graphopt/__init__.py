"""graphopt: a graph-level optimizer for ONNX models, verified with onnxruntime."""

from .errors import GraphoptError, IRError

__version__ = "0.1.0"

__all__ = ["GraphoptError", "IRError", "__version__"]
