"""graphopt.compress.budget: levels, sensitivity through an executor, greedy allocation (checked against brute
force), unreachable targets, interacting costs, determinism, and the accuracy guard."""

from __future__ import annotations

import doctest
import itertools
import math

import numpy as np
import pytest

from graphopt.compress import budget
from graphopt.compress.budget import (
    Allocation,
    HeldOutDrop,
    PolynomialCost,
    Unit,
    allocate,
    guarded,
    levels,
    predicted_error,
    sensitivity,
    uniform,
    uniform_at,
)
from graphopt.measure.executor import InProcess, TaskError

# ---------------------------------------------------------------------------------------------
# synthetic problems


def problem(seed: int, *, n_units: int = 4, n_levels: int = 5, convex: bool = True, interact: bool = False):
    """Random units, sensitivities and a PolynomialCost. Convex: error a*(1-l/size)^p (p >= 1.5), so the
    error per cost saved grows level by level; otherwise step-like curves (flat, then jumps)."""
    rng = np.random.default_rng(seed)
    units, sens, full = [], {}, {}
    for i in range(n_units):
        size = int(rng.integers(8, 33))
        u = Unit(f"u{i}", levels(size, [1 - (k + 1) / n_levels for k in range(n_levels - 1)]))
        units.append(u)
        full[u.key] = size
        if convex:
            a, p = rng.uniform(0.1, 2), rng.uniform(1.5, 3)
            sens[u.key] = {lv: a * (1 - lv / size) ** p for lv in u.levels}
        else:
            jumps = np.cumsum(rng.choice([0, 0, 1, 3], len(u.levels) - 1) * rng.uniform(0.1, 1, len(u.levels) - 1))
            sens[u.key] = dict(zip(u.levels, [0.0, *map(float, jumps)]))
    cost = PolynomialCost(full)
    for key in full:
        cost.add(float(rng.uniform(10, 100)), key)
    if interact:  # a conv between two units: its MACs scale with both
        for a, b in zip(list(full), list(full)[1:]):
            cost.add(float(rng.uniform(50, 200)), a, b)
    cost.add(20.0)
    target = cost.total * float(rng.uniform(0.3, 0.8))
    return units, sens, cost, target


def brute_force(units, sens, cost, target):
    """The least predicted error over every assignment with cost <= target (None if none)."""
    best = None
    for combo in itertools.product(*[u.levels for u in units]):
        keep = {u.key: lv for u, lv in zip(units, combo)}
        if cost(keep) <= target:
            e = predicted_error(units, sens, keep)
            if best is None or e < best:
                best = e
    return best


def can_move_up(units, cost, keep, target) -> list[str]:
    """Units that could move up one level and still meet the target."""
    out = []
    for u in units:
        i = u.levels.index(keep[u.key])
        if i > 0 and cost({**keep, u.key: u.levels[i - 1]}) <= target:
            out.append(u.key)
    return out


# ---------------------------------------------------------------------------------------------
# levels and units


def test_levels():
    assert levels(64, [0.75, 0.5, 0.25]) == [64, 48, 32, 16]
    assert levels(64) == [64, 58, 51, 45, 38, 32, 26, 19, 13, 6]  # default 0.9 .. 0.1, rounded half up
    assert levels(60, [0.5, 0.3, 0.01], multiple=8) == [60, 32, 16, 8]  # full size need not be a multiple
    assert levels(64, [0.5, 0.2, 0.01], multiple=16, min_keep=20) == [64, 32]  # min_keep 20 -> 32
    assert levels(10, [0.99, 0.5, 0.05], min_keep=2) == [10, 5, 2]  # 9.9 rounds to 10: not a level
    assert levels(6, [0.5], multiple=8) == [6]  # smaller than one multiple: cannot be compressed
    assert levels(1) == [1]
    for bad in ([0.0], [1.5], [-0.2]):
        with pytest.raises(ValueError, match="outside"):
            levels(8, bad)
    with pytest.raises(ValueError):
        levels(0)
    with pytest.raises(ValueError):
        levels(8, multiple=0)


def test_levels_property_multiples_and_order():
    for size in range(1, 80, 7):
        for multiple in (1, 4, 8, 16):
            got = levels(size, multiple=multiple, min_keep=3)
            assert got[0] == size and got == sorted(set(got), reverse=True)
            assert all(lv % multiple == 0 and lv >= 3 for lv in got[1:])


