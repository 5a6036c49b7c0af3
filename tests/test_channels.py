"""Channel dependency analysis (graphopt/compress/channels/): groups, index maps, roles and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.compress import channels
from graphopt.core.onnx_io import from_proto, load
from tests.util import IR_VERSION

ROOT = Path(__file__).resolve().parents[1]
ZOO = json.loads((ROOT / "models" / "zoo.json").read_text())
ZOO_FILES = sorted({ROOT / m["file"] for m in ZOO["models"]})
CANONICAL = [ROOT / m["file"] for m in ZOO["models"] if m.get("form") == "canonical"]


class Net:
    """A tiny ONNX graph builder for channel tests: tracks every tensor's static shape (batch ``N``)."""

    def __init__(self, channels_in: int = 3, hw: int = 8, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple] = {"x": ("N", channels_in, hw, hw)}
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array: np.ndarray, prefix: str = "w") -> str:
        name = self.name(prefix)
        array = np.asarray(array)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        self.inits.append(numpy_helper.from_array(array, name))
        self.shapes[name] = tuple(np.asarray(array).shape)
        return name

    def node(self, op: str, inputs: list[str], shape: tuple, n_out: int = 1, **attrs) -> str:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=outs[0] + "_node", **attrs))
        for o in outs:
            self.shapes[o] = shape
        return outs[0] if n_out == 1 else outs

    def c(self, x: str) -> int:
        return self.shapes[x][1]

    def conv(self, x: str, cout: int, k: int = 3, group: int = 1, bias: bool = True) -> str:
        n, cin, h, w = self.shapes[x]
        fan_in = cin * k * k / group
        weight = (self.rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(fan_in)).astype(np.float32)
        ins = [x, self.const(weight)]
        if bias:
            ins.append(self.const(self.rng.standard_normal(cout).astype(np.float32) * 0.1, "b"))
        return self.node("Conv", ins, (n, cout, h, w), pads=[k // 2] * 4, group=group, kernel_shape=[k, k])

    def bn(self, x: str) -> str:
        c = self.c(x)
        params = [self.rng.uniform(0.5, 1.5, c), self.rng.standard_normal(c) * 0.1, self.rng.standard_normal(c) * 0.1,
                  self.rng.uniform(0.5, 1.5, c)]
        return self.node("BatchNormalization", [x, *(self.const(p.astype(np.float32), "bn") for p in params)],
                         self.shapes[x])

    def unary(self, op: str, x: str, **attrs) -> str:
        return self.node(op, [x], self.shapes[x], **attrs)

    def binary(self, op: str, a: str, b: str) -> str:
        sa, sb = self.shapes[a], self.shapes[b]
        rank = max(len(sa), len(sb))
        sa, sb = (1,) * (rank - len(sa)) + sa, (1,) * (rank - len(sb)) + sb
        shape = tuple(p if p != 1 else q for p, q in zip(sa, sb))
        return self.node(op, [a, b], shape)

    def gap_flatten(self, x: str) -> str:
        n, c = self.shapes[x][:2]
        p = self.node("GlobalAveragePool", [x], (n, c, 1, 1))
        return self.node("Flatten", [p], (n, c))

    def gemm(self, x: str, out: int, trans_b: int = 1) -> str:
        n, f = self.shapes[x]
        w = (self.rng.standard_normal((out, f) if trans_b else (f, out)) / np.sqrt(f)).astype(np.float32)
        return self.node("Gemm", [x, self.const(w), self.const(np.zeros(out, np.float32), "b")], (n, out),
                         transB=trans_b)

    def proto(self, outputs: list[str], opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(self.shapes["x"]))],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(self.shapes[o])) for o in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
        onnx.checker.check_model(model, full_check=True)
        return model


# ------------------------------------------------------------------------------------------------
# small graphs, shared with tests/test_shrink.py


