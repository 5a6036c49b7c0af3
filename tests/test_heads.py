"""Pruning whole attention heads (``channels.analyze(heads=True)``, ``prune_filters.attention=heads``).

Encoder layers are built with onnx.helper in the exporters' forms: separate Q/K/V projections (MatMul + Add,
or Gemm on 2-D tokens), the head split Reshape (constant target, or one computed from ``Shape`` as
TorchScript exports it), Transpose, the scaled ``q·kᵀ``, an additive mask, Softmax, ``·v``, the Transpose
back, the merge Reshape and the output projection. The strong check is the one of tests/test_shrink.py:
the dropped heads are silenced (their rows of the output projection zeroed), so removing them must not
change the outputs; the Reshape targets must then say ``H'``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.compress import channels
from graphopt.compress.channels import shrink
from graphopt.core.onnx_io import from_proto, to_proto
from tests.test_shrink import assert_same_outputs, random_plan, silence_dropped
from tests.util import apply_pass, init, make_model, tensor

HIDDEN, HEADS, HEAD_DIM, SEQ = 16, 4, 4, 5


class Layer:
    """Builds one encoder layer node by node (names are unique, weights seeded)."""

    def __init__(self, form: str, target: str, mask: str, rope: bool = False, seed: int = 0) -> None:
        self.form, self.target, self.mask, self.rope = form, target, mask, rope
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs = [tensor("x", [SEQ, HIDDEN] if form == "gemm" else ["N", SEQ, HIDDEN])]

    def name(self, stem: str) -> str:
        return f"{stem}_{len(self.nodes) + len(self.inits)}"

    def const(self, array: np.ndarray, stem: str = "c") -> str:
        n = self.name(stem)
        self.inits.append(init(n, array))
        return n

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out + "_node", **attrs))
        return out

    def proj(self, x: str, out: int) -> str:
        w = (self.rng.standard_normal((self.width(x), out)) / 3).astype(np.float32)
        b = (self.rng.standard_normal(out) * 0.1).astype(np.float32)
        if self.form == "gemm":
            return self.op("Gemm", [x, self.const(w.T.copy(), "w"), self.const(b, "b")], transB=1)
        return self.op("Add", [self.op("MatMul", [x, self.const(w, "w")]), self.const(b, "b")])

    def width(self, x: str) -> int:
        return HIDDEN  # every projection of the layer reads HIDDEN features

    def qkv(self) -> list[str]:
        """Separate projections, or one fused ``[HIDDEN, 3·HIDDEN]`` projection split into Q, K and V."""
        if self.form == "interleaved":  # [N, S, H, 3, D]: q, k, v of each head side by side, picked by Gather
            fused = self.op("Reshape", [self.proj("x", 3 * HIDDEN),
                                        self.const(np.array([0, 0, HEADS, 3, HEAD_DIM], np.int64), "shape")])
            return [self.op("Gather", [fused, self.const(np.array(i, np.int64), "i")], axis=3) for i in range(3)]
        if self.form != "fused":
            return [self.proj("x", HIDDEN) for _ in range(3)]
        fused = self.proj("x", 3 * HIDDEN)
        outs = [self.name("qkv") + f"_{i}" for i in range(3)]
        self.nodes.append(helper.make_node("Split", [fused, self.const(np.array([HIDDEN] * 3, np.int64), "sizes")],
                                           outs, name=outs[0] + "_split", axis=-1))
        return outs

    def split_target(self, x: str) -> str:
        """``[N, S, H, D]`` (``[S, H, D]`` for 2-D tokens): a constant, or ``Shape``-computed batch and length."""
        if self.form == "gemm":
            return self.const(np.array([SEQ, HEADS, HEAD_DIM], np.int64), "shape")
        if self.form == "d_outer":  # [N, S, D, H]: the head dim outside the heads
            return self.const(np.array([0, 0, HEAD_DIM, HEADS], np.int64), "shape")
        if self.target == "const":
            return self.const(np.array([0, 0, HEADS, HEAD_DIM], np.int64), "shape")
        shape = self.op("Shape", [x])
        parts = [self.op("Unsqueeze", [self.op("Gather", [shape, self.const(np.array(i, np.int64), "i")], axis=0),
                                       self.const(np.array([0], np.int64), "axes")]) for i in (0, 1)]
        return self.op("Concat", [*parts, self.const(np.array([HEADS], np.int64), "h"),
                                  self.const(np.array([HEAD_DIM], np.int64), "d")], axis=0)

    def heads(self, x: str, perm: list[int]) -> str:
        if self.form == "interleaved":  # already split into heads
            return self.op("Transpose", [x], perm=perm)
        return self.op("Transpose", [self.op("Reshape", [x, self.split_target(x)])], perm=perm)

    def rotate_half(self, x: str) -> str:
        """Rotary embedding: ``x·cos + rotate_half(x)·sin``, halves of the head dim swapped."""
        half = HEAD_DIM // 2
        axes = self.const(np.array([-1], np.int64), "axes")
        lo = self.op("Slice", [x, self.const(np.array([0], np.int64)), self.const(np.array([half], np.int64)), axes])
        hi = self.op("Slice", [x, self.const(np.array([half], np.int64)),
                               self.const(np.array([HEAD_DIM], np.int64)), axes])
        rot = self.op("Concat", [self.op("Neg", [hi]), lo], axis=-1)
        cos = self.const(self.rng.standard_normal((SEQ, HEAD_DIM)).astype(np.float32), "cos")
        sin = self.const(self.rng.standard_normal((SEQ, HEAD_DIM)).astype(np.float32), "sin")
        return self.op("Add", [self.op("Mul", [x, cos]), self.op("Mul", [rot, sin])])

    def build(self) -> onnx.ModelProto:
        three = self.form == "gemm"
        p = [1, 0, 2] if three else [0, 2, 1, 3]
        pk = [1, 2, 0] if three else [0, 2, 3, 1]
        back = p
        if self.form == "d_outer":
            p, pk, back = [0, 3, 1, 2], [0, 3, 2, 1], [0, 2, 3, 1]
        q, k, v = (self.heads(t, perm) for t, perm in zip(self.qkv(), (p, pk, p)))
        if self.rope:
            q = self.rotate_half(q)
        s = self.op("Div", [self.op("MatMul", [q, k]), self.const(np.array(2.0, np.float32), "scale")])
        if self.mask == "broadcast":  # [N, 1, 1, S]: the same for every head
            self.inputs.append(tensor("mask", [1, 1, SEQ] if three else ["N", 1, 1, SEQ]))
            s = self.op("Add", [s, "mask"])
        elif self.mask == "per_head":  # [N, H, S, S]: indexes heads
            self.inputs.append(tensor("mask", ["N", HEADS, SEQ, SEQ]))
            s = self.op("Add", [s, "mask"])
        o = self.op("MatMul", [self.op("Softmax", [s], axis=-1), v])
        o = self.op("Transpose", [o], perm=back)
        merge = [SEQ, HIDDEN] if three else [0, 0, HIDDEN]
        o = self.op("Reshape", [o, self.const(np.array(merge, np.int64), "shape")])
        h = self.op("Relu", [self.proj(o, HIDDEN)])  # the output projection, then a small FFN
        y = self.op("Add", [self.proj(h, HIDDEN), "x"])
        out = [tensor(y, [SEQ, HIDDEN] if three else ["N", SEQ, HIDDEN])]
        model = make_model(self.nodes, self.inputs, [], self.inits, opset=17)
        model.graph.output.extend(out)
        return model


FORMS = [("matmul", "const"), ("matmul", "shape"), ("gemm", "const"), ("fused", "const")]


def head_group(result: channels.ChannelAnalysis) -> channels.Group:
    """The group whose members include the head split Reshape's output."""
    reshapes = [n for n in result.model.graph.nodes if n.op_type == "Reshape"]
    found = {g.gid: g for r in reshapes for g in result.groups if g.member(r.outputs[0].name) is not None}
    assert len(found) == 1, found
    return next(iter(found.values()))


