"""Checks of the committed model zoo (models/) and the synthetic builders.

Everything here runs on onnx, onnxruntime and numpy alone (through graphopt's
session helpers): no torch, no training. The manifest models/zoo.json drives the parametrisation, so a new
zoo entry is tested without touching this file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.measure import ort as gort
from tests.util import run

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
MANIFEST = json.loads((MODELS / "zoo.json").read_text())
ENTRIES = MANIFEST["models"]
ARCHS = sorted({e["arch"] for e in ENTRIES})
ALL_FORMS = {"bn_folded", "constant_weights", "opset11", "opset_newest",
             "static_batch"}
# Architectures that must carry every form (see tools/make_models.py).
FULL_COVERAGE_ARCHS = ("vgg", "resnet", "mobilenetv2", "inception")
ORT_MAX_IR_VERSION = 13
# Exporters and BN folding only reorder float arithmetic.
LOGITS_RTOL = LOGITS_ATOL = 1e-3


def forms_of(entry: dict) -> set[str]:
    """The manifest's form field is a string or a list of strings."""
    form = entry["form"]
    return {form} if isinstance(form, str) else set(form)


def entry_id(entry: dict) -> str:
    return Path(entry["file"]).name


@functools.cache
def load_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(MODELS / name) as data:
        return {key: data[key] for key in data.files}


@functools.cache
def eval_logits(file: str) -> np.ndarray:
    """Logits of a zoo file on the whole eval set (static-batch models are
    fed one image at a time). Cached: several tests compare them."""
    entry = next(e for e in ENTRIES if e["file"] == file)
    session = gort.session(REPO / file)  # optimisations off: the model as written
    x = load_npz("fmnist_eval.npz")["input"]
    step = 500 if entry["dynamic_batch"] else 1
    return np.concatenate([session.run(None, {"input": x[i:i + step]})[0]
                           for i in range(0, len(x), step)])


# --------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name,count", [("fmnist_calib.npz", 512),
                                        ("fmnist_eval.npz", 2000)])
def test_data_file_layout(name: str, count: int) -> None:
    data = load_npz(name)
    assert set(data) == {"input", "labels"}
    assert data["input"].dtype == np.float32
    assert data["input"].shape == (count, 1, 28, 28)
    assert data["labels"].dtype == np.int64
    assert data["labels"].shape == (count,)
    assert set(np.unique(data["labels"])) == set(range(10))
    # Normalised pixels: background maps to -MEAN/STD ~ -0.81.
    assert data["input"].min() == pytest.approx(-0.2860 / 0.3530, abs=1e-3)
    assert abs(float(data["input"].mean())) < 0.2


# --------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------


def test_manifest_lists_every_onnx_file() -> None:
    # models/corpus/ has its own manifest (tests/test_corpus_models.py).
    on_disk = {str(p.relative_to(REPO)) for p in MODELS.rglob("*.onnx") if p.parent.name != "corpus"}
    assert on_disk == {e["file"] for e in ENTRIES}


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_has_canonical_and_variants(arch: str) -> None:
    entries = [e for e in ENTRIES if e["arch"] == arch]
    assert sum(e["form"] == "canonical" for e in entries) == 1
    assert len(entries) >= 3, "canonical + at least two variants"


def test_form_coverage() -> None:
    """The CNNs carry every form; every form appears for several archs."""
    for arch in FULL_COVERAGE_ARCHS:
        forms = set().union(*(forms_of(e) for e in ENTRIES
                              if e["arch"] == arch))
        assert ALL_FORMS <= forms, arch
    for form in ALL_FORMS:
        archs = {e["arch"] for e in ENTRIES if form in forms_of(e)}
        assert len(archs) >= 4, form


# --------------------------------------------------------------------------
# Each zoo file
# --------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
def test_file_matches_manifest(entry: dict) -> None:
    path = REPO / entry["file"]
    assert path.is_file()
    blob = path.read_bytes()
    assert len(blob) == entry["file_bytes"]
    assert hashlib.sha256(blob).hexdigest() == entry["sha256"]


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
def test_model_is_valid(entry: dict) -> None:
    model = onnx.load(REPO / entry["file"])
    onnx.checker.check_model(model, full_check=True)
    opset = next(o.version for o in model.opset_import
                 if o.domain in ("", "ai.onnx"))
    assert opset == entry["opset"]
    assert model.ir_version == entry["ir_version"] <= ORT_MAX_IR_VERSION
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert (not batch.HasField("dim_value")) == entry["dynamic_batch"]
    has_bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert has_bn == entry["has_batchnorm_nodes"]
    assert len(model.graph.node) == entry["nodes"]
    if "constant_weights" in forms_of(entry):
        assert not model.graph.initializer


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
def test_accuracy_matches_manifest(entry: dict) -> None:
    logits = eval_logits(entry["file"])
    labels = load_npz("fmnist_eval.npz")["labels"]
    assert logits.shape == (len(labels), 10)
    accuracy = float((logits.argmax(1) == labels).mean() * 100)
    assert accuracy == pytest.approx(entry["test_accuracy"], abs=0.1)


@pytest.mark.parametrize("arch", ARCHS)
def test_forms_agree(arch: str) -> None:
    """Every export of one trained network computes the same function."""
    entries = [e for e in ENTRIES if e["arch"] == arch]
    canonical = next(e for e in entries if e["form"] == "canonical")
    reference = eval_logits(canonical["file"])
    for entry in entries:
        np.testing.assert_allclose(eval_logits(entry["file"]), reference,
                                   rtol=LOGITS_RTOL, atol=LOGITS_ATOL,
                                   err_msg=entry["file"])


# --------------------------------------------------------------------------
# Synthetic benchmark models (tools/synthetic_models.py)
# --------------------------------------------------------------------------


def load_synthetic_module():
    """Import tools/synthetic_models.py by path (tools/ is not a package)."""
    path = REPO / "tools" / "synthetic_models.py"
    spec = importlib.util.spec_from_file_location("synthetic_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


synthetic = load_synthetic_module()


def check_and_run(model: onnx.ModelProto, input_shape: tuple[int, ...]
                  ) -> np.ndarray:
    """Checker-validate a built model and run one batch in onnxruntime."""
    assert model.ir_version <= 10
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).standard_normal(input_shape,
                                                 dtype=np.float32)
    out = run(model, {"input": x})[0]
    assert np.isfinite(out).all()
    return out


def test_synthetic_chain() -> None:
    model = synthetic.chain(n_nodes=10000)
    assert abs(len(model.graph.node) - 10000) <= 10
    assert check_and_run(model, (2, 4, 8, 8)).shape == (2, 4)


def test_synthetic_resnet18() -> None:
    model = synthetic.resnet18()
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 20 and ops.count("BatchNormalization") == 20
    assert check_and_run(model, (1, 3, 224, 224)).shape == (1, 1000)


def test_synthetic_vgg16_is_about_100mb() -> None:
    model = synthetic.vgg16()
    assert 90e6 <= model.ByteSize() <= 110e6
    assert check_and_run(model, (1, 3, 224, 224)).shape == (1, 1000)


def test_synthetic_builders_are_deterministic() -> None:
    a = synthetic.chain(n_nodes=200, seed=3).SerializeToString()
    b = synthetic.chain(n_nodes=200, seed=3).SerializeToString()
    assert a == b
