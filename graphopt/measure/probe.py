"""Probe inputs: concrete sizes for a model's dynamic dims and valid values for its integer inputs.

A model from the field says ``[batch, 3, H, W]``, ``[-1, 3, -1, -1]`` or ``[batch, sequence]``, and graphopt
must run it with no flags. :func:`choose` picks the sizes, draws values the graph accepts, and proves
both by running the *original* model in onnxruntime (graph optimizations off) on one random sample.

Dims
----
Every dynamic dim of the required inputs (a name, an unnamed dim, or Paddle's ``-1``) joins a *group*:
dims that share a name share a size; an unnamed dim is a group of its own. A group that holds some
input's first axis is a batch group and gets 1 (in the stacked layout of
:func:`graphopt.measure.calibration.sample_layout` the first axis is the sample axis anyway). The
others try the sizes of :data:`LADDER` in order, all groups at the same size, until the original runs:
a multiple of the usual total strides first (a DB detector's FPN adds upsampled maps that only line up
at multiples of its stride; a position table bounds a sequence), then smaller and larger sizes.
Sizes given with ``--input-shape`` are used as they are.

The second shape
----------------
A rewrite can be right at one shape only (a Reshape target baked from a probe). So a second probe is
chosen, different in every probed group and, where possible, different between groups (H ≠ W catches
a transposed spatial axis): from the first probe's size ``v`` of group ``i``, ``v + (i + 1)·v/2``, then
``(i + 2)·v``, then ``2v`` for all, then the other ladder sizes; per-sample models try batch 2 first,
then batch 1. The first candidate the original runs on is taken; when none runs, the model is
verified at one shape and the notes say so.

Values
------
Integer inputs are drawn from what they index (:func:`value_rules`): ids that reach a ``Gather`` as its
indices (through Cast / Reshape / Unsqueeze / Squeeze / Flatten / Identity), or one of onnxruntime's fused
``EmbedLayerNormalization`` tables, stay below the table's size on the gathered axis; an input whose name says ``mask`` gets valid masks (ones, then zeros); an input
compared with constants (``Equal`` / ``Less`` / ``Greater``..., the condition of an ``If`` on a sample
rate) cycles through those constants, so every branch the graph tests for is fed; a bool input that is
an ``If`` condition alternates True/False. Everything else keeps the default draws.

Refusal: when no size of the ladder runs, one line names the first probed input and dim and asks for
``--input-shape``; when the model has nothing to probe but fails on its random sample, one line says so
and asks for ``--data``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.core.errors import DataError, GraphoptError
from graphopt.core.ir import Graph, Model, Value
from graphopt.core.onnx_io import to_proto
from graphopt.core.ops import constant_value, is_op
from graphopt.core.shapes import ShapeView
from graphopt.measure import ort as gort
from graphopt.measure.calibration import (
    PER_SAMPLE,
    InputSpec,
    SampleData,
    ValueRule,
    input_specs,
    random_data,
    sample_layout,
)

#: Sizes tried for a dynamic dim, in order.
LADDER = (64, 32, 128, 256, 16, 8, 512, 1024, 4, 2, 1, 2048, 4096, 8192, 16000)
#: Candidates tried for the second shape at most.
MAX_ALTERNATES = 10

_PASS_THROUGH = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity")
_COMPARISONS = ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")
Shapes = dict[str, tuple[int, ...]]


@dataclass
class DimGroup:
    """Dynamic dims that must share one size: ``(input, axis)`` members, the name (``None`` if unnamed)."""

    name: str | None
    members: list[tuple[str, int]] = field(default_factory=list)

    @property
    def is_batch(self) -> bool:
        return any(axis == 0 for _, axis in self.members)

    def label(self) -> str:
        name, axis = self.members[0]
        dim = f"dim {self.name!r}" if self.name else "an unnamed dim"
        return f"input {name!r} {dim} (axis {axis})"


@dataclass
class Probe:
    """The shapes and value rules random samples are drawn with.

    Attributes
    ----------
    shapes : input name -> one sample's complete feed shape (batch 1) the original runs on.
    alternate : a second set of shapes the original runs on, different in every probed dim, or ``None``.
    values : input name -> how its values are drawn.
    probed : the dynamic dims that were chosen here (``"input:axis" -> size``), empty when none.
    notes : what was tried and why, for the report.
    dynamic : some input has a dynamic dim besides the batch: sizes matter to analysis and verification.
    """

    shapes: Shapes
    alternate: Shapes | None = None
    values: dict[str, ValueRule] = field(default_factory=dict)
    probed: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dynamic: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"shapes": {k: list(v) for k, v in self.shapes.items()},
                "alternate": None if self.alternate is None else {k: list(v) for k, v in self.alternate.items()},
                "chosen": dict(self.probed),
                "values": {k: v.reason for k, v in self.values.items()},
                "notes": list(self.notes)}


def dim_groups(specs: Sequence[InputSpec]) -> list[DimGroup]:
    """The dynamic dims of the required inputs, grouped by name (an unnamed dim is its own group)."""
    groups: dict[Any, DimGroup] = {}
    for spec in specs:
        if spec.optional or not spec.shape:
            continue
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim > 0:
                continue
            key = dim if isinstance(dim, str) else (spec.name, axis)
            groups.setdefault(key, DimGroup(dim if isinstance(dim, str) else None)).members.append((spec.name, axis))
    return list(groups.values())


def has_dynamic_dims(model: Model) -> bool:
    """Some required input has a dynamic dim besides the batch (its sizes must be probed or given)."""
    specs = [s for s in input_specs(model) if not s.optional]
    return any(not g.is_batch for g in dim_groups(specs))


def choose(model: Model, given: Mapping[str, Sequence[int]] | None = None, *, seed: int = 0,
           data: SampleData | None = None, threads: int | None = None) -> Probe:
    """Probe shapes and value rules for ``model`` (see the module docstring).

    ``given`` fixes inputs' shapes (``--input-shape``); ``data``, when the user gave samples, fixes the
    first shape to the data's and only the second is searched.

    Raises
    ------
    DataError
        No ladder size runs the original (names the input and dim), or a model with nothing to probe
        fails on its random sample.
    """
    specs = [s for s in input_specs(model) if not s.optional]
    values = value_rules(model)
    groups = dim_groups(specs)
    base = _given_sizes(specs, given, data)
    probe_groups = [g for g in groups if not g.is_batch and not _sized(g, base)]
    if not values and all(g.is_batch for g in groups):
        return Probe(_shapes(specs, base, {}, groups), None, values)  # nothing to choose or check
    session = _Runner(model, specs, values, seed, threads)
    probe = Probe({}, None, values, dynamic=any(not g.is_batch for g in groups))
    sizes = _first_sizes(session, specs, base, groups, probe_groups, probe, check=data is None)
    probe.shapes = _shapes(specs, base, sizes, groups)
    probe.probed = {f"{g.members[0][0]}:{g.members[0][1]}": sizes[id(g)] for g in probe_groups}
    probe.alternate = _alternate(session, specs, base, sizes, groups, probe)
    return probe


def _given_sizes(specs: Sequence[InputSpec], given: Mapping[str, Sequence[int]] | None,
                 data: SampleData | None) -> dict[tuple[str, int], int]:
    """``(input, axis) -> size`` fixed by ``--input-shape`` or by the user's data (its first sample)."""
    fixed: dict[tuple[str, int], int] = {}
    if data is not None:
        feed = data.feed(0, 1)
        for spec in specs:
            if spec.name in feed and spec.shape is not None and np.ndim(feed[spec.name]) == len(spec.shape):
                fixed.update({(spec.name, axis): int(d) for axis, d in enumerate(np.shape(feed[spec.name]))})
    for name, dims in (given or {}).items():
        fixed.update({(name, axis): int(d) for axis, d in enumerate(dims)})
    return fixed


