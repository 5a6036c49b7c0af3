"""Sample data, and activation statistics streamed from onnxruntime.

Sample data
-----------
:class:`SampleData` holds one array per model input, the first axis indexing samples, plus optional
integer class labels. It comes from a file (:func:`load_data`), from a seeded generator
(:func:`random_data`), or from the caller. Every array is checked against the model's inputs
(:func:`check_data`) before anything runs, so a bad file fails with one line naming the file and the
input at fault instead of an onnxruntime traceback halfway through.

The first axis of a model input is its batch axis. When it is dynamic, samples are fed in batches of
any size; when it is static (``[1, 1, 28, 28]``), samples are fed in batches of exactly that size, so a
batch-1 model still takes N samples (one by one). The sample count must then be a multiple of it.

Data file rules (:func:`load_data`):

* ``.npz``: one array per model input, keyed by input name, plus an optional ``labels`` array
  (integer class ids ``>= 0``, one per sample). Any other key is an error (a typo would otherwise be
  silently ignored). ``.npy``: the single array of a model with one input (no labels).
* Inputs backed by an initializer (IR < 4 models list weights as inputs with defaults) need no data;
  when given, they are validated and fed.
* dtypes: an exact match is fed as is. Floating data for a floating input of another width
  (``float64`` data for a ``float32`` input, the numpy default) is cast, and so is integer data for an
  integer input when every value fits the target type; each cast is recorded in ``SampleData.notes``.
  Integer <-> float and anything <-> bool are errors: a ``uint8`` image fed to a ``float32`` input is
  almost always missing its normalisation, and guessing would hide that.
* shapes: the rank must equal the model input's rank, and every static dim after the first must
  match. Symbolic and unknown dims accept any size. Rank-0 (scalar) inputs are refused: there is no
  axis to put samples on.
* every array (and ``labels``) must hold the same number of samples, at least one.

Random data (:func:`random_data`) is reproducible from its seed: floating inputs are standard normal,
integer inputs uniform in ``[0, 10)`` (small non-negative values are valid indices for Gather /
embedding tables and valid counts), bool inputs fair coin flips. Dynamic dims after the first must be
given with ``input_shapes`` (``--input-shape name:d0,d1,...`` on the command line).

Calibration
-----------
:class:`Calibrator` exports the *current* IR at each call, exposes the requested intermediate values as
graph outputs (:func:`graphopt.measure.ort.with_outputs`), runs onnxruntime with its graph optimizations off
(so the tensors are the ones our IR names, not ones ORT fused away) batch by batch, and hands each
batch's tensors to streaming statistics. Only one batch of activations is alive at a time, whatever the
number of samples.

Statistics accumulate in float64 and merge batches exactly (Chan et al.'s pairwise update for the
variance), so the result equals the statistic of the concatenated activations up to float64 rounding:

* :class:`ChannelStats` — per channel along an axis (default 1, NCHW / [N, C]): mean, variance, std,
  min, max, mean |x|, APoZ (fraction of exact zeros, the "average percentage of zeros" of pruning).
* :class:`Moments` — the same over a whole tensor.
* :class:`Gram` — ``XᵀX``, column sums and row count of a matrix view ``X`` of the tensor (rows =
  observations, columns = features). Least-squares reconstruction after pruning solves
  ``min_W' ||X_S W' - X W||²`` whose normal equations ``(X_SᵀX_S) W' = (X_SᵀX) W`` need only ``XᵀX``.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from graphopt.core.errors import DataError
from graphopt.core.ir import Model, dims_of
from graphopt.core.onnx_io import to_proto
from graphopt.measure import ort as gort

LABELS = "labels"
RANDOM_INT_HIGH = 10  # random integer inputs are drawn from [0, RANDOM_INT_HIGH)

# ===============================================================================================
# sample data


@dataclass(eq=False)  # arrays have no single truth value; compare SampleData by identity
class SampleData:
    """Sample inputs for a model: one array per input, first axis = samples.

    Attributes
    ----------
    inputs : input name -> array of shape ``[n_samples, *sample_shape]``.
    labels : integer class ids, shape ``[n_samples]``, or ``None``.
    source : where the data came from (a path, ``random(seed=0)``...), used in messages.
    notes : what loading did to the data (casts), one line each.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "<in-memory data>"
    notes: list[str] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        """Number of samples (the common length of the first axes; 0 when there are no inputs)."""
        for array in self.inputs.values():
            return int(array.shape[0])
        return 0 if self.labels is None else int(len(self.labels))

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive feeds of ``batch_size`` samples (the last one may be shorter). Views, no copies."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, self.n_samples, batch_size):
            yield {name: array[start:start + batch_size] for name, array in self.inputs.items()}

    def head(self, n: int) -> SampleData:
        """The first ``n`` samples (views)."""
        return self._derive(slice(0, n), f"{self.source}[:{n}]")

    def split(self, n_held: int) -> tuple[SampleData, SampleData | None]:
        """``(first n − n_held samples, last n_held samples)`` (views), for fitting on one part and
        measuring on the other; ``(self, None)`` when either part would be empty."""
        n = self.n_samples
        if not 0 < n_held < n:
            return self, None
        return self.head(n - n_held), self._derive(slice(n - n_held, n), f"{self.source}[{n - n_held}:]")

    def take(self, indices: Sequence[int]) -> SampleData:
        """The samples at ``indices``, in that order (copies)."""
        index = np.asarray(indices, dtype=np.int64)
        return self._derive(index, f"{self.source}[{len(index)} selected]")

    def _derive(self, index: slice | np.ndarray, source: str) -> SampleData:
        labels = None if self.labels is None else self.labels[index]
        return SampleData({k: v[index] for k, v in self.inputs.items()}, labels, source, list(self.notes))

    def __repr__(self) -> str:
        arrays = ", ".join(f"{k!r}: {_describe_array(v)}" for k, v in self.inputs.items())
        labels = "" if self.labels is None else f", labels={_describe_array(self.labels)}"
        return f"SampleData(source={self.source!r}, n_samples={self.n_samples}, inputs={{{arrays}}}{labels})"