def test_unit_validation():
    assert Unit("a", [8, 4, 2]).full == 8
    for bad in ([], [4, 8], [4, 4], [2, -1]):
        with pytest.raises(ValueError):
            Unit("a", bad)


def test_doctests():
    assert doctest.testmod(budget).failed == 0


# ---------------------------------------------------------------------------------------------
# sensitivity


def fake_error(ctx, item):
    key, level = item
    ctx.append(item) if isinstance(ctx, list) else None
    if key == "nan":
        return math.nan
    if key == "boom":
        raise RuntimeError("evaluation failed")
    return {"a": 1.0, "b": -0.5}[key] * (1 - level / 8)


def test_sensitivity_evaluates_every_level_but_the_first_once():
    units = [Unit("a", [8, 6, 4]), Unit("b", [8, 2]), Unit("c", [3])]
    seen, messages = [], []
    sens = sensitivity(units[:2], fake_error, executor=InProcess(), context=seen, progress=messages.append)
    assert sorted(seen) == [("a", 4), ("a", 6), ("b", 2)]
    assert sens == {"a": {8: 0.0, 6: 0.25, 4: 0.5}, "b": {8: 0.0, 2: 0.0}}  # b's negative error clamped
    assert messages[-1] == "sensitivity: 3/3 evaluations"
    assert sensitivity([Unit("c", [3])], fake_error, executor=InProcess()) == {"c": {3: 0.0}}


def test_sensitivity_refuses_bad_values_and_names_the_unit():
    with pytest.raises(ValueError, match="unit 'nan' at level 4"):
        sensitivity([Unit("nan", [8, 4])], fake_error, executor=InProcess())
    with pytest.raises(TaskError, match=r"\('boom', 4\)"):
        sensitivity([Unit("boom", [8, 4])], fake_error, executor=InProcess())
    with pytest.raises(ValueError, match="duplicate"):
        sensitivity([Unit("a", [8, 4]), Unit("a", [8, 2])], fake_error, executor=InProcess())


# ---------------------------------------------------------------------------------------------
# allocation against brute force


@pytest.mark.parametrize("interact", [False, True])
def test_greedy_is_optimal_for_its_own_cost_on_convex_problems(interact):
    """Separable convex curves, costs additive per unit: each greedy point minimizes E + lambda*cost,
    so nothing at or below its cost has less predicted error. (With interacting costs this is not a
    theorem; it is checked only for the additive case.)"""
    for seed in range(25):
        units, sens, cost, target = problem(seed, interact=interact)
        got = allocate(units, sens, cost, target, refine=False)
        assert got.met and got.cost <= target
        assert got.predicted_error == pytest.approx(predicted_error(units, sens, got.keep))
        if not interact:
            assert got.predicted_error <= brute_force(units, sens, cost, got.cost) + 1e-12


@pytest.mark.parametrize("convex", [True, False])
@pytest.mark.parametrize("interact", [False, True])
def test_refined_allocation_meets_target_within_one_step_and_is_near_optimal(convex, interact):
    optimal, gaps = 0, []
    for seed in range(30):
        units, sens, cost, target = problem(100 + seed, convex=convex, interact=interact)
        plain = allocate(units, sens, cost, target, refine=False)
        got = allocate(units, sens, cost, target)
        best = brute_force(units, sens, cost, target)
        assert got.met and got.cost <= target and got.cost == pytest.approx(cost(got.keep))
        assert got.predicted_error <= plain.predicted_error + 1e-12  # refinement never hurts
        assert got.predicted_error >= best - 1e-12  # sanity of the brute force
        assert can_move_up(units, cost, got.keep, target) == []  # target met within one level step
        optimal += got.predicted_error <= best + 1e-9
        gaps.append((got.predicted_error - best) / best if best > 0 else 0.0)
    assert optimal >= 24  # measured: 25-28 of 30; plain greedy finds 10-21
    assert float(np.mean(gaps)) < 0.05


