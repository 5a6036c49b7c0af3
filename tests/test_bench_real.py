"""tools/bench_real.py's own measures: the independent MAC count against hand-computed counts, and the
similarity and IoU helpers on cases worked by hand."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.util import init, make_model, tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_real  # noqa: E402


def _tiny_model():
    """Conv, grouped strided Conv, ConvTranspose, a Reshape whose target is a run-time input (onnx cannot
    infer past it), a batched attention-style MatMul and two Gemms (transB, transA)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], group=2),
        helper.make_node("ConvTranspose", ["c2", "w3"], ["c3"], strides=[2, 2]),
        helper.make_node("Reshape", ["c3", "s"], ["r"]),
        helper.make_node("Transpose", ["r"], ["rt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["r", "rt"], ["scores"]),
        helper.make_node("Flatten", ["scores"], ["f"]),
        helper.make_node("Gemm", ["f", "w4"], ["g1"], transB=1),
        helper.make_node("Gemm", ["g1", "w5"], ["y"], transA=1),
    ]
    inits = [init("w1", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
             init("w2", rng.normal(size=(4, 2, 3, 3)).astype(np.float32)),
             init("w3", rng.normal(size=(4, 2, 2, 2)).astype(np.float32)),
             init("w4", rng.normal(size=(5, 4)).astype(np.float32)),
             init("w5", rng.normal(size=(2, 3)).astype(np.float32))]
    inputs = [tensor("x", ["n", 3, 8, 8]), tensor("s", [3], TensorProto.INT64)]
    return make_model(nodes, inputs, [tensor("y", [None, None])], inits)


def test_independent_mac_count_matches_hand_counts():
    feeds = {"x": np.zeros((2, 3, 8, 8), np.float32), "s": np.array([2, 2, 64], np.int64)}
    count = bench_real.count_macs(_tiny_model(), feeds)
    conv = 2 * 4 * 8 * 8 * (3 * 3 * 3) + 2 * 4 * 4 * 4 * (2 * 3 * 3)  # out elements x (C_in / group) x kernel
    deconv = (2 * 4 * 4 * 4) * (2 * 2 * 2)                              # in elements x (C_out / group) x kernel
    matmul = (2 * 2 * 2) * 64                                           # [2,2,64] @ [2,64,2]
    gemm = 2 * 5 * 4 + 5 * 3 * 2                                        # [2,4]x[4,5]; transA: [5,2]x[2,3]
    assert count.by_op == {"Conv": conv, "ConvTranspose": deconv, "MatMul": matmul, "Gemm": gemm}
    assert count.macs == conv + deconv + matmul + gemm
    # The Reshape's target is data: its output's shape (and what depends on it) came from onnxruntime.
    assert "r" in count.observed and "x" not in count.observed
    assert count.uncounted == []


def test_mac_count_agrees_with_the_zoo_manifest():
    """The ViT's MACs as make_models.py recorded them (a count made by another program)."""
    import json

    import onnx
    root = Path(__file__).resolve().parents[1]
    entry = next(m for m in json.loads((root / "models" / "zoo.json").read_text())["models"]
                 if m["file"] == "models/transformer.onnx")
    count = bench_real.count_macs(onnx.load(root / entry["file"]), {"input": np.zeros((1, 1, 28, 28), np.float32)})
    assert count.macs == entry["macs"]


def test_map_iou_by_hand():
    pred = np.array([[[0.9, 0.9, 0.1, 0.1]], [[0.1, 0.1, 0.1, 0.1]]], np.float32)
    ref = np.array([[[0.9, 0.1, 0.1, 0.1]], [[0.2, 0.2, 0.2, 0.2]]], np.float32)
    # image 0: 1 shared pixel of 2 in the union; image 1: both maps empty, which is agreement
    assert bench_real.map_iou(pred, ref) == pytest.approx((0.5 + 1.0) / 2)
    assert bench_real.map_iou(pred, pred) == 1.0
    assert bench_real.map_iou(pred, 1 - pred) == pytest.approx(0.5 * (0.0 + 0.0))


def test_snr_and_worst_cosine_by_hand():
    ref = np.array([[3.0, 4.0], [1.0, 0.0]])
    assert bench_real.snr_db(ref, ref) == math.inf
    other = np.array([[3.0, 4.5], [1.0, 0.0]])
    assert bench_real.snr_db(ref, other) == pytest.approx(10 * math.log10(26 / 0.25))
    assert bench_real.worst_cosine(ref, np.array([[3.0, 4.0], [0.0, 2.0]])) == pytest.approx(0.0, abs=1e-12)
    assert bench_real.worst_cosine(ref, 2 * ref) == pytest.approx(1.0)


def test_accuracy_counts_top1_matches():
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert bench_real.accuracy(scores, np.array([1, 0, 0])) == pytest.approx(200 / 3)
