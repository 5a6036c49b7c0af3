"""The core: the IR, ONNX I/O, shape inference, the pass contract and managers, the rule engine.

Nothing here knows about any specific pass, onnxruntime session or compression method.
"""

__all__ = ["errors", "ir", "ledger", "manager", "numbers", "onnx_io", "ops", "patterns", "progress", "rewrite", "scratch", "shapes"]
