"""Checks of the committed corpus of real-world forms (models/corpus/, issue 15).

onnx, onnxruntime and numpy only: no torch, no graphopt passes. models/corpus/corpus.json drives the
parametrisation; every entry must name a trap that a check below finds in its graph, so a new entry
needs a new check.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.measure import ort as gort

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "models" / "corpus"
MANIFEST = json.loads((CORPUS / "corpus.json").read_text())
ENTRIES = MANIFEST["models"]
# The budget: each file about 2 MB at most, the corpus about 12 MB.
MAX_FILE_BYTES = 2_200_000
MAX_TOTAL_BYTES = 12_500_000
ORT_MAX_IR_VERSION = 13


def entry_id(entry: dict) -> str:
    return entry["name"]


@functools.cache
def load(name: str) -> onnx.ModelProto:
    return onnx.load(CORPUS / f"{name}.onnx")


def feeds_for(model: onnx.ModelProto, probe: dict[str, dict], seed: int = 0) -> dict[str, np.ndarray]:
    """A probe of the manifest as feeds: floats ~ N(0, 1), ints uniform in [low, high) or a fixed value."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        spec = probe[value.name]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        shape = tuple(spec["shape"])
        if "value" in spec:
            feeds[value.name] = np.full(shape, spec["value"], dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[value.name] = rng.integers(spec["low"], spec["high"], size=shape).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


def nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in model.graph.node for out in n.output}


def consumers(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if name in n.input]


def dynamic_dims(entry: dict) -> set[str]:
    return {d for value in entry["inputs"] for d in value["dims"] if isinstance(d, str)}


# --------------------------------------------------------------------------
# The trap each model stands for, found in its graph
# --------------------------------------------------------------------------


def trap_dynamic_spatial(model: onnx.ModelProto, entry: dict) -> None:
    """Image input with dynamic named H and W, Resize (upsampling) and Concat inside."""
    image = dims(model.graph.input[0])
    assert len(image) == 4 and all(isinstance(d, str) for d in (image[0], image[2], image[3]))
    assert nodes(model, "Resize") and nodes(model, "Concat")


def trap_db_detector(model: onnx.ModelProto, entry: dict) -> None:
    trap_dynamic_spatial(model, entry)
    assert nodes(model, "ConvTranspose") and nodes(model, "Add")
    out = dims(model.graph.output[0])
    assert out[1] == 1 and out[2:] == dims(model.graph.input[0])[2:]  # a full-resolution map
    assert model.graph.node[-1].op_type == "Sigmoid"


def trap_yolo_detector(model: onnx.ModelProto, entry: dict) -> None:
    trap_dynamic_spatial(model, entry)
    # SiLU = x * Sigmoid(x); the heads are decoded with run-time shapes.
    assert any(any(c.op_type == "Mul" for c in consumers(model, s.output[0])) for s in nodes(model, "Sigmoid"))
    assert nodes(model, "Shape") and nodes(model, "Reshape")
    # [batch, anchors, 5 + classes]; the exporter writes even the last (fixed, 9) dim as a dim_param.
    out = dims(model.graph.output[0])
    assert len(out) == 3 and all(isinstance(d, str) for d in out)


def trap_crnn(model: onnx.ModelProto, entry: dict) -> None:
    image = dims(model.graph.input[0])
    assert image[1:3] == [1, 32] and isinstance(image[3], str)
    lstm = nodes(model, "LSTM")
    assert lstm and any(a.name == "direction" and a.s == b"bidirectional" for a in lstm[0].attribute)
    time_axis = dims(model.graph.output[0])[0]
    assert isinstance(time_axis, str) and time_axis != image[3]  # T = W / 4: its own dim


