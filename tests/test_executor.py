"""graphopt.measure.executor: InProcess and ProcessPool agree, ship the context once per worker, report errors
with the item named, and surface a dead worker instead of hanging; EvalContext caches per process."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.measure.calibration import SampleData
from graphopt.measure.executor import (
    ContextError,
    EvalContext,
    InProcess,
    ProcessPool,
    TaskError,
    WorkerDied,
    in_worker,
    make_executor,
    relative_error,
    worker_threads,
)
from tests.util import init, make_model, run, tensor

# ---------------------------------------------------------------------------------------------
# a tiny CNN and the evaluation the pool runs on it


def tiny_cnn(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((6, 1, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    w2 = rng.standard_normal((6 * 6 * 6, 5)).astype(np.float32) / 10
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Flatten", ["r1"], ["f"]),
        helper.make_node("MatMul", ["f", "w2"], ["y"]),
    ]
    return make_model(nodes, [tensor("x", ["n", 1, 8, 8])], [tensor("y", ["n", 5])],
                      [init("w1", w1), init("b1", b1), init("w2", w2)])


def tiny_data(n: int = 40) -> SampleData:
    x = np.random.default_rng(1).standard_normal((n, 1, 8, 8)).astype(np.float32)
    return SampleData({"x": x}, labels=np.arange(n) % 5)


def zero_filters(ctx: EvalContext, item: tuple[str, int]) -> float:
    """Output error with the first ``k`` filters of w1 zeroed, by override or by a rebuilt model."""
    how, k = item
    w1 = onnx.numpy_helper.to_array(next(t for t in ctx.proto().graph.initializer if t.name == "w1")).copy()
    w1[:k] = 0
    if how == "override":
        return ctx.error(ctx.run({"w1": w1}))
    proto = ctx.fresh_proto()
    for t in proto.graph.initializer:
        if t.name == "w1":
            t.CopyFrom(onnx.numpy_helper.from_array(w1, "w1"))
    return ctx.error(ctx.run(model=proto))


ITEMS = [("override", k) for k in range(0, 7, 2)] + [("model", k) for k in (1, 3, 6)]


class CountedEvalContext(EvalContext):
    """An EvalContext that counts its pickling here and its unpickling in each worker."""

    pickled = 0

    def __getstate__(self):
        CountedEvalContext.pickled += 1
        return super().__getstate__()

    def __setstate__(self, state):
        global _LOADS
        _LOADS += 1
        self.__dict__.update(state)


_LOADS = 0


def zero_filters_where(ctx: CountedEvalContext, item: tuple[str, int]) -> tuple:
    return (zero_filters(ctx, item), os.getpid(), _LOADS, os.environ.get("OMP_NUM_THREADS"), worker_threads(),
            in_worker())


def test_process_pool_equals_in_process_on_a_real_model_and_ships_the_context_once():
    ctx = CountedEvalContext(tiny_cnn().SerializeToString(), tiny_data(), batch_size=16, overridable=("w1",))
    serial = InProcess().map(zero_filters, ITEMS, context=ctx)
    CountedEvalContext.pickled = 0
    env_before = os.environ.get("OMP_NUM_THREADS")
    pooled = ProcessPool(2).map(zero_filters_where, ITEMS, context=ctx)
    np.testing.assert_allclose([p[0] for p in pooled], serial, rtol=1e-5, atol=1e-9)  # in item order
    assert serial[0] == 0.0  # nothing zeroed
    assert serial[3] > serial[2] > serial[1] > 0  # more filters zeroed, more error
    assert serial[ITEMS.index(("model", 6))] == pytest.approx(serial[ITEMS.index(("override", 6))], rel=1e-6)
    # the context is pickled once here and unpickled once per worker, not per item
    assert CountedEvalContext.pickled == 1
    pids = {p[1] for p in pooled}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids
    assert all(p[2] == 1 for p in pooled)
    # workers run single-threaded; the parent's environment is left as it was
    assert all(p[3] == "1" and p[4] == 1 and p[5] for p in pooled)
    assert os.environ.get("OMP_NUM_THREADS") == env_before
    assert not in_worker() and worker_threads() is None


def test_eval_context_matches_onnxruntime_and_caches_per_process():
    model, data = tiny_cnn(), tiny_data(33)  # 33: the last batch is short
    ctx = EvalContext(model, data, batch_size=8, overridable=("w1",))
    out = ctx.run()["y"]
    np.testing.assert_allclose(out, run(model, {"x": data.inputs["x"]})[0], rtol=1e-5, atol=1e-6)
    assert ctx.session() is ctx.session() and ctx.reference() is ctx.reference()
    copy = pickle.loads(pickle.dumps(ctx))
    # caches stay behind, the model travels (serialized: the context kept the proto it was given parsed)
    assert copy._memo == {} and ctx.model is None and copy.model == model.SerializeToString()
    assert copy.model_bytes() == ctx.model_bytes() and copy.proto() == ctx.proto()
    np.testing.assert_allclose(copy.run()["y"], out)
    assert ctx.accuracy(ctx.reference()) == pytest.approx(
        100 * np.mean(out.argmax(1) == data.labels))
    with pytest.raises(ValueError, match="not overridable"):
        ctx.run({"w2": np.zeros((216, 5), np.float32)})
    with pytest.raises(ValueError, match="not an initializer"):
        EvalContext(model, data, overridable=("nope",)).session()


def test_eval_context_of_an_ir_model_holds_its_weights_by_reference():
    """An IR model's large weights stay its arrays (the context's proto carries stubs); sessions, a
    fresh IR and the pickled bytes (for a pool's workers) still see the whole model."""
    from graphopt.core.onnx_io import from_proto, to_proto
    proto, data = tiny_cnn(), tiny_data(20)
    model = from_proto(proto)
    model.graph.set_initializer_array(model.graph.initializers["w2"], model.graph.initializers["w2"].array * 2)
    ctx = EvalContext(model, data, batch_size=8, overridable=("w2",))
    assert set(ctx.weights) == {"w2"} and ctx.weights["w2"] is model.graph.initializers["w2"].array
    assert ctx.proto().ByteSize() < 1024
    full = to_proto(model)
    np.testing.assert_allclose(ctx.run()["y"], run(full, {"x": data.inputs["x"]})[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ctx.initializer("w2"), model.graph.initializers["w2"].array)
    fresh = ctx.fresh_model()
    assert fresh.graph.initializers["w2"].array is ctx.weights["w2"]
    assert ctx.model_bytes() == full.SerializeToString()
    copy = pickle.loads(pickle.dumps(ctx))
    assert copy.weights == {} and copy.model == full.SerializeToString()
    np.testing.assert_allclose(copy.run({"w2": np.zeros((216, 5), np.float32)})["y"], 0.0)


def test_relative_error():
    ref = {"a": np.array([3.0, 4.0])}
    assert relative_error(ref, {"a": np.array([3.0, 4.0])}) == 0.0
    assert relative_error(ref, {"a": np.zeros(2)}) == pytest.approx(1.0)
    assert relative_error(ref, {"a": np.array([3.0, 5.0])}) == pytest.approx(1 / 25)
    assert relative_error({"a": np.zeros(2)}, {"a": np.ones(2)}) == 2.0  # zero reference: absolute
    with pytest.raises(ValueError, match="shape"):
        relative_error(ref, {"a": np.zeros(3)})


class CountedContext:
    """Counts its pickling."""

    pickled = 0

    def __init__(self, payload: bytes):
        self.payload = payload

    def __getstate__(self):
        CountedContext.pickled += 1
        return {"payload": self.payload}


def square(ctx: CountedContext, item: int) -> tuple:
    return len(ctx.payload), item * item


def test_in_process_uses_the_context_itself_in_order():
    ctx = CountedContext(b"abc")
    CountedContext.pickled = 0
    seen = []
    results = InProcess().map(square, [3, 1, 2], context=ctx, progress=lambda d, t: seen.append((d, t)))
    assert results == [(3, 9), (3, 1), (3, 4)] and CountedContext.pickled == 0
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert InProcess().map(square, [], context=ctx) == [] == ProcessPool(2).map(square, [], context=ctx)


# ---------------------------------------------------------------------------------------------
# errors


class Awkward(Exception):
    """Cannot be rebuilt from its args, so it does not survive pickling."""

    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def fail_some(ctx, item: int) -> int:
    if item == 2:
        time.sleep(0.3)  # fails after item 4 has failed: the error reported must still be item 2's
        raise Awkward("awk", "ward")
    if item >= 4:
        raise ValueError(f"bad item {item}")
    return item


def test_in_process_names_the_failing_item():
    with pytest.raises(TaskError, match=r"fail_some failed on item 4 \(4\): ValueError: bad item 4") as info:
        InProcess().map(fail_some, [0, 1, 3, 3, 4, 5])
    assert info.value.index == 4 and info.value.item == 4
    assert isinstance(info.value.original, ValueError) and info.value.__cause__ is info.value.original
    restored = pickle.loads(pickle.dumps(info.value))
    assert str(restored) == str(info.value) and restored.index == 4


def test_process_pool_reraises_the_first_failing_item_in_order():
    with pytest.raises(TaskError, match=r"fail_some failed on item 1 \(2\): RuntimeError: Awkward") as info:
        ProcessPool(2).map(fail_some, [0, 2, 4, 5, 1])
    assert info.value.index == 1 and info.value.item == 2
    assert "awk-ward" in str(info.value.original)  # the unpicklable exception arrives as text
    assert "Traceback" in str(info.value.original)


def test_runs_of_items_keep_the_order_and_the_first_failure():
    from graphopt.measure.executor import chunks
    assert chunks(20, 2) == [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15), (15, 18), (18, 20)]
    assert chunks(3, 2) == [(0, 1), (1, 2), (2, 3)] and chunks(5, 1) == [(0, 2), (2, 4), (4, 5)]
    items = list(range(20))
    seen = []
    assert ProcessPool(2).map(square, items, context=CountedContext(b""),
                              progress=lambda d, t: seen.append(d)) == [(0, i * i) for i in items]
    assert seen == [3, 6, 9, 12, 15, 18, 20]
    # items 4 and 5 fail in the second run, 7 in the third: the first in item order is reported
    with pytest.raises(TaskError, match=r"item 4 \(4\): ValueError: bad item 4") as info:
        ProcessPool(2).map(fail_some, [0, 1, 3, 3, 4, 5, 1, 7, 1, 1, 1, 1])
    assert "Traceback" in str(info.value.original.__cause__)   # the worker's, as text


def die_on_three(ctx, item: int) -> int:
    if item == 3:
        os._exit(7)
    return item


def test_a_dead_worker_is_an_error_not_a_hang():
    with pytest.raises(WorkerDied, match="worker process died"):
        ProcessPool(2).map(die_on_three, [1, 2, 3, 4])


class BadOnArrival:
    """Pickles here, fails to unpickle in the worker."""

    def __init__(self):
        self.payload = b"x"  # a non-empty state, or pickle would not call __setstate__

    def __setstate__(self, state):
        raise RuntimeError("cannot rebuild me")


def test_a_context_that_fails_to_load_in_the_worker_says_so():
    with pytest.raises(ContextError, match="context failed to load.*cannot rebuild me"):
        ProcessPool(2).map(square, [1, 2, 3], context=BadOnArrival())


def test_unpicklable_things_fail_before_any_process_starts():
    with pytest.raises(TypeError, match="module-level function"):
        ProcessPool(2).map(lambda ctx, i: i, [1, 2])
    with pytest.raises(TypeError, match="context cannot be sent"):
        ProcessPool(2).map(square, [1], context=lambda: 0)
    with pytest.raises(TypeError, match="item 1"):
        ProcessPool(2).map(square, [1, lambda: 0])


def where(ctx, item: int) -> tuple[bool, bool]:
    from graphopt.measure.executor import single_core
    return single_core(), in_worker()


def test_an_evaluation_keeps_one_blas_thread_wherever_it_runs():
    """blas.for_work gives large operations every core only outside evaluations: their bits then do not
    depend on the executor (a threaded LAPACK solve's do on its thread count)."""
    from graphopt.measure.executor import single_core
    assert not single_core()
    assert InProcess().map(where, [1, 2]) == [(True, False), (True, False)]
    assert ProcessPool(2).map(where, [1]) == [(True, True)]
    assert not single_core()      # only inside the call


def test_make_executor():
    assert isinstance(make_executor(None), InProcess) and isinstance(make_executor(1), InProcess)
    pool = make_executor(3)
    assert isinstance(pool, ProcessPool) and pool.workers == 3
    assert make_executor(0).workers == (os.cpu_count() or 1)
    with pytest.raises(ValueError):
        make_executor(-2)
    with pytest.raises(ValueError):
        ProcessPool(0)


def test_the_ray_executor_without_ray_refuses_in_one_line(monkeypatch, tmp_path, capsys):
    """Without the extra (simulated: ``import ray`` fails), ``--executor ray`` and ``--ray-address`` exit 2
    with one line naming the install command, before anything runs; the API and make_executor refuse
    the same way."""
    import sys

    from graphopt import optimize
    from graphopt.app import cli
    from graphopt.core.errors import GraphoptError

    monkeypatch.setitem(sys.modules, "ray", None)
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_cnn().SerializeToString())
    for flags in (["--executor", "ray"], ["--ray-address", "10.0.0.1:6379"]):
        assert cli.main(["optimize", str(model), "-o", str(tmp_path / "out.onnx"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install 'graphopt[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(GraphoptError, match=r"graphopt\[ray\]"):
        optimize(model, executor="ray")
    with pytest.raises(GraphoptError, match=r"graphopt\[ray\]"):
        make_executor(2, "ray")


def test_executor_options_are_checked(tmp_path, capsys):
    from graphopt.app import cli

    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_cnn().SerializeToString())
    for flags, says in ((["--workers", "-1"], "workers must be >= 0"),
                        (["--executor", "process", "--ray-address", "h:1"], "a Ray address needs the ray executor"),
                        (["--executor", "spark"], "invalid choice")):
        assert cli.main(["optimize", str(model), "-o", str(tmp_path / "out.onnx"), *flags]) == 2
        assert says in capsys.readouterr().err
    with pytest.raises(ValueError, match="the executor must be one of"):
        make_executor(2, "spark")
    with pytest.raises(ValueError, match="needs the ray executor"):
        make_executor(2, "process", address="h:1")


def test_a_signal_raised_inside_c_code_is_still_a_signal():
    """A signal handler's exception raised while Ray's C code runs surfaces as a SystemError with the
    handler's exception as its context; the Ray executor stops on it as on the signal itself."""
    from graphopt.measure.ray_executor import _signal_exception

    interrupt = KeyboardInterrupt()
    assert _signal_exception(interrupt) is interrupt
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemError("<built-in method __new__> returned a result with an exception set") from None
    except SystemError as wrapped:
        assert isinstance(_signal_exception(wrapped), KeyboardInterrupt)
    assert _signal_exception(ValueError("an evaluation's error")) is None