def _sized(group: DimGroup, base: Mapping[tuple[str, int], int]) -> bool:
    return any(member in base for member in group.members)


def _shapes(specs: Sequence[InputSpec], base: Mapping[tuple[str, int], int], sizes: Mapping[int, int],
            groups: Sequence[DimGroup]) -> Shapes:
    """Each input's complete feed shape: the given size, else its group's size, else 1 (batch)."""
    of_member = {m: sizes.get(id(g)) for g in groups for m in g.members}
    out: Shapes = {}
    for spec in specs:
        if spec.shape is None:
            continue
        dims = []
        for axis, dim in enumerate(spec.shape):
            key = (spec.name, axis)
            if key in base:
                dims.append(base[key])
            elif isinstance(dim, int) and dim > 0:
                dims.append(dim)
            else:
                dims.append(of_member.get(key) or _group_base(groups, key, base) or 1)
        out[spec.name] = tuple(dims)
    return out


def _group_base(groups: Sequence[DimGroup], key: tuple[str, int], base: Mapping[tuple[str, int], int]) -> int | None:
    """The size a member's group got from another member the user sized (dims sharing a name share a size)."""
    for g in groups:
        if key in g.members:
            return next((base[m] for m in g.members if m in base), None)
    return None


class _Runner:
    """The original model in onnxruntime, run on one random sample at a candidate shape."""

    def __init__(self, model: Model, specs: Sequence[InputSpec], values: Mapping[str, ValueRule], seed: int,
                 threads: int | None) -> None:
        self.model, self.specs, self.values, self.seed = model, specs, values, seed
        self.session = gort.session(to_proto(model), threads=threads, quiet=True)  # failures are expected
        self.last_error = ""
        self.tried = 0

    def runs(self, shapes: Shapes) -> bool:
        self.tried += 1
        try:
            sample = random_data(self.model, 1, seed=self.seed, input_shapes=shapes, values=self.values)
            for feed in sample.batches(1):
                gort.run(self.session, feed, what="the original model")
        except GraphoptError as exc:
            self.last_error = str(exc).splitlines()[0]
            return False
        return True


