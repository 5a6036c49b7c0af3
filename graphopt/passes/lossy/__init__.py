"""Lossy passes: compression that changes what the model computes, measured and guarded."""

__all__ = ["deeprebirth", "finetune", "lowrank", "prune", "sparsify", "weight_sharing"]
