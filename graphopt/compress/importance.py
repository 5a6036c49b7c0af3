"""Channel importance for filter pruning: which channels of a coupling group to keep.

A *group* (:mod:`graphopt.compress.channels`) is a set of channels that must be removed together from every
tensor dimension it couples: the filters of its *producers* (conv / gemm weights, BN parameters,
depthwise filters) and the input slices of its *consumers* (the layers that read it). Every criterion
below scores each group channel, higher = more important; :func:`keep_top` keeps the best ``k``.

Criteria
--------
``l1`` / ``l2`` (Li et al., "Pruning filters for efficient ConvNets")
    ``s_c = ‖W_p[c]‖₁`` (or ``‖·‖₂``) of the filter slice of channel ``c`` in each producer weight ``W_p``
    (parameters with at least 2 dims; biases and BN vectors are not filters).
``bn`` (Liu et al., network slimming)
    ``s_c = |γ_c|``, the BatchNormalization scale of each BN producer. Refused (``None``) when the
    group has no BN producer, e.g. after BN was folded into the conv.
``mean`` / ``apoz`` (Hu et al., "Network trimming")
    From calibration data, at each consumer's input tensor (after the activation): ``s_c = E|x_c|``,
    and ``s_c = 1 − APoZ_c`` (the fraction of non-zero activations).
``thinet`` (Luo et al., ThiNet; with the least-squares re-fit of He et al.)
    Greedy backward elimination by the consumers' reconstruction error. For a consumer with input
    rows ``X`` (im2col features plus a ones column), outputs ``Y`` and ridge ``λ``, let
    ``P = (XᵀX + λI)⁻¹`` and ``W = P XᵀY`` (the least-squares weights). Removing the feature block
    ``B`` of one channel and re-solving raises the squared error by exactly

        ``Δ_B = tr(W_Bᵀ (P_BB)⁻¹ W_B)``

    (the block form of optimal brain surgeon), and the solution and inverse after the removal are

        ``W ← W − P_{:,B} P_BB⁻¹ W_B``,   ``P ← P − P_{:,B} P_BB⁻¹ P_{B,:}``.

    Each step removes the channel with the smallest ``Σ_k Δ_B^k / E_k`` over the group's consumers
    ``k`` (``E_k`` = the variance of consumer ``k``'s outputs, ``Σ (y − ȳ)²``, so each consumer weighs by
    its *relative* error). It needs only ``XᵀX`` and ``XᵀY`` — the :class:`graphopt.compress.lstsq.CrossGram`
    of each consumer — and no further pass over the data. The score of a channel is its position in
    the elimination order (removed last = most important), so the kept sets for different ``k`` are
    nested.

Combining members
-----------------
A group has several producers (and consumers); their score vectors have unrelated scales (a 3x3x64
filter's L1 norm vs a depthwise 3x3 filter's). Each member's vector is divided by its mean (a member
whose scores are all 0 is skipped) and the group score is the average of these normalised vectors:
every member votes with equal weight and a channel is important when it matters to the members on
average.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.measure.blas import for_work
from graphopt.core.ir import Graph

CRITERIA = ("l1", "l2", "bn", "mean", "apoz", "thinet")


# =============================================================================================
# combining and selecting


def combine(vectors: Sequence[np.ndarray]) -> np.ndarray | None:
    """Average of the member score vectors, each divided by its mean; ``None`` when none is usable."""
    parts = []
    for v in vectors:
        v = np.asarray(v, dtype=np.float64)
        m = float(np.mean(np.abs(v))) if v.size else 0.0
        if m > 0 and np.all(np.isfinite(v)):
            parts.append(v / m)
    if not parts:
        return None
    return np.mean(parts, axis=0)


def keep_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` highest scores (ties: the lower index wins, so the choice is stable)."""
    scores = np.asarray(scores, dtype=np.float64)
    k = int(min(max(k, 0), scores.size))
    order = np.lexsort((np.arange(scores.size), -scores))  # descending score, then ascending index
    return np.sort(order[:k])


def _positions(index_map: np.ndarray, c: int) -> np.ndarray:
    return np.asarray(index_map[c]).reshape(-1)


# =============================================================================================
# weight criteria