def _describe_array(array: np.ndarray) -> str:
    return f"{array.dtype}[{','.join(str(d) for d in array.shape)}]"


@dataclass(frozen=True)
class InputSpec:
    """What a model input accepts.

    Attributes
    ----------
    dtype : ONNX element type, or ``None`` when the model does not say.
    shape : dims (ints, symbolic names or ``None``), or ``None`` when the rank is unknown.
    optional : the input has a default value (an initializer of the same name), so data is optional.
    """

    name: str
    dtype: int | None
    shape: tuple[int | str | None, ...] | None
    optional: bool = False

    @property
    def np_dtype(self) -> np.dtype | None:
        if self.dtype is None:
            return None
        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(self.dtype))
        except (KeyError, ValueError, TypeError):
            return None

    @property
    def type_name(self) -> str:
        return onnx.TensorProto.DataType.Name(self.dtype).lower() if self.dtype else "unknown type"

    @property
    def static_batch(self) -> int | None:
        """The first dim when it is a fixed size, else ``None``."""
        if self.shape and isinstance(self.shape[0], int) and self.shape[0] > 0:
            return self.shape[0]
        return None

    def shape_text(self) -> str:
        if self.shape is None:
            return "unknown shape"
        return "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"


def input_specs(model: Model | onnx.ModelProto) -> list[InputSpec]:
    """The main graph's inputs, in order, for an IR model or a ModelProto."""
    if isinstance(model, Model):
        g = model.graph
        return [InputSpec(v.name, v.dtype, v.shape, v.name in g.initializers or v.name in g.sparse_initializers)
                for v in g.inputs]
    defaults = {t.name for t in model.graph.initializer} | {s.values.name for s in model.graph.sparse_initializer}
    specs = []
    for vi in model.graph.input:
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        dtype = (tt.elem_type or None) if tt is not None else None
        specs.append(InputSpec(vi.name, dtype, dims_of(vi.type), vi.name in defaults))
    return specs


