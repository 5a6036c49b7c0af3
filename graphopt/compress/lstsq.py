"""Streaming least squares for re-fitting linear layers from calibration data.

A Conv (2-D, ``group = 1``), a Gemm or a MatMul with a constant weight computes, at every output
position, ``y = x W + b``: ``x`` is a row of input features (the im2col patch of a conv, the last axis
of a Gemm/MatMul input), ``W`` is ``[F, O]``, ``b`` is ``[O]``. Re-fitting such a layer so that its
outputs match *target* outputs ``Y`` (often those of another model, e.g. the unpruned original, at
the same value) is the ridge problem

    min_{W, b}  ‖X W + 1 bᵀ − Y‖²  +  λ ‖W‖²,

whose normal equations need only ``XᵀX``, ``XᵀY``, ``Σx``, ``Σy`` and the row count — statistics that
stream over the data in bounded memory (:class:`CrossGram`). The bias is never penalised; with a bias
column, the LS bias absorbs the mean contribution of whatever inputs the fit does not use (e.g. pruned
channels), which is the "fold the mean into the bias" step of ThiNet / He et al. 2017.

Rows are subsampled (uniformly, seeded) so large feature maps cost a bounded number of rows per batch.

:class:`LinearLayer` maps a node to this view (rows of ``x``, rows of ``y``, ``W`` as a matrix) and
writes a solution back. It refuses, with a reason, what is not such a layer: grouped convs, ``auto_pad``
SAME, Gemm with ``transA`` or a non-vector ``C``, non-constant weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Mapping, Sequence

import numpy as np

from graphopt.measure.blas import for_work
from graphopt.core.ir import Graph, Model, Node, Value
from graphopt.core.ops import conv_info, drop_unused
from graphopt.measure.calibration import Calibrator, SampleData, batch_within

DEFAULT_RIDGE = 1e-6


class CrossGram:
    """Streaming ``XᵀX``, ``XᵀY``, ``Σx``, ``Σy``, ``Σy²`` (float64) over the *same* rows of ``X`` and ``Y``.

    Parameters
    ----------
    bias : fit an unpenalised intercept (a column of ones appended to ``X`` internally).

    Attributes
    ----------
    xtx : ``[F', F']`` with ``F' = F + 1`` when ``bias`` (the ones column last).
    xty : ``[F', O]``.
    y_sum, y_sq : per-output sums of ``y`` and ``y²``.
    count : rows seen.
    """

    #: Rows per float32 product when ``fast``: the float32 sums stay short (relative error about
    #: ``√1024·6·10⁻⁸ ≈ 2·10⁻⁶``, far below any ridge a solve adds), the totals accumulate in float64.
    FAST_BLOCK = 1024

    def __init__(self, bias: bool = True, *, fast: bool = False) -> None:
        self.bias = bias
        self.fast = fast   # float32 products in blocks of FAST_BLOCK rows (twice the speed of float64 ones)
        self.xtx: np.ndarray | None = None
        self.xty: np.ndarray | None = None
        self.y_sum: np.ndarray | None = None
        self.y_sq: np.ndarray | None = None
        self.count = 0
        self.compacted = False

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.compacted:
            raise ValueError("compact statistics are for solving: gather into float64 ones")
        dtype = np.float32 if self.fast else np.float64
        x = np.asarray(x, dtype=dtype)
        y = np.asarray(y, dtype=dtype)
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"need X [R, F] and Y [R, O] with the same rows, got {x.shape} and {y.shape}")
        if self.bias:
            x = np.concatenate([x, np.ones((x.shape[0], 1), dtype)], axis=1)
        if self.xtx is None:
            self.xtx = np.zeros((x.shape[1], x.shape[1]))
            self.xty = np.zeros((x.shape[1], y.shape[1]))
            self.y_sum = np.zeros(y.shape[1])
            self.y_sq = np.zeros(y.shape[1])
        elif x.shape[1] != self.xtx.shape[0] or y.shape[1] != self.xty.shape[1]:
            raise ValueError(f"batch shapes {x.shape}, {y.shape} differ from earlier batches")
        step = self.FAST_BLOCK if self.fast else max(x.shape[0], 1)
        with for_work(2.0 * x.shape[0] * x.shape[1] * (x.shape[1] + y.shape[1])):
            for i in range(0, x.shape[0], step):
                xb, yb = x[i:i + step], y[i:i + step]
                self.xtx += xb.T @ xb
                self.xty += xb.T @ yb
        y64 = y.astype(np.float64, copy=False)
        self.y_sum += y64.sum(axis=0)
        self.y_sq += np.einsum("ij,ij->j", y64, y64)
        self.count += x.shape[0]

    def merge(self, other: CrossGram) -> CrossGram:
        """The statistics of both row sets (e.g. a fitting split and its held-out split, refit on all)."""
        if self.bias != other.bias:
            raise ValueError("cannot merge statistics with and without a bias column")
        if other.xtx is None:
            return self._copy()
        if self.xtx is None:
            return other._copy()
        if self.xtx.shape != other.xtx.shape or self.xty.shape != other.xty.shape:
            raise ValueError(f"cannot merge statistics of shapes {self.xty.shape} and {other.xty.shape}")
        out = CrossGram(bias=self.bias)   # float64 even when one side is compact
        out.xtx = np.add(self.xtx, other.xtx, dtype=np.float64)
        out.xty = np.add(self.xty, other.xty, dtype=np.float64)
        out.y_sum, out.y_sq, out.count = self.y_sum + other.y_sum, self.y_sq + other.y_sq, self.count + other.count
        return out

    def split(self, sizes: Sequence[int]) -> list[CrossGram]:
        """The statistics of consecutive blocks of ``sizes`` outputs, as if each block had been gathered
        alone: layers reading the same input (attention's query, key and value) are gathered as one
        ``Y = [Y₁ Y₂ …]``, so ``XᵀX`` is computed once. The parts share this ``xtx`` (do not change it)."""
        self._require()
        if sum(sizes) != self.outputs:
            raise ValueError(f"blocks of {list(sizes)} outputs do not cover {self.outputs}")
        parts, start = [], 0
        for n in sizes:
            part = CrossGram(bias=self.bias)
            part.xtx, part.count, part.compacted = self.xtx, self.count, self.compacted
            part.xty = self.xty[:, start:start + n].copy()
            part.y_sum, part.y_sq = self.y_sum[start:start + n].copy(), self.y_sq[start:start + n].copy()
            parts.append(part)
            start += n
        return parts

    def compact(self) -> CrossGram:
        """Hold ``XᵀX`` and ``XᵀY`` in float32 from now on (half the memory; the sums were gathered in
        float64, and every solve and error casts back to float64): for statistics kept a long time and only
        solved, like prune's sensitivity re-fits (3073² per FFN consumer of BERT-base). A rounding of
        ``6·10⁻⁸`` relative per entry is far below the ridge every solve adds (``10⁻³`` of the diagonal).
        Returns ``self``; :meth:`update` refuses compact statistics (:meth:`merge` gives float64 ones)."""
        if self.xtx is not None:
            self.xtx, self.xty = self.xtx.astype(np.float32), self.xty.astype(np.float32)
        self.compacted = True
        return self

    def _copy(self) -> CrossGram:
        out = CrossGram(bias=self.bias)
        if self.xtx is not None:
            out.xtx, out.xty, out.y_sum, out.y_sq = (a.copy() for a in (self.xtx, self.xty, self.y_sum, self.y_sq))
        out.count = self.count
        return out

    # -----------------------------------------------------------------------------------------

    @property
    def features(self) -> int:
        """``F``: input features, not counting the bias column."""
        self._require()
        return self.xtx.shape[0] - int(self.bias)

    @property
    def outputs(self) -> int:
        self._require()
        return self.xty.shape[1]

    def _require(self) -> None:
        if self.xtx is None or self.count == 0:
            raise ValueError("no rows: the statistics were never updated")

    def _index(self, columns: Sequence[int] | np.ndarray | None) -> np.ndarray:
        f = self.features
        cols = np.arange(f) if columns is None else np.asarray(columns, dtype=np.int64).reshape(-1)
        if cols.size and (cols.min() < 0 or cols.max() >= f):
            raise ValueError(f"columns out of range for {f} features")
        return np.concatenate([cols, [f]]) if self.bias else cols

    def solve(self, ridge: float = DEFAULT_RIDGE,
              columns: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(W [len(columns), O], b [O])`` minimising ``‖X_c W + 1bᵀ − Y‖² + λ‖W‖²``.

        ``columns`` restricts the fit to those input features (default: all). ``λ = ridge ·
        mean(diag(X_cᵀX_c))`` so ``ridge`` is relative to the input energy; the bias is not penalised.
        ``b`` is zeros when the statistics were gathered without a bias column.
        """
        idx = self._index(columns)
        a = self.xtx[np.ix_(idx, idx)].astype(np.float64)     # a copy, in float64 even when compact
        rhs = self.xty[idx].astype(np.float64)
        n_w = len(idx) - int(self.bias)
        if n_w:
            diag = np.diagonal(a)[:n_w]
            lam = ridge * max(float(diag.mean()), 1e-12)
            a[np.arange(n_w), np.arange(n_w)] += lam
        try:
            with for_work(2 / 3 * a.shape[0] ** 3):
                sol = np.linalg.solve(a, rhs)
        except np.linalg.LinAlgError:  # singular even with the ridge (e.g. ridge=0, constant columns)
            sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
        if self.bias:
            return sol[:-1], sol[-1]
        return sol, np.zeros(rhs.shape[1])

    def sse(self, w: np.ndarray, b: np.ndarray | None = None,
            columns: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Per-output ``Σ (x_c w + b − y)²`` over the rows seen, from the statistics alone.

        ``‖Xθ − Y‖² = Σy² − 2 θᵀXᵀY + θᵀXᵀXθ`` per output column, ``θ = [w; b]``.
        """
        idx = self._index(columns)
        theta = np.asarray(w, dtype=np.float64)
        if self.bias:
            bias = np.zeros(theta.shape[1]) if b is None else np.asarray(b, dtype=np.float64).reshape(1, -1)
            theta = np.concatenate([theta, bias.reshape(1, -1)], axis=0)
        elif b is not None and np.any(b):
            raise ValueError("these statistics have no bias column")
        if columns is None:  # no copies of the full statistics (unless compact: the sums cancel, so float64)
            xty, xtx = self.xty, self.xtx
        else:
            xty, xtx = self.xty[idx], self.xtx[np.ix_(idx, idx)]
        xty, xtx = xty.astype(np.float64, copy=False), xtx.astype(np.float64, copy=False)
        value = self.y_sq - 2 * (theta * xty).sum(axis=0) + column_quadratic(xtx, theta)
        return np.maximum(value, 0.0)

    def target_ss(self) -> np.ndarray:
        """Per-output ``Σ (y − ȳ)²``: the error of predicting each output's mean."""
        self._require()
        return np.maximum(self.y_sq - self.y_sum ** 2 / self.count, 0.0)

    def relative_error(self, w: np.ndarray, b: np.ndarray | None = None,
                       columns: Sequence[int] | np.ndarray | None = None) -> float:
        """``sqrt(Σ sse / Σ target_ss)``: 0 is exact, 1 is no better than predicting the mean."""
        return float(np.sqrt(self.sse(w, b, columns).sum() / max(self.target_ss().sum(), 1e-30)))


def column_quadratic(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per column ``o``: ``w[:, o]ᵀ H w[:, o]``, as one BLAS product. (``einsum("fo,fg,go->o")`` runs a
    plain loop of F²·O multiply-adds outside BLAS, a large share of a profiled prune.)"""
    return ((h @ w) * w).sum(axis=0)


# =============================================================================================
# layers as  y = x W + b


@dataclass
class LinearLayer:
    """A Conv / Gemm / MatMul node seen as a row-wise product with a constant weight.

    Feature order of a conv row is ``(c, i, j)`` channel-major, matching ``W.reshape(O, -1)``.
    """

    node: Node
    kind: str                      # "conv", "gemm" or "matmul"
    x: Value
    y: Value
    weight: np.ndarray             # as stored in the graph
    bias: np.ndarray | None        # as stored (Conv B, Gemm C flattened); MatMul has none
    trans_b: bool = False
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads_begin: tuple[int, int] = (0, 0)
    pads_end: tuple[int, int] = (0, 0)

    @classmethod
    def of(cls, graph: Graph, node: Node) -> LinearLayer | str:
        """The layer view of ``node``, or why it is not one."""
        if node.domain not in ("", "ai.onnx"):
            return f"{node.op_type} of domain {node.domain!r}"
        if node.op_type == "Conv":
            return cls._conv(graph, node)
        if node.op_type == "Gemm":
            return cls._gemm(graph, node)
        if node.op_type == "MatMul":
            return cls._matmul(graph, node)
        return f"{node.op_type} is not a linear layer"

    @classmethod
    def _conv(cls, graph: Graph, node: Node) -> LinearLayer | str:
        info = conv_info(graph, node)
        if isinstance(info, str):
            return info
        if info.weight.ndim != 4:
            return f"{info.weight.ndim - 2}-D conv (only 2-D convs are fitted)"
        if info.group != 1:
            return f"grouped conv (group={info.group})"
        return cls(node, "conv", info.x, info.out, info.weight, info.bias, kernel=info.kernel,
                   strides=info.strides, dilations=info.dilations, pads_begin=info.pads_begin,
                   pads_end=info.pads_end)

    @classmethod
    def _gemm(cls, graph: Graph, node: Node) -> LinearLayer | str:
        if node.attr("transA", 0):
            return "Gemm with transA"
        if float(node.attr("alpha", 1.0)) != 1.0 or float(node.attr("beta", 1.0)) != 1.0:
            return "Gemm with alpha or beta != 1"
        w = graph.constant_array(node.inputs[1])
        if w is None or w.ndim != 2 or w.dtype.kind != "f":
            return "Gemm weight is not a constant float matrix"
        trans_b = bool(node.attr("transB", 0))
        out = w.shape[0] if trans_b else w.shape[1]
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = graph.constant_array(node.inputs[2])
            if bias is None:
                return "Gemm bias is not constant"
            if bias.size != out or (bias.ndim == 2 and bias.shape[0] != 1) or bias.ndim > 2:
                return f"Gemm bias of shape {bias.shape} is not per output"
            bias = bias.reshape(-1)
        return cls(node, "gemm", node.inputs[0], node.outputs[0], w, bias, trans_b=trans_b)

    @classmethod
    def _matmul(cls, graph: Graph, node: Node) -> LinearLayer | str:
        w = graph.constant_array(node.inputs[1])
        if w is None or w.ndim != 2 or w.dtype.kind != "f":
            return "MatMul weight is not a constant float matrix"
        shape = node.inputs[0].shape
        if shape is not None and len(shape) < 2:
            return "MatMul of a 1-D input"
        return cls(node, "matmul", node.inputs[0], node.outputs[0], w, None)

    # -----------------------------------------------------------------------------------------

    @property
    def out_features(self) -> int:
        if self.kind == "conv":
            return int(self.weight.shape[0])
        return int(self.weight.shape[0] if self.trans_b else self.weight.shape[1])

    @property
    def in_channels(self) -> int:
        """Channels (conv) or features (gemm/matmul) of the input."""
        if self.kind == "conv":
            return int(self.weight.shape[1])
        return int(self.weight.shape[1] if self.trans_b else self.weight.shape[0])

    @property
    def features(self) -> int:
        """``F``: features of one row."""
        return self.in_channels * self.kernel[0] * self.kernel[1]

    def _out_spatial(self, shape: Sequence[int]) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (n + pb + pe - d * (k - 1) - 1) // s + 1
            for n, pb, pe, d, k, s in zip(shape[2:], self.pads_begin, self.pads_end, self.dilations, self.kernel,
                                          self.strides))

    def positions(self, shape: Sequence[int]) -> int:
        """Rows one batch of input with ``shape`` yields."""
        if self.kind == "conv":
            oh, ow = self._out_spatial(shape)
            return int(shape[0]) * oh * ow
        return int(np.prod(shape[:-1]))

    def rows(self, x: np.ndarray, select: np.ndarray | None = None) -> np.ndarray:
        """``[R, F]`` input rows of one batch ``x``; ``select`` indexes the flattened output positions."""
        if self.kind != "conv":
            flat = x.reshape(-1, x.shape[-1])
            return flat if select is None else flat[select]
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        oh, ow = self._out_spatial(x.shape)
        (pbh, pbw), (peh, pew) = self.pads_begin, self.pads_end
        # Negative end pads crop; the window view below only reads the first (oh, ow) windows anyway.
        xp = np.pad(x, ((0, 0), (0, 0), (pbh, max(peh, 0)), (pbw, max(pew, 0))))
        span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        windows = np.lib.stride_tricks.sliding_window_view(xp, span, axis=(2, 3))
        windows = windows[:, :, ::sh, ::sw][:, :, :oh, :ow][..., ::dh, ::dw]  # [N, C, oh, ow, kh, kw]
        if select is None:
            select = np.arange(x.shape[0] * oh * ow)
        b, rest = np.divmod(select, oh * ow)
        i, j = np.divmod(rest, ow)
        return windows[b, :, i, j].reshape(len(select), -1)

    def target_rows(self, y: np.ndarray, select: np.ndarray | None = None) -> np.ndarray:
        """``[R, O]`` output rows of one batch ``y`` (of this layer's output shape)."""
        if self.kind == "conv":
            flat = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
        else:
            flat = y.reshape(-1, y.shape[-1])
        return flat if select is None else flat[select]

    def weight_matrix(self) -> np.ndarray:
        """``W`` as ``[F, O]``."""
        if self.kind == "conv":
            return self.weight.reshape(self.weight.shape[0], -1).T
        return self.weight.T if self.trans_b else self.weight

    def bias_vector(self) -> np.ndarray:
        return np.zeros(self.out_features, dtype=self.weight.dtype) if self.bias is None else self.bias

    def channel_columns(self, channels: Sequence[int] | np.ndarray) -> np.ndarray:
        """The row features that belong to input ``channels`` (all kernel taps of each, in order)."""
        ch = np.asarray(channels, dtype=np.int64).reshape(-1)
        taps = self.kernel[0] * self.kernel[1]
        return (ch[:, None] * taps + np.arange(taps)).reshape(-1)

    def weight_from_matrix(self, w: np.ndarray) -> np.ndarray:
        """The stored-layout weight for a ``[F', O]`` matrix (``F'`` may be fewer channels than now)."""
        return stored_weight(self.layout, w)

    @property
    def layout(self) -> tuple[str, tuple[int, int], bool]:
        """``(kind, kernel, trans_b)``: what :func:`stored_weight` needs (small and picklable)."""
        return self.kind, tuple(self.kernel), bool(self.trans_b)

    def set_weights(self, graph: Graph, w: np.ndarray, b: np.ndarray | None = None) -> None:
        """Write ``W [F', O]`` and ``b [O]`` into the graph as new initializers (never in place).

        The old weights are dropped when nothing else reads them. A MatMul has no bias input: a
        non-zero ``b`` adds an ``Add`` after it, the layer's output value keeping its name.
        """
        dtype = self.weight.dtype
        base = self.node.name or self.kind
        old = [v for v in self.node.inputs[1:] if v is not None]
        stored = self.weight_from_matrix(w).astype(dtype)
        weight = graph.add_initializer(stored, f"{base}_W")
        graph.set_input(self.node, 1, weight)
        if b is not None and self.kind in ("conv", "gemm"):
            graph.set_input(self.node, 2, graph.add_initializer(np.asarray(b).reshape(-1).astype(dtype), f"{base}_B"))
        elif b is not None and np.any(b):
            out, inputs = self.node.outputs[0], list(self.node.inputs)
            product = graph.new_value(f"{out.name}_nobias", out.dtype, out.shape)
            graph.remove_node(self.node, keep_outputs=True)
            node = graph.add_node("MatMul", inputs, [product], name=self.node.name, anchor=self.node)
            bias = graph.add_initializer(np.asarray(b).reshape(-1).astype(dtype), f"{base}_B")
            graph.add_node("Add", [product, bias], [out], name=f"{base}_bias", anchor=self.node)
            self.node = node
        drop_unused(graph, old)
        self.weight = stored
        if b is not None and self.kind != "matmul":
            self.bias = np.asarray(b).reshape(-1).astype(dtype)


# =============================================================================================
# gathering statistics


def stored_weight(layout: tuple[str, tuple[int, int], bool], w: np.ndarray) -> np.ndarray:
    """The weight as a layer of ``layout`` (:attr:`LinearLayer.layout`) stores it, for a ``[F, O]`` matrix:
    a conv's ``[O, F / taps, kh, kw]``, a Gemm's ``[O, F]`` with ``transB``, else ``[F, O]``."""
    kind, kernel, trans_b = layout
    w = np.asarray(w)
    if kind == "conv":
        taps = kernel[0] * kernel[1]
        if w.shape[0] % taps:
            raise ValueError(f"{w.shape[0]} rows are not whole channels of a {kernel} kernel")
        return np.ascontiguousarray(w.T.reshape(w.shape[1], w.shape[0] // taps, *kernel))
    return np.ascontiguousarray(w.T if trans_b else w)


def collect(model: Model, layers: Mapping[str, LinearLayer], data: SampleData, *,
            reference: Model | None = None, targets: Mapping[str, str] | None = None,
            target_batches: Sequence[Mapping[str, np.ndarray]] | None = None,
            max_rows: int = 8192, seed: int = 0, rng: np.random.Generator | None = None,
            batch_size: int = 64, bias: bool = True, threads: int | None = None) -> dict[str, CrossGram]:
    """Stream ``(X, Y)`` statistics for each layer over ``data``.

    Parameters
    ----------
    model : where the layers' inputs ``X`` are read (``layer.x``).
    layers : key -> layer of ``model``'s main graph.
    reference : where the targets ``Y`` are read (default ``model`` itself, e.g. the unpruned original).
    targets : key -> value name in ``reference`` holding the target output (default ``layer.y``'s name).
        The target must have the layer's output layout (``[N, O, H, W]`` for a conv).
    target_batches : the targets already computed, one ``{name: array}`` per batch of ``batch_size``
        samples (e.g. a reference run kept for several fits); then ``reference`` is not run.
    max_rows : rows kept per layer over the whole data (split evenly between batches, drawn uniformly
        without replacement within a batch; the same rows of ``X`` and ``Y``).
    seed, rng : the row sampling's generator (``rng``), or a new one seeded with ``seed``.

    Returns
    -------
    key -> :class:`CrossGram`.
    """
    reference = model if reference is None else reference
    targets = {key: (targets or {}).get(key, layer.y.name) for key, layer in layers.items()}
    grams = {key: CrossGram(bias=bias) for key in layers}
    if not layers:
        return grams
    rng = np.random.default_rng(seed) if rng is None else rng
    x_names = sorted({layer.x.name for layer in layers.values()})
    y_names = sorted(set(targets.values()))
    if target_batches is None:
        # One run holds every layer's X and Y for a batch: fewer samples per run for a large model.
        batch_size = (batch_within(model, set(x_names) | set(y_names), data, batch_size) if reference is model
                      else min(batch_within(model, x_names, data, batch_size),
                               batch_within(reference, y_names, data, batch_size)))
    per_batch = max(1, ceil(max_rows / max(1, ceil(data.n_samples / batch_size))))
    if target_batches is not None:
        batches = zip(Calibrator(model, data, batch_size, threads=threads).run(x_names), target_batches)
    elif reference is model:
        batches = ((batch, batch) for batch in Calibrator(model, data, batch_size, threads=threads).run(
            sorted(set(x_names) | set(y_names))))
    else:
        batches = zip(Calibrator(model, data, batch_size, threads=threads).run(x_names),
                      Calibrator(reference, data, batch_size, threads=threads).run(y_names))
    for xb, yb in batches:
        for key, layer in layers.items():
            x = xb[layer.x.name]
            positions = layer.positions(x.shape)
            select = None
            if positions > per_batch:
                select = np.sort(rng.choice(positions, size=per_batch, replace=False))
            grams[key].update(layer.rows(x, select), layer.target_rows(yb[targets[key]], select))
    return grams


def penalised(gram: CrossGram, w0: np.ndarray, b0: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray, float]:
    """``(H_λ, R, λ)``: the normal equations of a fit pulled towards ``w0``.

    ``H_λ = XᵀX + λ·I_F`` and ``R = XᵀY + λ·[w0; 0]`` (bias row/column last, not penalised), with
    ``λ = ridge · mean(diag(XᵀX)[:F])``: minimising ``‖Y − Xw‖² + λ‖w − w0‖²`` keeps a re-fit near the
    weights it replaces (sparsify's kept weights, weight sharing's centroids)."""
    h = gram.xtx.astype(np.float64)
    f = h.shape[0] - 1
    lam = ridge * max(float(np.diagonal(h)[:f].mean()), 1e-12)
    h[np.arange(f), np.arange(f)] += lam
    r = gram.xty.astype(np.float64)
    r[:f] += lam * np.asarray(w0, dtype=np.float64)
    return h, r, lam
