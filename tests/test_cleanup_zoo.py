"""The lossless cleanup passes on every model of the zoo (models/zoo.json), end to end.

For each model: the passes run to a fixed point (which must converge: a pass reporting a change it did
not make would spin), the result passes ``onnx.checker``, keeps its interface, has no ``Constant`` node
left and no more nodes than before, and computes the same logits as the original on the first 256
evaluation images (``verify`` in equivalence mode, onnxruntime optimizations off, relative error at most
1e-5 of the output range). A model the passes report unchanged must come back byte for byte instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

import graphopt.passes.lossless.cleanup  # noqa: F401  (registers the passes)
import graphopt.passes.lossless.simplify  # noqa: F401
from graphopt.core import onnx_io
from graphopt.core.manager import FixedPoint, PassContext, get_pass, run_pipeline
from graphopt.measure.calibration import load_data
from graphopt.measure.verify import Tolerance, verify

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "models" / "zoo.json"
ENTRIES = json.loads(MANIFEST.read_text())["models"] if MANIFEST.exists() else []
# The floor of verify's automatic tolerance: at least as strict as "auto", without its extra run of the
# reference under onnxruntime's own optimizations (the zoo test must stay well under a minute).
TOLERANCE = Tolerance(rel=1e-5)
PASSES = ["constant_to_initializer", "fold_constants", "dedupe_initializers", "cse", "simplify", "identity",
          "dead_code"]


def pipeline() -> FixedPoint:
    return FixedPoint([get_pass(name) for name in PASSES], name="cleanup", max_steps=5)


@pytest.mark.skipif(not MANIFEST.exists(), reason="models/zoo.json is absent")
@pytest.mark.parametrize("entry", ENTRIES, ids=[Path(e["file"]).name for e in ENTRIES])
def test_cleanup_is_lossless_on_zoo_model(entry):
    path = REPO / entry["file"]
    original = onnx.load(str(path))
    model = onnx_io.load(path)
    nodes_before = model.node_count()
    changed, records = run_pipeline(pipeline(), model, PassContext())
    model.check_invariants()
    out = onnx_io.to_proto(model)
    onnx.checker.check_model(out, full_check=True)

    cleanup = next(r for r in records if r.group)
    assert cleanup.stats["converged"], cleanup.stats
    assert [o.name for o in out.graph.output] == [o.name for o in original.graph.output]
    assert [i.name for i in out.graph.input] == [i.name for i in original.graph.input]
    assert model.node_count() <= nodes_before
    constants = [n.outputs[0].name for g in model.graph.walk() for n in g.toposort() if n.op_type == "Constant"]
    outputs = {v.name for v in model.graph.outputs}
    assert set(constants) <= outputs, f"Constant nodes left: {constants}"

    if not changed:  # the passes report nothing done: then the model must be exactly the original
        assert out == original
        return  # equal protos compute the same thing; onnxruntime would only repeat that (the test stays fast)
    data = load_data(REPO / "models" / "fmnist_eval.npz", original).head(256)
    report = verify(original, out, data, mode="equivalence", tolerance=TOLERANCE, batch_size=256,
                    threads=1)
    assert report.passed, report.summary() + " " + "; ".join(report.reasons)
