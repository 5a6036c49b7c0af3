"""The option vocabulary the lossy passes share: one name, one meaning, one range.

Every data-fitted pass (``prune_filters``, ``lowrank``, ``sparsify``, ``weight_sharing``,
``deeprebirth_approx``) reads calibration data and most guard themselves against an accuracy budget.
The options for those two concerns are built here, so that ``samples`` means the same thing in every
pass, and a user who learned one pass's options knows the others'. A pass declares them with::

    options = {**calibration(samples=512, max_rows=16384, ridge=1e-2), "bits": Option(...), ...}

The groups:

calibration
    ``samples`` (calibration samples used), ``max_rows`` (least-squares / statistics rows per layer),
    ``ridge`` (relative to the mean diagonal of XᵀX), ``holdout`` (fraction of the samples kept out of
    the fit to measure on), ``sensitivity_samples`` (samples per sensitivity evaluation), ``levels``
    (levels measured per unit in a sensitivity table), ``min_weights`` (smaller layers left alone),
    ``shard_samples`` (statistics gathered in shards through the executor, :mod:`graphopt.compress.shards`).
guard
    ``guard`` (search within the accuracy budget), ``max_drop`` (the budget when the run sets no
    ``--max-drop``), ``guard_z`` (standard errors of margin), ``guard_holdout``, ``guard_steps``.

A pass takes only the members it uses; the help text may add what the option means in that pass.
"""

from __future__ import annotations

from typing import Any

from graphopt.core.manager import Option

__all__ = ["SHARED", "calibration", "guard"]


def calibration(**defaults: Any) -> dict[str, Option]:
    """The calibration options named in ``defaults`` (key -> default, or ``(default, extra help)``)."""
    return {key: _CALIBRATION[key](*_split(value)) for key, value in defaults.items()}


def guard(**defaults: Any) -> dict[str, Option]:
    """The guard options named in ``defaults`` (key -> default, or ``(default, extra help)``)."""
    return {key: _GUARD[key](*_split(value)) for key, value in defaults.items()}


def _split(value: Any) -> tuple[Any, str]:
    return value if isinstance(value, tuple) else (value, "")


def _help(base: str, extra: str) -> str:
    return f"{base} ({extra})" if extra else base


_CALIBRATION = {
    "samples": lambda d, x: Option(d, _help("calibration samples used", x), int, low=1),
    "max_rows": lambda d, x: Option(d, _help("least-squares rows sampled per layer", x), int, low=1),
    "ridge": lambda d, x: Option(d, _help("ridge, relative to the mean diagonal of X^T X", x), float, low=0),
    "holdout": lambda d, x: Option(d, _help("fraction of the samples kept out of the fit and measured on", x),
                                   float, low=0, high=1, high_open=True),
    "sensitivity_samples": lambda d, x: Option(d, _help("samples per sensitivity evaluation", x), int, low=1),
    "levels": lambda d, x: Option(d, _help("levels measured per unit for the sensitivity table", x), int, low=1),
    "min_weights": lambda d, x: Option(d, _help("layers with fewer weights are left alone", x), int, low=0),
    "shard_samples": lambda d, x: Option(d, _help("calibration statistics gathered in shards of this many samples "
                                                  "through the run's executor (--executor), added in shard order: "
                                                  "the result depends on it, not on the executor (0: one shard; a --data DIR's shards "
                                                  "are its files)", x),
                                         int, low=0),
}

_GUARD = {
    "guard": lambda d, x: Option(d, _help("with labelled data: search within the accuracy budget", x), bool),
    "max_drop": lambda d, x: Option(d, _help("accuracy budget (points) when the run sets no --max-drop", x),
                                    float, low=0),
    "guard_z": lambda d, x: Option(d, _help("accept drop + guard_z * its standard error <= max_drop", x),
                                   float, low=0),
    "guard_holdout": lambda d, x: Option(d, _help("fraction of the samples the guard holds out", x), float,
                                         low=0, high=1, low_open=True, high_open=True),
    "guard_steps": lambda d, x: Option(d, _help("bisection steps of the guard", x), int, low=0),
}

# Every name in the vocabulary: a pass that declares one of these keys must mean the same by it.
SHARED = frozenset(_CALIBRATION) | frozenset(_GUARD)
