"""Channel permutations as one Gather, folded where they cost nothing (pass ``channel_permute``, lossless).

ShuffleNet's channel shuffle is ``Reshape(x, [N, g, C/g, *S]) → Transpose(0, 2, 1, ...) → Reshape(x, [N, C,
*S])``: a fixed permutation of ``x``'s channels. onnxruntime runs it as a 5-D Transpose between two layout
reorders, and with the Concat before it and the Split after it, it was a large, unprunable share of
the pruned ShuffleNet's time (onnxruntime's per-node profile, batch 64). The rules below rewrite it as a ``Gather`` along the
channel axis, then fold the Gather into what reads it. The Gather rules move whole elements and are
exact bit for bit; folding into a conv reorders the conv's sum (float noise).

``shuffle_to_gather``
    ``Reshape → Transpose → Reshape`` is ``Gather(x, idx, axis=1)`` when the first Reshape only splits
    axis 1 into factors ``f`` (its output is ``[?, f₁..f_k, *S]`` with ``Π f = C`` and the same static
    trailing dims ``S``), the Transpose only permutes those factor axes, and the last Reshape gives back
    ``[?, C, *S]``. ``idx = arange(C).reshape(f).transpose(p).reshape(-1)``: output channel ``q`` is input
    channel ``idx[q]`` (a Reshape reorders nothing in row-major order, so only the Transpose moves data).
    The leading dim may be symbolic: element counts are equal, so it is ``x``'s own. Needs ``C`` and
    ``S`` static (onnx shape inference); the middle values must have no other readers.
``slice_of_gather``
    ``Slice(Gather(x, idx, axis=a), s, e, axes=[a], steps=[t])`` is ``Gather(x, idx[s:e:t], axis=a)``
    (constant bounds; the slice may touch no other axis).
``split_of_gather``
    ``Split(Gather(x, idx, axis=a), axis=a)`` is one ``Gather(x, idx[segment])`` per output (constant sizes,
    or an even split).
``gather_of_gather``
    ``Gather(Gather(x, i, axis=a), j, axis=a)`` is ``Gather(x, i[j], axis=a)``.
``gather_into_conv``
    ``Conv(Gather(x, idx, axis=1), W)`` with ``group = 1``, a constant ``W`` and ``idx`` a permutation of
    ``0..C−1`` is ``Conv(x, W')`` with ``W'[:, idx[k]] = W[:, k]``: ``Σ_k W[o, k] x[idx[k]] = Σ_j W'[o, j] x[j]``.
    Grouped and depthwise convs are left alone (their groups tie input to output channels).
``gather_through_depthwise``
    ``DepthwiseConv(Gather(x, idx, axis=1))`` is ``Gather(DepthwiseConv'(x), idx)`` with the filters (and
    biases) permuted the other way, ``W'[idx[q]] = W[q]``: a depthwise conv works channel by channel, so
    the permutation commutes with it. Only for a full permutation that the conv alone reads, and only
    when a dense conv alone reads the depthwise output (as in ShuffleNet's downsampling unit): there
    ``gather_into_conv`` absorbs the moved Gather, elsewhere moving it would only move its cost.
``noop_gather``
    A Gather whose indices are ``0..n−1`` along an axis of static size ``n`` is its input.

Indices are constant 1-D int arrays; negative ones are normalised against the axis's static size, and
an index out of range refuses the rule (onnxruntime would reject it at run time; it is not ours to fix).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import helper

from graphopt.core.ir import Graph, Model, Node, Value
from graphopt.core.manager import PassContext, register
from graphopt.core.ops import const_input, conv_info, drop_unused, is_op, producer_op, remove_dead, sole_consumer
from graphopt.core.rewrite import Match, NoMatch, Rule, RulePass
from graphopt.core.shapes import ShapeView


def _remove(graph: Graph, nodes: list[Node]) -> None:
    """Remove ``nodes`` once nothing reads them, and the constants (shapes, indices) only they read."""
    constants = [v for n in nodes for v in n.inputs[1:]]
    remove_dead(graph, nodes)
    drop_unused(graph, constants)


class _Rule(Rule):
    def __init__(self, types: ShapeView) -> None:
        self.types = types

    def emit_gather(self, graph: Graph, out: Value, x: Value, axis: int, idx: np.ndarray, anchor: Node) -> None:
        """Make ``out`` computed as ``Gather(x, idx, axis)`` (its producer, if any, goes), or read ``x``
        directly when ``idx`` is the identity on ``x``'s axis."""
        size = self.axis_size(x, axis)
        if size is not None and np.array_equal(idx, np.arange(size)) and graph.can_replace(out, x):
            graph.replace_all_uses(out, x)
            return
        producer = graph.producer(out)
        if producer is not None:
            graph.remove_node(producer, keep_outputs=True)
        indices = graph.add_initializer(idx.astype(np.int64), f"{anchor.name or 'gather'}_idx")
        graph.add_node("Gather", [x, indices], [out], {"axis": axis}, name=f"{anchor.name or 'shuffle'}_gather",
                       anchor=anchor)

    def axis_size(self, value: Value, axis: int) -> int | None:
        dims = self.types.dims(value)
        if dims is None or not -len(dims) <= axis < len(dims):
            return None
        return dims[axis]

    def permutes_all(self, x: Value, axis: int, idx: np.ndarray) -> bool:
        """``idx`` lists every index of ``x``'s ``axis`` once (a permutation, not a selection)."""
        size = self.axis_size(x, axis)
        return size == len(idx) and np.array_equal(np.sort(idx), np.arange(size))

    def channel_gather_into_conv(self, graph: Graph, node: Node):
        """``(gather, x, idx, conv_info)`` when the Conv ``node`` reads a constant-index Gather of channels
        (axis 1), else the refusal."""
        gather = producer_op(graph, node.inputs[0], "Gather")
        found = self.gather(graph, gather)
        if isinstance(found, str):
            return found
        x, axis, idx = found
        if axis != 1:
            return NoMatch("not a gather of channels")
        info = conv_info(graph, node)
        if isinstance(info, str):
            return info
        return gather, x, idx, info

    def gather(self, graph: Graph, node: Node | None) -> tuple[Value, int, np.ndarray] | str:
        """``(x, axis, idx)`` of a Gather with constant 1-D in-range indices (axis normalised, idx ≥ 0)."""
        if node is None:
            return NoMatch("not a Gather")
        x = node.inputs[0]
        idx = const_input(graph, node, 1)
        if idx is None or idx.ndim != 1 or idx.dtype.kind not in "iu":
            return NoMatch("indices are not a constant 1-D int array")
        dims = self.types.dims(x)
        if dims is None:
            return "rank of the gathered input unknown"
        axis = int(node.attr("axis", 0))
        axis = axis + len(dims) if axis < 0 else axis
        size = dims[axis] if 0 <= axis < len(dims) else None
        if size is None:
            return "gathered axis is not static"
        idx = np.where(idx < 0, idx + size, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            return "index out of range"
        return x, axis, idx


def _channel_factors(dx: tuple | None, dsplit: tuple | None, dout: tuple | None) -> int | NoMatch:
    """How many factors the first Reshape splits axis 1 of ``x`` into (the others kept, static), when the
    last Reshape merges them back into ``x``'s shape; else why this is not a channel shuffle."""
    if dx is None or dsplit is None or dout is None or len(dx) < 2 or len(dout) != len(dx):
        return NoMatch("ranks unknown or the shuffle changes the rank")
    k = len(dsplit) - len(dx) + 1  # factors of axis 1
    spatial = dx[2:]
    if k < 2 or None in dx[1:] or tuple(dsplit[1 + k:]) != tuple(spatial) or None in dsplit[1:1 + k] \
            or tuple(dout[1:]) != tuple(dx[1:]) or int(np.prod(dsplit[1:1 + k])) != dx[1]:
        return NoMatch("the Reshapes do not split and merge axis 1 alone")
    return k


def _factor_perm(transpose: Node, rank: int, k: int) -> list[int] | NoMatch:
    """The Transpose's perm, when it permutes the ``k`` factors of axis 1 only."""
    perm = transpose.attr("perm")
    if perm is None or len(perm) != rank:
        return NoMatch("Transpose without a perm of the right rank")
    perm = [int(p) for p in perm]
    rest = [0, *range(1 + k, rank)]
    if [perm[i] for i in rest] != rest or sorted(perm[1:1 + k]) != list(range(1, 1 + k)):
        return NoMatch("the Transpose moves more than the factors of axis 1")
    return perm


class ShuffleToGather(_Rule):
    name = "shuffle_to_gather"
    root_ops = ("Reshape",)

    def match(self, graph: Graph, node: Node) -> Match | str | None:
        transpose = producer_op(graph, node.inputs[0], "Transpose")
        split = producer_op(graph, transpose.inputs[0], "Reshape") if transpose is not None else None
        if split is None:
            return NoMatch("not Reshape → Transpose → Reshape")
        x = split.inputs[0]
        dx, dsplit, dout = (self.types.dims(v) for v in (x, split.outputs[0], node.outputs[0]))
        k = _channel_factors(dx, dsplit, dout)
        if isinstance(k, str):
            return k
        perm = _factor_perm(transpose, len(dsplit), k)
        if isinstance(perm, str):
            return perm
        for v in (split.outputs[0], transpose.outputs[0]):
            if sole_consumer(graph, v) is None:
                return "an intermediate value has other readers"
        factors = [int(d) for d in dsplit[1:1 + k]]
        idx = np.arange(dx[1]).reshape(factors).transpose([p - 1 for p in perm[1:1 + k]]).reshape(-1)
        return _ShuffleMatch(node, x=x, axis=1, idx=idx, transpose=transpose, split=split)

    def rewrite(self, graph: Graph, match: _ShuffleMatch) -> None:
        node = match.node
        self.emit_gather(graph, node.outputs[0], match.x, match.axis, match.idx, node)
        _remove(graph, [node, match.transpose, match.split])


@dataclass(kw_only=True)
class _Regathered(Match):
    """The matched node's output is ``Gather(x, idx, axis)``."""

    x: Value
    axis: int
    idx: np.ndarray


@dataclass(kw_only=True)
class _ShuffleMatch(_Regathered):
    transpose: Node  # the shuffle's Transpose and first Reshape, removed with it
    split: Node


@dataclass(kw_only=True)
class _SplitRegathered(_Regathered):
    bounds: np.ndarray  # output i is Gather(x, idx[bounds[i]:bounds[i + 1]], axis)


class _Regather(_Rule):
    """A node reading a Gather becomes one Gather of the Gather's input."""

    def rewrite(self, graph: Graph, match: _Regathered) -> None:
        node = match.node
        gathered = graph.producer(node.inputs[0])
        self.emit_gather(graph, node.outputs[0], match.x, match.axis, match.idx, node)
        _remove(graph, [node, gathered])


class SliceOfGather(_Regather):
    name = "slice_of_gather"
    root_ops = ("Slice",)

    def match(self, graph: Graph, node: Node) -> Match | str | None:
        found = self.gather(graph, producer_op(graph, node.inputs[0], "Gather"))
        if isinstance(found, str):
            return found
        x, axis, idx = found
        if len(node.inputs) < 3:
            return NoMatch("Slice with attributes (opset < 10)")
        starts, ends = const_input(graph, node, 1), const_input(graph, node, 2)
        axes = const_input(graph, node, 3) if len(node.inputs) > 3 and node.inputs[3] is not None \
            else (None if starts is None else np.arange(len(starts)))
        steps = const_input(graph, node, 4) if len(node.inputs) > 4 and node.inputs[4] is not None \
            else (None if starts is None else np.ones(len(starts), dtype=np.int64))
        if any(a is None for a in (starts, ends, axes, steps)):
            return "slice bounds are not constant"
        rank = len(self.types.dims(x))
        axes = [int(a) + rank if a < 0 else int(a) for a in axes.reshape(-1)]
        if axes != [axis]:
            return NoMatch("the Slice reads other axes than the gathered one")
        start, end, step = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), int(steps.reshape(-1)[0])
        if step == 0:
            return "step 0"
        # Python slicing clamps exactly as ONNX Slice does (negative bounds count from the end).
        return _Regathered(node, x=x, axis=axis, idx=idx[start:end:step])


