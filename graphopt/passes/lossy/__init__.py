"""Lossy passes: compression that changes what the model computes, measured and guarded."""

__all__ = ["deeprebirth", "lowrank", "prune", "quantize", "sparsify", "weight_sharing"]
