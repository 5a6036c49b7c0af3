"""Channel importance criteria (graphopt/importance.py) and least-squares reconstruction (graphopt/reconstruct.py)."""

from __future__ import annotations

import tempfile

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.compress import importance as imp
from graphopt.compress import reconstruct as rec
from graphopt.compress.channels import Consumer as C
from graphopt.compress.channels import Group
from graphopt.compress.channels import Member as M
from graphopt.compress.channels import Producer as P
from graphopt.compress.lstsq import CrossGram
from graphopt.core.onnx_io import from_proto, to_proto
from graphopt.measure.calibration import SampleData
from tests.util import init, make_model, run, tensor


def G(gid, size, producers, consumers, members):
    """A real graphopt.compress.channels.Group built from positional parts (unfrozen)."""
    return Group(gid=gid, size=size, frozen=None, members=members, producers=producers, consumers=consumers)


def _conv_bn_conv(w1, gamma, w2):
    c1, c2 = w1.shape[0], w2.shape[0]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "g", "b", "m", "v"], ["bn"], name="bn1"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    inits = [init("w1", w1), init("g", gamma), init("b", np.zeros(c1, np.float32)),
             init("m", np.zeros(c1, np.float32)), init("v", np.ones(c1, np.float32)), init("w2", w2)]
    return make_model(nodes, [tensor("x", [None, w1.shape[1], 6, 6])], [tensor("y", [None, c2, 4, 4])], inits)


def _group(c1):
    ident = np.arange(c1).reshape(c1, 1)
    producers = [P("conv1", "w1", 0, ident), P("bn1", "g", 0, ident), P("bn1", "b", 0, ident)]
    consumers = [C("conv2", "r", "w2", 1, ident)]
    members = [M("a", 1, ident), M("bn", 1, ident), M("r", 1, ident)]
    return G(0, c1, producers, consumers, members)


def test_filter_norms_rank_known_weights():
    w1 = np.ones((4, 2, 3, 3), np.float32) * np.array([1, 3, 2, 0.5], np.float32)[:, None, None, None]
    model = from_proto(_conv_bn_conv(w1, np.ones(4, np.float32), np.ones((2, 4, 3, 3), np.float32)))
    l1 = imp.filter_norms(model.graph, _group(4), 1)
    l2 = imp.filter_norms(model.graph, _group(4), 2)
    assert list(np.argsort(l1)) == [3, 0, 2, 1]
    assert list(np.argsort(l2)) == [3, 0, 2, 1]
    assert imp.keep_top(l1, 2).tolist() == [1, 2]
    np.testing.assert_allclose(l1.mean(), 1.0)  # one producer with filters, normalised by its mean


def test_bn_scale_uses_gamma_only_and_refuses_without_bn():
    w1 = np.ones((4, 2, 3, 3), np.float32)
    gamma = np.array([0.1, -2.0, 1.0, 0.5], np.float32)
    model = from_proto(_conv_bn_conv(w1, gamma, np.ones((2, 4, 3, 3), np.float32)))
    s = imp.bn_scale(model.graph, _group(4))
    assert list(np.argsort(s)) == [0, 3, 2, 1]
    group = _group(4)
    group.producers = group.producers[:1]
    assert imp.bn_scale(model.graph, group) is None


def test_activation_scores_from_channel_stats():
    from graphopt.measure.calibration import ChannelStats
    st = ChannelStats(axis=1)
    x = np.zeros((8, 3, 2, 2), np.float32)
    x[:, 0] = 1.0            # always on
    x[:4, 1] = 5.0           # on half the time, large
    stats = {("r", 1): st}
    st.update(x)
    group = G(0, 3, [], [C("conv2", "r", "w2", 1, np.arange(3).reshape(3, 1))],
              [M("r", 1, np.arange(3).reshape(3, 1))])
    mean = imp.activation_scores(group, stats, "mean")
    apoz = imp.activation_scores(group, stats, "apoz")
    assert list(np.argsort(mean)) == [2, 0, 1]
    assert list(np.argsort(apoz)) == [2, 1, 0]