def exhaustive_greedy(units, sens, cost, target):
    """The greedy of the module docstring without candidate levels or laziness: every deeper level of
    every unit costed at every move."""
    keep = {u.key: u.levels[0] for u in units}
    current = cost(keep)
    while current > target:
        best = None
        for pos, u in enumerate(units):
            i = u.levels.index(keep[u.key])
            for j in range(i + 1, len(u.levels)):
                c = cost({**keep, u.key: u.levels[j]})
                saved = current - c
                if saved > 1e-12 * max(1.0, abs(current)):
                    rank = ((sens[u.key][u.levels[j]] - sens[u.key].get(keep[u.key], 0.0)) / saved, -saved, pos, j)
                    if best is None or rank < best[0]:
                        best = (rank, u.key, u.levels[j], c)
        if best is None:
            break
        keep[best[1]], current = best[2], best[3]
    return keep


@pytest.mark.parametrize("convex", [True, False])
def test_lazy_greedy_with_candidate_levels_equals_the_exhaustive_greedy(convex):
    """With products of kept fractions as the cost (MACs) and monotone errors, the shortcuts of
    allocate lose nothing."""
    for seed in range(15):
        units, sens, cost, target = problem(300 + seed, n_units=6, n_levels=9, convex=convex, interact=True)
        assert allocate(units, sens, cost, target, refine=False).keep == exhaustive_greedy(units, sens, cost, target)


def test_fine_levels_stay_cheap():
    """One level per channel (up to 512 levels a unit): the cost is called a few thousand times, where
    the exhaustive greedy needs about a hundred thousand calls."""
    rng = np.random.default_rng(5)
    sizes = [32, 64, 64, 128, 128, 256, 256, 512, 512]
    units = [Unit(f"g{i}", levels(s, [k / s for k in range(1, s + 1)])) for i, s in enumerate(sizes)]
    sens = {}
    for u in units:
        a = rng.uniform(0.01, 1)
        pts = np.array([0.0625, 0.125, 0.25, 0.5, 0.75, 1.0]) * u.full  # measured points, interpolated
        vals = [a * (1 - p / u.full) ** 2 + (0.01 if p < u.full else 0) for p in pts]
        sens[u.key] = {lv: float(np.interp(lv, pts, vals)) for lv in u.levels}
    poly = PolynomialCost({u.key: u.full for u in units}).add(1e6, units[0].key)
    for a, b in itertools.pairwise(units):
        poly.add(9e6, a.key, b.key)
    calls = []

    def cost(keep):
        calls.append(1)
        return poly(keep)

    got = allocate(units, sens, cost, 0.5 * poly.total)
    assert got.met and can_move_up(units, poly, got.keep, 0.5 * poly.total) == []
    assert got.cost >= 0.49 * poly.total  # fine levels: lands close to the target
    assert len(calls) < 30_000
    assert allocate(units, sens, poly, 0.5 * poly.total) == got  # delta shortcut: same answer


def test_allocation_beats_uniform_at_equal_cost():
    for seed in range(10):
        units, sens, cost, target = problem(200 + seed, n_units=6, interact=True)
        ours, base = allocate(units, sens, cost, target), uniform_at(units, sens, cost, target)
        assert base.met and ours.met
        assert ours.predicted_error <= base.predicted_error + 1e-12


def test_interacting_costs_chain_of_convs():
    """conv1(3->a) conv2(a->b) conv3(b->c) fc(c->10): MACs are products of kept channels."""
    hw = 28 * 28
    units = [Unit(k, levels(32, [0.75, 0.5, 0.25])) for k in "abc"]
    cost = (PolynomialCost({k: 32 for k in "abc"})
            .add(3 * 32 * 9 * hw, "a").add(32 * 32 * 9 * hw, "a", "b").add(32 * 32 * 9 * hw, "b", "c")
            .add(32 * 10, "c").add(1000))
    sens = {"a": {32: 0, 24: 0.02, 16: 0.1, 8: 0.5}, "b": {32: 0, 24: 0.01, 16: 0.03, 8: 0.2},
            "c": {32: 0, 24: 0.05, 16: 0.3, 8: 2.0}}
    target = 0.5 * cost.total
    got = allocate(units, sens, cost, target)
    assert got.met and got.cost <= target and can_move_up(units, cost, got.keep, target) == []
    assert got.predicted_error == pytest.approx(brute_force(units, sens, cost, target))
    # cutting b alone halves two layers' MACs, so b (cheapest errors) is cut most
    assert got.keep["b"] == min(got.keep.values())


