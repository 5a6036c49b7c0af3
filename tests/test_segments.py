"""Suffix models and cached cuts (graphopt.measure.segments), and prune's sensitivity measured through them.

The strong check: for every prunable group of the zoo's models (raw exports and after the lossless preset,
attention as head dims and as whole heads), the outputs measured by overriding the unchanged model's
initializers from a cut equal the outputs of the model really pruned by ``shrink`` and re-fitted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.app.api import optimize
from graphopt.compress import channels
from graphopt.core.onnx_io import from_proto, load, to_proto
from graphopt.measure import segments
from graphopt.measure.calibration import SampleData, load_data
from graphopt.measure.executor import relative_error
from graphopt.passes.lossy import prune
from tests.util import init, make_model, run, tensor

MODELS = Path(__file__).resolve().parents[1] / "models"


def _block() -> onnx.ModelProto:
    """x -> conv a -> relu -> conv b -> add(x) -> relu -> conv c -> y: a residual block and a head."""
    rng = np.random.default_rng(0)

    def w(o, i):
        return (rng.standard_normal((o, i, 3, 3)) / 6).astype(np.float32)

    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "x"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["rs"], name="relu_s"),
        helper.make_node("Conv", ["rs", "wc"], ["y"], name="conv_c", pads=[1, 1, 1, 1]),
    ]
    return make_model(nodes, [tensor("x", ["N", 4, 6, 6])], [tensor("y", ["N", 2, 6, 6])],
                      [init("wa", w(8, 4)), init("wb", w(4, 8)), init("wc", w(2, 4))])


def test_live_values_are_what_the_rest_of_the_graph_reads():
    graph = _block().graph
    assert segments.live_values(graph, 0) == ["x"]
    assert segments.live_values(graph, 2) == ["ra", "x"]        # conv_b reads ra, the add reads x
    assert segments.live_values(graph, 4) == ["s"]
    assert segments.live_values(graph, 6) == ["y"]              # a graph output written before the cut


def test_suffix_from_cached_values_equals_the_whole_model():
    proto = _block()
    x = np.random.default_rng(1).standard_normal((3, 4, 6, 6)).astype(np.float32)
    whole = run(proto, {"x": x})[0]
    drop = {n.name for n in proto.graph.node[:2]}
    suffix, inputs = segments.suffix_model(proto, drop, types={"ra": (onnx.TensorProto.FLOAT, 4)})
    onnx.checker.check_model(suffix)
    assert inputs == ["ra", "x"]
    assert [i.name for i in suffix.graph.initializer] == ["wb", "wc"]   # wa is read by a dropped node only
    ra = prune.gort.run(prune.gort.session(prune.gort.with_outputs(proto, ["ra"])), {"x": x}, ["ra"])["ra"]
    np.testing.assert_allclose(run(suffix, {"ra": ra, "x": x})[0], whole, rtol=1e-5, atol=1e-5)


def test_suffix_lists_overridable_initializers_as_inputs_with_their_defaults():
    proto = _block()
    suffix, _ = segments.suffix_model(proto, {"conv_a", "relu_a"}, overridable=["wc"],
                                      types={"ra": (onnx.TensorProto.FLOAT, 4)})
    assert "wc" in [i.name for i in suffix.graph.input] and "wc" in [t.name for t in suffix.graph.initializer]


def test_choose_cuts_buys_the_most_macs_per_byte_within_the_budget():
    macs_before = [0, 10, 20, 30, 40, 50]
    starts = {"a": (1, 1), "b": (3, 4), "c": (5, 1)}
    size = {1: 100, 3: 100, 5: 1000}
    assert segments.choose_cuts(starts, macs_before, size.__getitem__, budget=150) == {"a": 0, "b": 3, "c": 3}
    assert segments.choose_cuts(starts, macs_before, size.__getitem__, budget=0) == {"a": 0, "b": 0, "c": 0}
    everything = segments.choose_cuts(starts, macs_before, size.__getitem__, budget=10**6)
    assert everything == {"a": 1, "b": 3, "c": 5}
    # A cut that saves less than its sessions cost is not bought: once b's cut is kept, a's would save 10
    # MACs and c's 20.
    priced = segments.choose_cuts(starts, macs_before, size.__getitem__, budget=10**6, cut_cost=lambda p: 25.0)
    assert priced == {"a": 0, "b": 3, "c": 3}


def _zoo(name: str, lossless: bool):
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing")
    model = load(path)
    if lossless:
        model = from_proto(optimize(path, preset="lossless", run_verify=False).model)
    data = load_data(MODELS / "fmnist_calib.npz", model)
    return model, data


def test_checkpoints_hold_the_unchanged_activations_and_refuse_a_wrong_cut():
    model, data = _zoo("resnet", lossless=True)
    groups = channels.analyze(model, None).prunable()
    proto = to_proto(model)
    starts = prune.group_starts(proto.graph, groups)
    sdata = data.head(24)
    cp, cuts = segments.Checkpoints.build(proto, sdata, {g: (p, 3) for g, p in starts.items()},
                                          segments.node_macs(model, proto, None), batch_size=16)
    assert cp.values and not cp.dropped and set(cuts) == set(starts)
    assert all(c <= starts[g] for g, c in cuts.items())
    reference = prune.EvalContext(proto.SerializeToString(), sdata, batch_size=16).reference()
    assert relative_error(reference, cp.reference) == 0.0      # the caching run's outputs are the reference
    for cut in cp.values:
        suffix, inputs = segments.suffix_model(proto, cp.prefix[cut], types=cp.types)
        assert cp.suffix_inputs_ok(cut, inputs)
        got = cp.run(prune.gort.session(suffix), cut)
        assert relative_error(reference, got) < 1e-10
    cut = next(iter(cp.values))
    first = segments._FirstSample.of(proto, sdata, set(cp.live[cut]) | {o.name for o in proto.graph.output})
    assert cp._check(proto, cut, first, None) is None
    for name in cp.live[cut]:                            # values that are not the model's are caught
        if name in first.values and name not in first.feed:
            first.values[name] = first.values[name] + 1.0
    why = cp._check(proto, cut, first, None)
    assert why is not None and "differs" in why


CASES = [("resnet", False, False), ("resnet", True, False), ("vgg", True, False), ("mobilenetv2", True, False),
         ("senet", True, False), ("inception", True, False), ("shufflenet", True, False),
         ("transformer", True, False), ("transformer", True, True)]


@pytest.mark.parametrize("name,lossless,heads", CASES)
def test_removal_written_as_overrides_equals_the_pruned_model(name, lossless, heads):
    model, data = _zoo(name, lossless)
    groups = channels.analyze(model, None, heads=heads).prunable()
    fit, held = data.head(48).split(16)
    grams, layers = prune.consumer_grams(model, groups, fit, max_rows=4096, seed=0, batch=64, max_features=4096)
    rng = np.random.default_rng(0)
    orders = {g.gid: rng.permutation(g.size) for g in groups}
    ctx, stats = prune.sensitivity_context(model, groups, orders, grams, layers, held, {g.gid: 2 for g in groups},
                                           heads=heads)
    assert stats["by_overrides"] >= 1 and stats["work_fraction"] < 1.0
    reference = ctx.ev.reference()
    for g in groups:
        k = max(g.size // 2, 1)
        removed = prune.level_outputs_by_removal(ctx, g.gid, k)
        assert relative_error(reference, removed) > 0
        if g.gid in ctx.overrides:
            overridden = prune.level_outputs_by_overrides(ctx, g.gid, k)
            scale = relative_error(reference, removed)
            assert relative_error(removed, overridden) <= 1e-6 * max(scale, 1e-6), g.gid
    if name == "transformer" and not heads:      # q·kᵀ contracts the head dim: producers zeroed too, checked once
        assert stats["overrides_checked"] >= 1


def _sigmoid_attention() -> onnx.ModelProto:
    """scores = sigmoid(x·Wq + bq) · sigmoid(x·Wk + bk)ᵀ: a dropped head-dim position contributes 0.25, not 0,
    when its producers are zeroed; then y = scores · (x·Wv) · Wo (no softmax, which would forgive a
    constant added to every score)."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) / 2).astype(np.float32)

    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q0"], name="mq"), helper.make_node("Add", ["q0", "bq"], ["q1"], name="aq"),
        helper.make_node("Sigmoid", ["q1"], ["q"], name="sq"),
        helper.make_node("MatMul", ["x", "wk"], ["k0"], name="mk"), helper.make_node("Add", ["k0", "bk"], ["k1"], name="ak"),
        helper.make_node("Sigmoid", ["k1"], ["k"], name="sk"),
        helper.make_node("Transpose", ["k"], ["kt"], name="tk", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="mv"),
        helper.make_node("MatMul", ["s", "v"], ["o"], name="pv"),
        helper.make_node("MatMul", ["o", "wo"], ["y"], name="mo"),
    ]
    inits = [init("wq", w(8, 16)), init("bq", w(16)), init("wk", w(8, 16)), init("bk", w(16)),
             init("wv", w(8, 8)), init("wo", w(8, 4))]
    return make_model(nodes, [tensor("x", ["N", 5, 8])], [tensor("y", ["N", 5, 4])], inits)


