"""Property test: random CNN graphs from the supported ops, pruned with random plans.

For every seed, a generator (seeded numpy) builds a random graph: convolutions (plain, grouped,
depthwise, transposed), BN / InstanceNorm, activations, residual Add/Sub/Mul, SE blocks, per-channel
Div and Where, Concat, Split, Slice, Gather, pooling, Pad, Resize, Transpose round trips, channel shuffles,
Identity/Dropout/Cast, and a head (GAP -> Flatten -> Gemm, Flatten -> Gemm, or Reshape -> MatMul + Add).
Then:

* keeping every channel is an exact no-op (same bytes, same outputs);
* a random plan gives a model that passes ``onnx.checker`` (full check), runs in onnxruntime at two batch
  sizes with unchanged output shapes, has the MACs/params ``ChannelAnalysis.cost`` predicted, and —
  with the dropped channels' consumer weights zeroed beforehand — the same outputs as the unpruned model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphopt.compress import channels
from graphopt.compress.channels import shrink
from graphopt.core.onnx_io import from_proto, to_proto
from graphopt.measure import analysis
from tests.test_channels import Net
from tests.test_shrink import assert_same_outputs, outputs, prune_silenced

SEEDS = range(40)


class RandomNet:
    """Random graph generator over 4-D tensors [N, C, H, W]."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.n = Net(channels_in=int(self.rng.integers(1, 4)), hw=8, seed=seed)
        self.live = ["x"]
        self.ops: list[str] = []

    def pick(self) -> str:
        return self.live[int(self.rng.integers(len(self.live)))]

    def same(self, x: str, shape: tuple) -> list[str]:
        return [t for t in self.live if t != x and self.n.shapes[t] == shape]

    def ch(self, lo: int = 2, hi: int = 9) -> int:
        return int(self.rng.integers(lo, hi))

    def step(self) -> None:
        n, rng = self.n, self.rng
        x = self.pick()
        _, c, h, w = n.shapes[x]
        kinds = ["conv", "conv", "conv", "dw", "group", "convT", "bn", "inorm", "act", "act", "residual", "se", "div",
                 "where", "concat", "split", "slice", "gather", "pool", "pad", "resize", "transpose", "shuffle",
                 "identity"]
        kind = kinds[int(rng.integers(len(kinds)))]
        if x == "x" and kind not in ("conv", "act", "pool"):
            kind = "conv"  # the input's channels are frozen anyway; start from a layer
        self.ops.append(kind)
        y = None
        if kind == "conv":
            y = n.conv(x, self.ch(), k=int(rng.choice([1, 3])), bias=bool(rng.integers(2)))
        elif kind == "dw":
            y = n.conv(x, c, group=c)
        elif kind == "group" and c % 2 == 0:
            y = n.conv(x, 2 * self.ch(1, 4), k=1, group=2)
        elif kind == "convT":
            wt = (rng.standard_normal((c, self.ch(), 3, 3)) * 0.3).astype(np.float32)
            y = n.node("ConvTranspose", [x, n.const(wt), n.const(np.zeros(wt.shape[1], np.float32), "b")],
                       ("N", wt.shape[1], h, w), pads=[1] * 4)
        elif kind == "bn":
            y = n.bn(x)
        elif kind == "inorm":
            y = n.node("InstanceNormalization", [x, n.const(rng.uniform(0.5, 1.5, c)), n.const(rng.normal(0, .1, c))],
                       n.shapes[x])
        elif kind == "act":
            op = str(rng.choice(["Relu", "Sigmoid", "HardSwish", "LeakyRelu", "Tanh", "HardSigmoid", "Clip"]))
            if op == "Clip":
                y = n.node("Clip", [x, n.const(np.array(0, np.float32), "lo"), n.const(np.array(6, np.float32), "hi")],
                           n.shapes[x])
            else:
                y = n.unary(op, x)
        elif kind == "residual":
            others = self.same(x, n.shapes[x])
            other = others[0] if others else n.unary("Relu", n.conv(x, c, k=1))
            y = n.binary(str(rng.choice(["Add", "Sub", "Mul"])), x, other)
        elif kind == "se":
            s = n.node("GlobalAveragePool", [x], ("N", c, 1, 1))
            s = n.unary("Sigmoid", n.conv(n.unary("Relu", n.conv(s, self.ch(1, 4), k=1)), c, k=1))
            y = n.binary("Mul", x, s)
        elif kind == "div":
            y = n.binary("Div", x, n.const(rng.uniform(0.5, 2.0, (c, 1, 1)).astype(np.float32), "d"))
        elif kind == "where":
            cond = n.const(rng.integers(0, 2, (c, 1, 1)).astype(bool), "cond")
            y = n.node("Where", [cond, x, n.unary("Relu", x)], n.shapes[x])
        elif kind == "concat":
            others = [t for t in self.live if t != "x" and n.shapes[t][2:] == (h, w)]
            other = others[int(rng.integers(len(others)))] if others else n.conv(x, self.ch(), k=1)
            y = n.node("Concat", [x, other], ("N", c + n.shapes[other][1], h, w), axis=1)
        elif kind == "split" and c >= 2:
            first = int(rng.integers(1, c))
            a, b = n.node("Split", [x, n.const(np.array([first, c - first], np.int64), "sp")], ("N", first, h, w),
                          n_out=2, axis=1)
            n.shapes[b] = ("N", c - first, h, w)
            self.live.append(a)
            y = b
        elif kind == "slice" and c >= 2:
            lo = int(rng.integers(0, c - 1))
            hi = int(rng.integers(lo + 1, c + 1))
            bounds = [n.const(np.array([v], np.int64), "sl") for v in (lo, hi, 1)]
            y = n.node("Slice", [x, *bounds], ("N", hi - lo, h, w))
        elif kind == "gather":
            picks = rng.integers(0, c, int(rng.integers(1, c + 2)))
            y = n.node("Gather", [x, n.const(picks.astype(np.int64), "idx")], ("N", len(picks), h, w), axis=1)
        elif kind == "pool":
            if h >= 4 and rng.integers(2):
                y = n.node(str(rng.choice(["MaxPool", "AveragePool"])), [x], ("N", c, h // 2, w // 2),
                           kernel_shape=[2, 2], strides=[2, 2])
            else:
                y = n.node("MaxPool", [x], n.shapes[x], kernel_shape=[3, 3], pads=[1] * 4)
        elif kind == "pad":
            pads = n.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
            y = n.node("Pad", [x, pads], ("N", c, h + 2, w + 2))
        elif kind == "resize" and h <= 8:
            y = n.node("Resize", [x, "", n.const(np.array([1, 1, 2, 2], np.float32), "scales")], ("N", c, 2 * h, 2 * w),
                       mode="nearest")
        elif kind == "transpose":
            t = n.unary("Relu", n.node("Transpose", [x], ("N", h, w, c), perm=[0, 2, 3, 1]))
            y = n.node("Transpose", [t], n.shapes[x], perm=[0, 3, 1, 2])
        elif kind == "shuffle" and c % 2 == 0:
            if rng.integers(2):  # torch's export: the batch entry of the target comes from Shape at runtime
                batch = n.node("Gather", [n.node("Shape", [x], (4,)), n.const(np.array(0, np.int64), "i")], ())
                batch = n.node("Unsqueeze", [batch, n.const(np.array([0], np.int64), "ax")], (1,))
                target = n.node("Concat", [batch, n.const(np.array([2, c // 2, h, w], np.int64), "rest")], (5,),
                                axis=0)
            else:
                target = n.const(np.array([0, 2, c // 2, h, w], np.int64), "shape")
            r = n.node("Reshape", [x, target], ("N", 2, c // 2, h, w))
            t = n.node("Transpose", [r], ("N", c // 2, 2, h, w), perm=[0, 2, 1, 3, 4])
            y = n.node("Reshape", [t, n.const(np.array([0, c, h, w], np.int64), "shape")], n.shapes[x])
        elif kind == "identity":
            op = str(rng.choice(["Identity", "Dropout", "Cast"]))
            y = n.node(op, [x], n.shapes[x], **({"to": onnx.TensorProto.FLOAT} if op == "Cast" else {}))
        if y is None:
            y = n.conv(x, self.ch())
            self.ops[-1] = "conv"
        self.live.append(y)

    def build(self, steps: int) -> onnx.ModelProto:
        for _ in range(steps):
            self.step()
        n, rng = self.n, self.rng
        # every live tensor flows into the head (so nothing is dead): sum them after 1x1 convs to one width
        last = self.live[-1]
        _, c, h, w = n.shapes[last]
        head = str(rng.choice(["gap", "flatten", "matmul"]))
        if head == "gap":
            y = n.gemm(n.gap_flatten(last), 3)
        elif head == "flatten":
            if h > 4:
                last = n.node("MaxPool", [last], ("N", c, h // 2, w // 2), kernel_shape=[2, 2], strides=[2, 2])
                h, w = h // 2, w // 2
            y = n.gemm(n.node("Flatten", [last], ("N", c * h * w)), 3, trans_b=int(rng.integers(2)))
        else:
            p = n.node("GlobalAveragePool", [last], ("N", c, 1, 1))
            f = n.node("Reshape", [p, n.const(np.array([0, -1], np.int64), "shape")], ("N", c))
            m = n.node("MatMul", [f, n.const(rng.standard_normal((c, 3)).astype(np.float32))], ("N", 3))
            y = n.binary("Add", m, n.const(np.zeros(3, np.float32), "b"))
        outs = [y] + [t for t in self.live[1:-1] if not _is_read(n, t)][:1]
        return n.proto(outs)


def _is_read(n: Net, name: str) -> bool:
    return any(name in node.input for node in n.nodes)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_graph_prunes_validly(seed):
    proto = RandomNet(seed).build(int(np.random.default_rng(seed).integers(4, 11)))
    # keeping every channel is an exact no-op
    model = from_proto(proto)
    result = channels.analyze(model)
    before = to_proto(model).SerializeToString()
    shrink.apply(model, result, {g.gid: np.arange(g.size) for g in result.groups})
    after = to_proto(model)
    assert after.SerializeToString() == before
    for a, b in zip(outputs(proto), outputs(after)):
        np.testing.assert_array_equal(a, b)
    if not result.prunable():
        return
    r = prune_silenced(proto, seed)
    ref_shapes = [o.shape for o in outputs(r.reference, batch=3)]
    assert [o.shape for o in outputs(r.pruned, batch=3)] == ref_shapes
    assert_same_outputs(r.reference, r.pruned, batch=2)
    cost = analysis.analyze(r.model)
    assert r.predicted == (cost.macs, cost.params)
    assert r.stats["params_removed"] > 0


def test_generator_covers_the_supported_ops():
    """The seeds above exercise every kind of step (guards against a generator that degenerates)."""
    seen: set[str] = set()
    op_types: set[str] = set()
    for seed in SEEDS:
        g = RandomNet(seed)
        proto = g.build(int(np.random.default_rng(seed).integers(4, 11)))
        seen.update(g.ops)
        op_types.update(n.op_type for n in proto.graph.node)
    assert seen >= {"conv", "dw", "group", "convT", "bn", "inorm", "act", "residual", "se", "div", "where", "concat",
                    "split", "slice", "gather", "pool", "pad", "resize", "transpose", "shuffle", "identity"}
    assert op_types >= {"Shape", "Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "Concat",
                        "Split", "Slice", "Transpose", "Reshape", "Flatten", "Gemm", "MatMul", "Where", "Div", "Mul",
                        "Pad", "Resize", "MaxPool", "GlobalAveragePool", "Gather"}


@pytest.mark.parametrize("seed", SEEDS)
def test_random_graph_after_the_lossless_preset_prunes_validly(seed):
    """The prune preset analyses the *cleaned* graph: shuffles turned into Gathers (``channel_permute``),
    BN folded, layers merged. The cleaned graph computes the same, and a random plan on it prunes validly."""
    from graphopt.app.api import optimize
    proto = RandomNet(seed).build(int(np.random.default_rng(seed).integers(4, 11)))
    cleaned = optimize(proto, preset="lossless", run_verify=False).model
    onnx.checker.check_model(cleaned, full_check=True)
    assert_same_outputs(proto, cleaned, batch=2)
    if not channels.analyze(from_proto(cleaned)).prunable():
        return
    r = prune_silenced(cleaned, seed)
    assert [o.shape for o in outputs(r.pruned, batch=3)] == [o.shape for o in outputs(r.reference, batch=3)]
    assert_same_outputs(r.reference, r.pruned, batch=2)
    cost = analysis.analyze(r.model)
    assert r.predicted == (cost.macs, cost.params)
