"""The training engine: PyTorch on the CPU, an optional extra.

Every module of :mod:`graphopt.compress.distill` but this one imports torch at the top; a pass asks
:func:`torch_or_reason` first and refuses in one line when torch is missing, so graphopt without the
extra still imports, lists and runs every other pass.
"""

from __future__ import annotations

from typing import Any

#: What the refusal tells the user to run: the CPU wheel (plain ``torch`` pulls the CUDA build, GBs).
INSTALL = "pip install 'graphopt[finetune]'"


def torch_or_reason() -> Any:
    """The ``torch`` module, or a one-line reason (a ``str``) saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        return f"needs PyTorch, which is not installed ({exc.msg}); install it with {INSTALL} (torch==2.13.0, CPU)"
    return torch