def chain() -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv -> GAP -> Flatten -> Gemm."""
    n = Net()
    a = n.unary("Relu", n.bn(n.conv("x", 8)))
    b = n.unary("Relu", n.conv(a, 6))
    return n.proto([n.gemm(n.gap_flatten(b), 4)])


def residual() -> onnx.ModelProto:
    """Two residual adds: the stem conv, both block convs' outputs and the shortcut are one group."""
    n = Net()
    s = n.unary("Relu", n.bn(n.conv("x", 8)))
    h = n.unary("Relu", n.bn(n.conv(s, 5)))
    a = n.unary("Relu", n.binary("Add", n.bn(n.conv(h, 8)), s))
    h2 = n.unary("Relu", n.conv(a, 4))
    a2 = n.binary("Add", n.conv(h2, 8), a)
    return n.proto([n.gemm(n.gap_flatten(a2), 3)])


def concat() -> onnx.ModelProto:
    """Inception-style: three branches concatenated along channels, then a consumer conv."""
    n = Net()
    s = n.unary("Relu", n.conv("x", 6))
    b1 = n.unary("Relu", n.conv(s, 4, k=1))
    b2 = n.unary("Relu", n.conv(n.unary("Relu", n.conv(s, 3, k=1)), 5))
    b3 = n.unary("Relu", n.conv(n.node("MaxPool", [s], n.shapes[s], kernel_shape=[3, 3], pads=[1] * 4), 2, k=1))
    cat = n.node("Concat", [b1, b2, b3], ("N", 11, 8, 8), axis=1)
    return n.proto([n.gemm(n.gap_flatten(n.conv(cat, 7)), 3)])


def flatten_gemm() -> onnx.ModelProto:
    """VGG-style: Conv -> Relu -> MaxPool -> Flatten -> Gemm (channel c is the feature block [16c, 16c+16))."""
    n = Net()
    r = n.unary("Relu", n.conv("x", 5))
    p = n.node("MaxPool", [r], ("N", 5, 4, 4), kernel_shape=[2, 2], strides=[2, 2])
    f = n.node("Flatten", [p], ("N", 80))
    return n.proto([n.gemm(n.unary("Relu", n.gemm(f, 12, trans_b=0)), 3)])


def depthwise() -> onnx.ModelProto:
    """MobileNetV2 block: expand 1x1 -> BN -> Clip -> depthwise 3x3 -> BN -> Clip -> project, residual."""
    n = Net(channels_in=4)
    lo, hi = n.const(np.array(0, np.float32), "lo"), n.const(np.array(6, np.float32), "hi")
    stem = n.conv("x", 6, k=1)
    e = n.node("Clip", [n.bn(n.conv(stem, 12, k=1)), lo, hi], ("N", 12, 8, 8))
    d = n.node("Clip", [n.bn(n.conv(e, 12, group=12)), lo, hi], ("N", 12, 8, 8))
    p = n.bn(n.conv(d, 6, k=1))
    out = n.binary("Add", p, stem)
    return n.proto([n.gemm(n.gap_flatten(out), 3)])


def se_block() -> onnx.ModelProto:
    """Squeeze-and-excitation: x * sigmoid(conv(relu(conv(gap(x))))), the Mul broadcasts [N,C,1,1]."""
    n = Net()
    x = n.unary("Relu", n.conv("x", 8))
    s = n.node("GlobalAveragePool", [x], ("N", 8, 1, 1))
    s = n.unary("Relu", n.conv(s, 2, k=1))
    s = n.unary("Sigmoid", n.conv(s, 8, k=1))
    y = n.binary("Mul", x, s)
    return n.proto([n.gemm(n.gap_flatten(n.conv(y, 4)), 3)])


def shuffle() -> onnx.ModelProto:
    """ShuffleNet unit: Split channels, branch conv, Concat, shuffle (Reshape -> Transpose -> Reshape), Slice."""
    n = Net()
    s = n.unary("Relu", n.conv("x", 8))
    left, right = n.node("Split", [s, n.const(np.array([4, 4], np.int64), "split")], ("N", 4, 8, 8), n_out=2, axis=1)
    br = n.unary("Relu", n.bn(n.conv(n.unary("Relu", n.conv(right, 4, k=1)), 4, k=1)))
    cat = n.node("Concat", [left, br], ("N", 8, 8, 8), axis=1)
    r = n.node("Reshape", [cat, n.const(np.array([0, 2, 4, 8, 8], np.int64), "shape")], ("N", 2, 4, 8, 8))
    t = n.node("Transpose", [r], ("N", 4, 2, 8, 8), perm=[0, 2, 1, 3, 4])
    y = n.node("Reshape", [t, n.const(np.array([0, 8, 8, 8], np.int64), "shape")], ("N", 8, 8, 8))
    lo = n.node("Slice", [y, *(n.const(np.array([v], np.int64), "sl") for v in (0, 4, 1))], ("N", 4, 8, 8))
    hi = n.node("Slice", [y, *(n.const(np.array([v], np.int64), "sl") for v in (4, 8, 1))], ("N", 4, 8, 8))
    z = n.binary("Add", n.conv(lo, 4, k=1), n.conv(hi, 4, k=1))
    return n.proto([n.gemm(n.gap_flatten(z), 3)])


