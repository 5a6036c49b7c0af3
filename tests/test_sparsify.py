"""Unstructured pruning: masks, least-squares re-fit, splicing, and the pass on small graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt.passes.lossy.sparsify as sp
from graphopt.compress.lstsq import CrossGram
from graphopt.core import onnx_io
from graphopt.core.manager import PassContext
from graphopt.measure.calibration import SampleData
from tests.util import init, make_model, op_types, run, tensor


def _gram(x: np.ndarray, y: np.ndarray) -> CrossGram:
    g = CrossGram(bias=True)
    g.update(x, y)
    return g


def _sparse_problem(seed=0, f=30, o=6, keep_per_row=5, rows=400, corr=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, f))
    if corr:
        x = x + corr * x[:, :1]   # correlated inputs make magnitude a poor guide
    w = np.zeros((f, o))
    for j in range(o):
        w[rng.choice(f, keep_per_row, replace=False), j] = rng.normal(size=keep_per_row) * 2
    b = rng.normal(size=o)
    return x, w, b, x @ w + b


def test_magnitude_mask_keeps_the_largest():
    w = np.array([[0.1, -3.0], [2.0, 0.05], [-0.5, 1.0]])
    mask = sp.magnitude_mask(w, 3)
    assert mask.sum() == 3
    assert set(map(tuple, np.argwhere(mask))) == {(0, 1), (1, 0), (2, 1)}


def test_refit_is_the_least_squares_optimum_on_the_support():
    x, w, b, y = _sparse_problem()
    y = y + np.random.default_rng(1).normal(scale=0.1, size=y.shape)
    g = _gram(x, y)
    h, r, _ = sp.penalised(g, np.zeros_like(w), b, ridge=0.0)
    mask = np.zeros((w.shape[0] + 1, w.shape[1]), dtype=bool)
    mask[:8] = True
    got = sp.refit(h, r, mask)
    for j in range(w.shape[1]):
        design = np.concatenate([x[:, :8], np.ones((len(x), 1))], axis=1)
        expect = np.linalg.lstsq(design, y[:, j], rcond=None)[0]
        np.testing.assert_allclose(got[:8, j], expect[:8], rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(got[-1, j], expect[-1], rtol=1e-8, atol=1e-8)
        assert np.all(got[8:-1, j] == 0)


def test_ridge_pulls_towards_the_original_weights_not_zero():
    # Fewer rows than features: plain LS is underdetermined; the prior keeps the original weights.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 40))
    w0 = rng.normal(size=(40, 3))
    g = _gram(x, x @ w0)
    h, r, _ = sp.penalised(g, w0, np.zeros(3), ridge=1e-3)
    full = np.ones((41, 3), dtype=bool)
    got = sp.refit(h, r, full)
    np.testing.assert_allclose(got[:40], w0, atol=1e-6)


def test_obs_mask_and_refit_recover_an_exactly_sparse_layer():
    x, w, b, y = _sparse_problem(keep_per_row=5)
    g = _gram(x, y)
    w_dense = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0][:-1]
    out_w, out_b, stats = sp.prune_layer(g, w_dense, b, density=5 / 30, method="obs", ridge=1e-9, splice_rounds=0)
    assert stats["kept"] == 30
    assert np.array_equal(out_w != 0, w != 0)
    np.testing.assert_allclose(out_w, w, atol=1e-6)
    np.testing.assert_allclose(out_b, b, atol=1e-6)


def test_splicing_repairs_a_bad_support_and_never_hurts():
    x, w, b, y = _sparse_problem(seed=3, corr=3.0)
    g = _gram(x, y)
    h, r, _ = sp.penalised(g, np.zeros_like(w), b, ridge=1e-9)
    # start from a deliberately wrong support: the 5 *smallest* true weights' complement per row
    bad = np.zeros((31, w.shape[1]), dtype=bool)
    rng = np.random.default_rng(0)
    for j in range(w.shape[1]):
        bad[rng.choice(30, 5, replace=False), j] = True
    base = sp.loss(h, r, sp.refit(h, r, bad))
    mask, got, swaps = sp.splice(h, r, bad, rounds=20)
    after = sp.loss(h, r, got)
    assert np.all(after <= base + 1e-9 * np.abs(base))
    assert swaps > 0
    assert np.array_equal(mask[:-1].sum(axis=0), bad[:-1].sum(axis=0))  # density per output unchanged
    assert (mask[:-1] == (w != 0)).mean() > 0.9


def _mlp(seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(32, 20)).astype(np.float32) / 4
    w2 = rng.normal(size=(5, 32)).astype(np.float32) / 6
    nodes = [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Gemm", ["a", "W2", "B2"], ["y"], transB=1, name="fc2")]
    return make_model(nodes, [tensor("x", ["N", 20])], [tensor("y", ["N", 5])],
                      [init("W1", w1), init("B1", np.zeros(32, np.float32)), init("W2", w2),
                       init("B2", np.zeros(5, np.float32))])


def _data(n=256, seed=1):
    # correlated inputs (a few latent factors), as real activations are: what pruning can compensate
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(6, 20))
    x = rng.normal(size=(n, 6)) @ mix + 0.1 * rng.normal(size=(n, 20))
    return SampleData({"x": x.astype(np.float32)})


def _weights(proto, node_name):
    node = next(n for n in proto.graph.node if n.name == node_name)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    return inits[node.input[1]]


def _error(proto, ref, data):
    a = run(proto, {"x": data.inputs["x"]})[0]
    b = run(ref, {"x": data.inputs["x"]})[0]
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("method", ["obs", "magnitude"])
def test_pass_prunes_to_the_density_and_refit_beats_plain_magnitude(method):
    proto = _mlp()
    data, held = _data(), _data(seed=7)
    outs = {}
    for refit in (True, False):
        model = onnx_io.from_proto(proto)
        ctx = PassContext(options={"sparsify": {"density": 0.3, "method": method, "refit": refit, "min_weights": 16}},
                          data=data)
        result = sp.Sparsify().run(model, ctx)
        assert result.changed
        out = onnx_io.to_proto(model)
        onnx.checker.check_model(out)
        assert op_types(out) == op_types(proto)
        for name in ("fc1", "fc2"):
            w = _weights(out, name)
            assert (w != 0).mean() == pytest.approx(0.3, abs=0.01)
        outs[refit] = _error(out, proto, held)
    assert outs[True] < 0.6 * outs[False]


def test_per_layer_densities_and_small_layers_left_alone():
    model = onnx_io.from_proto(_mlp())
    ctx = PassContext(options={"sparsify": {"densities": "fc1=0.5", "density": 0.2, "min_weights": 200,
                                            "splice_rounds": 0}}, data=_data())
    result = sp.Sparsify().run(model, ctx)
    out = onnx_io.to_proto(model)
    assert (_weights(out, "fc1") != 0).mean() == pytest.approx(0.5, abs=0.01)
    assert np.all(_weights(out, "fc2") != 0)
    assert result.stats["left_alone"][0]["examples"] == ["fc2"]
    assert result.stats["left_alone"][0]["reason"] == "fewer than min_weights=200 weights"


def test_without_data_the_refit_leaves_the_model_unchanged():
    proto = _mlp()
    model = onnx_io.from_proto(proto)
    result = sp.Sparsify().run(model, PassContext(options={"sparsify": {"min_weights": 16}}))
    assert not result.changed and "skipped" in result.stats
    assert onnx_io.to_proto(model).SerializeToString() == onnx_io.to_proto(onnx_io.from_proto(proto)).SerializeToString()


def test_global_magnitude_scope_uses_one_threshold():
    model = onnx_io.from_proto(_mlp())
    ctx = PassContext(options={"sparsify": {"density": 0.25, "scope": "global", "method": "magnitude",
                                            "refit": False, "min_weights": 16}})
    sp.Sparsify().run(model, ctx)
    out = onnx_io.to_proto(model)
    w1, w2 = _weights(out, "fc1"), _weights(out, "fc2")
    kept = np.concatenate([np.abs(w1[w1 != 0]), np.abs(w2[w2 != 0])])
    dropped_max = max(np.abs(_weights(_mlp(), "fc1"))[w1 == 0].max(), np.abs(_weights(_mlp(), "fc2"))[w2 == 0].max())
    assert kept.min() >= dropped_max
    assert (kept.size / (w1.size + w2.size)) == pytest.approx(0.25, abs=0.01)


def test_ridge_is_chosen_on_held_out_samples():
    model = onnx_io.from_proto(_mlp())
    ctx = PassContext(options={"sparsify": {"density": 0.3, "min_weights": 16, "splice_rounds": 0,
                                            "ridge_grid": "0.001,0.1,10", "holdout": 0.25}}, data=_data())
    result = sp.Sparsify().run(model, ctx)
    for layer in result.stats["layers"]:
        errors = layer["holdout_error"]
        assert set(errors) == {"0.001", "0.1", "10.0"}
        assert errors[str(layer["ridge"])] == min(errors.values())


def test_downstream_weight_follows_relu_to_the_next_gemm():
    from graphopt.compress.lstsq import LinearLayer
    model = onnx_io.from_proto(_mlp())
    fc1 = next(n for n in model.graph.toposort() if n.name == "fc1")
    fc2 = next(n for n in model.graph.toposort() if n.name == "fc2")
    weight = sp.downstream_weight(model.graph, LinearLayer.of(model.graph, fc1))
    w2 = _weights(_mlp(), "fc2")                       # [5, 32] (transB): output o of fc1 is column o
    expect = (w2.astype(np.float64) ** 2).sum(axis=0)
    np.testing.assert_allclose(weight, expect / expect.mean(), rtol=1e-6)
    assert sp.downstream_weight(model.graph, LinearLayer.of(model.graph, fc2)) is None   # a graph output


# ---------------------------------------------------------------------------------------------
# the accuracy guard


def _labelled(proto, n=400, seed=3):
    """Correlated inputs labelled by the unpruned model itself (its accuracy is 100 %)."""
    x = _data(n, seed).inputs["x"]
    return SampleData({"x": x}, run(proto, {"x": x})[0].argmax(1))


def _held_drop(proto, pruned, data, holdout):
    n_hold = int(round(data.n_samples * holdout))
    x, labels = data.inputs["x"][-n_hold:], data.labels[-n_hold:]
    acc = lambda p: 100.0 * float((run(p, {"x": x})[0].argmax(1) == labels).mean())  # noqa: E731
    return acc(proto) - acc(pruned)


def _guarded_run(proto, data, max_drop, **options):
    model = onnx_io.from_proto(proto)
    opts = {"density": 0.05, "min_weights": 16, "splice_rounds": 0, "guard_steps": 4, **options}
    result = sp.Sparsify().run(model, PassContext(options={"sparsify": opts}, data=data, max_drop=max_drop))
    return onnx_io.to_proto(model), result


def test_guard_keeps_the_drop_on_held_out_samples_and_stricter_budgets_prune_less():
    proto = _mlp()
    data = _labelled(proto)
    densities = {}
    for max_drop in (3.0, 30.0):
        out, result = _guarded_run(proto, data, max_drop)
        onnx.checker.check_model(out)
        guard = result.stats["guard"]
        assert guard["held_out_samples"] == 160 and guard["fit_samples"] == 240
        # the returned model is the one measured, and it meets the budget on the held-out rows
        assert _held_drop(proto, out, data, 0.4) <= max_drop
        for e in guard["trace"]:
            assert e["ok"] == (e["upper"] <= max_drop) and e["upper"] >= e["drop"]
        ok = [e for e in guard["trace"] if e["ok"]]
        assert guard["chosen"]["density"] == min(e["density"] for e in ok)
        kept = np.concatenate([_weights(out, n).ravel() != 0 for n in ("fc1", "fc2")]).mean()
        assert kept == pytest.approx(guard["chosen"]["density"], abs=0.01)
        densities[max_drop] = kept
    assert guard["trace"][0]["density"] == pytest.approx(0.05, abs=0.01)
    assert all(e["splice_rounds"] == 0 for e in guard["trace"][1:])   # bisection tries: no splicing
    assert densities[3.0] > densities[30.0]


def test_guard_off_without_labels_or_when_disabled_and_target_params_sets_the_density():
    proto = _mlp()
    _, result = _guarded_run(proto, _data(), 1.0)                 # no labels: plain run at the density
    assert result.stats["guard"] == {"off": "calibration data has no labels"}
    assert result.stats["density"] == pytest.approx(0.05, abs=0.01)
    model = onnx_io.from_proto(proto)
    ctx = PassContext(options={"sparsify": {"min_weights": 16, "splice_rounds": 0, "guard": False}},
                      data=_labelled(proto), target_params=0.4)
    result = sp.Sparsify().run(model, ctx)
    assert result.stats["guard"] == {"off": "option guard=False"}
    assert result.stats["density"] == pytest.approx(0.4, abs=0.01)


def test_guard_leaves_the_model_alone_when_no_density_meets_the_budget():
    proto = _mlp()
    data = _labelled(proto)
    # a negative budget: no pruned model can meet it (the unpruned model has 100 %), so nothing is pruned
    out, result = _guarded_run(proto, data, -0.5, guard_steps=2)
    assert not result.changed and result.stats["guard"]["chosen"] is None
    assert len(result.stats["guard"]["trace"]) == 3
    assert out.SerializeToString() == onnx_io.to_proto(onnx_io.from_proto(proto)).SerializeToString()
