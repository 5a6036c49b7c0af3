"""Measuring models: onnxruntime sessions, sample data, probe shapes and calibration statistics, verification,
analysis (params, MACs, bytes; sizes only input values decide read off a run), the cost and latency models,
the target CPU and its calibration, and the executors that run evaluations (in this process, a local pool,
Ray).
"""

__all__ = ["analysis", "blas", "calibrate", "calibration", "cost", "cpu", "executor", "kernels", "latency", "observed",
           "ort", "probe", "qdq", "ray_executor", "sampledir", "segments", "target", "verify"]
