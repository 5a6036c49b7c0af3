"""Lossy pruning measured on real architectures (issue 16), judged independently of graphopt.

For each model and target (``--preset prune --target-macs 0.7`` and ``0.5``; the encoders also with
``--option prune_filters.attention=heads``) it runs the graphopt CLI in a subprocess (calibration on a
calibration set, graphopt's own verdict on the held-out set), then measures the written model itself:

* **MACs** by graphopt's report and by an independent count (:func:`count_macs`): the model's inputs fixed
  to a concrete shape, ``onnx.shape_inference`` with data propagation, where a shape is still unknown the
  shape onnxruntime produces at that input, and per-op formulas for Conv, ConvTranspose, Gemm and MatMul
  (attention's score and context MatMuls included). graphopt's analysis is not imported.
* **valid**: ``onnx.checker`` (full check) and an onnxruntime session.
* **similarity** per output on the held-out inputs: SNR in dB over all samples and the worst per-sample
  cosine, pruned against original.
* **latency**: original / pruned (``tools/bench_pair.py``'s A/B: ORT_ENABLE_ALL, one intra-op thread, no
  spinning, alternating order, median of runs; the median of ``--rounds`` rounds).
* **task**: accuracy for the classifiers (text classifier on held-out license windows, the ViT on
  ``fmnist_eval.npz``), masked-token accuracy for ``bert_encoder`` (the MLM head is retrained with
  ``tools/make_corpus.py``'s seeded recipe, about two minutes, and used only if the retrained encoder
  reproduces the committed ONNX file), and for ``db_detector`` the mean IoU of the pruned map > 0.5
  against the original's on make_corpus's 200 held-out canvases (and against the true masks).

    python tools/bench_real.py                          # every model, Markdown table on stdout
    python tools/bench_real.py --models db_detector --targets 0.7
    python tools/bench_real.py --markdown real.md --keep /tmp/real   # keep the pruned models

Run it niced: ``nice -n 10 python tools/bench_real.py``; the latency column is then noisy.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from bench import emit_table  # noqa: E402
from bench_pair import ab_seconds  # noqa: E402

CORPUS = ROOT / "models" / "corpus"
TARGETS = (0.7, 0.5)
HEADS = "prune_filters.attention=heads"
# make_corpus's held-out canvases for the detector: same seed offset, count and size as its quality figure.
DB_EVAL_SEED_OFFSET, DB_EVAL_COUNT, DB_SHAPE = 101, 200, (96, 128)
DB_CALIB_SEED_OFFSET, DB_CALIB_COUNT = 201, 64
BERT_CALIB_SEED_OFFSET, BERT_CALIB_COUNT = 203, 256


# --------------------------------------------------------------------------
# Independent MAC count
# --------------------------------------------------------------------------


def _fixed_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy whose graph inputs have the given concrete dims."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, shapes[value.name], strict=True):
                dim.Clear()
                dim.dim_value = int(size)
    return fixed


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every value's fully known shape after onnx's shape inference (with data propagation)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    out: dict[str, tuple[int, ...]] = {}
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    for value in values:
        t = value.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[value.name] = tuple(d.dim_value for d in t.shape.dim)
    for init in model.graph.initializer:
        out[init.name] = tuple(init.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = tuple(attr.t.dims)
    return out


def _observed_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]
                     ) -> dict[str, tuple[int, ...]]:
    """The shapes onnxruntime produces for ``names`` at ``feeds`` (optimizations off)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    wanted = [o.name for o in probe.graph.output]
    return {n: tuple(a.shape) for n, a in zip(wanted, session.run(wanted, feeds), strict=True) if n in names}


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_macs(node: onnx.NodeProto, shape: Callable[[str], tuple[int, ...]]) -> int:
    """Multiply-accumulates of one Conv / ConvTranspose / Gemm / MatMul node (0 for other ops).

    Conv: every output element takes ``C_in / group · prod(kernel)`` products. ConvTranspose: every input
    element is scattered into ``C_out / group · prod(kernel)`` outputs. Gemm: ``M · N · K``. MatMul: every
    output element is a dot product over A's last axis (numpy broadcasting, 1-D operands promoted).
    """
    op = node.op_type
    if op == "Conv":
        w = shape(node.input[1])
        return int(np.prod(shape(node.output[0]))) * int(np.prod(w[1:]))
    if op == "ConvTranspose":
        w = shape(node.input[1])  # [C_in, C_out / group, k...]
        return int(np.prod(shape(node.input[0]))) * int(np.prod(w[1:]))
    if op == "Gemm":
        a = shape(node.input[0])
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return int(np.prod(shape(node.output[0]))) * int(k)
    if op == "MatMul":
        a = shape(node.input[0])
        out = shape(node.output[0])
        return int(np.prod(out)) * int(a[-1]) if out else int(a[-1])
    return 0


COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
UNCOUNTED_MAC_OPS = ("Einsum", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "LSTM", "GRU", "RNN",
                     "Attention", "MultiHeadAttention")


@dataclass
class MacCount:
    macs: int
    by_op: dict[str, int]
    observed: list[str] = field(default_factory=list)  # values whose shape came from onnxruntime
    uncounted: list[str] = field(default_factory=list)  # nodes of MAC-bearing ops without a formula here


def count_macs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> MacCount:
    """MACs of ``model`` at the shapes of ``feeds`` (one run's inputs), independent of graphopt.

    Shapes come from ``onnx.shape_inference`` on a copy with the inputs fixed to the feeds' shapes; a
    value it leaves unknown (shape arithmetic it cannot follow) is taken from onnxruntime at the feeds.
    Nodes inside subgraphs (If / Loop bodies) are not counted; ops listed in UNCOUNTED_MAC_OPS are named.
    """
    fixed = _fixed_inputs(model, {k: v.shape for k, v in feeds.items()})
    shapes = _inferred_shapes(fixed)
    needed = [name for n in fixed.graph.node if n.op_type in COUNTED_OPS
              for name in [*n.input[:2], n.output[0]] if name and name not in shapes]
    observed = sorted(set(needed))
    if observed:
        shapes.update(_observed_shapes(fixed, feeds, observed))
    by_op: dict[str, int] = {}
    for node in fixed.graph.node:
        macs = node_macs(node, shapes.__getitem__)
        if macs:
            by_op[node.op_type] = by_op.get(node.op_type, 0) + macs
    uncounted = [n.name or n.op_type for n in fixed.graph.node if n.op_type in UNCOUNTED_MAC_OPS]
    return MacCount(sum(by_op.values()), by_op, observed, uncounted)


# --------------------------------------------------------------------------
# Similarity and task measures
# --------------------------------------------------------------------------


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """10 log10(Σ ref² / Σ (ref − other)²) over every element; inf when identical."""
    ref, diff = reference.astype(np.float64), reference.astype(np.float64) - other.astype(np.float64)
    noise = float(np.sum(diff * diff))
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref * ref) / noise))


def worst_cosine(reference: np.ndarray, other: np.ndarray) -> float:
    """The smallest cosine similarity between the two outputs of one sample (axis 0 = samples)."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = other.reshape(len(other), -1).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(denom > 0, np.sum(a * b, axis=1) / np.maximum(denom, 1e-300), 1.0)
    return float(cos.min())


def map_iou(prob: np.ndarray, reference: np.ndarray, threshold: float = 0.5) -> float:
    """Mean over images of |A ∩ B| / |A ∪ B| with A = prob > threshold, B = reference > threshold
    (two empty maps agree: IoU 1)."""
    a, b = prob > threshold, reference > threshold
    axes = tuple(range(1, a.ndim))
    inter, union = (a & b).sum(axis=axes), (a | b).sum(axis=axes)
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((scores.argmax(1) == labels).mean() * 100)


def run_model(path: Path | onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int = 50) -> list[np.ndarray]:
    """All outputs over the samples of ``feeds`` (stacked on axis 0), ``batch`` at a time, optimizations off."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    source = str(path) if isinstance(path, Path) else path.SerializeToString()
    session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    count = len(next(iter(feeds.values())))
    parts = [session.run(None, {k: v[i:i + batch] for k, v in feeds.items()}) for i in range(0, count, batch)]
    return [np.concatenate(outs) for outs in zip(*parts, strict=True)]