def _first_sizes(runner: _Runner, specs: Sequence[InputSpec], base: Mapping[tuple[str, int], int],
                 groups: Sequence[DimGroup], probe_groups: Sequence[DimGroup], probe: Probe,
                 check: bool) -> dict[int, int]:
    """One ladder size for every probed group (the first the original runs on), batch groups at 1.
    With nothing to probe, the given shapes are checked (unless ``check`` is off: the user's data)."""
    sizes = {id(g): 1 for g in groups if g.is_batch and not _sized(g, base)}
    if not probe_groups:
        if check and not runner.runs(_shapes(specs, base, sizes, groups)):
            raise DataError(f"the original model fails on random inputs ({runner.last_error}); give --data")
        return sizes
    for size in LADDER:
        trial = {**sizes, **{id(g): size for g in probe_groups}}
        if runner.runs(_shapes(specs, base, trial, groups)):
            labels = ", ".join(g.label() for g in probe_groups)
            probe.notes.append(f"probe: {labels} -> {size} (the original runs; {runner.tried} tried)")
            return trial
    first = probe_groups[0]
    name, axis = first.members[0]
    raise DataError(f"no probe size runs the original model for {first.label()} (tried {', '.join(map(str, LADDER))};"
                    f" last error: {runner.last_error}); pass --input-shape {name}:d0,d1,...")


def _alternate(runner: _Runner, specs: Sequence[InputSpec], base: Mapping[tuple[str, int], int],
               sizes: Mapping[int, int], groups: Sequence[DimGroup], probe: Probe) -> Shapes | None:
    """A second shape the original runs on, different in every non-batch dynamic dim (module docstring)."""
    varied = [g for g in groups if not g.is_batch]
    first = probe.shapes
    current = {id(g): sizes.get(id(g)) or _group_base(groups, g.members[0], base) or 1 for g in varied}
    batches = [g for g in groups if g.is_batch and not _sized(g, base)]
    per_sample = sample_layout(runner.model) == PER_SAMPLE
    batch_sizes = (2, 1) if batches and per_sample else (None,)
    tried = 0
    for variant in _variants(varied, current):
        for batch in batch_sizes:
            trial = {**variant, **({id(g): batch for g in batches} if batch else {})}
            shapes = _shapes(specs, {}, {**{id(g): 1 for g in batches}, **trial}, groups)
            if shapes == first:
                continue
            tried += 1
            if runner.runs(shapes):
                probe.notes.append(f"second probe: {_describe(shapes)}")
                return shapes
            if tried >= MAX_ALTERNATES:
                probe.notes.append(f"no second probe shape: {tried} tried ({runner.last_error}); verified at one shape")
                return None
    if varied or batches:
        probe.notes.append("no second probe shape runs the original; verified at one shape")
    return None