def feed_batch_size(model: Model | onnx.ModelProto, batch_size: int) -> int:
    """The batch size to feed ``model``: its static batch dim when it has one, else ``batch_size``.

    Raises
    ------
    DataError
        Inputs fix different static batch sizes (then their first axes are not one sample axis).
    """
    static = {s.name: s.static_batch for s in input_specs(model) if not s.optional and s.static_batch}
    sizes = set(static.values())
    if len(sizes) > 1:
        listing = ", ".join(f"{k}={v}" for k, v in static.items())
        raise DataError(f"model inputs fix different batch sizes ({listing}); cannot feed them as one sample axis")
    return sizes.pop() if sizes else batch_size


# --- validation --------------------------------------------------------------------------------


def check_data(model: Model | onnx.ModelProto, data: SampleData) -> SampleData:
    """``data`` validated against ``model``'s inputs, with safe casts applied (see the module docstring).

    Returns a new :class:`SampleData` (arrays that need no cast are shared, not copied).

    Raises
    ------
    DataError
        The first problem found, as one line naming ``data.source`` and the array at fault.
    """
    specs = input_specs(model)
    arrays = dict(data.inputs)
    if data.labels is not None:
        arrays[LABELS] = data.labels
    return _validated(arrays, specs, data.source, list(data.notes))


def _validated(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], source: str,
               notes: list[str]) -> SampleData:
    by_name = {s.name: s for s in specs}
    listing = ", ".join(s.name for s in specs if not s.optional) or "none"
    labels = arrays.get(LABELS) if LABELS not in by_name else None
    for key in arrays:
        if key not in by_name and key != LABELS:
            raise DataError(f"{source}: array {key!r} matches no model input (model inputs: {listing})")
    for spec in specs:
        if not spec.optional and spec.name not in arrays:
            raise DataError(f"{source}: no array for model input {spec.name!r} "
                            f"(expected {spec.type_name} {spec.shape_text()})")
    inputs = {s.name: _checked_input(arrays[s.name], s, source, notes) for s in specs if s.name in arrays}
    n = _common_sample_count(inputs, labels, source)
    _check_batch_multiple(inputs, specs, n, source)
    if labels is not None:
        labels = _checked_labels(labels, n, source)
    return SampleData(inputs, labels, source, notes)


def _checked_input(array: np.ndarray, spec: InputSpec, source: str, notes: list[str]) -> np.ndarray:
    where = f"{source}: input {spec.name!r}"
    if not isinstance(array, np.ndarray):
        raise DataError(f"{where}: expected a numpy array, got {type(array).__name__}")
    if spec.shape is not None and len(spec.shape) == 0:
        raise DataError(f"{where}: the model input is a scalar (rank 0); graphopt needs a leading sample axis")
    if array.ndim == 0:
        raise DataError(f"{where}: is a scalar; expected one row per sample (shape {spec.shape_text()})")
    array = _checked_dtype(array, spec, where, notes)
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            raise DataError(f"{where}: has shape {list(array.shape)} (rank {array.ndim}); the model expects rank "
                            f"{len(spec.shape)} {spec.shape_text()} with samples on the first axis")
        for axis, (want, got) in enumerate(zip(spec.shape[1:], array.shape[1:]), start=1):
            if isinstance(want, int) and want > 0 and want != got:
                raise DataError(f"{where}: has shape {list(array.shape)}; the model fixes axis {axis} to {want} "
                                f"{spec.shape_text()}")
    return array


def _checked_dtype(array: np.ndarray, spec: InputSpec, where: str, notes: list[str]) -> np.ndarray:
    want = spec.np_dtype
    got = array.dtype
    if want is None or got == want:
        return array
    if got.kind == "f" and want.kind == "f":
        notes.append(f"{where}: {got} data cast to {want}")
        return array.astype(want)
    if got.kind in "iu" and want.kind in "iu":
        info = np.iinfo(want)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise DataError(f"{where}: {got} values outside the range of the model's {want} input")
        notes.append(f"{where}: {got} data cast to {want}")
        return array.astype(want)
    raise DataError(f"{where}: the file holds {got} but the model expects {spec.type_name}; "
                    f"convert the data (no implicit int/float/bool conversion)")