def _nodes_by_name(graph: Graph) -> dict[str, Any]:
    return {n.name: n for n in graph.nodes}


def filter_norms(graph: Graph, group: Any, p: int = 1) -> np.ndarray | None:
    """Per-channel ``‖W_p[c]‖_p`` averaged (normalised) over the group's filter producers.

    A producer contributes when its parameter is a constant with >= 2 dims; the slice of channel
    ``c`` is ``W`` at ``index_map[c]`` along the producer's axis.
    """
    arrays = _constants(graph, {prod.param for prod in group.producers})
    vectors = []
    for prod in group.producers:
        w = arrays.get(prod.param)
        if w is None or w.ndim < 2 or w.dtype.kind != "f":
            continue
        moved = np.moveaxis(np.asarray(w, dtype=np.float64), prod.axis, 0)
        norms = np.empty(group.size)
        for c in range(group.size):
            block = moved[_positions(prod.index_map, c)]
            norms[c] = np.abs(block).sum() if p == 1 else np.sqrt((block ** 2).sum())
        vectors.append(norms)
    return combine(vectors)


def bn_scale(graph: Graph, group: Any) -> np.ndarray | None:
    """Per-channel ``|γ|`` of the group's BatchNormalization producers (``None`` if it has none)."""
    arrays = _constants(graph, {prod.param for prod in group.producers})
    nodes = _nodes_by_name(graph)
    vectors = []
    for prod in group.producers:
        node = nodes.get(prod.node)
        if node is None or node.op_type != "BatchNormalization" or len(node.inputs) < 2:
            continue
        if node.inputs[1] is None or node.inputs[1].name != prod.param:
            continue  # the bias / mean / var of the BN: not the scale
        gamma = arrays.get(prod.param)
        if gamma is None:
            continue
        gamma = np.abs(np.asarray(gamma, dtype=np.float64))
        vectors.append(np.array([gamma[_positions(prod.index_map, c)].mean() for c in range(group.size)]))
    return combine(vectors)


def _constants(graph: Graph, names: set[str]) -> dict[str, np.ndarray]:
    """The initializers among ``names`` (only those are decoded)."""
    return {v.name: v.array for v in graph.values() if v.name in names and v.is_initializer}


# =============================================================================================
# activation criteria


def activation_members(group: Any) -> list[tuple[str, int, np.ndarray]]:
    """``(value, axis, index_map)`` of the consumer inputs of the group (where activations are measured).

    Falls back to every member when the group has no consumer input among its members.
    """
    consumer_values = {c.value for c in group.consumers}
    chosen = [(m.value, m.axis, m.index_map) for m in group.members if m.value in consumer_values]
    seen, out = set(), []
    for item in chosen or [(m.value, m.axis, m.index_map) for m in group.members]:
        if (item[0], item[1]) not in seen:
            seen.add((item[0], item[1]))
            out.append(item)
    return out


def activation_scores(group: Any, stats: Mapping[tuple[str, int], Any], kind: str) -> np.ndarray | None:
    """``mean`` (``E|x_c|``) or ``apoz`` (``1 − APoZ_c``) from streamed :class:`ChannelStats`.

    ``stats[(value, axis)]`` holds the statistics of that tensor along that axis; a group channel
    owning several positions (a flattened feature block) averages them.
    """
    vectors = []
    for value, axis, index_map in activation_members(group):
        st = stats.get((value, axis))
        if st is None:
            continue
        per = st.mean_abs if kind == "mean" else 1.0 - st.apoz
        vectors.append(np.array([per[_positions(index_map, c)].mean() for c in range(group.size)]))
    return combine(vectors)


# =============================================================================================
# ThiNet greedy selection


@dataclass
class ThiNetProblem:
    """One consumer of the group, as ThiNet sees it.

    xtx, xty : ``XᵀX`` ``[F+1, F+1]`` and ``XᵀY`` ``[F+1, O]`` with the ones (bias) column last.
    blocks : for each group channel, the feature columns (into ``0..F-1``) it owns in this consumer.
    energy : ``Σ (y − ȳ)²`` over the consumer's outputs (normaliser).
    """

    xtx: np.ndarray
    xty: np.ndarray
    blocks: list[np.ndarray]
    energy: float
    name: str = ""


