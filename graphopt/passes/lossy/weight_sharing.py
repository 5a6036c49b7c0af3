"""Weight sharing by k-means (LOSSY, Deep Compression), with a compact encoding onnxruntime decodes at load.

What it does
------------
Each layer weight (Conv, Gemm, MatMul with a constant float weight) is clustered into ``k = 2^bits``
shared values by scalar k-means (:mod:`graphopt.compress.kmeans`: ``linear`` / ``density`` / ``kmeans++``
initialisation, optionally activation-weighted by ``diag(XᵀX)``). Exact zeros are pruned weights: they are
not clustered, stay exactly zero, and take one of the ``2^bits`` codes (``k = 2^bits − 1`` centroids then).

With calibration data the centroids (and the layer's bias) are re-fitted by least squares with the
assignments fixed (:func:`graphopt.compress.kmeans.refit_centroids`), the post-training stand-in for Deep
Compression's centroid fine-tuning. Layers are processed in topological order, inputs read from the
model as shared so far and targets from the model as it was when the pass started, so each layer's
re-fit compensates the layers before it. The re-fit needs a :class:`graphopt.compress.lstsq.LinearLayer`
(grouped/depthwise convs are clustered without it; the stats say so).

Encodings (option ``encoding``)
-------------------------------
``snap``
    the weight initializer is replaced by its shared values (float32); the graph is otherwise unchanged.
``compact``
    the weights become one decoding subgraph of standard ops (:func:`add_shared_decoder`): the indices of
    all shared layers packed together ``8 / c`` per byte (``c`` = the smallest of 1, 2, 4, 8 bits holding
    ``bits``: 3 bits are stored in 4-bit containers, 5–7 in bytes) as *planes* (byte ``i`` holds indices
    ``i, i + m, i + 2m, …``, ``m`` = bytes), unpacked once by one broadcast, split into the layers, and
    looked up in each layer's float codebook ``[K]``::

        idx = Reshape(Mod(Div(Cast<int64>(packed[1, m]), 2^(c·j)[per, 1]), 2^c), [-1])
        idx_1, …, idx_L = Split(idx, sizes)
        W_l = Reshape(Gather(codebook_l, idx_l), shape_l)

    Every input is constant, so onnxruntime's constant folding (any optimisation level above
    ``DISABLE_ALL``) evaluates it once when the session loads: the file is small and inference runs
    on the same float weights as the snapped model, decoded bit-exactly. For the same reason graphopt's
    own ``fold_constants`` would decode it back into float weights: ``compact`` goes last in a pipeline
    (the ``compress`` preset runs ``lossless`` first, which also folds BN into the convs so its
    parameters do not stay float32 in the file). Only names the pass creates are short; the model's
    own values and nodes keep their names.

Refused (``left_alone``, with the reason): weights that are not constant floats, weights read by
several nodes, layers with fewer than ``min_weights`` weights (the decoder's nodes and codebook would
cost more than they save), and weights that already have at most ``k`` distinct nonzero values (nothing
to share; ``snap`` only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from math import ceil
from typing import Any

import numpy as np
from onnx import TensorProto

from graphopt.compress.kmeans import INITS, kmeans, refit_centroids
from graphopt.compress.lstsq import CrossGram, LinearLayer, collect, penalised
from graphopt.compress.options import calibration
from graphopt.core.ir import Graph, Model, Node
from graphopt.core.ledger import LeftAlone
from graphopt.core.manager import Option, Pass, PassContext, PassResult, register
from graphopt.core.ops import LAYER_OPS_WITH_TRANSPOSE, drop_unused, is_op
from graphopt.measure.calibration import SampleData


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


def _short(i: int) -> str:
    """``i`` in base 36: the decoder's names are written once per node input/output that carries them."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = digits[r] + out
        if i == 0:
            return out