def reshape_head_counts(proto: onnx.ModelProto) -> list[int]:
    """The head axis of every split Reshape's output, after shape inference (targets computed or constant)."""
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in inferred.graph.value_info}
    out = []
    for n in proto.graph.node:
        shape = shapes.get(n.output[0]) if n.op_type == "Reshape" else None
        if shape is not None and len(shape) >= 3 and shape[-1] == HEAD_DIM:
            out.append(shape[-2])
    return out


@pytest.mark.parametrize("form,target", FORMS)
@pytest.mark.parametrize("mask", ["none", "broadcast"])
def test_a_group_of_heads_spans_q_k_v_and_the_output_projection(form, target, mask):
    proto = Layer(form, target, mask).build()
    result = channels.analyze(from_proto(proto), heads=True)
    g = head_group(result)
    assert g.prunable and g.size == HEADS and g.width == HEAD_DIM
    # each head: D rows of Q, K and V (their weights and biases) and D input rows of the output projection
    w_axis = 0 if form == "gemm" else 1
    weights = [p for p in g.producers if p.param.startswith("w")]
    assert [p.axis for p in weights] == [w_axis] * len(weights)
    if form == "fused":  # one weight: head h is its D columns in each of the Q, K and V blocks
        (w,) = weights
        np.testing.assert_array_equal(w.index_map[1], np.concatenate([np.arange(4, 8) + HIDDEN * j for j in range(3)]))
    else:
        assert len(weights) == 3 and all(p.index_map.shape == (HEADS, HEAD_DIM) for p in g.producers)
    (consumer,) = g.consumers
    assert consumer.index_map.shape == (HEADS, HEAD_DIM) and consumer.axis == (1 if form == "gemm" else 0)
    np.testing.assert_array_equal(consumer.index_map, np.arange(HIDDEN).reshape(HEADS, HEAD_DIM))
    # head_dim mode (the default) keeps its groups: q/k's and v's head dims, a position shared by the heads
    default = channels.analyze(from_proto(proto))
    sizes = sorted(g.size for g in default.groups if any(g.member(n.outputs[0].name) is not None for n in
                                                         default.model.graph.nodes if n.op_type == "Reshape"))
    assert sizes == [HEAD_DIM, HEAD_DIM]


