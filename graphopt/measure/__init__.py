"""Measuring models: onnxruntime sessions, sample data, probe shapes and calibration statistics, verification,
analysis (params, MACs, bytes), the cost and latency models, and the executors that run evaluations (in this
process, a local pool, Ray).
"""

__all__ = ["analysis", "blas", "calibration", "cost", "executor", "latency", "ort", "probe", "qdq", "ray_executor", "segments",
           "verify"]
