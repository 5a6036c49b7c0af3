"""graphopt.measure.ray_executor on a local Ray cluster started here (skipped without the ``ray`` extra): the
same results as in-process (evaluations, sharded statistics, written models byte for byte), the context
shipped once, a killed worker retried, a failing task named, Ctrl-C cancelling the outstanding tasks and
shutting the cluster down, and no file left outside the output."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import graphopt  # noqa: E402
from graphopt.app import cli  # noqa: E402
from graphopt.compress import lstsq, shards  # noqa: E402
from graphopt.core.onnx_io import from_proto  # noqa: E402
from graphopt.measure.executor import InProcess, TaskError, WorkerDied  # noqa: E402
from graphopt.measure.ray_executor import RayExecutor  # noqa: E402
from tests import test_executor as te  # noqa: E402
from tests.test_shards import assert_grams, cnn_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


@pytest.fixture(scope="module")
def cluster():
    """One local cluster of 2 CPUs for the module (starting one takes seconds); the last test shuts it down."""
    executor = RayExecutor(2)
    executor.start()
    yield executor
    executor.close()


def test_results_equal_in_process_in_item_order_and_the_context_goes_once(cluster):
    ctx = te.CountedEvalContext(te.tiny_cnn().SerializeToString(), te.tiny_data(), batch_size=16,
                                overridable=("w1",))
    serial = InProcess().map(te.zero_filters, te.ITEMS, context=ctx)
    te.CountedEvalContext.pickled = 0
    seen = []
    out = cluster.map(te.zero_filters_where, te.ITEMS, context=ctx, progress=lambda d, t: seen.append(d))
    assert [o[0] for o in out] == serial                     # bit for bit, in item order
    assert seen == list(range(1, len(te.ITEMS) + 1))
    assert te.CountedEvalContext.pickled == 1                # put in the object store once
    loads: dict[int, set] = {}
    for _, pid, count, omp, threads, worker in out:
        loads.setdefault(pid, set()).add(count)
        assert omp == "1" and threads == 1 and worker       # one thread per worker, as in a process pool
    assert os.getpid() not in loads and all(len(v) == 1 for v in loads.values())  # loaded once per worker
    again = cluster.map(te.zero_filters_where, te.ITEMS, context=ctx)     # the same context object: not put again
    assert te.CountedEvalContext.pickled == 1 and [o[0] for o in again] == serial
    assert all(o[2] in loads[o[1]] for o in again if o[1] in loads)      # a worker keeps its copy
    assert cluster.map(te.square, []) == []


def test_a_failing_task_is_named_and_the_cluster_stays_usable(cluster):
    with pytest.raises(TaskError, match=r"fail_some failed on item 1 \(2\): RuntimeError: Awkward") as info:
        cluster.map(te.fail_some, [0, 2, 4, 5, 1])
    assert info.value.index == 1 and "awk-ward" in str(info.value.original)
    with pytest.raises(TaskError, match=r"item 4 \(4\): ValueError: bad item 4"):
        cluster.map(te.fail_some, [0, 1, 3, 3, 4, 5])
    assert cluster.map(te.square, [3, 1], context=te.CountedContext(b"ab")) == [(2, 9), (2, 1)]


def die_once(marker_dir: str, item: int) -> int:
    """Kills its worker the first time it sees item 2 (a marker file remembers), then succeeds."""
    marker = Path(marker_dir) / "died"
    if item == 2 and not marker.exists():
        marker.write_text("x")
        os._exit(1)
    return item * 10


def test_a_killed_worker_is_retried(cluster, tmp_path):
    assert cluster.map(die_once, [1, 2, 3], context=str(tmp_path)) == [10, 20, 30]
    assert (tmp_path / "died").exists()


def test_a_task_whose_worker_keeps_dying_fails_naming_it(cluster):
    cluster.retries = 1
    try:
        with pytest.raises(WorkerDied, match=r"die_on_three on item 2 \(3\) and 1 retries"):
            cluster.map(te.die_on_three, [1, 2, 3, 4])
    finally:
        cluster.retries = 3
    assert cluster.map(te.square, [2], context=te.CountedContext(b"")) == [(0, 4)]


def test_sharded_statistics_on_ray_equal_in_process_bitwise(cluster):
    model, data = from_proto(te.tiny_cnn()), te.tiny_data(40)
    layers = cnn_layers(model)
    kwargs = {"shard_samples": 13, "max_rows": 200, "seed": 3, "batch_size": 8}
    serial = shards.collect(model, layers, data, executor=InProcess(), **kwargs)
    assert_grams(shards.collect(model, layers, data, executor=cluster, **kwargs), serial, exact=True)
    whole = lstsq.collect(model, layers, data, max_rows=10 ** 6, seed=3, batch_size=8)
    assert_grams(shards.collect(model, layers, data, executor=cluster, **{**kwargs, "max_rows": 10 ** 6}),
                 whole, exact=False)


def test_a_shard_directory_s_statistics_and_re_fit_on_ray_equal_in_process_bitwise(cluster, tmp_path):
    from graphopt.compress import refit_shards
    from graphopt.measure.sampledir import SampleDir
    from tests.test_sampledir import refit_case, weights, write_shards

    model, data = from_proto(te.tiny_cnn()), te.tiny_data(40)
    layers = cnn_layers(model)
    stream = SampleDir.open(write_shards(tmp_path / "set", data, 13), model).slices()
    kwargs = {"shard_samples": 0, "max_rows": 200, "seed": 3, "batch_size": 8}
    assert_grams(shards.collect(model, layers, stream, executor=cluster, **kwargs),
                 shards.collect(model, layers, stream, executor=InProcess(), **kwargs), exact=True)
    proto, reference, data, folder, targets = refit_case(tmp_path / "refit")
    stream = SampleDir.open(folder, reference).slices()
    out = {}
    for name, executor in (("serial", InProcess()), ("ray", cluster)):
        fitted = from_proto(proto)
        refit_shards.refit(fitted, reference, targets, stream, data, executor=executor, max_rows=150, batch_size=8)
        out[name] = weights(fitted)
    assert all(np.array_equal(out["serial"][k], out["ray"][k]) for k in out["serial"])


def test_prune_on_a_shard_directory_writes_the_same_model_as_in_process(cluster, tmp_path):
    from tests.test_sampledir import calib_shards

    args = {"preset": "prune", "data": calib_shards(tmp_path), "samples": 128, "target_macs": 0.5,
            "run_verify": False}
    serial = graphopt.optimize(MODELS / "resnet.onnx", **args)
    distributed = graphopt.optimize(MODELS / "resnet.onnx", executor=cluster, **args)
    assert distributed.model.SerializeToString() == serial.model.SerializeToString()


@pytest.mark.parametrize("model, preset, options", [
    ("vgg", "lowrank", {}),                                              # the lowrank table by overrides
    ("resnet", "prune", {"prune_filters.blend": True, "prune_filters.shard_samples": 100}),
])
def test_passes_write_the_same_model_as_in_process(cluster, model, preset, options):
    args = {"preset": preset, "data": MODELS / "fmnist_calib.npz", "samples": 256, "target_macs": 0.5,
            "options": options, "run_verify": False}
    serial = graphopt.optimize(MODELS / f"{model}.onnx", **args)
    distributed = graphopt.optimize(MODELS / f"{model}.onnx", executor=cluster, **args)
    assert distributed.model.SerializeToString() == serial.model.SerializeToString()


def test_cli_writes_the_same_bytes_and_nothing_else(tmp_path):
    """A separate process starts its own local cluster (the guard's trials and the sensitivity table on it);
    the file equals the in-process run's, and TMPDIR, HOME and the working directory stay empty."""
    argv = ["optimize", str(MODELS / "resnet.onnx"), "--preset", "prune", "--target-macs", "0.5", "--max-drop",
            "0.3", "--allow-partial", "--samples", "128", "--data", str(MODELS / "fmnist_calib.npz"), "--no-verify",
            "-q"]
    assert cli.main([*argv, "-o", str(tmp_path / "serial.onnx")]) == 0
    dirs = {name: tmp_path / name for name in ("tmp", "home", "cwd")}
    for d in dirs.values():
        d.mkdir()
    env = {**os.environ, "TMPDIR": str(dirs["tmp"]), "HOME": str(dirs["home"]), "PYTHONPATH": str(ROOT)}
    out = tmp_path / "ray.onnx"
    fallback = set(Path("/tmp").glob("graphopt-ray-*"))   # a TMPDIR this deep puts Ray's sockets there
    done = subprocess.run([sys.executable, "-m", "graphopt", *argv, "-o", str(out), "--executor", "ray",
                           "--workers", "2"], cwd=dirs["cwd"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout == ""       # -q: quiet, Ray too
    assert out.read_bytes() == (tmp_path / "serial.onnx").read_bytes()
    assert {name: sorted(p.name for p in d.iterdir()) for name, d in dirs.items()} == {"tmp": [], "home": [],
                                                                                      "cwd": []}
    assert not set(Path("/tmp").glob("graphopt-ray-*")) - fallback


def test_an_address_nothing_listens_at_is_refused_at_once(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(te.tiny_cnn().SerializeToString())
    start = time.perf_counter()
    assert cli.main(["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--ray-address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err == "graphopt: error: cannot reach the Ray cluster at 127.0.0.1:1: Connection refused\n"
    assert time.perf_counter() - start < 30 and not (tmp_path / "out.onnx").exists()


def test_ray_s_files_go_to_the_scratch_directory_or_where_a_socket_path_fits(tmp_path, monkeypatch):
    """Ray's sockets sit 64 bytes below its root and a socket path has at most 107: under a deep TMPDIR
    the root is a private folder in /tmp; either way close() removes it."""
    import tempfile

    from graphopt.core import scratch

    for tmpdir, short in ((Path("/tmp"), False), (tmp_path / ("deep" * 10), True)):
        tmpdir.mkdir(exist_ok=True)
        monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
        executor = RayExecutor(1)
        with scratch.run():
            root = Path(executor._session_root())
            assert root.is_dir() and len(str(root)) + 64 <= 107
            assert (root.parent == Path("/tmp") and root.name.startswith("graphopt-ray-")) if short else \
                root.parent.parent == tmpdir
            executor.close()
            assert not root.exists()


def sleepy(marker_dir: str, item: int) -> int:
    """Item 0 returns at once; the others take 15 s, then leave a marker (unless cancelled first)."""
    if item:
        time.sleep(15)
        (Path(marker_dir) / str(item)).write_text("x")
    return item


def test_ctrl_c_cancels_the_outstanding_tasks_and_shuts_the_cluster_down(cluster, tmp_path):
    """Runs last: it shuts the module's cluster down."""
    pressed = []

    def interrupt(done: int, total: int) -> None:   # Ctrl-C once item 0 is back and the others run
        pressed.append(time.perf_counter())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cluster.map(sleepy, [0, 1, 2, 3], context=str(tmp_path), progress=interrupt)
    assert pressed and not ray.is_initialized()
    # The running tasks were stopped and the pending never started: no marker when the map returns (had it
    # waited for the running ones, they would have left theirs), nor after a task's whole time.
    assert list(tmp_path.iterdir()) == []
    time.sleep(15.5)
    assert list(tmp_path.iterdir()) == []