# ---------------------------------------------------------------------------------------------
# edge cases


def test_unreachable_target_returns_the_cheapest_reachable():
    units, sens, cost, _ = problem(7)
    got = allocate(units, sens, cost, 0.0)
    assert not got.met
    assert got.keep == {u.key: u.levels[-1] for u in units}  # every unit at its smallest level
    assert got.cost == pytest.approx(cost(got.keep)) and got.cost > 0
    assert got.steps <= sum(len(u.levels) - 1 for u in units)


def test_target_already_met_changes_nothing():
    units, sens, cost, _ = problem(3)
    got = allocate(units, sens, cost, cost.total)
    assert got.met and got.steps == 0 and got.refined == 0 and got.predicted_error == 0
    assert got.keep == {u.key: u.full for u in units}


def test_moves_that_save_nothing_are_skipped_and_plateaus_are_jumped():
    """The cost counts channels in tiles of 16 (hardware), so 64 -> 56 -> 48 save nothing until 48;
    unit z is not in the cost at all and must never be cut."""
    units = [Unit("a", [64, 56, 50, 48, 32, 16]), Unit("z", [64, 32])]
    sens = {"a": {56: 0.0, 50: 0.01, 48: 0.02, 32: 0.1, 16: 1.0}, "z": {32: 0.0}}

    def tiled(keep):
        return 100.0 * math.ceil(keep["a"] / 16)

    got = allocate(units, sens, tiled, 300.0)
    assert got.met and got.cost == 300.0 and got.keep == {"a": 48, "z": 64}
    assert got.steps == 1  # one jump 64 -> 48 over the plateau, not three moves
    got = allocate(units, sens, tiled, 50.0)
    assert not got.met and got.keep == {"a": 16, "z": 64} and got.cost == 100.0


def test_a_cost_that_rises_is_never_taken_and_the_loop_ends():
    units = [Unit("a", [8, 4, 2])]
    sens = {"a": {4: 0.1, 2: 0.2}}
    got = allocate(units, sens, lambda keep: 10.0 + (8 - keep["a"]), 5.0)  # cutting costs more
    assert not got.met and got.keep == {"a": 8} and got.steps == 0


def test_deterministic_ties_follow_unit_order():
    units = [Unit("p", [8, 4]), Unit("q", [8, 4])]
    sens = {"p": {4: 1.0}, "q": {4: 1.0}}
    cost = PolynomialCost({"p": 8, "q": 8}).add(10, "p").add(10, "q")
    first = allocate(units, sens, cost, 15.0)
    assert first.keep == {"p": 4, "q": 8}
    assert allocate(units[::-1], sens, cost, 15.0).keep == {"p": 8, "q": 4}
    for _ in range(3):
        assert allocate(units, sens, cost, 15.0) == first
    # larger saving wins an equal error-per-cost tie
    cost2 = PolynomialCost({"p": 8, "q": 8}).add(10, "p").add(20, "q")
    sens2 = {"p": {4: 1.0}, "q": {4: 2.0}}
    assert allocate(units, sens2, cost2, 25.0, refine=False).keep == {"p": 8, "q": 4}


def test_integer_keys_are_opaque_and_ties_follow_unit_order_not_key_order():
    # channel groups are keyed by their integer ids: the allocation must not order units by key
    units = [Unit(7, [8, 4]), Unit(2, [8, 4])]
    sens = {7: {4: 1.0}, 2: {4: 1.0}}
    cost = PolynomialCost({7: 8, 2: 8}).add(10, 7).add(10, 2)
    assert allocate(units, sens, cost, 15.0).keep == {7: 4, 2: 8}
    assert list(allocate(units, sens, cost, 15.0).keep) == [7, 2]
    assert allocate(units[::-1], sens, cost, 15.0).keep == {7: 8, 2: 4}
    # same results as with string keys in the same positions
    named = [Unit(f"g{u.key}", u.levels) for u in units]
    as_named = allocate(named, {f"g{k}": v for k, v in sens.items()},
                        PolynomialCost({"g7": 8, "g2": 8}).add(10, "g7").add(10, "g2"), 15.0)
    assert list(as_named.keep.values()) == list(allocate(units, sens, cost, 15.0).keep.values())
    with pytest.raises(ValueError, match="unit 2 at level 2"):
        allocate([Unit(2, [8, 4, 2])], {2: {4: 0.1}}, lambda k: 1.0, 0.5)


