"""Distillation fine-tuning of an ONNX graph in PyTorch (the optional ``graphopt[finetune]`` extra).

``engine`` imports torch (or says how to install it), ``ops`` holds what each ONNX op computes in torch,
``interpreter`` runs a graph with its float weights as parameters keyed by initializer name, ``data``
streams and augments unlabeled training inputs, ``train`` is the distillation loop and its loss.
Only ``engine`` may be imported without torch installed.
"""

__all__ = ["data", "engine", "interpreter", "ops", "train"]
