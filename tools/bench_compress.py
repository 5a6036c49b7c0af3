"""Deep Compression without retraining: LeNet compression tables and the compact 4-bit encoding on the zoo.

Usage::

    python tools/bench_compress.py lenet  [--models lenet300,lenet5] [--augment]
    python tools/bench_compress.py zoo    [--models vgg,resnet,...] [--bits 4] [--rounds 30]
    python tools/bench_compress.py inits  [--models lenet300,lenet5] [--bits 2,3]
    python tools/bench_compress.py bytes  [--models mobilenetv2,inception,shufflenet] [--bits 4]

``lenet``: for each density configuration, ``sparsify`` (SparseGPT/OBS masks, splicing, LS re-fit)
then ``weight_sharing`` (snap, LS centroid re-fit) at several bit widths, on the calibration set
(``models/fmnist_calib.npz``, 512 samples); accuracy on ``models/fmnist_eval.npz`` (2000 samples);
compression ratio by :mod:`graphopt.compress.storage` (Deep Compression accounting: relative indices with
fillers, cluster indices, codebooks, each Huffman coded; biases float32). Baselines on the same
densities: plain magnitude pruning (Han et al. 2015) and onnxsim's ``apply_magnitude_pruning``.
Prints every row and the best ratio within 0.5 and 1.0 point.

``zoo``: ``weight_sharing`` with ``encoding=compact`` at ``--bits`` on each conv zoo model (with the
LS re-fit on calibration data), against onnxsim's ``quantize_weight_only_kmeans`` at the same bits:
file size, accuracy, and onnxruntime latency (``ORT_ENABLE_ALL``, 1 thread, batch 1, A and B
alternated, median of per-round ratios).

``bytes``: where the bytes of the compact file go (codes, codebooks, decoder, the model's own node
names / value names / attributes, biases...), with the model's names kept and with short names
(k-means without re-fit: the sizes do not depend on it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphopt.compress import storage  # noqa: E402
from graphopt.core.manager import PassContext, build_pipeline, get_pass, run_pipeline  # noqa: E402
from graphopt.core.onnx_io import from_proto, load, to_proto  # noqa: E402
from graphopt.measure.calibration import SampleData, load_data, reference_outputs  # noqa: E402
from graphopt.measure.ort import session  # noqa: E402

MODELS = ROOT / "models"

LENET_CONFIGS = {
    # densities per layer; the first-layer density dominates the ratio (>= 88 % of the weights)
    "lenet300": ["fc1=0.08,fc2=0.09,fc3=0.26", "fc1=0.12,fc2=0.15,fc3=0.5", "fc1=0.16,fc2=0.2,fc3=1",
                 "fc1=0.25,fc2=0.3,fc3=1"],
    "lenet5": ["conv1=1,conv2=0.08,fc1=0.05,fc2=0.19", "conv1=1,conv2=0.12,fc1=0.08,fc2=0.19",
               "conv1=1,conv2=0.2,fc1=0.11,fc2=0.3", "conv1=1,conv2=0.3,fc1=0.16,fc2=0.5"],
}


def accuracy(model, data: SampleData) -> float:
    out = reference_outputs(model, data)
    logits = next(iter(out.values()))
    return 100.0 * float((logits.argmax(1) == data.labels).mean())


def augment(data: SampleData) -> SampleData:
    """Calibration images plus their mirror and 1-pixel shifts (6x the samples, labels repeated)."""
    x = data.inputs["input"]
    parts = [x, x[..., ::-1]] + [np.roll(x, s, axis=a) for a in (2, 3) for s in (1, -1)]
    return SampleData({"input": np.ascontiguousarray(np.concatenate(parts))}, np.tile(data.labels, len(parts)),
                      source=f"{data.source} augmented x{len(parts)}")


def run_pass(model, name: str, options: dict, data: SampleData | None, seed: int = 0):
    ctx = PassContext(options={name: options}, data=data, seed=seed)
    return get_pass(name).run(model, ctx)


def onnxsim_pruned(path: Path, density: float):
    """onnxsim's global magnitude pruning (Han et al.) keeping ``density`` of the layer weights."""
    import onnxsim
    return from_proto(onnxsim.apply_magnitude_pruning(onnx.load(str(path)), sparsity=1.0 - density,
                                                      global_sparsity=True))


