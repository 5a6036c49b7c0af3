"""Physical channel removal (graphopt/compress/channels/shrink.py): validity, exactness, cost agreement and refusals.

The strong check: channels whose contribution downstream is exactly zero (their consumers' input
weights are zero, or their producers' filters, bias and BN shift are zero so the output is 0 after
ReLU) can be removed without changing the model's outputs. Removing the wrong indices anywhere breaks it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.compress import channels
from graphopt.compress.channels import shrink
from graphopt.core.errors import GraphoptError
from graphopt.core.ir import Model
from graphopt.core.onnx_io import from_proto, to_proto
from graphopt.measure import analysis
from tests import test_channels as tc
from tests.util import assert_outputs_close, run

ROOT = Path(__file__).resolve().parents[1]
SMALL = [tc.chain, tc.residual, tc.concat, tc.flatten_gemm, tc.depthwise, tc.se_block, tc.shuffle,
         tc.dynamic_shuffle, tc.attention]


def silence_mode(build) -> str:
    # q/k head dims have no weight consumer (they are contracted between activations): zero their producers
    return "producers" if build is tc.attention else "consumers"


def random_plan(result: channels.ChannelAnalysis, rng: np.random.Generator) -> dict[int, np.ndarray]:
    plan = {}
    for g in result.prunable():
        k = int(rng.integers(g.min_keep, g.size))
        plan[g.gid] = np.sort(rng.choice(g.size, k, replace=False))
    return plan


def _set_weight(model: Model, name: str, array: np.ndarray) -> None:
    """Replace a weight for every reader (test setup only: a fresh initializer, the old one dropped)."""
    graph = model.graph
    value = next(v for v in graph.values() if v.name == name)
    if value.is_initializer and len(graph.consumers(value)) == 1:
        graph.set_initializer_array(value, array)
        return
    new = graph.add_initializer(array, name)
    for node, slot in list(graph.uses(value)):
        graph.set_input(node, slot, new)


def silence_dropped(model: Model, result: channels.ChannelAnalysis, plan: dict[int, np.ndarray],
                    where: str = "consumers") -> None:
    """Make the channels a plan drops contribute exactly zero downstream.

    ``consumers``: zero their rows in every consumer's weight. ``producers``: zero their filters, biases
    and BN parameters (so the tensor is 0 there, and stays 0 through ReLU/Clip/pooling/Add/Mul).
    """
    graph = model.graph
    for gid, kept in plan.items():
        g = result.group(gid)
        drop = np.setdiff1d(np.arange(g.size), kept)
        targets = g.consumers if where == "consumers" else g.producers
        for t in targets:
            value = next(v for v in graph.values() if v.name == t.param)
            arr = np.array(graph.constant_array(value), copy=True)
            index = [slice(None)] * arr.ndim
            index[t.axis] = t.index_map[drop].ravel()
            arr[tuple(index)] = 0
            _set_weight(model, t.param, arr)


def random_feeds(proto: onnx.ModelProto, batch: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    feeds = {}
    for vi in proto.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    return feeds


def outputs(proto: onnx.ModelProto, batch: int = 2, seed: int = 1) -> list[np.ndarray]:
    return run(proto, random_feeds(proto, batch, seed))


def assert_same_outputs(ref: onnx.ModelProto, cand: onnx.ModelProto, batch: int = 2) -> None:
    assert_outputs_close(ref, cand, random_feeds(ref, batch), rtol=1e-4, atol=1e-5, of_range=True)


@dataclass
class Pruned:
    reference: onnx.ModelProto  # the model with the dropped channels silenced
    pruned: onnx.ModelProto  # the same, shrunk
    plan: dict[int, np.ndarray]
    predicted: tuple[int, int]  # ChannelAnalysis.cost of the plan
    stats: dict
    model: Model  # the shrunk IR


def prune_silenced(proto: onnx.ModelProto, seed: int, where: str = "consumers") -> Pruned:
    """Silence the channels a random plan drops, then shrink: both models must compute the same."""
    model = from_proto(proto)
    result = channels.analyze(model)
    plan = random_plan(result, np.random.default_rng(seed))
    silence_dropped(model, result, plan, where)
    reference = to_proto(model)
    result = channels.analyze(model)  # re-analyse: the silencing replaced weight values
    predicted = result.cost({g: len(k) for g, k in plan.items()})
    stats = shrink.apply(model, result, plan)
    pruned = to_proto(model)
    onnx.checker.check_model(pruned, full_check=True)
    return Pruned(reference, pruned, plan, predicted, stats, model)


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", SMALL, ids=lambda f: f.__name__)
def test_small_graphs_prune_exactly(build):
    for seed in range(3):
        r = prune_silenced(build(), seed, silence_mode(build))
        assert r.plan and r.stats["groups"] and r.stats["params_removed"] > 0
        assert_same_outputs(r.reference, r.pruned, batch=2)
        assert_same_outputs(r.reference, r.pruned, batch=3)  # the batch stays dynamic
        cost = analysis.analyze(r.model)
        assert r.predicted == (cost.macs, cost.params)
        # the plan really removed channels: the pruned model is smaller in the right places
        assert cost.params < analysis.analyze(from_proto(r.reference)).params


@pytest.mark.parametrize("build", SMALL, ids=lambda f: f.__name__)
def test_names_are_preserved_and_shapes_reinferred(build):
    proto = build()
    r = prune_silenced(proto, 7, silence_mode(build))
    ref_values = {o for n in r.reference.graph.node for o in n.output}
    new_values = {o for n in r.pruned.graph.node for o in n.output}
    assert ref_values <= new_values
    # every pruned activation member has its new channel count in the exported value_info
    result = channels.analyze(from_proto(r.reference))
    infos = {vi.name: vi for vi in (*r.pruned.graph.value_info, *r.pruned.graph.output)}
    for gid in r.plan:
        for m in result.group(gid).members:
            if m.is_param or m.value not in infos or len(m.axes) > 1:
                continue
            dims = infos[m.value].type.tensor_type.shape.dim
            expected = sum(result.group(g2).member(m.value).index_map.shape[1] *
                           (len(r.plan[g2]) if g2 in r.plan else result.group(g2).size)
                           for g2 in range(len(result.groups)) if result.group(g2).member(m.value) is not None)
            assert dims[m.axis].dim_value == expected, m.value


def test_keep_everything_is_a_no_op():
    for build in SMALL:
        proto = build()
        model = from_proto(proto)
        before = to_proto(model).SerializeToString()
        result = channels.analyze(model)
        stats = shrink.apply(model, result, {g.gid: np.arange(g.size) for g in result.groups})
        assert stats["groups"] == [] and stats["params_removed"] == 0
        assert to_proto(model).SerializeToString() == before
        assert result.cost({g.gid: g.size for g in result.groups}) == result.base_cost()


def test_refusals_leave_the_model_untouched():
    model = from_proto(tc.chain())
    before = to_proto(model).SerializeToString()
    result = channels.analyze(model)
    frozen = result.frozen()[0]
    g = result.prunable()[0]
    bad = [
        ({frozen.gid: np.arange(frozen.size - 1)}, "frozen"),
        ({g.gid: np.array([], np.int64)}, "at least"),
        ({g.gid: np.array([3, 1])}, "sorted"),
        ({g.gid: np.array([1, 1])}, "sorted"),
        ({g.gid: np.array([0, g.size])}, "must be in"),
        ({999: np.array([0])}, "unknown channel group"),
    ]
    for plan, message in bad:
        with pytest.raises(GraphoptError, match=message):
            shrink.apply(model, result, plan)
        assert to_proto(model).SerializeToString() == before
    with pytest.raises(GraphoptError, match="at least"):
        result.cost({g.gid: 0})
    with pytest.raises(GraphoptError, match="another model"):
        shrink.apply(from_proto(tc.chain()), result, {g.gid: np.arange(1)})


def test_shared_weight_is_replaced_not_mutated():
    """Two convs read one weight (and the same input): they are coupled, both get one new sliced copy."""
    n = tc.Net()
    a = n.unary("Relu", n.conv("x", 6))
    w = n.const(n.rng.standard_normal((4, 6, 3, 3)).astype(np.float32))
    c1 = n.node("Conv", [a, w], ("N", 4, 8, 8), pads=[1] * 4)
    c2 = n.node("Conv", [a, w], ("N", 4, 8, 8), pads=[1] * 4)
    s = n.binary("Add", c1, n.unary("Sigmoid", c2))
    proto = n.proto([n.gemm(n.gap_flatten(s), 2)])
    model = from_proto(proto)
    result = channels.analyze(model)
    (g,) = [g for g in result.groups if g.member(a) is not None]
    assert {c.param for c in g.consumers} == {w}
    original = next(v for v in model.graph.values() if v.name == w)
    original_array = np.array(original.array, copy=True)
    plan = {g.gid: np.array([0, 2, 5])}
    shrink.apply(model, result, plan)
    np.testing.assert_array_equal(original.array, original_array)  # the old value object is untouched
    convs = [nd for nd in model.graph.nodes if nd.op_type == "Conv" and nd.inputs[0].name == a]
    assert len(convs) == 2 and convs[0].inputs[1] is convs[1].inputs[1]
    assert convs[0].inputs[1].shape == (4, 3, 3, 3)
    assert w not in model.graph.initializers or model.graph.initializers[w] is not original
    onnx.checker.check_model(to_proto(model), full_check=True)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_equal_split_gets_explicit_sizes(opset):
    n = tc.Net()
    a = n.unary("Relu", n.conv("x", 8))
    kwargs = {"num_outputs": 2} if opset >= 18 else {}
    left, right = n.node("Split", [a], ("N", 4, 8, 8), n_out=2, axis=1, **kwargs)
    y = n.binary("Add", n.conv(left, 3), n.conv(right, 3))
    proto = n.proto([n.gemm(n.gap_flatten(y), 2)], opset=opset)
    r = prune_silenced(proto, 0)
    split = next(nd for nd in r.pruned.graph.node if nd.op_type == "Split")
    if opset < 13:
        assert any(at.name == "split" for at in split.attribute)
    else:
        assert len(split.input) == 2 and not any(at.name == "num_outputs" for at in split.attribute)
    assert_same_outputs(r.reference, r.pruned)
    cost = analysis.analyze(r.model)
    assert r.predicted == (cost.macs, cost.params)


def test_tensor_read_twice_by_concat_and_mul():
    """Concat(x, x) holds x's channels at two offsets; Mul(x, x) reads it twice: both follow x's group."""
    n = tc.Net()
    a = n.unary("Relu", n.conv("x", 4))
    cat = n.node("Concat", [a, a], ("N", 8, 8, 8), axis=1)
    sq = n.binary("Mul", a, a)
    y = n.binary("Add", n.conv(cat, 3), n.conv(sq, 3))
    proto = n.proto([n.gemm(n.gap_flatten(y), 2)])
    result = channels.analyze(from_proto(proto))
    (g,) = [g for g in result.groups if g.member(a) is not None]
    assert g.member(cat).index_map.shape == (4, 2)  # channel c is at c and 4 + c
    assert np.array_equal(g.member(cat).index_map, np.array([[0, 4], [1, 5], [2, 6], [3, 7]]))
    r = prune_silenced(proto, 2)
    assert r.plan
    assert_same_outputs(r.reference, r.pruned)


def test_shared_reshape_target_is_copied_per_reader():
    """A Reshape target read by a Reshape whose output shrinks and by one that keeps its shape."""
    n = tc.Net()
    a = n.unary("Relu", n.conv("x", 4))
    b = n.unary("Relu", n.conv("x", 4))
    target = n.const(np.array([0, -1], np.int64), "shape")
    ra = n.node("Reshape", [a, target], ("N", 256))
    rb = n.node("Reshape", [b, target], ("N", 256))
    proto = n.proto([n.gemm(ra, 3), rb])  # rb is a graph output: b's group is frozen
    r = prune_silenced(proto, 0)
    assert_same_outputs(r.reference, r.pruned)
    cost = analysis.analyze(r.model)
    assert r.predicted == (cost.macs, cost.params)


# ------------------------------------------------------------------------------------------------
# the zoo: silenced producers (filters, bias and BN zero -> exactly 0 after ReLU) are removed exactly


ZOO = sorted((ROOT / "models").glob("*.onnx"))


@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.stem)
def test_zoo_prunes_exactly_and_cost_matches(path):
    proto = onnx.load(path)
    # producers silenced: ReLU/Clip/GELU/pooling/Add/Mul keep exact zeros, and attention heads' q.k terms vanish
    r = prune_silenced(proto, 0, "producers")
    assert r.plan, "nothing prunable"
    assert_same_outputs(r.reference, r.pruned, batch=3)
    cost = analysis.analyze(r.model)
    assert r.predicted == (cost.macs_known, cost.params)
    assert cost.params < analysis.analyze(from_proto(r.reference)).params
    if analysis.analyze(from_proto(r.reference)).macs is not None:
        assert cost.macs is not None  # rewritten shape inputs stay visible to shape inference


@pytest.mark.parametrize("variant", ["resnet.constant_weights", "mobilenetv2.opset11", "vgg.opset_newest",
                                     "inception.bn_folded", "shufflenet.opset_newest"])
def test_zoo_variants(variant):
    proto = onnx.load(ROOT / "models" / "variants" / f"{variant}.onnx")
    r = prune_silenced(proto, 1, "consumers")
    assert r.plan
    batch = 1 if "static" in variant else 2
    assert_same_outputs(r.reference, r.pruned, batch=batch)
    cost = analysis.analyze(r.model)
    assert r.predicted == (cost.macs_known, cost.params)


@pytest.mark.parametrize("name", ["inception", "mobilenetv2", "shufflenet"])
def test_cost_matches_analyze_for_many_plans(name):
    """ChannelAnalysis.cost equals analyze() of the shrunk model, for plans of every size."""
    proto = onnx.load(ROOT / "models" / "variants" / f"{name}.opset_newest.onnx")
    rng = np.random.default_rng(5)
    for _ in range(4):
        model = from_proto(proto)
        result = channels.analyze(model)
        groups = result.prunable()
        chosen = rng.choice(len(groups), int(rng.integers(1, len(groups) + 1)), replace=False)
        plan = {groups[i].gid: np.sort(rng.choice(groups[i].size, int(rng.integers(1, groups[i].size)),
                                                  replace=False)) for i in chosen}
        predicted = result.cost({g: len(k) for g, k in plan.items()})
        assert result.cost(plan) == predicted  # the kept indices themselves are accepted too
        shrink.apply(model, result, plan)
        cost = analysis.analyze(model)
        assert predicted == (cost.macs, cost.params)


def test_synthetic_resnet18_cost_matches():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import synthetic_models
    finally:
        sys.path.pop(0)
    model = from_proto(synthetic_models.resnet18())
    result = channels.analyze(model)
    assert len(result.frozen()) == 1 and len(result.prunable()) == 12
    plan = {g.gid: np.arange(0, g.size, 2) for g in result.prunable()}
    predicted = result.cost({g: len(k) for g, k in plan.items()})
    shrink.apply(model, result, plan)
    cost = analysis.analyze(model)
    assert predicted == (cost.macs, cost.params)
    assert cost.macs < 0.3 * result.base_cost()[0]
    onnx.checker.check_model(to_proto(model))


def test_slice_attribute_form_and_runtime_bounds():
    """Slice bounds as attributes (opset 9) are rewritten; bounds computed at runtime from Shape
    (``x[:, 2:x.shape[1]]``) are followed at the analysed shape and stay right after pruning."""
    n = tc.Net()
    a = n.unary("Relu", n.conv("x", 8))
    s = n.node("Slice", [a], ("N", 5, 8, 8), starts=[1], ends=[6], axes=[1])
    proto = n.proto([n.gemm(n.gap_flatten(n.conv(s, 3)), 2)], opset=9)
    r = prune_silenced(proto, 0)
    node = next(nd for nd in r.pruned.graph.node if nd.op_type == "Slice")
    assert {at.name: list(at.ints) for at in node.attribute}["ends"] != [6]
    assert_same_outputs(r.reference, r.pruned)

    n = tc.Net()
    a = n.unary("Relu", n.conv("x", 8))
    shp = n.node("Shape", [a], (4,))
    end = n.node("Slice", [shp, *(n.const(np.array([v], np.int64), "i") for v in (1, 2))], (1,))
    s = n.node("Slice", [a, n.const(np.array([2], np.int64), "st"), end, n.const(np.array([1], np.int64), "ax")],
               ("N", 6, 8, 8))
    proto = n.proto([n.gemm(n.gap_flatten(n.conv(s, 3)), 2)])
    # onnx's inference cannot size this Slice, but the analysis evaluates the shape arithmetic at its
    # concrete shape (onnxruntime's symbolic engine), and the bounds are rewritten when the channels go
    result = channels.analyze(from_proto(proto))
    assert any(g.member(a) is not None for g in result.prunable())
    for seed in range(3):
        r = prune_silenced(proto, seed)
        assert_same_outputs(r.reference, r.pruned, batch=2)


def test_shared_bias_does_not_couple_groups():
    """``dedupe_initializers`` merges equal biases (zeros) of unrelated convs: they stay separate groups,
    and each reader sliced differently gets its own copy (the old tensor goes with its last reader)."""
    n = tc.Net()
    zero = n.const(np.zeros(6, np.float32), "zero")
    w = [n.const(n.rng.standard_normal(s).astype(np.float32) * 0.3) for s in ((6, 3, 3, 3), (6, 6, 3, 3))]
    a = n.unary("Relu", n.node("Conv", ["x", w[0], zero], ("N", 6, 8, 8), pads=[1] * 4))
    b = n.unary("Relu", n.node("Conv", [a, w[1], zero], ("N", 6, 8, 8), pads=[1] * 4))
    proto = n.proto([n.gemm(n.gap_flatten(b), 2)])
    model = from_proto(proto)
    result = channels.analyze(model)
    groups = [g for g in result.prunable() if any(p.param == zero for p in g.producers)]
    assert len(groups) == 2  # not merged through the shared bias
    assert {m.use for g in groups for m in g.members if m.value == zero} == {nd.name for nd in proto.graph.node
                                                                             if nd.op_type == "Conv"}
    for plan in ({groups[0].gid: np.array([0, 2, 3])},
                 {groups[0].gid: np.array([1, 4]), groups[1].gid: np.array([0, 1, 2, 5])}):
        model = from_proto(proto)
        result = channels.analyze(model)
        silence_dropped(model, result, plan, "consumers")
        reference = to_proto(model)
        result = channels.analyze(model)
        predicted = result.cost({g: len(k) for g, k in plan.items()})
        shrink.apply(model, result, plan)
        pruned = to_proto(model)
        onnx.checker.check_model(pruned, full_check=True)
        assert_same_outputs(reference, pruned)
        cost = analysis.analyze(model)
        assert predicted == (cost.macs, cost.params)
        biases = [nd.input[2] for nd in pruned.graph.node if nd.op_type == "Conv"]
        sizes = {t.name: t.dims[0] for t in pruned.graph.initializer}
        assert [sizes[b] for b in biases] == [len(plan[groups[0].gid]), len(plan.get(groups[1].gid, range(6)))]


def test_gather_with_constant_indices_selects_channels():
    """x[:, [5, 0, 2, 2]] keeps following the channels it picks (a repeated index couples both outputs)."""
    n = tc.Net()
    a = n.unary("Relu", n.conv("x", 6))
    g = n.node("Gather", [a, n.const(np.array([5, 0, 2, 2], np.int64), "idx")], ("N", 4, 8, 8), axis=1)
    y = n.binary("Add", n.conv(g, 3), n.conv(a, 3))
    proto = n.proto([n.gemm(n.gap_flatten(y), 2)])
    result = channels.analyze(from_proto(proto))
    # channels 5 and 0 are picked once, 2 twice, 1/3/4 never: three groups (same coupling, same group)
    groups = sorted((x for x in result.groups if x.member(a) is not None), key=lambda x: x.size)
    assert [x.size for x in groups] == [1, 2, 3]
    assert groups[0].member(g).index_map.tolist() == [[2, 3]]
    assert groups[1].member(g).index_map.tolist() == [[1], [0]] and groups[1].prunable
    assert groups[2].member(g) is None and groups[2].prunable
    for seed in range(3):
        r = prune_silenced(proto, seed)
        assert_same_outputs(r.reference, r.pruned)
        cost = analysis.analyze(r.model)
        assert r.predicted == (cost.macs, cost.params)