def _common_sample_count(inputs: Mapping[str, np.ndarray], labels: np.ndarray | None, source: str) -> int:
    counts = {name: int(a.shape[0]) for name, a in inputs.items()}
    if labels is not None and np.ndim(labels) > 0:
        counts[LABELS] = int(np.shape(labels)[0])
    if not counts:
        raise DataError(f"{source}: holds no arrays")
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise DataError(f"{source}: arrays hold different numbers of samples ({listing})")
    n = next(iter(counts.values()))
    if n == 0:
        raise DataError(f"{source}: holds 0 samples")
    return n


def _check_batch_multiple(inputs: Mapping[str, np.ndarray], specs: Sequence[InputSpec], n: int, source: str) -> None:
    for spec in specs:
        k = spec.static_batch
        if spec.name in inputs and k and n % k:
            raise DataError(f"{source}: input {spec.name!r} has a static batch of {k} {spec.shape_text()}; "
                            f"the sample count {n} is not a multiple of {k}")


def _checked_labels(labels: np.ndarray, n: int, source: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{source}: 'labels' has dtype {labels.dtype}; expected integer class ids")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DataError(f"{source}: 'labels' has shape {list(labels.shape)}; expected one class id per sample, "
                        f"shape [{n}]")
    if labels.size and labels.min() < 0:
        raise DataError(f"{source}: 'labels' holds negative class id {int(labels.min())}")
    return labels.astype(np.int64, copy=False)


# --- files ----------------------------------------------------------------------------------

_NPZ_MAGIC = b"PK"
_NPY_MAGIC = b"\x93NUMPY"


