"""Measuring models: onnxruntime sessions, sample data, probe shapes and calibration statistics, verification,
analysis (params, MACs, bytes), the cost and latency models, and the executors that run evaluations.
"""

__all__ = ["analysis", "blas", "calibration", "cost", "executor", "latency", "ort", "probe", "qdq", "segments", "verify"]
