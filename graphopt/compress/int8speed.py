"""Which layers run faster as int8 on the target CPU: priced by its latency profile, not timed.

Issue 18 asks that a layer slower quantized stay float. Timing each layer on the machine at hand would
make the written model depend on how loaded it was, and would say nothing about a target that is not
this machine; so the decision prices, as every other speed decision of graphopt does, with the target's
latency profile (:mod:`graphopt.measure.latency`: the int8 kinds, calibrated by ``graphopt calibrate``;
the shipped AVX2 profile has them). Three steps, at ``batch``:

1. **Per layer:** ``f`` = the layer's float kernel price (its NCHWc kind), ``q`` = its fused int8
   kernel's (``int8_conv``, ``int8_depthwise``, ``int8_gemm``, ``int8_dynamic_gemm``,
   :func:`graphopt.measure.latency.int8_work`). ``q >= f``: the layer stays float. A layer either price
   cannot be given for (unknown shape, an op the int8 kinds do not cover) stays float too.
2. **Per int8 region:** the remaining layers are quantized and the model put through onnxruntime's
   optimizer; its int8 regions are the connected parts of the graph that pass 8-bit tensors (read off one
   run of the optimized graph on one sample: :func:`deployed`). A region pays for the quantize, layout
   transpose and dequantize nodes on its edges (``convert``, priced over their elements). A region whose
   layers save less than its conversions cost, ``sum(f - q) <= sum(convert)``, stays float whole.
3. **The whole model:** float time ``T_f`` (every node's float price, plus the layout reorders of the
   float model as onnxruntime optimizes it) against int8 time ``T_q = T_f - sum(f - q) + convert_q -
   convert_f + other_q - other_f``: the int8 model's conversions replace the float model's reorders, and
   every other node of either optimized graph (activations, normalizations, pools, concats) is priced
   element-wise, so an op onnxruntime fuses in one graph and not in the other is counted (DenseNet's
   pre-activation BatchNormalizations fold into the float NCHWc convs but run alone in float between a
   dequantize and a quantize in the int8 graph: priced 0.94 of float without this term, measured 1.18).
   ``T_q >= T_f``: nothing is quantized.

**No 8-bit pooling in NCHW.** onnxruntime runs an 8-bit MaxPool or AveragePool in the NHWC layout
(``NhwcMaxPool``, vectorized) where the int8 kernels around it are NHWC; one whose producer stayed
float runs its generic NCHW pooling, which the profile does not price. On inception (an AVX512-VNNI CPU,
batch 64) the stem conv, priced 7 % slower as int8, stayed float, and the 8-bit MaxPools after it took
19.2 ms, 74 % of the int8 model's kernel time, where as ``NhwcMaxPool`` all of them take 1.0: the model ran
at 2.02 of float time where it was priced faster. Leaving the pool float does not help: onnxruntime's
QDQ propagation moves the quantize of its consumers above it again. So the float layer that feeds such
a pool (:meth:`Deployed.nchw_pools`, :func:`feeding_layer`) is quantized after all, and the model built
and priced again (step 2's rounds); if an 8-bit NCHW pool is still there at the end (no layer feeds it,
or its region was dropped and came back), nothing is quantized.

A profile without int8 prices (calibrated before graphopt priced int8, or none for the target: MACs)
prices ``q`` as ``rate * f`` with the target kind's int8 rate (:func:`int8_rate`: 0.5 where the CPU has
int8 dot products, VNNI or ARM's ``sdot``; 1 otherwise, where onnxruntime's integer kernels peak at
float's rate, docs/decisions/quantization.md), and conversions as element-wise moves. With a rate of 1
no layer is cheaper quantized, so nothing is.

Deterministic: prices are a pure function of shapes and the profile; the one onnxruntime run reads
shapes and dtypes, never times.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import onnx

from graphopt.core.ir import Model, Node
from graphopt.measure import latency as lat
from graphopt.measure import ort as gort
from graphopt.measure.analysis import shape_table
from graphopt.measure.cpu import Kind

__all__ = ["KERNEL_OPS", "Decision", "Deployed", "LayerPrice", "Region", "deployed", "int8_rate", "keep_faster", "layer_of",
           "layer_prices", "pricing_shapes", "regions"]

_TOKEN = re.compile(r"_token_\d+$")
#: Pooling ops onnxruntime runs in NCHW on 8-bit tensors with its generic kernel (NHWC ones are ``Nhwc*``).
NCHW_POOLS = frozenset({"MaxPool", "AveragePool"})

#: The ops of an optimized graph that are a layer's kernel (priced per layer, float or int8).
KERNEL_OPS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose", "ConvInteger", "QLinearConv",
                        "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "QGemm", "QLinearMatMul", "MatMulInteger",
                        "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits"})


def int8_rate(kind: Kind) -> float:
    """int8 price over float price where the profile has no int8 kinds: 0.5 with int8 dot products (VNNI,
    ARM ``sdot``: four multiply-adds per lane and instruction against one FMA), 1 without."""
    return 0.5 if kind.int8 in ("vnni", "dot") else 1.0


@dataclass(frozen=True)
class LayerPrice:
    """One layer's predicted seconds as a float kernel and as its fused int8 kernel (``None``: unknown)."""

    name: str
    float_s: float | None
    int8_s: float | None

    @property
    def gain(self) -> float:
        """Seconds saved by quantizing it (0 when a price is unknown)."""
        if self.float_s is None or self.int8_s is None:
            return 0.0
        return self.float_s - self.int8_s


