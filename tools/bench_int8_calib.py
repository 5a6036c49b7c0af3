"""Activation calibrators of the quantize pass against each other (issue 18): MinMax, percentile, MSE.

For each model, on its lossless output and (CNNs) after ``--preset prune --target-macs 0.5``, the
``quantize`` pass alone with each calibrator (``quantize.calibrate``; everything else default:
static u8s8, 7-bit weights on this AVX2 CPU, the least-squares re-fit), calibrated on
``models/fmnist_calib.npz``. Printed per row: the float model's accuracy and the quantized model's
change on ``models/fmnist_eval.npz`` (2,000 images, one image = 0.05 point) and on the 10,000
Fashion-MNIST test images (``/usr/share/datasets/fashion-mnist/t10k-*``, of which the 2,000 are the
first), run as deployed (``ORT_ENABLE_ALL``, one thread); and the mean over the quantized layers'
outputs (ReLUs folded into the quantized range are read after the ReLU) of their SNR against the float
model, on 500 images with the QDQ arithmetic (``ORT_DISABLE_ALL``).

    python tools/bench_int8_calib.py [--models vgg,resnet,mobilenetv2] [--calibrators minmax,percentile,mse]
        [--weights int8|int4] [--no-prune | --only-prune] [--option quantize.KEY=VALUE ...]
        [--quantize-target KIND] [--simulate] [--refits rtn,bias,weights]

``--simulate`` reads the QDQ arithmetic (``ORT_DISABLE_ALL``) instead of the deployed kernels: with
``--quantize-target avx512-vnni`` the pass keeps 8-bit weights (the pruning still prices for this
machine), and the simulated accuracy is what a CPU whose int8 kernels do not overflow would give.

``--refits`` quantizes each float model once per re-fit method (``quantize.refit``: ``rtn`` is
onnxruntime's round to nearest, ``bias`` the least-squares bias, ``weights`` the GPTQ-style re-fit, the
default) and names the method in the calibrator column: what the re-fit buys over round to nearest,
on the same pruned model (pruning runs once per model).
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphopt  # noqa: E402
from graphopt.measure import ort as gort  # noqa: E402
from graphopt.measure import qdq  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.286, 0.353   # the zoo's input normalisation (models/README.md)
CNNS = ("vgg", "resnet", "mobilenetv2", "inception")


def test_images() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    with gzip.open(FMNIST / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    return ((raw.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32), labels


def accuracy(proto: onnx.ModelProto, x: np.ndarray, y: np.ndarray, simulate: bool = False) -> float:
    sess = gort.session(proto, optimize=not simulate, threads=1)
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + 500]})[0] for i in range(0, len(x), 500)])
    return float((pred.argmax(axis=1) == y).mean() * 100)


def layer_snr_db(float_proto: onnx.ModelProto, quant: onnx.ModelProto, x: np.ndarray) -> float:
    """Mean over the float model's Conv / Gemm / MatMul / Relu outputs that the quantized model computes
    (directly or through their Q→DQ pair) of the SNR in dB of the quantized value, QDQ simulated."""
    alias = qdq.qdq_aliases(quant)
    have = {t for node in quant.graph.node for t in node.output}
    pairs = [(n.output[0], alias.get(n.output[0], n.output[0])) for n in float_proto.graph.node
             if n.op_type in ("Conv", "Gemm", "MatMul", "Relu")]
    pairs = [(f, q) for f, q in pairs if q in have]
    name = float_proto.graph.input[0].name
    ref = dict(zip([f for f, _ in pairs], gort.session(gort.with_outputs(float_proto, [f for f, _ in pairs]))
                   .run([f for f, _ in pairs], {name: x})))
    got = dict(zip([q for _, q in pairs], gort.session(gort.with_outputs(quant, [q for _, q in pairs]))
                   .run([q for _, q in pairs], {name: x})))
    snrs = []
    for f, q in pairs:
        a, b = ref[f].astype(np.float64), got[q].astype(np.float64)
        snrs.append(10 * np.log10(max((a ** 2).sum(), 1e-30) / max(((a - b) ** 2).sum(), 1e-30)))
    return float(np.mean(snrs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg,resnet,mobilenetv2")
    parser.add_argument("--calibrators", default=",".join(qdq.CALIBRATORS))
    parser.add_argument("--weights", default="int8", choices=("int8", "int4"))
    parser.add_argument("--no-prune", action="store_true", help="only the lossless output of each model")
    parser.add_argument("--only-prune", action="store_true", help="only the pruned models")
    parser.add_argument("--option", action="append", default=[], help="another quantize option, e.g. quantize.refit=rtn")
    parser.add_argument("--quantize-target", default=None,
                        help="--target-cpu of the quantize step only (the pruning keeps this machine's)")
    parser.add_argument("--simulate", action="store_true",
                        help="accuracy of the QDQ arithmetic (ORT_DISABLE_ALL) instead of as deployed")
    parser.add_argument("--refits", default=None,
                        help="one row per quantize.refit method (e.g. rtn,bias,weights) for each calibrator")
    args = parser.parse_args(argv)
    calib = str(ROOT / "models" / "fmnist_calib.npz")
    evaluation = np.load(ROOT / "models" / "fmnist_eval.npz")
    ex, ey = evaluation["input"], evaluation["labels"]
    tx, ty = test_images()
    print(f"quantize options: {' '.join(args.option) or 'defaults'}; accuracy "
          f"{'of the QDQ arithmetic (simulated)' if args.simulate else 'as deployed'}\n")
    print("| model | float model | calibrator | weights | accuracy eval / test % | int8 change eval | int8 change test "
          "| mean layer SNR dB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        path = str(ROOT / "models" / f"{name}.onnx")
        bases = [] if args.only_prune else [("lossless", graphopt.optimize(path, data=calib, run_verify=False).model)]
        if name in CNNS and not args.no_prune:
            bases.append(("prune 0.5", graphopt.optimize(path, data=calib, preset="prune", target_macs=0.5,
                                                         run_verify=False).model))
        for label, base in bases:
            fe, ft = accuracy(base, ex, ey), accuracy(base, tx, ty)
            runs = [(m, r) for m in args.calibrators.split(",") for r in (args.refits or "").split(",")]
            for method, refit_method in runs:
                refit = [f"quantize.refit={refit_method}"] if refit_method else []
                q = graphopt.optimize(base, data=calib, passes=["quantize"], run_verify=False,
                                      target_cpu=args.quantize_target,
                                      options=["quantize.latency=off",  # every fused layer: calibrators compared
                                               f"quantize.calibrate={method}", f"quantize.weights={args.weights}",
                                               *refit, *args.option])
                qe, qt = accuracy(q.model, ex, ey, args.simulate), accuracy(q.model, tx, ty, args.simulate)
                snr = layer_snr_db(base, q.model, ex[:500])
                shown = method + (f", refit={refit_method}" if refit_method else "")
                print(f"| {name} | {label} | {shown} | {args.weights} | {fe:.2f} / {ft:.2f} | {qe - fe:+.2f} | "
                      f"{qt - ft:+.2f} | {snr:.1f} |", flush=True)


if __name__ == "__main__":
    main()
