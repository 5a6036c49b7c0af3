"""Lossless passes: rewrites that keep the model's function within float noise."""

__all__ = ["branch", "cleanup", "fusion", "permute", "simplify", "streamline"]