def test_allocate_refuses_missing_sensitivity_and_duplicates():
    with pytest.raises(ValueError, match="'a' at level 2"):
        allocate([Unit("a", [8, 4, 2])], {"a": {4: 0.1}}, lambda k: 1.0, 0.5)
    with pytest.raises(ValueError, match="duplicate"):
        allocate([Unit("a", [8]), Unit("a", [4])], {}, lambda k: 1.0, 0.5)


def test_polynomial_cost_and_its_delta():
    cost = PolynomialCost({"a": 8, "b": 4}).add(100, "a", "b").add(10, "b").add(5)
    assert cost.total == 115 and cost({"a": 8, "b": 4}) == 115
    keep = {"a": 4, "b": 2}
    assert cost(keep) == pytest.approx(100 * 0.5 * 0.5 + 10 * 0.5 + 5)
    for key, level in (("a", 2), ("b", 1), ("a", 4)):
        assert cost.delta(keep, key, level) == pytest.approx(cost({**keep, key: level}) - cost(keep))
    with pytest.raises(KeyError):
        cost.add(1.0, "nope")
    # a plain callable gives the same allocation as the PolynomialCost (delta is only a shortcut)
    units, sens, pc, target = problem(11, interact=True)
    assert allocate(units, sens, lambda k: pc(k), target) == allocate(units, sens, pc, target)


def test_uniform():
    units = [Unit("a", [64, 48, 32, 16]), Unit("b", levels(30, multiple=8))]
    assert uniform(units, 0.5) == {"a": 32, "b": 16}
    assert uniform(units, 1.0) == {"a": 64, "b": 30}
    assert uniform(units, 0.0) == {"a": 16, "b": 8}
    assert uniform([Unit("c", [10, 6, 4])], 0.5) == {"c": 6}  # tie 6 vs 4: the larger
    with pytest.raises(ValueError):
        uniform(units, 1.5)
    cost = PolynomialCost({"a": 64, "b": 30}).add(64, "a").add(30, "b")
    base = uniform_at(units, None, cost, 50.0)
    assert base.met and base.cost <= 50.0 and math.isnan(base.predicted_error)
    assert not uniform_at(units, None, cost, 1.0).met


# ---------------------------------------------------------------------------------------------
# accuracy guard


class FakeModel:
    """Allocation at a target fraction t: one unit of 100 levels; the drop is 20 * (1 - cost) points,
    so a drop <= max_drop needs cost >= 1 - max_drop / 20."""

    def __init__(self):
        self.units = [Unit("a", list(range(100, 0, -1)))]
        self.sens = {"a": {lv: (100 - lv) / 100 for lv in range(1, 101)}}
        self.cost = PolynomialCost({"a": 100}).add(1.0, "a")
        self.measured = 0

    def allocate_at(self, t: float) -> Allocation:
        return allocate(self.units, self.sens, self.cost, t)

    def drop(self, alloc: Allocation) -> float:
        self.measured += 1
        return 20.0 * (1.0 - alloc.cost)


def test_guard_returns_the_target_allocation_when_it_passes():
    fake = FakeModel()
    alloc, trace = guarded(fake.allocate_at, fake.drop, 15.0, 0.5)
    assert alloc.keep == {"a": 50} and len(trace) == 1 and trace[0]["ok"] and fake.measured == 1


def test_guard_bisects_to_the_most_compressed_allocation_within_max_drop():
    fake = FakeModel()
    alloc, trace = guarded(fake.allocate_at, fake.drop, 2.0, 0.5, steps=8)
    assert fake.drop(alloc) <= 2.0
    assert alloc.cost == pytest.approx(0.9, abs=0.01)  # the boundary, 1 - 2/20, to the bisection step
    assert trace[0]["target"] == 0.5 and not trace[0]["ok"]
    ok_costs = [t["cost"] for t in trace if t["ok"]]
    assert alloc.cost == min(ok_costs)  # the cheapest passing try
    assert 2 <= len(trace) <= 9
    targets = [t["target"] for t in trace]
    assert all(0.5 <= t <= 1.0 for t in targets) and len(set(targets)) == len(targets)


