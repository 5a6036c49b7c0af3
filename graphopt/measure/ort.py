"""The one place graphopt makes onnxruntime sessions.

Every session graphopt runs (calibration, verification, benchmarks) comes from :func:`session`, so they
all share one configuration:

* graph optimizations **off** (``ORT_DISABLE_ALL``) unless ``optimize=True``. Verifying with ORT's own
  fusions on would hide a bug in ours: ORT would apply the same fusion to the original model.
* ``session.intra_op.allow_spinning = "0"``: idle worker threads sleep instead of spinning, so a
  calibration loop that does numpy work between runs does not fight ORT's threads for the cores.
* ``log_severity_level = 3`` (errors only) and the CPU execution provider.
* one intra-op thread inside an executor's worker (:func:`graphopt.measure.executor.in_worker`) when
  the caller does not say: a worker has one core of its own, and a session sized for the machine in
  each of them would oversubscribe it.

A model given as a path is loaded from that path (onnxruntime reads its external data itself); a
ModelProto or IR model over protobuf's 2 GiB limit, which onnxruntime cannot take as bytes, is
written to a scratch folder of the run (:mod:`graphopt.core.scratch`) and loaded from there.

An onnxruntime failure becomes a :class:`~graphopt.core.errors.GraphoptError` with one line naming the
model (``"model.onnx: onnxruntime rejects the model: ..."``), never a pybind traceback.

:func:`with_outputs` exposes intermediate values as extra graph outputs, which is how calibration and
the first-divergence search read activations. What onnxruntime requires of such an output (measured
with onnxruntime 1.31): nothing but the name — it infers the type. A declared element type must be
right (a wrong one fails the load), a declared shape may be stale (ORT only warns), so we declare the
element type when the model states it and never a shape.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from graphopt.core import scratch
from graphopt.core.errors import GraphoptError
from graphopt.core.ir import Model
from graphopt.core.onnx_io import (by_reference, fits_protobuf, inline_weights, is_in_memory, save, shared_proto,
                                   to_proto)
from graphopt.measure.executor import in_worker

ModelLike = Union[Model, onnx.ModelProto, bytes, str, os.PathLike]
Structure = tuple[onnx.ModelProto, dict[str, np.ndarray]]   # what structure() returns

# onnxruntime's pybind errors derive from Exception directly; list them so that a bug of ours
# (a TypeError, an IRError) is never disguised as "onnxruntime rejects the model".
ORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    obj for obj in vars(_ort_state).values()
    if isinstance(obj, type) and issubclass(obj, Exception)) + (RuntimeError,)

def describe(model: ModelLike) -> str:
    """A short name for ``model`` in messages: its path, or ``<in-memory model>``."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return "<in-memory model>"


def ort_message(exc: BaseException) -> str:
    """The first line of an onnxruntime exception, without its ``[ONNXRuntimeError] : 1 : FAIL :`` prefix."""
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0]
    if line.startswith("[ONNXRuntimeError]"):
        line = line.split(" : ", 3)[-1]
    return line.strip()