def dynamic_shuffle() -> onnx.ModelProto:
    """Channel shuffle whose first Reshape target is Concat(Unsqueeze(Shape(x)[0]), [2, 4, 8, 8])."""
    n = Net()
    s = n.conv("x", 8)
    shp = n.node("Shape", [s], (4,))
    batch = n.node("Gather", [shp, n.const(np.array(0, np.int64), "i")], ())
    ub = n.node("Unsqueeze", [batch, n.const(np.array([0], np.int64), "ax")], (1,))
    target = n.node("Concat", [ub, n.const(np.array([2, 4, 8, 8], np.int64), "rest")], (5,), axis=0)
    r = n.node("Reshape", [s, target], ("N", 2, 4, 8, 8))
    t = n.node("Transpose", [r], ("N", 4, 2, 8, 8), perm=[0, 2, 1, 3, 4])
    y = n.node("Reshape", [t, n.const(np.array([0, 8, 8, 8], np.int64), "shape")], ("N", 8, 8, 8))
    return n.proto([n.gemm(n.gap_flatten(n.conv(n.unary("Relu", y), 3)), 2)])


def attention() -> onnx.ModelProto:
    """Multi-head self-attention on [N, 5, 8] tokens, 2 heads of 4: q/k head dims and v head dims are groups."""
    n = Net()
    n.shapes["x"] = ("N", 5, 8)

    def proj(x: str, out: int) -> str:
        w = (n.rng.standard_normal((n.shapes[x][-1], out)) / 3).astype(np.float32)
        m = n.node("MatMul", [x, n.const(w)], ("N", 5, out))
        return n.binary("Add", m, n.const(n.rng.standard_normal(out).astype(np.float32) * 0.1, "b"))

    def heads(x: str, perm: list[int], shape: tuple) -> str:
        r = n.node("Reshape", [x, n.const(np.array([0, 0, 2, 4], np.int64), "shape")], ("N", 5, 2, 4))
        return n.node("Transpose", [r], shape, perm=perm)

    q = heads(proj("x", 8), [0, 2, 1, 3], ("N", 2, 5, 4))
    k = heads(proj("x", 8), [0, 2, 3, 1], ("N", 2, 4, 5))
    v = heads(proj("x", 8), [0, 2, 1, 3], ("N", 2, 5, 4))
    s = n.node("MatMul", [q, k], ("N", 2, 5, 5))
    s = n.node("Softmax", [n.binary("Div", s, n.const(np.array(2.0, np.float32), "scale"))], ("N", 2, 5, 5), axis=-1)
    o = n.node("Transpose", [n.node("MatMul", [s, v], ("N", 2, 5, 4))], ("N", 5, 2, 4), perm=[0, 2, 1, 3])
    o = n.node("Reshape", [o, n.const(np.array([0, 0, 8], np.int64), "shape")], ("N", 5, 8))
    h = n.unary("Relu", proj(o, 6))
    return n.proto([n.binary("Add", proj(h, 8), "x")])


def unknown_op() -> onnx.ModelProto:
    """LRN mixes neighbouring channels: no rule, so the group it reads is frozen."""
    n = Net()
    a = n.unary("Relu", n.conv("x", 6))
    lrn = n.node("LRN", [a], n.shapes[a], size=3)
    b = n.unary("Relu", n.conv(lrn, 5))
    return n.proto([n.gemm(n.gap_flatten(b), 3)])


def analyse(proto: onnx.ModelProto) -> channels.ChannelAnalysis:
    return channels.analyze(from_proto(proto))


def group_of(result: channels.ChannelAnalysis, value: str) -> list[channels.Group]:
    return [g for g in result.groups if g.member(value) is not None]