def trap_bert(model: onnx.ModelProto, entry: dict) -> None:
    inputs = {v.name: v for v in model.graph.input}
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    for value in inputs.values():
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        batch, sequence = dims(value)
        assert isinstance(batch, str) and isinstance(sequence, str)
    tables = {tuple(t.dims) for t in model.graph.initializer if len(t.dims) == 2}
    assert (2, 64) in tables and (128, 64) in tables  # token type and position tables bound the inputs
    assert [v.name for v in model.graph.output] == ["last_hidden_state", "pooler_output"]


def trap_text_classifier(model: onnx.ModelProto, entry: dict) -> None:
    """The BERT inputs and tables, one logits output [batch, classes] with the batch dynamic."""
    inputs = {v.name: v for v in model.graph.input}
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    for value in inputs.values():
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert all(isinstance(d, str) for d in dims(value))
    tables = {tuple(t.dims) for t in model.graph.initializer if len(t.dims) == 2}
    assert (2, 64) in tables and (128, 64) in tables
    (logits,) = model.graph.output
    batch, classes = dims(logits)
    assert logits.name == "logits" and isinstance(batch, str) and classes == 8


def trap_contrib_ops(model: onnx.ModelProto, entry: dict) -> None:
    contrib = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    assert contrib & {"Attention", "SkipLayerNormalization", "FastGelu", "BiasGelu", "EmbedLayerNormalization",
                      "FusedConv", "Gelu"}
    assert any(o.domain == "com.microsoft" for o in model.opset_import)


def trap_vad_stream(model: onnx.ModelProto, entry: dict) -> None:
    inputs = {v.name: v for v in model.graph.input}
    sr = inputs["sr"]
    assert dims(sr) == [] and sr.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert dims(inputs["state"]) == [2, 1, 64] and dims(inputs["input"]) == [1, 512]
    assert [dims(o) for o in model.graph.output] == [[1, 1], [2, 1, 64]]
    (branch,) = nodes(model, "If")
    assert {a.name for a in branch.attribute} == {"then_branch", "else_branch"}


def trap_nhwc_tf(model: onnx.ModelProto, entry: dict) -> None:
    image = dims(model.graph.input[0])
    assert image[1:] == [28, 28, 1] and image[0].startswith("unk__")
    assert dims(model.graph.output[0])[0].startswith("unk__") and dims(model.graph.output[0])[0] != image[0]
    made_by = producers(model)
    for conv in nodes(model, "Conv"):
        assert made_by[conv.input[0]].op_type == "Transpose"
        assert all(c.op_type == "Transpose" for c in consumers(model, conv.output[0]))
    assert nodes(model, "Conv") and nodes(model, "MatMul")


def trap_minus_one_dims(model: onnx.ModelProto, entry: dict) -> None:
    assert dims(model.graph.input[0]) == [-1, 3, -1, -1]
    assert dims(model.graph.output[0])[0] == -1
    assert all(d.HasField("dim_value") for v in (*model.graph.input, *model.graph.output, *model.graph.value_info)
               for d in v.type.tensor_type.shape.dim)  # no dim_param left anywhere


def trap_fp16(model: onnx.ModelProto, entry: dict) -> None:
    float_inits = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT,
                                                                          onnx.TensorProto.FLOAT16)]
    assert float_inits and all(t.data_type == onnx.TensorProto.FLOAT16 for t in float_inits)
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def trap_qdq_int8(model: onnx.ModelProto, entry: dict) -> None:
    assert nodes(model, "QuantizeLinear") and nodes(model, "DequantizeLinear")
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert int8_weights
    per_channel = [n for n in nodes(model, "DequantizeLinear")
                   if n.input[0] in {t.name for t in int8_weights}
                   and any(a.name == "axis" for a in n.attribute)]
    assert per_channel  # per-channel scales carry an axis
    assert not nodes(model, "Conv") or all(producers(model)[c.input[1]].op_type == "DequantizeLinear"
                                          for c in nodes(model, "Conv"))


