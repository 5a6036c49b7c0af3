"""Benchmark helpers: profiled kernels by kind (tools/bench_pair.py), synthetic inputs (tools/synthetic_models.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from tests.util import init, make_model, tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_pair  # noqa: E402


def test_kernel_kind_names_convolutions_by_filter_shape():
    kind = bench_pair.kernel_kind
    assert kind({"op": "NchwcConv", "inputs": [[64, 96, 7, 7], [96, 1, 3, 3]]}) == "Conv depthwise"
    assert kind({"op": "FusedConv", "inputs": [[64, 24, 7, 7], [96, 24, 1, 1]]}) == "Conv pointwise"
    # one input channel and a 1-channel filter slice: a dense stem conv, not a depthwise one
    assert kind({"op": "NchwcConv", "inputs": [[64, 1, 28, 28], [16, 1, 3, 3]]}) == "Conv 3x3"
    assert kind({"op": "Gemm", "inputs": [[64, 32], [10, 32]]}) == "Gemm"


def _dw_pw(channels: int):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "wd"], ["d"], group=channels, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["r"]),
             helper.make_node("Conv", ["r", "wp"], ["y"])]
    inits = [init("wd", rng.normal(size=(channels, 1, 3, 3)).astype(np.float32)),
             init("wp", rng.normal(size=(8, channels, 1, 1)).astype(np.float32))]
    return make_model(nodes, [tensor("x", [None, channels, 8, 8])], [tensor("y", [None, 8, 8, 8])], inits)


def test_kernel_table_sums_both_models_by_kind(tmp_path):
    paths = []
    for c in (32, 16):
        paths.append(str(tmp_path / f"m{c}.onnx"))
        onnx.save(_dw_pw(c), paths[-1])
    table = bench_pair.kernel_table(*paths, batch=4)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert {"Conv depthwise", "Conv pointwise", "all"} <= set(rows)
    a_ms, b_ms = (float(x) for x in rows["all"].split("|")[2:4])
    assert a_ms > 0 and b_ms > 0
    assert rows["all"].strip().endswith("| 100% |")


def test_synthetic_models_data_writes_the_optimizer_s_random_inputs(tmp_path):
    import synthetic_models

    from graphopt.measure.calibration import random_data

    model_path, data_path = tmp_path / "r.onnx", tmp_path / "r.npz"
    synthetic_models.main(["resnet18", str(model_path), "--image", "32", "--data", str(data_path), "--samples", "3"])
    model = onnx.load(model_path)
    with np.load(data_path) as f:
        written = {k: f[k] for k in f.files}
    name = model.graph.input[0].name
    assert list(written) == [name] and written[name].shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(written[name], random_data(model, 3, seed=synthetic_models.DEFAULT_SEED).inputs[name])


def test_verdict_breakages_change_the_output_only():
    import bench_verdicts

    from tests.util import run
    # x -> Relu -> r (an output, also read by Neg -> n, another output)
    model = make_model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["n"])],
                       [tensor("x", ["N", 3, 2])], [tensor("r", ["N", 3, 2]), tensor("n", ["N", 3, 2])])
    x = np.random.default_rng(0).standard_normal((4, 3, 2)).astype(np.float32)
    r, n = run(model, {"x": x})
    for kind, amount, expected in [("sign1", None, r * np.array([-1, 1, 1])[:, None]),
                                   ("drop1", None, r * np.array([0, 1, 1])[:, None]),
                                   ("scale", 1.25, r * 1.25)]:
        broken = bench_verdicts.broken(model, "r", kind, amount, 1, r)
        onnx.checker.check_model(broken)
        br, bn = run(broken, {"x": x})
        np.testing.assert_allclose(br, expected, rtol=1e-6)
        np.testing.assert_array_equal(bn, n)  # the other reader still sees the true values
    noisy, _ = run(bench_verdicts.broken(model, "r", "noise", 0.1, 1, r), {"x": x})
    rms = np.sqrt(np.mean(r.astype(np.float64) ** 2))
    assert 0 < np.sqrt(np.mean((noisy - r) ** 2)) < 0.3 * rms


def _run(proto, feeds, config=None, optimize=False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.intra_op_num_threads = 1
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_int8_forms_are_the_same_model_in_every_format():
    """Each form bench_int8_forms times computes what the u8s8 QDQ model computes (QDQ arithmetic), and
    onnxruntime fuses every layer of it; the u8-weight form stores the same values with zero point 128."""
    import bench_int8_forms as forms

    from graphopt.compress import ortquant

    for kind in ("conv3x3", "depthwise", "matmul"):
        proto = forms.chain(kind, 16, depth=2)
        shape = (2, 16, 16) if kind == "matmul" else (2, 16, 4, 4)
        feeds = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
        built = {name: (model, config) for name, model, config, _ in forms.forms(proto, feeds, list(forms.FORMS))}
        assert set(built) == set(forms.FORMS)
        base = _run(built["u8s8"][0], feeds)
        u8, _ = built["u8u8"]
        codes = [t for t in u8.graph.initializer if t.name in {s.codes for s in ortquant.weight_slots(u8).values()}]
        assert codes and all(t.data_type == onnx.TensorProto.UINT8 for t in codes)
        np.testing.assert_allclose(_run(u8, feeds), base, rtol=0, atol=1e-5)
        ref = _run(proto, feeds)
        for name, (model, config) in built.items():
            if name == "dynamic" and kind != "matmul":
                continue   # ConvInteger: not fused, not a form anyone deploys for convs
            assert forms.unfused(model, config, None) == 0, (kind, name)
            out = _run(model, feeds, config, optimize=True)
            snr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((out - ref).astype(np.float64) ** 2))
            assert snr > 20, (kind, name, snr)


def test_int8_corpus_scores_accuracy_or_the_worst_output_snr_and_reads_real_data_in_the_model_layout():
    import bench_int8_corpus as corpus

    ref = [[np.array([[1.0, 0.0], [0.0, 1.0]]), np.ones(4)], [np.array([[0.0, 1.0]]), np.ones(4)]]
    assert corpus.score(ref, ref, np.array([0, 1, 1])) == 100.0
    assert abs(corpus.score(ref, ref, np.array([0, 0, 0])) - 100 / 3) < 1e-9
    noisy = [[a, b * 1.1] for a, b in ref]   # second output off by 10 %: 20 dB; the first exact
    assert abs(corpus.score(ref, noisy, None) - 20.0) < 1e-6
    calib = corpus.REAL_DATA["nhwc_tf"]("calib")
    assert calib.inputs["input_1"].shape[1:] == (28, 28, 1) and calib.labels is not None
    assert corpus.REAL_DATA["minus_one_dims"]("eval").inputs["x"].shape[1:] == (3, 28, 28)