def conv_outputs(proto: onnx.ModelProto) -> list[str]:
    return [n.output[0] for n in proto.graph.node if n.op_type == "Conv"]


# ------------------------------------------------------------------------------------------------
# tests


def test_chain_groups_roles_and_frozen_output():
    proto = chain()
    result = analyse(proto)
    c1, c2 = conv_outputs(proto)
    (g1,) = group_of(result, c1)
    assert g1.prunable and g1.size == 8 and g1.divisor == 1 and g1.min_keep == 1
    # producers: the first conv's W (axis 0) and bias, and the four BN parameters
    by_node = {}
    for p in g1.producers:
        by_node.setdefault(p.node, []).append((p.param, p.axis))
    conv1 = next(n for n in proto.graph.node if n.output[0] == c1)
    assert sorted(by_node[conv1.name]) == sorted([(conv1.input[1], 0), (conv1.input[2], 0)])
    bn = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
    assert sorted(by_node[bn.name]) == sorted((p, 0) for p in bn.input[1:])
    # the consumer is the second conv, input axis 1 of its weight, identity map
    conv2 = next(n for n in proto.graph.node if n.output[0] == c2)
    (cons,) = g1.consumers
    assert (cons.node, cons.param, cons.axis, cons.value) == (conv2.name, conv2.input[1], 1, conv2.input[0])
    assert np.array_equal(cons.index_map[:, 0], np.arange(8))
    # the classifier's output is frozen, with a reason naming it
    frozen = result.frozen()
    assert len(frozen) == 1 and "output" in frozen[0].frozen and proto.graph.output[0].name in frozen[0].frozen
    assert not frozen[0].prunable


def test_residual_adds_couple_both_sides():
    proto = residual()
    result = analyse(proto)
    convs = conv_outputs(proto)
    stem, _, block1_out, _, block2_out = convs
    groups = {g.gid for v in (stem, block1_out, block2_out) for g in group_of(result, v)}
    assert len(groups) == 1
    g = result.group(groups.pop())
    assert g.prunable and g.size == 8
    # three producer convs (stem, block ends) + BNs; consumers: every conv/Gemm reading the stream
    producer_nodes = {p.node for p in g.producers}
    assert {n.name for n in proto.graph.node if n.op_type == "Conv" and n.output[0] in (stem, block1_out, block2_out)} \
        <= producer_nodes
    consumer_ops = sorted(next(n.op_type for n in proto.graph.node if n.name == c.node) for c in g.consumers)
    assert consumer_ops == ["Conv", "Conv", "Gemm"]
    # the inner convs are their own groups
    assert len(result.prunable()) == 3


def test_concat_offsets_per_branch():
    proto = concat()
    result = analyse(proto)
    final = next(n for n in proto.graph.node if n.op_type == "Conv" and n.input[0].startswith("concat"))
    cat_groups = [g for g in result.groups if any(c.node == final.name for c in g.consumers)]
    assert sorted(g.size for g in cat_groups) == [2, 4, 5]  # one group per branch, never merged
    maps = sorted(next(c.index_map[:, 0] for c in g.consumers if c.node == final.name).tolist() for g in cat_groups)
    assert maps == [list(range(4)), list(range(4, 9)), list(range(9, 11))]
    assert all(g.prunable for g in cat_groups)
    # the concat output is a member of each branch's group with the same offsets
    cat_name = final.input[0]
    assert sorted(g.member(cat_name).index_map[:, 0].tolist() for g in cat_groups) == maps


def test_flatten_into_gemm_maps_channel_to_feature_block():
    proto = flatten_gemm()
    result = analyse(proto)
    (conv,) = conv_outputs(proto)
    (g,) = group_of(result, conv)
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    (cons,) = [c for c in g.consumers if c.node == gemm.name]
    assert cons.axis == 0  # transB = 0: W is [features, out]
    assert cons.index_map.shape == (5, 16)
    assert np.array_equal(cons.index_map, np.arange(80).reshape(5, 16))