def test_guard_falls_back_to_no_compression_and_measures_identical_allocations_once():
    fake = FakeModel()
    alloc, trace = guarded(fake.allocate_at, lambda a: 99.0 if a.cost < 1 else 0.0, 1.0, 0.5, steps=3)
    assert alloc.keep == {"a": 100} and trace[-1]["target"] == 1.0 and trace[-1]["ok"]
    # a coarse unit: many targets give the same allocation; each distinct allocation is measured once
    coarse = [Unit("a", [100, 50])]
    calls = []
    alloc, trace = guarded(lambda t: allocate(coarse, {"a": {50: 1.0}}, lambda k: k["a"] / 100, t),
                           lambda a: calls.append(a.keep["a"]) or (5.0 if a.keep["a"] == 50 else 0.0),
                           1.0, 0.4, steps=6)
    assert alloc.keep == {"a": 100} and sorted(calls) == [50, 100]
    assert any(t["reused"] for t in trace)


def test_a_held_out_drop_is_judged_with_its_paired_standard_error():
    reference = np.array([True] * 8 + [False] * 2)
    after = reference.copy()
    after[[0, 1, 2]] = False          # three right answers lost
    after[8] = True                   # one wrong answer gained
    measured = HeldOutDrop.of(reference, after, z=2.0)
    assert measured.drop == pytest.approx(20.0) and measured.changed == 4 and measured.n == 10
    assert measured.se == pytest.approx(20.0) and measured.upper == pytest.approx(60.0) and float(measured) == 60.0
    assert HeldOutDrop.of(reference, reference, z=2.0).upper == 0.0   # nothing flipped: nothing uncertain


def test_the_guard_accepts_by_the_upper_bound_and_records_the_plain_drop():
    fake = FakeModel()
    alloc, trace = guarded(fake.allocate_at, lambda a: HeldOutDrop(0.5 if a.cost < 1 else 0.0, 4, 100, 1.0),
                           1.0, 0.5, steps=2)
    assert trace[0]["drop"] == 0.5 and trace[0]["upper"] == 2.5 and not trace[0]["ok"]   # 0.5 + 1 · 2.0
    assert trace[0]["changed"] == 4 and trace[0]["held_out_samples"] == 100
    assert alloc.keep == {"a": 100}


@pytest.mark.parametrize("max_drop, target", [(15.0, 0.5), (2.0, 0.5), (0.5, 0.3), (-1.0, 0.5)])
@pytest.mark.parametrize("width", [2, 3, 7])
def test_guard_look_ahead_measures_in_batches_and_walks_the_same_search(max_drop, target, width):
    plain = FakeModel()
    expected, expected_trace = guarded(plain.allocate_at, plain.drop, max_drop, target, steps=6)
    ahead, batches = FakeModel(), []

    def measure_all(allocs):
        batches.append(len(allocs))
        return [ahead.drop(a) for a in allocs]

    alloc, trace = guarded(ahead.allocate_at, lambda a: pytest.fail("measured one by one"), max_drop, target,
                           steps=6, measure_all=measure_all, width=width)
    assert alloc.keep == expected.keep and trace == expected_trace   # the same search, whatever the width
    assert all(1 <= b <= width for b in batches) and sum(batches) == ahead.measured
    assert len(batches) <= len(trace)   # several tries measured per batch: fewer rounds
    if len(expected_trace) > 2 and width >= 3:
        assert len(batches) < len(expected_trace)


# ---- allocate_priced: price in one cost, stop on another


def _priced_problem():
    """Two units with the same errors and the same MACs per channel; unit ``slow``'s channels cost 5x the
    time of ``fast``'s (a depthwise-heavy group against a dense one)."""
    units = [Unit("slow", list(range(32, 0, -4))), Unit("fast", list(range(32, 0, -4)))]
    sens = {u.key: {lv: (1 - lv / 32) ** 2 for lv in u.levels} for u in units}
    macs = PolynomialCost({"slow": 32, "fast": 32}).add(100.0, "slow").add(100.0, "fast")
    time = PolynomialCost({"slow": 32, "fast": 32}).add(50.0, "slow").add(10.0, "fast").add(5.0)
    return units, sens, macs, time


