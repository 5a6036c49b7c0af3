"""The cost model that decides whether a rewrite pays: merge two layers, zero-pad a kernel, fuse siblings.

Cost of a set of layers, in *MAC-equivalents*::

    cost = macs + MEMORY_WEIGHT * (weight elements + input elements + output elements) + NODE_OVERHEAD * nodes

* ``macs``: multiply-accumulates (the formulas of :mod:`graphopt.measure.analysis`).
* memory traffic: on a CPU a layer reads its weights and input and writes its output once; a small
  layer is bound by that traffic, not by arithmetic.
* ``NODE_OVERHEAD``: onnxruntime pays a fixed price per kernel (dispatch, allocation, threading) —
  on the order of microseconds, which at a few GMAC/s is worth thousands of MACs. It is what makes
  removing a node pay even when the arithmetic is unchanged.

The constants are deliberately round; ``tools/`` benchmarks are the judge. A rewrite applies when
``after.total() < before.total() * (1 - MIN_GAIN)`` so that rewrites with no measurable effect (and
rounding noise in their numbers) do not churn the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Sequence

MEMORY_WEIGHT = 1.0
NODE_OVERHEAD = 20_000
MIN_GAIN = 0.0


@dataclass(frozen=True)
class Cost:
    """Additive cost of some layers."""

    macs: float = 0.0
    elements: float = 0.0  # weights + inputs + outputs moved
    nodes: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.elements + other.elements, self.nodes + other.nodes)

    def total(self) -> float:
        return self.macs + MEMORY_WEIGHT * self.elements + NODE_OVERHEAD * self.nodes


def cheaper(after: Cost, before: Cost) -> bool:
    """Whether ``after`` is worth switching to from ``before``."""
    return after.total() < before.total() * (1.0 - MIN_GAIN)


def conv_cost(batch: int, c_in: int, c_out: int, kernel: Sequence[int], out_spatial: Sequence[int],
              in_spatial: Sequence[int], groups: int = 1) -> Cost:
    """One Conv: ``N * Cout * prod(out) * (Cin / groups) * prod(kernel)`` MACs, plus traffic and one node."""
    out_elems = batch * c_out * prod(out_spatial)
    macs = out_elems * (c_in // groups) * prod(kernel)
    weights = c_out * (c_in // groups) * prod(kernel)
    return Cost(macs, weights + batch * c_in * prod(in_spatial) + out_elems, 1)


def gemm_cost(m: int, k: int, n: int) -> Cost:
    """One Gemm/MatMul of [M, K] x [K, N]: ``M * K * N`` MACs, plus traffic and one node."""
    return Cost(m * k * n, k * n + m * k + m * n, 1)


def elementwise_cost(elements: int) -> Cost:
    """One elementwise/activation node over ``elements`` values (read and written)."""
    return Cost(elements, 2 * elements, 1)
