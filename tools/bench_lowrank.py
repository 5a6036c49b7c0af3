"""Low-rank factorization on the model zoo: output error and accuracy vs kept parameters, plain vs data-aware.

Each model is first cleaned up losslessly (the ``lossless`` preset: batch norms folded), which is the
reference. Then the ``lowrank`` pass factorizes every Gemm/MatMul/Conv it can at a uniform kept-parameter
``ratio`` per layer (``select=ratio``, ``latency=off`` so the numbers show the method, not the latency
filter), once with the plain SVD and once data-aware (calibrated on ``models/fmnist_calib.npz``).
Accuracy and the relative output error ``‖y' − y‖ / ‖y‖`` of the logits are measured on
``models/fmnist_eval.npz`` (2000 samples, onnxruntime with graph optimizations off).

``targets`` runs the issue's two budget cases through the global allocator (``graphopt.compress.budget``):
the transformer at 50% of its MatMul parameters, VGG at 50% of its conv MACs, data-aware, and reports
the accuracy drop and the measured whole-model latency (ORT_ENABLE_ALL, 1 thread, A/B alternating).

Commands::

    python tools/bench_lowrank.py sweep [--models vgg,transformer] [--ratios 0.75,0.5,0.35,0.25]
    python tools/bench_lowrank.py targets
    python tools/bench_lowrank.py latency [--models ...] [--ratio 0.5]   # default pass (latency=measure)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_pair import ab_seconds  # noqa: E402  (tools/ is on sys.path when run as a script)

from graphopt.core import onnx_io  # noqa: E402
from graphopt.core.manager import PassContext, build_pipeline, run_pipeline  # noqa: E402
from graphopt.measure import ort  # noqa: E402
from graphopt.measure.analysis import analyze  # noqa: E402
from graphopt.measure.calibration import load_data  # noqa: E402
from graphopt.passes.lossy.lowrank import LowRank  # noqa: E402

EVAL = ROOT / "models" / "fmnist_eval.npz"
CALIB = ROOT / "models" / "fmnist_calib.npz"
MODELS = ["vgg", "resnet", "mobilenetv2", "inception", "shufflenet", "senet", "transformer", "lenet300", "lenet5"]


def reference(name: str):
    model = onnx_io.load(ROOT / "models" / f"{name}.onnx")
    run_pipeline(build_pipeline("lossless"), model, PassContext())
    return model


def logits(model, data, batch: int = 250) -> np.ndarray:
    proto = onnx_io.to_proto(model)
    sess = ort.session(proto, threads=1)
    out = [ort.run(sess, feeds, [proto.graph.output[0].name])[proto.graph.output[0].name]
           for feeds in data.batches(batch)]
    return np.concatenate(out)


def lowrank(model, calib, options: dict[str, Any], **ctx_kw):
    cand = model.clone()
    result = LowRank().run(cand, PassContext(data=calib, options={"lowrank": options}, **ctx_kw))
    return cand, result


def measure(ref_logits: np.ndarray, model, data) -> dict[str, float]:
    y = logits(model, data)
    return {"acc": float(np.mean(y.argmax(1) == data.labels) * 100),
            "err": float(np.linalg.norm(y - ref_logits) / np.linalg.norm(ref_logits))}


def params(model) -> int:
    return int(analyze(model).params)


def latency_ratio(a, b, batch: int = 1, runs: int = 200) -> float:
    """Median CPU time of ``b`` over ``a`` (ORT_ENABLE_ALL, 1 thread, alternating: tools/bench_pair.py)."""
    ta, tb = ab_seconds(onnx_io.to_proto(a), onnx_io.to_proto(b), batch=batch, runs=runs)
    return tb / ta


def baseline(name: str):
    """``(reference model, eval data, calib data, reference logits on eval, its own measure)``."""
    ref = reference(name)
    ev, cal = load_data(EVAL, onnx_io.to_proto(ref)), load_data(CALIB, onnx_io.to_proto(ref))
    ref_y = logits(ref, ev)
    return ref, ev, cal, ref_y, measure(ref_y, ref, ev)


def sweep(models: list[str], ratios: list[float]) -> None:
    print("| model | ratio | params kept | plain err | plain acc | data-aware err | data-aware acc | "
          "layers |")
    print("|---|---|---|---|---|---|---|---|")
    for name in models:
        ref, ev, cal, ref_y, base = baseline(name)
        p0 = params(ref)
        print(f"| {name} | 1.0 | 100% | 0 | {base['acc']:.2f} | 0 | {base['acc']:.2f} | 0 |", flush=True)
        for ratio in ratios:
            row = {}
            for mode in ("off", "on"):
                cand, result = lowrank(ref, cal, {"ratio": ratio, "data_aware": mode, "latency": "off"})
                row[mode] = measure(ref_y, cand, ev)
                row["kept"] = params(cand) / p0
                row["n"] = result.stats["factorized"]
            better = "" if row["on"]["err"] < row["off"]["err"] else " (!)"
            print(f"| {name} | {ratio} | {row['kept'] * 100:.1f}% | {row['off']['err']:.4f} | {row['off']['acc']:.2f} "
                  f"| {row['on']['err']:.4f}{better} | {row['on']['acc']:.2f} | {row['n']} |", flush=True)


def targets() -> None:
    # after the lossless cleanup most projections are Gemms (MatMul + bias Add folded): both count
    cases = [("transformer", "Gemm,MatMul", "params"), ("vgg", "Conv", "macs")]
    print("| model | target | SVD | layers | kept (of those layers) | accuracy | drop | output err | latency ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, ops, kind in cases:
        ref, ev, cal, ref_y, base = baseline(name)
        for mode in ("off", "on"):
            opts = {"ops": ops, "select": "target", "target_scope": "layers", "latency": "off", "data_aware": mode}
            kw = {"target_params": 0.5} if kind == "params" else {"target_macs": 0.5}
            cand, result = lowrank(ref, cal, opts, **kw)
            m = measure(ref_y, cand, ev)
            alloc = result.stats.get("allocation", {})
            print(f"| {name} | 50% {ops} {kind} | {'data-aware' if mode == 'on' else 'plain'} "
                  f"| {result.stats['factorized']} | {alloc.get('cost', float('nan')):.3f} | {m['acc']:.2f} "
                  f"| {base['acc'] - m['acc']:.2f} | {m['err']:.4f} | {latency_ratio(ref, cand):.3f} |", flush=True)


def latency(models: list[str], ratio: float) -> None:
    print("| model | factorized | left alone as slower | params kept | accuracy drop | time ratio, batch 1 | "
          "batch 64 |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        ref, ev, cal, ref_y, base = baseline(name)
        cand, result = lowrank(ref, cal, {"ratio": ratio})
        m = measure(ref_y, cand, ev)
        slower = sum(e["count"] for e in result.stats.get("left_alone", []) if "not faster" in e["reason"])
        print(f"| {name} | {result.stats['factorized']} | {slower} | {params(cand) / params(ref) * 100:.1f}% "
              f"| {base['acc'] - m['acc']:.2f} | {latency_ratio(ref, cand):.3f} | "
              f"{latency_ratio(ref, cand, batch=64, runs=60):.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--models", default=",".join(MODELS))
    s.add_argument("--ratios", default="0.75,0.5,0.35,0.25")
    sub.add_parser("targets")
    lat = sub.add_parser("latency")
    lat.add_argument("--models", default=",".join(MODELS))
    lat.add_argument("--ratio", type=float, default=0.5)
    args = ap.parse_args()
    if args.cmd == "sweep":
        sweep(args.models.split(","), [float(r) for r in args.ratios.split(",")])
    elif args.cmd == "targets":
        targets()
    else:
        latency(args.models.split(","), args.ratio)


if __name__ == "__main__":
    main()