def test_depthwise_couples_in_and_out_channels():
    proto = depthwise()
    result = analyse(proto)
    dw = next(n for n in proto.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1
                                                                          for a in n.attribute))
    (g,) = [g for g in result.groups if g.member(dw.input[0]) is not None]
    assert g.member(dw.output[0]) is not None  # in and out channels of the depthwise conv: one group
    assert g.size == 12 and g.prunable
    assert any(p.node == dw.name and p.param == dw.input[1] and p.axis == 0 for p in g.producers)
    assert not any(c.node == dw.name for c in g.consumers)  # a depthwise conv does not mix channels
    project = next(n for n in proto.graph.node if n.op_type == "Conv" and n.input[0] == g.members[-1].value
                   or (n.op_type == "Conv" and g.member(n.input[0]) is not None and n.name != dw.name))
    assert any(c.node == project.name for c in g.consumers)


def test_se_block_mul_couples_excitation_and_features():
    proto = se_block()
    result = analyse(proto)
    convs = conv_outputs(proto)
    main, reduce, expand, _ = convs
    (g,) = group_of(result, main)
    assert g.member(expand) is not None  # the [N,C,1,1] excitation is coupled to the features it scales
    reduce_node = next(n for n in proto.graph.node if n.output[0] == reduce)
    assert any(c.node == reduce_node.name for c in g.consumers)  # reads the pooled features
    assert g.prunable and len(result.prunable()) == 3


def test_channel_shuffle_split_and_slice():
    proto = shuffle()
    result = analyse(proto)
    assert not result.frozen()[:-1] or all("output" in g.frozen for g in result.frozen())
    reshape_out = next(n.output[0] for n in proto.graph.node if n.op_type == "Reshape")
    transpose_out = next(n.output[0] for n in proto.graph.node if n.op_type == "Transpose")
    shuffled = [n.output[0] for n in proto.graph.node if n.op_type == "Reshape"][1]
    for g in group_of(result, shuffled):
        assert g.prunable
        m_r, m_t = g.member(reshape_out), g.member(transpose_out)
        assert m_r.axes == (1, 2) and m_t.axes == (1, 2)
        # a channel of the shuffle is one index of the per-group axis, taken in both groups (k = 2)
        assert m_r.index_map.shape[1] == 2
        # the final Reshape's position of each channel is the Transpose's permutation of the first one
        for row_r, row_y in zip(m_r.index_map, g.member(shuffled).index_map):
            g_idx, c_idx = np.unravel_index(row_r, (2, 4))
            assert sorted(row_y.tolist()) == sorted((c_idx * 2 + g_idx).tolist())
    # every channel of the split / slices belongs to some prunable group
    for n in proto.graph.node:
        if n.op_type in ("Split", "Slice"):
            for out in n.output:
                covered = sum(g.member(out).index_map.size for g in group_of(result, out))
                assert covered == 4 and all(g.prunable for g in group_of(result, out))


def test_unknown_op_freezes_group_and_names_it():
    proto = unknown_op()
    result = analyse(proto)
    lrn = next(n for n in proto.graph.node if n.op_type == "LRN")
    (g,) = group_of(result, lrn.input[0])
    assert g.frozen is not None and "LRN" in g.frozen and lrn.name in g.frozen
    assert not g.prunable and g not in result.prunable()
    assert any(g2.prunable for g2 in result.groups)  # the conv after it is still prunable


