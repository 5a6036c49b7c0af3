"""Streamline slimming end to end on the model zoo (models/zoo.json), every model and form.

Cleanup (plus constant folding / Constant-to-initializer when those passes are registered) and the four
streamline passes run to a fixed point; the result must pass onnx.checker, be equivalent to the original
in onnxruntime on the first 256 evaluation images (automatic tolerance), and contain no
BatchNormalization: every BN in these models follows a conv or a Gemm, so each one must fold.
Models whose weights are Constant nodes also run without the constant passes, so the folds meet
Constant-node weights as they are. Skipped when the zoo has not been generated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt.passes.lossless.cleanup  # noqa: F401  (registers identity / dead_code)
import graphopt.passes.lossless.streamline  # noqa: F401  (registers the streamline passes)
from graphopt.core import onnx_io
from graphopt.core.manager import FixedPoint, PassContext, get_pass, registered, run_pipeline
from graphopt.measure.calibration import SampleData
from graphopt.measure.verify import verify

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "models" / "zoo.json"
EVAL = REPO / "models" / "fmnist_eval.npz"
SAMPLES = 256

pytestmark = pytest.mark.skipif(not MANIFEST.exists(), reason="models/zoo.json absent (run tools/make_models.py)")
ENTRIES = json.loads(MANIFEST.read_text())["models"] if MANIFEST.exists() else []

# Written by another engineer; used when registered (Constant-node weights become initializers, shape
# computations fold away).
CONSTANT_PASSES = ("constant_to_initializer", "fold_constants")
STREAMLINE = ("fold_batchnorm", "fold_affine", "fuse_pad", "merge_linear")


def forms_of(entry: dict) -> set[str]:
    form = entry["form"]
    return {form} if isinstance(form, str) else set(form)


CASES = [pytest.param(e, True, id=Path(e["file"]).name) for e in ENTRIES] + [
    pytest.param(e, False, id=f"{Path(e['file']).name}-without-constant-passes")
    for e in ENTRIES if "constant_weights" in forms_of(e)]


def pipeline(constant_passes: bool = True) -> FixedPoint:
    known = registered()
    extra = [n for n in CONSTANT_PASSES if n in known] if constant_passes else []
    names = ["identity", "dead_code", *extra, *STREAMLINE, "dead_code"]
    return FixedPoint([get_pass(n) for n in names], name="streamline_zoo", max_steps=10)


def op_count(model, op_type: str) -> int:
    return sum(1 for g in model.graphs() for n in g.nodes if n.op_type == op_type)


@pytest.fixture(scope="module")
def eval_data() -> SampleData:
    with np.load(EVAL) as data:
        return SampleData(inputs={"input": data["input"][:SAMPLES]}, labels=data["labels"][:SAMPLES],
                          source=f"{EVAL.name}[:{SAMPLES}]")


@pytest.mark.parametrize("entry,constant_passes", CASES)
def test_streamline_zoo_model(entry, constant_passes, eval_data):
    path = REPO / entry["file"]
    model = onnx_io.load(path)
    before, bn_before = model.node_count(), op_count(model, "BatchNormalization")
    _, records = run_pipeline(pipeline(constant_passes), model, PassContext())
    model.check_invariants()
    out = onnx_io.to_proto(model)
    onnx.checker.check_model(out, full_check=True)

    bn_after = op_count(model, "BatchNormalization")
    why = [r.stats.get("left_alone") for r in records if r.name == "fold_batchnorm"][-1:]
    assert bn_after == 0, f"{bn_after} BatchNormalization left; fold_batchnorm says: {why}"

    report = verify(path, out, eval_data, mode="equivalence")
    print(f"\n{entry['file']}: {before} -> {model.node_count()} nodes, BN {bn_before} -> {bn_after}; "
          f"{report.summary()}")
    assert report.passed, report.reasons