def load_data(path: str | os.PathLike, model: Model | onnx.ModelProto) -> SampleData:
    """Read sample data for ``model`` from an ``.npz`` (or, for a one-input model, an ``.npy``) file.

    The file kind is told by its content, not its name. ``.npy`` files are memory-mapped, so a large
    data set is paged in batch by batch. See the module docstring for the validation rules.

    Raises
    ------
    DataError
        Missing file, a directory, a file that is neither npz nor npy, a corrupt archive or array, or
        any mismatch with the model's inputs — one line naming the file and the array.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected an .npz file (arrays keyed by input name) or an .npy file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    specs = input_specs(model)
    if magic.startswith(_NPZ_MAGIC):
        arrays = _read_npz(path)
    elif magic == _NPY_MAGIC:
        arrays = {_single_input(specs, path): _read_npy(path)}
    else:
        raise DataError(f"{path}: not an .npz or .npy file")
    return _validated(arrays, specs, str(path), [])


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    # Open the file ourselves: np.load leaks its handle when the zip directory is corrupt.
    with open(path, "rb") as fh:
        try:
            archive = np.load(fh, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path}: corrupt .npz archive ({_first_line(exc)})") from None
        with archive:
            arrays = {key: _read_member(archive, key, path) for key in archive.files}
    if not arrays:
        raise DataError(f"{path}: the .npz archive holds no arrays")
    return arrays


def _read_member(archive, key: str, path: Path) -> np.ndarray:
    try:
        array = archive[key]
    except ValueError as exc:
        if "pickle" in str(exc):  # object arrays need pickle, which could run code from the file
            raise DataError(f"{path}: array {key!r} holds Python objects; save plain numeric arrays") from None
        raise DataError(f"{path}: array {key!r} is corrupt ({_first_line(exc)})") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: array {key!r} is corrupt ({_first_line(exc)})") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: member {key!r} is not a numpy array; not an .npz of arrays")
    return array


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(f"{path}: the array holds Python objects; save a plain numeric array") from None
        raise DataError(f"{path}: corrupt .npy file ({_first_line(exc)})") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: corrupt .npy file ({_first_line(exc)})") from None


def _single_input(specs: Sequence[InputSpec], path: Path) -> str:
    required = [s.name for s in specs if not s.optional]
    if len(required) != 1:
        raise DataError(f"{path}: an .npy file holds one array but the model has {len(required)} inputs "
                        f"({', '.join(required)}); use an .npz keyed by input name")
    return required[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# --- random data ------------------------------------------------------------------------------


def parse_input_shapes(specs: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``["name:1,3,224,224", ...]`` into ``{"name": (1, 3, 224, 224)}``.

    The name is everything before the last ``:`` (input names may contain colons).

    Raises
    ------
    DataError
        A spec without ``name:``, an empty name or dim list, a dim that is not a positive integer, or a
        name given twice.

    Examples
    --------
    >>> parse_input_shapes(["x:1,3,32,32", "mask: 1, 32"])
    {'x': (1, 3, 32, 32), 'mask': (1, 32)}
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, colon, dims_text = spec.rpartition(":")
        name = name.strip()
        if not colon or not name:
            raise DataError(f"input shape {spec!r}: expected name:d0,d1,... (e.g. input:1,3,224,224)")
        parts = [p.strip() for p in dims_text.split(",")]
        if not dims_text.strip() or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise DataError(f"input shape {spec!r}: dims must be positive integers separated by commas")
        if name in shapes:
            raise DataError(f"input shape {spec!r}: input {name!r} is given twice")
        shapes[name] = tuple(int(p) for p in parts)
    return shapes


def random_data(model: Model | onnx.ModelProto, n_samples: int, *, seed: int,
                input_shapes: Mapping[str, Sequence[int]] | None = None) -> SampleData:
    """Seeded random inputs for every input of ``model`` that has no default value.

    Floating inputs: standard normal. Integer inputs: uniform in ``[0, 10)``. Bool: fair coin.
    Each input gets its own generator, seeded from ``(seed, input position)``, so the data is a pure
    function of the model's inputs and ``seed``.

    Parameters
    ----------
    n_samples : samples to draw; rounded up to a multiple of a static batch dim.
    input_shapes : name -> full input shape, fixing dynamic dims. Its first dim is ignored when the
        model's batch dim is dynamic (``n_samples`` decides the sample axis).

    Raises
    ------
    DataError
        A dynamic or unknown dim after the first with no shape given (the message says which
        ``--input-shape`` to pass), a given shape that contradicts the model, an unknown name in
        ``input_shapes``, or an input type that cannot be generated (strings, bfloat16...).
    """
    if n_samples < 1:
        raise DataError(f"random data: the number of samples must be >= 1, got {n_samples}")
    specs = input_specs(model)
    shapes = dict(input_shapes or {})
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        raise DataError(f"input shape given for {unknown[0]!r}, which is not a model input "
                        f"(model inputs: {', '.join(s.name for s in specs)})")
    required = [s for s in specs if not s.optional]
    static = {s.static_batch for s in required if s.static_batch}
    unit = max(static) if len(static) == 1 else 1  # disagreeing static batches are refused when fed
    n = -(-n_samples // unit) * unit
    inputs = {}
    for position, spec in enumerate(specs):
        if spec.optional:
            continue
        sample_shape = _sample_shape(spec, shapes.get(spec.name))
        rng = np.random.default_rng([seed, position])
        inputs[spec.name] = _draw(rng, spec, (n, *sample_shape))
    return SampleData(inputs, None, f"random(seed={seed})")


def _sample_shape(spec: InputSpec, given: Sequence[int] | None) -> tuple[int, ...]:
    """The per-sample dims of ``spec`` (all but the first), from the model or from ``given``."""
    hint = f"pass --input-shape {spec.name}:d0,d1,..."
    if given is not None:
        given = tuple(int(d) for d in given)
        if spec.shape is not None:
            if len(given) != len(spec.shape):
                raise DataError(f"input shape for {spec.name!r} has rank {len(given)}; the model input is "
                                f"{spec.shape_text()} (rank {len(spec.shape)})")
            for axis, (want, got) in enumerate(zip(spec.shape, given)):
                if isinstance(want, int) and want > 0 and want != got:
                    raise DataError(f"input shape for {spec.name!r} sets axis {axis} to {got}; the model fixes it "
                                    f"to {want} {spec.shape_text()}")
        if len(given) == 0:
            raise DataError(f"input shape for {spec.name!r} is empty; graphopt needs a leading sample axis")
        return given[1:]
    if spec.shape is None:
        raise DataError(f"input {spec.name!r} has an unknown shape; {hint}")
    if len(spec.shape) == 0:
        raise DataError(f"input {spec.name!r} is a scalar (rank 0); graphopt needs a leading sample axis")
    for axis, dim in enumerate(spec.shape[1:], start=1):
        if not (isinstance(dim, int) and dim > 0):
            label = f"dynamic dim {dim!r}" if isinstance(dim, str) else "an unknown dim"
            raise DataError(f"input {spec.name!r} {spec.shape_text()} has {label} at axis {axis}; {hint}")
    return tuple(spec.shape[1:])  # type: ignore[arg-type]


def _draw(rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...]) -> np.ndarray:
    dtype = spec.np_dtype
    if dtype is None or dtype.kind not in "fiub" or spec.dtype == onnx.TensorProto.BFLOAT16:
        raise DataError(f"input {spec.name!r}: cannot generate random data of type {spec.type_name}; "
                        f"give sample data")
    if dtype.kind == "f":
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    return rng.integers(0, RANDOM_INT_HIGH, size=shape).astype(dtype)


# ===============================================================================================
# streaming statistics


class Stat(Protocol):
    """A streaming statistic: fed one batch of one tensor at a time."""

    def update(self, array: np.ndarray) -> None: ...


class _Running:
    """Column-wise running moments of a 2-D view ``[rows, columns]``, merged batch by batch in float64.

    The variance uses Chan, Golub & LeVeque's pairwise merge: with counts ``n_a, n_b``, means
    ``m_a, m_b`` and sums of squared deviations ``M2_a, M2_b``, the union has
    ``M2 = M2_a + M2_b + (m_b - m_a)² · n_a n_b / (n_a + n_b)``. Unlike ``E[x²] - E[x]²`` it does not
    cancel catastrophically when the mean is large against the spread.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None
        self.sum_abs: np.ndarray | None = None
        self.zeros: np.ndarray | None = None

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        n_b = rows.shape[0]
        if n_b == 0:
            return
        if self.mean is not None and rows.shape[1] != self.mean.shape[0]:
            raise ValueError(f"a batch has {rows.shape[1]} channels, earlier ones had {self.mean.shape[0]}")
        mean_b = rows.mean(axis=0)
        m2_b = ((rows - mean_b) ** 2).sum(axis=0)
        stats_b = (rows.min(axis=0), rows.max(axis=0), np.abs(rows).sum(axis=0), (rows == 0).sum(axis=0))
        if self.mean is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            self.min, self.max, self.sum_abs, self.zeros = stats_b
            return
        n_a, total = self.count, self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta**2 * (n_a * n_b / total)
        self.count = total
        self.min = np.minimum(self.min, stats_b[0])
        self.max = np.maximum(self.max, stats_b[1])
        self.sum_abs = self.sum_abs + stats_b[2]
        self.zeros = self.zeros + stats_b[3]

    def require(self) -> None:
        if self.mean is None:
            raise ValueError("no data: the statistic was never updated")