def test_combine_normalises_members():
    out = imp.combine([np.array([1.0, 3.0]), np.array([100.0, 100.0]), np.zeros(2)])
    np.testing.assert_allclose(out, [(0.5 + 1) / 2, (1.5 + 1) / 2])
    assert imp.combine([np.zeros(3)]) is None


def _thinet_data(seed=0):
    rng = np.random.default_rng(seed)
    c, k, o, r = 6, 3, 4, 400
    x = rng.normal(size=(r, c * k))
    x[:, 3 * k:4 * k] *= 0.01          # channel 3 carries almost nothing
    w = rng.normal(size=(c * k, o))
    w[k:2 * k] *= 0.05                 # channel 1 is barely read
    y = x @ w + 0.1 * rng.normal(size=(r, o))
    g = CrossGram()
    g.update(x, y)
    blocks = [np.arange(i * k, (i + 1) * k) for i in range(c)]
    return g, blocks, c


def test_thinet_removes_negligible_channels_first_and_predicts_refit_error():
    g, blocks, c = _thinet_data()
    res = imp.thinet([imp.ThiNetProblem(g.xtx, g.xty, blocks, float(g.target_ss().sum()))], c, ridge=1e-9)
    assert sorted(res.order.tolist()) == list(range(c))
    assert set(res.order[:2].tolist()) == {1, 3}
    base = g.sse(*g.solve(1e-9)).sum() / g.target_ss().sum()
    for removed in range(1, c):
        keep = res.kept(c - removed)
        cols = np.concatenate([blocks[i] for i in keep])
        w, b = g.solve(1e-9, cols)
        actual = g.sse(w, b, cols).sum() / g.target_ss().sum() - base
        assert res.error_at(c - removed) == pytest.approx(actual, rel=1e-4, abs=1e-9)
    # nested kept sets
    for k in range(1, c):
        assert set(res.kept(k).tolist()) <= set(res.kept(k + 1).tolist())


def test_thinet_in_rounds_ends_each_round_at_a_multiple_with_the_exact_error():
    g, blocks, c = _thinet_data(2)
    problem = imp.ThiNetProblem(g.xtx, g.xty, blocks, float(g.target_ss().sum()))
    one = imp.thinet([problem], c, ridge=1e-9)
    res = imp.thinet([problem], c, ridge=1e-9, step=2)
    assert sorted(res.order.tolist()) == list(range(c))
    base = g.sse(*g.solve(1e-9)).sum() / g.target_ss().sum()
    # c = 6: rounds remove 2, 2, 1 (min_keep 1), so kept counts 4 and 2 end rounds
    for kept in (4, 2):
        cols = np.concatenate([blocks[i] for i in res.kept(kept)])
        w, b = g.solve(1e-9, cols)
        actual = g.sse(w, b, cols).sum() / g.target_ss().sum() - base
        assert res.error_at(kept) == pytest.approx(actual, rel=1e-4, abs=1e-9)
        # a round removes its channels together; greedy one at a time is at most a little better
        assert res.error_at(kept) <= 1.5 * one.error_at(kept) + 1e-9
    assert set(res.order[:2].tolist()) == {1, 3}          # the two negligible channels go in the first round
    assert np.all(np.diff(res.error) >= -1e-12)
    for k in range(1, c):
        assert set(res.kept(k).tolist()) <= set(res.kept(k + 1).tolist())


def test_thinet_step_is_one_until_the_sweeps_pass_the_budget():
    assert imp.thinet_step(64, [576], 8) == 1                       # a zoo-sized group
    assert imp.thinet_step(2048, [2048] * 3, 8) == 8                # ResNet-50's last residual group
    assert imp.thinet_step(256, [2304], 8, budget=1e9) == 2         # 1.36e9 updates: halved
    assert imp.thinet_step(100, [1000], 6, budget=1e7) == 6         # nothing smaller fits: the level step
    assert imp.thinet_step(100, [1000], 6, budget=4e7) == 3         # divisors of the level step only


