"""Low-rank's sensitivity by weight overrides (compress/lowrank_table.py) and the spectrum's closed forms."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt.passes.lossy.lowrank as lr
import graphopt.compress.lowrank_table as lrt
from graphopt.compress import budget, svd
from graphopt.core import onnx_io
from graphopt.core.manager import PassContext
from graphopt.core.shapes import ShapeView
from graphopt.measure import ort as gort
from graphopt.measure.calibration import Gram, SampleData
from graphopt.measure.executor import EvalContext
from tests.test_lowrank import mlp
from tests.util import init, make_model, tensor

RNG = np.random.default_rng(7)


def _dense(op: str, trans_b: int = 0, alpha: float = 1.0, beta: float = 1.0, transposed: bool = False):
    """x -> layer (Gemm / MatMul+Add / MatMul reading Transpose(Wᵀ)) -> Relu -> Gemm head."""
    k, h, m = 24, 20, 6
    w = RNG.standard_normal((k, h)).astype(np.float32)
    nodes, inits = [], [init("W2", RNG.standard_normal((h, m)).astype(np.float32))]
    if op == "Gemm":
        inits += [init("W", w.T.copy() if trans_b else w), init("C", RNG.standard_normal(h).astype(np.float32))]
        nodes.append(helper.make_node("Gemm", ["x", "W", "C"], ["h"], name="fc", transB=trans_b, alpha=alpha, beta=beta))
    else:
        inits.append(init("C", RNG.standard_normal(h).astype(np.float32)))
        if transposed:
            inits.append(init("Wt", w.T.copy()))
            nodes.append(helper.make_node("Transpose", ["Wt"], ["W"], name="wt", perm=[1, 0]))
        else:
            inits.append(init("W", w))
        nodes += [helper.make_node("MatMul", ["x", "W"], ["mm"], name="fc"),
                  helper.make_node("Add", ["mm", "C"], ["h"], name="bias")]
    nodes += [helper.make_node("Relu", ["h"], ["r"], name="relu"),
              helper.make_node("MatMul", ["r", "W2"], ["y"], name="head")]
    proto = make_model(nodes, [tensor("x", ["N", k])], [tensor("y", ["N", m])], inits)
    mix = RNG.standard_normal((k, k)) * np.logspace(0, -1.5, k)[None, :]
    return proto, {"x": (RNG.standard_normal((64, k)) @ mix.T + 0.3).astype(np.float32)}


def _conv(group: int = 1):
    cin, cout = 8, 12
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["h"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              group=group),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    inits = [init("W", RNG.standard_normal((cout, cin // group, 3, 3)).astype(np.float32)),
             init("B", RNG.standard_normal(cout).astype(np.float32))]
    proto = make_model(nodes, [tensor("x", ["N", cin, 9, 10])], [tensor("y", ["N", cout, 9, 10])], inits)
    return proto, {"x": RNG.standard_normal((16, cin, 9, 10)).astype(np.float32)}


def _plan(proto, feeds, node_name: str, form_name: str, rank: int):
    model = onnx_io.from_proto(proto)
    node = next(n for n in model.graph.nodes if n.name == node_name)
    site = lr.find_site(model.graph, node, ShapeView(model))
    assert not isinstance(site, str), site
    data = SampleData(feeds, None)
    stats = lr.collect_stats(model, [site], data, np.random.default_rng(0), 8192)[id(site.node)]
    form = next(f for f in lr.forms_of(site, "auto") if f.name == form_name)
    lr.factorize_form(form, stats, 1e-4, 0.5)
    return model, site, lr.make_plan(form, rank, stats, True)


CASES = [
    ("gemm", lambda: _dense("Gemm"), "fc", "dense", 5),
    ("gemm transB alpha beta", lambda: _dense("Gemm", trans_b=1, alpha=0.5, beta=2.0), "fc", "dense", 7),
    ("matmul + add", lambda: _dense("MatMul"), "fc", "dense", 5),
    ("matmul of a transposed weight", lambda: _dense("MatMul", transposed=True), "fc", "dense", 4),
    ("conv channel", lambda: _conv(), "conv", "channel", 6),
    ("conv spatial", lambda: _conv(), "conv", "spatial", 5),
    ("grouped conv", lambda: _conv(group=2), "conv", "channel", 3),
]


@pytest.mark.parametrize("label,make,node,form,rank", CASES, ids=[c[0] for c in CASES])
def test_overrides_compute_the_factorized_model(label, make, node, form, rank):
    proto, feeds = make()
    model, site, plan = _plan(proto, feeds, node, form, rank)
    slots = lrt.weight_slots(model.graph, site)
    assert not isinstance(slots, str), slots
    assert slots.bias is not None
    values = lrt.override_values(slots, plan)
    assert set(values) == set(slots.names)
    for name, value in values.items():   # same names, shapes and dtypes as the initializers they replace
        original = next(t for t in proto.graph.initializer if t.name == name)
        assert value.shape == tuple(original.dims) and value.dtype == np.float32
    overridable = EvalContext(proto, None, overridable=slots.names)._overridable_proto()
    got = gort.run(gort.session(overridable), {**feeds, **values}, ["y"])["y"]

    factorized = onnx_io.from_proto(proto)
    target = next(n for n in factorized.graph.nodes if n.name == node)
    site_b = lr.find_site(factorized.graph, target, None)
    lr.apply_plan(factorized.graph, lr.Plan(lr.replace_form(plan.form, site_b), plan.rank, plan.factors, plan.bias))
    out = onnx_io.to_proto(factorized)
    onnx.checker.check_model(out, full_check=True)
    want = gort.run(gort.session(out), feeds, ["y"])["y"]
    original = gort.run(gort.session(proto), feeds, ["y"])["y"]
    assert np.abs(want - original).max() > 1e-3           # the factorization changes the outputs...
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())   # ...and the overrides agree


def test_shared_weight_and_a_missing_bias_slot_are_refused_or_reported():
    w = RNG.standard_normal((16, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="fc1"),
             helper.make_node("MatMul", ["a", "W"], ["y"], name="fc2")]
    proto = make_model(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 16])], [init("W", w)])
    model = onnx_io.from_proto(proto)
    site = lr.find_site(model.graph, model.graph.nodes[0], ShapeView(model))
    why = lrt.weight_slots(model.graph, site)
    assert isinstance(why, str) and "other readers" in why

    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")]
    proto = make_model(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 16])], [init("W", w)])
    model = onnx_io.from_proto(proto)
    site = lr.find_site(model.graph, model.graph.nodes[0], ShapeView(model))
    slots = lrt.weight_slots(model.graph, site)
    assert not isinstance(slots, str) and slots.bias is None   # no Add after it: no slot for a correction
    _, _, plan = _plan(proto, {"x": RNG.standard_normal((64, 16)).astype(np.float32) + 1.0}, "fc", "dense", 4)
    assert isinstance(lrt.override_values(slots, plan), str)


def test_plan_from_the_spectrum_equals_the_direct_computation():
    f, o = 40, 24
    x = RNG.standard_normal((500, f)) @ RNG.standard_normal((f, f)) + 0.3
    w = RNG.standard_normal((f, o))
    gram = Gram()
    gram.update(x)
    stats = lr.Stats(gram)
    site = lr.Site(None, "matmul", None, None, w, RNG.standard_normal(o), np.dtype(np.float32))
    form = lr.Form("dense", site, [w])
    lr.factorize_form(form, stats, 1e-2, 0.5)
    cov, mean = stats.group(site, 0)
    for correct in (True, False):
        for r in (1, 5, 17):
            plan = lr.make_plan(form, r, stats, correct)
            p, q = form.facs[0].factors(r)
            dw = w - p @ q
            num = svd.output_error(dw, cov if correct else cov + np.outer(mean, mean))
            den = svd.output_error(w, cov + np.outer(mean, mean))
            assert plan.rel_error == pytest.approx(np.sqrt(num / den), rel=1e-9)
            assert plan.factors and np.allclose(plan.factors[0][0] @ plan.factors[0][1], p @ q)
            if correct:
                np.testing.assert_allclose(plan.bias, site.bias + dw.T @ mean, atol=1e-10)
            light = lr.make_plan(form, r, stats, correct, factors=False)
            assert light.factors == [] and light.rel_error == plan.rel_error


def test_gain_fills_the_ranks_not_measured():
    layer_sq = {32: 0.0, 24: 0.01, 16: 0.04, 8: 0.16, 4: 0.36}
    measured = {32: 0.0, 16: 0.4}                       # gain 10 at rank 16
    filled = lrt.gain_filled(measured, layer_sq, [32, 24, 16, 8, 4])
    assert filled == pytest.approx({32: 0.0, 24: 0.1, 16: 0.4, 8: 1.6, 4: 3.6})
    measured = {32: 0.0, 24: 0.02, 8: 0.64}            # gain 2 at 24, 4 at 8: linear in the rank between
    filled = lrt.gain_filled(measured, layer_sq, [32, 24, 16, 8, 4])
    assert filled[16] == pytest.approx(3.0 * 0.04) and filled[4] == pytest.approx(4.0 * 0.36)
    assert lrt.gain_filled({32: 0.0}, layer_sq, [32, 16]) == {32: 0.0, 16: 0.04}


def _target_run(proto, data, **options):
    model = onnx_io.from_proto(proto)
    ctx = PassContext(data=data, target_params=0.6, options={"lowrank": {
        "latency": "off", "min_weights": 0, "min_rank": 1, "target_scope": "layers", **options}})
    return lr.LowRank().run(model, ctx), model


def test_the_table_by_overrides_and_within_its_work_budget():
    proto, data = mlp(n=256)
    result, model = _target_run(proto, data)
    sens = result.stats["allocation"]["sensitivity"]
    assert sens["kind"] == "model" and sens["by_overrides"] == 2 and "by_model" not in sens
    asked = sens["table"]["asked"]
    assert sens["table"]["measured"] == asked and "over_budget" not in sens["table"]
    assert result.stats["allocation"]["met"]

    # A budget below the full table: fewer samples first, then fewer measured ranks; the target is still met.
    tiny = asked["tmacs"] / 40
    result, model = _target_run(proto, data, sensitivity_tmacs=tiny)
    table = result.stats["allocation"]["sensitivity"]["table"]
    assert table["measured"]["tmacs"] <= tiny * 1.0001
    assert table["measured"]["levels"] < asked["levels"]
    assert result.stats["allocation"]["met"] and result.changed
    onnx.checker.check_model(onnx_io.to_proto(model), full_check=True)


def test_table_size_shrinks_samples_then_levels():
    def per_sample(n_levels):
        return 1e9 * n_levels

    assert budget.table_size(per_sample, 8, 256, 0.0, min_levels=1)[:2] == (8, 256)      # no cap
    assert budget.table_size(per_sample, 8, 256, 8e9 * 64, min_levels=1)[:2] == (8, 64)  # samples first
    assert budget.table_size(per_sample, 8, 256, 3e9 * 16, min_levels=1)[:2] == (3, 16)  # then levels
    levels, samples, stats = budget.table_size(per_sample, 8, 256, 1e9, min_levels=1)
    assert (levels, samples) == (1, 8) and "over_budget" in stats


def test_cross_gram_split_equals_gathering_each_block_alone():
    from graphopt.compress.lstsq import CrossGram

    x = RNG.standard_normal((200, 6))
    ys = [RNG.standard_normal((200, n)) for n in (3, 5)]
    joint = CrossGram()
    joint.update(x, np.concatenate(ys, axis=1))
    for part, y in zip(joint.split([3, 5]), ys):
        alone = CrossGram()
        alone.update(x, y)
        w1, b1 = part.solve(1e-3)
        w2, b2 = alone.solve(1e-3)
        np.testing.assert_allclose(w1, w2, atol=1e-12)
        np.testing.assert_allclose(b1, b2, atol=1e-12)
        assert part.relative_error(w1, b1) == pytest.approx(alone.relative_error(w2, b2))
    with pytest.raises(ValueError, match="do not cover"):
        joint.split([3, 4])
