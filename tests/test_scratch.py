"""Scratch files (graphopt.core.scratch): one private directory per run, removed however the run ends;
and the places that need files (models over protobuf's 2 GiB limit) use it.

The 2 GiB paths are exercised on small models by lowering ``onnx_io.PROTOBUF_LIMIT``: every size check
reads it, so a 10 KB model takes the road a 3 GB one takes (``tests/test_large_model.py`` runs a real one).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from graphopt.core import manager, onnx_io, scratch, shapes
from graphopt.core.errors import GraphoptError
from graphopt.core.manager import Pass, PassResult, register
from graphopt.core.onnx_io import from_proto
from graphopt.measure import ort as gort
from tests.util import init, make_model, run, tensor


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """An empty TMPDIR for this test (``tempfile`` reads ``tempfile.tempdir`` first)."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_run_makes_its_directory_on_first_use_and_removes_it(private_tmp):
    with scratch.run():
        assert scratch.current() is None and not any(private_tmp.iterdir())  # nothing until asked
        with scratch.directory("ort") as first:
            (first / "model.onnx").write_bytes(b"x")
            run_dir = scratch.current()
            assert first.parent == run_dir and run_dir.parent == private_tmp
            assert run_dir.name.startswith(scratch.PREFIX) and first.name.startswith("ort-")
        assert not first.exists() and run_dir.exists()  # a block's folder goes with its block
        with scratch.run():  # nested: joins the outer run
            with scratch.directory("shapes") as second:
                assert second.parent == run_dir
    assert not any(private_tmp.iterdir())
    assert scratch.current() is None


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_run_is_removed_when_the_block_raises(private_tmp, error):
    with pytest.raises(error):
        with scratch.run():
            # A library that dies while writing never exits its block: the run still removes the file.
            block = scratch.directory("leak")
            leaked = block.__enter__()
            (leaked / "partial.onnx").write_bytes(b"x" * 100)
            raise error()
    assert not any(private_tmp.iterdir())


def test_runs_are_per_thread(private_tmp):
    """Two API calls in two threads never share a directory (one would remove it under the other)."""
    seen = {}

    def other_thread():
        with scratch.run(), scratch.directory("ort") as folder:
            seen["other"] = folder.parent

    with scratch.run(), scratch.directory("ort") as folder:
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert seen["other"] != folder.parent and folder.exists()
    assert not any(private_tmp.iterdir())


def test_directory_outside_a_run_is_a_standalone_temporary_folder(private_tmp):
    with scratch.directory("targets") as folder:
        assert folder.parent == private_tmp and folder.name.startswith(scratch.PREFIX + "targets-")
        (folder / "0.npz").write_bytes(b"x")
    assert not any(private_tmp.iterdir())


def test_an_unusable_tmpdir_is_one_line_of_bad_input(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(GraphoptError, match="cannot create a temporary directory in .*missing.*set TMPDIR"):
        with scratch.run(), scratch.directory("ort"):
            pass
    with pytest.raises(GraphoptError, match="set TMPDIR"):
        with scratch.directory("ort"):
            pass


def test_api_functions_are_runs(private_tmp, tmp_path, monkeypatch):
    """Every scratch folder the API makes lives in the one run directory, gone when the call returns."""
    made: list[Path] = []
    real = scratch.directory

    @contextlib.contextmanager
    def spy(purpose):
        with real(purpose) as folder:
            made.append(folder.parent)
            yield folder

    monkeypatch.setattr(scratch, "directory", spy)
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 100)  # every session and inference goes through files
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(), path)
    graphopt.inspect(path)
    graphopt.verify(path, path, samples=2)
    assert made and all(run_dir.parent == private_tmp and run_dir.name.startswith(scratch.PREFIX) for run_dir in made)
    assert not any(private_tmp.iterdir())


# -- the 2 GiB paths, on a small model --------------------------------------------------------


