"""The lossy verdict's default gate for outputs that are not class scores (issue 15): what passes, what fails.

For every case (a model output after a real lossy compression, or after a deliberate breakage) this
measures what the gate sees (SNR in dB over all samples, the worst sample's SNR, per-sample cosine
min/mean, from :func:`graphopt.measure.verify.verify` in accuracy mode) and what a user sees: the
output's task score on held-out samples, and whether its drop is within 1 point (the default
``--max-drop``). A case is *acceptable* when its task drop is at most 1 point. The sweep then counts,
for each candidate threshold pair (SNR ``X`` dB, worst cosine ``Y``), the acceptable cases the gate
fails and the unacceptable ones it passes.

Outputs and their task scores (percent, on ``models/fmnist_eval.npz``, 2000 samples, calibration on
``models/fmnist_calib.npz``, 512 samples; no fine-tuning after compression):

* zoo feature maps: a zoo classifier's intermediate tensor made an extra graph output (the input of
  its classifier head, and a mid-network map where the graph narrows to it). Task score: top-1
  accuracy of the *reference* model's downstream part (cut out with ``onnx.utils.extract_model``)
  run on the output's values, so the score judges this output alone.
* ``segnet`` (trained here): a small U-Net (stride-2 convs, transposed-conv upsampling, skip concat)
  with two map outputs, ``seg`` (per-pixel logits of 11 classes: background + the garment's class)
  and ``fg`` (sigmoid foreground probability, DB-style). Scores: pixel accuracy of ``argmax(seg)``;
  foreground IoU of ``fg > 0.5``; ground truth from the image (foreground = pixel > 0.1 of full scale).
* ``embednet`` (trained here): conv trunk, global pooling, linear to 32, L2-normalised (``x / |x|``):
  an embedding ``[N, 32]``. Score: 1-nearest-neighbour accuracy (cosine) of the eval samples against
  the 512 calibration samples, both embedded by the model under test.
* ``seqnet`` (trained here): the 28 image rows as a sequence of 28-feature steps; dilated Conv1d
  layers and a per-step linear layer give per-step logits ``[N, 28, 10]``. Score: per-step accuracy.

Compressions: graphopt's ``prune`` (``--target-macs`` 0.9, 0.7, 0.5, 0.3), ``lowrank``
(``--target-params`` 0.7, 0.5, 0.3) and ``compress`` (``--target-params`` 0.5, 0.3, 0.15) presets,
fitted on the calibration samples (with labels on the zoo classifiers). Breakages, applied to the
output by extra nodes: ``sign`` (the whole output negated), ``sign1`` (one channel negated), ``drop1``
(one channel zeroed), ``scale`` 1.05 / 1.25 / 2, Gaussian ``noise`` of 1 %, 10 %, 30 %, 100 % of the
output's RMS. Channels are axis 1 (``[N, C, ...]``, ``[N, D]``) or the last axis of ``[N, T, C]``.

Usage::

    python tools/bench_verdicts.py run   [--work /tmp/graphopt_verdicts] [--models ...] [--quick]
    python tools/bench_verdicts.py sweep [--work /tmp/graphopt_verdicts] [--snr 24] [--cos 0.95]

``run`` trains the three small models once (cached in ``--work``; about 6 minutes on one thread),
measures every case and appends them to ``cases.json`` there (a model already in it is skipped);
``sweep`` prints, as markdown, the cases with the verdict of the gate ``--snr`` / ``--cos``, the
breakage and feature-map summaries, and the misses of each threshold pair.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphopt.app import api  # noqa: E402
from graphopt.measure.calibration import SampleData, reference_outputs  # noqa: E402
from graphopt.measure.verify import Tolerance, verify  # noqa: E402

MODELS = ROOT / "models"
ACCEPT_DROP = 1.0  # points: the default --max-drop
COMPRESSIONS = [("prune", "target_macs", t) for t in (0.9, 0.7, 0.5, 0.3)] + \
               [("lowrank", "target_params", t) for t in (0.7, 0.5, 0.3)] + \
               [("compress", "target_params", t) for t in (0.5, 0.3, 0.15)]
BREAKAGES = [("sign", None), ("sign1", None), ("drop1", None), ("scale", 1.05), ("scale", 1.25), ("scale", 2.0),
             ("noise", 0.01), ("noise", 0.1), ("noise", 0.3), ("noise", 1.0)]
ZOO_MAP_MODELS = ("lenet5", "vgg", "resnet", "mobilenetv2", "transformer")


@dataclass
class Case:
    model: str
    output: str
    role: str
    change: str
    snr_db: float
    snr_db_min: float
    cosine_min: float
    cosine_mean: float
    score_ref: float
    score: float

    @property
    def drop(self) -> float:
        return self.score_ref - self.score

    @property
    def acceptable(self) -> bool:
        return self.drop <= ACCEPT_DROP


@dataclass
class Subject:
    """A model with float outputs to judge, its data, and a task score per output."""

    name: str
    proto: onnx.ModelProto
    calib: SampleData
    eval: SampleData
    score: Callable[[str, dict[str, np.ndarray]], float]  # (output name, all outputs on eval) -> percent
    outputs: list[str]  # the outputs whose cases are recorded
    channel_axis: dict[str, int]


# ================================================================================================
# data


def fmnist() -> tuple[SampleData, SampleData]:
    calib, eval_ = np.load(MODELS / "fmnist_calib.npz"), np.load(MODELS / "fmnist_eval.npz")
    return (SampleData({"input": calib["input"]}, calib["labels"], "fmnist_calib"),
            SampleData({"input": eval_["input"]}, eval_["labels"], "fmnist_eval"))


def train_set(n: int) -> tuple[np.ndarray, np.ndarray]:
    sys.path.insert(0, str(ROOT / "tools"))
    from make_models import load_fashion_mnist
    data = load_fashion_mnist()
    return data.train_x[:n], data.train_y[:n]


# ================================================================================================
# models: zoo feature maps


def with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``proto`` with ``names`` appended to its graph outputs (types from shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    infos = {vi.name: vi for vi in inferred.graph.value_info}
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for name in names:
        vi = infos.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        out.graph.output.append(vi)
    return out


def head_input(proto: onnx.ModelProto, logits: str) -> str:
    """The tensor the classifier head reads: from ``logits`` back through its bias Add to the last
    Gemm/MatMul, then back through pooling and flattening to the last feature map."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    node = producer[logits]
    while node.op_type not in ("Gemm", "MatMul"):
        node = next(producer[i] for i in node.input if i in producer)
    name = node.input[0]
    while name in producer and producer[name].op_type in ("Flatten", "Reshape", "GlobalAveragePool", "ReduceMean",
                                                           "Squeeze", "AveragePool"):
        name = producer[name].input[0]
    return name


