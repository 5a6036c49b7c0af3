"""The finetune pass (passes/lossy/finetune.py): distillation from the input model, written back by name,
structure kept, gated by a held-out loss and a self-check; refusals; the +finetune suffix; --train-data."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

torch = pytest.importorskip("torch")

from graphopt.app import cli  # noqa: E402
from graphopt.compress.distill.data import Augment, augment_for  # noqa: E402
from graphopt.core.errors import OptionError  # noqa: E402
from graphopt.core.manager import PassContext, Sequential, build_pipeline, get_pass, run_pipeline  # noqa: E402
from graphopt.core.onnx_io import from_proto, to_proto  # noqa: E402
from graphopt.measure.calibration import SampleData  # noqa: E402
from tests.util import init, make_model, run, tensor  # noqa: E402


def _cnn(seed=0):
    """conv(1->8) clip(0,6) -> conv(8->8) relu -> GAP -> flatten -> gemm(8->4)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["a1", "lo", "hi"], ["r1"], name="clip1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["a2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], name="fc", transB=1)]
    inits = [init("w1", rng.normal(size=(8, 1, 3, 3)).astype(np.float32)),
             init("b1", rng.normal(size=8).astype(np.float32) * 0.1),
             init("lo", np.array(0, np.float32)), init("hi", np.array(6, np.float32)),
             init("w2", (rng.normal(size=(8, 8, 3, 3)) / 8.5).astype(np.float32)),
             init("b2", rng.normal(size=8).astype(np.float32) * 0.1),
             init("w3", (rng.normal(size=(4, 8)) / 3).astype(np.float32)), init("b3", np.zeros(4, np.float32))]
    return make_model(nodes, [tensor("x", ["N", 1, 8, 8])], [tensor("logits", ["N", 4])], inits)


def _data(n=128, seed=1):
    return SampleData({"x": np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype(np.float32)},
                      source="random")


def _compress_then_finetune(proto, lossy: list[str], options: dict, seed=0, data=None):
    """Run the lossy passes, then finetune with the input model as teacher; returns
    (model before finetune, model after, finetune's stats, changed)."""
    model = from_proto(proto)
    ctx = PassContext(options=options, data=data or _data(), seed=seed)
    run_pipeline(Sequential([get_pass(n) for n in lossy]), model, ctx) if lossy else None
    before = to_proto(model)
    ctx.original = from_proto(proto)
    changed, records = run_pipeline(get_pass("finetune"), model, ctx)
    after = to_proto(model)
    onnx.checker.check_model(after, full_check=True)
    return before, after, records[-1].stats, changed


def _inits(proto):
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def _weight(proto, node_name, slot=1):
    """The name of the initializer a node reads at ``slot`` (the lossy passes rename what they rewrite)."""
    return next(n.input[slot] for n in proto.graph.node if n.name == node_name)


def _same_structure(before, after):
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in before.graph.node] == \
           [(n.op_type, n.name, list(n.input), list(n.output)) for n in after.graph.node]
    a, b = _inits(before), _inits(after)
    assert list(a) == list(b)
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name


FT = {"steps": 40, "lr": 3e-3, "threads": 1}


def test_sparse_model_trains_keeps_zeros_names_dtypes_shapes_and_frozen_constants():
    proto = _cnn()
    before, after, stats, changed = _compress_then_finetune(
        proto, ["sparsify"], {"sparsify": {"density": 0.4, "guard": False, "min_weights": 8}, "finetune": FT})
    assert changed and stats["trained"]["initializers"] == 6
    _same_structure(before, after)
    a, b = _inits(before), _inits(after)
    w2 = _weight(before, "conv2")
    assert not np.array_equal(a[w2], b[w2])
    for node in ("conv1", "conv2", "fc"):   # pruned zeros stay zero, kept weights stay nonzero
        name = _weight(before, node)
        np.testing.assert_array_equal(a[name] == 0, b[name] == 0)
    assert (a[w2] == 0).mean() > 0.5
    assert b["lo"] == 0 and b["hi"] == 6   # Clip bounds are not weights
    assert any("Clip" in e["reason"] for e in stats["left_alone"])
    held = stats["held_out"]
    assert held["after"]["loss"] < held["before"]["loss"]
    assert stats["self_check"]["passed"]
    # closer to the teacher on samples it never saw
    fresh = _data(64, seed=9).inputs
    teacher = run(proto, fresh)[0]
    err = [float(np.mean((run(m, fresh)[0] - teacher) ** 2)) for m in (before, after)]
    assert err[1] < err[0]