def test_producers_zeroed_where_that_is_not_the_removal_are_measured_by_removal():
    proto = _sigmoid_attention()
    model = from_proto(proto)
    groups = channels.analyze(model, None).prunable()
    qk = next(g for g in groups if any(p.param == "wq" for p in g.producers))
    spec = prune.removal_overrides(proto.graph, qk, [], {})
    assert isinstance(spec, prune.Overrides) and not spec.checked and "qk" in spec.mixing
    data = SampleData({"x": np.random.default_rng(1).standard_normal((6, 5, 8)).astype(np.float32)})
    orders = {g.gid: np.arange(g.size) for g in groups}
    ctx, stats = prune.sensitivity_context(model, groups, orders, {}, {}, data, {g.gid: 2 for g in groups})
    assert qk.gid not in ctx.overrides
    assert any(qk.gid in gids and "not its removal" in why for why, gids in stats["by_removal"].items())


def test_a_consumer_weight_shared_outside_the_group_is_measured_by_removal():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4, 8, 1, 1)) / 3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "w"], ["b"], name="conv_b"),
        helper.make_node("Conv", ["z", "w"], ["c"], name="conv_c"),
        helper.make_node("Add", ["b", "c"], ["y"], name="add"),
    ]
    proto = make_model(nodes, [tensor("x", ["N", 3, 4, 4]), tensor("z", ["N", 8, 4, 4])],
                       [tensor("y", ["N", 4, 4, 4])],
                       [init("wa", (rng.standard_normal((8, 3, 1, 1)) / 2).astype(np.float32)), init("w", w)])
    model = from_proto(proto)
    group = next(g for g in channels.analyze(model, None).groups if any(p.node == "conv_a" for p in g.producers))
    spec = prune.removal_overrides(proto.graph, group, [], {})
    assert isinstance(spec, str) and "share" in spec