def add_shared_decoder(graph: Graph, layers: list[tuple[Node, int, np.ndarray, np.ndarray, tuple[int, ...]]],
                       bits: int) -> list[dict[str, Any]]:
    """Feed every ``(node, slot, codebook, idx, shape)`` from ONE decoding subgraph of all their codes.

    The indices of all layers are concatenated (in order) and packed together, so the unpacking
    (``Cast``, ``Div``, ``Mod``, ``Reshape``) is written once; a ``Split`` cuts the flat index stream
    into the layers (and the padding of the last byte), and each layer pays only its codebook, a
    ``Gather`` and a ``Reshape`` (shape tensors are shared between layers of the same shape)::

        idx_all = Reshape(Mod(Div(Cast<int64>(packed[1, m]), 2^(c·j)[per, 1]), 2^c), [-1])
        idx_1, …, idx_L, pad = Split(idx_all, [n_1, …, n_L, padding])
        W_l = Reshape(Gather(codebook_l, idx_l), shape_l)

    Names are short (``k…``, base 36): every name is stored again for each node that reads it, and with
    the weights' own names the decoder outweighed the codes of small layers.
    """
    c = container_bits(bits)
    per = 8 // c
    sizes = [int(np.prod(shape)) for _, _, _, _, shape in layers]
    flat = np.concatenate([np.asarray(idx, dtype=np.int64).ravel() for _, _, _, idx, _ in layers])
    total = int(flat.size)
    pad = per * ceil(total / per) - total
    anchor = layers[0][0]

    def op(op_type: str, inputs: list, outputs, hint: str, attrs: dict | None = None):
        return graph.add_node(op_type, inputs, outputs, attrs, name=hint, anchor=anchor).outputs

    value = op("Cast", [graph.add_initializer(pack_indices(flat, bits), "kcodes")], ["kc"], "kc",
               {"to": TensorProto.INT64})[0]
    if per > 1:
        shifts = graph.add_initializer((1 << (c * np.arange(per, dtype=np.int64))).reshape(per, 1), "kshift")
        modulus = graph.add_initializer(np.array(1 << c, dtype=np.int64), "kmod")
        value = op("Mod", [op("Div", [value, shifts], ["kd"], "kd")[0], modulus], ["km"], "km")[0]
        value = op("Reshape", [value, graph.add_initializer(np.array([-1], dtype=np.int64), "kflat")], ["ki"],
                   "ki")[0]
    split = sizes + ([pad] if pad else [])
    if len(split) > 1:
        parts = op("Split", [value, graph.add_initializer(np.array(split, dtype=np.int64), "ksplit")],
                   [f"ki{_short(i)}" for i in range(len(split))], "ks", {"axis": 0})
    else:
        parts = [value]
    shapes: dict[tuple[int, ...], Any] = {}
    records = []
    for i, ((node, slot, book, _, shape), part) in enumerate(zip(layers, parts)):
        key = _short(i)
        if tuple(shape) not in shapes:
            shapes[tuple(shape)] = graph.add_initializer(np.array(shape, dtype=np.int64), f"ks{key}")
        values = graph.add_node("Gather", [graph.add_initializer(book, f"kb{key}"), part], [f"kg{key}"],
                                name=f"kg{key}", anchor=node).outputs[0]
        out = graph.add_node("Reshape", [values, shapes[tuple(shape)]], [f"kw{key}"], name=f"kw{key}",
                             anchor=node).outputs[0]
        out.set_tensor_type(TensorProto.FLOAT if book.dtype == np.float32 else None, list(shape))
        old = node.inputs[slot]
        graph.set_input(node, slot, out)
        drop_unused(graph, [old])
        records.append({"decoder": f"kw{key}", "packed_bits": int(sizes[i] * c), "codebook": int(book.size),
                        "container_bits": c})
    return records


def shorten_names(model: Model) -> dict[str, int] | str:
    """Rename the main graph's internal values and its nodes to short names (``t…``, ``n…``, base 36).

    The graph's inputs and outputs keep their names (the interface, and what verification matches by
    name). Intermediate names like ``/stages/stages.2/branch2/branch2.1/conv/Conv_output_0`` are stored
    once per reader and writer, a large share of a compact file. Returns the counts renamed, or the
    reason nothing was renamed (subgraphs or functions could capture a name by its text).
    """
    graph = model.graph
    if model.functions or any(True for node in graph.toposort() for _ in node.iter_subgraphs()):
        return "the model has subgraphs or functions (they may refer to outer names)"
    interface = {id(v) for v in graph.inputs + graph.outputs}
    seen: set[int] = set()
    values = 0
    order = [v for node in graph.toposort() for v in list(node.inputs) + list(node.outputs) if v is not None]
    for value in order:
        if id(value) in seen or id(value) in interface:
            continue
        seen.add(id(value))
        graph.rename_value(value, f"t{_short(values)}")
        values += 1
    nodes = 0
    for node in graph.toposort():
        node.name = graph.namer.node_name(f"n{_short(nodes)}")
        nodes += 1
    return {"values": values, "nodes": nodes}


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