def lenet(args) -> None:
    print("| model | config | method | bits | density | accuracy | drop | ratio (DC accounting) | bits/param |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        path = MODELS / f"{name}.onnx"
        original = load(path)
        calib = load_data(MODELS / "fmnist_calib.npz", original)
        ev = load_data(MODELS / "fmnist_eval.npz", original)
        fit = augment(calib) if args.augment else calib
        base = accuracy(original, ev)
        rows = []
        configs = args.densities.split(";") if args.densities else LENET_CONFIGS[name][: args.configs or None]
        for config in configs:
            t = time.perf_counter()
            plain = original.clone()
            run_pass(plain, "sparsify", {"densities": config, "refit": False, "min_weights": 0}, None)
            pruned = original.clone()
            # guard off: the table sweeps the densities itself (the guard would move them towards dense)
            res = run_pass(pruned, "sparsify", {"densities": config, "min_weights": 0, "ridge": args.ridge,
                                                "guard": False,
                                                "splice_rounds": args.splice, "samples": fit.n_samples,
                                                "max_rows": 8 * fit.n_samples}, fit, seed=args.seed)
            density = res.stats["density"]
            sim = onnxsim_pruned(path, density)
            for label, m in (("magnitude (ours, per layer)", plain), ("onnxsim global magnitude", sim),
                             ("sparsify", pruned)):
                acc = accuracy(m, ev)
                acct = storage.account_model(m, original)
                rows.append((name, config, label, 32, density, acc, base - acc, acct.ratio, acct.bits_per_weight))
                _print(rows[-1])
            for bits in args.bits:
                shared = pruned.clone()
                run_pass(shared, "weight_sharing", {"bits": bits, "min_weights": 0, "samples": fit.n_samples,
                                                    "max_rows": 8 * fit.n_samples, "ridge": args.ridge}, fit,
                         seed=args.seed)
                acc = accuracy(shared, ev)
                acct = storage.account_model(shared, original)
                rows.append((name, config, "sparsify+share", bits, density, acc, base - acc, acct.ratio,
                             acct.bits_per_weight))
                _print(rows[-1])
            print(f"<!-- {name} {config}: {time.perf_counter() - t:.0f} s -->", flush=True)
        for limit in (0.5, 1.0):
            ok = [r for r in rows if r[6] <= limit]
            best = max(ok, key=lambda r: r[7]) if ok else None
            print(f"\n**{name}** (float {base:.2f} %): best ratio within {limit} point: "
                  + (f"{best[7]:.1f}x ({best[2]}, {best[1]}, {best[3]} bits, accuracy {best[5]:.2f} %)" if best
                     else "none"))
        print()


def _print(r) -> None:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.2f} | {r[6]:+.2f} | {r[7]:.1f}x | {r[8]:.3f} |",
          flush=True)


# =============================================================================================
# zoo


def file_size(proto: onnx.ModelProto) -> int:
    return len(proto.SerializeToString())


def latency_ratio(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict, rounds: int) -> tuple[float, float, float]:
    """Median per-round ratio b/a of the mean run time (ORT_ENABLE_ALL, 1 thread), A and B alternated."""
    sa, sb = session(a, optimize=True, threads=1), session(b, optimize=True, threads=1)
    for s in (sa, sb):
        for _ in range(5):
            s.run(None, feed)
    ratios, ta, tb = [], [], []
    for i in range(rounds):
        order = (sa, sb) if i % 2 == 0 else (sb, sa)
        times = {}
        for s in order:
            t = time.perf_counter()
            for _ in range(10):
                s.run(None, feed)
            times[id(s)] = (time.perf_counter() - t) / 10
        ta.append(times[id(sa)])
        tb.append(times[id(sb)])
        ratios.append(times[id(sb)] / times[id(sa)])
    return float(np.median(ratios)), float(np.median(ta)) * 1e3, float(np.median(tb)) * 1e3


