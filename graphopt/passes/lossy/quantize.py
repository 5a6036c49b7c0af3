"""Quantization (LOSSY): int8 (W8A8) or 4-bit weights with 8-bit activations (W4A8), in onnxruntime's
QDQ format, in the format onnxruntime actually runs fast, with a least-squares re-fit after rounding.

What it does
------------
1. **Layers:** the Conv / ConvTranspose / Gemm / MatMul nodes with a constant float weight of at least
   ``min_weights`` weights; the others are left alone with the reason.
2. **Ranges:** the activation ranges over ``samples`` calibration samples, streamed (``calibrate``:
   ``percentile`` of ``|x|``, the default, ``minmax``, or ``mse``; :mod:`graphopt.measure.qdq`). The
   percentile clips the rare outliers that MinMax spreads every step of the grid over: measured on the
   zoo, each layer's output SNR rises about 1 dB and int8 after pruning costs 0.05 point at most on
   the 10,000 test images (BENCHMARKS.md, "int8 quantization").
3. **Format** (``format=auto``):
   * a model with convs gets static QDQ. Both activation types are built (unsigned ``u8s8``, signed
     ``s8s8``; weights always signed, per channel, symmetric), each is put through onnxruntime's
     optimizer (``ORT_ENABLE_ALL``), and the one that leaves fewer layers running in float between a
     DequantizeLinear and a QuantizeLinear wins (ties: ``u8s8``). Measured in issue 18: ``s8s8`` leaves
     a third to a half of the convs float, ``u8s8`` none.
   * a model without convs whose layers are MatMul / Gemm (a transformer) gets dynamic quantization of
     those layers (weights int8 per channel, activations quantized per run): static QDQ wraps every
     LayerNorm, Softmax and residual Add in Q/DQ pairs, which the issue measured slower than float.
   * ``weights=int4`` on a model with convs keeps static ``u8s8`` (onnxruntime has no fused 4-bit conv
     kernel: W4A8 is for size and accuracy, its layers run in float on dequantized weights); without
     convs, its MatMul layers become onnxruntime's ``MatMulNBits``: symmetric 4-bit weights with a scale
     per ``block_size`` (32) weights along the input, activations quantized to 8 bits at run time
     (``accuracy_level`` 4). Static 8-bit activations are what a transformer cannot take: on the
     corpus's BERT text classifier static W4A8 lost 6.0 points (1.5 after the re-fit), onnxruntime's
     static int8 6.25; block-wise W4A8 with dynamic activations +0.25 (BENCHMARKS.md). Gemm layers stay
     float there (``MatMulNBits`` is MatMul only), and there is no re-fit (round to nearest per block).
4. **Left float:** every layer onnxruntime still runs in float in the chosen format is excluded and the
   model rebuilt, so it costs no Q/DQ pair (``keep_unfused=true`` keeps them quantized); the stats list
   them as ``left_alone`` with the reason.
   **Weight bits** by the target CPU (``--target-cpu``, :mod:`graphopt.measure.target`): x86 without VNNI
   sums u8 x s8 products in saturating 16-bit pairs, so 8-bit weights can overflow there. When this
   machine's kernels overflow as the target's do, the overflow is measured (:func:`narrow_if_saturating`:
   7-bit weights below ``SATURATION_SNR_DB``); else the target's kind decides (7 bits without VNNI, 8
   with VNNI or on ARM).
   **Speed** (``latency=cost``, the default; int8 weights): a layer the target CPU's latency profile prices
   slower as its fused int8 kernel than as its float kernel stays float, then an int8 region whose
   kernels save less than its quantize / transpose / dequantize nodes cost, then the whole model if it
   is not priced faster (:mod:`graphopt.compress.int8speed`; prices at ``latency_batch``, never timed, so
   the written model does not depend on the machine's load). The stats' ``int8_speed`` give every
   layer's two prices and the predicted int8 / float time; ``left_alone`` the reason per layer. When
   nothing is faster the pass quantizes nothing and says so. ``latency=off`` quantizes every fused layer
   (int8 for size); on an AVX2 target the stats' notice then says int8 buys size there, not speed.
   W4A8 is for size by design (its layers run in float on dequantized weights): the rule does not apply.
5. **Re-fit** (``refit``, static formats only): layer by layer in topological order, the layer's
   *quantized* inputs in the model quantized so far against the float original's outputs at the same
   layer, streamed into :class:`graphopt.compress.lstsq.CrossGram`; the codes, scales and bias come from
   :func:`graphopt.compress.quantgrid.quantize_layer`: ``rtn`` keeps onnxruntime's rounding, ``bias``
   re-fits the bias (mean error folded in), ``weights`` solves the layer by least squares and rounds it
   GPTQ-style with the bias taking the rest. Each layer's relative output error before and after is in
   the stats. ConvTranspose, grouped convs and layers :class:`~graphopt.compress.lstsq.LinearLayer`
   does not model keep onnxruntime's rounding.

A model below opset 13 is converted to opset 13 first (per-channel ``DequantizeLinear`` needs its
``axis``; :func:`graphopt.compress.ortquant.at_per_channel_opset`), and the stats say so (``opset``).

Refused (the pass does nothing and says why): no sample data; no layer to quantize; a model that is
already quantized; a model below opset 13 that onnx's version converter cannot convert. onnxruntime's
quantizer is called in memory (:mod:`graphopt.compress.ortquant`): it writes no file, here or next to
the input.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx

from graphopt.compress import int8speed, lstsq, ortquant, quantgrid
from graphopt.compress.options import calibration
from graphopt.core.ir import Model, Node
from graphopt.core.ledger import LeftAlone
from graphopt.core.manager import Option, Pass, PassContext, PassResult, register
from graphopt.core.onnx_io import from_proto, to_proto
from graphopt.measure import ort as gort
from graphopt.measure import qdq
from graphopt.measure import target as targets
from graphopt.measure.calibration import SampleData, check_data, feed_batch_size

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, None)


@register
class Quantize(Pass):
    name = "quantize"
    summary = ("LOSSY: int8 / W4A8 quantization (onnxruntime QDQ, dynamic or MatMulNBits), the format chosen by "
               "what onnxruntime fuses, layers the target's profile prices slower as int8 left float, "
               "least-squares re-fit after rounding")
    lossless = False
    options = {
        "weights": Option("int8", "weight bits: int8 (W8A8) or int4 (W4A8, 8-bit activations)", str,
                          ("int8", "int4")),
        "format": Option("auto", "activation format: auto (by what onnxruntime fuses), u8s8 / s8s8 (static QDQ, "
                                 "unsigned / signed activations), dynamic (MatMul/Gemm, activations per run)",
                         str, ("auto", "u8s8", "s8s8", "dynamic")),
        "calibrate": Option("percentile", "activation ranges: percentile of |x|, minmax, or mse (the clip with the least "
                                  "rounding + clipping error)", str, qdq.CALIBRATORS),
        "percentile": Option(99.999, "calibrate=percentile: the percentile of |x| kept", float, low=50, high=100),
        "refit": Option("weights", "after rounding: rtn (onnxruntime's rounding), bias (least-squares bias), "
                                   "weights (least-squares weights rounded GPTQ-style, then the bias)",
                        str, quantgrid.METHODS),
        "keep_unfused": Option(False, "quantize layers onnxruntime would run in float between Q/DQ too", bool),
        "latency": Option("cost", "cost: layers (and int8 regions) the target's latency profile prices slower "
                                  "quantized stay float; off: quantize every fused layer (int8 for size)",
                          str, ("cost", "off")),
        "latency_batch": Option(1, "batch size the latency prices are taken at (latency=cost)", int, low=1),
        "block_size": Option(32, "W4A8 without convs (MatMulNBits): weights per 4-bit scale", int,
                             (16, 32, 64, 128, 256)),
        "damp": Option(0.01, "refit=weights: damping of the GPTQ Hessian, relative to its mean diagonal", float,
                       low=0),
        **calibration(samples=(256, "for the ranges and the re-fit"),
                      max_rows=(4096, "the re-fit's input rows per layer, subsampled"),
                      ridge=(1e-3, "the re-fit's pull towards the original weights"),
                      min_weights=(0, "layers with fewer weights stay float")),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opt = lambda key: self.opt(ctx, key)  # noqa: E731
        if ctx.data is None:
            return PassResult(False, {"quantized": 0, "skipped": "quantization needs sample data"})
        float_proto = ortquant.named(to_proto(model))
        if qdq.is_quantized(float_proto):
            return PassResult(False, {"quantized": 0, "skipped": "the model is already quantized"})
        float_proto, opset_note = ortquant.at_per_channel_opset(float_proto)
        if float_proto is None:
            return PassResult(False, {"quantized": 0, "skipped": opset_note})
        fmodel = from_proto(float_proto)
        left = LeftAlone()
        small: set[str] = set()
        layers = candidate_layers(fmodel, opt("min_weights"), left, small)
        if not layers:
            return PassResult(False, left.into({"quantized": 0, "skipped": "no Conv/ConvTranspose/Gemm/MatMul "
                                                                           "with a constant float weight"}))
        data = ctx.data.head(min(opt("samples"), ctx.data.n_samples))
        bits = 8 if opt("weights") == "int8" else 4
        fmt = choose_format(opt("format"), layers, bits)
        stats: dict[str, Any] = {"weights": opt("weights"), "format": fmt}
        if opset_note:
            stats["opset"] = opset_note
        if fmt == "dynamic" and bits == 4:
            proto = ortquant.blockwise_4bit(float_proto, block_size=opt("block_size"), exclude=small)
            for node in layers:
                if node.op_type != "MatMul" and node.name not in small:
                    left.add("W4A8 without convs is onnxruntime's MatMulNBits, which takes MatMul layers only; "
                             "left float", node.name)
            stats["format"] = f"dynamic (MatMulNBits: 4-bit weights, {opt('block_size')} a scale; int8 activations)"
            stats["refit"] = ("none (block-wise 4-bit weights, rounded to nearest: a scale per "
                              f"{opt('block_size')} weights keeps the rounding error small)")
        elif fmt == "dynamic":
            for name in bottleneck_factors(fmodel, layers):
                left.add("the second factor of a low-rank pair: quantizing the rank-r bottleneck between two "
                         "quantized factors costs accuracy (two roundings where the layer had one); left float",
                         name)
                small.add(name)

            def build_dynamic(exclude: set[str]) -> onnx.ModelProto:
                return ortquant.dynamic(float_proto, exclude=exclude | small, op_types=("MatMul", "Gemm"))
            slower = faster_only(fmodel, layers, build_dynamic, float_proto, data, opt, ctx, stats, left,
                                 dynamic=True)
            proto = build_dynamic(slower)
            stats["refit"] = "none (dynamic quantization has no fixed input grid to fit against)"
        else:
            ctx.say("quantize: activation ranges")
            ranges = qdq.activation_ranges(fmodel, data, activation_names(fmodel), method=opt("calibrate"),
                                           percentile=opt("percentile"))
            stats["calibrate"] = opt("calibrate")
            proto, fmt, trials, excluded = build_static(float_proto, ranges, opt("format"), fmt, bits,
                                                        {n.name for n in layers}, opt("keep_unfused"), left, small)
            if bits == 8:
                proto, bits = narrow_if_saturating(proto, float_proto, ranges, fmt, excluded, data, trials,
                                                   targets.of(ctx))
            stats["format"], stats["format_trials"] = fmt + ("" if bits != 7 else " (7-bit weights)"), trials
            if bits != 4:  # W4A8 runs in float on dequantized weights: for size, never for speed
                fused = [n for n in layers if n.name not in excluded]

                build_static_excluding = LastBuild(
                    lambda exclude, fmt=fmt, bits=bits: ortquant.static_qdq(
                        float_proto, ranges, fmt=fmt, weight_bits=bits, exclude=exclude | excluded),
                    built=proto)  # the format trials' model is the one with nothing more excluded
                slower = faster_only(fmodel, fused, build_static_excluding, float_proto, data, opt, ctx, stats,
                                     left, dynamic=False)
                proto = build_static_excluding(slower)
            if opt("refit") != "rtn":
                stats["refit"] = refit(proto, fmodel, data, bits, opt, ctx)
            else:
                stats["refit"] = {"method": "rtn"}
        quantized = len(ortquant.weight_slots(proto)) if fmt != "dynamic" else _count_dynamic(proto)
        if quantized == 0:
            target = targets.of(ctx)
            why = (f"no layer is priced faster quantized on {target.name} (stats int8_speed; "
                   "quantize.latency=off quantizes for size)" if stats.get("int8_speed") else
                   "no layer is faster quantized in any format")
            if stats.get("int8_speed"):
                stats["notice"] = (f"nothing quantized: on {target.name} no layer is priced faster as int8 "
                                   "(its profile's int8 kernels, conversions included); the model stays float. "
                                   "--option quantize.latency=off quantizes every fused layer, for size")
            return PassResult(False, left.into({**stats, "quantized": 0, "skipped": why}))
        _adopt(model, proto)
        stats["quantized"] = quantized
        stats["layers"] = len(layers)
        if opt("latency") == "off" and (notice := speed_notice(targets.of(ctx))):
            stats["notice"] = notice
        elif (speed := stats.get("int8_speed")) and speed.get("layers_left_float"):
            stats["notice"] = (f"{speed['layers_faster']} layers int8, {speed['layers_left_float']} left float: "
                               f"priced slower as int8 on {speed['target']} (stats int8_speed)")
        return PassResult(True, left.into(stats))


def _adopt(model: Model, proto: onnx.ModelProto) -> None:
    """Make ``model`` the quantized ``proto`` (the pass's result is onnxruntime's quantizer's graph)."""
    proto.ir_version = model.ir_version or proto.ir_version
    new = from_proto(proto)
    model.graph, model.extras, model.functions = new.graph, new.extras, new.functions


def _count_dynamic(proto: onnx.ModelProto) -> int:
    return sum(node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger", "MatMulNBits")
               for node in proto.graph.node)


def candidate_layers(model: Model, min_weights: int, left: LeftAlone, small: set[str]) -> list[Node]:
    """The main graph's layers with a constant float weight (topological order); the rest to ``left``, and
    the names of those below ``min_weights`` (which the quantizer must be told to leave float) to ``small``."""
    graph = model.graph
    out = []
    for node in graph.toposort():
        if node.op_type not in ortquant.LAYER_OPS or node.domain not in ("", "ai.onnx"):
            continue
        weight = graph.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None or weight.dtype.kind != "f":
            if node.op_type != "MatMul":  # a MatMul of two activations (attention) is not a layer
                left.add("weight is not a constant float tensor", node.name)
            continue
        if weight.size < min_weights:
            left.add(f"fewer than min_weights={min_weights} weights", node.name)
            small.add(node.name)
            continue
        out.append(node)
    return out


def bottleneck_factors(model: Model, layers: list[Node]) -> list[str]:
    """The layers that read, with nothing in between, the output of another layer they alone read: the
    second factor of a low-rank pair ``x U V``. With dynamic quantization (per-tensor activation scales)
    the rank-r tensor between them is rounded on top of both factors' weights: measured on the corpus's
    BERT text classifier after ``--preset lowrank``, quantizing every factor lost 3.25 points against
    lowrank alone, the second factors left float 0.75 (smoothing the bottleneck's channels did not
    help: 3.0). The first factor still quantizes."""
    graph = model.graph
    names = {n.name for n in layers}
    out = []
    for node in layers:
        producer = graph.producer(node.inputs[0])
        if (producer is not None and producer.name in names and producer.op_type in ("MatMul", "Gemm")
                and len(graph.consumers(node.inputs[0])) == 1):
            out.append(node.name)
    return out


def activation_names(model: Model) -> list[str]:
    """The main graph's float inputs and node outputs: the tensors the quantizer may need ranges for."""
    graph = model.graph
    names = [v.name for v in graph.inputs if v.dtype in _FLOAT_TYPES]
    for node in graph.toposort():
        names.extend(v.name for v in node.outputs if v is not None and v.dtype in _FLOAT_TYPES)
    return names


def choose_format(requested: str, layers: list[Node], bits: int) -> str:
    """The format to build first (module docstring, step 3); ``auto`` for a static model is settled by
    :func:`build_static`'s trials."""
    has_conv = any(n.op_type in ("Conv", "ConvTranspose") for n in layers)
    has_matmul = any(n.op_type == "MatMul" for n in layers)
    if requested != "auto":
        return requested if not (requested == "dynamic" and bits == 4 and not has_matmul) else "u8s8"
    if not has_conv and (bits == 8 or has_matmul):
        return "dynamic"
    return "u8s8"


def build_static(float_proto: onnx.ModelProto, ranges: dict[str, qdq.Range], requested: str, fmt: str, bits: int,
                 layers: set[str], keep_unfused: bool, left: LeftAlone, small: set[str]
                 ) -> tuple[onnx.ModelProto, str, list[dict[str, Any]], set[str]]:
    """The static QDQ model: the format with the fewest layers onnxruntime leaves float (``auto``), then
    rebuilt with those layers excluded (module docstring, steps 3-4). Returns the model, its format, the
    trials (format, layers left float) and the layers excluded."""
    formats = ["u8s8", "s8s8"] if requested == "auto" and bits == 8 else [fmt]
    trials = []
    best: tuple[int, str, onnx.ModelProto, set[str]] | None = None
    for candidate in formats:
        proto = ortquant.static_qdq(float_proto, ranges, fmt=candidate, weight_bits=bits, exclude=small)
        unfused = qdq.float_layers(gort.optimized(proto)) & layers
        trials.append({"format": candidate, "layers_left_float": len(unfused)})
        if best is None or len(unfused) < best[0]:
            best = (len(unfused), candidate, proto, unfused)
    _, fmt, proto, unfused = best
    if bits == 4:
        left.add("int4 weights: onnxruntime has no fused 4-bit kernel for this layer; it runs in float on "
                 "dequantized weights (smaller, not faster)", next(iter(sorted(unfused)), None), count=len(unfused))
        return proto, fmt, trials, set(small)
    if unfused and not keep_unfused:
        for name in sorted(unfused):
            left.add(f"onnxruntime fuses no int8 kernel for it in {fmt}: quantized it would run in float "
                     f"between DequantizeLinear and QuantizeLinear (slower); left float", name)
        proto = ortquant.static_qdq(float_proto, ranges, fmt=fmt, weight_bits=bits, exclude=unfused | small)
        still = qdq.float_layers(gort.optimized(proto)) & layers
        trials.append({"format": fmt, "excluded": len(unfused), "layers_left_float": len(still)})
        return proto, fmt, trials, unfused | small
    return proto, fmt, trials, set(small)


#: Below this SNR between onnxruntime's fused integer kernels and the QDQ arithmetic they replace, the
#: kernels overflow (:func:`graphopt.measure.qdq.deployed_snr_db`: 11-28 dB overflowing, >= 50 dB not).
SATURATION_SNR_DB = 40.0


def narrow_if_saturating(proto: onnx.ModelProto, float_proto: onnx.ModelProto, ranges: dict[str, qdq.Range],
                         fmt: str, excluded: set[str], data: SampleData, trials: list[dict[str, Any]],
                         target: targets.Target) -> tuple[onnx.ModelProto, int]:
    """The model with 7-bit weights when its 8-bit one overflows in onnxruntime's integer kernels on the
    target CPU, else as it is; returns it and its weight bits. The layers left float stay float.

    Measured on this machine when its integer kernels overflow as the target's do (both without VNNI, or
    both with dot products); else decided by the target's kind: u8 x s8 pairs summed in saturating 16-bit
    lanes (x86 without VNNI) get 7-bit weights, since that cannot be measured here; VNNI and ARM kernels
    keep 8 bits."""
    if not target.int8_like_host:
        narrow = target.kind.int8_saturates
        trials.append({"format": fmt + (" (7-bit weights)" if narrow else ""), "target_cpu": target.name,
                       "decided_by": (f"{target.name}'s int8 kernels ({target.kind.int8}) "
                                      f"{'can overflow with 8-bit weights' if narrow else 'do not overflow'}; "
                                      "this machine's are not the same, so it is not measured here")})
        if not narrow:
            return proto, 8
        return ortquant.static_qdq(float_proto, ranges, fmt=fmt, weight_bits=7, exclude=excluded), 7
    feeds = data.feed(0, feed_batch_size(float_proto, 64, data))
    snr = qdq.deployed_snr_db(proto, feeds)
    trials.append({"format": fmt, "deployed_vs_qdq_snr_db": round(snr, 1)})
    if snr >= SATURATION_SNR_DB:
        return proto, 8
    narrow = ortquant.static_qdq(float_proto, ranges, fmt=fmt, weight_bits=7, exclude=excluded)
    snr7 = qdq.deployed_snr_db(narrow, feeds)
    trials.append({"format": f"{fmt} (7-bit weights)", "deployed_vs_qdq_snr_db": round(snr7, 1)})
    return narrow, 7


class LastBuild:
    """``build(exclude)`` keeping the last model it built: the speed rule builds, to price it, the model
    the pass then writes, and starts from the one the format trials built (``built``, for no exclusion).
    One model kept, not every round's (ResNet-50's QDQ model is 100 MB)."""

    def __init__(self, build: int8speed.Build, built: onnx.ModelProto | None = None) -> None:
        self._build = build
        self._last = (frozenset(), built) if built is not None else None

    def __call__(self, exclude: set[str]) -> onnx.ModelProto:
        key = frozenset(exclude)
        if self._last is None or self._last[0] != key:
            self._last = (key, self._build(set(exclude)))
        return self._last[1]


def faster_only(fmodel: Model, layers: list[Node], build: int8speed.Build, float_proto: onnx.ModelProto,
                data: SampleData, opt: Any, ctx: PassContext, stats: dict[str, Any], left: LeftAlone, *,
                dynamic: bool) -> set[str]:
    """With ``latency=cost``, the nodes to leave float because the target's profile prices them (or their
    int8 region, or the whole int8 model) slower quantized (:mod:`graphopt.compress.int8speed`); the
    layers go to ``left`` with the reason, the prices to ``stats["int8_speed"]``."""
    if opt("latency") == "off" or not layers:
        return set()
    target = targets.of(ctx)
    ctx.say("quantize: pricing int8 against float")
    feed = next(iter(check_data(float_proto, data.head(1)).batches(1)))
    decision = int8speed.keep_faster(fmodel, layers, build, float_proto, feed, target.latency,
                                     target=target.name, rate=int8speed.int8_rate(target.kind),
                                     batch=opt("latency_batch"), dynamic=dynamic)
    for name, why in sorted(decision.slower.items()):
        left.add(why, name)
    stats["int8_speed"] = {"target": target.name, "profile": target.profile_line(), **decision.stats}
    return decision.exclude


def speed_notice(target: targets.Target) -> str | None:
    """What to say when the target's int8 kernels are not expected to be faster than float."""
    if target.kind.int8_saturates and target.kind.block == 8:
        return (f"on {target.name} (no VNNI) onnxruntime's int8 kernels peak at float's rate (one integer "
                "multiply per FMA pair); u8s8 convs measured 0.9-1.2 of the float time, no other form faster "
                "(docs/decisions/quantization.md): int8 buys size here, not speed")
    return None


def refit(proto: onnx.ModelProto, fmodel: Model, data: SampleData, bits: int, opt: Any, ctx: PassContext
          ) -> dict[str, Any]:
    """Re-fit the quantized layers of ``proto`` in place, in topological order (module docstring, step 5);
    returns the summary for the stats."""
    method = opt("refit")
    slots = ortquant.weight_slots(proto)
    fgraph = fmodel.graph
    rng = ctx.rng("quantize")
    records, kept = [], LeftAlone()
    for node in fgraph.toposort():
        slot = slots.get(node.name)
        if slot is None:
            continue
        layer = lstsq.LinearLayer.of(fgraph, node)
        if isinstance(layer, str):
            kept.add(f"onnxruntime's rounding kept: {layer}", node.name)
            continue
        ctx.say(f"quantize: re-fit {node.name}")
        qmodel = from_proto(proto)
        x = next((v for v in qmodel.graph.values() if v.name == slot.x), None)
        if x is None:
            kept.add("onnxruntime's rounding kept: its quantized input is not found", node.name)
            continue
        has_bias = slot.bias_codes is not None or slot.bias_float is not None
        view = dataclasses.replace(layer, x=x)
        gram = lstsq.collect(qmodel, {"layer": view}, data, reference=fmodel, targets={"layer": layer.y.name},
                             max_rows=opt("max_rows"), rng=rng, bias=has_bias, threads=1)["layer"]
        if not quantgrid.enough_rows(gram):
            kept.add("onnxruntime's rounding kept: fewer rows than features", node.name)
            continue
        codes0, scale0 = ortquant.read_codes(proto, slot)
        codes0 = dataclasses.replace(layer, weight=codes0).weight_matrix()
        result = quantgrid.quantize_layer(gram, layer.weight_matrix(), layer.bias_vector(), bits, method,
                                          codes0=codes0, scale0=scale0.reshape(-1), ridge=opt("ridge"),
                                          damp=opt("damp"))
        stored = layer.weight_from_matrix(result.codes)
        ortquant.write_layer(proto, slot, stored, result.scale, result.bias if has_bias else None,
                             ortquant.input_scale(proto, slot))
        records.append({"layer": node.name, "method": result.method, "rtn_error": round(result.rtn_error, 5),
                        "error": round(result.error, 5)})
    out: dict[str, Any] = {"method": method, "layers": len(records)}
    if records:
        out["mean_rtn_error"] = round(float(np.mean([r["rtn_error"] for r in records])), 5)
        out["mean_error"] = round(float(np.mean([r["error"] for r in records])), 5)
        out["per_layer"] = records
    return kept.into(out)