def as_proto(model: ModelLike, *, external_data: bool = True) -> onnx.ModelProto:
    """``model`` as a ModelProto (external data loaded). A ModelProto is returned as is, not copied.

    ``external_data=False`` reads a path's model file only: the graph, with the weights stored in a
    data file left there (enough to read its structure, not to run it; no second copy of the weights).

    Raises
    ------
    GraphoptError
        A path that does not exist or is not an ONNX model; bytes that do not parse.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, Model):
        return to_proto(model)
    if isinstance(model, bytes):
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(model)
        except Exception as exc:  # protobuf's DecodeError has no stable import path across versions
            raise GraphoptError(f"<in-memory model>: not an ONNX model ({exc})") from None
        return proto
    path = Path(model)
    if not path.is_file():
        raise GraphoptError(f"{path}: no such model file")
    try:
        proto = onnx.load_model(str(path), load_external_data=external_data)
    except Exception as exc:
        raise GraphoptError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
    if not external_data:
        _check_data_files(proto, path)
    return proto


def _check_data_files(proto: onnx.ModelProto, path: Path) -> None:
    """The data files the main graph's initializers name exist (what loading them would check first)."""
    for tensor in proto.graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            location = external_data_helper.ExternalDataInfo(tensor).location
            if not (path.parent / location).is_file():
                raise GraphoptError(f"{path}: external data missing ({location})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def session_options(*, optimize: bool = False, threads: int | None = None, quiet: bool = False) -> ort.SessionOptions:
    """The :class:`onnxruntime.SessionOptions` every graphopt session uses (see the module docstring);
    ``quiet`` silences onnxruntime's own error log (for runs expected to fail, such as shape probes)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 4 if quiet else 3
    if threads is None and in_worker():
        threads = 1
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    return opts


def structure(model: ModelLike | Structure) -> Structure:
    """``model`` as a ModelProto and the weights it passes by reference. An IR model's large weights stay
    its arrays (:func:`graphopt.core.onnx_io.shared_proto`); a file's or bytes' embedded weights are
    decoded once into arrays (:func:`graphopt.core.onnx_io.by_reference`; weights in external data
    files stay there, and onnxruntime cannot then take the proto alone: use the path); a ModelProto is
    returned as is (the caller's), with no such weights; a pair this function returned is returned as
    is. Give both to :func:`session` (also after :func:`with_outputs`)."""
    if isinstance(model, tuple):
        return model
    if isinstance(model, Model):
        return shared_proto(model)
    if isinstance(model, onnx.ModelProto):
        return model, {}
    return by_reference(as_proto(model))


def exposed(model: ModelLike | Structure, names: Iterable[str]) -> Structure:
    """:func:`structure` of ``model`` with the main-graph values ``names`` added as graph outputs
    (:func:`with_outputs`). A fresh export (of an IR model, a path or bytes) is edited in place; a
    caller's ModelProto or pair is copied, never changed."""
    fresh = not isinstance(model, (tuple, onnx.ModelProto))
    proto, weights = structure(model)
    return with_outputs(proto, names, inplace=fresh), weights


def session(model: ModelLike, *, optimize: bool = False, threads: int | None = None,
            quiet: bool = False, weights: Mapping[str, np.ndarray] | None = None,
            profile_dir: Path | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model`` (an IR Model, a ModelProto, serialized bytes or a path).

    An IR model's large weights go to onnxruntime by reference, as external initializers over its
    arrays (:func:`structure`): no serialized copy of them is made (onnxruntime still copies them
    into its own tensors). A ModelProto from :func:`structure` needs its ``weights``.

    Parameters
    ----------
    optimize : run onnxruntime's graph optimizations (``ORT_ENABLE_ALL``); off by default.
    threads : ``intra_op_num_threads``; ``None`` lets onnxruntime choose (1 in an executor's worker).
    quiet : no onnxruntime error log on stderr (failures still raise).
    weights : the arrays of a ModelProto's by-reference stubs (``{name: array}``).
    profile_dir : turn onnxruntime's profiler on, its file in this folder (``end_profiling()`` names it).

    Raises
    ------
    GraphoptError
        onnxruntime cannot load the model: ``"<model>: onnxruntime rejects the model: <reason>"``.
    """
    opts = session_options(optimize=optimize, threads=threads, quiet=quiet)
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / "profile")
    where = describe(model)
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise GraphoptError(f"{where}: no such model file")
        return _new_session(str(model), opts, where)  # ORT resolves external data relative to the file
    if isinstance(model, bytes):
        return _new_session(model, opts, where)
    proto = model
    if isinstance(model, Model):
        proto, weights = shared_proto(model)
    if weights and not fits_protobuf(proto):   # what is left inline is still over the limit: a file, whole
        proto = inline_weights(proto, weights)
    values = _external_initializers(proto, weights or {}, opts)
    if values:
        sess = _new_session(proto.SerializeToString(), opts, where)
        sess._graphopt_weights = values  # onnxruntime asks that they outlive the session
        return sess
    if fits_protobuf(proto):
        return _new_session(proto.SerializeToString(), opts, where)
    # Over protobuf's 2 GiB limit onnxruntime takes a model only from a path, with external data. The
    # folder goes as soon as the session exists: onnxruntime has read (or mapped) the weights by then.
    with scratch.directory("ort") as folder:
        path = folder / "model.onnx"
        save(proto, path, external_data=True)
        return _new_session(str(path), opts, where)


def _external_initializers(proto: onnx.ModelProto, weights: Mapping[str, np.ndarray],
                           opts: ort.SessionOptions) -> list[ort.OrtValue]:
    """Hand ``proto``'s by-reference weights to ``opts`` as external initializers (zero-copy OrtValues)."""
    names = [tp.name for tp in proto.graph.initializer if is_in_memory(tp)]
    missing = [name for name in names if name not in weights]
    if missing:
        raise ValueError(f"weights passed by reference but not given: {missing[:3]}")
    values = [ort.OrtValue.ortvalue_from_numpy(weights[name]) for name in names]
    if names:
        opts.add_external_initializers(names, values)
    return values


def _new_session(source: str | bytes, opts: ort.SessionOptions, where: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as exc:
        raise GraphoptError(f"{where}: onnxruntime rejects the model: {ort_message(exc)}") from None


def run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray], output_names: Iterable[str] | None = None,
        *, what: str = "the model") -> dict[str, np.ndarray]:
    """Run ``sess`` and return ``{output name: array}``.

    Feeds the session does not declare as inputs are dropped (a pass may remove an unused input; the
    sample data still holds it).

    Raises
    ------
    GraphoptError
        onnxruntime fails at run time: ``"<what>: onnxruntime failed to run: <reason>"``.
    """
    names = list(output_names) if output_names is not None else [o.name for o in sess.get_outputs()]
    accepted = {i.name for i in sess.get_inputs()} | {i.name for i in sess.get_overridable_initializers()}
    feed = {k: v for k, v in feeds.items() if k in accepted}
    try:
        arrays = sess.run(names, feed)
    except ORT_ERRORS + (ValueError, TypeError) as exc:
        raise GraphoptError(f"{what}: onnxruntime failed to run: {ort_message(exc)}") from None
    return dict(zip(names, arrays))


def optimized(proto: onnx.ModelProto, *, threads: int | None = 1) -> onnx.ModelProto:
    """The graph onnxruntime runs for ``proto`` after its ``ORT_ENABLE_ALL`` optimizations (its fused and
    layout ops included), read back from a scratch file.

    Raises
    ------
    GraphoptError
        onnxruntime cannot load the model.
    """
    with scratch.directory("ort-optimized") as folder:
        opts = session_options(optimize=True, threads=threads, quiet=True)
        opts.optimized_model_filepath = str(folder / "optimized.onnx")
        _new_session(proto.SerializeToString(), opts, describe(proto))
        return onnx.load(str(folder / "optimized.onnx"))


def known_elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """``name -> ONNX element type`` for every tensor of ``graph`` whose type the model states."""
    types: dict[str, int] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for tp in graph.initializer:
        types[tp.name] = tp.data_type
    return types


def with_outputs(proto: onnx.ModelProto, names: Iterable[str], *, inplace: bool = False) -> onnx.ModelProto:
    """``proto`` with the main-graph values ``names`` added as graph outputs (existing outputs are kept).

    Each added output declares its element type when the model states it and no shape (see the module
    docstring for what onnxruntime requires). ``inplace=True`` edits ``proto`` instead of copying it,
    which saves a copy of the weights when the caller owns a fresh export.

    Raises
    ------
    ValueError
        A name that the main graph does not define (values inside subgraphs cannot be exposed).
    """
    out = proto if inplace else _copy(proto)
    graph = out.graph
    defined = ({vi.name for vi in graph.input} | {tp.name for tp in graph.initializer}
               | {name for node in graph.node for name in node.output if name})
    present = {vi.name for vi in graph.output}
    types = known_elem_types(graph)
    for name in names:
        if name in present:
            continue
        if name not in defined:
            raise ValueError(f"cannot expose {name!r}: the main graph defines no such value")
        vi = onnx.ValueInfoProto(name=name)
        if name in types:
            vi.type.tensor_type.elem_type = types[name]
        graph.output.append(vi)
        present.add(name)
    return out


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out
