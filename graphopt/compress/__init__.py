"""The math of compression, independent of any pass: budgets and allocation, least squares,
SVD, k-means, storage accounting, filter importance, re-fit, and the channel coupling analysis.
"""

__all__ = ["blas", "budget", "channels", "importance", "kmeans", "lstsq", "options", "ortquant", "quantgrid", "reconstruct",
           "storage", "svd"]