# --------------------------------------------------------------------------
# The models and their data
# --------------------------------------------------------------------------


@dataclass
class Case:
    """One model: where its data comes from and how its task is scored."""

    name: str
    path: Path
    data: Callable[[Path], tuple[Path, Path, dict[str, np.ndarray], np.ndarray | None]]
    task: str                      # what the task column measures
    encoder: bool = False          # also prune attention heads as units
    score: Callable[[list[np.ndarray], list[np.ndarray], np.ndarray | None], str] | None = None


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _split(data: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    return {k: v for k, v in data.items() if k != "labels"}, data.get("labels")


def _given(calib: Path, held: Path) -> Callable:
    def data(_tmp: Path):
        feeds, labels = _split(_npz(held))
        return calib, held, feeds, labels
    return data


@cache
def _make_corpus():
    import make_corpus  # torch and the Fashion-MNIST files: only for the cases that need them
    return make_corpus


def _db_data(tmp: Path):
    """make_corpus's 200 held-out 96x128 canvases (test items) to evaluate; 64 canvases of train items
    (another seed) to calibrate. Labels are the true masks."""
    mc = _make_corpus()
    raw = mc.fashion_mnist_raw()
    x, masks = mc.item_canvases(raw["test_x"], np.random.default_rng(mc.zoo.SEED + DB_EVAL_SEED_OFFSET),
                                DB_EVAL_COUNT, *DB_SHAPE)
    cx, _ = mc.item_canvases(raw["train_x"], np.random.default_rng(mc.zoo.SEED + DB_CALIB_SEED_OFFSET),
                             DB_CALIB_COUNT, *DB_SHAPE)
    calib, held = tmp / "db_calib.npz", tmp / "db_eval.npz"
    np.savez(calib, x=cx)
    np.savez(held, x=x)
    return calib, held, {"x": x}, masks


@cache
def _mlm():
    """make_corpus's masked-LM training rerun (seeded; ~2 min), kept only if its encoder reproduces the
    committed bert_encoder.onnx; returns (mlm, held-out (ids, mask, types, labels)) or (None, reason)."""
    import torch
    mc = _make_corpus()
    mc.zoo.configure_torch()
    torch.set_num_threads(1)
    encoder, mlm, info = mc.trained_bert()
    ids, mask, types, _ = info["held_out"]
    feeds = {"input_ids": ids[:64], "attention_mask": mask[:64], "token_type_ids": types[:64]}
    onnx_hidden = run_model(CORPUS / "bert_encoder.onnx", feeds)[0]
    with torch.no_grad():
        torch_hidden = encoder(*(torch.from_numpy(feeds[n]) for n in mc.BERT_INPUTS))[0].numpy()
    diff = float(np.abs(onnx_hidden - torch_hidden).max())
    if diff > 1e-3:
        return None, f"the retrained encoder differs from the committed file (max |diff| {diff:.2g})"
    return mlm, info["held_out"]


def _bert_data(tmp: Path):
    """Held out: make_corpus's 500 masked sentence pairs of the Apache-2.0 text (never trained on);
    calibration: masked sentence pairs of the training texts (another seed)."""
    mc = _make_corpus()
    mlm, held = _mlm()
    if mlm is None:
        raise SystemExit(f"bert_encoder: {held}")
    texts, vocab = mc.license_tokens()
    index = {t: i for i, t in enumerate(vocab)}
    unk = mc.BERT_SPECIALS.index("[UNK]")
    stream = np.concatenate([np.array([index.get(t, unk) for t in toks], np.int64)
                             for name, toks in texts.items() if name != mc.BERT_HELD_OUT])
    rng = np.random.default_rng(mc.zoo.SEED + BERT_CALIB_SEED_OFFSET)
    ids, mask, types = mc.sentence_pairs(stream, rng, BERT_CALIB_COUNT)
    corrupted, _ = mc.mask_tokens(ids, mask, rng)
    names = mc.BERT_INPUTS
    calib, held_path = tmp / "bert_calib.npz", tmp / "bert_eval.npz"
    np.savez(calib, **dict(zip(names, (corrupted, mask, types), strict=True)))
    feeds = dict(zip(names, held[:3], strict=True))
    np.savez(held_path, **feeds)
    return calib, held_path, feeds, held[3]


def _classifier_score(orig: list[np.ndarray], pruned: list[np.ndarray], labels: np.ndarray | None) -> str:
    return f"acc {accuracy(pruned[0], labels):.1f}% (orig {accuracy(orig[0], labels):.1f}%)"


def _db_score(orig: list[np.ndarray], pruned: list[np.ndarray], masks: np.ndarray | None) -> str:
    return (f"IoU vs orig {map_iou(pruned[0], orig[0]):.3f}; vs truth {map_iou(pruned[0], masks):.3f} "
            f"(orig {map_iou(orig[0], masks):.3f})")


def _bert_score(orig: list[np.ndarray], pruned: list[np.ndarray], labels: np.ndarray | None) -> str:
    mc = _make_corpus()
    mlm, _ = _mlm()
    return (f"masked-token acc {mc.bert_mlm_accuracy(mlm, pruned[0], labels):.1f}% "
            f"(orig {mc.bert_mlm_accuracy(mlm, orig[0], labels):.1f}%)")


def cases() -> list[Case]:
    text = _given(CORPUS / "text_classifier_calib.npz", CORPUS / "text_classifier_eval.npz")
    fmnist = _given(ROOT / "models" / "fmnist_calib.npz", ROOT / "models" / "fmnist_eval.npz")
    return [
        Case("text_classifier", CORPUS / "text_classifier.onnx", text, "accuracy", True, _classifier_score),
        Case("text_classifier_dynamo", CORPUS / "text_classifier_dynamo.onnx", text, "accuracy", True,
             _classifier_score),
        Case("transformer", ROOT / "models" / "transformer.onnx", fmnist, "accuracy", True, _classifier_score),
        Case("transformer.opset11", ROOT / "models" / "variants" / "transformer.opset11.onnx", fmnist, "accuracy",
             True, _classifier_score),
        Case("transformer.opset_newest", ROOT / "models" / "variants" / "transformer.opset_newest.onnx", fmnist,
             "accuracy", True, _classifier_score),
        Case("db_detector", CORPUS / "db_detector.onnx", _db_data, "IoU", False, _db_score),
        Case("bert_encoder", CORPUS / "bert_encoder.onnx", _bert_data, "masked-token", True, _bert_score),
        Case("bert_encoder_dynamo", CORPUS / "bert_encoder_dynamo.onnx", _bert_data, "masked-token", True,
             _bert_score),
    ]


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------


def run_graphopt(model: Path, out: Path, report: Path, target: float, calib: Path, held: Path,
                 heads: bool) -> tuple[int, float, str]:
    """The CLI in a subprocess; returns (exit code, seconds, last stderr line). ``--write-failed`` keeps the
    model of a failed verdict or a missed target so it can be measured; the exit code still says which."""
    cmd = [sys.executable, "-m", "graphopt", "optimize", str(model), "-o", str(out), "--preset", "prune",
           "--target-macs", str(target), "--data", str(calib), "--verify-data", str(held),
           "--report", str(report), "--write-failed", "-q"]
    if heads:
        cmd += ["--option", HEADS]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return proc.returncode, time.perf_counter() - started, lines[-1] if lines else ""


def validity(path: Path) -> str:
    try:
        onnx.checker.check_model(onnx.load(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return f"checker: {str(exc).splitlines()[0][:60]}"
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        return f"ort: {str(exc).splitlines()[0][:60]}"
    return "yes"


def latency_ratio(original: Path, pruned: Path, feeds: dict[str, np.ndarray], rounds: int, runs: int) -> float:
    """Median over rounds of original / pruned median CPU time (bench_pair.ab_seconds)."""
    ratios = []
    for _ in range(rounds):
        a, b = ab_seconds(str(original), str(pruned), runs=runs, feeds=feeds)
        ratios.append(a / b)
    return float(np.median(ratios))


def first_sample(feeds: dict[str, np.ndarray], count: int = 1) -> dict[str, np.ndarray]:
    return {k: v[:count] for k, v in feeds.items()}


COLUMNS = ("model", "mode", "target", "exit", "MACs graphopt", "MACs independent", "met (indep.)", "valid",
           "similarity per output (SNR dB / worst cos)", "speed-up", "task", "verdict / reason", "s")


def bench_case(case: Case, targets: tuple[float, ...], tmp: Path, keep: Path | None, rounds: int, runs: int,
               latency_batch: int) -> list[list[str]]:
    calib, held, feeds, labels = case.data(tmp)
    original = onnx.load(case.path)
    one = first_sample(feeds)
    base = count_macs(original, one)
    orig_out = run_model(case.path, feeds)
    names = [o.name for o in original.graph.output]
    rows = []
    for heads in ([False, True] if case.encoder else [False]):
        for target in targets:
            tag = f"{case.name}.{'heads' if heads else 'default'}.{target}"
            out_dir = keep or tmp
            out, report_path = out_dir / f"{tag}.onnx", out_dir / f"{tag}.json"
            code, seconds, last = run_graphopt(case.path, out, report_path, target, calib, held, heads)
            mode = "heads" if heads else "default"
            row = [case.name, mode, f"{target}", str(code)]
            if not out.exists():
                rows.append(row + ["-"] * 8 + [last[:80], f"{seconds:.0f}"])
                continue
            report = json.loads(report_path.read_text()) if report_path.exists() else {}
            t = (report.get("target") or {}).get("macs") or {}
            pruned = onnx.load(out)
            mine = count_macs(pruned, one)
            ratio = mine.macs / base.macs
            met = "yes" if ratio <= target * 1.05 else "NO"
            pruned_out = run_model(out, feeds)
            sim = "; ".join(f"{n} {snr_db(a, b):.1f} / {worst_cosine(a, b):.3f}"
                            for n, a, b in zip(names, orig_out, pruned_out, strict=True))
            speed = latency_ratio(case.path, out, first_sample(feeds, latency_batch), rounds, runs)
            verdict = report.get("verify", {}).get("passed")
            reason = (report.get("target") or {}).get("reason") or ""
            note = ("pass" if verdict else "FAIL") + (f"; {reason}" if reason else "")
            if mine.observed:
                note += f"; {len(mine.observed)} shapes from ORT"
            rows.append(row + [f"{t.get('reached', '-')}", f"{ratio:.3f}", met, validity(out), sim, f"{speed:.2f}x",
                               case.score(orig_out, pruned_out, labels), note[:160], f"{seconds:.0f}"])
            print("| " + " | ".join(rows[-1]) + " |", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated case names (default: all)")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="MAC fractions to keep")
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds (median taken)")
    parser.add_argument("--runs", type=int, default=40, help="timed runs per model and round")
    parser.add_argument("--latency-batch", type=int, default=8, help="samples per timed run")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--keep", help="write the pruned models and reports to this directory")
    args = parser.parse_args(argv)
    wanted = args.models.split(",") if args.models else None
    selected = [c for c in cases() if wanted is None or c.name in wanted]
    targets = tuple(float(t) for t in args.targets.split(","))
    keep = Path(args.keep) if args.keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    rows: list = []
    with tempfile.TemporaryDirectory(prefix="bench_real_") as tmp:
        for case in selected:
            rows += bench_case(case, targets, Path(tmp), keep, args.rounds, args.runs, args.latency_batch)
    emit_table(COLUMNS, rows, args.markdown)


if __name__ == "__main__":
    main()