def test_thinet_first_round_takes_the_remainder():
    g, blocks, c = _thinet_data(3)
    problem = imp.ThiNetProblem(g.xtx, g.xty, blocks, float(g.target_ss().sum()))
    res = imp.thinet([problem], c, ridge=1e-9, step=4, min_keep=0)  # 6 = 2 + 4
    base = g.sse(*g.solve(1e-9)).sum() / g.target_ss().sum()
    cols = np.concatenate([blocks[i] for i in res.kept(4)])
    w, b = g.solve(1e-9, cols)
    assert res.error_at(4) == pytest.approx(g.sse(w, b, cols).sum() / g.target_ss().sum() - base, rel=1e-4)


def test_thinet_greedy_beats_random_choice():
    g, blocks, c = _thinet_data(1)
    res = imp.thinet([imp.ThiNetProblem(g.xtx, g.xty, blocks, float(g.target_ss().sum()))], c, ridge=1e-9)
    rng = np.random.default_rng(0)

    def err(keep):
        cols = np.concatenate([blocks[i] for i in keep])
        w, b = g.solve(1e-9, cols)
        return g.sse(w, b, cols).sum()

    greedy = err(res.kept(3))
    randoms = [err(np.sort(rng.choice(c, 3, replace=False))) for _ in range(10)]
    assert greedy <= min(randoms) + 1e-9


# ---- reconstruction


def _two_convs(seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(size=8).astype(np.float32)
    w2 = rng.normal(size=(4, 8, 3, 3)).astype(np.float32) * 0.3
    b2 = np.zeros(4, np.float32)
    return w1, b1, w2, b2


def _model(w1, b1, w2, b2):
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2")]
    inits = [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2)]
    return make_model(nodes, [tensor("x", [None, 3, 8, 8])], [tensor("y", [None, 4, 6, 6])], inits)


def test_refit_reduces_error_and_folds_removed_means_into_bias():
    w1, b1, w2, b2 = _two_convs()
    reference = from_proto(_model(w1, b1, w2, b2))
    keep = np.array([0, 2, 5, 7])
    pruned = from_proto(_model(w1[keep], b1[keep], w2[:, keep], b2))
    rng = np.random.default_rng(1)
    data = SampleData({"x": rng.normal(size=(96, 3, 8, 8)).astype(np.float32)})
    x = data.inputs["x"][:16]
    y_ref = run(to_proto(reference), {"x": x})[0]
    err_before = np.linalg.norm(run(to_proto(pruned), {"x": x})[0] - y_ref)
    records = rec.refit(pruned, reference, [rec.RefitTarget("conv2")], data, max_rows=4096, seed=0, batch_size=32)
    assert records[0]["rel_error_after"] < records[0]["rel_error_before"]
    proto = to_proto(pruned)
    onnx.checker.check_model(proto)
    err_after = np.linalg.norm(run(proto, {"x": x})[0] - y_ref)
    assert err_after < 0.8 * err_before
    # The removed channels are post-ReLU (mean > 0): their mean contribution moves into the bias.
    new_b = next(v for v in pruned.graph.nodes[-1].inputs[2:] if v is not None).array
    assert not np.allclose(new_b, b2)


def test_refit_with_targets_spilled_to_disk_matches_in_memory(tmp_path, monkeypatch):
    w1, b1, w2, b2 = _two_convs()
    reference = from_proto(_model(w1, b1, w2, b2))
    keep = np.array([0, 2, 5, 7])
    data = SampleData({"x": np.random.default_rng(1).normal(size=(96, 3, 8, 8)).astype(np.float32)})
    results = []
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for budget in (rec.TARGET_RAM_BYTES, 0, 20000):
        pruned = from_proto(_model(w1[keep], b1[keep], w2[:, keep], b2))
        usage = {}
        records = rec.refit(pruned, reference, [rec.RefitTarget("conv2")], data, max_rows=1000, seed=0,
                            batch_size=32, target_ram_bytes=budget, usage=usage)
        results.append((records, pruned.graph.nodes[-1].inputs[1].array.copy(), usage))
        assert list(tmp_path.iterdir()) == []  # the spilled targets are removed
    (rec_mem, w_mem, use_mem), (rec_disk, w_disk, use_disk), (rec_mixed, w_mixed, use_mixed) = results
    assert use_mem["targets_on_disk"] == 0 and use_mem["targets_in_memory"] > 0
    assert use_disk["targets_in_memory"] == 0 and use_disk["targets_on_disk"] == use_mem["targets_in_memory"]
    assert 0 < use_mixed["targets_on_disk"] < use_mem["targets_in_memory"]
    assert rec_disk == rec_mem and rec_mixed == rec_mem
    np.testing.assert_array_equal(w_disk, w_mem)
    np.testing.assert_array_equal(w_mixed, w_mem)


