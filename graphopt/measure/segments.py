"""Run only the part of a model after a cut, from activations cached at a few cuts ("checkpoints").

Prune's sensitivity table evaluates the model hundreds of times with one coupling group changed; every
node before the group's first node computes what the unchanged model computes. Number the main graph's
nodes in their (topological) order. The *live* values at position ``p`` are those produced before ``p``
(or graph inputs) and read at ``p`` or later (or graph outputs). With them cached on the samples, an
evaluation that changes nothing before ``p`` runs the *suffix* model: the nodes from ``p`` on, the live
values as its graph inputs (:func:`suffix_model`).

Which cuts to keep (:func:`choose_cuts`): a cut costs the bytes of its live values on all the samples
and saves, for every evaluation it serves, the MACs of the nodes before it. Cuts are taken greedily by
MACs saved per byte within a byte budget (:data:`CHECKPOINT_BYTES`). A ResNet's live set at a block
boundary is one tensor, so a few cuts there save most of the work; inside a DenseNet block every feature
map stays live, so its cuts are dearer.

Exactness: the suffix is the same nodes on the same values. :meth:`Checkpoints.build` runs the unchanged
model's suffix from every kept cut on the first sample and drops a cut whose outputs differ from the full
model's by more than float noise (relative squared error above :data:`EXACT`), so whatever the cut
misses costs speed, never a wrong measurement. A caller whose changed model no longer reads the cut's
values as the suffix expects gets ``None`` from :meth:`Checkpoints.suffix_inputs_ok` and runs the full
model instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphopt.core.onnx_io import is_in_memory
from graphopt.measure import ort as gort
from graphopt.measure.calibration import (ACTIVATION_BYTES, SampleData, batch_for_bytes, check_data,
                                         feed_batch_size, sample_rows)
from graphopt.measure.executor import relative_error

#: Bytes of cached activations (all samples, all cuts) one :class:`Checkpoints` may hold.
CHECKPOINT_BYTES = 384 * 2**20
#: What building one onnxruntime session costs, in multiply-accumulates of model work per byte of its
#: weights (BERT-base's 440 MB: about a second, against about 50·10⁹ MACs/s of inference on this machine).
SESSION_MACS_PER_BYTE = 100.0
#: Largest relative squared error between the unchanged model's suffix and the full model that counts
#: as float noise (onnxruntime may order sums differently in a smaller graph).
EXACT = 1e-8


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Names ``node`` reads: its inputs and every name read inside its subgraphs (outer values included;
    names local to a subgraph may be listed too, which only makes a cut keep more)."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                names |= node_reads(inner)
            names |= {o.name for o in g.output}
    return names


def readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> the nodes of ``graph`` that read it (:func:`node_reads`: inside subgraphs too)."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node_reads(node):
            out.setdefault(name, []).append(node)
    return out


def live_values(graph: onnx.GraphProto, position: int) -> list[str]:
    """The values live at ``position``: defined before it (graph inputs included, initializers not) and
    read at or after it, or graph outputs; in the order they are first read."""
    inits = {t.name for t in graph.initializer}
    defined = {vi.name for vi in graph.input} - inits
    for node in graph.node[:position]:
        defined.update(o for o in node.output if o)
    out: list[str] = []
    seen: set[str] = set()
    for node in graph.node[position:]:
        for name in sorted(node_reads(node)):
            if name in defined and name not in seen:
                seen.add(name)
                out.append(name)
    for o in graph.output:
        if o.name in defined and o.name not in seen:
            seen.add(o.name)
            out.append(o.name)
    return out


def suffix_model(proto: onnx.ModelProto, drop: Iterable[str], *, overridable: Iterable[str] = (),
                 types: Mapping[str, tuple[int, int]] | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """The model without the nodes named in ``drop`` (a prefix), and the names it now reads as graph
    inputs (every value its nodes read that no node of it writes and no initializer holds).

    ``overridable`` initializers are listed as graph inputs too (with their values as defaults), so a
    session can be fed new values for them. The graph outputs are kept; one that a dropped node wrote
    becomes an input passed through. An input is declared as the model declares the value, else from
    ``types[name] = (element type, rank)`` with dims left unknown (onnxruntime refuses an input without a
    type, onnx's checker one without a shape)."""
    drop = set(drop)
    kept = [n for n in proto.graph.node if n.name not in drop]
    return _build(proto, kept, list(proto.graph.output), overridable, types)


def segment_model(proto: onnx.ModelProto, drop: Iterable[str], outputs: Sequence[str], *,
                  types: Mapping[str, tuple[int, int]] | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """The part of the model that computes ``outputs`` without the nodes named in ``drop``: the nodes the
    outputs depend on, the values they read from outside as graph inputs (declared as in
    :func:`suffix_model`). Returns the model and those inputs."""
    drop = set(drop)
    nodes = [n for n in proto.graph.node if n.name not in drop]
    writer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needed: set[int] = set()
    stack = [writer[o] for o in outputs if o in writer]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        stack.extend(writer[r] for r in node_reads(nodes[i]) if r in writer and writer[r] not in needed)
    known = {vi.name: vi for vi in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input)}
    elem = gort.known_elem_types(proto.graph)
    infos = []
    for name in outputs:
        vi = onnx.ValueInfoProto(name=name)
        if name in known and known[name].type.tensor_type.elem_type:
            vi.CopyFrom(known[name])
        elif name in elem:
            vi.type.tensor_type.elem_type = elem[name]
        infos.append(vi)
    return _build(proto, [nodes[i] for i in sorted(needed)], infos, (), types)


def _build(proto: onnx.ModelProto, kept: Sequence[onnx.NodeProto], outputs: Sequence[onnx.ValueInfoProto],
           overridable: Iterable[str], types: Mapping[str, tuple[int, int]] | None
           ) -> tuple[onnx.ModelProto, list[str]]:
    """A model of ``kept`` nodes (in order) with ``outputs``; see :func:`suffix_model` for its inputs."""
    out = onnx.ModelProto()
    out.ir_version = max(proto.ir_version, 4)
    out.opset_import.extend(proto.opset_import)
    out.functions.extend(proto.functions)
    out.producer_name = proto.producer_name
    g, src = out.graph, proto.graph
    g.name = src.name
    g.node.extend(kept)
    written = {o for n in kept for o in n.output if o}
    reads: set[str] = set()
    for n in kept:
        reads |= node_reads(n)
    reads |= {o.name for o in outputs}
    overridable = list(dict.fromkeys(overridable))
    inits = {t.name: t for t in src.initializer}
    g.initializer.extend(t for name, t in inits.items() if name in reads)
    types = dict(types or {})
    declared_vi = {vi.name: vi for vi in list(src.value_info) + list(src.output)}
    inputs = [name for name in _ordered_reads(kept, outputs) if name not in written and name not in inits]
    declared = {vi.name: vi for vi in src.input}
    for name in inputs:
        if name in declared:
            g.input.append(declared[name])
        elif name in declared_vi and declared_vi[name].type.tensor_type.elem_type:
            g.input.append(declared_vi[name])
        else:
            vi = g.input.add()
            vi.name = name
            if name in types:
                elem, rank = types[name]
                vi.type.tensor_type.elem_type = elem
                shape = vi.type.tensor_type.shape
                for _ in range(rank):
                    shape.dim.add()
    for name in overridable:
        t = inits[name]
        g.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    g.output.extend(outputs)
    taken = set(inputs) | set(overridable)
    g.value_info.extend(vi for vi in src.value_info if vi.name not in taken and vi.name in written)
    return out, inputs


def _ordered_reads(nodes: Sequence[onnx.NodeProto], outputs: Sequence[onnx.ValueInfoProto]) -> list[str]:
    out: dict[str, None] = {}
    for n in nodes:
        for name in list(n.input) + sorted(node_reads(n) - set(n.input)):
            if name:
                out.setdefault(name, None)
    for o in outputs:
        out.setdefault(o.name, None)
    return list(out)


def node_macs(model: Any, proto: onnx.ModelProto, input_shapes: Mapping | None) -> list[float]:
    """MACs of each main-graph node of ``proto`` (the export of the IR ``model``) at ``input_shapes``
    (0 where unknown): what :func:`choose_cuts` prices a cut by."""
    from graphopt.measure.analysis import analyze

    per_node = {n.name: n.macs or 0 for n in analyze(model, input_shapes=input_shapes).per_node if not n.scope}
    return [float(per_node.get(n.name, 0)) for n in proto.graph.node]


def choose_cuts(starts: Mapping[Any, tuple[int, int]], macs_before: Sequence[float],
                cut_bytes: Callable[[int], int], budget: int = CHECKPOINT_BYTES,
                cut_cost: Callable[[int], float] | None = None) -> dict[Any, int]:
    """For each key, the cut it is evaluated from (0 = the whole model).

    ``starts[key] = (position, evaluations)``: the first node the key's evaluations change and how many
    there are. ``macs_before[p]`` is the MACs of the nodes before position ``p``; ``cut_bytes(p)`` the
    bytes the live values at ``p`` take on all samples. Greedy: add the cut with the most MACs saved
    (over all evaluations it would serve better than the cuts already kept) per byte, while the bytes fit
    ``budget`` and the saving passes ``cut_cost(p)`` (what the cut's own sessions cost, in the same
    per-sample MACs); each key then uses the last kept cut at or before its position."""
    candidates = sorted({p for p, _ in starts.values() if p > 0})
    kept: list[int] = [0]
    left = int(budget)
    sizes: dict[int, int] = {}

    def serving(p: int, cuts: Sequence[int]) -> int:
        return max(c for c in cuts if c <= p)

    while True:
        best, best_rate = None, 0.0
        for c in candidates:
            if c in kept:
                continue
            if c not in sizes:
                sizes[c] = int(cut_bytes(c))
            if sizes[c] > left:
                continue
            gain = sum(n * max(macs_before[c] - macs_before[serving(p, kept)], 0.0)
                       for p, n in starts.values() if p >= c)
            rate = gain / max(sizes[c], 1)
            if gain > 0 and rate > best_rate and (cut_cost is None or gain > cut_cost(c)):
                best, best_rate = c, rate
        if best is None:
            break
        kept.append(best)
        left -= sizes[best]
    return {key: serving(p, kept) for key, (p, _) in starts.items()}


@dataclass
class Checkpoints:
    """The live values of the unchanged model at a few cuts, on every batch of ``data``.

    ``values[cut][i]`` holds the live values of batch ``i`` (as :meth:`SampleData.batches` yields it at
    ``batch``) that are not graph inputs; ``live[cut]`` names all live values, graph inputs included.
    Picklable (a process pool's workers each get a copy)."""

    data: SampleData
    batch: int
    prefix: dict[int, frozenset[str]] = field(default_factory=dict)    # cut -> node names before it
    live: dict[int, list[str]] = field(default_factory=dict)
    values: dict[int, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    types: dict[str, tuple[int, int]] = field(default_factory=dict)     # live value -> (ONNX type, rank)
    dropped: dict[int, str] = field(default_factory=dict)               # cut -> why it was not kept
    reference: dict[str, np.ndarray] | None = None   # the unchanged model's outputs (when cuts were cached)
    weights: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)  # by-reference weights

    @classmethod
    def build(cls, proto: onnx.ModelProto, data: SampleData, starts: Mapping[Any, tuple[int, int]],
              node_macs: Sequence[float], *, batch_size: int = 64, budget: int = CHECKPOINT_BYTES,
              threads: int | None = None, weights: Mapping[str, np.ndarray] | None = None,
              ) -> tuple[Checkpoints, dict[Any, int]]:
        """Choose the cuts for ``starts`` (see :func:`choose_cuts`; ``node_macs`` per node of ``proto``'s
        main graph, in order), cache their live values over ``data`` and check each; returns the cache
        and each key's cut (0 for a key no kept cut serves). The batch (:attr:`batch`, for every run of a
        measuring session too) is ``batch_size``, or fewer samples when the model's largest value on the
        first sample times the batch would pass :data:`calibration.ACTIVATION_BYTES`: onnxruntime's arena
        keeps a few of them. ``weights`` are the arrays of ``proto``'s by-reference stubs
        (:func:`graphopt.measure.ort.structure`); every session made here and by :meth:`session` gets them."""
        graph = proto.graph
        self = cls.none(proto, data, batch_size, weights=weights)
        macs_before = np.concatenate([[0.0], np.cumsum(np.asarray(node_macs, dtype=np.float64))]).tolist()
        inputs = {vi.name for vi in graph.input}
        candidates = sorted({p for p, _ in starts.values() if p > 0})
        live = {p: live_values(graph, p) for p in candidates}
        outputs = [o.name for o in graph.output]
        needed = {n for p in candidates for n in live[p] if n not in inputs} | set(outputs)
        typed = gort.known_elem_types(graph)
        values = {o for node in graph.node for o in node.output if o in typed}
        first = _FirstSample.of(proto, data, needed | values, self.weights)   # one run: the sizes of both questions
        self.batch = batch_for_bytes(proto, data, batch_size, lambda: max(
            (int(a.nbytes) for n, a in first.values.items() if n in values), default=0), ACTIVATION_BYTES)
        first.values = {n: a for n, a in first.values.items() if n in needed}
        per_sample = {n: int(a.nbytes) for n, a in first.values.items()}
        self.types = _types({n: a for n, a in first.values.items() if n not in outputs})
        samples = data.n_samples

        def cut_bytes(p: int) -> int:
            return int(sum(per_sample.get(n, 0) for n in live[p] if n not in inputs) * samples)

        # A cut costs two sessions of its suffix (the check here, the caller's measuring one): about
        # SESSION_MACS_PER_BYTE per byte of the suffix's weights, taken here as the model's weights times
        # the suffix's share of the MACs. Below that saving a cut is slower than running from an earlier one
        # (BERT-base's table bought 59 cuts, one before nearly every layer, each with its two sessions).
        weight_bytes = float(sum(_tensor_bytes(t) for t in graph.initializer))
        total = max(macs_before[-1], 1.0)

        def cut_cost(p: int) -> float:
            return 2 * SESSION_MACS_PER_BYTE * weight_bytes * (1.0 - macs_before[p] / total) / max(samples, 1)

        cut_of = (choose_cuts(starts, macs_before, cut_bytes, budget, cut_cost) if candidates
                  else {k: 0 for k in starts})
        cuts = sorted({c for c in cut_of.values() if c > 0})
        if not cuts:
            return self, cut_of
        names = list(dict.fromkeys(n for c in cuts for n in live[c] if n not in inputs))
        sess = gort.session(gort.with_outputs(proto, names), threads=threads, weights=self.weights)
        cached: list[dict[str, np.ndarray]] = []
        reference: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        for feed in data.batches(self.batch):
            got = gort.run(sess, feed, names + outputs, what="checkpoints")
            cached.append({n: got[n] for n in names})
            for o in outputs:
                reference[o].append(sample_rows(got[o], data))
        del sess
        # The same run gives the unchanged model's outputs: the table's reference without another session.
        self.reference = {o: np.concatenate(chunks, axis=0) for o, chunks in reference.items()}
        for c in cuts:
            self.prefix[c] = frozenset(n.name for n in graph.node[:c])
            self.live[c] = live[c]
            self.values[c] = [{n: b[n] for n in live[c] if n in b} for b in cached]
            why = self._check(proto, c, first, threads)
            if why is not None:
                self.dropped[c] = why
                del self.prefix[c], self.live[c], self.values[c]
        return self, {k: (c if c in self.values else 0) for k, c in cut_of.items()}

    @classmethod
    def none(cls, proto: onnx.ModelProto, data: SampleData, batch_size: int = 64, *,
             weights: Mapping[str, np.ndarray] | None = None) -> Checkpoints:
        """No cut: :meth:`run` from cut 0 feeds the data alone (the whole model's suffix is itself)."""
        return cls(data, feed_batch_size(proto, batch_size, data), weights=dict(weights or {}))

    def _check(self, proto: onnx.ModelProto, cut: int, first: _FirstSample, threads: int | None) -> str | None:
        """Why the unchanged model's suffix from ``cut`` is not the full model on the first sample, or
        ``None``. One sample: a suffix wired wrong differs on any, and a batch of a large model through
        every cut's suffix is a large model's whole run again."""
        suffix, inputs = suffix_model(proto, self.prefix[cut], types=self.types)
        if not set(inputs) <= set(self.live[cut]):
            return f"the suffix reads values the cut does not hold: {sorted(set(inputs) - set(self.live[cut]))[:3]}"
        sess = gort.session(suffix, threads=threads, weights=self.weights)
        names = [o.name for o in sess.get_outputs()]
        held = {n: first.values[n] for n in self.live[cut] if n in first.values}
        got = gort.run(sess, {**first.feed, **held}, names, what="a model suffix")
        error = relative_error({n: first.values[n] for n in names}, got)
        return None if error <= EXACT else f"the suffix differs from the full model (relative error {error:.3g})"

    def __getstate__(self) -> dict:
        # A worker's model is whole (EvalContext writes its weights into the bytes it pickles).
        return {**self.__dict__, "weights": {}}

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(b) for batches in self.values.values() for b in batches)

    def suffix_inputs_ok(self, cut: int, inputs: Iterable[str]) -> bool:
        """Whether a suffix that reads ``inputs`` can be fed from ``cut`` (graph inputs come from the data)."""
        return cut in self.live and set(inputs) <= set(self.live[cut])

    def session(self, proto: onnx.ModelProto, cut: int, *, overridable: Iterable[str] = (),
                threads: int | None = None, weights: Mapping[str, np.ndarray] | None = None) -> tuple[Any, int]:
        """A measuring session of ``proto`` (onnxruntime's graph optimizations on, quiet: a measurement, not
        the verification) from ``cut``, with ``overridable`` initializers as inputs, and the cut it runs
        from for :meth:`run`: ``cut``, or 0 (the whole model) when ``proto`` changed before the cut so that
        its suffix reads values the cut does not hold. ``weights``: the arrays of ``proto``'s by-reference
        stubs, when it is not the unchanged model (whose are :attr:`weights`)."""
        overridable = list(overridable)
        start = 0
        if cut or overridable:
            suffix, inputs = suffix_model(proto, self.prefix[cut] if cut else (), overridable=overridable,
                                          types=self.types)
            if not cut or self.suffix_inputs_ok(cut, inputs):
                proto, start = suffix, cut
            del suffix
        return gort.session(proto, optimize=True, threads=threads, quiet=True,
                            weights=self.weights if weights is None else weights), start

    def run(self, sess, cut: int, overrides: Mapping[str, np.ndarray] | None = None, *,
            limit: int | None = None) -> dict[str, np.ndarray]:
        """The suffix session's outputs over the samples (the first ``limit`` batches), concatenated along
        the first axis as :meth:`graphopt.measure.executor.EvalContext.run` gives them; ``cut`` 0 runs
        a session of the whole model on the data alone."""
        names = [o.name for o in sess.get_outputs()]
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        extra = dict(overrides or {})
        for i, feed in enumerate(self.data.batches(self.batch)):
            if limit is not None and i >= limit:
                break
            cached = self.values[cut][i] if cut else {}
            out = gort.run(sess, {**feed, **cached, **extra}, names, what="a model suffix")
            for n in names:
                parts[n].append(sample_rows(out[n], self.data))
        return {n: np.concatenate(chunks, axis=0) for n, chunks in parts.items()}


