"""Lossy passes: compression that changes what the model computes, measured and guarded."""

__all__ = ["deeprebirth", "finetune", "lowrank", "prune", "quantize", "sparsify", "weight_sharing"]