def zoo(args) -> None:
    import onnxsim
    print(f"| model | float file | lossless (BN folded) | graphopt compact {args.bits}-bit | size ratio "
          f"| accuracy float -> compact | latency compact / lossless float (ms) | latency compact / original "
          f"| onnxsim k-means file | onnxsim accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        path = MODELS / f"{name}.onnx"
        proto = onnx.load(str(path))
        original = load(path)
        calib = load_data(MODELS / "fmnist_calib.npz", original)
        ev = load_data(MODELS / "fmnist_eval.npz", original)
        model = original.clone()
        data = calib.head(args.samples)
        # lossless first: BN folded into the convs (else its parameters stay float32 in the file)
        run_pipeline(build_pipeline("lossless"), model, PassContext(data=data))
        folded_proto = to_proto(model)
        folded = file_size(folded_proto)
        res = run_pass(model, "weight_sharing", {"bits": args.bits, "encoding": "compact", "samples": data.n_samples,
                                                 "max_rows": 4096}, data)
        run_pass(model, "dedupe_initializers", {}, None)
        compact = to_proto(model)
        onnx.checker.check_model(compact)
        feed = {"input": ev.inputs["input"][:1]}
        ratio, ta, tb = latency_ratio(folded_proto, compact, feed, args.rounds)
        ratio0, _, _ = latency_ratio(proto, compact, feed, args.rounds)
        try:
            sim = onnxsim.quantize_weight_only_kmeans(proto, bits=args.bits)
            sim_size, sim_acc = f"{file_size(sim) / 1024:.0f} KiB", f"{accuracy(sim, ev):.2f} %"
        except Exception as exc:  # noqa: BLE001 - report, do not hide
            sim_size, sim_acc = f"failed: {type(exc).__name__}", "-"
        a0, a1 = accuracy(proto, ev), accuracy(compact, ev)
        left = sum(e["count"] for e in res.stats.get("left_alone", []))
        print(f"| {name} | {file_size(proto) / 1024:.0f} KiB | {folded / 1024:.0f} KiB | {file_size(compact) / 1024:.0f} KiB "
              f"({res.stats['shared']} layers; {left} left alone) | {file_size(proto) / file_size(compact):.2f}x "
              f"| {a0:.2f} -> {a1:.2f} ({a1 - a0:+.2f}) | {ratio:.3f} ({tb:.3f} / {ta:.3f}) | {ratio0:.3f} "
              f"| {sim_size} | {sim_acc} |",
              flush=True)


def byte_parts(proto: onnx.ModelProto) -> dict[str, int]:
    """Serialized bytes of a model by role: packed codes, codebooks, the decoder's nodes (every node
    computing from constants only) and small constants, the model's nodes split into names (node names,
    input/output strings) and the rest (op types, attributes), float initializers (biases, float weights),
    other initializers and value_info."""
    g = proto.graph
    const = {t.name for t in g.initializer}
    decoder_nodes = []
    for n in g.node:       # nodes are in topological order in files graphopt writes
        if all(i in const for i in n.input if i):
            decoder_nodes.append(n)
            const.update(n.output)
    gather_books = {n.input[0] for n in decoder_nodes if n.op_type == "Gather"}
    decoder_inits = {i for n in decoder_nodes for i in n.input}
    parts = dict.fromkeys(["packed codes", "codebooks", "decoder nodes + constants", "model node names",
                           "model node value names", "model node ops + attributes", "float 1-D (biases)",
                           "float weights", "other initializers", "value_info"], 0)
    for t in g.initializer:
        size = t.ByteSize()
        if t.data_type == onnx.TensorProto.UINT8 and t.name in decoder_inits:
            parts["packed codes"] += size
        elif t.name in gather_books:
            parts["codebooks"] += size
        elif t.name in decoder_inits and t.data_type == onnx.TensorProto.INT64:
            parts["decoder nodes + constants"] += size
        elif t.data_type == onnx.TensorProto.FLOAT:
            parts["float 1-D (biases)" if len(t.dims) == 1 else "float weights"] += size
        else:
            parts["other initializers"] += size
    for n in g.node:
        if n in decoder_nodes:
            parts["decoder nodes + constants"] += n.ByteSize()
            continue
        names = len(n.name.encode()) + 2
        strings = sum(len(v.encode()) + 2 for v in list(n.input) + list(n.output))
        parts["model node names"] += names
        parts["model node value names"] += strings
        parts["model node ops + attributes"] += n.ByteSize() - names - strings
    parts["value_info"] = sum(v.ByteSize() for v in g.value_info)
    parts["total"] = file_size(proto)
    return parts


def bytes_table(args) -> None:
    """Where the bytes of the compact files go (``--names keep`` and ``short``), per model."""
    rows = {}
    for name in args.models.split(","):
        original = load(MODELS / f"{name}.onnx")
        data = load_data(MODELS / "fmnist_calib.npz", original).head(64)
        for short in (False, True):
            model = original.clone()
            run_pipeline(build_pipeline("lossless"), model, PassContext(data=data))
            run_pass(model, "weight_sharing", {"bits": args.bits, "encoding": "compact", "refit": False,
                                               "short_names": short}, None)
            run_pass(model, "dedupe_initializers", {}, None)
            rows[(name, short)] = byte_parts(to_proto(model))
        rows[(name, "float")] = {"total": file_size(onnx.load(str(MODELS / f"{name}.onnx")))}
    keys = list(next(iter(v for k, v in rows.items() if k[1] is True)).keys())
    models = args.models.split(",")
    print("| part (bytes) | " + " | ".join(f"{m} names kept | {m} short names" for m in models) + " |")
    print("|---|" + "---|---|" * len(models))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{rows[(m, False)][key]} | {rows[(m, True)][key]}" for m in models) + " |")
    print("| size ratio vs float file | " + " | ".join(
        f"{rows[(m, 'float')]['total'] / rows[(m, False)]['total']:.2f}x | "
        f"{rows[(m, 'float')]['total'] / rows[(m, True)]['total']:.2f}x" for m in models) + " |")


def inits(args) -> None:
    """k-means variants on the dense model: initialisation x activation weighting x LS re-fit."""
    print("| model | bits | init | weighted | LS re-fit | accuracy | drop |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        original = load(MODELS / f"{name}.onnx")
        calib = load_data(MODELS / "fmnist_calib.npz", original)
        ev = load_data(MODELS / "fmnist_eval.npz", original)
        base = accuracy(original, ev)
        for bits in args.bits:
            for init in ("linear", "density", "kmeans++"):
                for weighted in (False, True):
                    for refit in (False, True):
                        m = original.clone()
                        run_pass(m, "weight_sharing", {"bits": bits, "init": init, "weighted": weighted,
                                                       "refit": refit, "min_weights": 0}, calib)
                        acc = accuracy(m, ev)
                        print(f"| {name} | {bits} | {init} | {weighted} | {refit} | {acc:.2f} | {base - acc:+.2f} |",
                              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("lenet")
    p.add_argument("--models", default="lenet300,lenet5")
    p.add_argument("--bits", type=lambda s: [int(b) for b in s.split(",")], default=[4, 5])
    p.add_argument("--configs", type=int, default=0, help="only the first N density configurations")
    p.add_argument("--densities", default="", help="density configurations separated by ';' (one model)")
    p.add_argument("--ridge", type=float, default=0.1)
    p.add_argument("--splice", type=int, default=2)
    p.add_argument("--augment", action="store_true", help="add mirrored and shifted calibration images")
    p.add_argument("--seed", type=int, default=0, help="seeds row sampling and k-means")
    p.set_defaults(run=lenet)
    i = sub.add_parser("inits")
    i.add_argument("--models", default="lenet300,lenet5")
    i.add_argument("--bits", type=lambda s: [int(b) for b in s.split(",")], default=[2, 3])
    i.set_defaults(run=inits)
    z = sub.add_parser("zoo")
    z.add_argument("--models", default="vgg,resnet,mobilenetv2,inception,shufflenet,senet")
    z.add_argument("--bits", type=int, default=4)
    z.add_argument("--samples", type=int, default=256)
    z.add_argument("--rounds", type=int, default=30)
    z.set_defaults(run=zoo)
    b = sub.add_parser("bytes")
    b.add_argument("--models", default="mobilenetv2,inception,shufflenet")
    b.add_argument("--bits", type=int, default=4)
    b.set_defaults(run=bytes_table)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
