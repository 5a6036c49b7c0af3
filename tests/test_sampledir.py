"""graphopt.measure.sampledir and ``--data DIR``: a calibration set as a directory of ``.npz`` shards is checked by
its headers, held in memory only as its head, and streamed shard by shard into the summed statistics (prune's
consumer statistics, lowrank's input statistics), one shard read at a time in this process and each read by
its own task in a pool; the statistics equal those of the same shards cut from one file bit for bit, on every
executor; a bad directory is refused in one line (exit 2). Ray's run of the same is in
tests/test_ray_executor.py."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

import graphopt
from graphopt.app import cli
from graphopt.compress import shards
from graphopt.core.errors import DataError
from graphopt.core.manager import PassContext
from graphopt.core.onnx_io import from_proto
from graphopt.measure import sampledir
from graphopt.measure.calibration import SampleData
from graphopt.measure.executor import InProcess, ProcessPool
from graphopt.measure.sampledir import SampleDir
from tests.test_executor import tiny_cnn, tiny_data
from tests.test_shards import assert_grams, cnn_layers

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def write_shards(folder: Path, data: SampleData, size: int) -> Path:
    """``data`` cut into shards of ``size`` samples, ``part-000.npz``, ... (the last may be shorter)."""
    folder.mkdir(parents=True, exist_ok=True)
    save = np.savez
    for k, start in enumerate(range(0, data.n_samples, size)):
        part = data.window(start, min(start + size, data.n_samples))
        extra = {} if part.labels is None else {"labels": part.labels}
        save(folder / f"part-{k:03d}.npz", **part.inputs, **extra)
    return folder


class CountingReads:
    """Wraps the shard reader: counts the shards read and how many read arrays are alive at once."""

    def __init__(self, monkeypatch) -> None:
        self.reads: list[str] = []
        self.alive = 0
        self.most_alive = 0
        real = sampledir.load_data

        def load(path, model):
            data = real(path, model)
            self.reads.append(Path(path).name)
            self.alive += 1
            self.most_alive = max(self.most_alive, self.alive)
            weakref.finalize(data.inputs["x"], self._freed)   # views of a window keep their base alive
            return data

        monkeypatch.setattr(sampledir, "load_data", load)

    def _freed(self) -> None:
        self.alive -= 1


def test_open_reads_headers_only_and_head_reads_only_the_shards_it_needs(tmp_path, monkeypatch):
    model, data = from_proto(tiny_cnn()), tiny_data(40)
    folder = write_shards(tmp_path / "set", data, 13)
    reads = CountingReads(monkeypatch)
    found = SampleDir.open(folder, model)
    assert found.counts == [13, 13, 13, 1] and found.n_samples == 40 and reads.reads == []
    head = found.head(20, model)
    assert reads.reads == ["part-000.npz", "part-001.npz"]
    assert np.array_equal(head.inputs["x"], data.inputs["x"][:20]) and np.array_equal(head.labels, data.labels[:20])
    assert found.head(100, model).n_samples == 40


def test_a_relative_directory_gives_slices_any_process_can_read(tmp_path, monkeypatch):
    write_shards(tmp_path / "set", tiny_data(40), 13)
    monkeypatch.chdir(tmp_path)
    slices = SampleDir.open("set", from_proto(tiny_cnn())).slices()
    assert all(Path(s.path).is_absolute() and Path(s.path).parent == tmp_path / "set" for s in slices)


def test_slices_cover_the_set_in_order_less_a_held_out_range(tmp_path):
    found = SampleDir.open(write_shards(tmp_path / "set", tiny_data(40), 13), from_proto(tiny_cnn()))
    whole = found.slices()
    assert [(Path(s.path).name, s.start, s.stop) for s in whole] == [
        ("part-000.npz", 0, 13), ("part-001.npz", 0, 13), ("part-002.npz", 0, 13), ("part-003.npz", 0, 1)]
    held = found.slices(exclude=(10, 20))
    assert [(s.start, s.stop) for s in held] == [(0, 10), (7, 13), (0, 13), (0, 1)]
    assert sum(s.n_samples for s in held) == 30
    assert [(s.start, s.stop) for s in found.slices(stop=20)] == [(0, 13), (0, 7)]


def test_statistics_over_a_directory_equal_the_same_shards_in_memory_on_every_executor(tmp_path):
    model, data = from_proto(tiny_cnn()), tiny_data(40)
    layers = cnn_layers(model)
    stream = SampleDir.open(write_shards(tmp_path / "set", data, 13), model).slices()
    kwargs = {"shard_samples": 0, "max_rows": 200, "seed": 3, "batch_size": 8}
    serial = shards.collect(model, layers, stream, executor=InProcess(), **kwargs)
    # the same shards cut from the samples in memory: the same sums in the same order, the same rows drawn
    assert_grams(shards.collect(model, layers, data, executor=InProcess(), **{**kwargs, "shard_samples": 13}),
                 serial, exact=True)
    assert_grams(shards.collect(model, layers, stream, executor=ProcessPool(2), **kwargs), serial, exact=True)
    assert serial["fc"].count == 40            # every shard's rows (one per sample, each within its share)
    # rows of a held-out range left out: the statistics of the other samples only
    held = SampleDir.open(tmp_path / "set", model).slices(exclude=(0, 13))
    rest = shards.collect(model, layers, held, executor=InProcess(), **{**kwargs, "max_rows": 10 ** 6})
    whole = shards.collect(model, layers, data.window(13, 40), executor=InProcess(), **{**kwargs, "max_rows": 10 ** 6})
    assert_grams(rest, whole, exact=False)


def test_in_process_reads_one_shard_at_a_time(tmp_path, monkeypatch):
    model, data = from_proto(tiny_cnn()), tiny_data(40)
    stream = SampleDir.open(write_shards(tmp_path / "set", data, 5), model).slices()
    reads = CountingReads(monkeypatch)
    shards.collect(model, cnn_layers(model), stream, executor=InProcess(), shard_samples=0, max_rows=200, seed=3,
                   batch_size=4)
    assert len(reads.reads) == 8 and reads.most_alive == 1 and reads.alive == 0


def test_lowrank_input_statistics_stream_every_shard_of_a_directory(tmp_path):
    from graphopt.passes.lossy import lowrank as lr

    proto, data = tiny_cnn(), tiny_data(40)
    folder = write_shards(tmp_path / "set", data, 13)
    moments = {}
    for name, executor, shard_samples, data_dir in (("memory", InProcess(), 13, None),
                                                    ("dir", InProcess(), 0, folder), ("dir-pool", ProcessPool(2), 0, folder)):
        model = from_proto(proto)
        # with a directory the samples in memory are its head, fewer than the set the statistics read
        ctx = PassContext(options={"lowrank": {"shard_samples": shard_samples, "max_rows": 300}},
                          data=data if data_dir is None else data.window(0, 13), executor=executor,
                          data_dir=None if data_dir is None else SampleDir.open(data_dir, model))
        run = lr.LowRank().start(model, ctx)
        sites = [lr.find_site(model.graph, n, None) for n in model.graph.nodes if n.op_type in ("Conv", "MatMul")]
        stats = lr.gather_stats(run, sites, np.random.default_rng(5))
        moments[name] = [stats[id(s.node)].moments for s in sites]
    for key in ("dir", "dir-pool"):
        for a, b in zip(moments["memory"], moments[key]):
            assert np.array_equal(a.xtx, b.xtx) and np.array_equal(a.sum, b.sum) and a.count == b.count


def test_a_shard_corrupt_past_its_header_is_bad_input_where_it_is_read(tmp_path):
    model, data = from_proto(tiny_cnn()), tiny_data(40)
    folder = write_shards(tmp_path / "set", data, 20)
    found = SampleDir.open(folder, model)
    shard = folder / "part-001.npz"
    blob = bytearray(shard.read_bytes())
    start = blob.index(b"x.npy") + 600                       # inside the array's data, past its header
    blob[start:start + 64] = bytes(64)                       # the member's CRC no longer matches
    shard.write_bytes(bytes(blob))
    assert SampleDir.open(folder, model).counts == found.counts   # the headers still read
    for executor in (InProcess(), ProcessPool(2)):
        with pytest.raises(DataError, match="part-001.npz"):
            shards.collect(model, cnn_layers(model), found.slices(), executor=executor, shard_samples=0,
                           max_rows=200, seed=3)


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no .npz shards in this directory"),
    (lambda d: (d / "a.npz").write_bytes(b"not a zip"), "a.npz: not a readable .npz file"),
    (lambda d: np.savez(d / "a.npz", y=np.zeros((4, 1, 8, 8), np.float32)), "a.npz: array 'y' matches no model input"),
    (lambda d: (np.savez(d / "a.npz", x=np.zeros((4, 1, 8, 8), np.float32)),
                np.savez(d / "b.npz", x=np.zeros((4, 1, 8, 8), np.float64))), "b.npz: array 'x' holds float64"),
    (lambda d: (np.savez(d / "a.npz", x=np.zeros((4, 1, 8, 8), np.float32)),
                np.savez(d / "b.npz", x=np.zeros((4, 1, 8, 8), np.float32), labels=np.zeros(4, np.int64))),
     "b.npz: holds the arrays"),
    (lambda d: np.savez(d / "a.npz", x=np.zeros((4, 1, 9, 8), np.float32)), "a.npz: input 'x'"),
])
def test_a_bad_shard_directory_is_refused_in_one_line(tmp_path, capsys, make, message):
    import onnx
    folder = tmp_path / "set"
    folder.mkdir()
    make(folder)
    model = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), model)
    code = cli.main(["optimize", str(model), "--preset", "lowrank", "--data", str(folder), "-o",
                     str(tmp_path / "out.onnx"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert err.startswith("graphopt: error: ") and not (tmp_path / "out.onnx").exists()


def calib_shards(tmp_path: Path, size: int = 256) -> Path:
    """The bundled calibration set (512 images) in shards of ``size`` (2 by default: a pool of 2 then starts
    about once per gathered statistic)."""
    calib = np.load(MODELS / "fmnist_calib.npz")
    return write_shards(tmp_path / "set", SampleData({"input": calib["input"]}, labels=calib["labels"]), size)


@pytest.mark.parametrize("model, preset, note", [
    ("resnet", "prune", "refit_in_shards"),        # ranking, sensitivity re-fits and the re-fit in shards
    ("vgg", "lowrank", None),                      # input statistics and the compensation in shards
])
def test_a_pass_on_a_directory_writes_the_same_bytes_in_process_and_in_a_pool(tmp_path, model, preset, note):
    """The head (128 samples) in memory, the statistics over all 512 in 2 shards: the same bytes in-process
    and in a pool of 2, and differs from a run on the head alone."""
    folder = calib_shards(tmp_path)
    args = {"preset": preset, "data": folder, "samples": 128, "target_macs": 0.5, "run_verify": False}
    serial = graphopt.optimize(MODELS / f"{model}.onnx", **args)
    pooled = graphopt.optimize(MODELS / f"{model}.onnx", executor="process", workers=2, **args)
    assert pooled.model.SerializeToString() == serial.model.SerializeToString()
    assert serial.report["data_shards"] == {"path": str(folder), "shards": 2, "samples": 512}
    assert serial.report["samples"] == 128
    if note is not None:
        stats = next(p for p in serial.report["passes"] if p["name"] == "prune_filters")["stats"]
        assert stats[note] == {"shards": 2, "samples": 512}
    head = graphopt.optimize(MODELS / f"{model}.onnx", **{**args, "data": folder / "part-000.npz"})
    assert head.model.SerializeToString() != serial.model.SerializeToString()


def refit_case(tmp_path):
    """The tiny CNN with named nodes as the reference, a copy with its weights disturbed as the model to re-fit
    (both layers: the conv, read by a Relu, fitted through it), and its samples in shards of 10 (even sizes:
    the folds' even/odd samples are the same per shard as over the whole set)."""
    from graphopt.compress.reconstruct import RefitTarget

    proto = tiny_cnn()
    for i, node in enumerate(proto.graph.node):
        node.name = f"n{i}"
    reference = from_proto(tiny_cnn())     # its own tensors: the IR keeps the protos it was made from
    for i, node in enumerate(reference.graph.nodes):
        node.name = f"n{i}"
    rng = np.random.default_rng(7)
    for t in proto.graph.initializer:
        if t.name in ("w1", "w2"):
            w = onnx_array(t)
            t.CopyFrom(numpy_helper.from_array((w + 0.3 * rng.standard_normal(w.shape)).astype(np.float32), t.name))
    data = tiny_data(40)
    folder = write_shards(tmp_path / "set", data, 10)
    return proto, reference, data, folder, [RefitTarget("n0"), RefitTarget("n3")]


def onnx_array(t):
    return numpy_helper.to_array(t)


def weights(model) -> dict[str, np.ndarray]:
    """The conv's and the MatMul's weights and biases, as their layer views read them."""
    from graphopt.compress.lstsq import LinearLayer
    out = {}
    for node in model.graph.nodes:
        if node.op_type in ("Conv", "MatMul"):    # a re-fitted MatMul's bias goes to an Add after it
            layer = LinearLayer.of(model.graph, node)
            out[node.op_type + " w"], out[node.op_type + " b"] = layer.weight_matrix(), layer.bias_vector()
    return out


def test_the_refit_in_shards_fits_as_the_refit_in_memory_and_does_not_depend_on_the_executor(tmp_path):
    from graphopt.compress import reconstruct, refit_shards

    proto, reference, data, folder, targets = refit_case(tmp_path)
    stream = SampleDir.open(folder, reference).slices()
    memory = from_proto(proto)
    reconstruct.refit(memory, reference, targets, data, max_rows=10 ** 6, batch_size=8)
    streamed = from_proto(proto)
    records = refit_shards.refit(streamed, reference, targets, stream, data, executor=InProcess(), max_rows=10 ** 6,
                                 batch_size=8)
    assert [r["node"] for r in records] == ["n0", "n3"] and all("rel_error_after" in r for r in records)
    assert "act_error_after" in records[0]                     # the conv fitted through its Relu
    for name, w in weights(memory).items():                    # every row, the same folds: the same fit
        np.testing.assert_allclose(weights(streamed)[name], w, rtol=1e-4, atol=1e-5, err_msg=name)
    assert not np.allclose(weights(streamed)["MatMul w"], weights(from_proto(proto))["MatMul w"])   # it did re-fit
    # rows subsampled per shard: the same bits in-process and in a pool
    out = {}
    for name, executor in (("serial", InProcess()), ("pool", ProcessPool(2))):
        model = from_proto(proto)
        refit_shards.refit(model, reference, targets, stream, data, executor=executor, max_rows=150, batch_size=8)
        out[name] = weights(model)
    assert all(np.array_equal(out["serial"][k], out["pool"][k]) for k in out["serial"])
