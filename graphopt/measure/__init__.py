"""Measuring models: onnxruntime sessions, sample data, probe shapes and calibration statistics, verification,
analysis (params, MACs, bytes), the cost and latency models, the target CPU and its calibration, and the
executors that run evaluations.
"""

__all__ = ["analysis", "blas", "calibrate", "calibration", "cost", "cpu", "executor", "kernels", "latency", "ort",
           "probe", "qdq", "segments", "target", "verify"]