def pricing_shapes(model: Model, feed: Mapping[str, np.ndarray], batch: int) -> dict[str, tuple[int, ...]]:
    """The graph inputs' shapes to price at: a sample's (so a sequence length or an image size the model
    leaves open is the data's), with ``batch`` for a first dim the model leaves open."""
    out = {}
    for value in model.graph.inputs:
        if value.is_initializer or value.name not in feed:
            continue
        dims = list(np.shape(feed[value.name]))
        declared = value.shape or ()
        if dims and declared and not isinstance(declared[0], int):
            dims[0] = batch
        out[value.name] = tuple(int(d) for d in dims)
    return out


def layer_prices(layers: Iterable[Node], latency: lat.LatencyModel, table: Any, *, dynamic: bool, rate: float
                 ) -> dict[str, LayerPrice]:
    """Each layer's :class:`LayerPrice` at the shapes of ``table`` (a shape table of the model at the
    pricing batch; module docstring, step 1; ``rate`` when the profile has no int8 kinds)."""
    dims = lat.concrete_dims(table)
    out = {}
    for node in layers:
        f = latency.node(node, dims)
        if latency.has_int8:
            q = latency.time(lat.int8_work(node, dims, dynamic=dynamic))
        else:
            q = None if f is None or lat.int8_work(node, dims, dynamic=dynamic) is None else rate * f
        out[node.name] = LayerPrice(node.name, f, q)
    return out