def test_feed_batches_follow_the_sample_layout():
    data = SampleData({"x": np.zeros((5, 4, 6, 6), np.float32)})
    cp = segments.Checkpoints.none(_block(), data, batch_size=2)
    out = cp.run(prune.gort.session(_block()), 0)
    assert out["y"].shape == (5, 2, 6, 6)


def test_frontier_moves_forward_and_gives_the_whole_models_values():
    proto = _block()
    x = np.random.default_rng(2).standard_normal((5, 4, 6, 6)).astype(np.float32)
    data = SampleData({"x": x})
    names = ["b", "rs"]
    whole = prune.gort.run(prune.gort.session(prune.gort.with_outputs(proto, names)), {"x": x}, names)
    frontier = segments.Frontier(data, 2)
    assert frontier.advance(proto, 2) and frontier.prefix == {"conv_a", "relu_a"}
    assert set(frontier.values[0]) == {"ra"}            # x is a graph input: taken from the data
    got = list(frontier.batches(proto, names))
    assert len(got) == 3                                 # 5 samples in batches of 2
    for name in names:
        np.testing.assert_allclose(np.concatenate([b[name] for b in got]), whole[name], rtol=1e-5, atol=1e-5)
    assert not frontier.advance(proto, 1)                # never backwards
    tight = segments.Frontier(data, 2, budget=10)
    assert not tight.advance(proto, 2) and tight.skipped == 1 and tight.prefix == frozenset()