def _mlp() -> onnx.ModelProto:
    """MatMul + Add + Relu + MatMul with weights large enough for external data (>= 1024 bytes)."""
    rng = np.random.default_rng(0)
    return make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Add", ["m", "b1"], ["a"]),
         helper.make_node("Identity", ["a"], ["i"]), helper.make_node("Relu", ["i"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        [tensor("x", ["N", 32])], [tensor("y", ["N", 8])],
        [init("w1", rng.standard_normal((32, 64)).astype(np.float32)),
         init("b1", rng.standard_normal(64).astype(np.float32)),
         init("w2", rng.standard_normal((64, 8)).astype(np.float32))])


def test_models_over_the_limit_are_optimized_verified_and_saved_with_external_data(private_tmp, tmp_path,
                                                                                    monkeypatch):
    source = tmp_path / "in" / "m.onnx"
    source.parent.mkdir()
    proto = _mlp()
    onnx.save(_mlp(), source, save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    before = {p.name: p.read_bytes() for p in source.parent.iterdir()}
    purposes: list[str] = []
    real = scratch.directory
    monkeypatch.setattr(scratch, "directory", lambda purpose: (purposes.append(purpose), real(purpose))[1])
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1000)
    out = tmp_path / "out" / "m.opt.onnx"
    out.parent.mkdir()
    result = graphopt.optimize(source, output=out, debug=True, samples=4)
    assert result.passed and result.report["after"]["nodes"] < result.report["before"]["nodes"]
    # onnxruntime sessions, onnx's shape inference and the debug checker all went through files (at this
    # limit even the sessions' stubbed protos are over it)
    assert {"ort", "shapes", "check"} <= set(purposes)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.opt.onnx", "m.opt.onnx.data"]
    written = onnx.load(str(out))
    x = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_allclose(run(written, {"x": x})[0], run(proto, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert {p.name: p.read_bytes() for p in source.parent.iterdir()} == before  # the input untouched
    assert not any(private_tmp.iterdir())


class ShiftBias(Pass):
    """A 'lossless' pass with a real bug: it shifts the bias."""

    name = "test_scratch_shift_bias"
    summary = "test only"

    def run(self, model, ctx):
        bias = model.graph.initializers["b1"]
        model.graph.set_initializer_array(bias, bias.array + 1.0)
        return PassResult(True)


@pytest.fixture
def shift_bias():
    register(ShiftBias)
    yield ShiftBias.name
    manager._REGISTRY.pop(ShiftBias.name)


def test_a_failed_verdict_over_the_limit_writes_neither_file(private_tmp, tmp_path, monkeypatch, shift_bias):
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1000)
    source = tmp_path / "m.onnx"
    onnx.save(_mlp(), source, save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    result = graphopt.optimize(source, output=tmp_path / "out.onnx", passes=[shift_bias], samples=2)
    assert not result.passed and result.report["verify"]["first_divergence"]  # the search ran too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "tmpdir"]
    assert not any(private_tmp.iterdir())


def test_save_streams_a_modelproto_like_serialize_and_never_touches_it(tmp_path):
    proto = _mlp()
    snapshot = proto.SerializeToString()
    onnx_io.save(proto, tmp_path / "inline.onnx", external_data=False)
    assert (tmp_path / "inline.onnx").read_bytes() == snapshot
    onnx_io.save(proto, tmp_path / "ext.onnx", external_data=True)
    assert proto.SerializeToString() == snapshot
    loaded = onnx.load(str(tmp_path / "ext.onnx"))
    assert {t.name for t in loaded.graph.initializer} == {"w1", "b1", "w2"}
    x = np.ones((2, 32), np.float32)
    np.testing.assert_array_equal(run(loaded, {"x": x})[0], run(proto, {"x": x})[0])
    assert onnx_io.serialized_size(proto) == len(snapshot) == onnx_io.serialized_size(from_proto(proto))


def test_session_over_the_limit_loads_from_a_scratch_file_removed_at_once(private_tmp, monkeypatch):
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1000)
    proto = _mlp()
    sess = gort.session(proto)
    assert not any(private_tmp.iterdir())  # the weights were read; the file is gone
    x = np.ones((2, 32), np.float32)
    np.testing.assert_array_equal(gort.run(sess, {"x": x})["y"], run(proto, {"x": x})[0])


def test_by_reference_session_whose_inline_part_is_over_the_limit_goes_through_a_file(private_tmp, monkeypatch):
    """Weights passed by reference keep a session's proto small; when what stays inline is still over the
    limit, the weights are written back in and the whole model goes through a scratch file."""
    proto = _mlp()
    model = onnx_io.from_proto(proto)   # from_proto holds no arrays: every weight stays inline...
    w1 = model.graph.initializers["w1"]
    model.graph.set_initializer_array(w1, w1.array.copy())   # ...but this one (8 KiB): by reference
    light, weights = onnx_io.shared_proto(model)
    assert set(weights) == {"w1"}
    purposes: list[str] = []
    real = scratch.directory
    monkeypatch.setattr(scratch, "directory", lambda purpose: (purposes.append(purpose), real(purpose))[1])
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", light.ByteSize() - 1)
    sess = gort.session(light, weights=weights)
    assert purposes == ["ort"] and not any(private_tmp.iterdir())
    x = np.ones((2, 32), np.float32)
    np.testing.assert_array_equal(gort.run(sess, {"x": x})["y"], run(proto, {"x": x})[0])


def test_shape_inference_over_the_limit_matches_in_memory_inference(private_tmp, monkeypatch):
    model = from_proto(_mlp())
    expected = {g: dict(t) for g, t in shapes.inferred_types(model).items()}
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 100)
    assert {g: dict(t) for g, t in shapes.inferred_types(model).items()} == expected
    assert not any(private_tmp.iterdir())


# -- libraries that write on their own ---------------------------------------------------------


def test_incomplete_symbolic_inference_writes_nothing_into_the_cwd(tmp_path, monkeypatch):
    """onnxruntime's own ``infer_shapes`` saves ``sym_shape_infer_temp.onnx`` (+ uuid-named data files)
    into the cwd when inference is incomplete; graphopt runs its steps without that save."""
    monkeypatch.chdir(tmp_path)
    proto = _custom_op_model()
    assert shapes.symbolic_dims(from_proto(proto)) is None  # incomplete: no knowledge, as before
    assert list(tmp_path.iterdir()) == []
    # ...and a complete one still answers (the steps graphopt repeats are still onnxruntime's)
    dims = shapes.symbolic_dims(from_proto(_mlp()))
    assert dims is not None and dims["y"] == ("N", 8)


def _custom_op_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Mystery", ["x"], ["h"], domain="custom"),
                               helper.make_node("Relu", ["h"], ["y"])], "g",
                              [tensor("x", ["N", 4])], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                                                      None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
                             ir_version=8)


def test_importing_graphopt_turns_onnxruntime_telemetry_off():
    # onnxruntime 1.32 writes `.ses` into TMPDIR and ~/.cache/Microsoft/... on import unless this is set.
    assert os.environ.get("ORT_DISABLE_TELEMETRY") == "1"
