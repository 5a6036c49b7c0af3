"""graphopt.compress.shards: calibration statistics gathered in shards of samples equal the unsharded ones to
float rounding (no row subsampling), one shard is the unsharded code itself, and the result does not depend on
the executor or its number of workers (bitwise). Ray's run of the same is in tests/test_ray_executor.py."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.compress import lstsq, shards
from graphopt.compress.lstsq import LinearLayer
from graphopt.core.onnx_io import from_proto
from graphopt.measure.calibration import Gram
from graphopt.measure.executor import InProcess, ProcessPool
from tests.test_executor import tiny_cnn, tiny_data


def cnn_layers(model):
    """The tiny CNN's conv (im2col rows) and its MatMul (one row per sample)."""
    by_name = {n.outputs[0].name: n for n in model.graph.nodes}
    return {"conv": LinearLayer.of(model.graph, by_name["c1"]), "fc": LinearLayer.of(model.graph, by_name["y"])}


def assert_grams(a: dict, b: dict, *, exact: bool) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for name in ("xtx", "xty", "y_sum", "y_sq"):
            x, y = getattr(a[key], name), getattr(b[key], name)
            if exact:
                assert np.array_equal(x, y), (key, name)
            else:
                np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12 * np.abs(y).max(), err_msg=f"{key} {name}")
        assert a[key].count == b[key].count


def test_spans():
    assert shards.spans(10, 0) == [(0, 10)] == shards.spans(10, 10) == shards.spans(10, 12)
    assert shards.spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shards.one_shard(10, 0) and shards.one_shard(4, 4) and not shards.one_shard(5, 4)


def test_sharded_crossgrams_equal_the_unsharded_ones_to_rounding_and_do_not_depend_on_the_executor():
    model, data = from_proto(tiny_cnn()), tiny_data(40)
    layers = cnn_layers(model)
    # max_rows above every layer's rows: nothing subsampled, so only the order of the sums differs
    whole = lstsq.collect(model, layers, data, max_rows=10 ** 6, seed=3, batch_size=8)
    serial = shards.collect(model, layers, data, executor=InProcess(), shard_samples=13, max_rows=10 ** 6,
                            seed=3, batch_size=8)
    assert_grams(serial, whole, exact=False)
    assert serial["conv"].count == 40 * 36 and serial["fc"].count == 40
    pooled = shards.collect(model, layers, data, executor=ProcessPool(2), shard_samples=13, max_rows=10 ** 6,
                            seed=3, batch_size=8)
    assert_grams(pooled, serial, exact=True)     # shards added in shard order, whoever computed them
    # subsampled rows: another sample of the same size, still the same bits on every executor
    sub = shards.collect(model, layers, data, executor=InProcess(), shard_samples=13, max_rows=200, seed=3,
                         batch_size=8)
    assert_grams(shards.collect(model, layers, data, executor=ProcessPool(2), shard_samples=13, max_rows=200,
                                seed=3, batch_size=8), sub, exact=True)
    assert abs(sub["conv"].count - 200) <= 4 * 3   # each shard's share, rounded up per batch


def test_one_shard_is_the_unsharded_code():
    model, data = from_proto(tiny_cnn()), tiny_data(40)
    layers = cnn_layers(model)
    whole = lstsq.collect(model, layers, data, max_rows=300, seed=3, batch_size=8)
    for shard_samples in (0, 40, 100):
        assert_grams(shards.collect(model, layers, data, executor=ProcessPool(2), shard_samples=shard_samples,
                                    max_rows=300, seed=3, batch_size=8), whole, exact=True)


def test_gram_merge_is_the_gram_of_both_row_sets():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((30, 5)), rng.standard_normal((17, 5))
    ga, gb, whole = Gram(), Gram(), Gram()
    ga.update(a)
    gb.update(b)
    whole.update(np.concatenate([a, b]))
    merged = ga.merge(gb)
    np.testing.assert_allclose(merged.xtx, whole.xtx, rtol=1e-12)
    np.testing.assert_allclose(merged.covariance, whole.covariance, rtol=1e-10, atol=1e-12)
    assert merged.count == 47 and ga.count == 30    # neither side changed
    assert Gram().merge(ga).count == 30 and ga.merge(Gram()).xtx is not ga.xtx
    with pytest.raises(ValueError, match="features"):
        ga.merge(Gram()).merge(_gram(np.ones((2, 3))))


def _gram(rows):
    g = Gram()
    g.update(rows)
    return g


def test_lowrank_input_statistics_in_shards_match_and_do_not_depend_on_the_executor():
    from graphopt.core.manager import PassContext
    from graphopt.passes.lossy import lowrank as lr

    proto, data = tiny_cnn(), tiny_data(40)
    moments = {}
    for name, executor in (("serial", InProcess()), ("pool", ProcessPool(2))):
        for shard_samples in (0, 13):
            model = from_proto(proto)
            ctx = PassContext(options={"lowrank": {"shard_samples": shard_samples, "max_rows": 10 ** 6}},
                              data=data, executor=executor)
            run = lr.LowRank().start(model, ctx)
            sites = [lr.find_site(model.graph, n, None) for n in model.graph.nodes if n.op_type in ("Conv", "MatMul")]
            stats = lr.gather_stats(run, sites, np.random.default_rng(5))
            moments[name, shard_samples] = [stats[id(s.node)].moments for s in sites]
    for a, b in zip(moments["serial", 0], moments["serial", 13]):   # conv patches and dense rows
        np.testing.assert_allclose(b.xtx, a.xtx, rtol=1e-12)
        np.testing.assert_allclose(b.sum, a.sum, rtol=1e-12)
        assert a.count == b.count
    for a, b in zip(moments["serial", 13], moments["pool", 13]):
        assert np.array_equal(a.xtx, b.xtx) and np.array_equal(a.sum, b.sum)