def test_compact_weight_sharing_trains_the_codebooks_only():
    proto = _cnn()
    options = {"weight_sharing": {"bits": 2, "encoding": "compact", "min_weights": 64, "short_names": False},
               "finetune": FT}
    before, after, stats, changed = _compress_then_finetune(proto, ["weight_sharing"], options)
    assert changed
    _same_structure(before, after)
    a, b = _inits(before), _inits(after)
    books = [n for n in a if n.startswith("kb")]
    assert books and all(not np.array_equal(a[n], b[n]) for n in books)
    for name in a:   # the packed codes, shifts and shapes are bit for bit what they were
        if a[name].dtype.kind in "iu":
            np.testing.assert_array_equal(a[name], b[name])
    x = _data(8, seed=3).inputs
    assert np.all(np.isfinite(run(after, x)[0]))


def test_snapped_shared_weights_keep_their_number_of_values():
    proto = _cnn()
    options = {"weight_sharing": {"bits": 2, "min_weights": 64}, "finetune": FT}
    before, after, stats, changed = _compress_then_finetune(proto, ["weight_sharing"], options)
    assert changed and stats["trained"]["kinds"]["shared"] >= 1
    a, b = _inits(before), _inits(after)
    w2 = _weight(before, "conv2")
    assert np.unique(a[w2]).size <= 4
    assert np.unique(b[w2]).size == np.unique(a[w2]).size
    assert not np.array_equal(a[w2], b[w2])
    # the same weights share a value before and after (codes fixed)
    _, codes_a = np.unique(a[w2], return_inverse=True)
    _, codes_b = np.unique(b[w2], return_inverse=True)
    assert len(set(zip(codes_a.ravel().tolist(), codes_b.ravel().tolist()))) == np.unique(a[w2]).size


def _mlp(seed=0):
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", transB=1)]
    inits = [init("w1", (rng.normal(size=(48, 64)) / 8).astype(np.float32)), init("b1", np.zeros(48, np.float32)),
             init("w2", (rng.normal(size=(4, 48)) / 7).astype(np.float32)), init("b2", np.zeros(4, np.float32))]
    return make_model(nodes, [tensor("x", ["N", 1, 8, 8])], [tensor("logits", ["N", 4])], inits)


def test_lowrank_factors_train_as_factors():
    proto = _mlp()
    before, after, stats, changed = _compress_then_finetune(
        proto, ["lowrank"], {"lowrank": {"select": "ratio", "ratio": 0.5, "min_weights": 16, "latency": "off"}, "finetune": FT})
    assert sum(n.op_type in ("Gemm", "MatMul") for n in before.graph.node) > 2   # it was factorized
    assert changed
    _same_structure(before, after)
    a, b = _inits(before), _inits(after)
    moved = [n for n in a if a[n].ndim == 2 and not np.array_equal(a[n], b[n])]
    assert len(moved) >= 2


