"""DeepRebirth *branch slimming*: parallel layers that read the same tensor become one layer (lossless).

Four passes, each a set of :mod:`graphopt.core.rewrite` rules; every merge is decided by the cost model
(:mod:`graphopt.measure.cost`, batch 1, dynamic dims taken as 1) and its refusals are counted in the stats.

Kernel alignment (shared by all three)
--------------------------------------
Along one spatial axis a conv with kernel ``k``, pads ``(p_b, p_e)``, dilation ``d`` and stride ``s`` computes
output ``o`` from the inputs ``o·s − p_b + d·j``, ``j = 0..k−1``. Zero-padding its kernel to ``K`` taps, with
``a`` zero taps in front and ``c = K − k − a`` behind, and padding the input by ``P_b = p_b + d·a``,
``P_e = p_e + d·c`` computes the same outputs: tap ``j + a`` reads ``o·s − P_b + d·(j + a) = o·s − p_b + d·j``,
and the output size ``⌊(L + P_b + P_e − d(K−1) − 1)/s⌋ + 1`` is unchanged. So convs with equal strides,
dilations and groups align when their begin pads are equal modulo ``d`` and their output grids agree: the
same *excess* ``e = p_b + p_e − d(k−1)``, or (strides > 1 floor the difference away) the same output size for
the known input size. The smallest common geometry is ``P_b = max p_b``, ``a_i = (P_b − p_b_i)/d``,
``K = max(a_i + k_i)``, ``P_e = max(p_e_i + d·c_i)``. A 1x1 with pad 0 and a 3x3 with pad 1 align
(``a = c = 1``: centred); two dilation-2 3x3 convs with begin pads 2 and 1 sample interleaved pixels and are
refused as misaligned.

``merge_concat_convs``
    ``Concat(conv_1(x), …, conv_n(x), axis=channel) = conv(x)`` with ``W = [W_1; …; W_n]`` (each zero-padded
    to the common kernel) stacked on the output-channel axis and ``b = [b_1; …; b_n]`` (a missing bias is
    zeros). A pointwise activation between each conv and the Concat (the same op with the same attributes
    for all) commutes with the channel concatenation and is kept once, after the merged conv. Only
    *adjacent* Concat inputs merge, so the channel order never changes; the Concat disappears when one
    merged conv produces all its inputs, else the merged conv feeds it at the position of the first one.
    Within a run of adjacent mergeable inputs the partition into merged segments is chosen by dynamic
    programming on the cost model: zero-padding a 1x1 to 5x5 multiplies its MACs by 25, so often only
    same-kernel neighbours merge, or nothing does.
    Refused: a conv output with a second reader (use ``horizontal_fusion``), groups > 1 (the merged
    conv's output channels of group ``g`` must read input group ``g``, which the stacked order breaks),
    misaligned pads, non-constant weights, ``auto_pad=SAME_*``, a non-channel concat axis, or no gain.

``horizontal_fusion``
    Sibling layers reading the same tensor, with different consumers, become one layer and a ``Split``
    (sizes as an input from opset 13, as an attribute before): Conv (same strides, dilations, groups = 1;
    kernels aligned as above when that pays), ``MatMul(x, W_i)`` with constant 2-D ``W_i`` (→
    ``MatMul(x, [W_1 | … | W_n])``, a following ``Add`` of a constant ``[N_i]`` bias is absorbed as one
    ``Add``), and ``Gemm`` (same ``transA``; ``alpha_i`` folded into ``B_i``, ``beta_i·C_i`` into one bias
    ``C``; ``B`` stacked on its output axis). A pointwise activation shared by every sibling is applied
    once, before the Split. Applied only when the cost model prefers one wide layer + Split to the
    siblings (the Inception case: 1x1 reductions of one block input). MatMul/Gemm siblings are also refused
    when the fused form moves more data (weights, inputs, outputs, the Split's copy) than the siblings:
    the wide GEMM is no faster than the narrow ones, so only node overhead is saved, which large batches
    do not notice while they pay for the copy. For 2-D convs the cost also charges
    the layout reorders a channel Split causes on runtimes that run convs in a channel-blocked layout
    (option ``blocked_layout``, on by default): onnxruntime's CPU NCHWc transformer handles Conv, pools,
    Add, Concat and activations but not Split, so it reorders the fused result to NCHW and every piece
    back, which can cost more than the fusion saves (see BENCHMARKS.md). MatMul/Gemm splits are not affected. Refused: groups > 1, different strides/dilations, non-constant weights.

``pool_through_concat``
    ``pool(Concat(x_1, …, x_n)) = Concat(pool(x_1), …, pool(x_n))`` for MaxPool, AveragePool, LpPool,
    GlobalAveragePool, GlobalMaxPool and GlobalLpPool with the Concat on the batch or channel axis: every
    pool works on one (sample, channel) plane at a time, so each output plane is computed from the same
    input plane with the same arithmetic (bit-identical). Applied when the Concat's output is read by the
    pool only and the pool shrinks the tensor at least 2x (strides, or global): the Concat then copies the
    pooled planes instead of the large ones, while the extra pool nodes cost little. Refused: a spatial concat axis, MaxPool's
    ``Indices`` output read (indices would restart per piece), a pool that keeps the size (stride 1: no gain).

``merge_sum_branches``
    ``Σ_i conv_i(x) + m·x = conv(x)`` with ``W = Σ_i pad(W_i) + m·I`` and ``b = Σ_i b_i`` (RepVGG 3x3 + 1x1 +
    identity, ACNet 3x3 + 3x1 + 1x3, once their BNs are folded). The sum is any tree of ``Add``/``Sum``
    nodes whose inner results have no other reader; leaves that are not convs of ``x`` stay and are added
    to the merged conv. The identity ``I`` is the kernel with ``I[o, o mod (C/g), centre] = 1``: it needs
    ``Cin = Cout``, stride 1 and an output grid equal to the input's (``e = 0``, ``P_b`` a multiple of ``d``);
    grouped and depthwise convs get one identity per group. Refused: convs of ``x`` differing in strides,
    dilations or groups, misaligned pads, identity geometry that does not fit, or no gain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
from onnx import helper

from graphopt.core.ir import Graph, Model, Node, Value
from graphopt.core.manager import Option, PassContext, register
from graphopt.core.ops import LAYER_OPS, ConvInfo, conv_info, drop_unused, is_op, remove_dead, sole_consumer
from graphopt.core.rewrite import Match, Rule, RulePass
from graphopt.core.shapes import ShapeView
from graphopt.measure import cost as costs
from graphopt.measure.cost import Cost

# Unary element-wise ops that commute with channel concatenation / splitting (per-element, no
# per-channel parameters). Extra inputs (Clip's min/max) must be constants equal across branches.
POINTWISE = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid",
                       "HardSwish", "Softplus", "Softsign", "ThresholdedRelu", "Mish", "Gelu", "Clip"})

Dims = tuple  # of int | str | None


# =============================================================================================
# shapes for the cost model


def in_spatial(shapes: ShapeView, graph: Graph, x: Value) -> tuple[int, ...] | None:
    dims = shapes.concrete(x)
    return None if dims is None else dims[2:]


def _set_type(value: Value, dtype: int | None, dims: Dims | None) -> None:
    if dtype is not None:
        value.set_tensor_type(dtype, None if dims is None else list(dims))


# =============================================================================================
# conv geometry (ConvInfo, conv_info: graphopt.core.rewrite)


@dataclass
class Alignment:
    """The common geometry of a set of convs: kernel, pads, and each member's front offset per axis."""

    kernel: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    members: list[ConvInfo]
    offsets: list[tuple[int, ...]]

    @property
    def padded(self) -> bool:
        """Whether some member's kernel grows."""
        return any(m.kernel != self.kernel for m in self.members)

    def place(self, member: ConvInfo) -> np.ndarray:
        """``member``'s weight zero-padded into the common kernel."""
        i = next(k for k, m in enumerate(self.members) if m is member)
        w = member.weight
        out = np.zeros(w.shape[:2] + self.kernel, dtype=w.dtype)
        index = (slice(None), slice(None)) + tuple(slice(a, a + k) for a, k in zip(self.offsets[i], w.shape[2:]))
        out[index] = w
        return out