@dataclass
class Deployed:
    """What onnxruntime runs for a model: its optimized graph, each node output's elements (batch 1) and
    which outputs are 8-bit."""

    proto: onnx.ModelProto
    elements: dict[str, int]
    eight_bit: set[str]

    def conversions(self) -> list[onnx.NodeProto]:
        """The optimized graph's quantize, dequantize and layout nodes."""
        return [n for n in self.proto.graph.node if n.op_type in lat.CONVERT_OPS]

    def other_seconds(self, latency: lat.LatencyModel, batch: int) -> float:
        """Predicted seconds of every node that is neither a layer's kernel nor a conversion (activations,
        normalizations, pools, concats, adds: in float or on 8-bit tensors), element-wise over its largest
        input or output at ``batch``. The two graphs differ here where onnxruntime fuses an op in one
        and not the other: a BatchNormalization before a conv (DenseNet's) folds into the float NCHWc
        graph but runs alone, in float between a dequantize and a quantize, in the int8 one."""
        total = 0.0
        for node in self.proto.graph.node:
            if node.op_type in KERNEL_OPS or node.op_type in lat.CONVERT_OPS or node.op_type in lat.FREE:
                continue
            sizes = [self.elements.get(t, 0) for t in (*node.input, *node.output) if t]
            if sizes and max(sizes):
                total += float(latency.time(lat.elementwise_work(max(sizes)).scaled(batch)) or 0.0)
        return total

    @cached_property
    def producers(self) -> dict[str, onnx.NodeProto]:
        """The node that writes each tensor of the optimized graph."""
        return {out: n for n in self.proto.graph.node for out in n.output}

    def nchw_pools(self) -> list[onnx.NodeProto]:
        """8-bit MaxPool / AveragePool nodes onnxruntime left in NCHW (its generic pooling; module docstring)."""
        return [n for n in self.proto.graph.node if n.op_type in NCHW_POOLS and n.domain in ("", "ai.onnx")
                and n.input and n.input[0] in self.eight_bit]

    def convert_seconds(self, node: onnx.NodeProto, latency: lat.LatencyModel, batch: int) -> float:
        """Predicted seconds of one conversion node at ``batch`` (element-wise price without int8 kinds)."""
        sizes = [self.elements.get(t, 0) for t in (*node.input[:1], *node.output[:1])]
        work = lat.convert_work(max(sizes)).scaled(batch)
        if not latency.has_int8:
            work = lat.Work("elementwise", work.features)
        return float(latency.time(work) or 0.0)


