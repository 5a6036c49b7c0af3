"""The ``channel_permute`` pass: channel shuffles become one Gather, folded into Slices, Gathers and convs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.app.api import optimize
from tests.util import apply_pass, init, make_model, op_types, run, tensor

ROOT = Path(__file__).resolve().parents[1]


def _shuffle_nodes(x: str, out: str, c: int, groups: int, tag: str = "") -> tuple[list, list]:
    """ShuffleNet's channel shuffle of ``x`` [N, c, 5, 5] (dynamic batch: Reshape with 0 and -1)."""
    nodes = [
        helper.make_node("Reshape", [x, f"split_shape{tag}"], [f"split{tag}"]),
        helper.make_node("Transpose", [f"split{tag}"], [f"swapped{tag}"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", [f"swapped{tag}", f"merge_shape{tag}"], [out]),
    ]
    inits = [init(f"split_shape{tag}", np.array([0, groups, c // groups, 5, 5], np.int64)),
             init(f"merge_shape{tag}", np.array([-1, c, 5, 5], np.int64))]
    return nodes, inits


def _shufflenet_unit(c: int = 8, depthwise_after: bool = False) -> onnx.ModelProto:
    """Concat(a, b) → shuffle → two Slices (halves): one read by a 1x1 conv, one passed through, then a
    second shuffle read by a conv (dense, or depthwise when ``depthwise_after``)."""
    rng = np.random.default_rng(0)
    half = c // 2
    nodes, inits = _shuffle_nodes("cat", "shuffled", c, 2)
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1), *nodes,
             helper.make_node("Slice", ["shuffled", "s0", "s1", "ax"], ["left"]),
             helper.make_node("Slice", ["shuffled", "s1", "s2", "ax"], ["right"]),
             helper.make_node("Conv", ["right", "w1"], ["branch"]),
             helper.make_node("Concat", ["left", "branch"], ["cat2"], axis=1)]
    more, more_inits = _shuffle_nodes("cat2", "shuffled2", c, 2, tag="2")
    group = c if depthwise_after else 1
    nodes += [*more, helper.make_node("Conv", ["shuffled2", "w2"], ["y"], group=group)]
    inits += [*more_inits, init("s0", np.array([0], np.int64)), init("s1", np.array([half], np.int64)),
              init("s2", np.array([c], np.int64)), init("ax", np.array([1], np.int64)),
              init("w1", rng.standard_normal((half, half, 1, 1)).astype(np.float32)),
              init("w2", rng.standard_normal((c, c // group, 1, 1)).astype(np.float32))]
    return make_model(nodes, [tensor("x", ["N", half, 5, 5])], [tensor("y", ["N", c, 5, 5])], inits)


def _feeds(proto: onnx.ModelProto, batch: int = 3) -> dict[str, np.ndarray]:
    shape = [d.dim_value or batch for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return {proto.graph.input[0].name: np.random.default_rng(1).standard_normal(shape).astype(np.float32)}


def test_shuffles_become_gathers_folded_into_slices_and_the_dense_conv():
    proto = _shufflenet_unit()
    result, out = apply_pass("channel_permute", proto)
    assert result.changed
    applied = result.stats["applied"]
    assert applied["shuffle_to_gather"] == 2 and applied["slice_of_gather"] == 2 and applied["gather_into_conv"] == 1
    ops = op_types(out)
    assert "Transpose" not in ops and "Reshape" not in ops and "Slice" not in ops
    assert ops.count("Gather") == 2  # one per half of the first shuffle; the second is in w2's columns
    read = {name for n in out.graph.node for name in n.input}
    assert {i.name for i in out.graph.initializer} <= read  # the shapes and slice bounds went with their nodes
    feeds = _feeds(proto)
    # The gathers move whole elements; the conv with permuted columns sums in another order.
    np.testing.assert_allclose(run(out, feeds)[0], run(proto, feeds)[0], rtol=1e-5, atol=1e-5)


def test_depthwise_reader_keeps_its_gather():
    proto = _shufflenet_unit(depthwise_after=True)
    result, out = apply_pass("channel_permute", proto)
    assert result.changed and "gather_into_conv" not in result.stats["applied"]
    assert any(r["rule"] == "gather_into_conv" and "grouped conv" in r["reason"]
               for r in result.stats.get("left_alone", []))
    assert op_types(out).count("Gather") == 3 and "Transpose" not in op_types(out)
    feeds = _feeds(proto)
    np.testing.assert_array_equal(run(proto, feeds)[0], run(out, feeds)[0])


@pytest.mark.parametrize("opset", [11, 13])
def test_split_of_gather_becomes_one_gather_per_output(opset):
    """A shuffle exported with ``chunk`` (Split) instead of slicing; sizes as attribute (11) or input (13)."""
    nodes, inits = _shuffle_nodes("x", "shuffled", 8, 2)
    if opset == 11:
        nodes.append(helper.make_node("Split", ["shuffled"], ["left", "right"], axis=1, split=[4, 4]))
    else:
        nodes.append(helper.make_node("Split", ["shuffled", "sizes"], ["left", "right"], axis=1))
        inits.append(init("sizes", np.array([4, 4], np.int64)))
    nodes += [helper.make_node("Relu", ["left"], ["y1"]), helper.make_node("Neg", ["right"], ["y2"])]
    halves = [tensor("y1", ["N", 4, 5, 5]), tensor("y2", ["N", 4, 5, 5])]
    proto = make_model(nodes, [tensor("x", ["N", 8, 5, 5])], halves, inits, opset=opset)
    result, out = apply_pass("channel_permute", proto)
    assert result.stats["applied"] == {"shuffle_to_gather": 1, "split_of_gather": 1}
    assert sorted(op_types(out)) == ["Gather", "Gather", "Neg", "Relu"]
    feeds = _feeds(proto)
    for a, b in zip(run(proto, feeds), run(out, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bias", [True, False])
def test_gather_moves_through_a_depthwise_conv_into_the_dense_one_after_it(bias):
    """ShuffleNet's downsampling unit: shuffle -> depthwise 3x3 (stride 2) -> dense 1x1. No Gather is left."""
    rng = np.random.default_rng(3)
    nodes, inits = _shuffle_nodes("x", "shuffled", 8, 2)
    dw_inputs = ["shuffled", "dw", "dwb"] if bias else ["shuffled", "dw"]
    nodes += [helper.make_node("Conv", dw_inputs, ["d"], group=8, pads=[1, 1, 1, 1], strides=[2, 2]),
              helper.make_node("Conv", ["d", "pw"], ["y"])]
    inits += [init("dw", rng.standard_normal((8, 1, 3, 3)).astype(np.float32)),
              init("pw", rng.standard_normal((4, 8, 1, 1)).astype(np.float32))]
    if bias:
        inits.append(init("dwb", rng.standard_normal(8).astype(np.float32)))
    proto = make_model(nodes, [tensor("x", ["N", 8, 5, 5])], [tensor("y", ["N", 4, 3, 3])], inits)
    result, out = apply_pass("channel_permute", proto)
    assert result.stats["applied"] == {"shuffle_to_gather": 1, "gather_through_depthwise": 1, "gather_into_conv": 1}
    assert op_types(out) == ["Conv", "Conv"]
    assert len(out.graph.node[0].input) == (3 if bias else 2)  # no bias is invented
    feeds = _feeds(proto)
    np.testing.assert_allclose(run(out, feeds)[0], run(proto, feeds)[0], rtol=1e-5, atol=1e-5)


def test_gather_of_gather_composes_and_identity_disappears():
    perm = np.array([2, 0, 3, 1], np.int64)
    inverse = np.argsort(perm)
    proto = make_model([helper.make_node("Gather", ["x", "p"], ["t"], axis=1),
                        helper.make_node("Gather", ["t", "q"], ["u"], axis=1),
                        helper.make_node("Relu", ["u"], ["y"])],
                       [tensor("x", [2, 4, 3])], [tensor("y", [2, 4, 3])], [init("p", perm), init("q", inverse)])
    result, out = apply_pass("channel_permute", proto)
    assert result.stats["applied"] == {"gather_of_gather": 1}
    assert op_types(out) == ["Relu"]  # perm[inverse] is the identity: no Gather left
    feeds = _feeds(proto)
    np.testing.assert_array_equal(run(proto, feeds)[0], run(out, feeds)[0])


@pytest.mark.parametrize("case", ["transpose_moves_spatial", "shared_middle", "partial_gather_into_conv",
                                  "slice_other_axis", "split_other_axis", "permuted_subset_into_conv"])
def test_left_alone(case):
    rng = np.random.default_rng(0)
    shape = [1, 4, 5, 5]
    if case == "transpose_moves_spatial":  # Reshape → Transpose that swaps a spatial axis → Reshape: not a shuffle
        nodes = [helper.make_node("Reshape", ["x", "s"], ["r"]),
                 helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 2, 4, 3]),
                 helper.make_node("Reshape", ["t", "m"], ["y"])]
        inits = [init("s", np.array([1, 2, 2, 5, 5], np.int64)), init("m", np.array([1, 4, 5, 5], np.int64))]
        outputs = [tensor("y", shape)]
    elif case == "shared_middle":  # the Transpose's output is also a model output: nothing would be saved
        nodes, inits = _shuffle_nodes("x", "y", 4, 2)
        outputs = [tensor("y", shape), tensor("swapped", [1, 2, 2, 5, 5])]
    elif case == "partial_gather_into_conv":  # 3 of 4 channels: folding would add a zero column, not remove work
        nodes = [helper.make_node("Gather", ["x", "i"], ["g"], axis=1), helper.make_node("Conv", ["g", "w"], ["y"])]
        inits = [init("i", np.array([3, 0, 1], np.int64)),
                 init("w", rng.standard_normal((2, 3, 1, 1)).astype(np.float32))]
        outputs = [tensor("y", [1, 2, 5, 5])]
    elif case == "permuted_subset_into_conv":  # channels 1, 0 of 4: a permutation, but not of all of x
        nodes = [helper.make_node("Gather", ["x", "i"], ["g"], axis=1), helper.make_node("Conv", ["g", "w"], ["y"])]
        inits = [init("i", np.array([1, 0], np.int64)), init("w", rng.standard_normal((2, 2, 1, 1)).astype(np.float32))]
        outputs = [tensor("y", [1, 2, 5, 5])]
    elif case == "split_other_axis":  # the Split cuts a spatial axis: each output needs every channel
        nodes = [helper.make_node("Gather", ["x", "i"], ["g"], axis=1),
                 helper.make_node("Split", ["g", "sizes"], ["y", "z"], axis=2)]
        inits = [init("i", np.array([3, 2, 1, 0], np.int64)), init("sizes", np.array([2, 3], np.int64))]
        outputs = [tensor("y", [1, 4, 2, 5]), tensor("z", [1, 4, 3, 5])]
    else:  # the Slice cuts a spatial axis of the gathered tensor
        nodes = [helper.make_node("Gather", ["x", "i"], ["g"], axis=1),
                 helper.make_node("Slice", ["g", "a", "b", "ax"], ["y"])]
        inits = [init("i", np.array([3, 2, 1, 0], np.int64)), init("a", np.array([1], np.int64)),
                 init("b", np.array([3], np.int64)), init("ax", np.array([2], np.int64))]
        outputs = [tensor("y", [1, 4, 2, 5])]
    proto = make_model(nodes, [tensor("x", shape)], outputs, inits)
    result, out = apply_pass("channel_permute", proto)
    assert not result.changed
    assert op_types(out) == op_types(proto)
    feeds = _feeds(proto)
    for a, b in zip(run(proto, feeds), run(out, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_shufflenet_zoo_loses_every_transpose_and_prunes_through_the_gathers():
    path = ROOT / "models" / "shufflenet.onnx"
    result = optimize(path, run_verify=False)
    ops = op_types(result.model)
    assert "Transpose" not in ops and "Gather" in ops
    onnx.checker.check_model(result.model)
    verdict = optimize(path, preset="prune", target_macs=0.5, run_verify=True,
                       options={"prune_filters.samples": 64, "prune_filters.sensitivity_samples": 32,
                                "prune_filters.levels": 3, "prune_filters.refit": False},
                       max_drop=100.0)
    stats = next(p["stats"] for p in verdict.report["passes"] if p["name"] == "prune_filters")
    assert stats["pruned_groups"] >= 1 and stats["allocation"]["met"]
    onnx.checker.check_model(verdict.model)
    feeds = _feeds(verdict.model, batch=2)
    assert run(verdict.model, feeds)[0].shape == (2, 10)