def channel_rows(axis: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """A function viewing a tensor as rows of its ``axis`` channels: ``[N, C, H, W] -> [N·H·W, C]``."""
    def rows(array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        if array.ndim == 0:
            raise ValueError("cannot take channels of a scalar")
        moved = np.moveaxis(array, axis, -1)
        return moved.reshape(-1, moved.shape[-1])
    return rows


class ChannelStats:
    """Per-channel statistics along ``axis`` (default 1: NCHW and ``[N, C]``), streamed.

    For channel ``c`` over every element ``x`` of that channel in every batch:
    ``mean = Σx / n``, ``var = Σ(x - mean)² / n`` (population), ``std = √var``, ``min``, ``max``,
    ``mean_abs = Σ|x| / n``, ``apoz = #{x == 0} / n``. All arrays have shape ``[C]``, float64.
    """

    def __init__(self, axis: int = 1) -> None:
        self.axis = axis
        self._rows = channel_rows(axis)
        self._acc = _Running()

    def update(self, array: np.ndarray) -> None:
        self._acc.update(self._rows(array))

    def _get(self, name: str) -> np.ndarray:
        self._acc.require()
        return getattr(self._acc, name)

    @property
    def count(self) -> int:
        """Elements seen per channel."""
        return self._acc.count

    @property
    def channels(self) -> int:
        return int(self._get("mean").shape[0])

    @property
    def mean(self) -> np.ndarray:
        return self._get("mean").copy()

    @property
    def var(self) -> np.ndarray:
        return self._get("m2") / self.count

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @property
    def min(self) -> np.ndarray:
        return self._get("min").copy()

    @property
    def max(self) -> np.ndarray:
        return self._get("max").copy()

    @property
    def mean_abs(self) -> np.ndarray:
        return self._get("sum_abs") / self.count

    @property
    def apoz(self) -> np.ndarray:
        """Average percentage of zeros, as a fraction in [0, 1] (a ReLU channel that never fires is 1)."""
        return self._get("zeros") / self.count

    def __repr__(self) -> str:
        seen = f"{self.channels} channels, {self.count} values each" if self._acc.mean is not None else "empty"
        return f"ChannelStats(axis={self.axis}, {seen})"


class Moments:
    """Whole-tensor statistics, streamed: the :class:`ChannelStats` quantities as Python floats, plus ``absmax``."""

    def __init__(self) -> None:
        self._acc = _Running()

    def update(self, array: np.ndarray) -> None:
        self._acc.update(np.asarray(array).reshape(-1, 1))

    def _get(self, name: str) -> float:
        self._acc.require()
        return float(getattr(self._acc, name)[0])

    @property
    def count(self) -> int:
        return self._acc.count

    @property
    def mean(self) -> float:
        return self._get("mean")

    @property
    def var(self) -> float:
        return self._get("m2") / self.count

    @property
    def std(self) -> float:
        return float(np.sqrt(self.var))

    @property
    def min(self) -> float:
        return self._get("min")

    @property
    def max(self) -> float:
        return self._get("max")

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))

    @property
    def mean_abs(self) -> float:
        return self._get("sum_abs") / self.count

    @property
    def zero_fraction(self) -> float:
        return self._get("zeros") / self.count

    def __repr__(self) -> str:
        if self._acc.mean is None:
            return "Moments(empty)"
        return f"Moments(count={self.count}, mean={self.mean:.4g}, std={self.std:.4g})"


