"""int8 on the real-world corpus (issue 18; ``models/corpus``): the variants of ``tools/bench_int8.py``.

For each corpus model of ``DEFAULT`` (those whose manifest entry lists prune and lowrank, with float32
weights). Left out: ``vad_stream`` (lists neither); ``fp16`` (float16 weights); ``qdq_int8`` (already
quantized); ``contrib_ops`` (lossless only); ``bert_encoder_dynamo`` (its TorchScript twin stands for
it). In one run:

* ``float``: the original;
* ``ort static``: onnxruntime's ``quantize_static`` with its defaults (QDQ, S8S8, MinMax) and per-channel
  weights on the lossless output, called in a temporary working directory (it writes files there);
* ``graphopt int8, all fused``: ``--preset int8 --option quantize.latency=off`` (the "graphopt int8" rows
  before the speed rule), and ``graphopt int8, priced``: ``--preset int8`` (layers the target's profile
  prices slower quantized stay float); ``→ int8`` rows quantize every fused layer;
* ``prune 0.7`` / ``→ int8`` and ``lowrank 0.7`` / ``→ int8`` (where the manifest lists the preset):
  ``--preset prune --target-macs 0.7`` / ``--preset lowrank --target-params 0.7`` (the corpus's targets,
  ``tools/bench_corpus.py --lossy``), then the ``quantize`` pass alone on that output (the same model
  as ``--quantize int8`` after the preset: the quantize pass runs last either way);
* ``W4A8 rtn`` / ``W4A8 re-fit``: ``--preset int8 --quantize w4a8`` with ``quantize.refit=rtn`` / the default.

Data. Models with class scores get their accuracy on real held-out data: ``nhwc_tf`` and
``minus_one_dims`` on ``models/fmnist_eval.npz`` (NHWC / grey copied to 3 channels, as the manifest
says they were trained), calibrated on ``models/fmnist_calib.npz`` in the same layout;
``text_classifier(_dynamo)`` on its own ``_eval`` / ``_calib`` files. The others (no data in the repo:
``db_detector``, ``yolo_detector``, ``crnn``, ``bert_encoder(_dynamo)``) get graphopt's seeded random
inputs at their first probe (the data a user without data gets), 64 samples to calibrate and 64 others
to compare, and the column is the output similarity instead: the SNR in dB of each output against the
float model's on those 64 samples, the lowest over the outputs.

Accuracy and similarity as deployed (``ORT_ENABLE_ALL``, one thread). Latency: each variant against the
original float model, A and B alternating in one process (``tools/bench_pair.py``'s ``ab_seconds``),
``ORT_ENABLE_ALL``, one intra-op thread, no spinning, median CPU time, on the first ``--batch`` evaluation
samples. Size: the serialized model. A variant that fails prints its one-line error in the row.

    python tools/bench_int8_corpus.py [--models nhwc_tf,db_detector] [--runs 30] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import graphopt  # noqa: E402
from bench_int8 import ort_static  # noqa: E402
from bench_pair import ab_seconds  # noqa: E402
from graphopt.app import api  # noqa: E402
from graphopt.core.onnx_io import from_proto  # noqa: E402
from graphopt.measure.calibration import SampleData  # noqa: E402

MANIFEST = ROOT / "models" / "corpus" / "corpus.json"
DEFAULT = ("nhwc_tf", "minus_one_dims", "text_classifier", "text_classifier_dynamo", "db_detector",
           "yolo_detector", "crnn", "bert_encoder")
RANDOM_SAMPLES = 64


def _fmnist(layout: Callable[[np.ndarray], np.ndarray], name: str) -> Callable[[str], SampleData]:
    def load(part: str) -> SampleData:
        arrays = np.load(ROOT / "models" / f"fmnist_{part}.npz")
        return SampleData({name: np.ascontiguousarray(layout(arrays["input"]))}, arrays["labels"])
    return load


def _own(stem: str) -> Callable[[str], SampleData]:
    def load(part: str) -> SampleData:
        arrays = dict(np.load(ROOT / "models" / "corpus" / f"{stem}_{part}.npz"))
        labels = arrays.pop("labels")
        return SampleData(arrays, labels)
    return load


#: corpus name -> its real data (``part`` is ``calib`` or ``eval``); the others get random inputs.
REAL_DATA: dict[str, Callable[[str], SampleData]] = {
    "nhwc_tf": _fmnist(lambda x: x.transpose(0, 2, 3, 1), "input_1"),
    "minus_one_dims": _fmnist(lambda x: np.repeat(x, 3, axis=1), "x"),
    "text_classifier": _own("text_classifier"),
    "text_classifier_dynamo": _own("text_classifier"),
}


def data_of(name: str, proto: onnx.ModelProto) -> tuple[SampleData, SampleData]:
    """(calibration, evaluation) samples: real ones where the repo has them, else graphopt's seeded random
    inputs at the model's first probe (two seeds: the evaluation samples are not the calibration's)."""
    if name in REAL_DATA:
        return REAL_DATA[name]("calib"), REAL_DATA[name]("eval")
    model = from_proto(proto)
    calib, _ = api.probe_inputs(model, None, samples=RANDOM_SAMPLES, seed=0)
    evaluation, _ = api.probe_inputs(model, None, samples=RANDOM_SAMPLES, seed=1)
    return calib, evaluation


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def outputs(proto: onnx.ModelProto, data: SampleData) -> list[list[np.ndarray]]:
    """Every output of ``proto`` per feed of 64 samples (as deployed)."""
    sess = _session(proto)
    return [sess.run(None, feed) for feed in data.batches(64)]


def score(ref: list[list[np.ndarray]], got: list[list[np.ndarray]], labels: np.ndarray | None) -> float:
    """Top-1 accuracy in percent of the first output (``labels`` given), else the lowest over the outputs
    of the SNR in dB of ``got`` against ``ref`` (summed over the feeds)."""
    if labels is not None:
        pred = np.concatenate([feed[0] for feed in got]).argmax(axis=-1)
        return float((pred == labels).mean() * 100)
    snrs = []
    for k in range(len(ref[0])):
        signal = sum(float(np.sum(r[k].astype(np.float64) ** 2)) for r in ref)
        noise = sum(float(np.sum((r[k].astype(np.float64) - g[k]) ** 2)) for r, g in zip(ref, got))
        snrs.append(10 * np.log10(max(signal, 1e-30) / max(noise, 1e-30)))
    return float(min(snrs))


def variants(entry: dict, proto: onnx.ModelProto, calib: SampleData
             ) -> Iterator[tuple[str, Callable[[], onnx.ModelProto]]]:
    """(label, builder) per row; a builder may raise (the row then shows the error)."""
    def opt(source, **kw):
        return lambda: graphopt.optimize(source() if callable(source) else source, data=calib,
                                         run_verify=False, **kw).model

    yield "float", lambda: proto
    yield "ort static (S8S8, per-channel)", lambda: ort_static(opt(proto)(), calib.batches(64))
    yield "graphopt int8, all fused", opt(proto, preset="int8", options=["quantize.latency=off"])
    yield "graphopt int8, priced", opt(proto, preset="int8")
    presets = entry.get("presets", [])
    for preset, target in (("prune", {"target_macs": 0.7}), ("lowrank", {"target_params": 0.7})):
        if preset not in presets:
            continue
        cut = {}

        def alone(preset=preset, target=target, cut=cut):
            cut["model"] = opt(proto, preset=preset, **target)()
            return cut["model"]

        yield f"{preset} 0.7", alone
        yield f"{preset} 0.7 → int8", (lambda cut=cut, alone=alone:
                                        opt(cut.get("model") or alone(), passes=["quantize"],
                                            options=["quantize.latency=off"])())
    yield "W4A8 rtn", opt(proto, preset="int8", quantize="w4a8", options=["quantize.refit=rtn"])
    yield "W4A8 re-fit", opt(proto, preset="int8", quantize="w4a8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="evaluation samples per timed run")
    args = parser.parse_args(argv)
    entries = {e["name"]: e for e in json.loads(MANIFEST.read_text())["models"]}
    print("| model | variant | accuracy % or output SNR dB | change | time / float | size KB |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        entry = entries[name]
        proto = onnx.load(ROOT / entry["file"])
        calib, evaluation = data_of(name, proto)
        labels = evaluation.labels
        unit = "%" if labels is not None else "dB"
        ref = outputs(proto, evaluation)
        feeds = evaluation.feed(0, min(args.batch, evaluation.n_samples))
        for label, build in variants(entry, proto, calib):
            try:
                model = build()
                value = score(ref, outputs(model, evaluation), labels)
            except Exception as exc:  # the row says what failed; the next variant still runs
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                print(f"| {name} | {label} | fails: {type(exc).__name__}: {first[:160]} | - | - | - |", flush=True)
                continue
            if label == "float":
                base, ratio = value, 1.0
            else:
                a, b = ab_seconds(proto, model, runs=args.runs, feeds=feeds)
                ratio = b / a
            change = f"{value - base:+.2f}" if labels is not None else "-"
            if labels is not None:
                shown = f"{value:.2f} %"
            else:  # the float model against itself: two sessions agree to rounding noise
                shown = "(reference)" if label == "float" else f"{value:.1f} {unit}"
            print(f"| {name} | {label} | {shown} | {change} | {ratio:.2f} | "
                  f"{len(model.SerializeToString()) / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