TRAPS = {
    "db_detector": trap_db_detector,
    "crnn": trap_crnn,
    "bert_encoder": trap_bert,
    "bert_encoder_dynamo": trap_bert,
    "vad_stream": trap_vad_stream,
    "yolo_detector": trap_yolo_detector,
    "nhwc_tf": trap_nhwc_tf,
    "minus_one_dims": trap_minus_one_dims,
    "fp16": trap_fp16,
    "qdq_int8": trap_qdq_int8,
    "contrib_ops": trap_contrib_ops,
    "text_classifier": trap_text_classifier,
    "text_classifier_dynamo": trap_text_classifier,
}


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_manifest_covers_every_trap_and_file() -> None:
    assert {e["name"] for e in ENTRIES} == set(TRAPS)
    on_disk = {p.name for p in CORPUS.iterdir()} - {"corpus.json"}
    listed = {Path(e["file"]).name for e in ENTRIES} | {Path(f).name for e in ENTRIES for f in e["data_files"]}
    assert on_disk == listed


def test_corpus_stays_small() -> None:
    sizes = [p.stat().st_size for p in CORPUS.iterdir()]
    assert max(sizes) <= MAX_FILE_BYTES
    assert sum(sizes) <= MAX_TOTAL_BYTES


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
def test_file_matches_manifest(entry: dict) -> None:
    blob = (REPO / entry["file"]).read_bytes()
    assert len(blob) == entry["file_bytes"]
    assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
    model = load(entry["name"])
    assert model.ir_version <= ORT_MAX_IR_VERSION
    assert [v["name"] for v in entry["inputs"]] == [v.name for v in model.graph.input]
    assert [v["dims"] for v in entry["inputs"]] == [dims(v) for v in model.graph.input]
    assert "lossless" in entry["presets"]


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
def test_checker_accepts(entry: dict) -> None:
    # Strict shape inference (full_check) rejects -1 dims; that is the minus_one_dims trap itself.
    onnx.checker.check_model(load(entry["name"]), full_check=entry["name"] != "minus_one_dims")


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
def test_trap_is_in_the_graph(entry: dict) -> None:
    TRAPS[entry["name"]](load(entry["name"]), entry)


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
def test_onnxruntime_runs_at_the_first_probe(entry: dict) -> None:
    model = load(entry["name"])
    probe = entry["probes"][0]
    outputs = gort.session(model).run(None, feeds_for(model, probe))
    assert len(outputs) == len(model.graph.output)
    for got, value in zip(outputs, model.graph.output):
        assert got.dtype == onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        assert np.isfinite(got.astype(np.float64)).all()
        # Fixed output dims hold; dynamic ones are whatever the probe makes them.
        assert all(d in (None, -1) or isinstance(d, str) or d == n for d, n in zip(dims(value), got.shape))


def test_two_probes_differ_in_a_dynamic_dim_or_a_branch() -> None:
    """Every model was verified at two concrete shapes of its dynamic dims (vad_stream: at both sample rates)."""
    for entry in ENTRIES:
        first, second = entry["probes"][:2]
        assert first != second, entry["name"]
        if dynamic_dims(entry) or any(-1 in v["dims"] for v in entry["inputs"]):
            assert any(first[n]["shape"] != second[n]["shape"] for n in first), entry["name"]


def test_vad_stream_data_follows_the_sample_convention() -> None:
    """Keys named after inputs carry one feed per sample on axis 0; shared/<input> one array for all;
    each state is the previous step's stateN."""
    model = load("vad_stream")
    with np.load(CORPUS / "vad_stream.npz") as data:
        arrays = {k: data[k] for k in data.files}
    assert set(arrays) == {"input", "state", "shared/sr"}
    assert arrays["input"].shape[1:] == (1, 512) and arrays["state"].shape[1:] == (2, 1, 64)
    assert len(arrays["input"]) == len(arrays["state"]) >= 2
    assert arrays["shared/sr"].shape == () and int(arrays["shared/sr"]) == 16000
    session = gort.session(model)
    for step in range(len(arrays["input"]) - 1):
        feeds = {"input": arrays["input"][step], "state": arrays["state"][step], "sr": arrays["shared/sr"]}
        new_state = session.run(None, feeds)[1]
        np.testing.assert_allclose(new_state, arrays["state"][step + 1], rtol=1e-5, atol=1e-6)