@dataclass
class ThiNetResult:
    """Elimination order (first removed first) and the relative error after each removal."""

    order: np.ndarray
    error: np.ndarray                       # cumulative Σ_k Δ/E_k after removing order[:i+1]
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def kept(self, k: int) -> np.ndarray:
        """Sorted indices of the channels that survive when ``k`` are kept."""
        n = len(self.order)
        return np.sort(self.order[n - int(k):]) if k > 0 else np.zeros(0, dtype=np.int64)

    def error_at(self, k: int) -> float:
        """Predicted relative error (summed over consumers) when keeping ``k`` channels."""
        removed = len(self.order) - int(k)
        return float(self.error[removed - 1]) if removed > 0 else 0.0


def thinet(problems: Sequence[ThiNetProblem], size: int, *, ridge: float = 1e-4,
           min_keep: int = 1, step: int = 1) -> ThiNetResult:
    """Greedy backward elimination of ``size`` channels (see the module docstring for the math).

    ``ridge`` is relative to the mean diagonal of ``XᵀX`` (the bias is not penalised). Channels are
    eliminated until ``min_keep`` remain; the survivors are appended to the order by their last
    scores, so ``order`` is a full permutation.

    ``step`` > 1 eliminates that many channels per round (the first round ``size mod step``, so that
    every round ends at a multiple of ``step`` kept): the ``step`` with the smallest ``Δ`` of the round,
    then one block update of ``W`` and ``P`` for all of them. Each update reads and writes all of ``P``
    (``F²`` numbers, memory-bound), so a 3072-wide consumer costs about ``size`` such sweeps one at a time
    and ``size / step`` in rounds. Kept counts that are multiples of ``step`` (the only ones the pruning
    levels use) then end rounds; ``error`` there is exact (the joint ``Δ`` of the channels removed in
    the round, which accounts for their interaction), inside a round it is spread in proportion to the
    channels' own ``Δ``.
    """
    step = max(int(step), 1)
    states = [_thinet_state(prob, ridge) for prob in problems]
    alive = np.ones(size, dtype=bool)
    order: list[int] = []
    errors: list[float] = []
    total = 0.0
    last = np.zeros(size)
    first = size % step or step
    while alive.sum() > max(min_keep, 0):
        count = min(first if not order else step, int(alive.sum()) - max(min_keep, 0))
        delta = np.zeros(size)
        for p, w, energy, blocks in states:
            _add_removal_costs(delta, p, w, energy, blocks, alive)
        candidates = np.flatnonzero(alive)
        picked = candidates[np.argsort(delta[candidates], kind="stable")[:count]]
        last = delta
        joint = sum(_remove_blocks(state, picked) for state in states)
        own = np.maximum(delta[picked], 0.0)
        share = own / own.sum() if own.sum() > 0 else np.full(len(picked), 1.0 / len(picked))
        running = total + np.cumsum(share) * max(float(joint), 0.0)
        order.extend(int(c) for c in picked)
        errors.extend(float(e) for e in running)
        total = float(running[-1])
        alive[picked] = False
    survivors = np.flatnonzero(alive)
    # Survivors by their last removal cost, cheapest first, so the most important comes last.
    survivors = survivors[np.argsort(last[survivors], kind="stable")]
    full = np.array(order + [int(s) for s in survivors], dtype=np.int64)
    scores = np.empty(size)
    scores[full] = np.arange(size, dtype=np.float64)
    return ThiNetResult(full, np.array(errors + [total] * len(survivors)), scores)


#: Element updates of ``P`` one ThiNet ranking may make one channel at a time (``size · Σ F²`` over the
#: group's consumers), each a memory-bound sweep. Beyond it, :func:`thinet_step` removes channels in
#: rounds: rounds of 8 for every group cost the zoo's mobilenetv2 0.4 points at half the MACs
#: (docs/decisions/sensitivity-at-scale.md), so rounds are only for the groups that would take minutes.
THINET_SWEEP_BUDGET = 1e9