@register
class WeightSharing(Pass):
    name = "weight_sharing"
    summary = "LOSSY: k-means weight sharing (2^bits values per layer), LS centroid re-fit, compact encoding"
    lossless = False
    options = {
        "bits": Option(4, "index bits per weight (k = 2^bits shared values)", int, tuple(range(2, 9)), low=1, high=8),
        "init": Option("linear", "centroid initialisation", str, INITS),
        "weighted": Option(False, "weight the k-means by the calibration input energy diag(X^T X)", bool),
        "refit": Option(True, "re-fit the centroids by least squares on calibration data (needs data)", bool),
        "encoding": Option("snap", "snap: float weights; compact: packed indices + codebook decoded at load", str,
                           ("snap", "compact")),
        "short_names": Option(True, "compact: rename internal values and nodes to short names (inputs and outputs "
                                    "keep theirs)", bool),
        **calibration(samples=512, max_rows=16384,
                      ridge=(1e-2, "the re-fit's pull towards the unshared weights"),
                      min_weights=(192, "compact: the codebook and two decoder nodes cost more than few weights")),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        run = self.start(model, ctx)
        for node in model.graph.toposort():
            weight = select_weight(run, node)
            if weight is not None:
                share_layer(run, node, weight)
        encode(run)
        return report(run)

    def start(self, model: Model, ctx: PassContext) -> SharingRun:
        """The run's settings; the calibration samples and the reference model when the data is used."""
        needs_data = self.opt(ctx, "refit") or self.opt(ctx, "weighted")
        data: SampleData | None = None
        if needs_data and ctx.data is not None:
            data = ctx.data.head(min(self.opt(ctx, "samples"), ctx.data.n_samples))
        run = SharingRun(model, ctx, lambda key: self.opt(ctx, key), self.opt(ctx, "bits"), self.opt(ctx, "encoding"),
                         needs_data, data, model.clone() if data is not None else None, ctx.rng(self.name))
        if needs_data and data is None:
            run.notes.append("no calibration data: plain k-means, no re-fit or activation weighting")
        return run


@dataclass
class SharingRun:
    """What the steps of one run share: the model, the options, the data and what the layers produced."""

    model: Model
    ctx: PassContext
    opt: Callable[[str], Any]            # option key -> the user's value or the default
    bits: int
    encoding: str                        # snap | compact
    needs_data: bool                     # refit or weighted asked for calibration data
    data: SampleData | None              # the samples used (None: plain k-means)
    reference: Model | None              # the model before the pass: the re-fit's targets
    rng: np.random.Generator
    left: LeftAlone = field(default_factory=LeftAlone)
    records: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pending: list[tuple[Node, int, np.ndarray, np.ndarray, tuple[int, ...]]] = field(default_factory=list)
    renamed: dict[str, int] | None = None


def select_weight(run: SharingRun, node: Node) -> np.ndarray | None:
    """The layer weight of ``node`` to share, or ``None`` (refusals go to the ledger)."""
    if not is_op(node, *LAYER_OPS_WITH_TRANSPOSE) or len(node.inputs) < 2:
        return None
    graph = run.model.graph
    wv = node.inputs[1]
    weight = graph.constant_array(wv)
    reason = None
    if weight is None or weight.dtype.kind != "f":
        reason = "weight is not a constant float tensor"
    elif len(graph.consumers(wv)) > 1 or graph.is_graph_output(wv):
        reason = "weight read by several nodes"
    elif weight.size < run.opt("min_weights"):
        reason = "fewer weights than min_weights (too few to share well or to pay for a codebook)"
    elif run.encoding == "snap" and _distinct_nonzero(weight) <= (1 << run.bits) - int(bool((weight == 0).any())):
        reason = "already at most 2^bits distinct values"
    if reason is not None:
        run.left.add(reason, node.name)
        return None
    return weight


def _distinct_nonzero(weight: np.ndarray) -> int:
    return np.unique(weight[weight != 0]).size


def share_layer(run: SharingRun, node: Node, weight: np.ndarray) -> None:
    """k-means of one weight, the least-squares re-fit of its centroids, and the snapped weight in the graph."""
    run.ctx.say(f"weight_sharing: {node.name}")
    record: dict[str, Any] = {"node": node.name, "weights": int(weight.size), "bits": run.bits}
    layer, gram = _layer_statistics(run, node, record)
    centroids, labels, has_zero = share(weight, run.bits, init=run.opt("init"),
                                        importance=_importance(run, layer, gram), rng=run.rng)
    bias = None
    if gram is not None and layer.kind == "matmul" and run.encoding == "compact":
        record["no_refit"] = "MatMul in compact encoding (the LS bias would need an extra Add)"
    elif gram is not None and run.opt("refit") and centroids.size:
        centroids, bias = _refit(run, layer, gram, centroids, labels, record)
    book, idx = codebook_of(centroids, labels, has_zero, weight.dtype)
    snapped = book[idx]
    record["distinct"] = int(np.unique(snapped).size)
    if run.encoding == "compact":
        # snapped floats for now (the next layers' re-fit reads the model as shared so far);
        # the one shared decoder replaces them after the last layer
        run.pending.append((node, 1, book, idx, tuple(weight.shape)))
    _set_weight(run.model.graph, node, layer, snapped, bias, weight.dtype)
    run.records.append(record)


def _layer_statistics(run: SharingRun, node: Node,
                      record: dict[str, Any]) -> tuple[LinearLayer | str, CrossGram | None]:
    """The layer's least-squares view and its statistics (inputs as shared so far, targets from the reference)."""
    graph = run.model.graph
    layer = LinearLayer.of(graph, node) if run.data is not None else "no calibration data"
    if isinstance(layer, LinearLayer):
        gram = collect(run.model, {"l": layer}, run.data, reference=run.reference, targets={"l": layer.y.name},
                       max_rows=run.opt("max_rows"), seed=run.ctx.seed)["l"]
        return layer, gram
    if run.needs_data and run.data is not None:
        record["no_refit"] = layer
    return layer, None


def _importance(run: SharingRun, layer: LinearLayer | str, gram: CrossGram | None) -> np.ndarray | None:
    """``weighted``: each weight's k-means weight is the energy ``diag(XᵀX)`` of its input feature."""
    if not run.opt("weighted") or gram is None:
        return None
    energy = np.diagonal(gram.xtx)[:-1]                       # per input feature (row of W [F, O])
    return layer.weight_from_matrix(np.repeat(energy[:, None], layer.out_features, axis=1))


def _refit(run: SharingRun, layer: LinearLayer, gram: CrossGram, centroids: np.ndarray, labels: np.ndarray,
           record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """The centroids (and bias) re-fitted with the assignments fixed; kept only when the output error falls."""
    w_mat, b_vec = layer.weight_matrix().astype(np.float64), layer.bias_vector().astype(np.float64)
    h, r, _ = penalised(gram, w_mat, b_vec, run.opt("ridge"))
    lab_mat = _as_matrix(layer, labels)
    before = gram.relative_error(_snap(centroids, lab_mat), b_vec)
    fitted, fitted_bias = refit_centroids(h, r, lab_mat, centroids.size)
    used = np.bincount(labels[labels >= 0], minlength=centroids.size) > 0
    fitted = np.where(used, fitted, centroids)
    after = gram.relative_error(_snap(fitted, lab_mat), fitted_bias)
    record.update(rel_error_kmeans=round(before, 6), rel_error_refit=round(after, 6))
    return (fitted, fitted_bias) if after < before else (centroids, None)


def _set_weight(graph: Graph, node: Node, layer: LinearLayer | str, snapped: np.ndarray, bias: np.ndarray | None,
                dtype: np.dtype) -> None:
    if isinstance(layer, LinearLayer):
        layer.set_weights(graph, _as_matrix(layer, snapped), bias)
        return
    old = node.inputs[1]
    graph.set_input(node, 1, graph.add_initializer(snapped.astype(dtype), f"{node.name or node.op_type}_W"))
    drop_unused(graph, [old])


def encode(run: SharingRun) -> None:
    """``compact``: one decoder for every shared layer, then (``short_names``) short internal names."""
    if not run.pending:
        return
    for record, info in zip(run.records, add_shared_decoder(run.model.graph, run.pending, run.bits)):
        record.update(info)
    if not run.opt("short_names"):
        return
    renamed = shorten_names(run.model)
    if isinstance(renamed, str):
        run.notes.append(f"names kept: {renamed}")
    else:
        run.renamed = renamed


def report(run: SharingRun) -> PassResult:
    stats: dict[str, Any] = {"shared": len(run.records), "layers": run.records, "encoding": run.encoding,
                             "bits": run.bits}
    if run.renamed:
        stats["renamed"] = run.renamed
    run.left.into(stats)
    if run.notes:
        stats["notes"] = run.notes
    return PassResult(bool(run.records), stats)


def _as_matrix(layer: LinearLayer, stored: np.ndarray) -> np.ndarray:
    """A stored-layout array of the layer's weight shape as ``[F, O]`` (like ``weight_matrix``)."""
    if layer.kind == "conv":
        return stored.reshape(stored.shape[0], -1).T
    return stored.T if layer.trans_b else stored


def _snap(centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.where(labels >= 0, centroids[np.maximum(labels, 0)], 0.0)
