"""Deep Compression storage accounting: Huffman optimality, exact bit counts, relative indices with fillers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from onnx import helper

from graphopt.compress import storage
from graphopt.core.onnx_io import from_proto
from tests.util import init, make_model, tensor


def _kraft(lengths) -> float:
    return sum(2.0 ** -n for n in lengths)


def _optimal_cost_bruteforce(counts: list[int]) -> int:
    """Minimal Σ count·len over all prefix codes, via the merge recursion on every pair (tiny alphabets)."""
    best = math.inf

    def rec(items: tuple[int, ...], cost: int) -> None:
        nonlocal best
        if len(items) == 1:
            best = min(best, cost)
            return
        for i, j in itertools.combinations(range(len(items)), 2):
            merged = items[i] + items[j]
            rest = tuple(x for k, x in enumerate(items) if k not in (i, j)) + (merged,)
            rec(rest, cost + merged)

    rec(tuple(counts), 0)
    return int(best)


def test_huffman_dyadic_lengths_are_minus_log2_p():
    counts = {0: 64, 1: 32, 2: 16, 3: 8, 4: 4, 5: 2, 6: 1, 7: 1}
    lengths = storage.huffman_lengths(counts)
    total = sum(counts.values())
    for s, c in counts.items():
        assert lengths[s] == pytest.approx(-math.log2(c / total))
    assert _kraft(lengths.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("counts", [[5, 9, 12, 13, 16, 45], [1, 1, 1, 1, 1], [3, 3, 2, 1, 7], [100, 1, 1]])
def test_huffman_cost_equals_the_optimum(counts):
    lengths = storage.huffman_lengths(dict(enumerate(counts)))
    cost = sum(c * lengths[i] for i, c in enumerate(counts))
    assert cost == _optimal_cost_bruteforce(counts)
    assert _kraft(lengths.values()) <= 1.0 + 1e-12


def test_huffman_within_one_bit_of_entropy():
    rng = np.random.default_rng(0)
    stream = rng.geometric(0.2, size=5000)
    coded = storage.huffman_coded(stream)
    _, counts = np.unique(stream, return_counts=True)
    p = counts / counts.sum()
    entropy_bits = float(-(p * np.log2(p)).sum() * counts.sum())
    assert entropy_bits <= coded.payload_bits < entropy_bits + counts.sum()


def test_canonical_code_is_prefix_free_and_matches_lengths():
    lengths = storage.huffman_lengths({"a": 10, "b": 5, "c": 2, "d": 2, "e": 1})
    codes = storage.canonical_codes(lengths)
    for s, code in codes.items():
        assert len(code) == lengths[s]
    for a, b in itertools.permutations(codes.values(), 2):
        assert not b.startswith(a)


def test_single_symbol_stream_costs_one_bit_per_symbol():
    coded = storage.huffman_coded(np.zeros(17, dtype=np.int64))
    assert coded.payload_bits == 17 and coded.alphabet == 1


def test_relative_indices_fillers():
    codes, filler = storage.relative_indices(np.array([0, 3, 20]), 2)   # gaps 1, 3, 17 (4 + 4 + 4 + 4 + 1)
    assert codes.tolist() == [0, 2, 3, 3, 3, 3, 0]
    assert filler.tolist() == [False, False, True, True, True, True, False]
    # decoding the stream gives the positions back
    pos, at = [], -1
    for c, f in zip(codes, filler):
        at += int(c) + 1
        if not f:
            pos.append(at)
    assert pos == [0, 3, 20]
    with pytest.raises(ValueError):
        storage.relative_indices(np.array([3, 3]), 4)


def test_exact_bits_of_a_small_sparse_weight():
    w = np.zeros(64, dtype=np.float32)
    w[[1, 5, 9, 13]] = [0.5, 0.5, -0.5, 0.5]           # gaps 2, 4, 4, 4; values: two clusters
    got = storage.account_weight("w", w)
    assert got.scheme == "sparse" and got.nonzero == 4
    codes, filler = storage.relative_indices(np.array([1, 5, 9, 13]), got.gap_width)
    pos = storage.huffman_coded(codes)
    clusters = np.zeros(codes.size, dtype=np.int64)
    clusters[~filler] = np.array([2, 2, 1, 2])          # -0.5 -> symbol 1, 0.5 -> symbol 2
    idx = storage.huffman_coded(clusters)
    assert got.bits == pos.bits + idx.bits + 32 * 2
    assert got.position_bits == pos.bits and got.index_bits == idx.bits


def test_dense_random_floats_stay_float32():
    w = np.random.default_rng(0).normal(size=300).astype(np.float32)
    got = storage.account_weight("w", w)
    assert got.scheme == "float32" and got.bits == 32 * 300


def test_model_ratio_counts_biases_as_float():
    rng = np.random.default_rng(1)
    w = rng.choice(np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, -1.0], dtype=np.float32), size=(20, 50))
    b = rng.normal(size=20).astype(np.float32)
    proto = make_model([helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)], [tensor("x", [1, 50])],
                       [tensor("y", [1, 20])], [init("W", w), init("B", b)])
    model = from_proto(proto)
    acc = storage.account_model(model)
    assert acc.original_params == 1020 and acc.other_params == 20
    assert acc.bits == acc.weights[0].bits + 32 * 20
    assert acc.ratio == pytest.approx(32 * 1020 / acc.bits)
    assert acc.ratio > 4
