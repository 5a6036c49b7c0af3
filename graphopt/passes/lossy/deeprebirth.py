"""The approximate DeepRebirth step (LOSSY): a conv and the non-tensor layers after it become one slim conv.

What it replaces
----------------
A *block* is a 2-D ``Conv`` (constant weights, groups = 1) followed by a chain of non-tensor layers it cannot
absorb exactly: at most one ``MaxPool``/``AveragePool`` (dilation 1), at most one ``LRN``, at most one
``Relu``, in any order, each the only reader of the previous result. The chain must hold a pool or an LRN.
The block becomes ``Conv'`` (followed by ``Relu`` when the chain had one).

Geometry of ``Conv'`` (per spatial axis)
----------------------------------------
With the conv's kernel ``k``, stride ``s``, dilation ``d``, begin pad ``p`` and the pool's kernel ``k_p``,
stride ``s_p`` and begin pad ``p_p`` (``k_p = s_p = 1``, ``p_p = 0`` without a pool), pool output ``o`` depends
on the inputs ``(o·s_p − p_p)·s − p + t`` for ``t = 0 .. (k_p − 1)·s + d·(k − 1)``. Hence::

    K' = (k_p − 1)·s + d·(k − 1) + 1,   S' = s_p·s,   P'_b = p_p·s + p

and ``P'_e`` is the smallest end pad that gives the block's output size (the pool's ceil mode included).
A 3x3 conv + 2x2/2 max pool becomes one 4x4 stride-2 conv: 16/4 = 4 MACs per input pixel instead of 9.

The fit
-------
``W'`` and ``b'`` minimise ``‖X W' + 1b'ᵀ − Y‖² + λ‖W'‖²`` where the rows of ``X`` are the ``K'×K'`` patches
of the block input on calibration data (``ctx.data``) and ``Y`` the block output of the *original* model, so
a block also compensates the error of blocks replaced before it. ``XᵀX`` and ``XᵀY`` are streamed batch
by batch in float64 over the same rows (:class:`graphopt.compress.lstsq.CrossGram`, ``λ`` relative to the mean
input energy, the bias unpenalised). When the chain has a ``Relu`` the block
output is ``≥ 0`` and ``Relu(XW')`` is kept: ``|relu(a) − y| ≤ |a − y|`` for ``y ≥ 0``, so the Relu never
increases the error of the linear fit.

The budget
----------
Each candidate is fitted, then applied to a *trial copy* of the model and measured against the model as it
was when the pass started, on calibration samples the fit did not see (option ``holdout``: measured on the
fitting samples the drop is optimistic): the block output's relative RMS error, and the whole model's accuracy with
:func:`graphopt.measure.verify.verify` in accuracy mode (the accuracy drop with labels, else the top-1 disagreement
in percentage points). The merge is kept only when the block error is at most ``max_block_error``, the
drop caused by this merge is at most ``max_drop_per_merge`` and the total drop at most ``ctx.max_drop``
(the option ``max_drop`` when the run has none); otherwise it is rolled back (never applied to the model).
A zero budget therefore keeps only merges that lose nothing on the data. Every measured candidate, kept
or not, is listed in the stats with its numbers.

Refused (with the reason in the stats): no calibration data; weights not constant; groups > 1; ``auto_pad``
``SAME_*``; a pool with dilations or a second (indices) output in use; unknown spatial sizes; a least-squares
system larger than ``max_features``; no cost gain (:mod:`graphopt.measure.cost`); an output size the new geometry
cannot reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod
from typing import Any

import numpy as np
from onnx import helper

from graphopt.compress.lstsq import CrossGram
from graphopt.compress.options import calibration, guard
from graphopt.core.ir import Graph, Model, Node, Value
from graphopt.core.ledger import LeftAlone
from graphopt.core.manager import Option, Pass, PassContext, PassResult, register
from graphopt.core.onnx_io import from_proto, to_proto
from graphopt.core.ops import ConvInfo, conv_info, drop_unused, is_op, remove_dead, sole_consumer
from graphopt.core.shapes import ShapeView
from graphopt.measure import cost as costs
from graphopt.measure.calibration import Calibrator, SampleData
from graphopt.measure.cost import Cost
from graphopt.measure.verify import Tolerance, verify

POOLS = ("MaxPool", "AveragePool")
CHAIN_OPS = POOLS + ("LRN", "Relu")


# =============================================================================================
# blocks


@dataclass
class Block:
    """A conv and its chain, with the geometry of the conv that replaces them."""

    conv: Node
    chain: list[Node]
    x: Value
    y: Value
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads_begin: tuple[int, int]
    pads_end: tuple[int, int]
    out_spatial: tuple[int, int]
    cin: int
    cout: int
    relu: bool
    y_dims: tuple | None = None

    @property
    def features(self) -> int:
        return self.cin * prod(self.kernel) + 1

    def describe(self) -> str:
        return " -> ".join([self.conv.name or "Conv"] + [n.op_type for n in self.chain])

    def nodes(self) -> list[Node]:
        return [self.conv, *self.chain]


def _chain(graph: Graph, conv: Node) -> list[Node]:
    """The longest chain of pool / LRN / Relu (each at most once) hanging off ``conv`` as sole readers."""
    chain: list[Node] = []
    seen: set[str] = set()
    value = conv.outputs[0]
    while True:
        nxt = sole_consumer(graph, value)
        if not is_op(nxt, *CHAIN_OPS) or nxt.inputs[0] is not value:
            break
        kind = "pool" if nxt.op_type in POOLS else nxt.op_type
        if kind in seen:
            break
        if len(nxt.outputs) > 1 and any(v is not None and (graph.uses(v) or graph.is_graph_output(v))
                                        for v in nxt.outputs[1:]):
            break  # MaxPool's indices are read
        seen.add(kind)
        chain.append(nxt)
        value = nxt.outputs[0]
    while chain and chain[-1].op_type == "Relu" and not any(n.op_type != "Relu" for n in chain):
        chain.pop()
    return chain


def find_block(graph: Graph, conv: Node, shapes: ShapeView) -> Block | str | None:
    """The block starting at ``conv``; ``None`` when no non-tensor layer follows it, a reason when refused."""
    if not is_op(conv, "Conv"):
        return None
    chain = _chain(graph, conv)
    if not any(n.op_type != "Relu" for n in chain):
        return None
    info = conv_info(graph, conv)
    if isinstance(info, str):
        return info
    if info.weight.ndim != 4:
        return "only 2-D convs"
    if info.group != 1:
        return "groups > 1"
    pool = next((n for n in reversed(chain) if n.op_type in POOLS), None)
    refused = _pool_refusal(pool)
    if refused:
        return refused
    kernel, stride, begin = _merged_geometry(info, pool)
    x_dims = shapes.concrete(info.x)
    y = chain[-1].outputs[0]
    y_dims = shapes.concrete(y)
    if x_dims is None or y_dims is None:
        return "spatial size unknown"
    end = _end_pads(x_dims[2:], y_dims[2:], kernel, stride, begin)
    if end is None:
        return "the output size cannot be reproduced by one strided conv"
    return Block(conv, chain, info.x, y, kernel, stride, begin, end,
                 (y_dims[2], y_dims[3]), info.cin, info.cout, any(n.op_type == "Relu" for n in chain),
                 shapes.shape(y))


def _pool_refusal(pool: Node | None) -> str | None:
    """Why the pool of a chain cannot be merged (``auto_pad=SAME_*``, dilations), or ``None``."""
    if pool is None:
        return None
    auto_pad = pool.attr("auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", "VALID"):
        return f"{pool.op_type} with auto_pad SAME_*"
    if any(v != 1 for v in pool.attr("dilations", [1, 1])):
        return f"{pool.op_type} with dilations"
    return None


def _merged_geometry(info: ConvInfo, pool: Node | None) -> tuple[tuple[int, ...], ...]:
    """``(K', S', P'_b)`` per spatial axis (module docstring): ``K' = (k_p − 1)·s + d·(k − 1) + 1``,
    ``S' = s_p·s``, ``P'_b = p_p·s + p``."""
    kernel, stride, begin = [], [], []
    for axis in range(2):
        k, s, d, p = info.kernel[axis], info.strides[axis], info.dilations[axis], info.pads_begin[axis]
        kp, sp, pp = 1, 1, 0
        if pool is not None:
            kp = pool.attr("kernel_shape")[axis]
            sp = pool.attr("strides", [1, 1])[axis]
            pp = pool.attr("pads", [0, 0, 0, 0])[axis]
        kernel.append((kp - 1) * s + d * (k - 1) + 1)
        stride.append(sp * s)
        begin.append(pp * s + p)
    return tuple(kernel), tuple(stride), tuple(begin)


def _end_pads(x_spatial: tuple[int, ...], y_spatial: tuple[int, ...], kernel: tuple[int, ...],
              stride: tuple[int, ...], begin: tuple[int, ...]) -> tuple[int, ...] | None:
    """The smallest end pad per axis that gives the block's output size, or ``None`` when none does."""
    end = []
    for axis in range(2):
        n, target = x_spatial[axis], y_spatial[axis]
        found = next((pe for pe in range(0, kernel[axis] + stride[axis])
                      if (n + begin[axis] + pe - kernel[axis]) // stride[axis] + 1 == target), None)
        if found is None:
            return None
        end.append(found)
    return tuple(end)


def block_costs(graph: Graph, block: Block, shapes: ShapeView) -> tuple[Cost, Cost]:
    """(before, after) in the cost model's units, at batch 1."""
    info = conv_info(graph, block.conv)
    x_dims = shapes.concrete(block.x)
    c_dims = shapes.concrete(block.conv.outputs[0])
    before = costs.conv_cost(x_dims[0], info.cin, info.cout, info.kernel, c_dims[2:], x_dims[2:], 1)
    for node in block.chain:
        dims_in = shapes.concrete(node.inputs[0]) or c_dims
        dims_out = shapes.concrete(node.outputs[0]) or dims_in
        n_in, n_out = prod(dims_in), prod(dims_out)
        if node.op_type in POOLS:
            window = prod(node.attr("kernel_shape"))
            before = before + Cost(n_out * window, n_in + n_out, 1)
        elif node.op_type == "LRN":
            before = before + Cost(n_in * node.attr("size", 1), n_in + n_out, 1)
        else:
            before = before + costs.elementwise_cost(n_in)
    after = costs.conv_cost(x_dims[0], block.cin, block.cout, block.kernel, block.out_spatial, x_dims[2:], 1)
    if block.relu:
        after = after + costs.elementwise_cost(x_dims[0] * block.cout * prod(block.out_spatial))
    return before, after


# =============================================================================================
# least squares


def patch_rows(x: np.ndarray, block: Block, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The ``[R, Cin·K'h·K'w]`` patch matrix of ``x`` (a batch), for the output positions ``rows``.

    ``rows`` indexes the flattened ``(n, oh, ow)`` grid (``None``: every position); returns ``(X, rows)``.
    """
    (kh, kw), (sh, sw) = block.kernel, block.strides
    (pbh, pbw), (peh, pew) = block.pads_begin, block.pads_end
    oh, ow = block.out_spatial
    xp = np.pad(x, ((0, 0), (0, 0), (pbh, max(peh, 0)), (pbw, max(pew, 0))))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :oh, :ow]
    n = x.shape[0]
    if rows is None:
        rows = np.arange(n * oh * ow)
    b, rest = np.divmod(rows, oh * ow)
    i, j = np.divmod(rest, ow)
    patches = windows[b, :, i, j].reshape(len(rows), -1)  # [R, C, kh, kw] -> [R, C·kh·kw]
    return patches, rows


def target_rows(y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    n, c, oh, ow = y.shape
    flat = y.transpose(0, 2, 3, 1).reshape(n * oh * ow, c)
    return flat[rows]


def fit_block(model: Model, reference: Model, block: Block, data: SampleData, rng: np.random.Generator,
              max_rows: int, ridge: float, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares ``(W', b')``: inputs from ``model``, targets from ``reference`` (same batches)."""
    gram = CrossGram()
    inputs = Calibrator(model, data, batch_size).run([block.x.name])
    targets = Calibrator(reference, data, batch_size).run([block.y.name])
    for xb, yb in zip(inputs, targets):
        x, y = xb[block.x.name], yb[block.y.name]
        positions = x.shape[0] * prod(block.out_spatial)
        rows = None
        if positions > max_rows:
            rows = np.sort(rng.choice(positions, size=max_rows, replace=False))
        X, rows = patch_rows(x, block, rows)
        gram.update(X, target_rows(y, rows))
    w, b = gram.solve(ridge)
    kh, kw = block.kernel
    return w.T.reshape(block.cout, block.cin, kh, kw), b


def replace_block(graph: Graph, block: Block, weight: np.ndarray, bias: np.ndarray) -> Node:
    """Put ``Conv'`` (+ ``Relu``) in place of the block; the block's output value keeps its name and readers."""
    dtype = conv_info(graph, block.conv).weight.dtype
    name = f"{block.conv.name or 'conv'}_rebirth"
    old_weights = [v for n in block.nodes() for v in n.inputs[1:]]
    graph.remove_node(block.chain[-1], keep_outputs=True)
    w = graph.add_initializer(weight.astype(dtype), f"{name}_W")
    b = graph.add_initializer(bias.astype(dtype), f"{name}_B")
    attrs = {"kernel_shape": list(block.kernel), "pads": list(block.pads_begin) + list(block.pads_end),
             "strides": list(block.strides)}
    conv = graph.add_node("Conv", [block.x, w, b], [f"{name}_out" if block.relu else block.y], attrs, name=name,
                          anchor=block.conv)
    if block.relu:
        if block.y_dims is not None:
            conv.outputs[0].set_tensor_type(helper.np_dtype_to_tensor_dtype(dtype), list(block.y_dims))
        graph.add_node("Relu", [conv.outputs[0]], [block.y], name=f"{name}_relu", anchor=block.conv)
    remove_dead(graph, block.nodes()[:-1])
    drop_unused(graph, old_weights)
    return conv


# =============================================================================================
# measuring


def block_error(trial: Model, reference: Model, name: str, data: SampleData, batch_size: int) -> dict[str, float]:
    """Relative RMS error ``‖y' − y‖ / ‖y‖`` and max error over the range of the reference block output."""
    se = ss = 0.0
    worst, lo, hi = 0.0, np.inf, -np.inf
    streams = (Calibrator(trial, data, batch_size).run([name]), Calibrator(reference, data, batch_size).run([name]))
    for a, b in zip(*streams):
        ya, yb = a[name].astype(np.float64), b[name].astype(np.float64)
        se += float(((ya - yb) ** 2).sum())
        ss += float((yb ** 2).sum())
        worst = max(worst, float(np.abs(ya - yb).max()))
        lo, hi = min(lo, float(yb.min())), max(hi, float(yb.max()))
    rng = hi - lo if hi > lo else max(abs(hi), 1.0)
    return {"rel_rms_error": float(np.sqrt(se / ss)) if ss > 0 else float(np.sqrt(se)),
            "max_rel_error": worst / rng}


def model_drop(reference: Any, candidate: Any, data: SampleData, batch_size: int) -> dict[str, Any]:
    """Accuracy of ``candidate`` against ``reference`` (with labels), else top-1 disagreement, in points."""
    report = verify(reference, candidate, data, mode="accuracy", tolerance=Tolerance(max_drop=100.0),
                    batch_size=batch_size)
    out: dict[str, Any] = {"top1_agreement": report.top1_agreement}
    if report.accuracy_drop is not None:
        out.update(accuracy_reference=report.accuracy_reference, accuracy=report.accuracy_candidate,
                   drop=report.accuracy_drop)
    elif report.top1_agreement is not None:
        out["drop"] = 100.0 * (1.0 - report.top1_agreement)  # disagreement stands in for accuracy
    else:
        worst = min((m.cosine_min for m in report.metrics.values() if m.cosine_min is not None), default=None)
        out["cosine_min"] = worst
        out["drop"] = 0.0 if worst is not None and worst >= 0.99 else float("inf")
    if report.reasons and not report.passed and report.accuracy_drop is None and report.top1_agreement is None:
        out["drop"] = float("inf")
        out["problem"] = report.reasons[0]
    return out


# =============================================================================================
# the pass


@register
class DeepRebirthApprox(Pass):
    name = "deeprebirth_approx"
    summary = "LOSSY: conv + pool/LRN/Relu blocks -> one strided conv fitted by least squares (DeepRebirth)"
    lossless = False
    renamed = {"max_rows": "batch_rows"}  # it counts rows per calibration batch, not per layer
    options = {
        **guard(max_drop=(1.0, "the total drop of all merges")),
        "max_drop_per_merge": Option(0.5, "accuracy drop (points) one merge may cost", float, low=0),
        "max_block_error": Option(0.5, "largest relative RMS error of a replaced block's output", float, low=0),
        "max_features": Option(4096, "largest least-squares system (Cin * K'h * K'w + 1 unknowns per output)", int,
                               low=1),
        "batch_rows": Option(4096, "patch rows sampled per calibration batch", int, low=1),
        **calibration(samples=(512, "to fit and to measure"), holdout=0.5,
                      ridge=1e-6),
    }

    @staticmethod
    def _next_block(graph: Graph, shapes: ShapeView, tried: set[int], left: LeftAlone,
                    max_features: int) -> tuple[Block, Cost, Cost] | None:
        """The first untried block (topological order) worth fitting; refusals go to ``left``."""
        for node in graph.toposort():
            if id(node) in tried or not is_op(node, "Conv"):
                continue
            found = find_block(graph, node, shapes)
            if found is None:
                continue
            tried.add(id(node))
            if isinstance(found, str):
                left.add(found, node.name)
                continue
            before, after = block_costs(graph, found, shapes)
            if not costs.cheaper(after, before):
                left.add("the slim conv does not pay (cost model)", node.name)
                continue
            if found.features > max_features:
                left.add(f"least-squares system of {found.features} unknowns exceeds max_features", node.name)
                continue
            return found, before, after
        return None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if ctx.data is None:
            return PassResult(False, {"replaced": 0, "skipped": "no calibration data (the fit needs ctx.data)"})
        budget = ctx.max_drop if ctx.max_drop is not None else self.opt(ctx, "max_drop")
        per_merge = self.opt(ctx, "max_drop_per_merge")
        max_err = self.opt(ctx, "max_block_error")
        data = ctx.data.head(min(self.opt(ctx, "samples"), ctx.data.n_samples))
        fit_data, eval_data = data.split(int(round(data.n_samples * min(max(self.opt(ctx, "holdout"), 0.0), 1.0))))
        if eval_data is None:  # too few samples to hold any out: fit and measure on the same ones
            eval_data = data
        rng = ctx.rng(self.name)
        batch = 64
        reference_proto = to_proto(model)
        reference = from_proto(reference_proto)
        graph = model.graph
        shapes = ShapeView(model)
        merges: list[dict[str, Any]] = []
        left = LeftAlone()
        tried: set[int] = set()
        current_drop = 0.0
        while True:
            found = self._next_block(graph, shapes, tried, left, self.opt(ctx, "max_features"))
            if found is None:
                break
            block, before, after = found
            ctx.say(f"deeprebirth_approx: fitting {block.describe()}")
            weight, bias = fit_block(model, reference, block, fit_data, rng, self.opt(ctx, "batch_rows"),
                                     self.opt(ctx, "ridge"), batch)
            # Trial on a copy: a merge that breaks the budget is never applied to the model.
            trial = model.clone()
            replace_block(trial.graph, transfer(block, graph, trial.graph), weight, bias)
            err = block_error(trial, reference, block.y.name, eval_data, batch)
            measured = model_drop(reference_proto, trial, eval_data, batch)
            drop = measured["drop"]
            record: dict[str, Any] = {
                "block": block.describe(), "nodes": [n.name for n in block.nodes()],
                "kernel": list(block.kernel), "strides": list(block.strides),
                "pads": list(block.pads_begin) + list(block.pads_end), "unknowns": block.features,
                "macs_before": before.macs, "macs_after": after.macs,
                **{k: _round(v) for k, v in err.items()},
                **{k: _round(v) for k, v in measured.items()},
                "drop_this_merge": _round(drop - current_drop),
            }
            reasons = _over_budget(err["rel_rms_error"], drop, current_drop, max_err, per_merge, budget)
            record["accepted"] = not reasons
            if reasons:
                record["rolled_back"] = "; ".join(reasons)
            else:
                replace_block(graph, block, weight, bias)
                current_drop = drop
                shapes = ShapeView(model)
            merges.append(record)
        replaced = sum(1 for m in merges if m["accepted"])
        stats: dict[str, Any] = {"replaced": replaced, "merges": merges, "budget": {
            "max_drop": budget, "max_drop_per_merge": per_merge, "max_block_error": max_err},
            "fit_samples": fit_data.n_samples, "measure_samples": eval_data.n_samples,
            "total_drop": _round(current_drop)}
        left.into(stats)
        return PassResult(replaced > 0, stats)


def _over_budget(block_err: float, drop: float, drop_before: float, max_err: float, per_merge: float,
                 budget: float) -> list[str]:
    """Why a merge is rolled back: its block error, its own drop or the total drop over the budget."""
    reasons = []
    if block_err > max_err:
        reasons.append(f"block error {block_err:.3g} > max_block_error {max_err}")
    if drop - drop_before > per_merge:
        reasons.append(f"this merge costs {drop - drop_before:.3g} points > max_drop_per_merge {per_merge}")
    if drop > budget:
        reasons.append(f"total drop {drop:.3g} points > budget {budget}")
    return reasons


def transfer(block: Block, graph: Graph, other: Graph) -> Block:
    """``block`` in ``other``, a copy of ``graph`` made by an export round trip (same topological order)."""
    index = {n: i for i, n in enumerate(graph.toposort())}
    nodes = other.toposort()
    conv = nodes[index[block.conv]]
    chain = [nodes[index[n]] for n in block.chain]
    return replace(block, conv=conv, chain=chain, x=conv.inputs[0], y=chain[-1].outputs[0])


def _round(v: Any) -> Any:
    """Six significant digits for the report; a non-finite number (nothing measurable) becomes ``None``."""
    if isinstance(v, float):
        return float(f"{v:.6g}") if np.isfinite(v) else None
    return v