def test_same_seed_same_bytes_other_seed_other_weights():
    options = {"sparsify": {"density": 0.5, "guard": False, "min_weights": 8}, "finetune": dict(FT, steps=10)}
    runs = [_compress_then_finetune(_cnn(), ["sparsify"], options, seed=s)[1].SerializeToString() for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_without_torch_the_pass_refuses_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` raises ImportError
    proto = _cnn()
    model = from_proto(proto)
    result = get_pass("finetune").run(model, PassContext(data=_data(), original=from_proto(proto)))
    assert not result.changed
    assert "pip install 'graphopt[finetune]'" in result.stats["skipped"]
    assert to_proto(model).SerializeToString() == proto.SerializeToString()


def test_cli_without_torch_exits_2_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    out = tmp_path / "out.onnx"
    code = cli.main(["optimize", "models/lenet300.onnx", "--preset", "prune+finetune", "--data",
                     "models/fmnist_calib.npz", "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "graphopt[finetune]" in err[0] and "Traceback" not in err[0]
    assert not out.exists()


def test_an_unknown_op_is_refused_by_name_and_the_model_is_unchanged():
    proto = make_model([helper.make_node("Flatten", ["x"], ["f"]),
                        helper.make_node("Gemm", ["f", "w", "b"], ["g"], transB=1),
                        helper.make_node("Unique", ["g"], ["u"]),
                        helper.make_node("Relu", ["g"], ["y"])],
                       [tensor("x", ["N", 1, 8, 8])], [tensor("y", ["N", 4]), tensor("u", [None])],
                       [init("w", np.ones((4, 64), np.float32)), init("b", np.zeros(4, np.float32))])
    model = from_proto(proto)
    result = get_pass("finetune").run(model, PassContext(data=_data(), original=from_proto(proto)))
    assert not result.changed and "Unique" in result.stats["skipped"]
    assert to_proto(model).SerializeToString() == proto.SerializeToString()


def test_a_failed_self_check_leaves_the_model_unchanged(monkeypatch):
    from graphopt.compress.distill.interpreter import TorchGraph
    arrays = TorchGraph.arrays
    # write back values other than the ones the engine computes with: the self-check must catch it
    monkeypatch.setattr(TorchGraph, "arrays", lambda self: {k: v + 1 for k, v in arrays(self).items()})
    proto = _cnn()
    before, after, stats, changed = _compress_then_finetune(
        proto, ["sparsify"], {"sparsify": {"density": 0.5, "guard": False, "min_weights": 8}, "finetune": FT})
    assert not changed and "self-check failed" in stats["skipped"]
    assert after.SerializeToString() == before.SerializeToString()


def test_train_data_directory_is_streamed_shard_by_shard(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"s{i}.npz", x=_data(40, seed=10 + i).inputs["x"], labels=np.zeros(40, np.int64))
    proto = _cnn()
    model = from_proto(proto)
    run_pipeline(get_pass("sparsify"), model, PassContext(options={"sparsify": {"density": 0.5, "guard": False,
                                                                                 "min_weights": 8}}, data=_data()))
    ctx = PassContext(options={"finetune": dict(FT, epochs=16.0)}, data=_data(), original=from_proto(proto),
                      train_data=tmp_path)
    result = get_pass("finetune").run(model, ctx)
    assert result.stats["training_samples"] == 120 and "3 shards" in result.stats["data"]
    assert result.stats["steps"] == 30   # 16 epochs of 120 samples at batch 64
    assert result.changed
    assert result.stats["augment"].startswith("none: no shifts or flips on --train-data")
    ctx = PassContext(options={"finetune": dict(FT, steps=4, augment="on", holdout=0.0)}, data=_data(),
                      original=from_proto(proto), train_data=tmp_path)
    assert get_pass("finetune").run(model, ctx).stats["augment"].startswith("shifts up to 2 px")


def test_augmentation_fits_the_input_kind():
    images = SampleData({"x": np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 1, 8, 8),
                         "ids": np.arange(2 * 8 * 8, dtype=np.int64).reshape(2, 1, 8, 8)})
    aug = augment_for(images, "auto", 2, True)
    assert aug.layout == {"x": "nchw"}          # token ids / integer inputs are never shifted
    out = aug(images.feed(0, 2), np.random.default_rng(0))
    assert out["x"].shape == (2, 1, 8, 8) and np.array_equal(out["ids"], images.inputs["ids"])
    assert not np.array_equal(out["x"], images.inputs["x"])
    assert sorted(out["x"][0].ravel()) != [] and set(np.unique(out["x"])) <= set(np.unique(images.inputs["x"]))
    assert augment_for(images, "off", 2, True).describe() == "none"
    # a --train-data set: auto leaves it as it is and says how to augment it; on augments it
    plain = augment_for(images, "auto", 2, True, training_set=True)
    assert not plain.active() and plain.describe().startswith("none: ") and "augment=on" in plain.describe()
    assert np.array_equal(plain(images.feed(0, 2), np.random.default_rng(0))["x"], images.inputs["x"])
    forced = augment_for(images, "on", 2, True, training_set=True)
    assert forced.active() and forced.describe().startswith("shifts up to 2 px and horizontal flips")
    assert augment_for(images, "on", 2, True).describe() == aug.describe()
    asked = augment_for(images, "auto", 2, True, mixup=1.0, training_set=True)   # an asked-for mixup stays
    assert asked.describe().startswith("mixup") and asked.shift == 0 and not asked.flip
    flip_only = Augment(0, True, {"x": "nchw"})(images.feed(0, 2), np.random.default_rng(3))["x"]
    assert all(np.array_equal(f, o) or np.array_equal(f, o[..., ::-1])
               for f, o in zip(flip_only, images.inputs["x"]))


def test_preset_suffix():
    pipeline = build_pipeline("prune+finetune")
    assert [p.name for p in pipeline.leaves()][-1] == "finetune" and not pipeline.lossless
    with pytest.raises(OptionError, match="lossless"):
        build_pipeline("lossless+finetune")
    with pytest.raises(OptionError, match="nosuch"):
        build_pipeline("prune+nosuch")


def test_train_data_needs_a_finetune_pass_and_an_existing_path(tmp_path, capsys):
    args = ["optimize", "models/lenet300.onnx", "--data", "models/fmnist_calib.npz", "-o", str(tmp_path / "o.onnx")]
    assert cli.main([*args, "--preset", "prune", "--train-data", "models/fmnist_calib.npz"]) == 2
    assert "finetune" in capsys.readouterr().err
    assert cli.main([*args, "--preset", "prune+finetune", "--train-data", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_prune_plus_finetune_on_a_zoo_model_end_to_end(tmp_path):
    out, report = tmp_path / "r.onnx", tmp_path / "r.json"
    code = cli.main(["optimize", "models/mobilenetv2.onnx", "--preset", "prune+finetune", "--target-macs", "0.35",
                     "--data", "models/fmnist_calib.npz", "--verify-data", "models/fmnist_eval.npz",
                     "--option", "finetune.steps=50", "--option", "finetune.threads=1",
                     "-o", str(out), "--report", str(report), "-q"])
    stats = next(p["stats"] for p in json.loads(report.read_text())["passes"] if p["name"] == "finetune")
    assert stats["held_out"]["after"]["loss"] < stats["held_out"]["before"]["loss"]
    assert stats["self_check"]["passed"] and stats["augment"].startswith("shifts")
    # one torch thread: the training thread's CPU time cannot exceed the training's wall time
    assert 0 < stats["seconds_training_thread_cpu"] <= stats["seconds_training"] + 0.05
    assert code in (0, 1) and (out.exists() == (code == 0))


def test_a_student_equal_to_its_teacher_is_not_trained():
    proto = _cnn()
    before, after, stats, changed = _compress_then_finetune(proto, [], {"finetune": FT})
    assert not changed and stats["skipped"].startswith("nothing to recover")
    assert after.SerializeToString() == proto.SerializeToString()


def test_per_sample_calibration_data_is_refused_in_one_line():
    proto = _cnn()
    data = SampleData({"x": np.zeros((4, 1, 1, 8, 8), np.float32)}, layout={"x": "per_sample"})
    result = get_pass("finetune").run(from_proto(proto), PassContext(data=data, original=from_proto(proto)))
    assert not result.changed and "per-sample" in result.stats["skipped"]


def test_matched_intermediate_tensors_join_the_loss_and_a_missing_one_is_bad_input():
    from graphopt.core.errors import GraphoptError
    options = {"sparsify": {"density": 0.4, "guard": False, "min_weights": 8},
               "finetune": dict(FT, match="r1", match_weight=0.5)}
    _, _, stats, changed = _compress_then_finetune(_cnn(), ["sparsify"], options)
    assert changed and stats["outputs"] == {"logits": "classes", "r1": "float"}
    options["finetune"]["match"] = "no_such_tensor"
    with pytest.raises(GraphoptError, match="no_such_tensor"):
        _compress_then_finetune(_cnn(), ["sparsify"], options)


def test_held_out_gate_weighs_a_rise_against_its_noise():
    from graphopt.passes.lossy.finetune import held_out_verdict
    rng = np.random.default_rng(0)
    before = rng.uniform(0.5, 1.5, size=400)
    assert held_out_verdict(before, before * 0.8)["kept"]                      # a fall is kept
    # a mean rise far inside the samples' scatter (about 0.2 standard errors): noise, kept
    noisy = before + rng.normal(0.0, 0.5, size=400) + 0.005
    verdict = held_out_verdict(before, noisy)
    assert verdict["mean_change"] > 0 and verdict["kept"] and 0 < verdict["z"] < 1.645
    # the same mean rise on every sample is no noise: refused
    steady = held_out_verdict(before, before + 0.005)
    assert not steady["kept"] and steady["z"] > 1e6
    # a rise of 3 standard errors is refused, of 1 kept
    d = rng.normal(size=100)
    d = (d - d.mean()) / d.std(ddof=1)                                           # mean 0, sd 1: se 0.1
    assert not held_out_verdict(before[:100], before[:100] + d + 0.3)["kept"]
    assert held_out_verdict(before[:100], before[:100] + d + 0.1)["kept"]
    assert not held_out_verdict(before[:1], before[:1] + 0.1)["kept"]          # one sample: any rise refused
    assert held_out_verdict(before[:1], before[:1] - 0.1)["kept"]


def test_a_significant_held_out_rise_refuses_and_leaves_the_model_unchanged(monkeypatch):
    from graphopt.compress.distill import train
    real = train.evaluate
    calls = []

    def worse_after(graph, teacher, data, kinds, settings, batch_size=64):   # the second call is "after"
        result, each = real(graph, teacher, data, kinds, settings, batch_size)
        calls.append(1)
        return (result, each) if len(calls) == 1 else ({**result, "loss": result["loss"] * 2}, each * 2 + 1)
    monkeypatch.setattr(train, "evaluate", worse_after)
    before, after, stats, changed = _compress_then_finetune(
        _cnn(), ["sparsify"], {"sparsify": {"density": 0.4, "guard": False, "min_weights": 8}, "finetune": FT})
    assert not changed and "held-out distillation loss rose" in stats["skipped"]
    assert not stats["held_out"]["kept"] and stats["held_out"]["z"] > 1.645
    assert after.SerializeToString() == before.SerializeToString()


def test_with_train_data_every_calibration_sample_is_held_out(tmp_path):
    np.savez(tmp_path / "train.npz", x=_data(96, seed=5).inputs["x"])
    proto = _cnn()
    model = from_proto(proto)
    run_pipeline(get_pass("sparsify"), model, PassContext(options={"sparsify": {"density": 0.5, "guard": False,
                                                                                 "min_weights": 8}}, data=_data()))
    ctx = PassContext(options={"finetune": FT}, data=_data(128), original=from_proto(proto),
                      train_data=tmp_path / "train.npz")
    stats = get_pass("finetune").run(model.clone(), ctx).stats
    assert stats["held_out"]["samples"] == 128 and stats["training_samples"] == 96
    ctx.options = {"finetune": dict(FT, holdout=0.0)}
    assert get_pass("finetune").run(model.clone(), ctx).stats["held_out"]["samples"] == 0
    # calibration only: the held-out fraction, as before
    ctx.train_data = None
    ctx.options = {"finetune": FT}
    assert get_pass("finetune").run(model.clone(), ctx).stats["held_out"]["samples"] == round(128 * 0.2)


def test_per_sample_losses_average_to_the_batch_loss():
    from graphopt.compress.distill.train import Settings, distill_loss
    g = torch.Generator().manual_seed(0)
    s = {"c": torch.randn(6, 5, generator=g), "f": torch.randn(6, 3, 4, generator=g), "k": torch.randn(2, generator=g)}
    t = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in s.items()}
    kinds = {"c": "classes", "f": "float", "k": "float"}
    for loss in ("mse", "cosine"):
        settings = Settings(1, loss=loss)
        each = distill_loss(s, t, kinds, settings, per_sample=True)
        assert each.shape == (6,) and (each > 0).all()
        torch.testing.assert_close(each.mean(), distill_loss(s, t, kinds, settings))
    one = distill_loss(s, t, {"c": "classes"}, Settings(1), per_sample=True)
    torch.testing.assert_close(one[2], distill_loss({"c": s["c"][2:3]}, {"c": t["c"][2:3]}, {"c": "classes"},
                                                    Settings(1)))


def test_mixup_mixes_image_pairs_and_the_teacher_labels_the_mixed_view():
    from graphopt.compress.distill.train import labelled
    images = SampleData({"x": np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32),
                         "ids": np.arange(16 * 3, dtype=np.int64).reshape(16, 3)})
    aug = augment_for(images, "auto", 0, False, mixup=1.0)
    assert "mixup" in aug.describe() and aug.layout == {"x": "nchw"}
    out = aug(images.feed(0, 16), np.random.default_rng(1))
    assert np.array_equal(out["ids"], images.inputs["ids"])
    x = images.inputs["x"].reshape(16, -1)
    for row in out["x"].reshape(16, -1):       # each mixed image is lam * x_i + (1 - lam) * x_j, 0 <= lam <= 1
        def mixes(i, j):
            if i == j:
                return np.allclose(row, x[i], atol=1e-5)
            u = x[i] - x[j]
            lam = float(u @ (row - x[j]) / (u @ u))
            return -1e-6 <= lam <= 1 + 1e-6 and np.allclose(row, lam * x[i] + (1 - lam) * x[j], atol=1e-4)
        assert any(mixes(i, j) for i in range(16) for j in range(16))
    assert not np.allclose(out["x"], images.inputs["x"])
    assert augment_for(images, "auto", 0, False).describe() == "none"    # mixup 0: nothing
    seen = []

    def teacher(feeds):
        seen.append(feeds["x"].copy())
        return {"y": feeds["x"].sum((1, 2, 3))}
    feeds, labels = next(labelled(iter([images.feed(0, 16)]), aug, teacher, np.random.default_rng(1)))
    assert np.array_equal(seen[0], feeds["x"]) and np.array_equal(labels["y"], feeds["x"].sum((1, 2, 3)))
    assert np.allclose(feeds["x"], out["x"])      # same seed, same mixed view


def test_prefetch_keeps_order_raises_the_producers_error_and_stops():
    from graphopt.compress.distill.train import Prefetch
    with Prefetch(iter(range(50))) as items:
        assert [next(items) for _ in range(50)] == list(range(50))
        with pytest.raises(StopIteration):
            next(items)

    def broken():
        yield 1
        raise ValueError("bad shard")
    with Prefetch(broken()) as items:
        assert next(items) == 1
        with pytest.raises(ValueError, match="bad shard"):
            next(items)

    def endless():
        n = 0
        while True:
            n += 1
            yield n
    items = Prefetch(endless(), depth=2)
    assert next(items) == 1
    items.close()
    assert not items._thread.is_alive()


def test_progress_is_a_step_count_with_the_loss_that_the_cli_draws_as_a_bar():
    from rich.console import Console

    from graphopt.app.cli import _renderable
    from graphopt.core.progress import Steps
    seen = []
    model = from_proto(_cnn())
    ctx = PassContext(options={"sparsify": {"density": 0.4, "guard": False, "min_weights": 8},
                               "finetune": dict(FT, steps=12)}, data=_data(), progress=seen.append)
    run_pipeline(get_pass("sparsify"), model, ctx)
    ctx.original = from_proto(_cnn())
    assert get_pass("finetune").run(model, ctx).changed
    steps = [m for m in seen if isinstance(m, Steps)]
    assert [m.done for m in steps] == list(range(1, 13)) and {m.total for m in steps} == {12}
    assert all(m.what == "finetune" and m.fields.startswith("loss ") for m in steps)
    assert str(steps[-1]).startswith("finetune 12/12 loss ")       # still a line of text for any callback
    console = Console(record=True, width=100, color_system=None)
    console.print(_renderable(Steps("finetune", 3, 12, "loss 0.5")))
    drawn = console.export_text()
    assert "3/12" in drawn and "loss 0.5" in drawn and "━" in drawn
    assert _renderable("verifying") == "verifying"


def test_threads_default_to_the_cores_less_the_teachers_and_are_restored(monkeypatch):
    from graphopt.passes.lossy import finetune
    for cores, want in ((1, 1), (2, 1), (8, 7)):
        monkeypatch.setattr(finetune.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert finetune.default_threads() == want
    monkeypatch.setattr(finetune.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    outside = torch.get_num_threads()
    during = []
    model = from_proto(_cnn())
    ctx = PassContext(options={"sparsify": {"density": 0.4, "guard": False, "min_weights": 8},
                               "finetune": {"steps": 3}}, data=_data(),
                      progress=lambda message: during.append(torch.get_num_threads()))
    run_pipeline(get_pass("sparsify"), model, ctx)
    sparse = model.clone()
    ctx.original = from_proto(_cnn())
    during.clear()
    assert get_pass("finetune").run(model, ctx).changed
    assert set(during) == {2} and torch.get_num_threads() == outside
    ctx.options["finetune"]["threads"] = 1
    during.clear()
    assert get_pass("finetune").run(sparse, ctx).changed
    assert set(during) == {1}


def test_class_loss_mse_matches_the_logits_by_relative_mse():
    from graphopt.compress.distill.train import Settings, distill_loss
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    got = distill_loss({"c": s}, {"c": t}, {"c": "classes"}, Settings(1, class_loss="mse"))
    torch.testing.assert_close(got, ((s - t) ** 2).mean() / t.var(unbiased=False))
    shifted = distill_loss({"c": s + 3}, {"c": t}, {"c": "classes"}, Settings(1, class_loss="mse"))
    kl_shifted = distill_loss({"c": s + 3}, {"c": t}, {"c": "classes"}, Settings(1))
    assert shifted > got and torch.isclose(kl_shifted, distill_loss({"c": s}, {"c": t}, {"c": "classes"},
                                                                    Settings(1)))   # KL ignores a shift
    _, _, stats, changed = _compress_then_finetune(
        _cnn(), ["sparsify"], {"sparsify": {"density": 0.4, "guard": False, "min_weights": 8},
                               "finetune": dict(FT, class_loss="mse")})
    assert changed and stats["held_out"]["after"]["loss"] < stats["held_out"]["before"]["loss"]


def test_ema_ends_with_the_bias_corrected_running_average_of_the_weights():
    from graphopt.compress.distill.train import Average
    p = torch.nn.Parameter(torch.zeros(3))
    avg = Average([p], 0.9)
    expected, values = torch.zeros(3), [torch.full((3,), float(v)) for v in (4, -2, 7, 1, 5)]
    for t, value in enumerate(values, start=1):
        with torch.no_grad():
            p.copy_(value)
        avg.update()
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * value
    avg.copy_to_parameters()
    torch.testing.assert_close(p.detach(), expected)
    assert not torch.equal(p.detach(), values[-1])
    with pytest.raises(ValueError):
        Average([p], 1.0)


def test_ema_option_keeps_the_structure_and_changes_what_is_written():
    options = {"sparsify": {"density": 0.4, "guard": False, "min_weights": 8}}
    before, plain, _, _ = _compress_then_finetune(_cnn(), ["sparsify"], {**options, "finetune": FT})
    _, averaged, stats, changed = _compress_then_finetune(_cnn(), ["sparsify"],
                                                          {**options, "finetune": dict(FT, ema=0.9)})
    assert changed and stats["self_check"]["passed"]
    assert stats["held_out"]["after"]["loss"] < stats["held_out"]["before"]["loss"]
    _same_structure(before, averaged)
    a, b, c = _inits(before), _inits(plain), _inits(averaged)
    w2 = _weight(before, "conv2")
    assert not np.array_equal(b[w2], c[w2])          # the average is not the last step's weights
    np.testing.assert_array_equal(a[w2] == 0, c[w2] == 0)   # the average of masked weights keeps the zeros
    with pytest.raises(OptionError):   # a decay of 1 would never move off the starting weights
        get_pass("finetune").options["ema"].check(1.0, "finetune.ema")
