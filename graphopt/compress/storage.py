"""Storage accounting as in Deep Compression (Han et al., 2016): sparse positions, cluster indices, Huffman.

What a layer costs
------------------
A weight tensor is flattened in its stored (C) order. Its nonzero entries are kept as a stream of
``(gap, cluster)`` pairs:

* ``gap`` is the *relative index*: the distance from the previous kept entry (the first entry counts
  from position ``-1``), stored as ``gap - 1`` in ``b`` bits. A gap larger than ``2^b`` cannot be
  stored; it is bridged by *filler* entries, each advancing ``2^b`` positions and holding the value
  zero, exactly as in the paper's Figure 2. A filler costs a gap symbol and a cluster symbol.
* ``cluster`` is the entry's index into the layer's codebook (``k`` float32 centroids). Zero is a
  symbol of its own (the fillers and the pruned weights are exactly zero, never a centroid).

Both streams are Huffman coded (:func:`huffman_lengths` builds the real code; the bit count is
``Σ count(s)·len(s)``, exact). The code itself has to be shipped too: a canonical Huffman code is
fixed by its code lengths, so each stream pays ``alphabet · ceil(log2(max_len + 1))`` bits for its
table. The codebook costs ``32·k`` bits. The width ``b`` is chosen per layer (1..12 bits), the one
that gives the fewest bits in total.

A layer that is not sparse enough to gain from positions is stored *dense*: one Huffman-coded
cluster index per weight (zero included), no positions. A weight with more than 256 distinct
values is not shared: its kept values cost 32 bits each (float32) instead of a cluster index. Every
other float initializer (biases, BN parameters) costs 32 bits per value. :func:`account_model` picks
the cheapest of these for each weight, and the compression ratio is
``32 · (float parameters of the original) / (bits of the compressed model)``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from graphopt.core.ops import LAYER_OPS_WITH_TRANSPOSE, is_op

FLOAT_BITS = 32
MAX_SHARED = 256      # more distinct values than this: stored as float32
MAX_GAP_BITS = 12


# =============================================================================================
# Huffman


def huffman_lengths(counts: Mapping[Any, int]) -> dict[Any, int]:
    """Code length of each symbol in an optimal prefix code (Huffman's algorithm).

    Symbols with count 0 are left out. A single symbol gets length 1 (a code needs one bit to say
    anything). Ties are broken by insertion order so the result is deterministic.

    Examples
    --------
    >>> huffman_lengths({"a": 4, "b": 2, "c": 1, "d": 1})
    {'a': 1, 'b': 2, 'c': 3, 'd': 3}
    """
    items = [(s, int(c)) for s, c in counts.items() if c > 0]
    if not items:
        return {}
    if len(items) == 1:
        return {items[0][0]: 1}
    # heap entries: (weight, tiebreak, symbol indices of the subtree)
    heap = [(c, i, [i]) for i, (_, c) in enumerate(items)]
    heapq.heapify(heap)
    depth = [0] * len(items)
    tick = len(items)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for i in s1:
            depth[i] += 1
        for i in s2:
            depth[i] += 1
        heapq.heappush(heap, (c1 + c2, tick, s1 + s2))
        tick += 1
    return {items[i][0]: depth[i] for i in range(len(items))}


def canonical_codes(lengths: Mapping[Any, int]) -> dict[Any, str]:
    """The canonical prefix code (bit strings) for the given code lengths (symbols sorted by length, then value)."""
    code, prev = 0, 0
    out: dict[Any, str] = {}
    for sym, n in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        code <<= n - prev
        out[sym] = format(code, f"0{n}b")
        code += 1
        prev = n
    return out


@dataclass
class Coded:
    """A Huffman-coded stream: symbols, payload bits (exact), table bits."""

    symbols: int
    alphabet: int
    payload_bits: int
    table_bits: int

    @property
    def bits(self) -> int:
        return self.payload_bits + self.table_bits


def huffman_coded(stream: Iterable[int] | np.ndarray) -> Coded:
    """Huffman-code ``stream`` (integers): the exact number of payload bits plus the code table's bits."""
    values, counts = np.unique(np.asarray(stream, dtype=np.int64).ravel(), return_counts=True)
    if values.size == 0:
        return Coded(0, 0, 0, 0)
    lengths = huffman_lengths(dict(zip(values.tolist(), counts.tolist())))
    payload = int(sum(int(c) * lengths[v] for v, c in zip(values.tolist(), counts.tolist())))
    # canonical code: ship one length per symbol of the alphabet actually used, plus the symbol
    # itself when the alphabet is sparse (the symbol values need ceil(log2(max+1)) bits each)
    len_bits = max(1, math.ceil(math.log2(max(lengths.values()) + 1)))
    sym_bits = max(1, math.ceil(math.log2(int(values.max()) + 1))) if values.max() > 0 else 1
    table = int(values.size * (len_bits + sym_bits))
    return Coded(int(counts.sum()), int(values.size), payload, table)


# =============================================================================================
# relative indices


def relative_indices(positions: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaps between sorted kept positions as stored in ``bits`` bits, with filler entries.

    Parameters
    ----------
    positions : strictly increasing flat positions of the kept entries.
    bits : width of one stored gap; a stored value ``g`` means "advance ``g + 1`` positions".

    Returns
    -------
    (codes, is_filler) : one entry per stored element, kept entries and fillers in stream order.
    A gap ``d`` (>= 1) becomes ``ceil(d / 2^b) - 1`` fillers of code ``2^b - 1`` and then the code
    ``d - 1 - fillers·2^b``.

    Examples
    --------
    >>> relative_indices(np.array([1, 4, 15]), 3)    # gaps 2, 3, 11 = 8 (a filler) + 3
    (array([1, 2, 7, 2]), array([False, False,  True, False]))
    """
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    gaps = np.diff(np.concatenate([[-1], positions]))
    if np.any(gaps < 1):
        raise ValueError("positions must be strictly increasing and >= 0")
    span = 1 << bits
    fillers = (gaps - 1) // span
    total = int(gaps.size + fillers.sum())
    codes = np.full(total, span - 1, dtype=np.int64)
    is_filler = np.ones(total, dtype=bool)
    ends = np.cumsum(fillers + 1) - 1           # index of each kept entry in the stream
    codes[ends] = gaps - 1 - fillers * span
    is_filler[ends] = False
    return codes, is_filler


# =============================================================================================
# per weight and per model


@dataclass
class WeightStorage:
    """How one weight tensor is stored and what it costs (bits)."""

    name: str
    size: int
    nonzero: int
    scheme: str                   # "sparse", "dense" or "float32"
    distinct: int                 # distinct nonzero values
    bits: int
    position_bits: int = 0
    index_bits: int = 0
    codebook_bits: int = 0
    gap_width: int | None = None
    fillers: int = 0

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.size if self.size else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["density"] = round(self.nonzero / self.size, 6) if self.size else 0.0
        out["bits_per_weight"] = round(self.bits_per_weight, 4)
        return out


def account_weight(name: str, weight: np.ndarray) -> WeightStorage:
    """The cheapest Deep-Compression storage of ``weight`` (flattened in C order); see the module docstring."""
    flat = np.asarray(weight).ravel()
    size = int(flat.size)
    nz_pos = np.flatnonzero(flat)
    nz_val = flat[nz_pos]
    distinct_vals, cluster_of_nz = np.unique(nz_val, return_inverse=True)
    distinct = int(distinct_vals.size)
    shared = distinct <= MAX_SHARED
    float_bits = FLOAT_BITS * size
    best = WeightStorage(name, size, int(nz_pos.size), "float32", distinct, float_bits)
    if not shared:
        # positions may still pay for themselves with float32 values
        for bits in range(1, MAX_GAP_BITS + 1):
            codes, filler = relative_indices(nz_pos, bits)
            pos = huffman_coded(codes)
            total = pos.bits + FLOAT_BITS * int(codes.size)   # a filler stores a float zero
            if total < best.bits:
                best = WeightStorage(name, size, int(nz_pos.size), "sparse", distinct, total, pos.bits,
                                     FLOAT_BITS * int(codes.size), 0, bits, int(filler.sum()))
        return best
    codebook_bits = FLOAT_BITS * distinct
    # dense: one cluster symbol per weight, symbol 0 = exact zero, s + 1 = centroid s
    symbols = np.zeros(size, dtype=np.int64)
    symbols[nz_pos] = cluster_of_nz + 1
    idx = huffman_coded(symbols)
    if idx.bits + codebook_bits < best.bits:
        best = WeightStorage(name, size, int(nz_pos.size), "dense", distinct, idx.bits + codebook_bits, 0,
                             idx.bits, codebook_bits)
    for bits in range(1, MAX_GAP_BITS + 1):
        codes, filler = relative_indices(nz_pos, bits)
        if codes.size >= size:   # fillers everywhere: dense is never worse
            continue
        clusters = np.zeros(codes.size, dtype=np.int64)
        clusters[~filler] = cluster_of_nz + 1
        pos, idx = huffman_coded(codes), huffman_coded(clusters)
        total = pos.bits + idx.bits + codebook_bits
        if total < best.bits:
            best = WeightStorage(name, size, int(nz_pos.size), "sparse", distinct, total, pos.bits, idx.bits,
                                 codebook_bits, bits, int(filler.sum()))
    return best


@dataclass
class ModelStorage:
    """Deep Compression accounting of a whole model against float32 storage of its float parameters."""

    weights: list[WeightStorage] = field(default_factory=list)
    other_params: int = 0           # float parameters kept as float32 (biases, BN...)
    original_params: int = 0

    @property
    def bits(self) -> int:
        return sum(w.bits for w in self.weights) + FLOAT_BITS * self.other_params

    @property
    def ratio(self) -> float:
        return FLOAT_BITS * self.original_params / self.bits if self.bits else float("inf")

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.original_params if self.original_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": round(self.ratio, 3), "bits": self.bits, "bits_per_param": round(self.bits_per_weight, 4),
                "original_params": self.original_params, "other_params": self.other_params,
                "weights": [w.to_dict() for w in self.weights]}


def layer_weights(model: Any) -> dict[str, np.ndarray]:
    """``name -> array`` of every constant float weight read by a Conv/Gemm/MatMul (slot 1) or MatMul (either slot)."""
    graph = model.graph
    out: dict[str, np.ndarray] = {}
    for node in graph.toposort():
        if not is_op(node, *LAYER_OPS_WITH_TRANSPOSE):
            continue
        slots = (0, 1) if node.op_type == "MatMul" else (1,)
        for slot in slots:
            if slot < len(node.inputs) and node.inputs[slot] is not None:
                arr = graph.constant_array(node.inputs[slot])
                if arr is not None and arr.dtype.kind == "f" and arr.size > 0:
                    out[node.inputs[slot].name] = arr
    return out


def float_params(model: Any) -> int:
    """Number of float values in the main graph's initializers and Constant nodes that something reads.

    Initializers nothing reads (some tools leave the replaced originals behind) are not parameters.
    """
    graph = model.graph
    total = 0
    for value in graph.initializers.values():
        if not graph.uses(value) and not graph.is_graph_output(value):
            continue
        arr = value.array
        if arr.dtype.kind == "f":
            total += int(arr.size)
    for node in graph.toposort():
        if node.op_type == "Constant":
            arr = graph.constant_array(node.outputs[0])
            if arr is not None and arr.dtype.kind == "f":
                total += int(arr.size)
    return total


def account_model(model: Any, original: Any | None = None,
                  weights: Mapping[str, np.ndarray] | None = None) -> ModelStorage:
    """Deep Compression storage of ``model`` (an IR Model with snapped float weights).

    Parameters
    ----------
    model : the compressed model (sparse and/or shared weights as ordinary float initializers).
    original : the model the ratio is relative to (default: ``model`` itself).
    weights : the layer weights to account (default: :func:`layer_weights`); every other float
        parameter costs 32 bits.
    """
    weights = dict(layer_weights(model) if weights is None else weights)
    out = ModelStorage()
    out.weights = [account_weight(name, arr) for name, arr in weights.items()]
    layer_total = sum(int(a.size) for a in weights.values())
    out.other_params = float_params(model) - layer_total
    out.original_params = float_params(original if original is not None else model)
    return out
