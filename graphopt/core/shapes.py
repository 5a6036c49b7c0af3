"""Shape and type inference on the IR, through ``onnx.shape_inference``, and the one view passes ask.

:class:`ShapeView` answers what is known of a value's dims (static, named, concrete at batch 1, or
related symbols) without touching the IR. Two functions change or feed it:

* :func:`infer_shapes` writes inferred types back into the IR. Passes that change shapes (pruning,
  factorization) call it after their rewrite with ``reset=True``, which first forgets every
  intermediate type so that no stale shape survives.
* :func:`inferred_types` computes types without touching the IR, optionally with concrete sizes for
  dynamic input dims (analysis counts MACs at batch 1 this way without baking batch 1 into the model).

Large float weights are passed to onnx as data-less stubs: shape inference needs their dims only,
and a 100 MB model is not copied.

:func:`symbolic_dims` adds onnxruntime's symbolic shape inference
(``onnxruntime.tools.symbolic_shape_infer``) for the main graph. onnx's own inference gives a dim it
cannot relate to its source a fresh name (``unk__3``): ``Concat`` of ``[?, 1, 64]`` and ``[batch, 16, 64]``
is ``[unk__1, 17, 64]``, and a shape computed through ``Shape -> Gather -> Concat -> Expand`` is lost.
The symbolic engine evaluates shape tensors and keeps ``batch`` through all of that. It runs with
``auto_merge=False``: two different symbols are never assumed equal (with broadcasting one of them
could be 1), so an equal name always means an equal value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.core import scratch
from graphopt.core.errors import GraphoptError
from graphopt.core.ir import Graph, Model, Value, dims_of
from graphopt.core.onnx_io import fits_protobuf, save, to_proto

InputShapes = Mapping[str, Sequence[int]]


def _clear_negative_dims(proto: onnx.ModelProto) -> None:
    """Make every ``dim_value < 0`` (Paddle's ``-1`` for a dynamic dim) an unknown dim in the main graph's
    inputs, outputs and value_info. onnx's inference reads -1 as a size: a pool over a height of -1 comes out
    0 high, and every cost after it vanishes."""
    for vi in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value < 0:
                    d.Clear()


def _inferred_proto(model: Model, input_shapes: InputShapes | None, strict: bool) -> onnx.ModelProto:
    proto = to_proto(model, weights=False)
    _clear_negative_dims(proto)
    if input_shapes:
        for vi in proto.graph.input:
            if vi.name in input_shapes:
                _fix_dims(vi, input_shapes[vi.name])
    try:
        return _onnx_inference(proto, strict)
    except onnx.shape_inference.InferenceError as exc:
        raise GraphoptError(f"shape inference failed: {str(exc).splitlines()[0]}") from None


def _onnx_inference(proto: onnx.ModelProto, strict: bool) -> onnx.ModelProto:
    """onnx's shape inference of ``proto``; through files in the run's scratch directory when the
    model is over protobuf's 2 GiB limit (``infer_shapes`` serializes it in memory, only
    ``infer_shapes_path`` takes such a model). The weight stubs keep most models far below it."""
    if fits_protobuf(proto):
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=strict, data_prop=True)
    with scratch.directory("shapes") as folder:
        source, inferred = folder / "model.onnx", folder / "inferred.onnx"
        save(proto, source, external_data=True)
        onnx.shape_inference.infer_shapes_path(str(source), str(inferred), check_type=False, strict_mode=strict,
                                               data_prop=True)
        return onnx.load_model(str(inferred), load_external_data=False)  # the types are all it is read for


def _fix_dims(vi: onnx.ValueInfoProto, dims: Sequence[int]) -> None:
    shape = vi.type.tensor_type.shape
    if len(shape.dim) != len(dims):
        raise GraphoptError(f"input {vi.name!r} has rank {len(shape.dim)}, but the given shape {tuple(dims)} "
                            f"has rank {len(dims)}")
    for d, size in zip(shape.dim, dims):
        if d.HasField("dim_value") and d.dim_value >= 0 and d.dim_value != size:
            raise GraphoptError(f"input {vi.name!r} dim is fixed to {d.dim_value}, cannot set it to {size}")
        d.Clear()
        d.dim_value = int(size)


def _collect(graph: Graph, gp: onnx.GraphProto, out: dict[Graph, dict[str, onnx.TypeProto]]) -> None:
    """Map each IR graph to ``name -> TypeProto`` from the inferred GraphProto (same node order)."""
    types = {vi.name: vi.type for vi in gp.value_info}
    types.update({vi.name: vi.type for vi in gp.output if vi.type.WhichOneof("value")})
    out[graph] = types
    for node, np_ in zip(graph.toposort(), gp.node):
        attrs = {a.name: a for a in np_.attribute}
        for name, sub in node.subgraphs.items():
            attr = attrs[name]
            if isinstance(sub, Graph):
                _collect(sub, attr.g, out)
            else:
                for g, sg in zip(sub, attr.graphs):
                    _collect(g, sg, out)


def inferred_types(model: Model, input_shapes: InputShapes | None = None,
                   strict: bool = False) -> dict[Graph, dict[str, onnx.TypeProto]]:
    """Types onnx infers for every value of every graph, without changing the IR.

    Parameters
    ----------
    input_shapes : concrete dims for graph inputs (e.g. ``{"input": (1, 3, 224, 224)}``).
    strict : raise on any inference error instead of leaving the value untyped.
    """
    inferred = _inferred_proto(model, input_shapes, strict)
    out: dict[Graph, dict[str, onnx.TypeProto]] = {}
    _collect(model.graph, inferred.graph, out)
    return out


SymbolicDims = dict[str, tuple[int | str | None, ...]]
_ENGINE: list = []


def _symbolic_engine() -> Any:
    """onnxruntime's ``SymbolicShapeInference`` class, loaded from its file.

    ``import onnxruntime.tools.symbolic_shape_infer`` would first run ``onnxruntime/tools/__init__.py``,
    which imports torch when it is installed (about 9 s); the module itself needs only onnx, numpy and
    sympy. Returns None when it cannot be loaded.
    """
    if not _ENGINE:
        engine = None
        try:
            import importlib.util
            import sys

            import onnxruntime
            path = Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
            name = "graphopt._ort_symbolic_shape_infer"
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            engine = module.SymbolicShapeInference
        except Exception:  # noqa: BLE001 - missing file or sympy: no symbolic knowledge, nothing else changes
            engine = None
        _ENGINE.append(engine)
    return _ENGINE[0]


def symbolic_dims(model: Model, input_shapes: InputShapes | None = None) -> SymbolicDims | None:
    """``name -> dims`` (int, symbol string, or None) of main-graph values from onnxruntime's symbolic
    shape inference; None when it is unavailable or fails on this model (it is an extra source of
    knowledge, never required). The IR's own stored shapes are not fed in, so nothing stale survives.
    ``input_shapes`` starts it from concrete input dims: it then evaluates the shape arithmetic
    (``Shape -> Gather -> Slice`` of a position table, a head split's Reshape) that onnx's own inference
    leaves open.
    """
    engine = _symbolic_engine()
    if engine is None:
        return None
    proto = to_proto(model, weights=False)
    proto.graph.ClearField("value_info")
    _clear_negative_dims(proto)
    try:
        for vi in proto.graph.input:
            if vi.name in (input_shapes or {}):
                _fix_dims(vi, input_shapes[vi.name])
    except GraphoptError:
        return None
    # Weights written as data-less stubs become typed inputs: the engine evaluates small constant
    # tensors (and would read a stub as empty), and it needs only the dims of a weight.
    kept = []
    for tensor in proto.graph.initializer:
        stub = not tensor.raw_data and not _has_typed_data(tensor) and all(d > 0 for d in tensor.dims) \
            and len(tensor.dims) > 0
        if stub:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                        list(tensor.dims)))
        else:
            kept.append(tensor)
    if len(kept) != len(proto.graph.initializer):
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
    del proto.graph.output[:]  # outputs' declared shapes are no evidence either; re-add names only
    for value in model.graph.outputs:
        proto.graph.output.add().name = value.name
    import logging
    logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        out = _run_symbolic_engine(engine, proto)
    except Exception:  # noqa: BLE001 - any failure there only means "no extra knowledge"
        return None
    finally:
        logger.setLevel(level)
    if out is None:
        return None
    dims: SymbolicDims = {}
    for vi in list(out.graph.value_info) + list(out.graph.output) + list(out.graph.input):
        found = dims_of(vi.type)
        if found is not None:
            dims[vi.name] = found
    return dims


def _run_symbolic_engine(engine: Any, proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """``SymbolicShapeInference.infer_shapes(proto, auto_merge=False, guess_output_rank=False)``, step by
    step: the inferred model, or None when inference is incomplete or the opset is below 7.

    onnxruntime's ``infer_shapes`` does the same, but on incomplete inference it first saves the model
    as ``sym_shape_infer_temp.onnx`` with uuid-named external data files *in the current directory*
    (and it has no parameter for the place). Changing the process's directory around the call would
    move every relative path of the run, in every thread, so its few lines are repeated here instead.
    """
    opset = next((imp.version for imp in proto.opset_import if imp.domain in ("", "onnx", "ai.onnx")), None)
    if not opset or opset < 7:
        return None
    inference = engine(2**31 - 1, False, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
    inference._preprocess(proto)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_ if complete else None


def _has_typed_data(tensor: onnx.TensorProto) -> bool:
    return any(len(getattr(tensor, f)) for f in ("float_data", "int32_data", "int64_data", "double_data",
                                                 "uint64_data", "string_data")) or tensor.HasField("data_location")


def infer_shapes(model: Model, *, reset: bool = False, strict: bool = False) -> None:
    """Write inferred types into the IR's values.

    ``reset=True`` first clears the type of every value that is not a graph input, a graph output or
    an initializer, so only freshly inferred shapes remain (required after a shape-changing rewrite).

    A graph output keeps every dynamic dim it declares (a name, or unknown): inference at the model's
    current shapes may find a size the exporter left open on purpose, and the optimized model must take
    every shape the original took.
    """
    if reset:
        for graph in model.graphs():
            for value in graph.values():
                if not (value.is_initializer or graph.is_graph_input(value) or graph.is_graph_output(value)
                        or graph.is_captured(value)):
                    value.type = None
    for graph, types in inferred_types(model, strict=strict).items():
        for value in graph.values():
            if value.is_initializer or graph.is_graph_input(value) or graph.is_captured(value):
                continue
            t = types.get(value.name)
            if t is not None and t.WhichOneof("value") is not None:
                value.type = _keep_dynamic_dims(value.type, t) if graph.is_graph_output(value) else t


def _keep_dynamic_dims(declared: onnx.TypeProto | None, inferred: onnx.TypeProto) -> onnx.TypeProto:
    """``inferred`` with each dim that ``declared`` leaves dynamic put back as declared (same rank only)."""
    before, after = dims_of(declared), dims_of(inferred)
    if before is None or after is None or len(before) != len(after) or all(isinstance(d, int) for d in before):
        return inferred
    out = onnx.TypeProto()
    out.CopyFrom(inferred)
    for dim, old in zip(out.tensor_type.shape.dim, declared.tensor_type.shape.dim):
        if not (old.HasField("dim_value") and old.dim_value >= 0):
            dim.CopyFrom(old)
    return out


Dims = tuple[int | str | None, ...]


class ShapeView:
    """What is known of each value's element type and dims: the one shape view passes ask.

    ``input_shapes`` starts onnx's inference from concrete input dims (analysis at a probe shape, see
    ``graphopt.measure.analysis.ConcreteShapes``); failures go to ``warnings`` when it is given.

    Sources, per dim: an initializer's data; the type the IR carries; onnx shape inference on an
    export of the IR (run once, without touching it: at construction, or at the first question that
    needs it with ``lazy=True``); with ``symbolic=True`` also onnxruntime's symbolic inference (its
    static sizes only). A static size from any source wins (the IR's first), then a named symbol
    (the IR's first); the IR's dims win when the sources disagree on the rank. Keyed by value object,
    so a rename (a model output taking over a name) does not confuse it.

    * :meth:`shape` — ints, symbol names, ``None`` per unknown dim (``None``: rank unknown);
    * :meth:`dims` — the static part only (symbols become ``None``); :meth:`rank`;
    * :meth:`concrete` — static dims with a dynamic leading (batch) dim read as 1;
    * :meth:`symbols` — dims with each dynamic dim's identity where it is known (equal symbols hold
      equal values at run time), from onnxruntime's symbolic inference for main-graph values;
    * :meth:`dtype`, :meth:`static_shape`, :meth:`static_bytes`.
    """

    def __init__(self, model: Model, *, lazy: bool = False, symbolic: bool = False,
                 input_shapes: InputShapes | None = None, warnings: list[str] | None = None) -> None:
        self.model = model
        self.symbolic = symbolic
        self.input_shapes = input_shapes  # concrete dims the inference starts from (a probe shape)
        self.warnings = warnings  # inference failures are appended here when given
        self._inferred: dict[Value, onnx.TypeProto] | None = None
        self._symbolic: SymbolicDims | None = None
        self._main_values = set(model.graph.values())
        if not lazy:
            self._infer()

    # -- sources

    def _infer(self) -> dict[Value, onnx.TypeProto]:
        if self._inferred is None:
            self._inferred = {}
            try:
                inferred = inferred_types(self.model, self.input_shapes)
            except GraphoptError as exc:
                inferred = {}
                if self.warnings is not None:
                    self.warnings.append(f"{exc}; using the shapes stored in the model")
            for graph, by_name in inferred.items():
                for value in graph.values():
                    found = by_name.get(value.name)
                    if found is not None and not graph.is_captured(value):
                        self._inferred.setdefault(value, found)
        return self._inferred

    def _symbolic_dims(self, value: Value) -> Dims | None:
        if value not in self._main_values:
            return None
        if self._symbolic is None:
            self._symbolic = symbolic_dims(self.model, self.input_shapes) or {}
        return self._symbolic.get(value.name)

    # -- questions

    def shape(self, value: Value | None) -> Dims | None:
        if value is None:
            return None
        stored = value.shape
        if value.is_initializer or (stored is not None and all(isinstance(d, int) for d in stored)):
            return stored
        sources = [s for s in (stored, dims_of(self._infer().get(value))) if s is not None]
        if self.symbolic:
            found = self._symbolic_dims(value)
            if found is not None:
                sources.append(tuple(d if isinstance(d, int) else None for d in found))
        if not sources:
            return None
        rank = len(sources[0])
        same = [s for s in sources if len(s) == rank]
        return tuple(_best(s[axis] for s in same) for axis in range(rank))

    def dims(self, value: Value | None) -> tuple[int | None, ...] | None:
        shape = self.shape(value)
        return None if shape is None else tuple(d if isinstance(d, int) else None for d in shape)

    def rank(self, value: Value | None) -> int | None:
        shape = self.shape(value)
        return None if shape is None else len(shape)

    def concrete(self, value: Value | None) -> tuple[int, ...] | None:
        """Static dims with a dynamic leading (batch) dim read as 1; ``None`` if another dim is unknown."""
        shape = self.shape(value)
        if shape is None:
            return None
        out = []
        for axis, d in enumerate(shape):
            if isinstance(d, int) and d > 0:
                out.append(d)
            elif axis == 0:
                out.append(1)
            else:
                return None
        return tuple(out)

    def symbols(self, value: Value) -> Dims | None:
        """Like :meth:`dims`, but a dynamic dim is a symbol (a string) when its identity is known.

        For main-graph values the symbols come from onnxruntime's symbolic inference (prefixed
        ``s:``), which relates dims through shape arithmetic; elsewhere, or when it fails, from onnx's
        names (prefixed ``o:``; its fresh ``unk__N`` are unique too). The namespaces are never mixed.
        """
        dims = self.dims(value)
        if value.is_initializer:
            return dims
        found = self._symbolic_dims(value)
        if found is not None:
            if dims is not None and len(found) != len(dims):
                return dims
            dims = dims if dims is not None else (None,) * len(found)
            return tuple(d if d is not None else (f"s:{f}" if isinstance(f, str) else f)
                         for d, f in zip(dims, found))
        if self._symbolic and value in self._main_values:  # the engine ran but does not know this value
            return dims
        shape = self.shape(value)
        return None if shape is None else tuple(f"o:{d}" if isinstance(d, str) else d for d in shape)

    def dtype(self, value: Value) -> int | None:
        if value.is_initializer:
            return value.dtype
        for tp in (value.type, self._infer().get(value)):
            if tp is not None and tp.HasField("tensor_type") and tp.tensor_type.elem_type:
                return tp.tensor_type.elem_type
        return None

    def static_shape(self, value: Value) -> tuple[int, ...] | None:
        dims = self.dims(value)
        return None if dims is None or any(d is None for d in dims) else dims  # type: ignore[return-value]

    def static_bytes(self, value: Value) -> int | None:
        shape, dtype = self.static_shape(value), self.dtype(value)
        if shape is None or dtype is None:
            return None
        return int(np.prod(shape, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(dtype).itemsize


def _best(candidates: Iterable[int | str | None]) -> int | str | None:
    """A static size if any source has one, else a symbol, else None (sources in order of trust)."""
    seen = list(candidates)
    return next((d for d in seen if isinstance(d, int)), next((d for d in seen if isinstance(d, str)), None))
