"""Exceptions graphopt raises.

Two kinds matter to callers:

* :class:`GraphoptError` — the input (a model, a data file, an option) is bad. The CLI prints its
  message as one line on stderr and exits 2. The message is written for the user: it names the file,
  the value or the option at fault.
* :class:`IRError` — code broke an invariant of the IR (a bug in a pass or in graphopt). It is never
  the user's fault, so the CLI reports it as an internal error.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Bad user input: a one-line message, exit code 2 on the command line."""


class ModelLoadError(GraphoptError):
    """The model file is missing, unreadable, not ONNX, truncated or inconsistent."""


class DataError(GraphoptError):
    """A sample-data file is malformed or does not match the model's inputs."""


class OptionError(GraphoptError):
    """An unknown pass, preset or option, or an option value of the wrong type."""


class IRError(Exception):
    """An IR invariant was violated: a bug, not bad input."""