@dataclass
class _FirstSample:
    """The first sample's feed and the named values the full model computes on it."""

    feed: dict[str, np.ndarray]
    values: dict[str, np.ndarray]

    @classmethod
    def of(cls, proto: onnx.ModelProto, data: SampleData, names: set[str],
           weights: Mapping[str, np.ndarray] | None = None) -> _FirstSample:
        one = check_data(proto, data.head(1))
        feed = next(iter(one.batches(1)))
        if not names:
            return cls(feed, {})
        sess = gort.session(gort.with_outputs(proto, sorted(names)), weights=weights)
        return cls(feed, gort.run(sess, feed, sorted(names), what="one sample"))


def _types(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    """``(ONNX element type, rank)`` of each array: how a suffix model declares the value as an input."""
    return {n: (int(onnx.helper.np_dtype_to_tensor_dtype(a.dtype)), a.ndim) for n, a in arrays.items()}


class Frontier:
    """Values of a model that is changed front to back (prune's re-fit, one layer after the other in
    topological order), computed from a cut that only moves forward.

    Every node before the cut is final: its live values are kept for all samples (at most ``budget``
    bytes), so a layer's input is computed from them by the few nodes between the cut and the layer
    (:func:`segment_model`), not by the whole model from its inputs. :meth:`advance` moves the cut up to
    the next layer that will change; over a whole re-fit each node then runs about twice instead of once
    per layer. A cut whose live values would pass the budget is not taken (the old one stays)."""

    def __init__(self, data: SampleData, batch: int, budget: int = CHECKPOINT_BYTES) -> None:
        self.data, self.batch, self.budget = data, batch, budget
        self.prefix: frozenset[str] = frozenset()
        self.values: list[dict[str, np.ndarray]] = []
        self.types: dict[str, tuple[int, int]] = {}
        self.skipped = 0                       # cuts not taken for the budget

    def batches(self, proto: onnx.ModelProto, names: Sequence[str],
                weights: Mapping[str, np.ndarray] | None = None):
        """``{name: batch}`` for every batch of the data (as :class:`graphopt.measure.calibration.Calibrator`
        yields them), computed from the cut; ``weights`` as for :func:`graphopt.measure.ort.session`."""
        names = list(dict.fromkeys(names))
        held = set(self.values[0]) if self.values else set()
        compute = [n for n in names if n not in held]
        sess = None
        if compute:
            sub, inputs = segment_model(proto, self.prefix, compute, types=self.types)
            graph_inputs = {vi.name for vi in proto.graph.input}
            missing = set(inputs) - held - graph_inputs
            if missing:
                raise ValueError(f"the cut does not hold {sorted(missing)[:3]}: a node before it changed")
            sess = gort.session(sub, weights=weights)
        for i, feed in enumerate(self.data.batches(self.batch)):
            cached = self.values[i] if self.values else {}
            got = gort.run(sess, {**feed, **cached}, compute, what="a model segment") if sess is not None else {}
            yield {n: (got[n] if n in got else cached[n]) for n in names}

    def advance(self, proto: onnx.ModelProto, position: int,
                weights: Mapping[str, np.ndarray] | None = None) -> bool:
        """Move the cut to ``position`` of ``proto``'s node order (every node before it final); ``False``
        when it stays (not forward, or its live values pass the budget)."""
        prefix = frozenset(n.name for n in proto.graph.node[:position])
        if prefix <= self.prefix:
            return False
        inputs = {vi.name for vi in proto.graph.input}
        live = [n for n in live_values(proto.graph, position) if n not in inputs]
        values: list[dict[str, np.ndarray]] = []
        n_batches = len(list(self.data.spans(self.batch)))
        for batch in self.batches(proto, live, weights):
            values.append({n: np.ascontiguousarray(a) for n, a in batch.items()})
            if len(values) == 1 and _nbytes(values[0]) * n_batches > self.budget:
                self.skipped += 1
                return False
        self.values, self.prefix = values, prefix
        if values:
            self.types.update(_types(values[0]))
        return True


def _tensor_bytes(t: onnx.TensorProto) -> int:
    """About the bytes of an initializer's data: its serialized size (reading ``raw_data`` would copy it),
    or for a by-reference stub the size of its array."""
    if is_in_memory(t):
        return int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return int(t.ByteSize())


def _nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))