def test_graph_input_and_nonzero_channel_pad_freeze():
    n = Net()
    a = n.unary("Relu", n.conv("x", 4))
    p = n.node("Pad", [a, n.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64), "pads")], ("N", 6, 8, 8))
    proto = n.proto([n.gemm(n.gap_flatten(n.conv(p, 3)), 2)])
    result = analyse(proto)
    (g,) = group_of(result, a)
    assert g.frozen is not None and "Pad" in g.frozen and "axis 1" in g.frozen
    # same size, but shifted by one channel: still frozen
    n = Net()
    a = n.unary("Relu", n.conv("x", 4))
    p = n.node("Pad", [a, n.const(np.array([0, 1, 0, 0, 0, -1, 0, 0], np.int64), "pads")], ("N", 4, 8, 8))
    result = analyse(n.proto([n.gemm(n.gap_flatten(n.conv(p, 3)), 2)]))
    (g,) = group_of(result, a)
    assert g.frozen is not None and "pads axis 1" in g.frozen
    # the graph input's channels are in no group (nothing produces them)
    assert not group_of(result, "x")
    # a spatial-only pad is followed
    n = Net()
    a = n.unary("Relu", n.conv("x", 4))
    p = n.node("Pad", [a, n.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")], ("N", 4, 10, 10))
    result = analyse(n.proto([n.gemm(n.gap_flatten(n.conv(p, 3)), 2)]))
    (g,) = group_of(result, a)
    assert g.prunable and g.member(p) is not None


def test_transpose_resize_and_matmul():
    n = Net()
    a = n.unary("Relu", n.conv("x", 4))
    up = n.node("Resize", [a, "", n.const(np.array([1, 1, 2, 2], np.float32), "scales")], ("N", 4, 16, 16),
                mode="nearest")
    t = n.node("Transpose", [up], ("N", 16, 16, 4), perm=[0, 2, 3, 1])
    mm = n.node("MatMul", [t, n.const(n.rng.standard_normal((4, 5)).astype(np.float32))], ("N", 16, 16, 5))
    proto = n.proto([mm])
    result = analyse(proto)
    (g,) = group_of(result, a)
    assert g.prunable and g.member(up) is not None
    assert g.member(t).axes == (3,)
    mm_node = next(x for x in proto.graph.node if x.op_type == "MatMul")
    assert [(c.node, c.axis) for c in g.consumers] == [(mm_node.name, 0)]


def test_attention_heads_are_groups():
    proto = attention()
    result = analyse(proto)
    assert len(result.prunable()) == 3  # q/k head dims, v head dims, the MLP hidden layer
    reshapes = [n.output[0] for n in proto.graph.node if n.op_type == "Reshape"]
    qk = group_of(result, reshapes[0])
    assert len(qk) == 1 and qk[0].member(reshapes[1]) is not None  # q and k lose the same head dims
    g = qk[0]
    assert g.size == 4 and g.member(reshapes[0]).axes == (2, 3) and g.member(reshapes[0]).axis == 3
    # a head dim is one column per head in each projection: k = 2 positions
    q_proj = next(n for n in proto.graph.node if n.op_type == "MatMul")
    (prod,) = [p for p in g.producers if p.node == q_proj.name]
    assert prod.axis == 1 and prod.index_map.shape == (4, 2)
    assert np.array_equal(prod.index_map, np.array([[0, 4], [1, 5], [2, 6], [3, 7]]))
    assert not g.consumers  # contracted between activations: no weight reads these channels
    (gv,) = group_of(result, reshapes[2])
    assert gv is not g and {c.node for c in gv.consumers} == {
        next(n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[0] == reshapes[3])}
    # the residual stream is the graph input/output: frozen
    assert all("graph" in f.frozen for f in result.frozen())


def test_analysis_is_deterministic_and_covers_every_conv():
    for build in (chain, residual, concat, depthwise, se_block, shuffle):
        proto = build()
        a, b = analyse(proto), analyse(proto)
        assert [g.to_dict() for g in a.groups] == [g.to_dict() for g in b.groups]
        for conv in conv_outputs(proto):
            assert group_of(a, conv), f"{build.__name__}: {conv} in no group"
        # every dimension position is in exactly one group: per member value, the index maps partition it
        seen: dict[tuple, list[int]] = {}
        for g in a.groups:
            for m in g.members:
                seen.setdefault((m.value, m.axes), []).extend(m.index_map.ravel().tolist())
        for key, positions in seen.items():
            assert sorted(positions) == list(range(len(positions))), key


def test_dynamic_reshape_target_from_shape_is_followed():
    """A shuffle whose Reshape target is computed from Shape (``x.view(x.size(0), 2, 4, h, w)``) is prunable."""
    proto = dynamic_shuffle()
    result = analyse(proto)
    s = proto.graph.node[0].output[0]
    (g,) = group_of(result, s)
    assert g.prunable, g.frozen
    assert any(n.op_type == "Shape" for n in proto.graph.node)
    # a Shape whose value is used for anything but Reshape targets / Slice bounds freezes
    n2 = Net()
    s2 = n2.unary("Relu", n2.conv("x", 8))
    shp2 = n2.node("Shape", [s2], (4,))
    cos = n2.node("ConstantOfShape", [shp2], ("N", 8, 8, 8))
    out = n2.binary("Add", cos, n2.conv(s2, 8))
    result2 = analyse(n2.proto([n2.gemm(n2.gap_flatten(out), 2)]))
    (g2,) = group_of(result2, s2)
    assert g2.frozen is not None and "ConstantOfShape" in g2.frozen


def test_plan_cost_names_the_nodes_a_plan_reaches_in_graph_order():
    """``PlanCost.changed_nodes`` (what the shrink fixes and the cost re-costs): every producer and reader of a
    changed shape, once each, in graph order; an empty plan reaches nothing."""
    proto = chain()
    result = analyse(proto)
    c1, _ = conv_outputs(proto)
    (g1,) = group_of(result, c1)
    cost = result.plan_cost
    nodes = cost.changed_nodes(cost.new_shapes(result.dim_sizes({g1.gid: 4})))
    assert [n.op_type for n in nodes] == ["Conv", "BatchNormalization", "Relu", "Conv"]
    assert [n.seq for n in nodes] == sorted({n.seq for n in nodes})
    assert cost.changed_nodes({}) == []
    assert result.walk.nx is result.graph


def test_shape_evaluation_truncates_integer_division_and_refuses_other_ops():
    from graphopt.compress.channels.dims import CannotFollow
    from graphopt.compress.channels.shape_eval import eval_shape_op
    proto = onnx.parser.parse_model('''
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[1] a, int64[1] b, int64[1] c) => (int64[1] q, int64[N] r) {
            q = Div (a, b)
            r = Range (a, b, c)
        }''')
    div, rng = from_proto(proto).graph.toposort()
    # ONNX integer Div rounds toward zero: -7 / 2 = -3 (numpy's // gives -4)
    assert eval_shape_op(div, [np.array([-7]), np.array([2])]).tolist() == [-3]
    with pytest.raises(CannotFollow, match="Range"):
        eval_shape_op(rng, [np.array([0]), np.array([4]), np.array([1])])


# ------------------------------------------------------------------------------------------------
# the zoo


@pytest.mark.parametrize("path", CANONICAL, ids=lambda p: p.stem)
def test_zoo_freezes_only_what_must_be_frozen(path):
    model = load(path)
    result = channels.analyze(model)
    assert result.prunable(), "no prunable group"
    out_names = {v.name for v in model.graph.outputs}
    convs = [n for n in model.graph.nodes if n.op_type == "Conv"]
    for g in result.frozen():
        reason = g.frozen
        if path.stem == "transformer":
            # the residual stream feeds LayerNorm (statistics over channels); the token embedding's Shape
            # feeds the mask computation (Equal/Where), which a pruned width would change
            assert any(s in reason for s in ("LayerNormalization", "output", "flows into Equal")), reason
        elif path.stem == "shufflenet":
            # torch's export computes the shuffle's Reshape targets at runtime; onnx shape inference
            # cannot follow them, so the shapes after the first shuffle are unknown
            assert "output" in reason or "not known statically" in reason, reason
        else:
            assert any(m.value in out_names for m in g.members), reason
    if path.stem == "transformer":  # attention head dims (q/k, v) and the MLP of each layer
        flat = [g for g in result.prunable() if any(len(m.axes) == 2 for m in g.members)]
        assert len(flat) == 8 and len(result.prunable()) == 12
    if path.stem not in ("transformer", "shufflenet"):
        # every conv's output channels are prunable (the classifier is a Gemm)
        for conv in convs:
            gs = group_of(result, conv.outputs[0].name)
            assert gs and all(g.prunable for g in gs), conv.name


def test_zoo_shufflenet_after_lossless_is_prunable(tmp_path):
    """After the lossless preset folds the shape computations, every ShuffleNet group but the logits is prunable."""
    import graphopt
    res = graphopt.optimize(str(ROOT / "models" / "shufflenet.onnx"), output=str(tmp_path / "s.onnx"),
                            run_verify=False)
    model = from_proto(res.model)
    result = channels.analyze(model)
    frozen = result.frozen()
    assert len(frozen) == 1 and "output" in frozen[0].frozen
    assert len(result.prunable()) >= 10


def test_docstring_examples():
    import doctest
    import importlib
    results = [doctest.testmod(importlib.import_module(f"graphopt.compress.channels.{name}"))
               for name in channels.__all__]
    assert sum(r.failed for r in results) == 0
    assert sum(r.attempted for r in results) > 0  # the analysis example ran
