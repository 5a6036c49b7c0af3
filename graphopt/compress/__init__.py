"""The math of compression, independent of any pass: budgets and allocation, least squares,
SVD, k-means, storage accounting, filter importance, re-fit, the channel coupling analysis, and distillation
fine-tuning in torch (``distill``, the optional ``graphopt[finetune]`` extra).
"""

__all__ = ["budget", "channels", "distill", "importance", "int8speed", "kmeans", "lowrank_table", "lstsq", "options", "ortquant", "quantgrid",
           "reconstruct", "refit_shards", "shards", "storage", "svd"]
