#!/usr/bin/env python3
"""Build the corpus of real-world ONNX forms (issue 15) in ``models/corpus/``.

Each model stands for one trap that models from the field set for an
optimizer (dynamic H x W, dynamic sequence, scalar and state inputs, If
subgraphs, NHWC transposes, ``-1`` dims, fp16, QDQ int8, contrib ops), plus a
text classifier on the BERT encoder (which license a token window comes
from) whose labelled calibration and evaluation windows are committed next to
it, so lossy passes are judged on a real task (issue 16). They
are built with PyTorch's real exporters (TorchScript ``dynamo=False`` and,
for ``bert_encoder_dynamo``, torch.export), onnxruntime's quantizer and its
transformer optimizer; trained briefly on real data where a quality figure is
recorded; verified with ``onnx.checker`` and onnxruntime (optimizations off) at
two concrete shapes of their dynamic dims against torch; and described in
``models/corpus/corpus.json`` and a section of ``models/README.md``.

    python tools/make_corpus.py                    # rebuild the whole corpus
    python tools/make_corpus.py --only crnn        # one model (repeatable)

Requirements (dev only): the zoo's (``tools/make_models.py``: torch 2.13.0
CPU, onnxscript, ``dataset-fashion-mnist``), onnxruntime (quantization and
transformers tools ship with it), Debian's ``base-files`` license texts
(``/usr/share/common-licenses``, the BERT training text).
"""

from __future__ import annotations

import os

# One thread, and OpenMP threads that do not spin (the CPU is shared); set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import hashlib
import io
import json
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_models as zoo  # noqa: E402

CORPUS_DIR = zoo.MODELS_DIR / "corpus"
MANIFEST = CORPUS_DIR / "corpus.json"
LICENSES_DIR = Path("/usr/share/common-licenses")
README_MARKER = zoo.CORPUS_README_MARKER

# The TorchScript exporter's usual opset; tf2onnx's and paddle2onnx's common defaults.
TORCHSCRIPT_OPSET = zoo.CANONICAL_OPSET
TF2ONNX_OPSET = 13
PADDLE_OPSET = 11

# Float exports must match torch this closely (max |diff|, outputs of order 1).
MAX_ABS_DIFF = 1e-3
# fp16 arithmetic: logits of order 10 keep ~3 decimal digits.
MAX_ABS_DIFF_FP16 = 5e-2

ALL_LOSSY = ["prune", "lowrank", "compress"]


# --------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------


def fit(name: str, model: nn.Module, batch: Callable[[int], tuple], loss_fn: Callable,
        steps: int, lr: float, weight_decay: float = 1e-4) -> None:
    """Train in place with AdamW under a one-cycle schedule.

    ``batch(step)`` returns the forward arguments and the target; ``loss_fn(out,
    target)`` the scalar loss. Data generators are seeded, so runs repeat.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    model.train()
    start, running = time.time(), 0.0
    for step in range(steps):
        args, target = batch(step)
        loss = loss_fn(model(*args), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"  [{name}] step {step + 1}/{steps} loss {running / max(1, steps // 5):.4f} "
                  f"({time.time() - start:.0f}s)", flush=True)
            running = 0.0
    model.eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@cache
def fashion_mnist() -> zoo.Dataset:
    return zoo.load_fashion_mnist()


@cache
def fashion_mnist_raw() -> dict[str, np.ndarray]:
    """uint8 images and int64 labels of both splits (for composed inputs)."""
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        out[f"{split}_x"] = zoo.read_idx(zoo.DATA_DIR / f"{prefix}-images-idx3-ubyte.gz")
        out[f"{split}_y"] = zoo.read_idx(zoo.DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return out


@cache
def eval_set() -> dict[str, np.ndarray]:
    with np.load(zoo.MODELS_DIR / "fmnist_eval.npz") as f:
        return {k: f[k] for k in f.files}


# --------------------------------------------------------------------------
# Export and verification helpers
# --------------------------------------------------------------------------


def export_torchscript(model: nn.Module, args: tuple, input_names: list[str], output_names: list[str],
                       dynamic_axes: dict | None, opset: int = TORCHSCRIPT_OPSET) -> onnx.ModelProto:
    """The TorchScript exporter's usual eval export (BN folded, constants folded)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buf, dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
    proto = onnx.load_from_string(buf.getvalue())
    fix_ir_version(proto)
    return proto


def fix_ir_version(proto: onnx.ModelProto) -> None:
    """The zoo's rule (the exporter's stamp, raised to the opset's minimum, capped at what onnxruntime
    reads), judged on the standard domains only: onnx's release table does not know com.microsoft."""
    standard = [o for o in proto.opset_import if o.domain in ("", "ai.onnx", "ai.onnx.ml")]
    minimum = onnx.helper.find_min_ir_version_for(standard)
    proto.ir_version = min(max(proto.ir_version, minimum), zoo.MAX_ORT_IR_VERSION)


def dims_of(value: onnx.ValueInfoProto) -> list:
    """Dims as written: int (dim_value, -1 included), str (dim_param) or None (neither)."""
    out: list = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            out.append(dim.dim_value)
        elif dim.HasField("dim_param"):
            out.append(dim.dim_param)
        else:
            out.append(None)
    return out


def describe_values(values) -> list[dict]:
    return [{"name": v.name,
             "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name,
             "dims": dims_of(v)} for v in values]