class Gram:
    """Streaming ``XᵀX`` (float64), column sums and row count of a matrix view ``X`` of a tensor.

    Parameters
    ----------
    rows : maps one batch of the tensor to ``X_batch`` of shape ``[rows, features]``; default
        :func:`channel_rows` ``(1)`` (``[N, C, H, W] -> [N·H·W, C]``, ``[N, K] -> [N, K]``). For a conv's
        least squares pass a function that extracts the im2col patches.
    max_rows : keep at most this many rows per batch, drawn without replacement (bounds the cost of
        large spatial maps). ``None`` keeps every row.
    seed : seeds the row subsampling (one generator for the whole stream, so the result depends on
        the seed and the batch order only).

    After the stream: ``xtx = Σ XᵀX``, ``sum = Σ X`` (over rows), ``count`` rows,
    ``mean = sum / count``, ``covariance = xtx / count - mean meanᵀ`` (population).
    """

    def __init__(self, rows: Callable[[np.ndarray], np.ndarray] | None = None, *, max_rows: int | None = None,
                 seed: int = 0) -> None:
        self.rows = rows or channel_rows(1)
        self.max_rows = max_rows
        self._rng = np.random.default_rng(seed)
        self.xtx: np.ndarray | None = None
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        x = np.asarray(self.rows(array), dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"Gram rows function must return a 2-D array, got shape {x.shape}")
        if self.max_rows is not None and x.shape[0] > self.max_rows:
            keep = np.sort(self._rng.choice(x.shape[0], size=self.max_rows, replace=False))
            x = x[keep]
        if self.xtx is None:
            self.xtx = np.zeros((x.shape[1], x.shape[1]))
            self.sum = np.zeros(x.shape[1])
        elif x.shape[1] != self.xtx.shape[0]:
            raise ValueError(f"a batch has {x.shape[1]} features, earlier ones had {self.xtx.shape[0]}")
        self.xtx += x.T @ x
        self.sum += x.sum(axis=0)
        self.count += x.shape[0]

    @property
    def features(self) -> int:
        self._require()
        return int(self.xtx.shape[0])

    @property
    def mean(self) -> np.ndarray:
        self._require()
        return self.sum / self.count

    @property
    def covariance(self) -> np.ndarray:
        mean = self.mean
        return self.xtx / self.count - np.outer(mean, mean)

    def _require(self) -> None:
        if self.xtx is None or self.count == 0:
            raise ValueError("no data: the Gram matrix was never updated")

    def __repr__(self) -> str:
        return f"Gram(features={None if self.xtx is None else self.xtx.shape[0]}, rows={self.count})"