def downstream(proto: onnx.ModelProto, start: str, output: str) -> onnx.ModelProto | None:
    """The part of ``proto`` from tensor ``start`` to ``output``, or ``None`` when other inputs feed it."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "m.onnx", Path(tmp) / "d.onnx"
        onnx.save(proto, src)
        try:
            onnx.utils.extract_model(str(src), str(dst), [start], [output], check_model=False)
        except Exception:
            return None
        part = onnx.load(dst)
    if [i.name for i in part.graph.input] != [start]:
        return None
    part.ir_version = proto.ir_version
    try:  # a node may still read another graph input (a Shape of the image...)
        from graphopt.measure import ort as gort
        gort.session(part)
    except Exception:
        return None
    return part


def mid_map(proto: onnx.ModelProto, logits: str) -> str | None:
    """A rank-4 Relu/Add output about 40 % into the graph through which everything downstream flows."""
    nodes = [n for n in proto.graph.node if n.op_type in ("Relu", "Add", "MaxPool", "Clip")]
    for node in nodes[int(len(nodes) * 0.4):]:
        if downstream(proto, node.output[0], logits) is not None:
            return node.output[0]
    return None


def zoo_subject(name: str, calib: SampleData, eval_: SampleData) -> Subject:
    proto = onnx.load(MODELS / f"{name}.onnx")
    maps = [m for m in (mid_map(proto, "logits"), head_input(proto, "logits")) if m is not None]
    maps = [m for m in dict.fromkeys(maps) if downstream(proto, m, "logits") is not None]
    heads = {m: downstream(proto, m, "logits") for m in maps}
    full = with_outputs(proto, maps)

    def score(output: str, outs: dict[str, np.ndarray]) -> float:
        logits = outs["logits"] if output == "logits" else \
            reference_outputs(heads[output], SampleData({output: outs[output]}))["logits"]
        return 100.0 * float((logits.argmax(1) == eval_.labels).mean())
    axes = {m: 1 for m in maps}
    axes["logits"] = 1
    return Subject(name, full, calib, eval_, score, ["logits", *maps], axes)


# ================================================================================================
# models: small trained map / embedding / sequence models


def _export(model, example, path: Path, inputs: list[str], outputs: list[str]) -> None:
    import torch
    axes = {n: {0: "batch"} for n in inputs + outputs}
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=inputs,
                      output_names=outputs, dynamic_axes=axes)


def _fit(model, batches: Callable[[np.random.Generator], list[tuple]], loss_of, epochs: int,
         extra: tuple = ()) -> None:
    import torch
    opt = torch.optim.Adam([*model.parameters(), *extra], lr=2e-3)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(epochs):
        for batch in batches(rng):
            opt.zero_grad()
            loss = loss_of(model, *batch)
            loss.backward()
            opt.step()
    model.eval()


def _minibatches(x: np.ndarray, y: np.ndarray, size: int = 128):
    import torch

    def make(rng: np.random.Generator) -> list[tuple]:
        order = rng.permutation(len(x))
        return [(torch.from_numpy(x[order[i:i + size]]), torch.from_numpy(y[order[i:i + size]]))
                for i in range(0, len(x), size)]
    return make


def foreground(x: np.ndarray) -> np.ndarray:
    """Pixels brighter than 10 % of full scale (x is the zoo's normalised input)."""
    return (x * 0.353 + 0.286) > 0.1


def build_segnet(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    import torch
    from torch import nn

    class SegNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            block = lambda i, o, s: nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.ReLU())  # noqa: E731
            self.e1, self.e2, self.e3 = block(1, 16, 1), block(16, 32, 2), block(32, 64, 2)
            self.u2 = nn.ConvTranspose2d(64, 32, 2, 2)
            self.d2 = block(64, 32, 1)
            self.u1 = nn.ConvTranspose2d(32, 16, 2, 2)
            self.d1 = block(32, 16, 1)
            self.seg, self.fg = nn.Conv2d(16, 11, 1), nn.Conv2d(16, 1, 1)

        def forward(self, inp):
            a = self.e1(inp)
            b = self.e2(a)
            c = self.e3(b)
            d = self.d2(torch.cat([self.u2(c), b], 1))
            e = self.d1(torch.cat([self.u1(d), a], 1))
            return self.seg(e), torch.sigmoid(self.fg(e))

    target = np.where(foreground(x)[:, 0], y[:, None, None] + 1, 0).astype(np.int64)
    model = SegNet()

    def loss(m, xb, tb):
        seg, fg = m(xb)
        return nn.functional.cross_entropy(seg, tb) + nn.functional.binary_cross_entropy(fg[:, 0], (tb > 0).float())
    _fit(model, _minibatches(x, target), loss, epochs=3)
    _export(model, torch.from_numpy(x[:2]), path, ["input"], ["seg", "fg"])


def build_embednet(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    import torch
    from torch import nn

    class EmbedNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                       nn.Conv2d(16, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                                       nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 32))

        def forward(self, inp):
            e = self.trunk(inp)
            return e / e.norm(dim=1, keepdim=True).clamp_min(1e-6)

    model = EmbedNet()
    proxies = nn.Parameter(torch.randn(10, 32))

    def loss(m, xb, yb):  # normalised softmax over class proxies (the proxies are not exported)
        logits = 16.0 * m(xb) @ nn.functional.normalize(proxies, dim=1).T
        return nn.functional.cross_entropy(logits, yb)
    _fit(model, _minibatches(x, y), loss, epochs=3, extra=(proxies,))
    _export(model, torch.from_numpy(x[:2]), path, ["input"], ["embedding"])


def build_seqnet(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    import torch
    from torch import nn

    class SeqNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.Sequential(nn.Conv1d(28, 64, 3, padding=1), nn.ReLU(),
                                       nn.Conv1d(64, 64, 3, padding=2, dilation=2), nn.ReLU(),
                                       nn.Conv1d(64, 64, 3, padding=4, dilation=4), nn.ReLU())
            self.proj = nn.Linear(64, 64)
            self.out = nn.Linear(64, 10)

        def forward(self, rows):  # rows [N, T=28, F=28]
            h = self.convs(rows.transpose(1, 2)).transpose(1, 2)
            return self.out(torch.relu(self.proj(h)))

    model = SeqNet()
    rows = x[:, 0]

    def loss(m, xb, yb):
        logits = m(xb)
        return nn.functional.cross_entropy(logits.reshape(-1, 10), yb.repeat_interleave(28))
    _fit(model, _minibatches(rows, y), loss, epochs=3)
    _export(model, torch.from_numpy(rows[:2]), path, ["rows"], ["step_logits"])


def small_subjects(work: Path, calib: SampleData, eval_: SampleData, which: set[str]) -> list[Subject]:
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    builders = {"segnet": build_segnet, "embednet": build_embednet, "seqnet": build_seqnet}
    x, y = None, None
    subjects = []
    for name, build in builders.items():
        if name not in which:
            continue
        path = work / f"{name}.onnx"
        if not path.exists():
            if x is None:
                x, y = train_set(20000)
            started = time.perf_counter()
            build(path, x, y)
            print(f"trained {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        subjects.append(_small_subject(name, onnx.load(path), calib, eval_))
    return subjects


def _small_subject(name: str, proto: onnx.ModelProto, calib: SampleData, eval_: SampleData) -> Subject:
    labels = eval_.labels
    if name == "seqnet":
        feed = lambda d: SampleData({"rows": d.inputs["input"][:, 0]}, None, d.source)  # noqa: E731

        def score(output, outs):
            return 100.0 * float((outs["step_logits"].argmax(-1) == labels[:, None]).mean())
        return Subject(name, proto, feed(calib), feed(eval_), score, ["step_logits"], {"step_logits": -1})
    plain = lambda d: SampleData({"input": d.inputs["input"]}, None, d.source)  # noqa: E731
    if name == "segnet":
        fg = foreground(eval_.inputs["input"])[:, 0]
        truth = np.where(fg, labels[:, None, None] + 1, 0)

        def score(output, outs):
            if output == "seg":
                return 100.0 * float((outs["seg"].argmax(1) == truth).mean())
            pred = outs["fg"][:, 0] > 0.5
            return 100.0 * float((pred & fg).sum() / (pred | fg).sum())
        return Subject(name, proto, plain(calib), plain(eval_), score, ["seg", "fg"], {"seg": 1, "fg": 1})
    # The gallery is embedded by the reference: the optimized model must be a drop-in replacement
    # for one whose embeddings already fill an index.
    gallery = reference_outputs(proto, plain(calib))["embedding"]

    def score(output, outs):
        nearest = (outs["embedding"] @ gallery.T).argmax(1)
        return 100.0 * float((calib.labels[nearest] == labels).mean())
    return Subject(name, proto, plain(calib), plain(eval_), score, ["embedding"], {"embedding": 1})


# ================================================================================================
# cases


def broken(proto: onnx.ModelProto, output: str, kind: str, amount: float | None, axis: int,
           sample: np.ndarray) -> onnx.ModelProto:
    """``proto`` whose ``output`` is passed through the breakage (``sample``: the reference's values)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    raw = f"{output}__raw"
    for node in out.graph.node:
        node.output[:] = [raw if o == output else o for o in node.output]
        node.input[:] = [raw if i == output else i for i in node.input]  # other readers keep the true values
    shape = [1] * sample.ndim
    ax = axis % sample.ndim
    shape[ax] = sample.shape[ax]
    if kind in ("sign", "sign1", "drop1", "scale"):
        factor = np.ones(shape, np.float32)
        if kind == "sign":
            factor[:] = -1
        elif kind == "sign1":
            factor.reshape(-1)[0] = -1
        elif kind == "drop1":
            factor.reshape(-1)[0] = 0
        else:
            factor[:] = amount
        out.graph.initializer.append(numpy_helper.from_array(factor, f"{output}__factor"))
        out.graph.node.append(helper.make_node("Mul", [raw, f"{output}__factor"], [output]))
    else:
        rms = float(np.sqrt(np.mean(sample.astype(np.float64) ** 2)))
        out.graph.node.append(helper.make_node("RandomNormalLike", [raw], [f"{output}__noise"], mean=0.0,
                                               scale=amount * rms, seed=1.0))
        out.graph.node.append(helper.make_node("Add", [raw, f"{output}__noise"], [output]))
    return out


def measure(subject: Subject, candidate: onnx.ModelProto, change: str, ref_outs: dict, ref_scores: dict) -> list[Case]:
    report = verify(subject.proto, candidate, subject.eval, mode="accuracy", tolerance=Tolerance(max_drop=100.0),
                    find_divergence=False)
    outs = reference_outputs(candidate, subject.eval)
    cases = []
    for name in subject.outputs:
        m = report.metrics[name]
        if not m.compared or m.snr_db is None:
            print(f"  {subject.name}/{name} {change}: not compared ({m.reason})", file=sys.stderr)
            continue
        cases.append(Case(subject.name, name, m.role or "?", change, m.snr_db, m.snr_db_min, m.cosine_min,
                          m.cosine_mean, ref_scores[name], subject.score(name, outs)))
    return cases


def run_subject(subject: Subject, quick: bool) -> list[Case]:
    ref_outs = reference_outputs(subject.proto, subject.eval)
    ref_scores = {name: subject.score(name, ref_outs) for name in subject.outputs}
    print(f"{subject.name}: reference scores {ref_scores}", file=sys.stderr)
    cases: list[Case] = []
    for preset, target_kind, target in COMPRESSIONS[::3] if quick else COMPRESSIONS:
        started = time.perf_counter()
        try:
            result = api.optimize(subject.proto, preset=preset, data=subject.calib, run_verify=False,
                                  **{target_kind: target})
        except Exception as exc:  # a preset that refuses this model: recorded, not fatal
            print(f"  {subject.name} {preset} {target}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        new = measure(subject, result.model, f"{preset} {target}", ref_outs, ref_scores)
        cases += new
        print(f"  {preset} {target}: {time.perf_counter() - started:.0f} s, "
              + ", ".join(f"{c.output} {c.snr_db:.1f} dB drop {c.drop:.2f}" for c in new), file=sys.stderr)
    for kind, amount in BREAKAGES:
        for name in subject.outputs:
            if name == "logits":
                continue  # class scores: judged by top-1 agreement, not by this gate
            cand = broken(subject.proto, name, kind, amount, subject.channel_axis[name], ref_outs[name])
            label = kind if amount is None else f"{kind} {amount:g}"
            cases += [c for c in measure(subject, cand, label, ref_outs, ref_scores) if c.output == name]
    return cases


# ================================================================================================
# sweep


def gate(case: Case, snr: float, cos: float) -> bool:
    return case.snr_db >= snr and case.cosine_min >= cos


TRAINED = ("segnet", "embednet", "seqnet")
MUST_PASS = ("scale 1.05", "noise 0.01")  # controls: a user accepts these
EITHER = ("noise 0.1",)  # 20 dB exactly: on the threshold


def category(case: Case) -> str:
    if case.change.split()[0] not in ("prune", "lowrank", "compress"):
        return "breakage"
    return "final output" if case.model in TRAINED else "feature map"


def misses(cases: list[Case], snr: float, cos: float) -> dict[str, tuple[int, int]]:
    """Per category: (cases that should pass and fail, cases that should fail and pass)."""
    out = {}
    for cat in ("final output", "feature map", "breakage"):
        rows = [c for c in cases if category(c) == cat and c.role != "class scores"]
        if cat == "breakage":
            good = [c for c in rows if c.change in MUST_PASS]
            bad = [c for c in rows if c.change not in MUST_PASS + EITHER]
        else:
            good, bad = [c for c in rows if c.acceptable], [c for c in rows if not c.acceptable]
        out[cat] = (sum(not gate(c, snr, cos) for c in good), sum(gate(c, snr, cos) for c in bad), len(good),
                    len(bad))
    return out


def sweep(cases: list[Case], snr: float = 20.0, cos: float = 0.95) -> None:
    print("| model | output | role | change | SNR dB | worst SNR dB | cos min | cos mean | score | drop | "
          f"acceptable | gate ({snr:g} dB, {cos:g}) |")
    print("|---|---|---|---|--:|--:|--:|--:|--:|--:|:-:|:-:|")
    for c in cases:
        verdict = "-" if c.role == "class scores" else "pass" if gate(c, snr, cos) else "fail"
        print(f"| {c.model} | `{c.output}` | {c.role} | {c.change} | {c.snr_db:.1f} | {c.snr_db_min:.1f} | "
              f"{c.cosine_min:.4f} | {c.cosine_mean:.4f} | {c.score_ref:.2f} | {c.drop:.2f} | "
              f"{'yes' if c.acceptable else 'no'} | {verdict} |")
    print("\nBreakages, over all outputs they were applied to:\n")
    print("| breakage | outputs | SNR dB | cos min | task drop (points) | gate fails |")
    print("|---|--:|--:|--:|--:|--:|")
    for change in dict.fromkeys(c.change for c in cases if category(c) == "breakage"):
        rows = [c for c in cases if c.change == change and c.role != "class scores"]
        print(f"| {change} | {len(rows)} | {_span([c.snr_db for c in rows], '.1f')} | "
              f"{_span([c.cosine_min for c in rows], '.3f')} | {_span([c.drop for c in rows], '.2f')} | "
              f"{sum(not gate(c, snr, cos) for c in rows)} |")
    print("\nZoo feature maps under compression:\n")
    print("| model | maps x compressions | acceptable | SNR dB of the acceptable | gate fails of the acceptable "
          "| unacceptable | gate passes of the unacceptable |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for model in dict.fromkeys(c.model for c in cases if category(c) == "feature map"):
        rows = [c for c in cases if c.model == model and category(c) == "feature map" and c.role != "class scores"]
        good, bad = [c for c in rows if c.acceptable], [c for c in rows if not c.acceptable]
        print(f"| {model} | {len(rows)} | {len(good)} | {_span([c.snr_db for c in good], '.1f')} | "
              f"{sum(not gate(c, snr, cos) for c in good)} | {len(bad)} | {sum(gate(c, snr, cos) for c in bad)} |")
    sizes = misses(cases, 0, 0)
    print("\nMisses per threshold pair: acceptable cases failed / unacceptable cases passed (breakages: the "
          "controls scale 1.05 and noise 1 % failed / the other breakages, noise 10 % left out, passed). "
          + ", ".join(f"{k}: {v[2]} acceptable, {v[3]} not" for k, v in sizes.items()) + ".\n")
    print("| SNR >= dB | worst cos >= | final outputs | feature maps | breakages |")
    print("|--:|--:|--:|--:|--:|")
    for y in (0.0, 0.9, 0.95, 0.98, 0.99):
        for x in (10, 14, 16, 18, 20, 22, 24, 26):
            m = misses(cases, x, y)
            cells = " | ".join(f"{m[k][0]} / {m[k][1]}" for k in ("final output", "feature map", "breakage"))
            print(f"| {x} | {y:g} | {cells} |")


def _span(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}} .. {hi:{fmt}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "sweep"))
    parser.add_argument("--work", default="/tmp/graphopt_verdicts")
    parser.add_argument("--models", default=",".join((*ZOO_MAP_MODELS, "segnet", "embednet", "seqnet")))
    parser.add_argument("--quick", action="store_true", help="one target per preset (smoke test)")
    parser.add_argument("--snr", type=float, default=20.0, help="sweep: the SNR threshold of the verdict column")
    parser.add_argument("--cos", type=float, default=0.95, help="sweep: the worst-cosine threshold of that column")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "cases.json"
    if args.command == "sweep":
        sweep([Case(**c) for c in json.loads(store.read_text())], args.snr, args.cos)
        return
    which = set(args.models.split(","))
    calib, eval_ = fmnist()
    cases = [Case(**c) for c in json.loads(store.read_text())] if store.exists() else []
    done = {c.model for c in cases}
    # The small models first: their outputs are the non-classifier ones the gate is for.
    subjects = small_subjects(work, calib, eval_, which - done)
    subjects += [zoo_subject(n, calib, eval_) for n in ZOO_MAP_MODELS if n in which and n not in done]
    for subject in subjects:
        cases += run_subject(subject, args.quick)
        store.write_text(json.dumps([asdict(c) for c in cases], indent=1))


if __name__ == "__main__":
    main()