@dataclass
class Probe:
    """One concrete feed: how to draw each input (shape plus int range or fixed value)."""

    inputs: dict[str, dict]

    def feeds(self, model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
        return make_feeds(model, self.inputs, seed)


def make_feeds(model: onnx.ModelProto, spec: dict[str, dict], seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds from a probe spec: floats ~ N(0, 1); ints uniform in [low, high) or a fixed value.

    The same rule is in tests/test_corpus_models.py, which reads the specs from the manifest.
    """
    rng = np.random.default_rng(seed)
    types = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for v in model.graph.input}
    feeds = {}
    for name, s in spec.items():
        dtype, shape = types[name], tuple(s["shape"])
        if "value" in s:
            feeds[name] = np.full(shape, s["value"], dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[name] = rng.integers(s["low"], s["high"], size=shape).astype(dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return zoo.ort_session(model.SerializeToString()).run(None, feeds)


def verify_probes(model: onnx.ModelProto, probes: list[Probe], reference: Callable | None,
                  tolerance: float = MAX_ABS_DIFF, full_check: bool = True) -> float | None:
    """onnx.checker, then onnxruntime at every probe; against ``reference(feeds)`` when given.

    Returns the largest max |onnx - torch| over outputs and probes (None without a reference).
    Raises when a probe does not run or an output differs by more than ``tolerance``.
    """
    onnx.checker.check_model(model, full_check=full_check)
    session = zoo.ort_session(model.SerializeToString())
    worst = None if reference is None else 0.0
    for i, probe in enumerate(probes):
        feeds = probe.feeds(model, seed=i)
        got = session.run(None, feeds)
        if reference is None:
            continue
        for g, w in zip(got, reference(feeds), strict=True):
            if g.shape != w.shape:
                raise AssertionError(f"{model.graph.name}: output shape {g.shape} != torch {w.shape}")
            diff = float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max())
            if diff > tolerance:
                raise AssertionError(f"{model.graph.name}: output differs from torch by {diff} at {probe.inputs}")
            worst = max(worst, diff)
    return worst


def torch_reference(model: nn.Module, input_names: list[str]) -> Callable:
    """feeds -> list of numpy outputs of the eval-mode torch model."""
    @torch.no_grad()
    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = model(*(torch.from_numpy(feeds[n]) for n in input_names))
        out = out if isinstance(out, tuple) else (out,)
        return [o.float().numpy() for o in out]
    return run


@dataclass
class Built:
    """A built corpus model and what the manifest says about it."""

    name: str
    proto: onnx.ModelProto
    trap: str
    exporter: str
    probes: list[Probe]
    presets: list[str]
    params: int | None
    max_abs_diff: float | None
    quality: dict = field(default_factory=dict)
    training: str = "untrained (random init, seeded)"
    data_files: list[str] = field(default_factory=list)
    notes: str = ""


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def save(built: Built) -> dict:
    """Write models/corpus/<name>.onnx and return its manifest entry."""
    built.proto.graph.name = built.name
    blob = built.proto.SerializeToString()
    path = CORPUS_DIR / f"{built.name}.onnx"
    path.write_bytes(blob)
    domains = sorted({o.domain or "ai.onnx" for o in built.proto.opset_import})
    print(f"  {path.relative_to(zoo.REPO)}: {len(blob) / 1e3:.0f} kB, opset {zoo.opset_of(built.proto)}, "
          f"nodes {len(built.proto.graph.node)}, max|diff| {built.max_abs_diff}, {built.quality}", flush=True)
    return {
        "name": built.name,
        "file": str(path.relative_to(zoo.REPO)),
        "trap": built.trap,
        "exporter": built.exporter,
        "opset": zoo.opset_of(built.proto),
        "opset_domains": domains,
        "ir_version": built.proto.ir_version,
        "inputs": describe_values(built.proto.graph.input),
        "outputs": describe_values(built.proto.graph.output),
        "params": built.params,
        "nodes": len(built.proto.graph.node),
        "op_types": dict(sorted(Counter(n.op_type for n in built.proto.graph.node).items())),
        "file_bytes": len(blob),
        "sha256": sha256(blob),
        "presets": built.presets,
        "probes": [p.inputs for p in built.probes],
        "max_abs_diff_vs_torch": None if built.max_abs_diff is None else float(f"{built.max_abs_diff:.3g}"),
        "quality": built.quality,
        "training": built.training,
        "data_files": built.data_files,
        "notes": built.notes,
    }


# --------------------------------------------------------------------------
# 1. db_detector: DB-style text detector
# --------------------------------------------------------------------------


class DBDetector(nn.Module):
    """Stride-32 conv backbone, FPN (nearest Resize x2 + Add), the four levels
    resized to 1/4 and concatenated, a head of Conv and two stride-2
    ConvTransposes ending in a Sigmoid probability map at full resolution."""

    def __init__(self, widths=(8, 16, 24, 32, 48), inner: int = 16) -> None:
        super().__init__()
        w = widths
        self.stem = zoo.conv_bn(3, w[0], stride=2)                                       # 1/2
        self.stages = nn.ModuleList([
            nn.Sequential(zoo.conv_bn(w[i], w[i + 1], stride=2), zoo.conv_bn(w[i + 1], w[i + 1]))
            for i in range(4)])                                                          # 1/4 .. 1/32
        self.lateral = nn.ModuleList([nn.Conv2d(c, inner, 1) for c in w[1:]])
        self.smooth = nn.ModuleList([nn.Conv2d(inner, inner // 4, 3, padding=1) for _ in w[1:]])
        self.head = nn.Sequential(
            zoo.conv_bn(inner, inner // 4),
            nn.ConvTranspose2d(inner // 4, inner // 4, 2, 2), nn.BatchNorm2d(inner // 4), nn.ReLU(),
            nn.ConvTranspose2d(inner // 4, 1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, y = [], self.stem(x)
        for stage in self.stages:
            y = stage(y)
            features.append(y)
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 2, -1, -1):  # top-down pathway
            laterals[i] = laterals[i] + F.interpolate(laterals[i + 1], scale_factor=2.0, mode="nearest")
        outs = [F.interpolate(conv(p), scale_factor=float(2 ** i), mode="nearest") if i else conv(p)
                for i, (conv, p) in enumerate(zip(self.smooth, laterals))]
        fused = torch.cat(outs[::-1], dim=1)
        return torch.sigmoid(self.head(fused))


def item_canvases(images: np.ndarray, rng: np.random.Generator, count: int, height: int, width: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Canvases [count, 3, H, W] with 1-3 coloured Fashion-MNIST items on a noisy
    background, and their masks [count, 1, H, W] (item pixels > 0.2)."""
    x = rng.uniform(0.0, 0.15, size=(count, 3, height, width)).astype(np.float32)
    mask = np.zeros((count, 1, height, width), np.float32)
    for i in range(count):
        for _ in range(rng.integers(1, 4)):
            item = images[rng.integers(len(images))].astype(np.float32) / 255.0
            top, left = rng.integers(0, height - 27), rng.integers(0, width - 27)
            color = rng.uniform(0.5, 1.0, size=(3, 1, 1)).astype(np.float32)
            region = x[i, :, top:top + 28, left:left + 28]
            x[i, :, top:top + 28, left:left + 28] = np.maximum(region, item[None] * color)
            mask[i, 0, top:top + 28, left:left + 28] = np.maximum(mask[i, 0, top:top + 28, left:left + 28],
                                                                 (item > 0.2).astype(np.float32))
    return x, mask


def mean_iou(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """Mean over images of |pred ∩ mask| / |pred ∪ mask|, pred = prob > threshold."""
    pred = prob > threshold
    truth = mask > 0.5
    inter = (pred & truth).sum(axis=(1, 2, 3))
    union = (pred | truth).sum(axis=(1, 2, 3))
    return float(np.mean(inter / np.maximum(union, 1)))


def build_db_detector() -> list[Built]:
    raw = fashion_mnist_raw()
    model = DBDetector()
    rng = np.random.default_rng(zoo.SEED + 1)

    def batch(_step: int):
        x, m = item_canvases(raw["train_x"], rng, 16, 64, 64)
        return (torch.from_numpy(x),), torch.from_numpy(m)

    fit("db_detector", model, batch, F.binary_cross_entropy, steps=1200, lr=3e-3)
    names = (["x"], ["maps"])
    axes = {"x": {0: "batch", 2: "height", 3: "width"}, "maps": {0: "batch", 2: "height", 3: "width"}}
    proto = export_torchscript(model, (torch.zeros(1, 3, 64, 64),), *names, axes)
    probes = [Probe({"x": {"shape": [1, 3, 64, 64]}}), Probe({"x": {"shape": [2, 3, 96, 128]}})]
    diff = verify_probes(proto, probes, torch_reference(model, names[0]))
    held_x, held_m = item_canvases(raw["test_x"], np.random.default_rng(zoo.SEED + 101), 200, 96, 128)
    prob = np.concatenate([run_ort(proto, {"x": held_x[i:i + 50]})[0] for i in range(0, 200, 50)])
    return [Built(
        "db_detector", proto,
        trap="dynamic height and width (named dims), stride 32 total: probes must be multiples of 32; "
             "FPN Resize x2 + Add, Concat of resized levels, ConvTranspose head, Sigmoid map",
        exporter="torch.onnx TorchScript (dynamo=False), eval export (BN folded)",
        probes=probes, presets=["lossless", *ALL_LOSSY], params=count_params(model), max_abs_diff=diff,
        quality={"mean_iou_at_0.5": round(mean_iou(prob, held_m), 4),
                 "eval": "200 held-out 96x128 canvases of Fashion-MNIST test items (onnxruntime)"},
        training="1200 steps x 16 canvases 64x64 of Fashion-MNIST train items, masks = item pixels > 0.2, "
                 "BCE, AdamW one-cycle")]


# --------------------------------------------------------------------------
# 2. crnn: conv + BiLSTM + CTC
# --------------------------------------------------------------------------

CRNN_CLASSES = 11  # blank + 10 Fashion-MNIST classes
CRNN_WIDTH = 160   # training canvas width; T = W / 4


class CRNN(nn.Module):
    """Conv stack to height 1 (W/4 steps), BiLSTM, per-step Linear: logits [T, batch, classes]."""

    def __init__(self, hidden: int = 48) -> None:
        super().__init__()
        self.cnn = nn.Sequential(
            zoo.conv_bn(1, 16), nn.MaxPool2d(2),                 # 16 x W/2
            zoo.conv_bn(16, 32), nn.MaxPool2d(2),                # 8 x W/4
            zoo.conv_bn(32, 64), nn.MaxPool2d((2, 1)),           # 4
            zoo.conv_bn(64, 64), nn.MaxPool2d((2, 1)),           # 2
            nn.Conv2d(64, 64, (2, 1)), nn.ReLU())                # 1
        self.rnn = nn.LSTM(64, hidden, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, CRNN_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.cnn(x).squeeze(2).permute(2, 0, 1)  # [T, batch, 64]
        out, _ = self.rnn(features)
        return self.fc(out)


def greedy_decode(logits: np.ndarray) -> list[list[int]]:
    """CTC greedy decode of [T, batch, classes]: argmax, collapse repeats, drop blanks (0)."""
    best = logits.argmax(-1).T  # [batch, T]
    out = []
    for row in best:
        seq, prev = [], 0
        for c in row:
            if c != prev and c != 0:
                seq.append(int(c))
            prev = c
        out.append(seq)
    return out


def item_lines(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, count: int,
               width: int = CRNN_WIDTH) -> tuple[np.ndarray, list[np.ndarray]]:
    """Lines [count, 1, 32, width] of 1..width/28 Fashion-MNIST items left to right with random gaps,
    normalised to [-1, 1], and their label sequences (class + 1; 0 is the CTC blank)."""
    x = np.zeros((count, 1, 32, width), np.float32)
    targets = []
    for i in range(count):
        n = int(rng.integers(1, width // 28 + 1))
        idx = rng.integers(len(images), size=n)
        slack = width - 28 * n
        cuts = np.sort(rng.integers(0, slack + 1, size=n))
        for k, j in enumerate(idx):
            left = int(cuts[k]) + 28 * k
            x[i, 0, 2:30, left:left + 28] = images[j] / 255.0
        targets.append(labels[idx] + 1)
    return (x - 0.5) / 0.5, targets


def build_crnn() -> list[Built]:
    raw = fashion_mnist_raw()
    model = CRNN()
    rng = np.random.default_rng(zoo.SEED + 2)

    def batch(_step: int):
        x, targets = item_lines(raw["train_x"], raw["train_y"], rng, 32)
        return (torch.from_numpy(x),), targets

    def ctc(logits: torch.Tensor, targets: list[np.ndarray]) -> torch.Tensor:
        log_probs = logits.log_softmax(-1)
        flat = torch.from_numpy(np.concatenate(targets))
        lengths = torch.tensor([len(t) for t in targets])
        steps = torch.full((logits.shape[1],), logits.shape[0], dtype=torch.long)
        return F.ctc_loss(log_probs, flat, steps, lengths, zero_infinity=True)

    fit("crnn", model, batch, ctc, steps=1500, lr=3e-3)
    names = (["input"], ["logits"])
    axes = {"input": {0: "batch", 3: "width"}, "logits": {0: "time", 1: "batch"}}
    proto = export_torchscript(model, (torch.zeros(1, 1, 32, CRNN_WIDTH),), *names, axes)
    probes = [Probe({"input": {"shape": [1, 1, 32, 160]}}), Probe({"input": {"shape": [2, 1, 32, 96]}})]
    diff = verify_probes(proto, probes, torch_reference(model, names[0]))
    held_x, held_t = item_lines(raw["test_x"], raw["test_y"], np.random.default_rng(zoo.SEED + 102), 500)
    logits = np.concatenate([run_ort(proto, {"input": held_x[i:i + 100]})[0] for i in range(0, 500, 100)], axis=1)
    decoded = greedy_decode(logits)
    accuracy = float(np.mean([d == list(t) for d, t in zip(decoded, held_t)]) * 100)
    return [Built(
        "crnn", proto,
        trap="dynamic width (W = 4 T): output's leading time axis is a different dynamic dim than the input's; "
             "a bidirectional LSTM node whose zero initial state is sized from the batch at run time "
             "(Shape -> Gather -> Concat -> ConstantOfShape)",
        exporter="torch.onnx TorchScript (dynamo=False), eval export (BN folded)",
        probes=probes, presets=["lossless", *ALL_LOSSY], params=count_params(model), max_abs_diff=diff,
        quality={"sequence_accuracy_percent": round(accuracy, 2),
                 "eval": "500 held-out 32x160 lines of 1-5 Fashion-MNIST test items, CTC greedy decode, exact match "
                         "(onnxruntime)"},
        training="1500 steps x 32 lines of Fashion-MNIST train items, CTC (blank 0), AdamW one-cycle")]


# --------------------------------------------------------------------------
# 3. bert_encoder (+ _dynamo) and 10. contrib_ops
# --------------------------------------------------------------------------

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BERT_VOCAB = 1024
BERT_POSITIONS = 128
BERT_HIDDEN, BERT_HEADS, BERT_LAYERS, BERT_FFN = 64, 2, 2, 128
BERT_HELD_OUT = "Apache-2.0"
BERT_STEPS = 5000


class BertEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(BERT_VOCAB, BERT_HIDDEN, padding_idx=0)
        self.position_embeddings = nn.Embedding(BERT_POSITIONS, BERT_HIDDEN)
        self.token_type_embeddings = nn.Embedding(2, BERT_HIDDEN)
        self.LayerNorm = nn.LayerNorm(BERT_HIDDEN, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(BERT_POSITIONS).unsqueeze(0), persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, :input_ids.size(1)]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    """Written as HuggingFace's BertSelfAttention (the form onnxruntime's fusions look for)."""

    def __init__(self) -> None:
        super().__init__()
        self.head_size = BERT_HIDDEN // BERT_HEADS
        self.query = nn.Linear(BERT_HIDDEN, BERT_HIDDEN)
        self.key = nn.Linear(BERT_HIDDEN, BERT_HIDDEN)
        self.value = nn.Linear(BERT_HIDDEN, BERT_HIDDEN)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size()[:-1] + (BERT_HEADS, self.head_size)).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / (self.head_size ** 0.5) + mask
        context = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
        return context.view(context.size()[:-2] + (BERT_HIDDEN,))


class BertLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = BertSelfAttention()
        self.attention_output = nn.Linear(BERT_HIDDEN, BERT_HIDDEN)
        self.attention_norm = nn.LayerNorm(BERT_HIDDEN, eps=1e-12)
        self.intermediate = nn.Linear(BERT_HIDDEN, BERT_FFN)
        self.output = nn.Linear(BERT_FFN, BERT_HIDDEN)
        self.output_norm = nn.LayerNorm(BERT_HIDDEN, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(self.attention_output(self.attention(x, mask)) + x)
        return self.output_norm(self.output(F.gelu(self.intermediate(x))) + x)


def bert_init(module: nn.Module) -> None:
    """BERT's initialisation: weights ~ N(0, 0.02), biases 0 (torch's default N(0, 1) embeddings train poorly)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class BertEncoder(nn.Module):
    """BERT-style encoder: (input_ids, attention_mask, token_type_ids) ->
    (last_hidden_state [batch, sequence, hidden], pooler_output [batch, hidden])."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings()
        self.layers = nn.ModuleList([BertLayer() for _ in range(BERT_LAYERS)])
        self.pooler = nn.Linear(BERT_HIDDEN, BERT_HIDDEN)
        self.apply(bert_init)

    def forward(self, input_ids, attention_mask, token_type_ids):
        mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x, torch.tanh(self.pooler(x[:, 0]))


class MaskedLM(nn.Module):
    """Training wrapper: the encoder plus an MLM head tied to the word embeddings."""

    def __init__(self, encoder: BertEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.transform = nn.Sequential(nn.Linear(BERT_HIDDEN, BERT_HIDDEN), nn.GELU(),
                                       nn.LayerNorm(BERT_HIDDEN, eps=1e-12))
        self.bias = nn.Parameter(torch.zeros(BERT_VOCAB))
        self.transform.apply(bert_init)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(hidden) @ self.encoder.embeddings.word_embeddings.weight.T + self.bias

    def forward(self, ids, mask, types):
        return self.head(self.encoder(ids, mask, types)[0])


def license_tokens() -> tuple[dict[str, list[str]], list[str]]:
    """Lower-cased word/number/punctuation tokens of each license text, and the vocabulary
    (specials + the most frequent tokens of the training files)."""
    texts = {}
    for path in sorted(LICENSES_DIR.iterdir()):
        if path.is_file() and not path.is_symlink():
            texts[path.name] = re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", path.read_text(errors="replace").lower())
    counts = Counter(t for name, toks in texts.items() if name != BERT_HELD_OUT for t in toks)
    vocab = list(BERT_SPECIALS) + [t for t, _ in counts.most_common(BERT_VOCAB - len(BERT_SPECIALS))]
    return texts, vocab


def sentence_pairs(stream: np.ndarray, rng: np.random.Generator, count: int, max_len: int = 32
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[CLS] A [SEP] B [SEP] from consecutive token runs, padded to max_len:
    input_ids, attention_mask (1 on real tokens), token_type_ids (1 on B)."""
    ids = np.zeros((count, max_len), np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    cls, sep = BERT_SPECIALS.index("[CLS]"), BERT_SPECIALS.index("[SEP]")
    for i in range(count):
        total = int(rng.integers(max_len // 2, max_len + 1))
        a = int(rng.integers(2, total - 4))
        body = total - 3
        start = int(rng.integers(0, len(stream) - body))
        run = stream[start:start + body]
        row = [cls, *run[:a - 1], sep, *run[a - 1:], sep]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
        types[i, a + 1:len(row)] = 1
    return ids, mask, types


def mask_tokens(ids: np.ndarray, mask: np.ndarray, rng: np.random.Generator, rate: float = 0.15
                ) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of real, non-special tokens: 80% [MASK], 10% random, 10% kept.
    Returns the corrupted ids and the labels (-100 where not masked)."""
    pick = (rng.random(ids.shape) < rate) & (mask == 1) & (ids >= len(BERT_SPECIALS))
    labels = np.where(pick, ids, -100)
    corrupted = ids.copy()
    roll = rng.random(ids.shape)
    corrupted[pick & (roll < 0.8)] = BERT_SPECIALS.index("[MASK]")
    random_ids = rng.integers(len(BERT_SPECIALS), BERT_VOCAB, size=ids.shape)
    swap = pick & (roll >= 0.8) & (roll < 0.9)
    corrupted[swap] = random_ids[swap]
    return corrupted, labels


@cache
def trained_bert() -> tuple[BertEncoder, MaskedLM, dict]:
    """Train the encoder with masked-language modelling on Debian's license texts."""
    torch.manual_seed(zoo.SEED)
    texts, vocab = license_tokens()
    index = {t: i for i, t in enumerate(vocab)}
    unk = BERT_SPECIALS.index("[UNK]")

    def encode(tokens):
        return np.array([index.get(t, unk) for t in tokens], np.int64)

    train_stream = np.concatenate([encode(t) for name, t in texts.items() if name != BERT_HELD_OUT])
    held_stream = encode(texts[BERT_HELD_OUT])
    encoder = BertEncoder()
    mlm = MaskedLM(encoder)
    rng = np.random.default_rng(zoo.SEED + 3)

    def batch(_step: int):
        ids, mask, types = sentence_pairs(train_stream, rng, 32)
        corrupted, labels = mask_tokens(ids, mask, rng)
        return tuple(torch.from_numpy(a) for a in (corrupted, mask, types)), torch.from_numpy(labels)

    def loss(logits, labels):
        return F.cross_entropy(logits.reshape(-1, BERT_VOCAB), labels.reshape(-1), ignore_index=-100)

    fit("bert_encoder", mlm, batch, loss, steps=BERT_STEPS, lr=2e-3, weight_decay=0.01)
    held_rng = np.random.default_rng(zoo.SEED + 103)
    ids, mask, types = sentence_pairs(held_stream, held_rng, 500)
    corrupted, labels = mask_tokens(ids, mask, held_rng)
    info = {"held_out": (corrupted, mask, types, labels), "vocab_size_in_text": len(vocab),
            "train_tokens": int(len(train_stream)), "held_out_tokens": int(len(held_stream)),
            "unk_rate_held_out": float(np.mean(held_stream == unk))}
    return encoder, mlm, info


def bert_mlm_accuracy(mlm: MaskedLM, last_hidden_state: np.ndarray, labels: np.ndarray) -> float:
    """Masked-token top-1 accuracy, the MLM head (not exported) applied to the ONNX encoder's output."""
    with torch.no_grad():
        logits = mlm.head(torch.from_numpy(last_hidden_state)).numpy()
    picked = labels != -100
    return float((logits.argmax(-1)[picked] == labels[picked]).mean() * 100)


BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
BERT_OUTPUTS = ["last_hidden_state", "pooler_output"]


def bert_probes() -> list[Probe]:
    def probe(batch: int, seq: int) -> Probe:
        return Probe({"input_ids": {"shape": [batch, seq], "low": 0, "high": BERT_VOCAB},
                      "attention_mask": {"shape": [batch, seq], "value": 1},
                      "token_type_ids": {"shape": [batch, seq], "low": 0, "high": 2}})
    return [probe(1, 16), probe(2, 128)]


def bert_quality(proto: onnx.ModelProto, mlm: MaskedLM, info: dict) -> dict:
    corrupted, mask, types, labels = info["held_out"]
    hidden = run_ort(proto, {"input_ids": corrupted, "attention_mask": mask, "token_type_ids": types})[0]
    picked = labels != -100
    # Vocabulary rows after the specials are ordered by training frequency: row 5 is the commonest token.
    baseline = float((labels[picked] == len(BERT_SPECIALS)).mean() * 100)
    return {"masked_token_accuracy_percent": round(bert_mlm_accuracy(mlm, hidden, labels), 2),
            "most_frequent_token_baseline_percent": round(baseline, 2),
            "eval": f"500 padded sentence pairs from the held-out {BERT_HELD_OUT} text, 15% masked; the "
                    "(unexported) MLM head applied to onnxruntime's last_hidden_state"}


def bert_training_note(info: dict) -> str:
    return (f"masked-LM, 2500 steps x 32 sentence pairs (<= 32 tokens, padded) from Debian's "
            f"/usr/share/common-licenses texts except {BERT_HELD_OUT} ({info['train_tokens']} tokens, word-level "
            f"vocabulary of {BERT_VOCAB} incl. 5 specials); AdamW one-cycle")


BERT_TRAP = ("int64 input_ids / attention_mask / token_type_ids with dynamic batch and sequence; "
             f"Gather tables bound the ids (word {BERT_VOCAB} rows, position {BERT_POSITIONS}: sequence <= "
             f"{BERT_POSITIONS}, token type 2 rows)")


def build_bert_encoder() -> list[Built]:
    encoder, mlm, info = trained_bert()
    example = (torch.zeros(1, 16, dtype=torch.long), torch.ones(1, 16, dtype=torch.long),
               torch.zeros(1, 16, dtype=torch.long))
    axes = {n: {0: "batch", 1: "sequence"} for n in BERT_INPUTS + ["last_hidden_state"]}
    axes["pooler_output"] = {0: "batch"}
    proto = export_torchscript(encoder, example, BERT_INPUTS, BERT_OUTPUTS, axes)
    diff = verify_probes(proto, bert_probes(), torch_reference(encoder, BERT_INPUTS))
    return [Built("bert_encoder", proto, trap=BERT_TRAP,
                  exporter="torch.onnx TorchScript (dynamo=False)",
                  probes=bert_probes(), presets=["lossless", *ALL_LOSSY], params=count_params(encoder),
                  max_abs_diff=diff, quality=bert_quality(proto, mlm, info), training=bert_training_note(info))]


def export_bert_dynamo(model: nn.Module, output_names: list[str]) -> onnx.ModelProto:
    """torch.onnx's dynamo export of a BERT-style model (``BERT_INPUTS``, dynamic batch and sequence)."""
    example = (torch.randint(0, BERT_VOCAB, (2, 16)), torch.ones(2, 16, dtype=torch.long),
               torch.zeros(2, 16, dtype=torch.long))
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=BERT_POSITIONS)
    shapes = tuple({0: batch, 1: sequence} for _ in BERT_INPUTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, example, dynamo=True, input_names=BERT_INPUTS,
                                    output_names=output_names, dynamic_shapes=shapes, verbose=False)
    proto = program.model_proto
    zoo.strip_stack_traces(proto)
    fix_ir_version(proto)
    return proto


def build_bert_encoder_dynamo() -> list[Built]:
    encoder, mlm, info = trained_bert()
    proto = export_bert_dynamo(encoder, BERT_OUTPUTS)
    diff = verify_probes(proto, bert_probes(), torch_reference(encoder, BERT_INPUTS))
    return [Built("bert_encoder_dynamo", proto, trap=BERT_TRAP + "; dynamo's own dim names and ops",
                  exporter=f"torch.onnx dynamo (torch.export), default opset {zoo.opset_of(proto)}",
                  probes=bert_probes(), presets=["lossless", *ALL_LOSSY], params=count_params(encoder),
                  max_abs_diff=diff, quality=bert_quality(proto, mlm, info), training=bert_training_note(info))]


# --------------------------------------------------------------------------
# text_classifier (+ _dynamo): which license a token window comes from
# --------------------------------------------------------------------------

# Licenses with enough distinct text (GFDL-1.2 and LGPL-2 are near-copies of GFDL-1.3 and LGPL-2.1;
# GPL-2 / LGPL-2.1 / GPL-3 share whole passages, which keeps the task from being trivial).
TEXT_LICENSES = ("Apache-2.0", "Artistic", "CC0-1.0", "GFDL-1.3", "GPL-2", "GPL-3", "LGPL-2.1", "MPL-2.0")
TEXT_WINDOW = 32        # [CLS] + 15..31 tokens, padded
TEXT_BLOCK = 128        # held-out blocks of this many tokens
TEXT_HELD_OUT_EVERY = 5  # every 5th block of each license text: evaluation windows only
TEXT_MASK_RATE = 0.1    # training windows: this share of real tokens replaced by [MASK] (regularises)
TEXT_STEPS = 3000
TEXT_CALIBRATION = 256  # windows from the training part
TEXT_EVAL_PER_CLASS = 50
TEXT_OUTPUTS = ["logits"]


class TextClassifier(nn.Module):
    """The corpus BERT encoder (fresh weights) with a linear head on its pooler output -> logits."""

    def __init__(self, classes: int = len(TEXT_LICENSES)) -> None:
        super().__init__()
        self.encoder = BertEncoder()
        self.classifier = nn.Linear(BERT_HIDDEN, classes)
        bert_init(self.classifier)

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.classifier(self.encoder(input_ids, attention_mask, token_type_ids)[1])


def license_windows(segments: list[list[np.ndarray]], rng: np.random.Generator, per_class: int
                    ) -> dict[str, np.ndarray]:
    """``per_class`` windows of each license (a list of token segments, drawn by length): [CLS] + a run
    of 15..31 consecutive tokens of one segment, padded to TEXT_WINDOW; input_ids, attention_mask (1 on
    real tokens), token_type_ids (0) and labels."""
    count = per_class * len(segments)
    ids = np.zeros((count, TEXT_WINDOW), np.int64)
    mask = np.zeros_like(ids)
    labels = np.repeat(np.arange(len(segments), dtype=np.int64), per_class)
    for i, label in enumerate(labels):
        sizes = np.array([len(s) for s in segments[label]], np.float64)
        stream = segments[label][rng.choice(len(sizes), p=sizes / sizes.sum())]
        length = int(rng.integers(TEXT_WINDOW // 2 - 1, TEXT_WINDOW))
        start = int(rng.integers(0, len(stream) - length + 1))
        ids[i, 0] = BERT_SPECIALS.index("[CLS]")
        ids[i, 1:1 + length] = stream[start:start + length]
        mask[i, :1 + length] = 1
    order = rng.permutation(count)
    return {"input_ids": ids[order], "attention_mask": mask[order], "token_type_ids": np.zeros_like(ids),
            "labels": labels[order]}


def license_streams() -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Per license (TEXT_LICENSES order), its token ids cut into blocks of TEXT_BLOCK tokens: every
    TEXT_HELD_OUT_EVERY-th block is held out (evaluation), the rest, merged where consecutive, train.
    Interleaved blocks keep both parts drawn from the whole text (a license's last part is mostly its
    "how to apply" appendix). A window never crosses a block boundary into the other part."""
    texts, vocab = license_tokens()
    index = {t: i for i, t in enumerate(vocab)}
    unk = BERT_SPECIALS.index("[UNK]")
    train, held = [], []
    for name in TEXT_LICENSES:
        ids = np.array([index.get(t, unk) for t in texts[name]], np.int64)
        blocks = [ids[i:i + TEXT_BLOCK] for i in range(0, len(ids), TEXT_BLOCK)]
        blocks = [b for b in blocks if len(b) >= TEXT_WINDOW]
        is_held = [k % TEXT_HELD_OUT_EVERY == TEXT_HELD_OUT_EVERY - 1 for k in range(len(blocks))]
        held.append([b for b, h in zip(blocks, is_held) if h])
        runs: list[list[np.ndarray]] = [[]]
        for b, h in zip(blocks, is_held):
            if h:
                runs.append([])
            else:
                runs[-1].append(b)
        train.append([np.concatenate(r) for r in runs if r])
    return train, held


@cache
def trained_text_classifier() -> tuple[TextClassifier, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train from scratch on windows of the training blocks of each license; returns the model, the
    calibration windows (training part) and the evaluation windows (held-out part)."""
    torch.manual_seed(zoo.SEED)
    train, held = license_streams()
    model = TextClassifier()
    rng = np.random.default_rng(zoo.SEED + 5)

    def batch(_step: int):
        w = license_windows(train, rng, 4)
        drop = (rng.random(w["input_ids"].shape) < TEXT_MASK_RATE) & (w["input_ids"] >= len(BERT_SPECIALS))
        w["input_ids"][drop] = BERT_SPECIALS.index("[MASK]")
        return (tuple(torch.from_numpy(w[n]) for n in BERT_INPUTS), torch.from_numpy(w["labels"]))

    fit("text_classifier", model, batch, F.cross_entropy, steps=TEXT_STEPS, lr=2e-3, weight_decay=0.01)
    calib = license_windows(train, np.random.default_rng(zoo.SEED + 105), TEXT_CALIBRATION // len(TEXT_LICENSES))
    evaluation = license_windows(held, np.random.default_rng(zoo.SEED + 106), TEXT_EVAL_PER_CLASS)
    return model, calib, evaluation


def text_accuracy(proto: onnx.ModelProto, data: dict[str, np.ndarray]) -> float:
    logits = run_ort(proto, {n: data[n] for n in BERT_INPUTS})[0]
    return round(float((logits.argmax(1) == data["labels"]).mean() * 100), 2)


TEXT_DATA_FILES = ["models/corpus/text_classifier_calib.npz", "models/corpus/text_classifier_eval.npz"]
TEXT_TRAP = ("a classifier on a BERT encoder: " + BERT_TRAP + "; one logits output [batch, 8]")


def text_built(name: str, proto: onnx.ModelProto, exporter: str) -> Built:
    model, calib, evaluation = trained_text_classifier()
    diff = verify_probes(proto, bert_probes(), torch_reference(model, BERT_INPUTS))
    for path, data in zip(TEXT_DATA_FILES, (calib, evaluation), strict=True):
        zoo.write_npz_if_changed(zoo.REPO / path, **data)
    return Built(
        name, proto, trap=TEXT_TRAP, exporter=exporter, probes=bert_probes(), presets=["lossless", *ALL_LOSSY],
        params=count_params(model), max_abs_diff=diff,
        quality={"accuracy_percent": text_accuracy(proto, evaluation),
                 "chance_percent": round(100 / len(TEXT_LICENSES), 2),
                 "eval": f"{len(evaluation['labels'])} windows ({TEXT_EVAL_PER_CLASS} per license) of the held-out "
                         f"blocks (every {TEXT_HELD_OUT_EVERY}th block of {TEXT_BLOCK} tokens) of each license text, "
                         "text_classifier_eval.npz (onnxruntime)"},
        training=f"from scratch, {TEXT_STEPS} steps x 32 windows ([CLS] + 15..31 tokens, padded to {TEXT_WINDOW}, "
                 f"{TEXT_MASK_RATE:.0%} of tokens masked) of the training blocks of "
                 f"/usr/share/common-licenses/{{{','.join(TEXT_LICENSES)}}}, label = which license, "
                 "bert_encoder's vocabulary, cross-entropy, AdamW one-cycle; "
                 f"text_classifier_calib.npz: {TEXT_CALIBRATION} windows of the training part",
        data_files=TEXT_DATA_FILES)


def build_text_classifier() -> list[Built]:
    model, _, _ = trained_text_classifier()
    example = (torch.zeros(1, 16, dtype=torch.long), torch.ones(1, 16, dtype=torch.long),
               torch.zeros(1, 16, dtype=torch.long))
    axes = {n: {0: "batch", 1: "sequence"} for n in BERT_INPUTS}
    axes["logits"] = {0: "batch"}
    proto = export_torchscript(model, example, BERT_INPUTS, TEXT_OUTPUTS, axes)
    return [text_built("text_classifier", proto, "torch.onnx TorchScript (dynamo=False)")]


def build_text_classifier_dynamo() -> list[Built]:
    model, _, _ = trained_text_classifier()
    proto = export_bert_dynamo(model, TEXT_OUTPUTS)
    return [text_built("text_classifier_dynamo", proto,
                       f"torch.onnx dynamo (torch.export), default opset {zoo.opset_of(proto)}")]


def in_scratch_dir(fn: Callable, *args, **kwargs):
    """Run fn with the cwd in a private temporary directory (onnxruntime's tools write scratch files there)."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="make_corpus_") as tmp:
        os.chdir(tmp)
        try:
            return fn(Path(tmp), *args, **kwargs)
        finally:
            os.chdir(old)


def build_contrib_ops() -> list[Built]:
    from onnxruntime.transformers.optimizer import optimize_model

    encoder, mlm, info = trained_bert()
    source = CORPUS_DIR / "bert_encoder.onnx"
    if not source.exists():
        raise SystemExit("contrib_ops needs models/corpus/bert_encoder.onnx: build bert_encoder first")

    def optimize(tmp: Path) -> onnx.ModelProto:
        copy = tmp / "bert_encoder.onnx"
        shutil.copy(source, copy)
        optimized = optimize_model(str(copy), model_type="bert", num_heads=BERT_HEADS, hidden_size=BERT_HIDDEN,
                                   opt_level=0)
        optimized.save_model_to_file(str(tmp / "optimized.onnx"))  # adds the com.microsoft opset import
        return onnx.load(tmp / "optimized.onnx")

    proto = in_scratch_dir(optimize)
    fix_ir_version(proto)
    contrib = sorted({n.op_type for n in proto.graph.node if n.domain == "com.microsoft"})
    if not contrib:
        raise AssertionError("optimize_model fused no com.microsoft op")
    diff = verify_probes(proto, bert_probes(), torch_reference(encoder, BERT_INPUTS))
    return [Built("contrib_ops", proto,
                  trap=f"com.microsoft contrib ops ({', '.join(contrib)}) that graphopt must leave alone",
                  exporter="bert_encoder.onnx after onnxruntime.transformers.optimizer.optimize_model("
                           f"model_type='bert', num_heads={BERT_HEADS}, hidden_size={BERT_HIDDEN}, opt_level=0)",
                  probes=bert_probes(), presets=["lossless"], params=count_params(encoder), max_abs_diff=diff,
                  quality=bert_quality(proto, mlm, info), training=bert_training_note(info))]


# --------------------------------------------------------------------------
# 4. vad_stream: streaming GRU with state, scalar sample rate and an If
# --------------------------------------------------------------------------

VAD_CHUNK, VAD_HIDDEN = 512, 64


class VADFrontend(nn.Module):
    """Learned filterbank whose window and hop follow the sample rate:
    16 kHz -> 4 ms window, 2 ms hop; else (8 kHz) the same durations in samples."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Conv1d(1, 32, 64, stride=32)
        self.narrow = nn.Conv1d(1, 32, 32, stride=16)

    def forward(self, x: torch.Tensor, sr: torch.Tensor) -> torch.Tensor:
        if bool(sr == 16000):
            y = self.wide(x)
        else:
            y = self.narrow(x)
        return y


class VADStream(nn.Module):
    """One chunk step: (input [1, 512], state [2, 1, 64], sr scalar) -> (prob [1, 1], state [2, 1, 64])."""

    def __init__(self) -> None:
        super().__init__()
        self.frontend = VADFrontend()
        self.encoder = nn.Conv1d(32, VAD_HIDDEN, 3, padding=1)
        self.rnn = nn.GRU(VAD_HIDDEN, VAD_HIDDEN, num_layers=2)
        self.decoder = nn.Linear(VAD_HIDDEN, 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor, sr: torch.Tensor):
        features = torch.relu(self.encoder(torch.relu(self.frontend(x.unsqueeze(1), sr))))
        out, new_state = self.rnn(features.mean(dim=2).unsqueeze(0), state)
        return torch.sigmoid(self.decoder(out[0])), new_state


def vad_chunks(count: int, rng: np.random.Generator) -> np.ndarray:
    """Consecutive 512-sample chunks of a noisy tone burst (float32 in [-1, 1]): [count, 1, 512]."""
    t = np.arange(count * VAD_CHUNK) / 16000.0
    envelope = (np.sin(2 * np.pi * 1.5 * t) > 0).astype(np.float64)
    signal = 0.5 * envelope * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.shape)
    return np.clip(signal, -1, 1).astype(np.float32).reshape(count, 1, VAD_CHUNK)


def build_vad_stream() -> list[Built]:
    # Scripted, not traced: tracing would bake in the branch of the example's sample rate.
    model = torch.jit.script(VADStream().eval())
    names = (["input", "state", "sr"], ["output", "stateN"])
    example = (torch.zeros(1, VAD_CHUNK), torch.zeros(2, 1, VAD_HIDDEN), torch.tensor(16000))
    proto = export_torchscript(model, example, *names, dynamic_axes=None)
    if not any(n.op_type == "If" for n in proto.graph.node):
        raise AssertionError("vad_stream: the exporter wrote no If node")

    def probe(sr: int) -> Probe:
        return Probe({"input": {"shape": [1, VAD_CHUNK]}, "state": {"shape": [2, 1, VAD_HIDDEN]},
                      "sr": {"shape": [], "value": sr}})

    probes = [probe(16000), probe(8000)]
    diff = verify_probes(proto, probes, torch_reference(model, names[0]))
    chunks = vad_chunks(6, np.random.default_rng(zoo.SEED + 4))
    states = [np.zeros((2, 1, VAD_HIDDEN), np.float32)]
    session = zoo.ort_session(proto.SerializeToString())
    for chunk in chunks[:-1]:
        states.append(session.run(None, {"input": chunk, "state": states[-1], "sr": np.array(16000)})[1])
    data = CORPUS_DIR / "vad_stream.npz"
    zoo.write_npz_if_changed(data, input=chunks, state=np.stack(states), **{"shared/sr": np.array(16000)})
    return [Built(
        "vad_stream", proto,
        trap="streaming step: rank-0 int64 sr input feeding an If (16 kHz vs 8 kHz frontend), recurrent state "
             "[2, 1, 64] in and out with its own leading axis, chunk [1, 512]; no dynamic dims",
        exporter="torch.jit.script model exported with torch.onnx TorchScript (dynamo=False): the frontend's "
                 "if on sr becomes an ONNX If; the 2-layer GRU is two GRU nodes on slices of state",
        probes=probes, presets=["lossless", "compress"], params=count_params(model), max_abs_diff=diff,
        data_files=[str(data.relative_to(zoo.REPO))],
        notes="vad_stream.npz: 6 consecutive chunks of a noisy tone burst: input [6, 1, 512], state [6, 2, 1, 64] "
              "(zeros, then each step's stateN), shared/sr = 16000 (fed unchanged with every sample)")]


# --------------------------------------------------------------------------
# 5. yolo_detector
# --------------------------------------------------------------------------

YOLO_CLASSES, YOLO_ANCHORS = 4, 3


def conv_silu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return zoo.conv_bn(cin, cout, kernel, stride, act=nn.SiLU)


class YOLODetector(nn.Module):
    """Backbone to stride 32, FPN neck (Upsample x2 + Concat), three 1x1 heads at
    strides 8/16/32, decoded as YOLOv5 exports do: [batch, anchors, 5 + classes]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_silu(3, 8, stride=2), conv_silu(8, 16, stride=2), conv_silu(16, 16))
        self.p3 = conv_silu(16, 32, stride=2)
        self.p4 = conv_silu(32, 64, stride=2)
        self.p5 = nn.Sequential(conv_silu(64, 96, stride=2), conv_silu(96, 96))
        self.reduce5 = conv_silu(96, 48, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.merge4 = conv_silu(48 + 64, 48)
        self.reduce4 = conv_silu(48, 32, 1)
        self.merge3 = conv_silu(32 + 32, 32)
        outputs = YOLO_ANCHORS * (5 + YOLO_CLASSES)
        self.heads = nn.ModuleList([nn.Conv2d(c, outputs, 1) for c in (32, 48, 96)])

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x = x.view(b, YOLO_ANCHORS, 5 + YOLO_CLASSES, h, w).permute(0, 1, 3, 4, 2)
        return x.reshape(b, -1, 5 + YOLO_CLASSES).sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c3 = self.p3(self.stem(x))
        c4 = self.p4(c3)
        c5 = self.p5(c4)
        r5 = self.reduce5(c5)
        n4 = self.merge4(torch.cat([self.up(r5), c4], 1))
        n3 = self.merge3(torch.cat([self.up(self.reduce4(n4)), c3], 1))
        return torch.cat([self.decode(head(f)) for head, f in zip(self.heads, (n3, n4, c5))], 1)


def build_yolo_detector() -> list[Built]:
    model = YOLODetector().eval()
    names = (["images"], ["output"])
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch", 1: "anchors"}}
    proto = export_torchscript(model, (torch.zeros(1, 3, 64, 64),), *names, axes)
    probes = [Probe({"images": {"shape": [1, 3, 64, 64]}}), Probe({"images": {"shape": [1, 3, 96, 128]}})]
    diff = verify_probes(proto, probes, torch_reference(model, names[0]))
    return [Built(
        "yolo_detector", proto,
        trap="dynamic height and width, three heads at strides 8/16/32 (probes: multiples of 32), SiLU as "
             "Sigmoid*Mul, Upsample (Resize) + Concat neck, run-time Shape->Reshape decode, Concat of heads; the "
             "exporter writes the output's fixed last dim (5 + classes = 9) as a dim_param",
        exporter="torch.onnx TorchScript (dynamo=False), eval export (BN folded)",
        probes=probes, presets=["lossless", *ALL_LOSSY], params=count_params(model), max_abs_diff=diff)]


# --------------------------------------------------------------------------
# 6. nhwc_tf, 7. minus_one_dims, 8. fp16, 9. qdq_int8: Fashion-MNIST classifiers
# --------------------------------------------------------------------------


class NHWCNet(nn.Module):
    """A Keras-style CNN as tf2onnx writes it: NHWC input, Transpose -> Conv -> Transpose around
    every conv (stride-2 convs, no pooling), bias/scale/ReLU in NHWC, Reshape + MatMul + Add dense.

    Every conv is followed by an element-wise op in NHWC, so the exporter's peephole cannot cancel
    a Transpose pair between two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.scale = nn.Parameter(torch.ones(32))   # a BN folded to scale and offset, applied in NHWC
        self.offset = nn.Parameter(torch.zeros(32))
        self.dense_w = nn.Parameter(torch.randn(7 * 7 * 32, 10) * 0.02)
        self.dense_b = nn.Parameter(torch.zeros(10))

    @staticmethod
    def nchw_op(op: Callable, x: torch.Tensor) -> torch.Tensor:
        return op(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.nchw_op(self.conv1, x))                                # [b, 14, 14, 16]
        y = torch.relu(self.nchw_op(self.conv2, y) * self.scale + self.offset)    # [b, 7, 7, 32]
        return y.reshape(-1, 7 * 7 * 32) @ self.dense_w + self.dense_b


class SmallCNN(nn.Module):
    """3-channel conv/BN/ReLU classifier with global pooling (any H x W >= 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(zoo.conv_bn(3, 16), nn.MaxPool2d(2), zoo.conv_bn(16, 32), nn.MaxPool2d(2),
                                      zoo.conv_bn(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def fit_classifier(name: str, model: nn.Module, to_input: Callable, epochs: int) -> None:
    """Cross-entropy on Fashion-MNIST train, seeded batches of 128."""
    data = fashion_mnist()
    x_all, y_all = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    per_epoch = len(x_all) // 128
    gen = torch.Generator().manual_seed(zoo.SEED)
    orders = [torch.randperm(len(x_all), generator=gen) for _ in range(epochs)]

    def batch(step: int):
        idx = orders[step // per_epoch][(step % per_epoch) * 128:(step % per_epoch + 1) * 128]
        return (to_input(x_all[idx]),), y_all[idx]

    fit(name, model, batch, F.cross_entropy, steps=epochs * per_epoch, lr=3e-3)


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous()


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1).contiguous()


def onnx_accuracy(proto: onnx.ModelProto, input_name: str, x: np.ndarray) -> float:
    logits = np.concatenate([run_ort(proto, {input_name: x[i:i + 500]})[0] for i in range(0, len(x), 500)])
    return round(float((logits.argmax(1) == eval_set()["labels"]).mean() * 100), 2)


EVAL_NOTE = "top-1 percent on models/fmnist_eval.npz (2,000 test images, onnxruntime)"


def rename_dim_params(proto: onnx.ModelProto, mapping: dict[str, str]) -> None:
    """Rename dim_params on every graph input, output and value_info."""
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in mapping:
                dim.dim_param = mapping[dim.dim_param]


def build_nhwc_tf() -> list[Built]:
    torch.manual_seed(zoo.SEED)
    model = NHWCNet()
    fit_classifier("nhwc_tf", model, to_nhwc, epochs=2)
    names = (["input_1"], ["dense"])
    proto = export_torchscript(model, (torch.zeros(1, 28, 28, 1),), *names,
                               {"input_1": {0: "batch"}, "dense": {0: "batch_out"}}, opset=TF2ONNX_OPSET)
    # tf2onnx names every unknown dim on its own, so input and output batch do not share a name.
    rename_dim_params(proto, {"batch": "unk__123", "batch_out": "unk__124"})
    probes = [Probe({"input_1": {"shape": [1, 28, 28, 1]}}), Probe({"input_1": {"shape": [3, 28, 28, 1]}})]
    diff = verify_probes(proto, probes, torch_reference(model, names[0]))
    nhwc_eval = np.ascontiguousarray(eval_set()["input"].transpose(0, 2, 3, 1))
    return [Built(
        "nhwc_tf", proto,
        trap="tf2onnx-style NHWC: input [unk__123, 28, 28, 1], Transpose -> Conv -> Transpose around "
             "every conv, scale/offset/ReLU in NHWC, Reshape + MatMul + Add dense; input and output batch "
             "dims carry different unk__ names",
        exporter=f"torch.onnx TorchScript (dynamo=False), opset {TF2ONNX_OPSET} (tf2onnx's default), NHWC written "
                 "in the torch model; dim names rewritten to tf2onnx's unk__N (torch cannot run TF)",
        probes=probes, presets=["lossless", *ALL_LOSSY], params=count_params(model), max_abs_diff=diff,
        quality={"accuracy_percent": onnx_accuracy(proto, "input_1", nhwc_eval), "eval": EVAL_NOTE},
        training="2 epochs of Fashion-MNIST train (NHWC), AdamW one-cycle")]


@cache
def trained_small_cnn() -> SmallCNN:
    torch.manual_seed(zoo.SEED)
    model = SmallCNN()
    fit_classifier("small_cnn", model, to_rgb, epochs=2)
    return model


def set_minus_one_dims(proto: onnx.ModelProto) -> int:
    """Paddle's form: every dim_param (and unknown dim) on inputs, outputs and value_info becomes dim_value -1.
    Returns how many dims were rewritten."""
    count = 0
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = -1  # clears dim_param (a oneof)
                count += 1
    return count


SMALL_CNN_TRAINING = "2 epochs of Fashion-MNIST train (grey copied to 3 channels), AdamW one-cycle"


def build_minus_one_dims() -> list[Built]:
    model = trained_small_cnn()
    names = (["x"], ["save_infer_model/scale_0.tmp_0"])
    axes = {"x": {0: "batch", 2: "height", 3: "width"}, names[1][0]: {0: "batch"}}
    proto = export_torchscript(model, (torch.zeros(1, 3, 28, 28),), *names, axes, opset=PADDLE_OPSET)
    # paddle2onnx writes value_info for intermediate tensors too: infer them, then write -1 everywhere.
    proto = onnx.shape_inference.infer_shapes(proto)
    rewritten = set_minus_one_dims(proto)
    probes = [Probe({"x": {"shape": [1, 3, 28, 28]}}), Probe({"x": {"shape": [2, 3, 40, 56]}})]
    # full_check runs strict shape inference, which rejects -1 dims; the structural check passes.
    diff = verify_probes(proto, probes, torch_reference(model, names[0]), full_check=False)
    rgb_eval = np.ascontiguousarray(np.repeat(eval_set()["input"], 3, axis=1))
    return [Built(
        "minus_one_dims", proto,
        trap=f"Paddle-style dynamic dims stored as dim_value -1 ({rewritten} dims on inputs, outputs and "
             "value_info): x [-1, 3, -1, -1]; onnx.checker's full_check (strict shape inference) rejects them",
        exporter=f"torch.onnx TorchScript (dynamo=False), opset {PADDLE_OPSET}, eval export (BN folded); "
                 "dim_params then rewritten to -1 as paddle2onnx writes them",
        probes=probes, presets=["lossless", *ALL_LOSSY], params=count_params(model), max_abs_diff=diff,
        quality={"accuracy_percent": onnx_accuracy(proto, "x", rgb_eval), "eval": EVAL_NOTE + ", 3-channel copy"},
        training=SMALL_CNN_TRAINING)]


def build_fp16() -> list[Built]:
    import copy

    model = copy.deepcopy(trained_small_cnn()).half().eval()
    names = (["input"], ["logits"])
    axes = {"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}
    proto = export_torchscript(model, (torch.zeros(1, 3, 28, 28, dtype=torch.float16),), *names, axes)
    probes = [Probe({"input": {"shape": [1, 3, 28, 28]}}), Probe({"input": {"shape": [2, 3, 32, 48]}})]
    float_model = trained_small_cnn()

    @torch.no_grad()
    def reference(feeds):  # fp32 torch on the same (fp16) inputs
        return [float_model(torch.from_numpy(feeds["input"]).float()).numpy()]

    diff = verify_probes(proto, probes, reference, tolerance=MAX_ABS_DIFF_FP16)
    rgb_eval = np.repeat(eval_set()["input"], 3, axis=1).astype(np.float16)
    return [Built(
        "fp16", proto,
        trap="float16 weights, activations and IO (float16 initializers; random float32 feeds are refused)",
        exporter="torch model .half() exported with torch.onnx TorchScript (dynamo=False), eval export (BN folded)",
        probes=probes, presets=["lossless", *ALL_LOSSY], params=count_params(model), max_abs_diff=diff,
        quality={"accuracy_percent": onnx_accuracy(proto, "input", rgb_eval),
                 "float32_accuracy_percent": onnx_accuracy(
                     export_torchscript(float_model, (torch.zeros(1, 3, 28, 28),), *names, axes), "input",
                     rgb_eval.astype(np.float32)),
                 "eval": EVAL_NOTE + ", 3-channel copy; max_abs_diff is against the float32 torch model"},
        training=SMALL_CNN_TRAINING + " (in float32; the trained model is cast to half)")]


QDQ_SOURCE = zoo.MODELS_DIR / "variants" / "resnet.bn_folded.onnx"
QDQ_CALIBRATION = 128


def build_qdq_int8() -> list[Built]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with np.load(zoo.MODELS_DIR / "fmnist_calib.npz") as f:
        calib = f["input"][:QDQ_CALIBRATION]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {"input": row}

    def quantize(tmp: Path) -> onnx.ModelProto:
        shutil.copy(QDQ_SOURCE, tmp / "float.onnx")
        quant_pre_process(str(tmp / "float.onnx"), str(tmp / "pre.onnx"))
        quantize_static(str(tmp / "pre.onnx"), str(tmp / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return onnx.load(tmp / "qdq.onnx")

    proto = in_scratch_dir(quantize)
    fix_ir_version(proto)
    probes = [Probe({"input": {"shape": [1, 1, 28, 28]}}), Probe({"input": {"shape": [4, 1, 28, 28]}})]
    verify_probes(proto, probes, reference=None)
    x = eval_set()["input"]
    entry = next(e for e in json.loads((zoo.MODELS_DIR / "zoo.json").read_text())["models"]
                 if e["file"] == str(QDQ_SOURCE.relative_to(zoo.REPO)))
    return [Built(
        "qdq_int8", proto,
        trap="QDQ int8: QuantizeLinear/DequantizeLinear pairs around every Conv/Gemm, int8 weights with "
             "per-channel scales (axis 0)",
        exporter=f"{QDQ_SOURCE.relative_to(zoo.REPO)} -> onnxruntime.quantization quant_pre_process -> "
                 f"quantize_static(QDQ, per_channel=True, QInt8 activations and weights, MinMax on "
                 f"{QDQ_CALIBRATION} images of models/fmnist_calib.npz)",
        probes=probes, presets=["lossless"], params=entry["params"], max_abs_diff=None,
        quality={"accuracy_percent": onnx_accuracy(proto, "input", x),
                 "float_accuracy_percent": entry["test_accuracy"], "eval": EVAL_NOTE},
        training="the zoo's resnet (see models/zoo.json), quantized without retraining")]


# --------------------------------------------------------------------------
# Manifest, README and main
# --------------------------------------------------------------------------

BUILDERS: dict[str, Callable[[], list[Built]]] = {
    "db_detector": build_db_detector,
    "crnn": build_crnn,
    "bert_encoder": build_bert_encoder,
    "bert_encoder_dynamo": build_bert_encoder_dynamo,
    "vad_stream": build_vad_stream,
    "yolo_detector": build_yolo_detector,
    "nhwc_tf": build_nhwc_tf,
    "minus_one_dims": build_minus_one_dims,
    "fp16": build_fp16,
    "qdq_int8": build_qdq_int8,
    "contrib_ops": build_contrib_ops,
    "text_classifier": build_text_classifier,
    "text_classifier_dynamo": build_text_classifier_dynamo,
}


def load_entries() -> list[dict]:
    return json.loads(MANIFEST.read_text())["models"] if MANIFEST.exists() else []


def write_manifest(entries: list[dict]) -> None:
    order = {name: i for i, name in enumerate(BUILDERS)}
    entries = sorted(entries, key=lambda e: order[e["name"]])
    manifest = {
        "description": "graphopt corpus of real-world ONNX forms, one trap each (issue 15); "
                       "regenerate with python tools/make_corpus.py",
        "probes": "each probe gives per input its concrete shape and, for integer inputs, a range [low, high) "
                  "or a fixed value; float inputs are N(0, 1). Every file was verified at each probe.",
        "npz_convention": "a key equal to an input name whose array has rank = input rank + 1 holds one feed per "
                          "sample along axis 0; a key shared/<input> holds one array fed with every sample",
        "models": entries,
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")


def format_dims(value: dict) -> str:
    dims = ", ".join("?" if d is None else str(d) for d in value["dims"])
    return f"`{value['name']}` {value['dtype']} [{dims}]"


def readme_section(entries: list[dict]) -> str:
    rows = ["| file | trap | inputs | outputs | opset | size | quality |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        quality = ", ".join(f"{k} {v}" for k, v in e["quality"].items() if k != "eval") or "untrained"
        rows.append(f"| `{Path(e['file']).name}` | {e['trap']} | {'<br>'.join(map(format_dims, e['inputs']))} | "
                    f"{'<br>'.join(map(format_dims, e['outputs']))} | {e['opset']} | "
                    f"{e['file_bytes'] / 1024:.0f} KiB | {quality} |")
    exporters = ["| file | made by | presets that apply | training |", "|---|---|---|---|"]
    for e in entries:
        exporters.append(f"| `{Path(e['file']).name}` | {e['exporter']} | {', '.join(e['presets'])} | "
                         f"{e['training']} |")
    return CORPUS_README.format(table="\n".join(rows), exporters="\n".join(exporters))


CORPUS_README = """\
## Corpus of real-world forms (`corpus/`)

Small models in the forms that exporters in the field write, each chosen for
a trap an optimizer meets on real models (issue 15). Generated by
`tools/make_corpus.py` (do not edit by hand); `corpus/corpus.json` is the
manifest: per model the file, its trap, exporter, opset, inputs and outputs
with dtype and dims as written (a string is a dim_param, -1 is written as -1,
null is a dim with neither), params, op counts, file bytes, sha256, the
graphopt presets that apply, the probe shapes it was verified at (onnx.checker
and onnxruntime with optimizations off at two shapes of its dynamic dims,
against torch where there is a torch model) and quality figures where trained.

{table}

{exporters}

`corpus/vad_stream.npz` holds consecutive chunks of a streaming model with
state, in the sample convention: a key equal to an input name whose array
has rank = input rank + 1 holds one full feed per sample along its first axis
(`input` [6, 1, 512], `state` [6, 2, 1, 64]); a key `shared/<input name>`
holds one array fed unchanged with every sample (`shared/sr` = 16000).

```
python tools/make_corpus.py                  # whole corpus (~17 min, 1 thread)
python tools/make_corpus.py --only crnn      # one model
pytest tests/test_corpus_models.py           # checks every file against corpus.json
```
"""


def write_readme(entries: list[dict]) -> None:
    """Replace (or append) the corpus section of models/README.md, after the marker."""
    path = zoo.MODELS_DIR / "README.md"
    head = path.read_text().split(README_MARKER)[0].rstrip("\n")
    path.write_text(f"{head}\n\n{README_MARKER}\n{readme_section(entries)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(BUILDERS), action="append",
                        help="build only this model (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    zoo.configure_torch()
    torch.set_num_threads(1)
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    names = args.only or list(BUILDERS)
    entries = [e for e in load_entries() if e["name"] not in names]
    start = time.time()
    for name in names:
        print(f"== {name}", flush=True)
        torch.manual_seed(zoo.SEED)  # per model, so --only reproduces the full run
        for built in BUILDERS[name]():
            entries = [e for e in entries if e["name"] != built.name] + [save(built)]
        write_manifest(entries)  # keep progress if a later model fails
    write_readme(load_entries())
    total = sum(p.stat().st_size for p in CORPUS_DIR.iterdir() if p.is_file())
    print(f"done in {time.time() - start:.0f}s; models/corpus holds {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
