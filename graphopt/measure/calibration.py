"""Sample data, and activation statistics streamed from onnxruntime.

Sample data
-----------
:class:`SampleData` holds the samples, one feed dict each, as one array per model input plus optional
integer class labels. It comes from a file (:func:`load_data`), from a seeded generator
(:func:`random_data`), or from the caller. Every array is checked against the model's inputs
(:func:`check_data`) before anything runs, so a bad file fails with one line naming the file and the
input at fault instead of an onnxruntime traceback halfway through.

An input's array holds its samples in one of three layouts (:class:`SampleData`): *stacked* on the
model input's first axis, its batch axis (several samples per onnxruntime run); *per sample*, one
complete input per sample on an extra leading axis (scalars, recurrent states, inputs whose first axes
differ; every run then takes one sample); or *shared*, one array fed with every run. A stacked input
whose batch dim is dynamic is fed in batches of any size; a static one (``[1, 1, 28, 28]``) in batches
of exactly that size, so a batch-1 model still takes N samples (one by one), and the sample count must
then be a multiple of it.

Data file rules (:func:`load_data`):

* ``.npz``: one array per model input, keyed by input name, or by ``shared/<input name>`` for a shared
  array, plus an optional ``labels`` array (integer class ids ``>= 0``, one per sample). Any other key is
  an error (a typo would otherwise be silently ignored). ``.npy``: the single array of a model with one
  input (no labels).
* Inputs backed by an initializer (IR < 4 models list weights as inputs with defaults) need no data;
  when given, they are validated and fed.
* dtypes: an exact match is fed as is. Floating data for a floating input of another width
  (``float64`` data for a ``float32`` input, the numpy default) is cast, and so is integer data for an
  integer input when every value fits the target type; each cast is recorded in ``SampleData.notes``.
  Integer <-> float and anything <-> bool are errors: a ``uint8`` image fed to a ``float32`` input is
  almost always missing its normalisation, and guessing would hide that.
* shapes: an array with the input's rank is stacked (every static dim after the first must match), one
  with one more axis is per sample (every static dim of the input must match), a shared array has the
  input's rank and static dims. Symbolic and unknown dims accept any size. A scalar input is per sample
  (``[n]``) or shared.
* every non-shared array (and ``labels``) must hold the same number of samples, at least one.

Random data (:func:`random_data`) is reproducible from its seed: floating inputs are standard normal,
integer inputs uniform in ``[0, 10)`` (small non-negative values are valid indices for Gather /
embedding tables and valid counts) unless a :class:`ValueRule` says otherwise, bool inputs fair coin
flips. Dynamic dims must be given with ``input_shapes`` (``graphopt.measure.probe`` chooses them when the
user does not); in the stacked layout the first dim needs none.

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
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from graphopt.measure.blas import for_work
from graphopt.core.errors import DataError
from graphopt.core.ir import Model, dims_of
from graphopt.measure import ort as gort

LABELS = "labels"
RANDOM_INT_HIGH = 10  # random integer inputs are drawn from [0, RANDOM_INT_HIGH)

# ===============================================================================================
# sample data


STACKED, PER_SAMPLE, SHARED = "stacked", "per_sample", "shared"
SHARED_PREFIX = "shared/"  # .npz key prefix of an input fed unchanged with every sample


@dataclass(eq=False)  # arrays have no single truth value; compare SampleData by identity
class SampleData:
    """Sample inputs for a model: sample ``i`` is one feed dict, built from one array per input.

    How an input's array holds the samples is its *layout* (:attr:`layout`, default ``stacked``):

    * ``stacked``: ``[n_samples, *rest]`` with the model input's first axis as the sample axis. Several
      samples go into one onnxruntime run (``array[i:i + k]``); this is the layout of a batched model.
    * ``per_sample``: ``[n_samples, *feed_shape]``, one complete feed per sample (``array[i]`` is fed as
      is). A scalar input, a recurrent state ``[2, 1, 128]`` or inputs whose first axes differ take this
      layout; any per-sample input makes every run a single sample.
    * ``shared``: ``feed_shape``, the same array fed with every run (a sample rate, a fixed state).

    Attributes
    ----------
    inputs : input name -> array (see the layouts).
    labels : integer class ids, shape ``[n_samples]``, or ``None``.
    source : where the data came from (a path, ``random(seed=0)``...), used in messages.
    notes : what loading did to the data (casts), one line each.
    layout : input name -> ``per_sample`` or ``shared``; inputs not listed are ``stacked``.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "<in-memory data>"
    notes: list[str] = field(default_factory=list)
    layout: dict[str, str] = field(default_factory=dict)

    def layout_of(self, name: str) -> str:
        return self.layout.get(name, STACKED)

    @property
    def one_per_run(self) -> bool:
        """Every onnxruntime run takes exactly one sample (some input is fed as a complete per-sample feed)."""
        return PER_SAMPLE in self.layout.values()

    @property
    def n_samples(self) -> int:
        """Number of samples: the common length of the non-shared arrays' first axes (1 when every input
        is shared, 0 when there are no inputs and no labels)."""
        for name, array in self.inputs.items():
            if self.layout_of(name) != SHARED:
                return int(array.shape[0])
        if self.labels is not None:
            return int(len(self.labels))
        return 1 if self.inputs else 0

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive feeds of ``batch_size`` samples (the last one may be shorter; one sample per feed when
        :attr:`one_per_run`). Views, no copies."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start, stop in self.spans(batch_size):
            yield self.feed(start, stop)

    def spans(self, batch_size: int) -> Iterator[tuple[int, int]]:
        """The ``(start, stop)`` sample ranges :meth:`batches` feeds."""
        step = 1 if self.one_per_run else batch_size
        for start in range(0, self.n_samples, step):
            yield start, min(start + step, self.n_samples)

    def feed(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The feed dict of samples ``start:stop`` (exactly one sample when :attr:`one_per_run`)."""
        out = {}
        for name, array in self.inputs.items():
            kind = self.layout_of(name)
            out[name] = array if kind == SHARED else array[start, ...] if kind == PER_SAMPLE else array[start:stop]
        return out

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

    def window(self, start: int, stop: int) -> SampleData:
        """Samples ``start:stop`` (views)."""
        return self._derive(slice(start, stop), f"{self.source}[{start}:{stop}]")

    def take(self, indices: Sequence[int]) -> SampleData:
        """The samples at ``indices``, in that order (copies)."""
        index = np.asarray(indices, dtype=np.int64)
        return self._derive(index, f"{self.source}[{len(index)} selected]")

    def subset(self, names: Iterable[str]) -> SampleData:
        """The same samples restricted to the inputs ``names`` (other models' inputs dropped)."""
        keep = set(names)
        return SampleData({k: v for k, v in self.inputs.items() if k in keep}, self.labels, self.source,
                          list(self.notes), {k: v for k, v in self.layout.items() if k in keep})

    def _derive(self, index: slice | np.ndarray, source: str) -> SampleData:
        labels = None if self.labels is None else self.labels[index]
        inputs = {k: v if self.layout_of(k) == SHARED else v[index] for k, v in self.inputs.items()}
        return SampleData(inputs, labels, source, list(self.notes), dict(self.layout))

    def __repr__(self) -> str:
        tags = {k: "" if self.layout_of(k) == STACKED else " " + self.layout_of(k) for k in self.inputs}
        arrays = ", ".join(f"{k!r}: {_describe_array(v)}{tags[k]}" for k, v in self.inputs.items())
        labels = "" if self.labels is None else f", labels={_describe_array(self.labels)}"
        return f"SampleData(source={self.source!r}, n_samples={self.n_samples}, inputs={{{arrays}}}{labels})"


def sample_rows(output: np.ndarray, data: SampleData) -> np.ndarray:
    """One run's output with the samples of that run on its first axis.

    A stacked run's outputs already have them there. A single-sample run (:attr:`SampleData.one_per_run`)
    keeps an output whose first dim is 1 (the model's batch axis of one sample) and gives any other (a
    state ``[2, 1, 128]``, a scalar) a leading axis of 1.
    """
    if not data.one_per_run or (output.ndim and output.shape[0] == 1):
        return output
    return output[np.newaxis]


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


def feed_batch_size(model: Model | onnx.ModelProto, batch_size: int, data: SampleData | None = None) -> int:
    """The batch size to feed ``model``: 1 when ``data`` feeds one sample per run, else its static batch
    dim when it has one, else ``batch_size``.

    Raises
    ------
    DataError
        Stacked inputs fix different static batch sizes (then their first axes are not one sample axis).
    """
    if data is not None and data.one_per_run:
        return 1
    stacked = None if data is None else {n for n in data.inputs if data.layout_of(n) == STACKED}
    static = {s.name: s.static_batch for s in input_specs(model)
              if not s.optional and s.static_batch and (stacked is None or s.name in stacked)}
    sizes = set(static.values())
    if len(sizes) > 1:
        listing = ", ".join(f"{k}={v}" for k, v in static.items())
        raise DataError(f"model inputs fix different first dims ({listing}), so they cannot share a sample axis; "
                        f"give one complete feed per sample (arrays with one more axis than the input)")
    return sizes.pop() if sizes else batch_size


#: Bytes one run's requested tensors may take (:func:`batch_within`): ResNet-50's pruned layers read and
#: write 72 MiB per image at 224x224, so one run of 32 images held 2.3 GiB.
RUN_BYTES = 256 * 2**20


def batch_within(model: Model, names: Iterable[str], data: SampleData, batch_size: int,
                 budget: int = RUN_BYTES) -> int:
    """``batch_size``, or fewer samples per run when one run's ``names`` would pass ``budget`` bytes
    (measured on one sample). A model with a static batch dim or data fed one sample per run keeps
    :func:`feed_batch_size`."""
    names = sorted(set(names))
    if not names:
        return feed_batch_size(model, batch_size, data)
    return batch_for_bytes(model, data, batch_size,
                           lambda: sum(int(a.nbytes) for a in first_sample(model, names, data).values()), budget)


def batch_for_bytes(model: Model | onnx.ModelProto, data: SampleData, batch_size: int,
                    per_sample: Callable[[], int], budget: int) -> int:
    """``batch_size``, or as many samples as keep ``per_sample()`` bytes (asked only when it matters) times
    the batch within ``budget``; a static batch dim or data fed one sample per run keeps
    :func:`feed_batch_size`."""
    fixed = feed_batch_size(model, batch_size, data)
    if fixed != batch_size or data.n_samples <= 1:
        return fixed
    return int(max(1, min(batch_size, budget // max(int(per_sample()), 1))))


#: Bytes of the largest single activation one run of a measuring session may hold
#: (:meth:`graphopt.measure.segments.Checkpoints.build`): onnxruntime's arena grows to a few of them and
#: keeps them.
ACTIVATION_BYTES = 64 * 2**20


def first_sample(model: Model | onnx.ModelProto, names: Iterable[str], data: SampleData) -> dict[str, np.ndarray]:
    """The named main-graph values of ``model`` on the first sample of ``data`` (one run): what sizes and
    types of intermediate tensors are, without running every sample."""
    proto, weights = gort.exposed(model, sorted(set(names)))
    one = check_data(proto, data.head(1))
    feed = next(iter(one.batches(1)))
    return gort.run(gort.session(proto, weights=weights), feed, sorted(set(names)), what="one sample")


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
    arrays = {_key(name, data.layout_of(name)): array for name, array in data.inputs.items()}
    if data.labels is not None:
        arrays[LABELS] = data.labels
    return _validated(arrays, specs, data.source, list(data.notes), dict(data.layout))


def check_arrays(arrays: Mapping[str, np.ndarray], model: Model | onnx.ModelProto, source: str, *,
                 cast: bool = True) -> SampleData:
    """``arrays`` keyed as in an ``.npz`` (input name, ``shared/<name>``, ``labels``) validated against
    ``model``'s inputs, as :func:`load_data` validates a file's. ``cast=False`` checks without casting
    (and without reading values): for stand-ins of the right shape and dtype whose values are not read,
    such as a shard's headers (:mod:`graphopt.measure.sampledir`)."""
    return _validated(arrays, input_specs(model), source, [], cast=cast)


def _key(name: str, layout: str) -> str:
    return SHARED_PREFIX + name if layout == SHARED else name


def _validated(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], source: str,
               notes: list[str], layout: Mapping[str, str] | None = None, *, cast: bool = True) -> SampleData:
    """Check ``arrays`` (keyed by input name, ``shared/<name>`` or ``labels``) against the model inputs.

    An array's layout is ``shared`` for a ``shared/`` key; otherwise ``layout`` says it, or its rank does:
    the input's rank means ``stacked``, one more means ``per_sample``."""
    by_name = {s.name: s for s in specs}
    listing = ", ".join(s.name for s in specs if not s.optional) or "none"
    labels = arrays.get(LABELS) if LABELS not in by_name else None
    named: dict[str, tuple[np.ndarray, str | None]] = {}
    for key, array in arrays.items():
        if key == LABELS and LABELS not in by_name:
            continue
        shared = key.startswith(SHARED_PREFIX) and key not in by_name
        name = key[len(SHARED_PREFIX):] if shared else key
        if name not in by_name:
            raise DataError(f"{source}: array {key!r} matches no model input (model inputs: {listing})")
        if name in named:
            raise DataError(f"{source}: input {name!r} is given twice ({name!r} and {SHARED_PREFIX + name!r})")
        named[name] = (array, SHARED if shared else (layout or {}).get(name))
    for spec in specs:
        if not spec.optional and spec.name not in named:
            raise DataError(f"{source}: no array for model input {spec.name!r} "
                            f"(expected {spec.type_name} {spec.shape_text()})")
    inputs, layouts = {}, {}
    for spec in specs:
        if spec.name in named:
            array, kind = named[spec.name]
            inputs[spec.name], layouts[spec.name] = _checked_input(array, spec, kind, source, notes, cast)
    out = SampleData(inputs, None, source, notes, {k: v for k, v in layouts.items() if v != STACKED})
    n = _common_sample_count(out, labels, source)
    _check_batch_multiple(out, specs, n, source)
    if labels is not None:
        out.labels = _checked_labels(labels, n, source)
    return out


def _checked_input(array: np.ndarray, spec: InputSpec, layout: str | None, source: str,
                   notes: list[str], cast: bool = True) -> tuple[np.ndarray, str]:
    """The array (cast if safe) and its layout, or a DataError naming what does not fit."""
    where = f"{source}: input {spec.name!r}"
    if not isinstance(array, np.ndarray):
        raise DataError(f"{where}: expected a numpy array, got {type(array).__name__}")
    array = _checked_dtype(array, spec, where, notes, cast)
    if spec.shape is None:
        if layout == SHARED:
            return array, SHARED
        if array.ndim == 0:
            raise DataError(f"{where}: is a scalar; give one value per sample, or use the key "
                            f"{SHARED_PREFIX + spec.name!r} for a value every sample shares")
        return array, layout or STACKED
    rank = len(spec.shape)
    if layout is None:
        layout = PER_SAMPLE if array.ndim == rank + 1 else STACKED
    if layout == STACKED and rank == 0:
        raise DataError(f"{where}: has shape {list(array.shape)} for a scalar input; give one value per sample "
                        f"(shape [n]) or use the key {SHARED_PREFIX + spec.name!r} for one value all samples share")
    want_rank = rank + 1 if layout == PER_SAMPLE else rank
    if array.ndim != want_rank:
        raise DataError(f"{where}: has shape {list(array.shape)} (rank {array.ndim}); the model input is "
                        f"{spec.shape_text()}: expected rank {rank} (samples on its first axis) or {rank + 1} "
                        f"(one complete input per sample)" if layout != SHARED else
                        f"{where}: has shape {list(array.shape)}; a shared array is one complete input "
                        f"{spec.shape_text()} (rank {rank})")
    feed_dims = array.shape[1:] if layout == PER_SAMPLE else array.shape
    first = 0 if layout != STACKED else 1  # a stacked array's first axis is the sample axis
    for axis, (want, got) in enumerate(zip(spec.shape[first:], feed_dims[first:]), start=first):
        if isinstance(want, int) and want > 0 and want != got:
            raise DataError(f"{where}: has shape {list(array.shape)}; the model fixes axis {axis} to {want} "
                            f"{spec.shape_text()}")
    return array, layout


def _checked_dtype(array: np.ndarray, spec: InputSpec, where: str, notes: list[str],
                   cast: bool = True) -> np.ndarray:
    want = spec.np_dtype
    got = array.dtype
    if want is None or got == want:
        return array
    if not cast and got.kind in "iuf" and got.kind.replace("u", "i") == want.kind.replace("u", "i"):
        return array  # a cast that may apply: its values (an integer's range) are checked where it is read
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


def _common_sample_count(data: SampleData, labels: np.ndarray | None, source: str) -> int:
    counts = {name: int(a.shape[0]) for name, a in data.inputs.items() if data.layout_of(name) != SHARED}
    if labels is not None and np.ndim(labels) > 0:
        counts[LABELS] = int(np.shape(labels)[0])
    if not counts:
        if data.inputs:
            return 1  # every input shared: one sample
        raise DataError(f"{source}: holds no arrays")
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise DataError(f"{source}: arrays hold different numbers of samples ({listing})")
    n = next(iter(counts.values()))
    if n == 0:
        raise DataError(f"{source}: holds 0 samples")
    return n


def _check_batch_multiple(data: SampleData, specs: Sequence[InputSpec], n: int, source: str) -> None:
    """A stacked input with a static batch ``k`` takes ``k`` samples per run: exactly 1 when runs hold one
    sample (a per-sample input is present), else any multiple of ``k``."""
    for spec in specs:
        k = spec.static_batch
        if spec.name not in data.inputs or data.layout_of(spec.name) != STACKED or not k:
            continue
        if data.one_per_run and k != 1:
            raise DataError(f"{source}: input {spec.name!r} has a static batch of {k} {spec.shape_text()} but other "
                            f"inputs give one complete feed per sample; give {spec.name!r} that way too "
                            f"(shape [n, {', '.join(str(d) for d in spec.shape)}])")
        if n % k:
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


@dataclass(frozen=True)
class ValueRule:
    """How random values of one integer (or mask) input are drawn, and why.

    kind : ``range`` (uniform integers in ``[low, high)``), ``choices`` (sample ``i`` takes
        ``choices[i % len(choices)]``, so every value is exercised) or ``mask`` (ones followed by zeros
        along the last axis, at least one one: a valid attention/padding mask).
    reason : what in the graph set the rule (``Gather table 'emb' has 2 rows``), for the report.
    """

    kind: str
    low: int = 0
    high: int = RANDOM_INT_HIGH
    choices: tuple = ()
    reason: str = ""


def sample_layout(model: Model | onnx.ModelProto) -> str:
    """``stacked`` when the required inputs can share one sample axis (each has rank >= 1 and their first
    dims are all dynamic or all the same fixed size), else ``per_sample`` (scalars, recurrent states with
    their own leading axes, inputs with different fixed first dims)."""
    required = [s for s in input_specs(model) if not s.optional]
    if any(s.shape is not None and len(s.shape) == 0 for s in required):
        return PER_SAMPLE
    firsts = {s.shape[0] if isinstance(s.shape[0], int) and s.shape[0] > 0 else None
              for s in required if s.shape}
    return STACKED if len(firsts) <= 1 else PER_SAMPLE


def random_data(model: Model | onnx.ModelProto, n_samples: int, *, seed: int,
                input_shapes: Mapping[str, Sequence[int]] | None = None,
                values: Mapping[str, ValueRule] | None = None) -> SampleData:
    """Seeded random inputs for every input of ``model`` that has no default value.

    Floating inputs: standard normal. Integer inputs: uniform in ``[0, 10)`` unless ``values`` gives a
    rule (:class:`ValueRule`). Bool: fair coin. Each input gets its own generator, seeded from
    ``(seed, input position)``, so the data is a pure function of the model's inputs and ``seed``.
    The layout is :func:`sample_layout`'s: stacked inputs get samples on their first axis, otherwise
    every input gets one complete feed per sample.

    Parameters
    ----------
    n_samples : samples to draw; rounded up to a multiple of a static batch dim (stacked layout).
    input_shapes : name -> full input shape, fixing dynamic dims. In the stacked layout its first dim
        is ignored when the model's batch dim is dynamic (``n_samples`` decides the sample axis).
    values : input name -> how to draw its values.

    Raises
    ------
    DataError
        A dynamic or unknown dim with no shape given (the message says which ``--input-shape`` to pass;
        in the stacked layout the first dim needs none), a given shape that contradicts the model, an
        unknown name in ``input_shapes``, or an input type that cannot be generated (strings, bfloat16...).
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
    layout = sample_layout(model)
    static = {s.static_batch for s in required if s.static_batch}
    unit = max(static) if len(static) == 1 and layout == STACKED else 1
    n = -(-n_samples // unit) * unit
    inputs = {}
    for position, spec in enumerate(specs):
        if spec.optional:
            continue
        rng = np.random.default_rng([seed, position])
        rule = (values or {}).get(spec.name)
        if layout == STACKED:
            shape = (n, *_sample_shape(spec, shapes.get(spec.name)))
        else:
            shape = (n, *_feed_shape(spec, shapes.get(spec.name)))
        inputs[spec.name] = _draw(rng, spec, shape, rule)
    kinds = {} if layout == STACKED else {name: PER_SAMPLE for name in inputs}
    return SampleData(inputs, None, f"random(seed={seed})", [], kinds)


def _given_shape(spec: InputSpec, given: Sequence[int]) -> tuple[int, ...]:
    """``given`` checked against the model input's rank and fixed dims."""
    given = tuple(int(d) for d in given)
    if spec.shape is not None:
        if len(given) != len(spec.shape):
            raise DataError(f"input shape for {spec.name!r} has rank {len(given)}; the model input is "
                            f"{spec.shape_text()} (rank {len(spec.shape)})")
        for axis, (want, got) in enumerate(zip(spec.shape, given)):
            if isinstance(want, int) and want > 0 and want != got:
                raise DataError(f"input shape for {spec.name!r} sets axis {axis} to {got}; the model fixes it "
                                f"to {want} {spec.shape_text()}")
    return given


def _sample_shape(spec: InputSpec, given: Sequence[int] | None) -> tuple[int, ...]:
    """The per-sample dims of a stacked input (all but the first), from the model or from ``given``."""
    if given is not None:
        given = _given_shape(spec, given)
        if len(given) == 0:
            raise DataError(f"input shape for {spec.name!r} is empty; a stacked input needs a leading sample axis")
        return given[1:]
    if spec.shape is None:
        raise DataError(f"input {spec.name!r} has an unknown shape; pass --input-shape {spec.name}:d0,d1,...")
    _require_static(spec, 1)
    return tuple(spec.shape[1:])  # type: ignore[arg-type]


def _feed_shape(spec: InputSpec, given: Sequence[int] | None) -> tuple[int, ...]:
    """The complete feed shape of a per-sample input, from ``given`` or the model's fixed dims."""
    if given is not None:
        return _given_shape(spec, given)
    if spec.shape is None:
        raise DataError(f"input {spec.name!r} has an unknown shape; pass --input-shape {spec.name}:d0,d1,...")
    _require_static(spec, 0)
    return tuple(spec.shape)  # type: ignore[arg-type]


def _require_static(spec: InputSpec, first: int) -> None:
    for axis, dim in enumerate(spec.shape[first:], start=first):
        if not (isinstance(dim, int) and dim > 0):
            label = f"dynamic dim {dim!r}" if isinstance(dim, str) else "an unknown dim"
            raise DataError(f"input {spec.name!r} {spec.shape_text()} has {label} at axis {axis}; "
                            f"pass --input-shape {spec.name}:d0,d1,...")


def _draw(rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...], rule: ValueRule | None) -> np.ndarray:
    dtype = spec.np_dtype
    if dtype is None or dtype.kind not in "fiub" or spec.dtype == onnx.TensorProto.BFLOAT16:
        raise DataError(f"input {spec.name!r}: cannot generate random data of type {spec.type_name}; "
                        f"give sample data")
    if rule is not None and rule.kind == "mask":
        return _prefix_mask(rng, shape).astype(dtype)
    if rule is not None and rule.kind == "choices" and rule.choices:
        picks = np.resize(np.asarray(rule.choices), shape[0])  # sample i takes choices[i % len]
        return np.broadcast_to(picks.reshape((shape[0],) + (1,) * (len(shape) - 1)), shape).astype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    low, high = (rule.low, rule.high) if rule is not None and rule.kind == "range" else (0, RANDOM_INT_HIGH)
    return rng.integers(low, high, size=shape).astype(dtype)


def _prefix_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Ones followed by zeros along the last axis, at least one one per row (a rank-0 mask is 1)."""
    if len(shape) < 2:
        return np.ones(shape, dtype=np.int64)
    length = shape[-1]
    keep = rng.integers(1, length + 1, size=shape[:-1])
    return (np.arange(length) < keep[..., None]).astype(np.int64)


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
    """A function viewing a tensor as rows of its ``axis`` channels: ``[N, C, H, W] -> [N·H·W, C]``
    (picklable: statistics holding it travel to executor workers)."""
    return partial(_channel_rows, axis=axis)


def _channel_rows(array: np.ndarray, axis: int) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 0:
        raise ValueError("cannot take channels of a scalar")
    moved = np.moveaxis(array, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


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
        with for_work(2.0 * x.shape[0] * x.shape[1] ** 2):
            self.xtx += x.T @ x
        self.sum += x.sum(axis=0)
        self.count += x.shape[0]

    def merge(self, other: Gram) -> Gram:
        """The statistics of both row sets (shards of the samples gathered apart): sums added, this
        Gram's row view kept; neither side is changed."""
        out = Gram(self.rows, max_rows=self.max_rows)
        out.count = self.count + other.count
        if other.xtx is None or self.xtx is None:
            src = self if other.xtx is None else other
            out.xtx = None if src.xtx is None else src.xtx.copy()
            out.sum = None if src.sum is None else src.sum.copy()
            return out
        if self.xtx.shape != other.xtx.shape:
            raise ValueError(f"cannot merge Grams of {self.xtx.shape[0]} and {other.xtx.shape[0]} features")
        out.xtx, out.sum = self.xtx + other.xtx, self.sum + other.sum
        return out

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
        batch = feed_batch_size(self.model, self.batch_size, data)
        proto, weights = gort.exposed(self.model, names)   # an IR model's weights by reference, not copied
        sess = gort.session(proto, threads=self.threads, weights=weights)
        del proto, weights
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
    proto, weights = gort.structure(model)
    data = check_data(proto, data)
    sess = gort.session(proto, threads=threads, weights=weights)
    chunks: dict[str, list[np.ndarray]] = {}
    for feeds in data.batches(feed_batch_size(proto, batch_size, data)):
        for name, array in gort.run(sess, feeds, what=gort.describe(model)).items():
            chunks.setdefault(name, []).append(sample_rows(array, data))
    return {name: np.concatenate(parts, axis=0) if parts[0].ndim else np.stack(parts)
            for name, parts in chunks.items()}