def test_priced_allocation_meets_the_cost_target_and_buys_time():
    units, sens, macs, time = _priced_problem()
    plain = allocate(units, sens, macs, 100.0)
    priced = budget.allocate_priced(units, sens, time, macs, 100.0)
    assert priced.met and priced.cost <= 100.0 and priced.cost == pytest.approx(macs(priced.keep))
    assert priced.price == pytest.approx(time(priced.keep))
    assert priced.cost >= 100.0 - 100.0 * 4 / 32 - 1e-9  # within one level of the target
    # MACs alone split evenly; priced by time, the slow unit loses more
    assert plain.keep["slow"] == plain.keep["fast"]
    assert priced.keep["slow"] < priced.keep["fast"]
    assert time(priced.keep) < time(plain.keep)
    assert "price" in priced.to_dict() and "price" not in plain.to_dict()


def test_priced_allocation_edge_cases():
    units, sens, macs, time = _priced_problem()
    full = budget.allocate_priced(units, sens, time, macs, macs.total)
    assert full.met and full.keep == {"slow": 32, "fast": 32} and full.predicted_error == 0
    impossible = budget.allocate_priced(units, sens, time, macs, 1.0)
    assert not impossible.met and impossible.keep == {"slow": 4, "fast": 4}
    again = budget.allocate_priced(units, sens, time, macs, 100.0)
    assert again == budget.allocate_priced(units, sens, time, macs, 100.0)  # deterministic


# ---------------------------------------------------------------------------------------------
# fastest among near-equal allocations


def _step_problem():
    """Two units of 32 channels in steps of 8; MACs are per channel, the same for both. Time steps:
    unit ``a``'s channels above 16 cost a whole pass of 16 (a filter set), ``b``'s are smooth."""
    units = [Unit("a", [32, 24, 16, 8]), Unit("b", [32, 24, 16, 8])]
    macs = PolynomialCost({"a": 32, "b": 32}).add(100.0, "a").add(100.0, "b")

    def time(keep):
        return 40.0 * math.ceil(keep["a"] / 16) + 2.0 * keep["b"]
    return units, macs, time


def _fastest_near(units, sens, cost, alloc, price, **kw):
    """What near_fastest takes on the prediction alone: the first of near_candidates (with its price and
    moves in the stats), or ``alloc`` unchanged."""
    found, stats = budget.near_candidates(units, sens, cost, alloc, price, **kw)
    if not found:
        return alloc, stats
    stats.update(price_chosen=found[0].price, moved=found[0].moved)
    return found[0].allocation, stats


@pytest.mark.parametrize("seed", range(20))
def test_fastest_near_stays_within_the_tolerance_and_the_target_and_is_never_slower(seed):
    units, sens, cost, target = problem(seed, n_units=3)
    alloc = allocate(units, sens, cost, target)
    rng = np.random.default_rng(seed)
    weights = {u.key: float(rng.uniform(0.1, 3)) for u in units}

    def price(keep):
        return sum(weights[k] * v ** 1.5 for k, v in keep.items())

    near, stats = _fastest_near(units, sens, cost, alloc, price, tolerance=0.2)
    assert near.met and cost(near.keep) <= target + 1e-9
    assert predicted_error(units, sens, near.keep) <= 1.2 * predicted_error(units, sens, alloc.keep) + 1e-12
    assert price(near.keep) <= price(alloc.keep)
    if near.keep != alloc.keep:
        assert price(near.keep) < 0.99 * price(alloc.keep) and stats["moved"]
    assert all(near.keep[u.key] in u.levels for u in units)
    # with a floor (the result must keep at least 0.97 of the target) no neighbour below it is taken
    floored, _ = _fastest_near(units, sens, cost, alloc, price, tolerance=0.2, floor=0.97 * target)
    assert cost(floored.keep) >= min(0.97 * target, cost(alloc.keep)) - 1e-9
    assert price(near.keep) <= price(floored.keep) <= price(alloc.keep)