def thinet_step(size: int, features: Sequence[int], level_step: int, budget: float = THINET_SWEEP_BUDGET) -> int:
    """Channels per ThiNet round for a group of ``size`` channels whose consumers have ``features``
    inputs each: the smallest divisor of ``level_step`` (the pruning levels' spacing, so rounds still
    end on every level) whose ``size / step · Σ F²`` element updates fit ``budget``, else ``level_step``."""
    work = float(size) * float(sum(int(f) ** 2 for f in features))
    level_step = max(int(level_step), 1)
    for step in range(1, level_step + 1):
        if level_step % step == 0 and work / step <= budget:
            return step
    return level_step


def _thinet_state(prob: ThiNetProblem, ridge: float) -> list:
    """``[P, W, energy, blocks]`` of one consumer: ``P = (XᵀX + λI)⁻¹``, ``W = P XᵀY``."""
    a = prob.xtx.astype(np.float64).copy()
    n_w = a.shape[0] - 1
    lam = ridge * max(float(np.diagonal(a)[:n_w].mean()) if n_w else 0.0, 1e-12)
    a[np.arange(n_w), np.arange(n_w)] += lam
    try:
        with for_work(a.shape[0] ** 3):
            p = np.linalg.inv(a)
    except np.linalg.LinAlgError:
        p = np.linalg.pinv(a)
    return [p, p @ prob.xty, max(prob.energy, 1e-30), prob.blocks]


_ROWS = 128


def _remove_blocks(state: list, channels: np.ndarray) -> float:
    """Remove the feature blocks of ``channels`` from one consumer's ``P`` and ``W`` (in place) and return
    the relative error that adds: ``tr(W_Sᵀ P_SS⁻¹ W_S) / energy`` over their union ``S``."""
    p, w, energy, blocks = state
    b = np.concatenate([blocks[c] for c in channels]) if len(channels) else np.zeros(0, np.int64)
    if b.size == 0:
        return 0.0
    pbb = p[np.ix_(b, b)]
    try:
        inv = np.linalg.inv(pbb)
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(pbb)
    wb = w[b]
    added = float(np.einsum("ko,ko->", wb, inv @ wb)) / energy
    pcol = p[:, b]  # fancy indexing: copies, so the in-place updates below cannot alias them
    w -= pcol @ (inv @ wb)
    left, right = pcol @ inv, p[b, :]
    # In place and by row blocks: a new F×F result per removal made this loop 3x slower at F = 2304, and
    # blocks whose product stays in cache read P once instead of three times (1.5x at F = 2048).
    for r in range(0, p.shape[0], _ROWS):
        p[r:r + _ROWS] -= left[r:r + _ROWS] @ right
    w[b] = 0.0
    p[b, :] = 0.0
    p[:, b] = 0.0
    return added


def _add_removal_costs(delta: np.ndarray, p: np.ndarray, w: np.ndarray, energy: float,
                       blocks: list[np.ndarray], alive: np.ndarray) -> None:
    """``delta[c] += tr(W_Bᵀ P_BB⁻¹ W_B) / energy`` for every alive channel ``c`` (blocks of equal size
    are solved as one stacked batch; one-column blocks in closed form, ``Σ_o W_co² / P_cc``)."""
    by_len: dict[int, list[int]] = {}
    for c in np.flatnonzero(alive):
        if blocks[c].size:
            by_len.setdefault(int(blocks[c].size), []).append(int(c))
    for k, chans in by_len.items():
        idx = np.stack([blocks[c] for c in chans])                  # [n, k]
        if k == 1:
            col = idx[:, 0]
            wb = w[col]                                             # [n, O]
            delta[chans] += np.einsum("no,no->n", wb, wb) / p[col, col] / energy
            continue
        pbb = p[idx[:, :, None], idx[:, None, :]]                   # [n, k, k]
        wb = w[idx]                                                 # [n, k, O]
        try:
            sol = np.linalg.solve(pbb, wb)
        except np.linalg.LinAlgError:
            sol = np.linalg.pinv(pbb) @ wb
        delta[chans] += np.einsum("nko,nko->n", wb, sol) / energy


def blocks_for(index_map: np.ndarray, to_columns: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """Per group channel, the feature columns of its positions (``to_columns`` maps positions to columns)."""
    return [np.asarray(to_columns(_positions(index_map, c)), dtype=np.int64) for c in range(index_map.shape[0])]
