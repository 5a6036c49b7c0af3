"""Allocate per-unit compression levels to meet a global budget (MACs, parameters...).

Pruning (units = channel groups, levels = kept channels), low-rank factorization (units = layers,
levels = ranks) and weight sharing (units = layers, levels = cluster counts) all face one problem:
choose a level for every unit so that a global cost meets a target while the model's error stays
small. This module solves it once, independently of what a unit is.

Vocabulary
----------
* A :class:`Unit` has a ``key`` (any hashable: a channel group's id, a layer's name; opaque here, and
  never ordered: ties are broken by the unit's position in ``units``) and ``levels``: allowed kept sizes in strictly descending order,
  ``levels[0]`` being the full size (no compression). :func:`levels` makes them from keep ratios,
  rounded to hardware-friendly multiples.
* ``keep`` (an *assignment*) maps every unit key to one of its levels.
* ``cost(keep) -> float`` is supplied by the caller and evaluated on the **whole** assignment, because
  costs interact: pruning the output channels of one conv also prunes the input channels of the next,
  so that layer's MACs are proportional to the product of two units' kept sizes.
  :class:`PolynomialCost` expresses exactly such costs; any cheap callable will do.
* ``sens[key][level]`` is the measured error (>= 0, smaller is better) of the model with **only** that
  unit compressed to that level (:func:`sensitivity`); ``sens[key][levels[0]] = 0``.

Error model
-----------
The predicted error of an assignment is **additive**: ``E(keep) = sum_u sens[u][keep[u]]``. It is the
first-order model: small, independent perturbations of different units add up in squared output
error when they are uncorrelated. It is what makes the allocation cheap (no model evaluation during
the search); it underestimates when perturbations compound, which is why :func:`guarded` checks the
real accuracy of the result.

Greedy allocation (:func:`allocate`)
------------------------------------
Start with every unit at ``levels[0]``. While ``cost(keep) > target``, take the move of one unit to a
deeper level ``j`` with the smallest

    ``(sens[u][j] - sens[u][current]) / (cost(keep) - cost(keep with u at j))``,

i.e. the least predicted error per unit of cost saved. ``j`` need not be the next level: a
non-convex error curve (flat, then a step, then flat - measured curves are noisy and interpolated)
must not trap the search. Costing every deeper level of every unit at every move would call ``cost``
``O(units x levels)`` times per move, too slow for channel counts as levels, so:

* *candidate levels*: per unit only the next level and the level with the least error per **level**
  removed are costed. When the cost is linear in the unit's level with the others fixed (MACs and
  parameters are: a layer's MACs are a product of its in and out channel fractions), the latter is
  exactly the best ratio above, so nothing is lost.
* *lazy evaluation*: each unit's best move waits in a heap; the top one is re-costed before it is
  taken (other moves change what it saves) and put back if it is no longer the best. For costs with
  non-negative products (MACs, parameters) and error curves that do not fall, a move only ever makes
  other units' savings smaller, so a waiting score is optimistic and the lazy order equals the full
  greedy's (``tests/test_budget.py`` checks it against an exhaustive greedy). For other costs it is a
  heuristic.

Moves that save nothing (``<= 0``, e.g. when a cost rounds to hardware tiles or a unit only matters
together with another) are not taken: a unit whose candidates save nothing scans for its first deeper
level that saves anything (a jump over the plateau); a unit none of whose levels saves anything waits
and is looked at again when no other move is left. Ties are broken by the larger saving, then by the
unit's position in ``units``, then by the shallower level, so the result is deterministic. Every move
lowers one unit's level index, so the loop ends after at most ``sum(len(levels) - 1)`` moves. When no
move saves anything and the target is still not met, the result has ``met=False`` and is the cheapest
assignment the greedy reached (with costs that fall with every level, every unit at its smallest
level).

For separable, convex error curves and additive costs each greedy point is optimal for its own cost
(it minimizes ``E + lambda * cost`` for the last ratio taken, a Lagrangian argument), so the only loss is
the overshoot of the last move.

Refinement (``refine=True``, the default; only the predicted errors, no model evaluation):

1. *give back*: while some unit can move up (to a shallower level) and the cost stays within the
   target, take the move that removes the most predicted error per unit of cost added. This spends the
   last move's overshoot; afterwards no unit can move up one level without breaking the target
   (unless its shallower level measured a larger error).
2. *swaps*: move one unit up (1, 2, 3, 4, 6, 8... levels) and another down to the shallowest level
   that meets the target again (binary search); apply the swap with the largest decrease of predicted
   error, then give back again; repeat while a swap helps (at most ``max_swaps``, and at most
   ``refine_calls`` cost evaluations, a count so the result stays deterministic). This repairs
   greedy's integer overshoot, its mistakes on non-convex curves and with interacting costs. Each
   swap strictly lowers the predicted error and give-back never raises it, so it terminates.

The refinement closes most of the gap between the greedy and the brute-force optimum on small problems
(``tools/bench_executor.py`` measures it; the numbers are in BENCHMARKS.md).

Not done: re-measuring the joint error around the allocated point (one level up and down per unit,
then measured swaps): on the one model it was tried on it lowered the output error but not the accuracy
drop, so it is not clearly worth its evaluations.

Priced allocation (:func:`allocate_priced`)
------------------------------------------
A target in one unit (MACs) reached by buying another (predicted time): the greedy and refinement
run on the price, with a price budget bisected until the cost meets the target. Each candidate is the
least-error allocation for its time budget, so at the MAC target the channels removed are those that
cost the least error per second saved.

Fastest among near-equals (:func:`near_candidates`)
---------------------------------------------------
After an allocation, its neighbours (one unit deeper; one unit a level up and another down until the
target is met again) whose predicted error is within a relative tolerance of its own are compared by a
second price (a target CPU's predicted time, which may step where the cost is smooth), and the
cheapest is taken when it saves more than ``min_gain``. One step from the allocation, so the error
cannot creep up step by step; no model evaluation. :func:`near_candidates` lists them cheapest first,
for a caller that measures a few before taking one: :class:`TieCheck` says whether a measured candidate
is worse than the least-error allocation beyond noise (its held-out output error more than
``tolerance`` above, or, with class scores, more top-1 verdicts lost than ``z`` paired standard
errors).

Accuracy guard (:func:`guarded`)
--------------------------------
If the allocation at ``target`` loses more than ``max_drop`` accuracy (measured by the caller), bisect
the target between ``target`` and ``full`` (no compression) and return the most compressed allocation
that stays within ``max_drop``, with the trace of every try.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_RATIOS: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)

Cost = Callable[[Mapping[Hashable, int]], float]
Sensitivity = Mapping[Hashable, Mapping[int, float]]

__all__ = [
    "DEFAULT_RATIOS",
    "Allocation",
    "HeldOutDrop",
    "PolynomialCost",
    "Unit",
    "allocate",
    "allocate_priced",
    "guarded",
    "levels",
    "predicted_error",
    "sensitivity",
    "uniform",
    "uniform_at",
]


# ===============================================================================================
# units and levels


@dataclass
class Unit:
    """One thing the budget is spread over.

    Attributes
    ----------
    key : unique hashable, e.g. a channel group's id ``12`` or a layer's name ``"conv3"``.
    levels : allowed kept sizes, strictly descending; ``levels[0]`` = full size (no compression).
    """

    key: Hashable
    levels: list[int]

    def __post_init__(self) -> None:
        self.levels = [int(level) for level in self.levels]
        if not self.levels:
            raise ValueError(f"unit {self.key!r}: no levels")
        if any(b >= a for a, b in zip(self.levels, self.levels[1:])):
            raise ValueError(f"unit {self.key!r}: levels must be strictly descending, got {self.levels}")
        if self.levels[-1] < 0:
            raise ValueError(f"unit {self.key!r}: negative level in {self.levels}")

    @property
    def full(self) -> int:
        return self.levels[0]


def levels(size: int, ratios: Sequence[float] | None = None, *, multiple: int = 1, min_keep: int = 1) -> list[int]:
    """Kept sizes for a unit of ``size`` at keep ``ratios``, descending, ``size`` first.

    Each ratio ``r`` in ``(0, 1]`` gives ``round(r * size)`` rounded to the nearest multiple of
    ``multiple`` (half up), and at least ``min_keep`` (itself raised to a multiple of ``multiple``).
    Sizes equal to or above ``size`` and duplicates are dropped. ``size`` itself is always the first
    level even when it is not a multiple (it is the uncompressed unit). A unit smaller than the smallest
    allowed size has the single level ``[size]``: it cannot be compressed.

    Parameters
    ----------
    size : full size (channels, rank...), >= 1.
    ratios : keep ratios; default :data:`DEFAULT_RATIOS` (0.9 down to 0.1).
    multiple : kept sizes are multiples of this (4, 8, 16 for SIMD-friendly channel counts).
    min_keep : smallest kept size.

    Raises
    ------
    ValueError : ``size < 1``, ``multiple < 1``, ``min_keep < 1`` or a ratio outside ``(0, 1]``.

    Examples
    --------
    >>> levels(64, [0.75, 0.5, 0.25])
    [64, 48, 32, 16]
    >>> levels(60, [0.5, 0.3], multiple=8)
    [60, 32, 16]
    >>> levels(10, [0.5, 0.05], min_keep=2)
    [10, 5, 2]
    """
    if size < 1 or multiple < 1 or min_keep < 1:
        raise ValueError(f"levels: size, multiple and min_keep must be >= 1 (got {size}, {multiple}, {min_keep})")
    floor = -(-min_keep // multiple) * multiple
    kept = {int(size)}
    for ratio in DEFAULT_RATIOS if ratios is None else ratios:
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"levels: keep ratio {ratio} is outside (0, 1]")
        k = math.floor(float(ratio) * size / multiple + 0.5) * multiple
        k = max(k, floor)
        if k < size:
            kept.add(k)
    return sorted(kept, reverse=True)


# ===============================================================================================
# sensitivity


def sensitivity(units: Sequence[Unit], evaluate: Callable[[Any, tuple[Hashable, int]], float], *, executor: Any,
                context: Any = None,
                progress: Callable[[str], None] | None = None) -> dict[Hashable, dict[int, float]]:
    """Error of the model with only one unit compressed, for every unit and every level but the first.

    Calls ``evaluate(context, (key, level))`` through ``executor`` (an :mod:`graphopt.measure.executor`
    executor; ``evaluate`` must be a module-level function for a process pool) and returns
    ``{key: {level: error}}`` with ``error = 0.0`` at ``levels[0]`` by definition (not evaluated).

    A negative error (measurement noise, e.g. an accuracy drop below zero) is clamped to 0: the
    additive error model assumes compressing a unit never helps.

    Raises
    ------
    ValueError : duplicate unit keys, or ``evaluate`` returned NaN / infinity / a non-number
        (the message names the unit and level).
    graphopt.measure.executor.TaskError : ``evaluate`` raised.
    """
    _check_unique(units)
    items = [(u.key, level) for u in units for level in u.levels[1:]]
    report = None
    if progress is not None:
        step = max(1, len(items) // 10)

        def report(done: int, total: int) -> None:
            if done == total or done % step == 0:
                progress(f"sensitivity: {done}/{total} evaluations")

    values = executor.map(evaluate, items, context=context, progress=report) if items else []
    out: dict[Hashable, dict[int, float]] = {u.key: {u.levels[0]: 0.0} for u in units}
    for (key, level), value in zip(items, values):
        try:
            error = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"sensitivity: evaluate returned {value!r} for unit {key!r} at level {level}") from None
        if not math.isfinite(error):
            raise ValueError(f"sensitivity: evaluate returned {error} for unit {key!r} at level {level}")
        out[key][level] = max(error, 0.0)
    return out


# ===============================================================================================
# costs


def table_size(per_sample: Callable[[int], float], asked_levels: int, n_samples: int, cap: float, *,
               min_levels: int) -> tuple[int, int, dict[str, Any]]:
    """``(levels, samples, stats)`` for a sensitivity table within ``cap`` multiply-accumulates.

    ``per_sample(n)`` is the table's work for one sample with ``n`` levels measured per unit. Over the cap,
    fewer samples are measured first (down to 16: each still yields a whole output), then fewer levels
    (down to ``min_levels``; the caller fills the rest in), then 8 samples. ``cap <= 0``: no cap. The stats
    say what was asked and what is measured (``over_budget`` when even the smallest table passes it)."""
    def stats(n_levels: int, samples: int) -> dict[str, Any]:
        return {"levels": n_levels, "samples": samples, "tmacs": round(samples * per_sample(n_levels) / 1e12, 6)}

    table: dict[str, Any] = {"asked": stats(asked_levels, n_samples),
                             "tmacs_budget": round(cap / 1e12, 6) if cap > 0 else None}
    choice: tuple[int, int] | None = (asked_levels, n_samples)
    smallest = (min(asked_levels, min_levels), min(8, n_samples))
    if cap > 0 and n_samples * per_sample(asked_levels) > cap:
        choice = None
        tries = [(asked_levels, 16)] + [(k, 16) for k in range(asked_levels - 1, min_levels - 1, -1)]
        tries.append((smallest[0], 8))
        for n_levels, floor in tries:
            fits = int(cap // max(per_sample(n_levels), 1.0))
            if fits >= min(floor, n_samples):
                choice = (n_levels, min(fits, n_samples))
                break
        if choice is None:
            choice = smallest
            table["over_budget"] = (f"the smallest table ({smallest[0]} levels, {smallest[1]} samples) still "
                                    "passes the budget")
    table["measured"] = stats(*choice)
    return choice[0], choice[1], table


@dataclass
class PolynomialCost:
    """``cost(keep) = constant + sum_t coef_t * prod_{k in keys_t} keep[k] / full[k]``.

    MACs and parameters of pruned networks have this form: a conv whose input channels belong to unit
    ``a`` and output channels to unit ``b`` costs ``macs * (keep[a]/full[a]) * (keep[b]/full[b])``; a
    layer touched by no unit is part of ``constant``; a bias or a BatchNorm of unit ``b`` is a term with
    one key. A depthwise conv, whose in and out channels are one unit and whose weight scales with the
    channel count once, is a term with that key once; a key repeated in a term scales with a power of
    its fraction (a dense conv whose input and output are the same unit, as in some residual blocks).

    Attributes
    ----------
    full : key -> full size (``levels[0]``).
    terms : ``(coef, keys)`` pairs.
    constant : the cost no unit changes.
    """

    full: dict[Hashable, int]
    terms: list[tuple[float, tuple[Hashable, ...]]] = field(default_factory=list)
    constant: float = 0.0

    def __post_init__(self) -> None:
        self._by_key: dict[Hashable, list[int]] = {}
        for index, (_, keys) in enumerate(self.terms):
            self._index(index, keys)

    def _index(self, index: int, keys: tuple[Hashable, ...]) -> None:
        for key in dict.fromkeys(keys):
            self._by_key.setdefault(key, []).append(index)

    def add(self, coef: float, *keys: Hashable) -> PolynomialCost:
        """Add a term; with no key the coefficient goes to ``constant``. Returns ``self``."""
        for key in keys:
            if key not in self.full:
                raise KeyError(f"PolynomialCost: unknown unit {key!r}")
        if keys:
            self.terms.append((float(coef), tuple(keys)))
            self._index(len(self.terms) - 1, tuple(keys))
        else:
            self.constant += float(coef)
        return self

    def delta(self, keep: Mapping[Hashable, int], key: Hashable, level: int) -> float:
        """``cost(keep with key at level) - cost(keep)``, from the terms that hold ``key`` only.

        :func:`allocate` uses a cost's ``delta`` method when it has one: the search then costs
        ``O(terms per unit)`` per candidate move instead of ``O(all terms)``.
        """
        if keep[key] == level:
            return 0.0
        total = 0.0
        for index in self._by_key.get(key, ()):
            coef, keys = self.terms[index]
            before = after = coef
            for k in keys:
                before *= keep[k] / self.full[k]
                after *= (level if k == key else keep[k]) / self.full[k]
            total += after - before
        return total

    def __call__(self, keep: Mapping[Hashable, int]) -> float:
        total = self.constant
        for coef, keys in self.terms:
            value = coef
            for key in keys:
                value *= keep[key] / self.full[key]
            total += value
        return total

    @property
    def total(self) -> float:
        """The cost with nothing compressed."""
        return self.constant + sum(coef for coef, _ in self.terms)


# ===============================================================================================
# allocation


@dataclass
class Allocation:
    """The result of :func:`allocate`.

    Attributes
    ----------
    keep : unit key -> kept size (one of the unit's levels).
    cost : ``cost(keep)``.
    predicted_error : ``sum_u sens[u][keep[u]]`` (the additive model; see the module docstring).
    met : ``cost <= target``.
    steps : greedy moves taken (refinement moves not counted).
    target : the target asked for.
    refined : give-back and swap moves the refinement applied.
    price : the other cost of ``keep`` when :func:`allocate_priced` made it.
    """

    keep: dict[Hashable, int]
    cost: float
    predicted_error: float
    met: bool
    steps: int
    target: float = math.nan
    refined: int = 0
    price: float | None = None

    def to_dict(self) -> dict:
        out = {"keep": dict(self.keep), "cost": self.cost, "predicted_error": self.predicted_error,
               "met": self.met, "steps": self.steps, "target": self.target, "refined": self.refined}
        if self.price is not None:
            out["price"] = self.price
        return out


def predicted_error(units: Sequence[Unit], sens: Sensitivity, keep: Mapping[Hashable, int]) -> float:
    """``sum_u sens[u][keep[u]]`` (``levels[0]`` counts 0 when ``sens`` omits it)."""
    return sum(_err(sens, u, keep[u.key]) for u in units)


def allocate(units: Sequence[Unit], sens: Sensitivity, cost: Cost, target: float, *,
             refine: bool = True, max_swaps: int = 100, swap_depth: int | None = None,
             refine_calls: int = 50_000) -> Allocation:
    """Greedy allocation of levels to meet ``cost(keep) <= target`` with the least predicted error.

    See the module docstring for the algorithm, its error model, tie-breaking and termination.

    Parameters
    ----------
    units : the units, in a fixed order (it breaks ties).
    sens : ``{key: {level: error}}`` for every level of every unit (``levels[0]`` may be omitted: 0).
    cost : cost of a whole assignment. The greedy calls it a few times per unit and move; a cost with
        a ``delta(keep, key, level)`` method (:class:`PolynomialCost`) is much cheaper to search.
    target : the cost to reach (same unit as ``cost``).
    refine : run the give-back and swap refinement after the target is met.
    max_swaps : at most this many swaps.
    swap_depth : how many levels a swap may move a unit up (``None``: any; tried at 1, 2, 3, 4, 6, 8, 12...).
    refine_calls : the swap search stops after this many cost evaluations (a count, so the result
        stays deterministic); give-back always completes.

    Returns
    -------
    Allocation : ``met=False`` when no assignment the greedy can reach meets the target; ``keep`` is
        then the cheapest one it reached.

    Raises
    ------
    ValueError : duplicate keys, or ``sens`` lacks a level of a unit.
    """
    _check_unique(units)
    for u in units:
        for level in u.levels[1:]:
            if level not in sens.get(u.key, {}):
                raise ValueError(f"allocate: no sensitivity for unit {u.key!r} at level {level}")
    search = _Search(units, sens, cost, target)
    steps = search.greedy()
    met = search.trial.current <= target
    refined = search.refine(max_swaps, swap_depth, refine_calls) if met and refine else 0
    keep = dict(search.keep)
    return Allocation(keep, search.trial.current, predicted_error(units, sens, keep), met, steps, float(target),
                      refined)


def allocate_priced(units: Sequence[Unit], sens: Sensitivity, price: Cost, cost: Cost, target: float, *,
                    rel_tol: float = 1e-3, max_iter: int = 30, **options: Any) -> Allocation:
    """Allocate by one cost and stop on another: the least-error assignment for a ``price`` budget
    (e.g. predicted time), with the budget chosen so that ``cost`` (e.g. MACs) meets ``target``.

    The greedy of :func:`allocate` buys the least error per unit of ``price`` saved; the largest price
    budget ``p`` whose allocation has ``cost <= target`` is found by bisection between every unit at its
    deepest level and none compressed (``cost`` of the allocation at ``p`` need not fall strictly with
    ``p``: the bisection keeps the least-compressed feasible allocation it met). Every allocation is the
    solution of ``min E s.t. price <= p``: where ``price`` is time and ``cost`` is MACs, it gives the
    MAC target with the fewest predicted errors per second saved, i.e. it prunes where time goes rather
    than where MACs are.

    Returns an :class:`Allocation` whose ``cost`` and ``met`` are in ``cost``'s unit and whose ``price``
    is the price of ``keep``. ``options`` go to :func:`allocate`. Deterministic: a fixed number of
    bisection steps (until the bracket is below ``rel_tol`` of the full price, at most ``max_iter``).
    """
    full = {u.key: u.levels[0] for u in units}
    deepest = {u.key: u.levels[-1] for u in units}
    hi, lo = float(price(full)), float(price(deepest))

    def at(p: float) -> Allocation:
        a = allocate(units, sens, price, p, **options)
        return Allocation(a.keep, float(cost(a.keep)), a.predicted_error, float(cost(a.keep)) <= target, a.steps,
                          float(target), a.refined, float(a.cost))

    if float(cost(full)) <= target:
        return at(hi)
    best = at(lo)
    if not best.met:
        return best
    for _ in range(max_iter):
        if hi - lo <= rel_tol * abs(hi):
            break
        mid = 0.5 * (lo + hi)
        a = at(mid)
        if a.met:
            best, lo = a, mid
        else:
            hi = mid
    return best


class _Trial:
    """The cost of ``keep`` and of ``keep`` with one unit changed; counts cost evaluations.

    Uses ``cost.delta(keep, key, level)`` for one change when the cost has it (:class:`PolynomialCost`),
    else calls ``cost`` on a copy. ``apply`` changes ``keep`` in place and recomputes the current cost
    from scratch, so deltas never accumulate rounding.
    """

    def __init__(self, cost: Cost, keep: dict[Hashable, int]):
        self.cost = cost
        self.keep = keep
        self.delta = getattr(cost, "delta", None)
        self.calls = 1
        self.current = float(cost(keep))
        self.root = self

    def one(self, key: Hashable, level: int) -> float:
        self.root.calls += 1
        if self.delta is not None:
            return self.current + float(self.delta(self.keep, key, level))
        return float(self.cost({**self.keep, key: level}))

    def moved(self, key: Hashable, level: int) -> _Trial:
        """A trial on a copy of ``keep`` with ``key`` at ``level``."""
        view = _Trial.__new__(_Trial)
        view.cost, view.delta, view.root = self.cost, self.delta, self.root
        view.current = self.one(key, level)
        view.keep = {**self.keep, key: level}
        return view

    def apply(self, key: Hashable, level: int) -> None:
        self.root.calls += 1
        self.keep[key] = level
        self.current = float(self.cost(self.keep))


class _Search:
    """State of one allocation: the assignment (as level indices), its cost, the error curves."""

    def __init__(self, units: Sequence[Unit], sens: Sensitivity, cost: Cost, target: float):
        self.units = list(units)
        self.target = float(target)
        self.errors = [[_err(sens, u, level) for level in u.levels] for u in self.units]
        self.index = [0] * len(self.units)
        self.keep = {u.key: u.levels[0] for u in self.units}
        self.trial = _Trial(cost, self.keep)

    def set(self, pos: int, j: int) -> None:
        self.index[pos] = j
        self.trial.apply(self.units[pos].key, self.units[pos].levels[j])

    # -- greedy -----------------------------------------------------------------------------------

    def down_candidates(self, pos: int) -> list[int]:
        """Level indices worth costing for a move down: the next level, and the level with the least
        error per *level* removed (the best move when the cost is linear in this unit's level, as
        MACs and parameters are; it jumps over flat stretches and kinks of the error curve)."""
        u, i, errs = self.units[pos], self.index[pos], self.errors[pos]
        if i + 1 >= len(u.levels):
            return []
        best_j, best = i + 1, None
        for j in range(i + 1, len(u.levels)):
            ratio = (errs[j] - errs[i]) / (u.levels[i] - u.levels[j])
            if best is None or ratio <= best:  # ties: the deeper level (the larger saving)
                best_j, best = j, ratio
        return sorted({i + 1, best_j})

    def best_cut(self, pos: int):
        """``(rank, j)`` of this unit's best move down, or ``None`` when no deeper level saves cost."""
        candidates = self.down_candidates(pos)
        best = min(filter(None, (self._cut(pos, j) for j in candidates)), default=None)
        if best is None:
            # a plateau of the cost (tiles, a unit that only matters with another): the first deeper
            # level that saves anything
            rest = (j for j in range(self.index[pos] + 1, len(self.units[pos].levels)) if j not in candidates)
            best = next(filter(None, (self._cut(pos, j) for j in rest)), None)
        return best

    def _cut(self, pos: int, j: int):
        """``(rank, j)`` for moving unit ``pos`` down to level ``j``, or ``None`` when that saves nothing."""
        i, current = self.index[pos], self.trial.current
        saved = current - self.trial.one(self.units[pos].key, self.units[pos].levels[j])
        if saved <= _eps(current):
            return None
        return ((self.errors[pos][j] - self.errors[pos][i]) / saved, -saved, pos, j), j

    def greedy(self) -> int:
        """Lazy greedy: a heap of each unit's best move, re-costed when popped (see the module docstring)."""
        heap: list[tuple] = []
        dormant: list[int] = []  # units with no saving move when last looked at
        for pos in range(len(self.units)):
            self._push(heap, dormant, pos)
        steps = 0
        while self.trial.current > self.target:
            if not heap:
                # nothing saved anything: look once more at the dormant units, the others moved since
                again, dormant[:] = list(dormant), []
                for pos in again:
                    self._push(heap, dormant, pos)
                if not heap:
                    break
                continue
            rank, _ = heapq.heappop(heap)
            pos = rank[2]
            fresh = self.best_cut(pos)  # other moves may have changed what this one saves
            if fresh is None:
                dormant.append(pos)
                continue
            if heap and fresh[0] > heap[0][0]:
                heapq.heappush(heap, fresh)
                continue
            self.set(pos, fresh[1])
            steps += 1
            self._push(heap, dormant, pos)
        return steps

    def _push(self, heap, dormant, pos) -> None:
        move = self.best_cut(pos)
        if move is not None:
            heapq.heappush(heap, move)
        elif self.index[pos] + 1 < len(self.units[pos].levels):
            dormant.append(pos)

    # -- refinement -------------------------------------------------------------------------------

    def refine(self, max_swaps: int, depth: int | None, budget: int) -> int:
        moves = self.give_back()
        stop = self.trial.calls + budget
        for _ in range(max_swaps):
            swap = self.best_swap(depth, stop)
            if swap is None:
                break
            (pa, ja), (pb, jb) = swap
            self.index[pb] = jb
            self.keep[self.units[pb].key] = self.units[pb].levels[jb]
            self.set(pa, ja)
            moves += 1 + self.give_back()
        return moves

    def give_back(self) -> int:
        """Move units up while the target holds: free moves first, then the most error removed per
        cost added; moves that remove no predicted error last (they spend budget the target allows,
        which keeps the cost close to the target and the real, unmodelled error lower)."""
        moves = 0
        while True:
            best = None
            current = self.trial.current
            for pos, u in enumerate(self.units):
                i, errs = self.index[pos], self.errors[pos]
                if i == 0:
                    continue
                best_j, best_ratio = i - 1, None
                for j in range(i - 1, -1, -1):
                    ratio = (errs[i] - errs[j]) / (u.levels[j] - u.levels[i])
                    if best_ratio is None or ratio > best_ratio:
                        best_j, best_ratio = j, ratio
                for j in sorted({best_j, *(i - step for step in _up_steps(i, None))}, reverse=True):
                    gain = errs[i] - errs[j]
                    if gain < 0:
                        continue  # a noisy curve: the shallower level measured worse
                    c = self.trial.one(u.key, u.levels[j])
                    if c > self.target:
                        continue
                    added = c - current
                    rank = ((0, -gain, pos, j) if added <= _eps(current)
                            else (1 if gain > 0 else 2, -gain / added, pos, j))
                    if best is None or rank < best[0]:
                        best = (rank, pos, j)
            if best is None:
                return moves
            self.set(best[1], best[2])
            moves += 1

    def best_swap(self, depth: int | None, stop: int):
        """One unit up (1, 2, 3, 4, 6, 8... levels, at most ``depth``) and another down to the shallowest level
        that meets the target again, if that lowers the predicted error; the best such pair."""
        best = None
        for pa, a in enumerate(self.units):
            ia = self.index[pa]
            ups = [ia - step for step in _up_steps(ia, depth)]
            for ja in ups:
                gain_a = self.errors[pa][ia] - self.errors[pa][ja]
                if gain_a <= 0:
                    continue
                up = self.trial.moved(a.key, a.levels[ja])
                for pb, b in enumerate(self.units):
                    if self.trial.calls > stop:
                        return None if best is None else best[1]
                    ib = self.index[pb]
                    if pb == pa or ib + 1 >= len(b.levels):
                        continue
                    # quick reject: even b's deepest level must cost less error than a gains
                    if min(self.errors[pb][ib + 1:]) - self.errors[pb][ib] >= gain_a:
                        continue
                    jb = self._shallowest_meeting(up, pb)
                    if jb is None:
                        continue
                    gain = gain_a - (self.errors[pb][jb] - self.errors[pb][ib])
                    if gain > 1e-12 * max(1.0, gain_a):
                        rank = (-gain, pa, ia - ja, pb, jb)
                        if best is None or rank < best[0]:
                            best = (rank, ((pa, ja), (pb, jb)))
        return None if best is None else best[1]

    def _shallowest_meeting(self, trial: _Trial, pb: int) -> int | None:
        """Binary search for the shallowest level of unit ``pb`` at which ``trial`` meets the target
        (the cost does not rise as a unit shrinks); ``None`` if even the deepest misses it."""
        b = self.units[pb]
        lo, hi = self.index[pb] + 1, len(b.levels) - 1
        if trial.one(b.key, b.levels[hi]) > self.target:
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if trial.one(b.key, b.levels[mid]) <= self.target:
                hi = mid
            else:
                lo = mid + 1
        return hi


def uniform(units: Sequence[Unit], ratio: float) -> dict[Hashable, int]:
    """Every unit at the level nearest to ``ratio * levels[0]`` (``ratio`` = fraction **kept**;
    a tie goes to the larger level)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"uniform: keep ratio {ratio} is outside [0, 1]")
    out = {}
    for u in units:
        want = ratio * u.levels[0]
        out[u.key] = min(u.levels, key=lambda level: (abs(level - want), -level))
    return out


def uniform_at(units: Sequence[Unit], sens: Sensitivity | None, cost: Cost, target: float, *,
               iterations: int = 40) -> Allocation:
    """The largest uniform keep ratio whose assignment meets ``target`` (bisection on the ratio),
    as an :class:`Allocation` (the baseline to compare :func:`allocate` with at equal cost).

    ``sens`` may be ``None`` (``predicted_error`` is then NaN). Assumes the cost does not fall when the
    ratio rises; ``met=False`` with the smallest ratio's assignment when even that misses the target.
    """
    def at(r: float) -> tuple[dict[Hashable, int], float]:
        keep = uniform(units, r)
        return keep, float(cost(keep))

    keep, c = at(1.0)
    if c > target:
        lo, hi = 0.0, 1.0
        best = at(0.0)
        if best[1] <= target:
            for _ in range(iterations):
                mid = (lo + hi) / 2
                k, cm = at(mid)
                if cm <= target:
                    lo, best = mid, (k, cm)
                else:
                    hi = mid
        keep, c = best
    error = math.nan if sens is None else predicted_error(units, sens, keep)
    return Allocation(keep, c, error, c <= target, 0, float(target))


@dataclass(frozen=True)
class Near:
    """A neighbour of an allocation (:func:`near_candidates`): the allocation, its price and the groups it
    moved (``{key: [before, after]}``)."""

    allocation: Allocation
    price: float
    moved: dict[str, list[int]]


def near_candidates(units: Sequence[Unit], sens: Sensitivity, cost: Cost, alloc: Allocation, price: Cost, *,
                    tolerance: float, min_gain: float = 0.01, floor: float | None = None
                    ) -> tuple[list[Near], dict[str, Any]]:
    """The allocations next to ``alloc`` that meet its target, are predicted within ``tolerance`` of its
    error and are cheaper by ``price`` by more than ``min_gain``, cheapest first; and what was compared.

    ``alloc`` has the least predicted error the search found; errors that close are not told apart by a
    sensitivity table measured on a few hundred samples, while the price (time) may differ by more than
    the MACs say. The neighbours (no model evaluation, ``sens`` only):

    1. one unit moved to any deeper level (the cost only falls, so the target stays met);
    2. one unit moved up one level and another down to the shallowest level that meets the target again.

    Rules: a neighbour whose cost falls below ``floor`` (when given; or below ``alloc``'s own cost, if
    that is lower) is not considered: the target is a budget to spend, and a caller may require the
    result to stay near it. A neighbour qualifies only when its price is lower than ``alloc``'s by more
    than ``min_gain`` (relative), so a price difference the model cannot resolve does not move the
    allocation; ties of price go to the lower predicted error, then to the order of ``units``. None
    qualifies when ``alloc`` did not meet its target or ``tolerance`` <= 0. One step: the tolerance is
    always measured from ``alloc``, so errors cannot creep up by repeated steps.
    """
    stats: dict[str, Any] = {"tolerance": tolerance, "compared": 0}
    if not alloc.met or tolerance <= 0:
        return [], stats
    keep = dict(alloc.keep)
    base_error = predicted_error(units, sens, keep)
    limit = base_error * (1.0 + tolerance)
    base_price = float(price(keep))
    stats["price"] = base_price
    candidates: list[dict[Hashable, int]] = []
    index = {u.key: u.levels.index(keep[u.key]) for u in units}
    for u in units:
        for level in u.levels[index[u.key] + 1:]:
            candidates.append({**keep, u.key: level})
    for a in units:
        i = index[a.key]
        if i == 0:
            continue
        raised = {**keep, a.key: a.levels[i - 1]}
        for b in units:
            if b.key == a.key:
                continue
            for level in b.levels[index[b.key] + 1:]:
                trial = {**raised, b.key: level}
                if float(cost(trial)) <= alloc.target:
                    candidates.append(trial)
                    break
    lowest = -math.inf if floor is None else min(float(floor), float(cost(keep)))
    ranked: list[tuple[tuple[float, float, int], dict[Hashable, int]]] = []
    for order, trial in enumerate(candidates):
        error = predicted_error(units, sens, trial)
        if error > limit or float(cost(trial)) < lowest:
            continue
        stats["compared"] += 1
        key = (float(price(trial)), error, order)
        if key[0] < base_price * (1.0 - min_gain):
            ranked.append((key, trial))
    ranked.sort(key=lambda item: item[0])
    found, seen = [], set()
    for (p, error, _), trial in ranked:
        signature = tuple(sorted(trial.items(), key=lambda kv: str(kv[0])))
        if signature in seen:
            continue
        seen.add(signature)
        found.append(Near(Allocation(trial, float(cost(trial)), error, True, alloc.steps, alloc.target,
                                     alloc.refined, alloc.price), p,
                          {str(k): [keep[k], v] for k, v in trial.items() if v != keep[k]}))
    return found, stats


# ===============================================================================================
# accuracy guard


@dataclass(frozen=True)
class HeldOutDrop:
    """A top-1 accuracy drop measured on held-out samples, and how far it can be trusted.

    ``drop = 100 · (right_ref − right) / n`` points over ``n`` samples. The comparison is paired (the
    same samples, before and after), so only the ``changed`` samples whose verdict flipped carry
    variance: ``SE = 100 · sqrt(changed) / n``. A guard accepts ``upper = drop + z · SE <= max_drop``;
    ``float()`` of it is ``upper``, which is what :func:`guarded` compares.
    """

    drop: float
    changed: int
    n: int
    z: float = 0.0

    @classmethod
    def of(cls, reference_correct: np.ndarray, correct: np.ndarray, z: float = 0.0) -> HeldOutDrop:
        """From per-sample verdicts (booleans, same samples in the same order) of the original and a try."""
        reference_correct, correct = np.asarray(reference_correct, bool), np.asarray(correct, bool)
        n = int(reference_correct.size)
        drop = 100.0 * (int(reference_correct.sum()) - int(correct.sum())) / n
        return cls(drop, int(np.sum(reference_correct != correct)), n, float(z))

    @property
    def se(self) -> float:
        return 100.0 * math.sqrt(self.changed) / self.n

    @property
    def upper(self) -> float:
        return self.drop + self.z * self.se

    def __float__(self) -> float:
        return self.upper

    def fields(self) -> dict[str, float | int]:
        """What a guard's trace records of it."""
        return {"drop": round(self.drop, 3), "changed": self.changed, "held_out_samples": self.n,
                "upper": round(self.upper, 3)}


@dataclass(frozen=True)
class TieCheck:
    """A faster near-tie measured against the least-error allocation on the same held-out samples: is it
    worse beyond noise?

    ``error``, ``base_error``: relative squared output error (pooled over the samples) of the candidate
    and of the least-error allocation; ``drop``: the candidate's top-1 drop against the least-error
    allocation, paired (:class:`HeldOutDrop` with the base's verdicts as reference), or ``None`` when the
    output is not class scores. The candidate is *not worse* (``ok``) when

    * ``error <= (1 + tolerance) · base_error`` (the near-tie holds measured, not only predicted), and
    * with verdicts, ``drop <= z · SE`` (``SE = 100·√changed / n``): it loses no more top-1 verdicts than
      the samples whose verdict flipped explain.
    """

    error: float
    base_error: float
    tolerance: float
    drop: HeldOutDrop | None = None

    @property
    def error_ok(self) -> bool:
        return self.error <= (1.0 + self.tolerance) * self.base_error

    @property
    def drop_ok(self) -> bool:
        return self.drop is None or self.drop.drop <= self.drop.z * self.drop.se

    @property
    def ok(self) -> bool:
        return self.error_ok and self.drop_ok

    def fields(self) -> dict[str, Any]:
        """What the stats record of it."""
        out: dict[str, Any] = {"heldout_rel_error": float(f"{self.error:.6g}"), "error_ok": self.error_ok}
        if self.drop is not None:
            out.update({"drop_vs_least_error": round(self.drop.drop, 3), "changed": self.drop.changed,
                        "held_out_samples": self.drop.n, "se": round(self.drop.se, 3), "drop_ok": self.drop_ok})
        out["ok"] = self.ok
        return out


def guarded(allocate_at: Callable[[float], Allocation], measure_drop: Callable[[Allocation], float],
            max_drop: float, target: float, *, full: float = 1.0, steps: int = 6,
            tolerance: float = 0.005, measure_all: Callable[[list[Allocation]], list[float]] | None = None,
            width: int = 1) -> tuple[Allocation, list[dict]]:
    """The most compressed allocation between ``target`` and ``full`` whose measured drop is within
    ``max_drop``.

    Tries ``allocate_at(target)`` first and returns it when ``measure_drop`` of it is ``<= max_drop``.
    Otherwise bisects the target on ``(target, full)``: a try within ``max_drop`` moves the upper bound
    down, one above it moves the lower bound up, for at most ``steps`` more tries or until the bracket
    is narrower than ``tolerance * |full|``. Allocations with the same ``keep`` are measured once.
    If nothing tried is within ``max_drop``, ``allocate_at(full)`` (the least compression the allocator
    makes, which is none unless its units force a first step) is measured and returned; a caller whose
    units force one decides what to do when that try fails too (pruning then prunes nothing).

    The bisection assumes the drop grows as the target shrinks; it usually does, and when it does
    not the result is still the cheapest *measured* allocation within ``max_drop``.

    Look-ahead (``measure_all`` and ``width > 1``, an executor with that many workers): each time a try
    is not measured yet, it is measured together with the tries that may follow it — the next levels
    of the bisection's tree, breadth first (whichever way this try goes), up to ``width`` distinct
    allocations in one ``measure_all`` call. The search then walks the tree exactly as without
    look-ahead, so the allocation and the trace are the same; only some measurements go unused.

    Parameters
    ----------
    allocate_at : target -> allocation (e.g. ``lambda t: allocate(units, sens, cost, t * total)``).
    measure_drop : allocation -> accuracy drop (points) or error; ``<= max_drop`` passes. A
        :class:`HeldOutDrop` is judged by its ``upper`` bound and recorded whole in the trace.
    full : the target meaning "no compression" (1.0 for fractions; the uncompressed cost otherwise).
    measure_all, width : allocations -> their drops, in order (e.g. through an executor), and how many
        to measure at once.

    Returns
    -------
    (allocation, trace) : trace entries are ``{target, cost, met, predicted_error, drop, ok, reused}``
        in the order tried.
    """
    trace: list[dict] = []
    measured: dict[tuple, float | HeldOutDrop] = {}
    tried: set[tuple] = set()
    allocations: dict[float, Allocation] = {}
    span = tolerance * max(abs(full), 1e-12)
    budget_left = [steps]                      # bisection tries left (the first try is not one)

    def allocation(t: float) -> Allocation:
        if t not in allocations:
            allocations[t] = allocate_at(t)
        return allocations[t]

    def signature(alloc: Allocation) -> tuple:
        return tuple(sorted(alloc.keep.items()))

    def measure_with(t: float, lo: float, hi: float) -> None:
        """Measure the try at ``t`` and, with look-ahead, the bisection's next tries below ``(lo, hi)``."""
        if measure_all is None or width <= 1:
            measured[signature(allocation(t))] = _judged(measure_drop(allocation(t)))
            return
        batch: dict[tuple, Allocation] = {}
        for u in [t, *_bisection_tree(lo, hi, budget_left[0], span)]:
            alloc = allocation(u)
            sig = signature(alloc)
            if sig not in measured and sig not in batch:
                batch[sig] = alloc
                if len(batch) == width:
                    break
        for sig, drop in zip(batch, measure_all(list(batch.values()))):
            measured[sig] = _judged(drop)

    def attempt(t: float, lo: float, hi: float) -> tuple[Allocation, bool]:
        alloc = allocation(t)
        sig = signature(alloc)
        reused = sig in tried
        if sig not in measured:
            measure_with(t, lo, hi)
        tried.add(sig)
        drop = measured[sig]
        ok = float(drop) <= max_drop
        entry = {"target": float(t), "cost": alloc.cost, "met": alloc.met,
                 "predicted_error": alloc.predicted_error, "drop": float(drop), "ok": ok, "reused": reused}
        if isinstance(drop, HeldOutDrop):
            entry.update(drop.fields())
        trace.append(entry)
        return alloc, ok

    lo, hi = float(target), float(full)
    alloc, ok = attempt(target, lo, hi)
    if ok:
        return alloc, trace
    best: Allocation | None = None
    while budget_left[0] > 0:
        if hi - lo <= span:
            break
        budget_left[0] -= 1
        mid = (lo + hi) / 2
        alloc, ok = attempt(mid, lo, hi)
        if ok:
            if best is None or alloc.cost < best.cost:
                best = alloc
            hi = mid
        else:
            lo = mid
    if best is None:
        best, _ = attempt(full, full, full)
    return best, trace


def _judged(drop: Any) -> float | HeldOutDrop:
    return drop if isinstance(drop, HeldOutDrop) else float(drop)


def _bisection_tree(lo: float, hi: float, steps: int, span: float) -> list[float]:
    """The targets the bisection of ``(lo, hi)`` may try in its next ``steps`` tries, breadth first: the
    middle, then the middles of both halves, ... (brackets narrower than ``span`` end the search)."""
    out: list[float] = []
    level = [(lo, hi)]
    for _ in range(steps):
        level = [(a, b) for a, b in level if b - a > span]
        if not level:
            break
        nxt = []
        for a, b in level:
            m = (a + b) / 2
            out.append(m)
            nxt += [(a, m), (m, b)]
        level = nxt
    return out


# ===============================================================================================
# helpers


def _err(sens: Sensitivity, unit: Unit, level: int) -> float:
    if level == unit.levels[0]:
        return float(sens.get(unit.key, {}).get(level, 0.0))
    return float(sens[unit.key][level])


def _up_steps(limit: int, depth: int | None) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24... up to ``limit`` (and ``depth``): every small step, then a
    geometric sample, so a swap search costs O(log levels) per unit."""
    out, step = [], 1
    while step <= limit and (depth is None or step <= depth):
        out.append(step)
        step = step + 1 if step < 4 else (step * 3 // 2 if step & (step - 1) == 0 else step * 4 // 3)
    return out


def _eps(scale: float) -> float:
    return 1e-12 * max(1.0, abs(scale))


def _check_unique(units: Iterable[Unit]) -> None:
    seen: set[Hashable] = set()
    for u in units:
        if u.key in seen:
            raise ValueError(f"duplicate unit key {u.key!r}")
        seen.add(u.key)