@pytest.mark.parametrize("form,target", FORMS)
@pytest.mark.parametrize("mask", ["none", "broadcast"])
def test_pruning_silenced_heads_keeps_the_outputs(form, target, mask):
    proto = Layer(form, target, mask).build()
    for seed in range(3):
        model = from_proto(proto)
        result = channels.analyze(model, heads=True)
        plan = random_plan(result, np.random.default_rng(seed))
        kept_heads = len(plan[head_group(result).gid])
        silence_dropped(model, result, plan, "consumers")
        reference = to_proto(model)
        result = channels.analyze(model, heads=True)
        stats = shrink.apply(model, result, plan)
        pruned = to_proto(model)
        onnx.checker.check_model(pruned, full_check=True)
        assert stats["params_removed"] > 0
        for batch in (2, 3):
            if form == "gemm" and batch == 3:
                continue  # 2-D tokens have no batch axis
            assert_same_outputs(reference, pruned, batch=batch)
        assert reshape_head_counts(pruned) == [kept_heads] * 3


def test_constant_split_targets_are_rewritten_to_the_kept_head_count():
    proto = Layer("matmul", "const", "none").build()
    model = from_proto(proto)
    result = channels.analyze(model, heads=True)
    shrink.apply(model, result, {head_group(result).gid: np.array([0, 2])})
    pruned = to_proto(model)
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    targets = [consts[n.input[1]].tolist() for n in pruned.graph.node if n.op_type == "Reshape"]
    assert targets.count([0, 0, 2, HEAD_DIM]) == 3 and [0, 0, 2 * HEAD_DIM] in targets


@pytest.mark.parametrize("case,reason", [("per_head_mask", "'mask' is a graph input"), ("rotary", "Slice"),
                                         ("interleaved", "Gather"), ("d_outer", "moves the shrinking axis")])
def test_what_the_walk_cannot_prove_freezes_the_heads(case, reason):
    layer = Layer(case if case in ("interleaved", "d_outer") else "matmul", "const",
                  "per_head" if case == "per_head_mask" else "none", rope=case == "rotary")
    result = channels.analyze(from_proto(layer.build()), heads=True)
    frozen = [g for g in result.groups if any(reason in r for r in g.frozen_all)]
    assert frozen and all(not g.prunable for g in frozen)
    # no group of heads is left prunable: every group holding a tensor of the attention is frozen
    inside = {n.outputs[0].name for n in result.model.graph.nodes if n.op_type in ("Reshape", "Transpose", "Gather")}
    attention = [g for g in result.groups if any(m.value in inside for m in g.members)]
    assert attention and all(g.frozen is not None for g in attention)


def test_prune_filters_removes_a_forced_head_count_and_refits():
    proto = Layer("matmul", "shape", "broadcast").build()
    result = channels.analyze(from_proto(proto), heads=True)
    gid = head_group(result).gid
    res, out = apply_pass("prune_filters", proto, attention="heads", channels=f"{gid}:2")
    assert res.changed
    (group,) = [g for g in res.stats["groups"] if g["group"] == gid]
    assert group["channels_after"] == 2
    assert reshape_head_counts(out) == [2, 2, 2]


def test_inspect_groups_heads_lists_the_head_group(tmp_path, capsys):
    from graphopt.app import cli

    path = tmp_path / "layer.onnx"
    onnx.save(Layer("matmul", "const", "none").build(), path)
    sizes = {}
    for flag in ([], ["--heads"]):
        assert cli.main(["inspect", str(path), "--groups", "--json", *flag]) == 0
        sizes[bool(flag)] = sorted(g["size"] for g in json.loads(capsys.readouterr().out)["groups"] if g["prunable"])
    assert sizes[True].count(HEADS) == 1 and sizes[False].count(HEAD_DIM) == 2
    assert cli.main(["inspect", str(path), "--heads"]) == 2
    assert "--heads only applies with --groups" in capsys.readouterr().err
