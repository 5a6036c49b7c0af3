"""Sizes only data decides, seen in one onnxruntime run of a sample.

Static shape inference (onnx's, then onnxruntime's symbolic engine at the probe's input shapes) cannot
size a value whose length depends on input *values*: an If whose branches yield different lengths (a
streaming voice-activity detector resamples by its sample-rate input), NonZero, a Resize whose scales
are computed. At the probe there is a sample, so such a size is a fact of that sample.
:func:`cost_at_sample` runs the model once on it, with those values and the condition of every
main-graph If exposed as outputs, and gives the analysis what the run saw
(:class:`graphopt.measure.analysis.Observed`): the MACs are then those of that sample, and an If counts
the branch that ran instead of both.

Refusal rules (the analysis then keeps its lower bound and says why in ``warnings``):

* nothing is run when the static analysis already sizes every node;
* only main-graph values can be exposed: a size inside a subgraph that depends on the subgraph's own
  values stays unknown;
* a sample whose input shapes differ from the analysis's input shapes is not used (its sizes would
  describe another input);
* a model onnxruntime cannot build or run is not observed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from graphopt.core.errors import GraphoptError
from graphopt.core.ir import Model, Value
from graphopt.measure import analysis
from graphopt.measure import ort as gort
from graphopt.measure.calibration import SampleData, check_data

__all__ = ["cost_at_sample", "observe"]


def cost_at_sample(model: Model, input_shapes: Mapping[str, Sequence[int]] | None,
                   data: SampleData | None) -> analysis.ModelCost:
    """:func:`graphopt.measure.analysis.analyze` of ``model``, with what no static rule sizes taken from
    a run of the first sample of ``data`` (see the module docstring); the static analysis when every
    node is sized, when ``data`` is ``None``, or when the run cannot be made."""
    table = analysis.shape_table(model, input_shapes)
    cost = analysis.cost_with(model, table)
    if cost.macs is not None or data is None or data.n_samples == 0:
        return cost
    try:
        seen = observe(model, table, data)
    except (GraphoptError, ValueError, RuntimeError) as exc:
        cost.warnings.append(f"sizes not observed on a sample: {str(exc).splitlines()[0]}")
        return cost
    if seen is None:
        return cost
    table.observed.update(seen.shapes)   # the same inferred shapes, now with what the run saw
    return analysis.cost_with(model, table, seen.conditions)


def observe(model: Model, table: analysis.ConcreteShapes, data: SampleData) -> analysis.Observed | None:
    """The shapes of the main-graph tensors ``table`` (:func:`graphopt.measure.analysis.shape_table`)
    leaves unsized and the conditions of the main-graph Ifs, on the first sample of ``data``; ``None``
    when there is nothing to observe.

    Raises
    ------
    ValueError
        The sample's input shapes are not the analysis's.
    GraphoptError
        onnxruntime rejects or fails to run the model.
    """
    main = {v.name: v for v in model.graph.values()}
    inputs = {v.name for v in model.graph.inputs if not v.is_initializer}
    unsized = _unsized(model, table, main)
    conditions = [node.inputs[0].name for node in model.graph.nodes
                  if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.inputs
                  and node.inputs[0] is not None]
    if not unsized and not conditions:
        return None
    feed = next(iter(check_data(model, data.head(1)).batches(1)))
    for name in sorted(inputs & feed.keys()):
        declared = table.shape(main[name])
        if _concrete(declared) and tuple(feed[name].shape) != tuple(declared):
            raise ValueError(f"the sample's {name!r} is {list(feed[name].shape)}, the analysis's {list(declared)}")
    wanted = set(unsized) | set(conditions)
    run = sorted(wanted - inputs)
    values: dict[str, np.ndarray] = {name: feed[name] for name in wanted & feed.keys()}
    if run:
        proto, weights = gort.exposed(model, run)
        values.update(gort.run(gort.session(proto, weights=weights, quiet=True), feed, run, what="one sample"))
    return analysis.Observed(
        shapes={name: tuple(int(d) for d in np.shape(values[name])) for name in unsized if name in values},
        conditions={name: bool(np.asarray(values[name]).reshape(-1)[0]) for name in conditions
                    if name in values and np.size(values[name]) == 1})


def _unsized(model: Model, table: analysis.ConcreteShapes, main: Mapping[str, Value]) -> list[str]:
    """Main-graph tensors that some node (of the main graph or a subgraph, which reads outer values)
    reads or writes and whose shape the table does not make concrete."""
    names: dict[str, None] = {}
    for graph in model.graph.walk():
        for node in graph.nodes:
            for value in (*node.inputs, *node.outputs):
                if value is None or main.get(value.name) is not value or value.name in names:
                    continue
                if value.type is not None and not value.type.HasField("tensor_type"):
                    continue   # a sequence or an optional: no shape to read
                if not _concrete(table.shape(value)):
                    names[value.name] = None
    return list(names)


def _concrete(dims: Sequence[int | str | None] | None) -> bool:
    return dims is not None and all(isinstance(d, int) for d in dims)