def _variants(varied: Sequence[DimGroup], current: Mapping[int, int]) -> list[dict[int, int]]:
    out = [{id(g): current[id(g)] + (i + 1) * max(1, current[id(g)] // 2) for i, g in enumerate(varied)},
           {id(g): current[id(g)] * (i + 2) for i, g in enumerate(varied)},
           {id(g): current[id(g)] * 2 for g in varied}]
    out += [{id(g): size for g in varied} for size in LADDER if any(size != current[id(g)] for g in varied)]
    return out if varied else [{}]


def _describe(shapes: Shapes) -> str:
    return ", ".join(f"{k}[{','.join(map(str, v))}]" for k, v in shapes.items())


# --- values -------------------------------------------------------------------------------------


def value_rules(model: Model) -> dict[str, ValueRule]:
    """How each integer/bool/mask input is drawn (module docstring); inputs without a rule are absent."""
    graph = model.graph
    view = ShapeView(model, lazy=True)
    rules = {}
    for spec in input_specs(model):
        if spec.optional:
            continue
        dtype = spec.np_dtype
        value = next(v for v in graph.inputs if v.name == spec.name)
        if "mask" in spec.name.lower() and dtype is not None and dtype.kind in "fiub":
            rules[spec.name] = ValueRule("mask", reason="named a mask: ones then zeros")
        elif dtype is not None and dtype.kind in "iub":
            rule = _index_rule(graph, view, value) if dtype.kind in "iu" else None
            rule = rule or _comparison_rule(graph, value, dtype.kind)
            if rule is not None:
                rules[spec.name] = rule
    return rules


def _reached(graph: Graph, value: Value) -> list[tuple[Any, int]]:
    """``(node, input slot)`` for every node that reads ``value`` directly or through pass-through ops."""
    out, seen, todo = [], set(), [value]
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for node in graph.consumers(v):
            for slot, inp in enumerate(node.inputs):
                if inp is v:
                    out.append((node, slot))
                    if is_op(node, *_PASS_THROUGH) and slot == 0:
                        todo.extend(o for o in node.outputs if o is not None)
    return out


#: Ops that index a table with an input: ``(domain, op) -> {ids slot: table slot}`` (rows on axis 0 unless the
#: node's ``axis`` says otherwise). onnxruntime's fused BERT embedding takes the word, position and segment ids.
_TABLE_READERS = {("", "Gather"): {1: 0},
                  ("com.microsoft", "EmbedLayerNormalization"): {0: 2, 1: 4, 8: 3}}


def _index_rule(graph: Graph, view: ShapeView, value: Value) -> ValueRule | None:
    """Ids below the smallest table size they index (the rows of a Gather's data on its axis, or of a
    fused embedding's tables)."""
    bounds = []
    for node, slot in _reached(graph, value):
        table_slot = _TABLE_READERS.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type), {}).get(slot)
        if table_slot is None or table_slot >= len(node.inputs) or node.inputs[table_slot] is None:
            continue
        dims = view.dims(node.inputs[table_slot])
        axis = int(node.attrs["axis"].i) if node.op_type == "Gather" and "axis" in node.attrs else 0
        if dims and -len(dims) <= axis < len(dims) and dims[axis]:
            bounds.append((int(dims[axis]), node.inputs[table_slot].name))
    if not bounds:
        return None
    high, table = min(bounds)
    return ValueRule("range", 0, max(1, min(high, 2 ** 31 - 1)), reason=f"indexes {table!r} ({high} rows)")


def _comparison_rule(graph: Graph, value: Value, kind: str) -> ValueRule | None:
    """The constants the input is compared with (every branch they select gets fed), or True/False for a
    bool If condition."""
    constants: list = []
    for node, slot in _reached(graph, value):
        if is_op(node, "If") and slot == 0 and kind == "b":
            return ValueRule("choices", choices=(True, False), reason="the condition of an If")
        if is_op(node, *_COMPARISONS) and len(node.inputs) == 2:
            other = constant_value(graph, node.inputs[1 - slot])
            if other is not None and other.size == 1:
                constants.append(other.reshape(()).item())
    if not constants or kind == "b":
        return None
    choices = tuple(dict.fromkeys(int(c) for c in constants))
    return ValueRule("choices", choices=choices, reason=f"compared with {', '.join(map(str, choices))}")


def describe_shapes(shapes: Mapping[str, Sequence[int]]) -> str:
    """``input[1,3,64,64], mask[1,64]`` for messages."""
    return _describe({k: tuple(v) for k, v in shapes.items()})

