"""Branch slimming on the model zoo (models/zoo.json): equivalence, structure, and latency of the Inception model.

Skipped when models/zoo.json is absent. On BN-kept models the merges see convs only once BN is folded, so a
model whose manifest says it has BatchNormalization nodes is first run through ``fold_batchnorm`` when that
pass is registered (passes/streamline.py), and skipped otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt.passes.lossless.branch as branch
from graphopt.core import onnx_io
from graphopt.core.ir import Model
from graphopt.core.manager import PassContext, registered
from graphopt.measure.calibration import SampleData
from graphopt.measure.verify import verify

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "models" / "zoo.json"
EVAL = ROOT / "models" / "fmnist_eval.npz"

pytestmark = pytest.mark.skipif(not ZOO.exists(), reason="models/zoo.json absent")

BRANCH_PASSES = (branch.MergeConcatConvsPass, branch.HorizontalFusionPass, branch.MergeSumBranchesPass)


def _entries() -> list[dict]:
    if not ZOO.exists():
        return []
    return [e for e in json.loads(ZOO.read_text())["models"] if e["form"] in ("canonical", "bn_folded")]


def _fold_batchnorm():
    try:
        import graphopt.passes.lossless.streamline  # noqa: F401  (registers fold_batchnorm where it exists)
    except ImportError:
        return None
    cls = registered().get("fold_batchnorm")
    return cls() if cls is not None else None


def _eval_data(n: int = 256) -> SampleData:
    with np.load(EVAL) as f:
        return SampleData({"input": f["input"][:n]}, f["labels"][:n].astype(np.int64))


def _prepared(entry: dict) -> Model:
    model = onnx_io.load(ROOT / entry["file"])
    if entry.get("has_batchnorm_nodes"):
        fold = _fold_batchnorm()
        if fold is None:
            pytest.skip("BN-kept model and fold_batchnorm is not registered yet")
        fold.run(model, PassContext())
    return model


def _branch(model: Model, **options) -> dict:
    ctx = PassContext(options={p.name: options.get(p.name, {}) for p in BRANCH_PASSES})
    return {p.name: p().run(model, ctx).stats for p in BRANCH_PASSES}


def _checked(model: Model) -> onnx.ModelProto:
    model.check_invariants()
    proto = onnx_io.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


@pytest.mark.parametrize("entry", _entries(), ids=lambda e: Path(e["file"]).name)
def test_branch_passes_keep_zoo_models_equivalent(entry):
    reference = _prepared(entry)
    model = _prepared(entry)
    _branch(model)
    report = verify(onnx_io.to_proto(reference), _checked(model), _eval_data())
    assert report.passed, report.reasons


def _inception() -> dict:
    entries = [e for e in _entries() if e["arch"] == "inception"]
    entries.sort(key=lambda e: e["form"] != "bn_folded")  # the BN-folded export first
    if not entries:
        pytest.skip("models/zoo.json lists no inception model yet")
    return entries[0]


def test_inception_branch_fusion_drops_nodes_and_stays_equivalent():
    entry = _inception()
    reference = _prepared(entry)
    # Without the NCHWc charge the 1x1 reductions of each block fuse into one conv + Split.
    model = _prepared(entry)
    stats = _branch(model, horizontal_fusion={"blocked_layout": False})
    assert stats["horizontal_fusion"]["rewrites"] >= 3, stats
    assert model.node_count() < reference.node_count()
    report = verify(onnx_io.to_proto(reference), _checked(model), _eval_data())
    assert report.passed, report.reasons


def test_inception_default_refuses_the_split_for_onnxruntime_cpu():
    entry = _inception()
    model = _prepared(entry)
    before = onnx_io.to_proto(model)
    stats = _branch(model)
    reasons = [r["reason"] for r in stats["horizontal_fusion"].get("left_alone", [])]
    assert stats["horizontal_fusion"]["rewrites"] == 0 and any("NCHWc" in r for r in reasons), stats
    assert onnx_io.to_proto(model) == before