def test_fastest_near_takes_the_step_the_price_sees_and_the_tolerance_allows():
    units, macs, time = _step_problem()
    sens = {"a": {32: 0.0, 24: 0.30, 16: 0.60, 8: 2.0}, "b": {32: 0.0, 24: 0.29, 16: 0.62, 8: 2.0}}
    alloc = allocate(units, sens, macs, 150.0)  # least error at 3/4 of the MACs: a 24, b 24 (0.59)
    assert alloc.keep == {"a": 24, "b": 24}
    # both swaps are within 10% (0.60, 0.62); a 16, b 32 saves a whole pass of a: the fastest
    near, stats = _fastest_near(units, sens, macs, alloc, time, tolerance=0.1)
    assert near.keep == {"a": 16, "b": 32} and stats["moved"] == {"a": [24, 16], "b": [24, 32]}
    assert time(near.keep) < time({"a": 32, "b": 16}) < time(alloc.keep)
    assert near.cost == pytest.approx(macs(near.keep)) and near.met


def test_fastest_near_leaves_the_allocation_alone_when_nothing_qualifies():
    units, macs, time = _step_problem()
    sens = {"a": {32: 0.0, 24: 0.30, 16: 0.80, 8: 2.0}, "b": {32: 0.0, 24: 0.29, 16: 0.80, 8: 2.0}}
    alloc = allocate(units, sens, macs, 150.0)
    assert alloc.keep == {"a": 24, "b": 24}
    # every faster neighbour costs 0.21 more error (36%): outside 10%, and off at tolerance 0
    for tolerance in (0.1, 0.0):
        near, stats = _fastest_near(units, sens, macs, alloc, time, tolerance=tolerance)
        assert near is alloc and "moved" not in stats
    # a price that cannot tell the neighbours apart (flat) moves nothing either
    near, _ = _fastest_near(units, sens, macs, alloc, lambda keep: 1.0, tolerance=0.5)
    assert near is alloc
    # an allocation that missed its target is returned as is
    missed = allocate(units, sens, macs, 1.0)
    assert not missed.met and _fastest_near(units, sens, macs, missed, time, tolerance=0.5)[0] is missed


def test_near_candidates_are_the_faster_near_ties_cheapest_first_and_fastest_near_takes_the_first():
    units, macs, time = _step_problem()
    sens = {"a": {32: 0.0, 24: 0.30, 16: 0.60, 8: 2.0}, "b": {32: 0.0, 24: 0.29, 16: 0.62, 8: 2.0}}
    alloc = allocate(units, sens, macs, 150.0)
    found, stats = budget.near_candidates(units, sens, macs, alloc, time, tolerance=0.1)
    assert [c.allocation.keep for c in found] == [{"a": 16, "b": 32}, {"a": 32, "b": 16}]
    assert [c.price for c in found] == sorted(c.price for c in found) and found[0].price < time(alloc.keep)
    assert found[0].moved == {"a": [24, 16], "b": [24, 32]} and stats["compared"] >= 2
    near, near_stats = _fastest_near(units, sens, macs, alloc, time, tolerance=0.1)
    assert near.keep == found[0].allocation.keep and near_stats["moved"] == found[0].moved
    assert budget.near_candidates(units, sens, macs, alloc, time, tolerance=0.0)[0] == []


def test_tie_check_refuses_a_measured_error_beyond_the_tolerance_or_verdicts_lost_beyond_noise():
    right = np.ones(100, bool)
    lost = right.copy()
    lost[:9] = False                         # 9 lost, 9 changed: drop 9 > 1 x SE 3
    assert budget.TieCheck(0.109, 0.10, 0.1).ok and not budget.TieCheck(0.111, 0.10, 0.1).ok
    assert budget.TieCheck(0.10, 0.10, 0.1, budget.HeldOutDrop.of(right, right, 1.0)).ok
    refused = budget.TieCheck(0.10, 0.10, 0.1, budget.HeldOutDrop.of(right, lost, 1.0))
    assert refused.error_ok and not refused.drop_ok and not refused.ok
    assert refused.fields()["drop_vs_least_error"] == 9.0 and refused.fields()["se"] == 3.0
    # as many verdicts won as lost elsewhere (18 changed): drop 0, not worse
    reference = right.copy()
    reference[50:59] = False
    even = budget.HeldOutDrop.of(reference, lost, 1.0)
    assert even.drop == 0 and even.changed == 18 and budget.TieCheck(0.10, 0.10, 0.1, even).ok