def align(members: Sequence[ConvInfo], in_spatial: Sequence[int] | None = None) -> Alignment | str:
    """The smallest common kernel/pads for ``members`` (module docstring), or why there is none.

    Members with different excesses ``e`` still align when their output sizes coincide (strides > 1 floor
    the difference away); that needs the input's spatial size ``in_spatial``.
    """
    first = members[0]
    for m in members[1:]:
        if m.key() != first.key():
            return "branches differ in strides, dilations, groups or dtype"
    same_grid = len({m.excess for m in members}) == 1
    if not same_grid and in_spatial is None:
        return "pads misaligned (the branches have different output grids)"
    rank = len(first.kernel)
    pads_begin, kernel, pads_end = [], [], []
    offsets: list[list[int]] = [[] for _ in members]
    for axis in range(rank):
        d, s = first.dilations[axis], first.strides[axis]
        if len({m.pads_begin[axis] % d for m in members}) > 1:
            return "pads misaligned (begin pads differ by a non-multiple of the dilation)"
        pb = max(m.pads_begin[axis] for m in members)
        fronts = [(pb - m.pads_begin[axis]) // d for m in members]
        k = max(a + m.kernel[axis] for a, m in zip(fronts, members))
        pe = max(m.pads_end[axis] + d * (k - a - m.kernel[axis]) for a, m in zip(fronts, members))
        if not same_grid:
            n = in_spatial[axis]
            sizes = {(n + m.pads_begin[axis] + m.pads_end[axis] - d * (m.kernel[axis] - 1) - 1) // s + 1
                     for m in members}
            sizes.add((n + pb + pe - d * (k - 1) - 1) // s + 1)
            if len(sizes) > 1:
                return "pads misaligned (the branches have different output grids)"
        pads_begin.append(pb)
        kernel.append(k)
        pads_end.append(pe)
        for i, a in enumerate(fronts):
            offsets[i].append(a)
    return Alignment(tuple(kernel), tuple(pads_begin), tuple(pads_end), list(members), [tuple(o) for o in offsets])


def identity_offset(al: Alignment, info: ConvInfo) -> tuple[int, ...] | str:
    """Where the identity tap sits in the common kernel, or why ``x`` itself cannot be a branch."""
    if info.cin != info.cout:
        return "identity branch needs Cin == Cout"
    if any(s != 1 for s in info.strides):
        return "identity branch needs stride 1"
    if any(e != 0 for e in info.excess):
        return "identity branch needs an output grid equal to the input's"
    taps = []
    for pb, d, k in zip(al.pads_begin, info.dilations, al.kernel):
        if pb % d or pb // d >= k:
            return "identity tap falls outside the kernel"
        taps.append(pb // d)
    return tuple(taps)


def identity_kernel(al: Alignment, info: ConvInfo, taps: tuple[int, ...]) -> np.ndarray:
    """``I[o, o mod (C/g), taps] = 1``: the conv that copies its input, per group."""
    per_group = info.cin // info.group
    w = np.zeros((info.cout, per_group) + al.kernel, dtype=info.weight.dtype)
    for o in range(info.cout):
        w[(o, o % per_group) + taps] = 1
    return w


def conv_layer_cost(shapes: ShapeView, graph: Graph, x: Value, out: Value | None, cin: int, cout: int,
                    kernel: Sequence[int], group: int, strides: Sequence[int] | None = None,
                    dilations: Sequence[int] | None = None, pads: tuple[Sequence[int], Sequence[int]] | None = None
                    ) -> Cost | None:
    """The cost of a conv reading ``x``: output grid from ``out``'s shape, or computed from the geometry."""
    xd = shapes.concrete(x)
    if xd is None:
        return None
    od = shapes.concrete(out) if out is not None else None
    if od is not None:
        spatial = od[2:]
    elif strides is not None and dilations is not None and pads is not None:
        spatial = tuple((n + pb + pe - d * (k - 1) - 1) // s + 1
                        for n, pb, pe, d, k, s in zip(xd[2:], pads[0], pads[1], dilations, kernel, strides))
    else:
        return None
    return costs.conv_cost(xd[0], cin, cout, kernel, spatial, xd[2:], group)


# =============================================================================================
# activations


@dataclass(frozen=True)
class Act:
    """A pointwise activation node and what makes two of them interchangeable."""

    node: Node
    signature: tuple


def pointwise_after(graph: Graph, value: Value) -> Act | None:
    """The activation that is ``value``'s only reader, when it is one of :data:`POINTWISE`."""
    node = sole_consumer(graph, value)
    if node is None or not is_op(node, *POINTWISE) or node.inputs[0] is not value or len(node.outputs) != 1:
        return None
    return _act(graph, node)


def _act(graph: Graph, node: Node) -> Act | None:
    extra = []
    for v in node.inputs[1:]:
        if v is None:
            extra.append(None)
            continue
        arr = graph.constant_array(v)
        if arr is None:
            return None
        extra.append((arr.dtype.str, arr.shape, arr.tobytes()))
    attrs = tuple(sorted((k, p.SerializeToString()) for k, p in node.attrs.items()))
    return Act(node, (node.op_type, node.domain, attrs, tuple(extra)))


def add_act(graph: Graph, act: Act, x: Value, out: Value | str, anchor: Node) -> Node:
    """A copy of ``act`` (same op, attributes and constant inputs) applied to ``x``."""
    attrs = {k: helper.get_attribute_value(p) for k, p in act.node.attrs.items()}
    return graph.add_node(act.node.op_type, [x, *act.node.inputs[1:]], [out], attrs, name=act.node.name,
                          domain=act.node.domain, anchor=anchor)


# =============================================================================================
# shared rewrite helpers


def conv_attrs(first: ConvInfo, al: Alignment) -> dict[str, Any]:
    return {"dilations": list(first.dilations), "group": first.group, "kernel_shape": list(al.kernel),
            "pads": list(al.pads_begin) + list(al.pads_end), "strides": list(first.strides)}


def add_conv(graph: Graph, first: ConvInfo, al: Alignment, weight: np.ndarray, bias: np.ndarray,
             out: Value | str, name: str) -> Node:
    w = graph.add_initializer(weight, f"{name}_W")
    b = graph.add_initializer(bias, f"{name}_B")
    return graph.add_node("Conv", [first.x, w, b], [out], conv_attrs(first, al), name=name, anchor=first.node)


def bias_of(info: ConvInfo) -> np.ndarray:
    return info.bias if info.bias is not None else np.zeros(info.cout, dtype=info.weight.dtype)


def split_node(graph: Graph, model_opset: int, x: Value, sizes: Sequence[int], axis: int,
               outputs: Sequence[Value], anchor: Node, name: str) -> Node:
    """``Split`` of ``x`` into ``sizes`` along ``axis`` (sizes as an input from opset 13, attribute before)."""
    if model_opset >= 13:
        s = graph.add_initializer(np.asarray(sizes, dtype=np.int64), f"{name}_sizes")
        return graph.add_node("Split", [x, s], list(outputs), {"axis": axis}, name=name, anchor=anchor)
    return graph.add_node("Split", [x], list(outputs), {"axis": axis, "split": list(sizes)}, name=name,
                          anchor=anchor)


def reorder_cost(elements: int) -> Cost:
    """A layout reorder (NCHW <-> NCHWc): one node that reads and writes every element, no arithmetic."""
    return Cost(0, 2 * elements, 1)


def elementwise(shapes: ShapeView, graph: Graph, value: Value, nodes: int = 1) -> Cost | None:
    dims = shapes.concrete(value)
    if dims is None:
        return None
    c = costs.elementwise_cost(prod(dims))
    return Cost(c.macs, c.elements, nodes)


# =============================================================================================
# merge_concat_convs


@dataclass
class _Member:
    """One Concat input produced by ``conv`` (optionally through ``act``)."""

    slot: int
    info: ConvInfo
    act: Act | None

    def key(self) -> tuple:
        return (self.info.key(), None if self.act is None else self.act.signature)


def _remove_merged(graph: Graph, segments: list[list[_Member]]) -> None:
    """Remove the convs (and activations) the merged convs replaced, and their unread weights."""
    dead = [m.info.node for s in segments if len(s) > 1 for m in s]
    dead += [m.act.node for s in segments if len(s) > 1 for m in s if m.act is not None]
    weights = [v for n in dead if n.op_type == "Conv" for v in n.inputs[1:]]
    remove_dead(graph, dead)
    drop_unused(graph, weights)


@dataclass(kw_only=True)
class _ConcatPlan(Match):
    segments: list[list[_Member]]  # adjacent Concat inputs, each segment of two or more becoming one conv


class MergeConcatConvs(Rule):
    name = "merge_concat_convs"
    root_ops = ("Concat",)

    def __init__(self, shapes: ShapeView, allow_padding: bool = True) -> None:
        self.shapes = shapes
        self.allow_padding = allow_padding

    def _member(self, graph: Graph, concat: Node, slot: int) -> _Member | str:
        v = concat.inputs[slot]
        producer = graph.producer(v) if v is not None else None
        act = None
        if producer is not None and is_op(producer, *POINTWISE):
            if sole_consumer(graph, v) is not concat:
                return "a branch output has a second reader"
            act = _act(graph, producer)
            if act is None:
                return "activation with non-constant parameters"
            v = producer.inputs[0]
            producer = graph.producer(v) if v is not None else None
        if producer is None or not is_op(producer, "Conv"):
            return "not produced by a Conv"
        expected = act.node if act is not None else concat
        if sole_consumer(graph, v) is not expected:
            return "a conv output has a second reader (horizontal_fusion handles that form)"
        info = conv_info(graph, producer)
        if isinstance(info, str):
            return info
        if info.group != 1:
            return "groups > 1 (stacked outputs would interleave the groups)"
        return _Member(slot, info, act)

    def match(self, graph: Graph, node: Node) -> Match | str:
        members: list[_Member | str] = [self._member(graph, node, s) for s in range(len(node.inputs))]
        reasons = [m for m in members if isinstance(m, str)]
        # Runs of adjacent members with the same key (same input, attributes and activation).
        runs: list[list[_Member]] = []
        for m in members:
            if isinstance(m, str):
                runs.append([])
                continue
            rank = m.info.weight.ndim
            axis = node.attr("axis", 1)
            if (axis + rank if axis < 0 else axis) != 1:
                return "concat axis is not the channel axis"
            if runs and runs[-1] and runs[-1][-1].key() == m.key():
                runs[-1].append(m)
            else:
                runs.append([m])
        runs = [r for r in runs if len(r) >= 2]
        if not runs:
            if reasons:
                return max(set(reasons), key=reasons.count)
            return "no two adjacent inputs are convs of the same tensor with the same attributes"
        why = "merging does not pay (cost model)"
        for run in runs:
            plan = self._plan(graph, node, run, whole=len(run) == len(node.inputs))
            if isinstance(plan, str):
                why = plan
                continue
            return _ConcatPlan(node, segments=plan)
        return why

    def _plan(self, graph: Graph, concat: Node, run: list[_Member], whole: bool) -> list[list[_Member]] | str:
        """Partition ``run`` into contiguous segments minimising cost; segments of one member stay as they are."""
        n = len(run)
        single = self._member_costs(graph, run)
        if isinstance(single, str):
            return single
        seg: dict[tuple[int, int], Cost | None] = {}
        refusals: list[str] = []
        for i in range(n):
            for j in range(i + 2, n + 1):
                seg[(i, j)] = self._segment_cost(graph, run[i:j], refusals)
        best: list[tuple[float, list[tuple[int, int]]]] = [(0.0, [])]
        for j in range(1, n + 1):
            options = [(best[j - 1][0] + single[j - 1].total(), best[j - 1][1] + [(j - 1, j)])]
            for i in range(0, j - 1):
                c = seg[(i, j)]
                if c is not None:
                    options.append((best[i][0] + c.total(), best[i][1] + [(i, j)]))
            best.append(min(options, key=lambda o: (o[0], len(o[1]))))
        total, parts = best[n]
        before = sum((c for c in single), Cost())
        concat_cost = elementwise(self.shapes, graph, concat.outputs[0]) if whole else None
        if whole and seg.get((0, n)) is not None and concat_cost is not None:
            # One merged conv producing every input: the Concat disappears too.
            if seg[(0, n)].total() - concat_cost.total() <= total:
                total, parts = seg[(0, n)].total() - concat_cost.total(), [(0, n)]
        if all(j - i == 1 for i, j in parts) or not total < before.total() * (1 - costs.MIN_GAIN):
            if refusals:
                return max(set(refusals), key=refusals.count)
            return "merging does not pay (cost model)"
        return [run[i:j] for i, j in parts]

    def _member_costs(self, graph: Graph, run: list[_Member]) -> list[Cost] | str:
        """Each member's conv (+ activation) as it stands, or why the cost model cannot price it."""
        single: list[Cost] = []
        for m in run:
            c = conv_layer_cost(self.shapes, graph, m.info.x, m.info.out, m.info.cin, m.info.cout, m.info.kernel, 1)
            if c is None:
                return "spatial size unknown (the cost model needs it)"
            if m.act is not None:
                a = elementwise(self.shapes, graph, m.info.out)
                if a is None:
                    return "spatial size unknown (the cost model needs it)"
                c = c + a
            single.append(c)
        return single

    def _segment_cost(self, graph: Graph, segment: list[_Member], refusals: list[str]) -> Cost | None:
        al = align([m.info for m in segment], in_spatial(self.shapes, graph, segment[0].info.x))
        if isinstance(al, str):
            refusals.append(al)
            return None
        if al.padded and not self.allow_padding:
            refusals.append("kernels differ and zero-padding is disabled")
            return None
        first = segment[0].info
        cout = sum(m.info.cout for m in segment)
        c = conv_layer_cost(self.shapes, graph, first.x, None, first.cin, cout, al.kernel, 1, first.strides,
                            first.dilations, (al.pads_begin, al.pads_end))
        if c is None:
            refusals.append("spatial size unknown (the cost model needs it)")
            return None
        if segment[0].act is not None:
            per = [elementwise(self.shapes, graph, m.info.out) for m in segment]
            if any(p is None for p in per):
                return None
            c = c + Cost(sum(p.macs for p in per), sum(p.elements for p in per), 1)
        if al.padded:
            sizes = "/".join("x".join(map(str, m.info.kernel)) for m in segment)
            refusals.append(f"zero-padding {sizes} to {'x'.join(map(str, al.kernel))} does not pay (cost model)")
        return c

    def rewrite(self, graph: Graph, match: _ConcatPlan) -> None:
        concat = match.node
        segments = match.segments
        whole = len(segments) == 1 and len(segments[0]) == len(concat.inputs)
        out = concat.outputs[0]
        old_inputs = list(concat.inputs)
        graph.remove_node(concat, keep_outputs=True)
        new_inputs = self._merged_inputs(graph, old_inputs, segments, out if whole else None)
        if not whole:
            attrs = {k: helper.get_attribute_value(p) for k, p in concat.attrs.items()}
            graph.add_node("Concat", new_inputs, [out], attrs, name=concat.name, anchor=concat)
        _remove_merged(graph, segments)

    def _merged_inputs(self, graph: Graph, old_inputs: list[Value], segments: list[list[_Member]],
                       out: Value | None) -> list[Value]:
        """The Concat's inputs with each segment of two or more replaced by its merged conv's output
        (``out`` itself when one conv produces the whole Concat)."""
        by_slot = {s[0].slot: s for s in segments}
        covered = {m.slot for s in segments for m in s}
        new_inputs: list[Value] = []
        for slot, v in enumerate(old_inputs):
            if slot in by_slot:
                seg = by_slot[slot]
                new_inputs.append(v if len(seg) == 1 else self._merge(graph, seg, out))
            elif slot not in covered:
                new_inputs.append(v)
        return new_inputs

    def _merge(self, graph: Graph, seg: list[_Member], out: Value | None) -> Value:
        """One conv (+ the shared activation) for ``seg``; writes ``out`` when given, else a fresh value."""
        infos = [m.info for m in seg]
        first = infos[0]
        al = align(infos, in_spatial(self.shapes, graph, first.x))
        assert not isinstance(al, str)
        weight = np.concatenate([al.place(i) for i in infos], axis=0)
        bias = np.concatenate([bias_of(i) for i in infos], axis=0)
        name = f"{first.node.name or 'conv'}_merged"
        dtype = helper.np_dtype_to_tensor_dtype(weight.dtype)
        o_dims = self.shapes.shape(first.out)
        dims = None if o_dims is None else (o_dims[0], weight.shape[0], *o_dims[2:])
        act = seg[0].act
        conv_out: Value | str = out if out is not None and act is None else f"{name}_out"
        result = add_conv(graph, first, al, weight, bias, conv_out, name).outputs[0]
        if act is not None:
            _set_type(result, dtype, dims)
            result = add_act(graph, act, result, out if out is not None else f"{name}_act", first.node).outputs[0]
        if result is not out:
            _set_type(result, dtype, dims)
        return result


# =============================================================================================
# horizontal_fusion


@dataclass
class _Sibling:
    """One layer reading the shared input, with the tail (bias Add, activation) it may bring along."""

    node: Node
    n_out: int
    weight: np.ndarray  # conv: [Cout, Cin, *k]; MatMul/Gemm: [K, N] (Gemm's alpha and transB applied)
    bias: np.ndarray | None = None
    info: ConvInfo | None = None
    trans_a: int = 0  # Gemm
    bias_add: Node | None = None  # MatMul followed by Add(constant [N])
    act: Act | None = None

    @property
    def head_out(self) -> Value:
        """The layer's result before the activation (after the bias Add when there is one)."""
        return (self.bias_add or self.node).outputs[0]

    @property
    def out(self) -> Value:
        return self.act.node.outputs[0] if self.act is not None else self.head_out

    def key(self) -> tuple:
        """What must be equal for siblings to fuse (conv kernels may still differ: alignment)."""
        if self.info is not None:
            return ("Conv",) + self.info.key()
        return (self.node.op_type, self.weight.shape[0], self.weight.dtype.str, self.trans_a, self.bias_add is not None)


def _conv_sibling(graph: Graph, node: Node) -> _Sibling | str:
    info = conv_info(graph, node)
    if isinstance(info, str):
        return info
    if info.group != 1:
        return "groups > 1 (split outputs would interleave the groups)"
    return _Sibling(node, info.cout, info.weight, info.bias, info=info)


def _matmul_sibling(graph: Graph, node: Node) -> _Sibling | str:
    """``MatMul(x, W)``, with the ``Add`` of a constant ``[N]`` bias that follows it, when there is one."""
    w = graph.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim != 2 or w.dtype.kind != "f":
        return "MatMul weight is not a constant 2-D float matrix"
    s = _Sibling(node, int(w.shape[1]), w)
    add = sole_consumer(graph, node.outputs[0])
    if is_op(add, "Add") and len(add.inputs) == 2 and add.inputs[0] is not add.inputs[1]:
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        b = graph.constant_array(other)
        if b is not None and b.shape == (w.shape[1],) and b.dtype == w.dtype:
            s.bias, s.bias_add = b, add
    return s


def _gemm_sibling(graph: Graph, node: Node) -> _Sibling | str:
    """Gemm ``y = α·A'B' + β·C`` as ``B`` = ``α·B'`` ``[K, N]`` and bias ``β·C`` ``[N]``."""
    w = graph.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim != 2 or w.dtype.kind != "f":
        return "Gemm B is not a constant 2-D float matrix"
    if node.attr("transB", 0):
        w = w.T
    w = (w * np.asarray(node.attr("alpha", 1.0), dtype=w.dtype)).astype(w.dtype)
    n_out = int(w.shape[1])
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = graph.constant_array(node.inputs[2])
        if c is None:
            return "Gemm C is not constant"
        if c.ndim > 2 or c.size not in (1, n_out) or (c.ndim == 2 and c.shape[0] != 1):
            return "Gemm C is not a per-output bias"
        beta = np.asarray(node.attr("beta", 1.0), dtype=w.dtype)
        bias = (np.broadcast_to(c.reshape(-1), (n_out,)) * beta).astype(w.dtype)
    return _Sibling(node, n_out, w, bias, trans_a=int(node.attr("transA", 0)))


@dataclass(kw_only=True)
class _SiblingsMatch(Match):
    x: Value  # the input the siblings share
    members: list[_Sibling]  # the siblings to fuse, in graph order


_UNKNOWN = "shape unknown (the cost model needs it)"


class HorizontalFusion(Rule):
    name = "horizontal_fusion"
    root_ops = LAYER_OPS

    def __init__(self, shapes: ShapeView, opset: int, allow_padding: bool = True, blocked_layout: bool = True) -> None:
        self.shapes = shapes
        self.opset = opset
        self.allow_padding = allow_padding
        self.blocked_layout = blocked_layout

    # --- matching -------------------------------------------------------------------------------
    def match(self, graph: Graph, node: Node) -> _SiblingsMatch | str:
        x = node.inputs[0] if node.inputs else None
        if x is None:
            return "no input"
        siblings = self._siblings_from(graph, node, x)
        if isinstance(siblings, str):
            return siblings
        best = self._best_fusion(graph, x, siblings)
        if isinstance(best, str):
            return best
        rank = {s.node: i for i, s in enumerate(siblings)}
        return _SiblingsMatch(node, x=x, members=sorted(best, key=lambda s: rank[s.node]))

    def _siblings_from(self, graph: Graph, node: Node, x: Value) -> list[_Sibling] | str:
        """The mergeable layers of ``node``'s op reading ``x`` as their data input, in graph order, when
        ``node`` is the first of them (the rule applies once per family, at its first member)."""
        siblings = [n for n in graph.consumers(x) if is_op(n, node.op_type) and n.inputs and n.inputs[0] is x]
        if len(siblings) < 2:
            return "no sibling of the same op reads the same input"
        order = {n: i for i, n in enumerate(graph.toposort())}
        siblings.sort(key=lambda n: order[n])
        if siblings[0] is not node:
            return "handled at the first sibling"
        parsed = [self._sibling(graph, n) for n in siblings]
        ok = [p for p in parsed if not isinstance(p, str)]
        if len(ok) < 2:
            reasons = [p for p in parsed if isinstance(p, str)]
            return reasons[0] if reasons else "fewer than two mergeable siblings"
        return ok

    def _best_fusion(self, graph: Graph, x: Value, siblings: list[_Sibling]) -> list[_Sibling] | str:
        """The candidate set of siblings whose fusion saves the most, or why none pays (the last reason)."""
        groups: dict[tuple, list[_Sibling]] = {}
        for s in siblings:
            groups.setdefault(s.key(), []).append(s)
        best: tuple[float, list[_Sibling]] | None = None
        why = "siblings differ in strides, dilations, weight shapes or tails"
        for group in groups.values():
            if len(group) < 2:
                continue
            candidates = self._conv_candidates(graph, x, group) if group[0].info is not None else [group]
            for cand in candidates:
                saving = self._saving(graph, x, cand)
                if isinstance(saving, str):
                    why = saving
                elif best is None or saving > best[0]:
                    best = (saving, cand)
        return why if best is None else best[1]

    def _sibling(self, graph: Graph, node: Node) -> _Sibling | str:
        build = {"Conv": _conv_sibling, "MatMul": _matmul_sibling}.get(node.op_type, _gemm_sibling)
        s = build(graph, node)
        if isinstance(s, str):
            return s
        s.act = pointwise_after(graph, s.head_out)
        return s

    def _conv_candidates(self, graph: Graph, x: Value, group: list[_Sibling]) -> list[list[_Sibling]]:
        """Same-kernel classes, and each class grown by other classes whose zero-padding the cost model accepts."""
        classes: dict[tuple, list[_Sibling]] = {}
        for s in group:
            classes.setdefault((s.info.kernel, s.info.pads_begin, s.info.pads_end), []).append(s)
        ordered = sorted(classes.values(), key=lambda c: -prod(c[0].info.kernel))
        candidates = [c for c in ordered if len(c) >= 2]
        if not self.allow_padding:
            return candidates
        for seed in ordered:
            grown = list(seed)
            for other in ordered:
                if other is seed:
                    continue
                gain_now = self._saving(graph, x, grown) if len(grown) >= 2 else 0.0
                gain_new = self._saving(graph, x, grown + other)
                if isinstance(gain_new, float) and gain_new > (gain_now if isinstance(gain_now, float) else 0.0):
                    grown = grown + other
            if len(grown) >= 2 and grown not in candidates:
                candidates.append(grown)
        if not candidates:  # let _saving say why the smallest padded fusion is refused
            candidates.append(ordered[0] + ordered[1])
        return candidates

    def _saving(self, graph: Graph, x: Value, members: list[_Sibling]) -> float | str:
        """``cost(siblings) − cost(fused + Split)`` (cost model units), or why it cannot be computed."""
        act = _common_act(members)
        layers = self._conv_costs(graph, x, members) if members[0].info is not None \
            else self._dense_costs(graph, x, members)
        if isinstance(layers, str):
            return layers
        with_acts = self._act_costs(graph, members, act, *layers)
        if with_acts is None:
            return _UNKNOWN
        before, after = with_acts
        outs = [elementwise(self.shapes, graph, m.out if act is not None else m.head_out) for m in members]
        if any(o is None for o in outs):
            return _UNKNOWN
        after = after + Cost(sum(o.macs for o in outs), sum(o.elements for o in outs), 1)  # the Split
        layout = self._layout_cost(members, outs)
        why = self._refusal(graph, x, members, before, after, layout)
        if why:
            return why
        return float(before.total() - (after + layout).total())

    def _conv_costs(self, graph: Graph, x: Value, members: list[_Sibling]) -> tuple[Cost, Cost] | str:
        """(the sibling convs, the one wide conv), or why not."""
        al = align([m.info for m in members], in_spatial(self.shapes, graph, x))
        if isinstance(al, str):
            return al
        before = Cost()
        for m in members:
            c = conv_layer_cost(self.shapes, graph, x, m.info.out, m.info.cin, m.info.cout, m.info.kernel, 1)
            if c is None:
                return _UNKNOWN
            before = before + c
        first = members[0].info
        after = conv_layer_cost(self.shapes, graph, x, None, first.cin, sum(m.n_out for m in members), al.kernel,
                                1, first.strides, first.dilations, (al.pads_begin, al.pads_end))
        if after is None:
            return _UNKNOWN
        return before, after

    def _dense_costs(self, graph: Graph, x: Value, members: list[_Sibling]) -> tuple[Cost, Cost] | str:
        """(the sibling GEMMs and their bias Adds, the one wide GEMM and its Add), or why not."""
        xd = self.shapes.concrete(x)
        if xd is None:
            return _UNKNOWN
        rows = xd[-1] if members[0].trans_a else prod(xd[:-1])
        k = members[0].weight.shape[0]
        before = sum((costs.gemm_cost(rows, k, m.n_out) for m in members), Cost())
        after = costs.gemm_cost(rows, k, sum(m.n_out for m in members))
        if members[0].bias_add is not None:
            adds = [elementwise(self.shapes, graph, m.head_out) for m in members]
            if any(a is None for a in adds):
                return _UNKNOWN
            before = before + sum(adds, Cost())
            after = after + Cost(sum(a.macs for a in adds), sum(a.elements for a in adds), 1)
        return before, after

    def _act_costs(self, graph: Graph, members: list[_Sibling], act: Act | None, before: Cost,
                   after: Cost) -> tuple[Cost, Cost] | None:
        """``before``/``after`` plus the activations: each sibling's, or one shared (one node) after fusing."""
        for m in members:
            if m.act is None:
                continue
            c = elementwise(self.shapes, graph, m.head_out)
            if c is None:
                return None
            before = before + c
            after = after + (Cost(c.macs, c.elements, 0) if act is not None and m is not members[0] else c)
        return before, after

    def _layout_cost(self, members: list[_Sibling], outs: list[Cost]) -> Cost:
        """The reorders a channel Split of a 2-D conv costs in a channel-blocked layout (option blocked_layout)."""
        layout = Cost()
        if self.blocked_layout and members[0].info is not None and members[0].weight.ndim == 4:
            # Runtimes that run 2-D convs in a channel-blocked layout (onnxruntime CPU's NCHWc) have no
            # blocked Split: the fused result is reordered to NCHW, and every piece back for its reader.
            pieces = [o.macs for o in outs]
            layout = reorder_cost(sum(pieces))
            for e in pieces:
                layout = layout + reorder_cost(e)
        return layout

    def _refusal(self, graph: Graph, x: Value, members: list[_Sibling], before: Cost, after: Cost,
                 layout: Cost) -> str | None:
        """Why the fused form does not pay, or None."""
        if costs.cheaper(after, before) and not costs.cheaper(after + layout, before):
            return ("a channel Split breaks the blocked (NCHWc) conv layout: the reorders cost more than the "
                    "fusion saves (option blocked_layout)")
        if not costs.cheaper(after, before):
            al = align([m.info for m in members], in_spatial(self.shapes, graph, x)) if members[0].info else None
            if al is not None and not isinstance(al, str) and al.padded:
                sizes = "/".join(sorted({"x".join(map(str, m.info.kernel)) for m in members}))
                return f"zero-padding {sizes} to a common kernel does not pay (cost model)"
            return "fusing the siblings does not pay (cost model)"
        if members[0].info is None and after.elements > before.elements:
            # Dense siblings: one wide GEMM does the same arithmetic at the same speed, so the fusion
            # saves only node overhead plus re-reads of x, and the Split copies every output once more.
            # When that copy outweighs the saved reads, batch 1 gains microseconds and large batches lose.
            return "the Split moves more data than one wide layer saves (loses at larger batch sizes)"
        return None

    # --- rewriting ------------------------------------------------------------------------------
    def _wide_conv(self, graph: Graph, x: Value, members: list[_Sibling], name: str) -> Node:
        """One conv with the siblings' (aligned) kernels stacked on the output-channel axis."""
        infos = [m.info for m in members]
        al = align(infos, in_spatial(self.shapes, graph, x))
        assert not isinstance(al, str)
        weight = np.concatenate([al.place(i) for i in infos], axis=0)
        bias = np.concatenate([bias_of(i) for i in infos], axis=0)
        return add_conv(graph, members[0].info, al, weight, bias, f"{name}_out", name)

    def rewrite(self, graph: Graph, match: _SiblingsMatch) -> None:
        members, x = match.members, match.x
        first = members[0]
        act = _common_act(members)
        sizes = [m.n_out for m in members]
        total = sum(sizes)
        name = f"{first.node.name or first.node.op_type}_hfused"
        # The values the siblings' readers read are re-produced by the Split: names and readers stay.
        outs = [m.out if act is not None else m.head_out for m in members]
        dtype = helper.np_dtype_to_tensor_dtype(first.weight.dtype)
        out_dims = self.shapes.shape(outs[0])
        chain = [n for m in members for n in (m.node, m.bias_add, m.act.node if act is not None else None)
                 if n is not None]
        weights = [v for n in chain for v in n.inputs]  # drop_unused keeps whatever is still read
        for v in outs:
            graph.remove_node(graph.producer(v), keep_outputs=True)
        if first.info is not None:
            head, axis = self._wide_conv(graph, x, members, name), 1
        elif first.node.op_type == "Gemm":
            head, axis = _wide_gemm(graph, x, members, name), 1
        else:
            axis = len(out_dims) - 1 if out_dims is not None else -1
            head = _wide_matmul(graph, x, members, name, dtype, _widened(out_dims, axis, total))
        dims = _widened(out_dims, axis, total)
        _set_type(head.outputs[0], dtype, dims)
        split_in = head.outputs[0]
        if act is not None:
            a = add_act(graph, act, split_in, f"{name}_act", first.node)
            _set_type(a.outputs[0], dtype, dims)
            split_in = a.outputs[0]
        split_node(graph, self.opset, split_in, sizes, axis, outs, first.node, f"{name}_split")
        remove_dead(graph, chain)
        drop_unused(graph, weights)


def _wide_gemm(graph: Graph, x: Value, members: list[_Sibling], name: str) -> Node:
    """One Gemm with the siblings' ``B`` side by side and their biases (zeros where absent) concatenated."""
    first = members[0]
    w = graph.add_initializer(np.concatenate([m.weight for m in members], axis=1), f"{name}_W")
    c = np.concatenate([m.bias if m.bias is not None else np.zeros(m.n_out, m.weight.dtype)
                        for m in members]).astype(first.weight.dtype)
    return graph.add_node("Gemm", [x, w, graph.add_initializer(c, f"{name}_C")], [f"{name}_out"],
                          {"transA": first.trans_a}, name=name, anchor=first.node)


def _wide_matmul(graph: Graph, x: Value, members: list[_Sibling], name: str, dtype: int,
                 dims: Dims | None) -> Node:
    """One MatMul with the siblings' weights side by side, plus one bias Add when they had theirs."""
    first = members[0]
    w = graph.add_initializer(np.concatenate([m.weight for m in members], axis=1), f"{name}_W")
    head = graph.add_node("MatMul", [x, w], [f"{name}_out"], name=name, anchor=first.node)
    if first.bias_add is None:
        return head
    _set_type(head.outputs[0], dtype, dims)
    b = graph.add_initializer(np.concatenate([m.bias for m in members]), f"{name}_bias")
    return graph.add_node("Add", [head.outputs[0], b], [f"{name}_biased"], name=f"{name}_add", anchor=first.node)


def _common_act(members: list[_Sibling]) -> Act | None:
    """The activation every sibling has, when it is the same everywhere (then it is applied once)."""
    acts = [m.act for m in members]
    if any(a is None for a in acts) or len({a.signature for a in acts}) > 1:
        return None
    return acts[0]


def _widened(dims: Dims | None, axis: int, size: int) -> Dims | None:
    if dims is None or axis < 0:
        return None
    out = list(dims)
    out[axis] = size
    return tuple(out)


# =============================================================================================
# merge_sum_branches

_SUM_OPS = ("Add", "Sum")


def _convs_by_input(graph: Graph, leaves: list[Value], tree: set[Node],
                    reasons: list[str]) -> dict[str, list[tuple[int, ConvInfo]]]:
    """The summed leaves produced by a Conv read by the sum tree alone, grouped by the conv's input name
    (each with its leaf index); why the other conv leaves cannot merge goes to ``reasons``."""
    convs: dict[str, list[tuple[int, ConvInfo]]] = {}
    for i, v in enumerate(leaves):
        p = graph.producer(v)
        if not is_op(p, "Conv"):
            continue
        reader = sole_consumer(graph, v)
        if reader not in tree:
            reasons.append("a conv output has a second reader")
            continue
        info = conv_info(graph, p)
        if isinstance(info, str):
            reasons.append(info)
            continue
        convs.setdefault(info.x.name, []).append((i, info))
    return convs


@dataclass(kw_only=True)
class _SumMatch(Match):
    """A sum tree whose conv branches of one tensor (and the tensor itself, ``identities`` times) merge."""

    leaves: list[Value]  # the summed values
    inner: list[Node]  # the tree's Add/Sum nodes below the root
    merged: set[int]  # indices of the leaves the merged conv replaces
    infos: list[ConvInfo]
    al: Alignment
    identities: int
    taps: tuple[int, ...] | None  # where the identity kernel's tap sits (when identities)


class MergeSumBranches(Rule):
    name = "merge_sum_branches"
    root_ops = _SUM_OPS

    def __init__(self, shapes: ShapeView) -> None:
        self.shapes = shapes

    def _leaves(self, graph: Graph, root: Node) -> tuple[list[Value], list[Node]]:
        """The summed values of the Add/Sum tree under ``root``, and the tree's inner nodes."""
        leaves: list[Value] = []
        inner: list[Node] = []

        def expand(node: Node) -> None:
            for v in node.inputs:
                p = graph.producer(v) if v is not None else None
                if is_op(p, *_SUM_OPS) and len(p.outputs) == 1 and sole_consumer(graph, v) is node:
                    inner.append(p)
                    expand(p)
                else:
                    leaves.append(v)
        expand(root)
        return leaves, inner

    def match(self, graph: Graph, node: Node) -> Match | str:
        parent = sole_consumer(graph, node.outputs[0])
        if is_op(parent, *_SUM_OPS):
            return "part of a larger sum (handled at its root)"
        if any(v is None for v in node.inputs):
            return "missing input"
        leaves, inner = self._leaves(graph, node)
        reasons: list[str] = []
        convs = _convs_by_input(graph, leaves, {node, *inner}, reasons)
        for _, group in sorted(convs.items(), key=lambda kv: kv[1][0][0]):
            found = self._merge_group(graph, node, leaves, inner, group)
            if isinstance(found, str):
                reasons.append(found)
            elif found is not None:
                return found
        if reasons:
            return reasons[0]
        return "no two summed branches are convs of the same tensor (or the tensor itself)"

    def _merge_group(self, graph: Graph, node: Node, leaves: list[Value], inner: list[Node],
                     group: list[tuple[int, ConvInfo]]) -> _SumMatch | str | None:
        """The merge of one input's summed convs (and the input itself, when summed), why it is refused,
        or None when there are not two terms to merge."""
        x = group[0][1].x
        identities = [i for i, v in enumerate(leaves) if v is x]
        if len(group) + len(identities) < 2:
            return None
        infos = [g[1] for g in group]
        if len({i.cout for i in infos}) > 1:
            return "summed convs have different output channels (broadcasting)"
        al = align(infos, in_spatial(self.shapes, graph, x))
        if isinstance(al, str):
            return al
        taps = None
        if identities:
            taps = identity_offset(al, infos[0])
            if isinstance(taps, str):
                return taps
        remaining = len(leaves) - len(group) - len(identities) + 1
        c = self._pays(graph, infos, al, 1 + len(inner), remaining - 1)
        if isinstance(c, str):
            return c
        merged = {i for i, _ in group} | set(identities)
        return _SumMatch(node, leaves=leaves, inner=inner, merged=merged, infos=infos, al=al,
                         identities=len(identities), taps=taps)

    def _pays(self, graph: Graph, infos: list[ConvInfo], al: Alignment, sum_nodes: int, new_adds: int) -> str | None:
        """Whether one conv (+ ``new_adds`` Adds for the other terms) beats the convs and the ``sum_nodes`` sums."""
        first = infos[0]
        before = Cost()
        for i in infos:
            c = conv_layer_cost(self.shapes, graph, i.x, i.out, i.cin, i.cout, i.kernel, i.group)
            if c is None:
                return "spatial size unknown (the cost model needs it)"
            before = before + c
        per_add = elementwise(self.shapes, graph, first.out)
        after = conv_layer_cost(self.shapes, graph, first.x, first.out, first.cin, first.cout, al.kernel, first.group)
        if per_add is None or after is None:
            return "spatial size unknown (the cost model needs it)"
        for _ in range(sum_nodes):
            before = before + per_add
        for _ in range(new_adds):
            after = after + per_add
        if not costs.cheaper(after, before):
            sizes = "+".join("x".join(map(str, i.kernel)) for i in infos)
            return f"merging {sizes} into {'x'.join(map(str, al.kernel))} does not pay (cost model)"
        return None

    def rewrite(self, graph: Graph, match: _SumMatch) -> None:
        root = match.node
        leaves, merged, infos, al = match.leaves, match.merged, match.infos, match.al
        first = infos[0]
        weight = sum((al.place(i) for i in infos), np.zeros((first.cout, first.cin // first.group) + al.kernel,
                                                              dtype=first.weight.dtype))
        if match.identities:
            weight = weight + match.identities * identity_kernel(al, first, match.taps)
        bias = sum((bias_of(i) for i in infos), np.zeros(first.cout, dtype=first.weight.dtype))
        out = root.outputs[0]
        dtype = helper.np_dtype_to_tensor_dtype(first.weight.dtype)
        name = f"{first.node.name or 'conv'}_merged"
        terms: list[Value | None] = []
        placed = False
        for i, v in enumerate(leaves):
            if i in merged:
                if not placed:
                    terms.append(None)  # the merged conv's place
                    placed = True
            else:
                terms.append(v)
        old_nodes = [root, *match.inner, *(i.node for i in infos)]
        weights = [v for i in infos for v in i.node.inputs[1:] if v is not None]
        graph.remove_node(root, keep_outputs=True)
        conv = add_conv(graph, first, al, weight.astype(first.weight.dtype), bias.astype(first.weight.dtype),
                        out if len(terms) == 1 else f"{name}_out", name)
        if len(terms) > 1:
            _set_type(conv.outputs[0], dtype, self.shapes.shape(first.out))
            terms = [conv.outputs[0] if t is None else t for t in terms]
            acc = terms[0]
            for k, t in enumerate(terms[1:], start=1):
                last = k == len(terms) - 1
                node = graph.add_node("Add", [acc, t], [out if last else f"{name}_sum"], name=f"{name}_add",
                                      anchor=root)
                acc = node.outputs[0]
        remove_dead(graph, old_nodes[1:])
        drop_unused(graph, weights)


# =============================================================================================
# passes


# =============================================================================================
# pool_through_concat

POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})


@dataclass(kw_only=True)
class _PoolMatch(Match):
    concat: Node  # the Concat the pool reads


class PoolThroughConcat(Rule):
    name = "pool_through_concat"
    root_ops = tuple(sorted(POOLS))

    def __init__(self, shapes: ShapeView) -> None:
        self.shapes = shapes

    def match(self, graph: Graph, node: Node) -> Match | str | None:
        concat = graph.producer(node.inputs[0]) if node.inputs else None
        if not is_op(concat, "Concat") or len(concat.inputs) < 2:
            return None
        if sole_consumer(graph, concat.outputs[0]) is not node:
            return "the Concat's output has other readers"
        if any(v is not None and (graph.uses(v) or graph.is_graph_output(v)) for v in node.outputs[1:]):
            return "MaxPool's Indices output is read"
        if any(a.ref_attr_name for a in node.attrs.values()):
            return "attributes refer to a function's attributes"
        why = self._axis_refusal(graph, concat)
        if why:
            return why
        if not node.op_type.startswith("Global"):
            strides = node.attr("strides") or []
            if prod(int(v) for v in strides) < 2:
                return "the pool does not shrink the tensor (no copy saved)"
        return _PoolMatch(node, concat=concat)

    def _axis_refusal(self, graph: Graph, concat: Node) -> str | None:
        """Why the Concat's axis is not the batch or channel axis, or None."""
        dims = self.shapes.shape(concat.outputs[0])
        axis = concat.attr("axis")
        if axis is None or (axis < 0 and dims is None):
            return "concat axis unknown"
        if axis < 0:
            axis += len(dims)
        if axis not in (0, 1):
            return "the Concat joins a spatial axis (a pool window would straddle two pieces)"
        return None

    def rewrite(self, graph: Graph, match: Match) -> None:
        node, concat = match.node, match.concat
        y = node.outputs[0]
        attrs = {name: node.attr(name) for name in node.attrs}
        pooled = []
        for i, piece in enumerate(concat.inputs):
            p = graph.add_node(node.op_type, [piece], [f"{y.name}_{i}"], attrs, name=f"{node.name or node.op_type}_{i}",
                               domain=node.domain, anchor=node)
            pooled.append(p.outputs[0])
        new = graph.add_node("Concat", pooled, [f"{y.name}_concat"], {"axis": concat.attr("axis")},
                             name=f"{concat.name or 'Concat'}_pooled", anchor=node)
        new.outputs[0].type = y.type
        graph.replace_all_uses(y, new.outputs[0])
        remove_dead(graph, [node, concat])


def _opset(model: Model) -> int:
    return model.opset("") or 1


_PADDING = {"allow_padding": Option(True, "zero-pad smaller kernels to merge them with larger ones when the cost "
                                         "model says it pays", bool)}


@register
class MergeConcatConvsPass(RulePass):
    name = "merge_concat_convs"
    summary = "parallel convs of one tensor whose outputs are concatenated -> one conv (DeepRebirth branch)"
    options = _PADDING

    def rules(self, model: Model, ctx: PassContext) -> list[Rule]:
        return [MergeConcatConvs(ShapeView(model), self.opt(ctx, "allow_padding"))]


@register
class HorizontalFusionPass(RulePass):
    name = "horizontal_fusion"
    summary = "sibling Conv/MatMul/Gemm layers reading one tensor -> one wide layer + Split, when it pays"
    options = {**_PADDING,
               "blocked_layout": Option(True, "charge the layout reorders a channel Split of a 2-D conv output costs "
                                              "on runtimes with channel-blocked conv kernels (onnxruntime CPU)", bool)}

    def rules(self, model: Model, ctx: PassContext) -> list[Rule]:
        rule = HorizontalFusion(ShapeView(model), _opset(model), self.opt(ctx, "allow_padding"),
                                self.opt(ctx, "blocked_layout"))
        return [rule]


@register
class MergeSumBranchesPass(RulePass):
    name = "merge_sum_branches"
    summary = "summed conv branches of one tensor (RepVGG/ACNet: kxk + 1x1 + identity) -> one conv"

    def rules(self, model: Model, ctx: PassContext) -> list[Rule]:
        return [MergeSumBranches(ShapeView(model))]


@register
class PoolThroughConcatPass(RulePass):
    name = "pool_through_concat"
    summary = "pool(Concat(a, b, ...)) -> Concat(pool(a), pool(b), ...) when the pool shrinks the tensor"

    def rules(self, model: Model, ctx: PassContext) -> list[Rule]:
        return [PoolThroughConcat(ShapeView(model))]