def test_target_store_returns_batches_in_order_from_memory_and_disk():
    rng = np.random.default_rng(0)
    batches = [(None, rng.normal(size=(5, 3)).astype(np.float32)),
               (np.array([0, 2, 4]), rng.normal(size=(3, 3)).astype(np.float32)),
               (None, rng.normal(size=(5, 3)).astype(np.float32))]
    with rec.TargetStore(ram_bytes=batches[0][1].nbytes) as store:
        for select, rows in batches:
            store.add("layer", select, rows)
        assert store.in_memory == batches[0][1].nbytes and store.on_disk > 0
        back = store.pop("layer")
        assert store.in_memory == 0 and store.pop("layer") == []  # popped once: forgotten
    assert len(back) == 3
    for (s0, r0), (s1, r1) in zip(batches, back):
        assert (s0 is None) == (s1 is None)
        if s0 is not None:
            np.testing.assert_array_equal(s0, s1)
        np.testing.assert_array_equal(r0, r1)


def test_solve_towards_infinite_ridge_keeps_weights_and_fits_bias():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) + 2.0
    w0 = rng.normal(size=(3, 2))
    y = x @ w0 + np.array([1.0, -1.0])
    g = CrossGram()
    g.update(x, y)
    w, b = rec.solve_towards(g, float("inf"), w0, np.zeros(2))
    np.testing.assert_allclose(w, w0)
    np.testing.assert_allclose(b, [1.0, -1.0], atol=1e-9)
    w, b = rec.solve_towards(g, 1e-8, np.zeros((3, 2)), np.zeros(2))
    np.testing.assert_allclose(w, w0, atol=1e-5)


def test_choose_ridge_prefers_strong_ridge_when_fit_overfits():
    rng = np.random.default_rng(0)
    f = 40
    w0 = rng.normal(size=(f, 1))
    folds = []
    for _ in range(2):
        x = rng.normal(size=(30, f))          # fewer rows than features: pure LS overfits noise
        y = x @ w0 + 2.0 * rng.normal(size=(30, 1))
        g = CrossGram()
        g.update(x, y)
        folds.append(g)
    ridge, scores = rec.choose_ridge(folds, w0, np.zeros(1))
    assert ridge >= 1e-1
    assert scores[ridge] <= scores[1e-5]


def test_activation_targets_free_where_the_original_is_clipped():
    y = np.array([[-1.0, 2.0, 7.0], [-2.0, 0.5, 3.0]])
    pred = np.array([[-3.0, 1.0, 9.0], [0.5, 0.4, 8.0]])
    t = rec.activation_targets(y, pred, 0.0, 6.0)
    # below 0: a negative prediction is already exact, a positive one is pulled to the bound
    assert t[0, 0] == -3.0 and t[1, 0] == 0.0
    # inside the range: the original value
    assert t[0, 1] == 2.0 and t[1, 1] == 0.5 and t[1, 2] == 3.0
    # above 6: a prediction above is exact
    assert t[0, 2] == 9.0


def test_fit_through_relu_reduces_post_activation_error():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 6))
    w_true = rng.normal(size=(6, 3))
    y = np.tanh(x @ w_true) * 3.0 - 1.0        # not linear in x: the plain fit has to compromise
    g = CrossGram()
    g.update(x, y)
    w, b = rec.solve_towards(g, 1e-6, np.zeros((6, 3)), np.zeros(3))
    w2, b2, before, after = rec.fit_through_activation(g, x.astype(np.float32), y, w, b, 1e-6,
                                                      np.zeros((6, 3)), np.zeros(3), 0.0, np.inf)
    assert after < 0.9 * before
    relu = lambda a: np.maximum(a, 0)
    assert np.linalg.norm(relu(x @ w2 + b2) - relu(y)) < np.linalg.norm(relu(x @ w + b) - relu(y))