def test_vad_stream_if_takes_both_branches() -> None:
    """The sample rate chooses the frontend: the same chunk and state give different outputs at 16 and 8 kHz."""
    model = load("vad_stream")
    session = gort.session(model)
    rng = np.random.default_rng(0)
    chunk = rng.standard_normal((1, 512)).astype(np.float32)
    state = np.zeros((2, 1, 64), np.float32)
    at_16k = session.run(None, {"input": chunk, "state": state, "sr": np.array(16000)})[1]
    at_8k = session.run(None, {"input": chunk, "state": state, "sr": np.array(8000)})[1]
    assert not np.allclose(at_16k, at_8k)


def test_contrib_ops_model_matches_the_plain_encoder() -> None:
    """onnxruntime's fusions keep the function: contrib_ops and bert_encoder agree on the same feeds."""
    plain, fused = load("bert_encoder"), load("contrib_ops")
    feeds = feeds_for(plain, next(e for e in ENTRIES if e["name"] == "bert_encoder")["probes"][0])
    for a, b in zip(gort.session(plain).run(None, feeds), gort.session(fused).run(None, feeds)):
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_trained_models_record_quality() -> None:
    for entry in ENTRIES:
        if not entry["training"].startswith("untrained"):
            assert any(isinstance(v, (int, float)) for v in entry["quality"].values()), entry["name"]


# The BERT family shares inputs and tables; contrib_ops is the TorchScript encoder after onnxruntime's fusions.
SAME_TRAP_FAMILY = {"bert_encoder", "bert_encoder_dynamo", "contrib_ops"}
TEXT_FAMILY = {"text_classifier", "text_classifier_dynamo"}


@pytest.mark.parametrize("name", sorted(TRAPS))
def test_trap_check_rejects_the_other_models(name: str) -> None:
    """Each check is specific: it fails on every corpus model that does not stand for its trap."""
    family = SAME_TRAP_FAMILY if name in SAME_TRAP_FAMILY - {"contrib_ops"} else {name}
    family = TEXT_FAMILY if name in TEXT_FAMILY else family
    for entry in ENTRIES:
        if entry["name"] in family:
            continue
        with pytest.raises((AssertionError, KeyError, ValueError, TypeError, AttributeError)):
            TRAPS[name](load(entry["name"]), entry)


@pytest.mark.parametrize("name", sorted(TEXT_FAMILY))
def test_text_classifier_scores_well_above_chance_on_held_out_windows(name: str) -> None:
    """The eval npz holds labelled windows the classifier never trained on; both exports score as recorded."""
    entry = next(e for e in ENTRIES if e["name"] == name)
    with np.load(CORPUS / "text_classifier_eval.npz") as f:
        data = {k: f[k] for k in f.files}
    with np.load(CORPUS / "text_classifier_calib.npz") as f:
        calib = {k: f[k] for k in f.files}
    assert set(data) == set(calib) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert len(data["labels"]) >= 300 and np.bincount(data["labels"]).min() >= 30
    # Evaluation windows come from held-out blocks; the only token-for-token repeats of calibration windows
    # are runs of MPL-2.0's dashed rules ("- - - ..."), a few windows at most.
    seen = {row.tobytes() for row in calib["input_ids"]}
    assert sum(row.tobytes() in seen for row in data["input_ids"]) <= 0.01 * len(data["labels"])
    logits = gort.session(load(name)).run(None, {k: v for k, v in data.items() if k != "labels"})[0]
    accuracy = float((logits.argmax(1) == data["labels"]).mean() * 100)
    assert accuracy == pytest.approx(entry["quality"]["accuracy_percent"], abs=0.01)
    assert accuracy > 3 * entry["quality"]["chance_percent"]