class SplitOfGather(_Rule):
    name = "split_of_gather"
    root_ops = ("Split",)

    def match(self, graph: Graph, node: Node) -> Match | str | None:
        found = self.gather(graph, producer_op(graph, node.inputs[0], "Gather"))
        if isinstance(found, str):
            return found
        x, axis, idx = found
        rank = len(self.types.dims(x))
        split_axis = int(node.attr("axis", 0))
        if (split_axis + rank if split_axis < 0 else split_axis) != axis:
            return NoMatch("the Split cuts another axis than the gathered one")
        if "split" in node.attrs:
            sizes = [int(v) for v in node.attr("split")]
        elif len(node.inputs) > 1 and node.inputs[1] is not None:
            given = const_input(graph, node, 1)
            if given is None:
                return "split sizes are not constant"
            sizes = [int(v) for v in given.reshape(-1)]
        else:
            n = len(node.outputs)
            if len(idx) % n:
                return "uneven split without sizes"
            sizes = [len(idx) // n] * n
        if sum(sizes) != len(idx) or len(sizes) != len(node.outputs):
            return "split sizes do not cover the gathered axis"
        bounds = np.cumsum([0, *sizes])
        return _SplitRegathered(node, x=x, axis=axis, idx=idx, bounds=bounds)

    def rewrite(self, graph: Graph, match: _SplitRegathered) -> None:
        node, idx, bounds = match.node, match.idx, match.bounds
        gather = graph.producer(node.inputs[0])
        outputs = list(node.outputs)
        graph.remove_node(node, keep_outputs=True)
        for out, start, end in zip(outputs, bounds[:-1], bounds[1:]):
            if out is not None:
                self.emit_gather(graph, out, match.x, match.axis, idx[start:end], node)
        _remove(graph, [node, gather])


class GatherOfGather(_Regather):
    name = "gather_of_gather"
    root_ops = ("Gather",)

    def match(self, graph: Graph, node: Node) -> Match | str | None:
        inner = producer_op(graph, node.inputs[0], "Gather")
        found_inner = self.gather(graph, inner)
        if isinstance(found_inner, str):
            return found_inner
        found = self.gather(graph, node)
        if isinstance(found, str):
            return found
        x, axis, i = found_inner
        _, outer_axis, j = found
        if outer_axis != axis:
            return NoMatch("gathers along different axes")
        return _Regathered(node, x=x, axis=axis, idx=i[j])


@dataclass(kw_only=True)
class _Bypassed(Match):
    x: Value  # what the matched node's output equals


class NoopGather(_Rule):
    name = "noop_gather"
    root_ops = ("Gather",)

    def match(self, graph: Graph, node: Node) -> Match | str | None:
        found = self.gather(graph, node)
        if isinstance(found, str):
            return found
        x, axis, idx = found
        if not np.array_equal(idx, np.arange(self.axis_size(x, axis))):
            return NoMatch("indices are not 0..n-1")
        if not graph.can_replace(node.outputs[0], x):
            return "would rename a model output"
        return _Bypassed(node, x=x)

    def rewrite(self, graph: Graph, match: _Bypassed) -> None:
        graph.replace_all_uses(match.node.outputs[0], match.x)
        _remove(graph, [match.node])


@dataclass(kw_only=True)
class _ConvGatherMatch(Match):
    """A Conv reading ``Gather(x, idx, axis=1)``, with its weight and bias (None when absent)."""

    gather: Node
    x: Value
    idx: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None = None


class GatherIntoConv(_Rule):
    name = "gather_into_conv"
    root_ops = ("Conv",)

    def match(self, graph: Graph, node: Node) -> Match | str | None:
        found = self.channel_gather_into_conv(graph, node)
        if isinstance(found, str):
            return found
        gather, x, idx, info = found
        if info.group != 1:
            return f"grouped conv (group={info.group})"
        if len(idx) != info.weight.shape[1] or not self.permutes_all(x, 1, idx):
            return "the gather is not a permutation of all of its input's channels"
        return _ConvGatherMatch(node, gather=gather, x=x, idx=idx, weight=info.weight)

    def rewrite(self, graph: Graph, match: _ConvGatherMatch) -> None:
        node, idx, w = match.node, match.idx, match.weight
        permuted = np.empty_like(w)
        permuted[:, idx] = w
        old = node.inputs[1]
        graph.set_input(node, 1, graph.add_initializer(permuted, f"{node.name or 'conv'}_W"))
        graph.set_input(node, 0, match.x)
        drop_unused(graph, [old])
        _remove(graph, [match.gather])


class GatherThroughDepthwise(_Rule):
    name = "gather_through_depthwise"
    root_ops = ("Conv",)

    def match(self, graph: Graph, node: Node) -> Match | str | None:
        found = self.channel_gather_into_conv(graph, node)
        if isinstance(found, str):
            return found
        gather, x, idx, info = found
        c = len(idx)
        if info.group == 1:
            return NoMatch("a dense conv (gather_into_conv's case)")
        if not (info.group == c == info.weight.shape[0] and info.weight.shape[1] == 1):
            return f"grouped conv that is not depthwise (group={info.group})"
        if not self.permutes_all(x, 1, idx):
            return "the gather is not a permutation of all of its input's channels"
        if sole_consumer(graph, gather.outputs[0]) is not node:
            return "the gather has other readers"
        after = sole_consumer(graph, node.outputs[0])
        after_info = conv_info(graph, after) if is_op(after, "Conv") else "not a conv"
        if isinstance(after_info, str) or after_info.group != 1:
            # Moving the Gather would only move its cost; a dense conv after the depthwise one absorbs it.
            return NoMatch("no dense conv after the depthwise conv to absorb the gather")
        return _ConvGatherMatch(node, gather=gather, x=x, idx=idx, weight=info.weight, bias=info.bias)

    def rewrite(self, graph: Graph, match: _ConvGatherMatch) -> None:
        node, idx = match.node, match.idx
        weight = np.empty_like(match.weight)
        weight[idx] = match.weight
        old = [v for v in node.inputs[1:] if v is not None]
        out = node.outputs[0]
        graph.remove_node(node, keep_outputs=True)
        base = node.name or "conv"
        inputs = [match.x, graph.add_initializer(weight, f"{base}_W")]
        if match.bias is not None:
            bias = np.empty_like(match.bias)
            bias[idx] = match.bias
            inputs.append(graph.add_initializer(bias, f"{base}_B"))
        attrs = {k: helper.get_attribute_value(a) for k, a in node.attrs.items()}
        # Same type and dims as the old output, recorded so that the next rule (folding the Gather) knows them.
        unpermuted = graph.new_value(f"{out.name}_unpermuted", self.types.dtype(out), self.types.dims(out))
        graph.add_node("Conv", inputs, [unpermuted], attrs, name=base, anchor=node)
        self.emit_gather(graph, out, unpermuted, 1, idx, node)
        drop_unused(graph, old)
        _remove(graph, [match.gather])


def rules(types: ShapeView) -> list[Rule]:
    return [cls(types) for cls in (ShuffleToGather, SliceOfGather, SplitOfGather, GatherOfGather, NoopGather,
                                   GatherIntoConv, GatherThroughDepthwise)]


@register
class ChannelPermute(RulePass):
    name = "channel_permute"
    summary = ("channel shuffles (Reshape-Transpose-Reshape) to one Gather, folded into Slices, Splits, Gathers "
               "and conv weights")

    def rules(self, model: Model, ctx: PassContext) -> list[Rule]:
        return rules(ShapeView(model))