# ===============================================================================================
# running the model


class Calibrator:
    """Runs the current IR on sample data and streams intermediate tensors to consumers.

    Parameters
    ----------
    model : the IR model; it is exported anew at each :meth:`run` / :meth:`collect`, so statistics
        always describe the graph as it is after the passes that ran so far.
    data : sample inputs (validated against the model's inputs at each run).
    batch_size : samples per onnxruntime run (a static batch dim in the model overrides it). Memory
        is bounded by one batch of the requested tensors.
    threads : ``intra_op_num_threads`` for onnxruntime.

    Examples
    --------
    >>> cal = Calibrator(model, data, batch_size=32)                      # doctest: +SKIP
    >>> stats = cal.collect(["conv1_out"], lambda name: ChannelStats())   # doctest: +SKIP
    >>> stats["conv1_out"].apoz                                           # doctest: +SKIP
    """

    def __init__(self, model: Model, data: SampleData, batch_size: int = 64, *, threads: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.data = data
        self.batch_size = batch_size
        self.threads = threads

    def run(self, value_names: Iterable[str]) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{name: batch of that tensor}`` for each batch of the data.

        Raises
        ------
        ValueError
            A name the main graph does not define.
        DataError
            The data does not fit the model's inputs.
        GraphoptError
            onnxruntime rejects or fails to run the exported model.
        """
        names = list(dict.fromkeys(value_names))
        if not names:  # onnxruntime reads an empty output list as "all outputs"
            return
        data = check_data(self.model, self.data)
        batch = feed_batch_size(self.model, self.batch_size)
        proto = gort.with_outputs(to_proto(self.model), names, inplace=True)
        sess = gort.session(proto, threads=self.threads)
        del proto  # the session holds its own copy of the weights
        for feeds in data.batches(batch):
            yield gort.run(sess, feeds, names, what="calibration")

    def collect(self, value_names: Iterable[str], make_stat: Callable[[str], Stat]) -> dict[str, Stat]:
        """Stream each named tensor into a fresh statistic ``make_stat(name)``; returns ``{name: stat}``.

        ``make_stat`` is called once per name, so each tensor can get a differently configured
        statistic (e.g. a ``ChannelStats`` axis that depends on the layer).
        """
        names = list(dict.fromkeys(value_names))
        stats = {name: make_stat(name) for name in names}
        for batch in self.run(names):
            for name, array in batch.items():
                stats[name].update(array)
        return stats


def reference_outputs(model: gort.ModelLike, data: SampleData, *, batch_size: int = 64,
                      threads: int | None = None) -> dict[str, np.ndarray]:
    """The model's graph outputs on all of ``data``, concatenated along the first axis.

    Convenience for small data sets and tests: unlike :class:`Calibrator` it holds every output.
    """
    proto = gort.as_proto(model)
    data = check_data(proto, data)
    sess = gort.session(proto, threads=threads)
    chunks: dict[str, list[np.ndarray]] = {}
    for feeds in data.batches(feed_batch_size(proto, batch_size)):
        for name, array in gort.run(sess, feeds, what=gort.describe(model)).items():
            chunks.setdefault(name, []).append(array)
    return {name: np.concatenate(parts, axis=0) if parts[0].ndim else np.stack(parts)
            for name, parts in chunks.items()}