def deployed(proto: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> Deployed:
    """``proto`` through onnxruntime's optimizer, then run once on ``feed`` (one sample) with every node
    output exposed, for the elements and element types of each tensor."""
    optimized = gort.optimized(proto)
    names = [name for node in optimized.graph.node for name in node.output if name]
    values = gort.run(gort.session(gort.with_outputs(optimized, names)), feed, names,
                      what="the optimized graph (int8 pricing)")
    elements = {n: int(v.size) for n, v in values.items()}
    eight_bit = {n for n, v in values.items() if v.dtype in (np.uint8, np.int8)}
    return Deployed(optimized, elements, eight_bit)


def layer_of(node_name: str, layers: set[str]) -> str | None:
    """The float layer an optimized node stands for: its own name, or the name onnxruntime's fusion
    derived from it (``<layer>_token_<n>``, ``<layer>_<suffix>``; the longest layer name that fits)."""
    if node_name in layers:
        return node_name
    base = _TOKEN.sub("", node_name)
    if base in layers:
        return base
    fits = [name for name in layers if node_name.startswith(name + "_")]
    return max(fits, key=len) if fits else None


#: Nodes between a layer's kernel and a pool that feeds on it: activations, layout and quantize nodes.
PASS_THROUGH = frozenset({"QuantizeLinear", "DequantizeLinear", "ReorderOutput", "ReorderInput", "Transpose",
                          "Relu", "Clip", "LeakyRelu", "Sigmoid", "Identity"})


def feeding_layer(dep: Deployed, node: onnx.NodeProto, layers: Mapping[str, str], depth: int = 6) -> str | None:
    """The layer whose kernel computes ``node``'s first input, through at most ``depth`` activation,
    layout or quantize nodes (:data:`PASS_THROUGH`); ``None`` when another op or a graph input comes first.
    ``layers`` maps each layer's output tensor to its name: onnxruntime names an NCHWc conv after its
    output (``a1_nchwc``) and keeps the tensor's name on the reorder after it; a fused kernel keeps the
    layer's name (:func:`layer_of`)."""
    producers = dep.producers
    current = producers.get(node.input[0]) if node.input else None
    for _ in range(depth):
        if current is None:
            return None
        named = next((layers[out] for out in current.output if out in layers), None)
        if named is not None:
            return named
        if current.op_type in KERNEL_OPS:
            return layer_of(current.name, set(layers.values()))
        if current.op_type not in PASS_THROUGH or not current.input:
            return None
        current = producers.get(current.input[0])
    return None


@dataclass
class Region:
    """One connected int8 part of an optimized graph: its layers, the other quantized nodes of the float
    model in it (an Add, a pool: onnxruntime runs them on 8-bit tensors) and its conversion nodes."""

    layers: set[str] = field(default_factory=set)
    others: set[str] = field(default_factory=set)
    conversions: list[onnx.NodeProto] = field(default_factory=list)


def regions(dep: Deployed, layers: set[str], names: set[str]) -> list[Region]:
    """The int8 regions of ``dep`` (module docstring, step 2): nodes joined by the 8-bit tensors they
    produce or read; a conversion node belongs to the region of the 8-bit tensor it reads or writes."""
    nodes = list(dep.proto.graph.node)
    parent = list(range(len(nodes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    touching: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in (*node.input, *node.output):
            if name in dep.eight_bit:
                touching.setdefault(name, []).append(i)
    for ids in touching.values():
        for j in ids[1:]:
            parent[find(j)] = find(ids[0])
    members = {i for ids in touching.values() for i in ids}
    out: dict[int, Region] = {}
    for i in sorted(members):
        region = out.setdefault(find(i), Region())
        node = nodes[i]
        if node.op_type in lat.CONVERT_OPS:
            region.conversions.append(node)
        elif (layer := layer_of(node.name, layers)) is not None:
            region.layers.add(layer)
        elif (other := layer_of(node.name, names)) is not None:
            region.others.add(other)
    return list(out.values())


@dataclass
class Decision:
    """The layers left float for speed and why, every node to leave float (layers and the other nodes of
    regions that do not pay), and the predicted times (module docstring)."""

    slower: dict[str, str] = field(default_factory=dict)
    exclude: set[str] = field(default_factory=set)
    forced: dict[str, str] = field(default_factory=dict)   # layers quantized although priced slower, and why
    stats: dict[str, Any] = field(default_factory=dict)

    def leave(self, name: str, why: str) -> None:
        self.slower.setdefault(name, why)
        self.exclude.add(name)
        self.forced.pop(name, None)

    def all_float(self, layers: Iterable[str], others: set[str], why: str) -> None:
        """Nothing quantized: every one of ``layers`` left float for ``why``, and the ``others`` (the
        model's nodes that are not priced layers) excluded with them."""
        for name in layers:
            self.leave(name, why)
        self.exclude |= others

    def force(self, name: str, why: str) -> None:
        self.slower.pop(name, None)
        self.exclude.discard(name)
        self.forced[name] = why


#: Rounds of step 2: a region left float can leave a neighbour's edges to be re-priced, a layer quantized
#: for a pool changes its neighbours' edges.
MAX_ROUNDS = 6

Build = Callable[[set[str]], onnx.ModelProto]


def keep_faster(model: Model, layers: list[Node], build: Build, float_proto: onnx.ModelProto,
                feed: Mapping[str, np.ndarray], latency: lat.LatencyModel, *, target: str, rate: float,
                batch: int, dynamic: bool) -> Decision:
    """Which of ``layers`` to leave float so that the int8 model is priced faster (module docstring).

    ``build(exclude)`` returns the quantized model with the nodes named in ``exclude`` left float;
    ``feed`` is one sample of the model's inputs; ``target`` names the CPU in the reasons."""
    decision = Decision()
    table = shape_table(model, pricing_shapes(model, feed, batch), batch)
    prices = layer_prices(layers, latency, table, dynamic=dynamic, rate=rate)
    for name, p in prices.items():
        if p.float_s is None or p.int8_s is None:
            decision.leave(name, "no int8 price for it (an op or shape the latency model does not cover); "
                                 "left float")
        elif p.int8_s >= p.float_s:
            decision.leave(name, f"slower quantized on {target}: its int8 kernel is priced at or above its "
                                 f"float kernel (stats int8_speed.prices); left float")
    names = {n.name for n in model.graph.nodes}
    layer_outputs = {v.name: n.name for n in layers if n.name in prices for v in n.outputs[:1] if v is not None}
    conv_f = conv_q = other_f = other_q = 0.0
    dep = None
    if not dynamic:
        base = deployed(float_proto, feed)
        conv_f = sum(base.convert_seconds(n, latency, batch) for n in base.conversions())
        other_f = other_q = base.other_seconds(latency, batch)
        for round_ in range(MAX_ROUNDS + 1):
            quantized = {p for p in prices if p not in decision.exclude}
            if not quantized:
                conv_q, other_q = 0.0, other_f
                break
            dep = deployed(build(set(decision.exclude)), feed)
            conv_q = sum(dep.convert_seconds(n, latency, batch) for n in dep.conversions())
            other_q = dep.other_seconds(latency, batch)
            if round_ == MAX_ROUNDS:  # the conversions of the final choice, priced; no more drops
                break
            dropped = False
            for pool in dep.nchw_pools():
                feeder = feeding_layer(dep, pool, layer_outputs)
                if feeder is not None and feeder in decision.exclude and feeder not in decision.forced:
                    decision.force(feeder, f"quantized although priced slower: left float, it would make "
                                           f"onnxruntime run {pool.name} on 8-bit tensors in NCHW (its generic "
                                           "pooling, many times slower than the NHWC one)")
                    dropped = True
            if dropped:
                continue
            for region in regions(dep, quantized, names - set(prices)):
                cost = sum(dep.convert_seconds(n, latency, batch) for n in region.conversions)
                gain = sum(prices[name].gain for name in region.layers)
                if gain > cost:
                    continue
                dropped = True
                why = (f"its int8 region ({len(region.layers)} layers) saves {us(gain)} us in kernels but "
                       f"its quantize / transpose / dequantize nodes cost {us(cost)} us on {target}; left float")
                for name in region.layers:
                    decision.leave(name, why)
                decision.exclude |= region.others
            if not dropped:
                break
    quantized = [p for name, p in prices.items() if name not in decision.exclude]
    slow_pools = [n.name for n in dep.nchw_pools()] if quantized and dep is not None else []
    if slow_pools:
        why = (f"onnxruntime would run {', '.join(slow_pools)} on 8-bit tensors in NCHW (its generic pooling, "
               f"not priced, many times slower than the NHWC one) and no float layer left feeds it; left float")
        decision.all_float((p.name for p in quantized), names - set(prices), why)
        quantized = []
    gain = sum(p.gain for p in quantized)
    total, _ = lat.model_time(model, latency, batch=batch, table=table)
    delta = conv_q - conv_f + other_q - other_f - gain if quantized else 0.0
    if quantized and delta >= 0:
        why = (f"the whole model is priced no faster as int8 on {target} (kernels save {us(gain)} us, "
               f"conversions add {us(conv_q - conv_f)} us and the other ops {us(other_q - other_f)} us); "
               "left float")
        decision.all_float((p.name for p in quantized), names - set(prices), why)
        quantized, delta = [], 0.0
    decision.stats = {
        "batch": batch, "priced_by": ("the profile's int8 kernels" if latency.has_int8 else
                                      f"float prices x {rate} (the profile has no int8 kernels)"),
        "layers_faster": len(quantized), "layers_left_float": len(decision.slower),
        "quantized_for_pools": dict(decision.forced),
        "conversions_us": us(conv_q - conv_f), "other_ops_us": us(other_q - other_f),
        "float_us": us(total + conv_f) if total is not None else None,
        "int8_us": us(total + conv_f + delta) if total is not None else None,
        "prices": [{"layer": p.name, "float_us": us(p.float_s), "int8_us": us(p.int8_s),
                    "quantized": p.name not in decision.exclude} for p in prices.values()]}
    if total is not None and total + conv_f > 0:
        decision.stats["int8_over_float"] = round((total + conv_f + delta) / (total + conv_f), 3)
    return decision


def us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 2)
