"""Weight sharing by k-means (LOSSY, Deep Compression), with a compact encoding onnxruntime decodes at load.

What it does
------------
Each layer weight (Conv, Gemm, MatMul with a constant float weight) is clustered into ``k = 2^bits``
shared values by scalar k-means (:mod:`graphopt.kmeans`: ``linear`` / ``density`` / ``kmeans++``
initialisation, optionally activation-weighted by ``diag(XᵀX)``). Exact zeros are pruned weights: they are
not clustered, stay exactly zero, and take one of the ``2^bits`` codes (``k = 2^bits − 1`` centroids then).

With calibration data the centroids (and the layer's bias) are re-fitted by least squares with the
assignments fixed (:func:`graphopt.kmeans.refit_centroids`), the post-training stand-in for Deep
Compression's centroid fine-tuning. Layers are processed in topological order, inputs read from the
model as shared so far and targets from the model as it was when the pass started, so each layer's
re-fit compensates the layers before it. The re-fit needs a :class:`graphopt.lstsq.LinearLayer`
(grouped/depthwise convs are clustered without it; the stats say so).

Encodings (option ``encoding``)
-------------------------------
``snap``
    the weight initializer is replaced by its shared values (float32); the graph is otherwise unchanged.
``compact``
    the weight becomes a small decoding subgraph of standard ops over two initializers: the codebook
    (float ``[K]``) and the indices packed ``8 / c`` per byte (``c`` = the smallest of 1, 2, 4, 8 bits
    holding ``bits``: 3 bits are stored in 4-bit containers, 5–7 in bytes) as *planes*: byte ``i`` holds
    indices ``i, i + m, i + 2m, …`` (``m`` = bytes), so decoding is one broadcast::

        idx = Reshape(Mod(Div(Cast<int64>(packed[1, m]), 2^(c·j)[per, 1]), 2^c), [-1])[:n]
        W   = Reshape(Gather(codebook, idx), shape)

    Every input is constant, so onnxruntime's constant folding (any optimisation level above
    ``DISABLE_ALL``) evaluates it once when the session loads: the file is small and inference runs
    on the same float weights as the snapped model, decoded bit-exactly. For the same reason graphopt's
    own ``fold_constants`` would decode it back into float weights: ``compact`` goes last in a pipeline
    (the ``compress`` preset runs ``lossless`` first, which also folds BN into the convs so its
    parameters do not stay float32 in the file).

Refused (``left_alone``, with the reason): weights that are not constant floats, weights read by
several nodes, layers with fewer than ``min_weights`` weights (the decoder's nodes and codebook would
cost more than they save), and weights that already have at most ``k`` distinct nonzero values (nothing
to share; ``snap`` only).
"""

from __future__ import annotations

from math import ceil
from typing import Any

import numpy as np
from onnx import TensorProto

from graphopt.calibration import SampleData
from graphopt.ir import Graph, Model, Node
from graphopt.kmeans import INITS, kmeans, refit_centroids
from graphopt.lstsq import CrossGram, LinearLayer, collect
from graphopt.manager import Option, Pass, PassContext, PassResult, Sequential, get_pass, register, register_preset
from graphopt.onnx_io import from_proto, to_proto
from graphopt.passes.branch import drop_unused
from graphopt.passes.sparsify import Sparsify, penalised

OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def container_bits(bits: int) -> int:
    """Bits of the packing container for ``bits``-bit indices (1, 2, 4 or 8)."""
    for c in (1, 2, 4, 8):
        if bits <= c:
            return c
    raise ValueError(f"bits must be 1..8, got {bits}")


def pack_indices(idx: np.ndarray, bits: int) -> np.ndarray:
    """``[1, m]`` uint8 planes of ``idx`` (see the module docstring); inverse of the decoding subgraph."""
    c = container_bits(bits)
    per = 8 // c
    idx = np.asarray(idx, dtype=np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= 1 << c):
        raise ValueError(f"indices out of range for {c}-bit containers")
    m = ceil(idx.size / per)
    padded = np.zeros(per * m, dtype=np.int64)
    padded[:idx.size] = idx
    planes = padded.reshape(per, m)
    packed = np.zeros(m, dtype=np.int64)
    for j in range(per):
        packed |= planes[j] << (c * j)
    return packed.astype(np.uint8).reshape(1, m)