def test_frontier_refuses_a_cut_that_no_longer_feeds_the_model():
    proto = _block()
    data = SampleData({"x": np.zeros((2, 4, 6, 6), np.float32)})
    frontier = segments.Frontier(data, 2)
    assert frontier.advance(proto, 2)
    changed = onnx.ModelProto()
    changed.CopyFrom(proto)
    changed.graph.node[2].input[0] = "a"                 # conv_b now reads a value before the cut, not held
    with pytest.raises(ValueError, match="does not hold"):
        list(frontier.batches(changed, ["b"]))


def _table(options: dict) -> dict:
    path = MODELS / "resnet.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing")
    calib = load_data(MODELS / "fmnist_calib.npz", load(path)).head(96)
    result = optimize(path, preset="prune", data=calib, target_macs=0.5, run_verify=False,
                      options={"prune_filters.samples": 96, "prune_filters.sensitivity_samples": 32,
                               "prune_filters.levels": 6, "prune_filters.max_rows": 4096, **options})
    stats = next(p["stats"] for p in result.report["passes"] if p["name"] == "prune_filters")
    return stats["allocation"]["sensitivity"]


def test_the_sensitivity_table_keeps_within_its_work_budget_and_says_what_it_measured():
    free = _table({"prune_filters.sensitivity_tmacs": 0})
    table = free["table"]
    assert table["measured"] == table["asked"] and table["asked"]["samples"] == 32
    asked = table["asked"]["tmacs"]
    half = _table({"prune_filters.sensitivity_tmacs": asked / 2})["table"]
    assert half["measured"]["levels"] == 6 and 16 <= half["measured"]["samples"] < 32
    assert half["measured"]["tmacs"] <= asked / 2
    tiny = _table({"prune_filters.sensitivity_tmacs": asked / 1000})["table"]
    assert tiny["measured"]["levels"] == 4 and tiny["measured"]["samples"] == 8 and "over_budget" in tiny


def test_a_refitted_conv_without_bias_gets_one_to_override():
    proto = _block()                                       # conv_b has no bias and feeds an Add, not a BN
    model = from_proto(proto)
    groups = channels.analyze(model, None).prunable()
    data = SampleData({"x": np.random.default_rng(3).standard_normal((24, 4, 6, 6)).astype(np.float32)})
    fit, held = data.split(8)
    grams, layers = prune.consumer_grams(model, groups, fit, max_rows=4096, seed=0, batch=64, max_features=4096)
    orders = {g.gid: np.random.default_rng(0).permutation(g.size) for g in groups}
    ctx, _ = prune.sensitivity_context(model, groups, orders, grams, layers, held, {g.gid: 2 for g in groups})
    group = next(g for g in groups if any(p.node == "conv_a" for p in g.producers))
    slot = ctx.overrides[group.gid].refit["conv_b"]
    assert slot.new_bias
    removed = prune.level_outputs_by_removal(ctx, group.gid, 4)
    overridden = prune.level_outputs_by_overrides(ctx, group.gid, 4)
    assert relative_error(removed, overridden) <= 1e-6 * relative_error(ctx.ev.reference(), removed)
