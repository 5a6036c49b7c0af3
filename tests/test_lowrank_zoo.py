"""Low-rank factorization on the trained zoo models: exact at full rank, data-aware beats plain, accuracy holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt.passes.lossy.lowrank as lr
from graphopt.core import onnx_io
from graphopt.core.manager import PassContext, build_pipeline, run_pipeline
from graphopt.core.ops import LAYER_OPS
from graphopt.core.shapes import ShapeView
from graphopt.measure import ort as gort
from graphopt.measure.calibration import load_data

ROOT = Path(__file__).resolve().parents[1]


def cleaned(name: str):
    model = onnx_io.load(ROOT / "models" / f"{name}.onnx")
    run_pipeline(build_pipeline("lossless"), model, PassContext())
    return model


def logits(model, data) -> np.ndarray:
    proto = onnx_io.to_proto(model)
    sess = gort.session(proto, threads=1)
    name = proto.graph.output[0].name
    return np.concatenate([gort.run(sess, feeds, [name])[name] for feeds in data.batches(250)])


def test_every_vgg_layer_at_full_rank_is_exact_in_every_form():
    model = cleaned("vgg")
    data = load_data(ROOT / "models" / "fmnist_eval.npz", onnx_io.to_proto(model)).head(16)
    ref = logits(model, data)
    shapes = ShapeView(model)
    count = 0
    for node in list(model.graph.toposort()):
        site = lr.find_site(model.graph, node, shapes) if node.op_type in LAYER_OPS else None
        if site is None or isinstance(site, str):
            continue
        # alternate the forms over the layers so both are exercised inside one deep network
        forms = lr.forms_of(site, "auto")
        form = forms[count % len(forms)]
        lr.factorize_form(form, None, 0.0)
        lr.apply_plan(model.graph, lr.make_plan(form, form.full_rank, None, False))
        count += 1
    assert count == 8  # 6 convs + 2 Gemms
    out = onnx_io.to_proto(model)
    onnx.checker.check_model(out)
    y = logits(model, data)
    assert np.abs(y - ref).max() / (ref.max() - ref.min()) < 1e-4


@pytest.mark.parametrize("name", ["lenet5", "transformer"])
def test_data_aware_beats_plain_and_keeps_accuracy(name):
    model = cleaned(name)
    proto = onnx_io.to_proto(model)
    calib = load_data(ROOT / "models" / "fmnist_calib.npz", proto).head(128)
    ev = load_data(ROOT / "models" / "fmnist_eval.npz", proto).head(300)
    ref = logits(model, ev)
    acc0 = np.mean(ref.argmax(1) == ev.labels) * 100
    ops = "Gemm,MatMul" if name == "transformer" else "Gemm,MatMul,Conv"
    err, acc = {}, {}
    for mode in ("off", "on"):
        cand = model.clone()
        result = lr.LowRank().run(cand, PassContext(data=calib, options={"lowrank": {
            "ratio": 0.5, "data_aware": mode, "latency": "off", "ops": ops, "samples": 128}}))
        assert result.changed
        if name == "transformer":  # every projection of every block (the 10x64 head is below min_weights)
            assert result.stats["factorized"] == 24
        cand.check_invariants()
        y = logits(cand, ev)
        err[mode] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        acc[mode] = float(np.mean(y.argmax(1) == ev.labels) * 100)
    assert err["on"] < err["off"]
    assert acc0 - acc["on"] <= 3.0