def unpack_indices(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """NumPy mirror of the decoding subgraph (for tests)."""
    c = container_bits(bits)
    per = 8 // c
    p = packed.astype(np.int64).reshape(1, -1)
    planes = (p // (1 << (c * np.arange(per)))[:, None]) % (1 << c)
    return planes.reshape(-1)[:n]


def add_decoder(graph: Graph, node: Node, slot: int, codebook: np.ndarray, idx: np.ndarray, shape: tuple[int, ...],
                bits: int, shared: dict[tuple, Any] | None = None) -> dict[str, int]:
    """Feed ``node``'s input ``slot`` from a decoding subgraph of ``codebook[idx].reshape(shape)``.

    ``shared`` caches the small constant initializers (shifts, modulus) between layers of one run, so
    each layer adds only its codes, its codebook, its shape and five nodes.
    """
    shared = {} if shared is None else shared
    c = container_bits(bits)
    per = 8 // c
    n = int(np.prod(shape))
    # Short names: each one is written to the file for every node and value that carries it, and with
    # the weight's own name (``blocks.4.block.expand.conv.weight``) the decoder's names outweighed the
    # codes of small layers. The stats map each layer to its decoder's prefix.
    shared["layers"] = shared.get("layers", 0) + 1
    base = f"q{shared['layers']}"

    def const(key: tuple, array: np.ndarray, hint: str):
        if key not in shared:
            shared[key] = graph.add_initializer(array, hint)
        return shared[key]

    def op(op_type: str, inputs: list, suffix: str, attrs: dict | None = None):
        return graph.add_node(op_type, inputs, [f"{base}_{suffix}"], attrs, name=f"{base}_{suffix}",
                              anchor=node).outputs[0]

    packed = graph.add_initializer(pack_indices(idx, bits), f"{base}_codes")
    book = graph.add_initializer(codebook, f"{base}_codebook")
    value = op("Cast", [packed], "i64", {"to": TensorProto.INT64})
    if per > 1:
        shifts = const(("shifts", c), (1 << (c * np.arange(per, dtype=np.int64))).reshape(per, 1), f"ws_shifts{c}")
        modulus = const(("modulus", c), np.array(1 << c, dtype=np.int64), f"ws_mod{c}")
        value = op("Mod", [op("Div", [value, shifts], "div"), modulus], "idx")
    if per * ceil(n / per) != n:  # drop the padding of the last byte
        flat = const(("flat",), np.array([-1], dtype=np.int64), "ws_flat")
        start = const(("zero",), np.array([0], dtype=np.int64), "ws_zero")
        end = graph.add_initializer(np.array([n], dtype=np.int64), f"{base}_n")
        value = op("Slice", [op("Reshape", [value, flat], "flat"), start, end], "cut")
    value = op("Gather", [book, value], "values", {"axis": 0})
    target = graph.add_initializer(np.array(shape, dtype=np.int64), f"{base}_shape")
    out = graph.add_node("Reshape", [value, target], [f"{base}_decoded"], name=f"{base}_decoded", anchor=node)
    out.outputs[0].set_tensor_type(TensorProto.FLOAT if codebook.dtype == np.float32 else None, list(shape))
    graph.set_input(node, slot, out.outputs[0])
    return {"decoder": base, "packed_bytes": int(ceil(n / per)), "codebook": int(codebook.size),
            "container_bits": c}


def share(weight: np.ndarray, bits: int, *, init: str = "linear", importance: np.ndarray | None = None,
          rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """k-means of ``weight``'s nonzero entries; returns ``(centroids, labels (−1 = zero), has_zero)``."""
    w = np.asarray(weight, dtype=np.float64)
    zero = w == 0
    has_zero = bool(zero.any())
    k = (1 << bits) - int(has_zero)
    labels = np.full(w.shape, -1, dtype=np.int64)
    nz = ~zero
    if not nz.any():
        return np.zeros(0), labels, has_zero
    imp = None if importance is None else np.broadcast_to(importance, w.shape)[nz]
    centroids, lab = kmeans(w[nz], k, init=init, importance=imp, rng=rng)
    labels[nz] = lab
    return centroids, labels, has_zero


def codebook_of(centroids: np.ndarray, labels: np.ndarray, has_zero: bool, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(codebook, idx)``: the zero (when present) is code 0, centroid ``j`` is code ``j + has_zero``."""
    book = np.concatenate([[0.0], centroids]) if has_zero else centroids
    idx = labels + 1 if has_zero else labels
    return book.astype(dtype), np.where(labels < 0, 0, idx)


def _weight_slots(graph: Graph, node: Node) -> list[int]:
    return [1] if len(node.inputs) > 1 else []


@register
class WeightSharing(Pass):
    name = "weight_sharing"
    summary = "LOSSY: k-means weight sharing (2^bits values per layer), LS centroid re-fit, compact encoding"
    lossless = False
    options = {
        "bits": Option(4, "index bits per weight (k = 2^bits shared values)", int, tuple(range(2, 9))),
        "init": Option("linear", "centroid initialisation", str, INITS),
        "weighted": Option(False, "weight the k-means by the calibration input energy diag(X^T X)", bool),
        "refit": Option(True, "re-fit the centroids by least squares on calibration data (needs data)", bool),
        "encoding": Option("snap", "snap: float weights; compact: packed indices + codebook decoded at load", str,
                           ("snap", "compact")),
        "ridge": Option(1e-2, "re-fit pull towards the unshared weights, relative to mean diag(X^T X)", float),
        "min_weights": Option(256, "layers with fewer weights are left alone", int),
        "max_rows": Option(16384, "calibration rows per layer", int),
        "samples": Option(512, "calibration samples used", int),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        bits = self.opt(ctx, "bits")
        encoding = self.opt(ctx, "encoding")
        needs_data = self.opt(ctx, "refit") or self.opt(ctx, "weighted")
        data: SampleData | None = None
        if needs_data and ctx.data is not None:
            data = ctx.data.head(min(self.opt(ctx, "samples"), ctx.data.n_samples))
        reference = from_proto(to_proto(model)) if data is not None else None
        rng = ctx.rng(self.name)
        graph = model.graph
        left: dict[str, dict[str, Any]] = {}
        records = []
        notes = []
        shared: dict[tuple, Any] = {}
        if needs_data and data is None:
            notes.append("no calibration data: plain k-means, no re-fit or activation weighting")

        def refuse(node: Node, reason: str) -> None:
            entry = left.setdefault(reason, {"reason": reason, "count": 0, "examples": []})
            entry["count"] += 1
            if len(entry["examples"]) < 3:
                entry["examples"].append(node.name)

        for node in graph.toposort():
            if node.op_type not in OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            wv = node.inputs[1]
            weight = graph.constant_array(wv)
            if weight is None or weight.dtype.kind != "f":
                refuse(node, "weight is not a constant float tensor")
                continue
            if len(graph.consumers(wv)) > 1 or graph.is_graph_output(wv):
                refuse(node, "weight read by several nodes")
                continue
            if weight.size < self.opt(ctx, "min_weights"):
                refuse(node, "fewer weights than min_weights (the codebook and decoder would not pay)")
                continue
            nonzero = np.unique(weight[weight != 0]).size
            if encoding == "snap" and nonzero <= (1 << bits) - int(bool((weight == 0).any())):
                refuse(node, "already at most 2^bits distinct values")
                continue
            ctx.say(f"weight_sharing: {node.name}")
            layer = LinearLayer.of(graph, node) if data is not None else "no calibration data"
            gram: CrossGram | None = None
            record: dict[str, Any] = {"node": node.name, "weights": int(weight.size), "bits": bits}
            if isinstance(layer, LinearLayer):
                gram = collect(model, {"l": layer}, data, reference=reference, targets={"l": layer.y.name},
                               max_rows=self.opt(ctx, "max_rows"), seed=ctx.seed)["l"]
            elif needs_data and data is not None:
                record["no_refit"] = layer
            importance = None
            if self.opt(ctx, "weighted") and gram is not None:
                energy = np.diagonal(gram.xtx)[:-1]                       # per input feature (row of W [F, O])
                importance = layer.weight_from_matrix(np.repeat(energy[:, None], layer.out_features, axis=1))
            centroids, labels, has_zero = share(weight, bits, init=self.opt(ctx, "init"), importance=importance,
                                                rng=rng)
            bias = None
            if gram is not None and layer.kind == "matmul" and encoding == "compact":
                record["no_refit"] = "MatMul in compact encoding (the LS bias would need an extra Add)"
            elif gram is not None and self.opt(ctx, "refit") and centroids.size:
                w_mat, b_vec = layer.weight_matrix().astype(np.float64), layer.bias_vector().astype(np.float64)
                h, r, _ = penalised(gram, w_mat, b_vec, self.opt(ctx, "ridge"))
                lab_mat = _as_matrix(layer, labels)
                before = gram.relative_error(_snap(centroids, lab_mat), b_vec)
                fitted, fitted_bias = refit_centroids(h, r, lab_mat, centroids.size)
                used = np.bincount(labels[labels >= 0], minlength=centroids.size) > 0
                fitted = np.where(used, fitted, centroids)
                after = gram.relative_error(_snap(fitted, lab_mat), fitted_bias)
                record.update(rel_error_kmeans=round(before, 6), rel_error_refit=round(after, 6))
                if after < before:
                    centroids, bias = fitted, fitted_bias
            book, idx = codebook_of(centroids, labels, has_zero, weight.dtype)
            snapped = book[idx]
            record["distinct"] = int(np.unique(snapped).size)
            if encoding == "compact":
                old = [wv]
                record.update(add_decoder(graph, node, 1, book, idx, weight.shape, bits, shared))
                if bias is not None:
                    _set_bias(graph, node, layer, bias)
                drop_unused(graph, old)
            elif isinstance(layer, LinearLayer):
                layer.set_weights(graph, _as_matrix(layer, snapped), bias)
            else:
                new = graph.add_initializer(snapped.astype(weight.dtype), f"{node.name or node.op_type}_W")
                graph.set_input(node, 1, new)
                drop_unused(graph, [wv])
            records.append(record)
        stats: dict[str, Any] = {"shared": len(records), "layers": records, "encoding": encoding, "bits": bits}
        if left:
            stats["left_alone"] = list(left.values())
        if notes:
            stats["notes"] = notes
        return PassResult(bool(records), stats)


def _as_matrix(layer: LinearLayer, stored: np.ndarray) -> np.ndarray:
    """A stored-layout array of the layer's weight shape as ``[F, O]`` (like ``weight_matrix``)."""
    if layer.kind == "conv":
        return stored.reshape(stored.shape[0], -1).T
    return stored.T if layer.trans_b else stored


def _snap(centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.where(labels >= 0, centroids[np.maximum(labels, 0)], 0.0)


def _set_bias(graph: Graph, node: Node, layer: LinearLayer, bias: np.ndarray) -> None:
    """Give a conv/gemm a re-fitted bias (a new initializer; a MatMul gets an Add via set_weights)."""
    if layer.kind == "matmul":
        return  # the LS bias of a MatMul would need an Add; the codebook re-fit alone is kept
    old = node.inputs[2] if len(node.inputs) > 2 else None
    new = graph.add_initializer(np.asarray(bias, dtype=layer.weight.dtype).reshape(-1), f"{node.name}_B")
    graph.set_input(node, 2, new)
    drop_unused(graph, [old])


@register_preset("compress", "LOSSY: Deep Compression without retraining: lossless, sparsify, weight_sharing "
                             "(options sparsify.density, weight_sharing.bits, weight_sharing.encoding)")
def _compress() -> Pass:
    # The lossless preset first folds BN into the convs (its parameters would otherwise stay float). It must
    # not run after weight_sharing: fold_constants would evaluate the compact decoders back into floats.
    from graphopt.passes import lossless
    return Sequential([lossless(), Sparsify(), WeightSharing(), get_pass("dedupe_initializers")], name="compress")
