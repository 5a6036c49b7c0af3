"""Sample data as a directory of ``.npz`` shards, read one shard at a time where it is used.

A calibration set larger than memory is given as a directory (``--data DIR``, ``--train-data DIR``):
every ``*.npz`` file in it, in name order, is a shard keyed like ``--data``
(:func:`graphopt.measure.calibration.load_data`). Sample ``i`` of the set is sample ``i - c_k`` of shard
``k``, where ``c_k`` is the number of samples in the shards before it.

Nothing reads the whole set at once:

* :meth:`SampleDir.open` reads only the headers of the shards' arrays (names, shapes, dtypes; no data)
  and checks each shard against the model's inputs as :func:`~graphopt.measure.calibration.load_data`
  checks a file, and against the first shard: the same arrays, dtypes and per-sample shapes, so every
  shard is fed the same way and shards can be concatenated. A ``shared/`` array is read from each shard
  with its samples.
* :meth:`SampleDir.head` loads the first ``n`` samples, opening only the shards they lie in: what a
  run holds in memory (probe shapes, sensitivity tables, guards, verification without ``--verify-data``).
* :meth:`SampleDir.slices` cuts the set into :class:`ShardSlice` s, a path and a range of samples each,
  optionally leaving out one range (samples held out of a fit). A slice is loaded where it is used
  (:meth:`ShardSlice.load`): by the driver one at a time, or by each executor's worker from the path, so
  the driver never holds more than one shard (the directory must be at the same path on every node of
  a Ray cluster).

Refused (:class:`~graphopt.core.errors.DataError`, one line naming the shard and the array): a directory
without ``.npz`` files, a file that is not a readable ``.npz``, a shard that does not fit the model's
inputs or holds other arrays than the first shard, a shard of 0 samples. A shard whose header is sound
but whose data is corrupt is refused when it is read.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from graphopt.core.errors import DataError
from graphopt.core.ir import Model
from graphopt.measure.calibration import LABELS, SHARED, SHARED_PREFIX, SampleData, check_arrays, load_data

#: Samples a directory's head holds when the run sets no ``--samples``: the lossy passes' own
#: ``samples`` default, so a run reads from the head what it would read from a file.
HEAD_SAMPLES = 512

__all__ = ["HEAD_SAMPLES", "SampleDir", "ShardSlice", "concat", "count_samples", "headers", "shard_paths"]


def shard_paths(path: str | Path) -> list[Path]:
    """The ``.npz`` files of ``path`` (a file, or a directory's ``*.npz``, sorted by name)."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if not shards:
            raise DataError(f"{path}: no .npz shards in this directory")
        return shards
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    if path.suffix != ".npz":
        raise DataError(f"{path}: expected a .npz file or a directory of .npz shards")
    return [path]


def headers(path: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{key: (shape, dtype)}`` of every array in an ``.npz``, read from the arrays' headers only."""
    out = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    raise DataError(f"{path}: member {member!r} is not a numpy array; not an .npz of arrays")
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                if dtype.hasobject:
                    raise DataError(f"{path}: array {member[:-4]!r} holds Python objects; save plain numeric arrays")
                out[member[:-4]] = (tuple(shape), dtype)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable .npz file ({_first_line(exc)})") from None
    if not out:
        raise DataError(f"{path}: the .npz archive holds no arrays")
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def count_samples(path: Path) -> int:
    """Samples in a shard, from the header of its first non-shared array (nothing else is read)."""
    for key, (shape, _) in sorted(headers(path).items()):
        if not key.startswith(SHARED_PREFIX) and key != LABELS:
            return int(shape[0]) if shape else 1
    raise DataError(f"{path}: holds no input arrays")


@dataclass(frozen=True)
class ShardSlice:
    """Samples ``start:stop`` of the shard at ``path``: what an executor's task is sent to read."""

    path: str
    start: int
    stop: int

    @property
    def n_samples(self) -> int:
        return self.stop - self.start

    def load(self, model: Model | onnx.ModelProto) -> SampleData:
        """The slice's samples, read and checked against ``model`` (the whole shard is read: an ``.npz``
        member cannot be read in part)."""
        data = load_data(self.path, model)
        if (self.start, self.stop) == (0, data.n_samples):
            return data
        return data.window(self.start, self.stop)


@dataclass
class SampleDir:
    """A directory of ``.npz`` shards (module docstring). ``counts[k]``: samples in ``shards[k]``."""

    path: Path
    shards: list[Path]
    counts: list[int]

    @classmethod
    def open(cls, path: str | Path, model: Model | onnx.ModelProto) -> SampleDir:
        """The shards of directory ``path``, each checked against ``model`` by its headers (no data read).

        Raises
        ------
        DataError
            See the module docstring.
        """
        path = Path(path)
        # absolute: a task reads its shard by path, and a Ray worker does not run in the driver's directory
        shards = [shard.absolute() for shard in shard_paths(path)]
        counts, first = [], None
        for shard in shards:
            meta = headers(shard)
            keys = {key: (shape[1:], dtype) for key, (shape, dtype) in meta.items()
                    if not key.startswith(SHARED_PREFIX)}
            if first is None:
                first = (shard, set(meta), keys)
            elif set(meta) != first[1]:
                raise DataError(f"{shard}: holds the arrays {sorted(meta)}, the first shard {first[0].name} "
                                f"{sorted(first[1])}; every shard must hold the same arrays")
            else:
                for key, (rest, dtype) in keys.items():
                    if (rest, dtype) != first[2][key]:
                        raise DataError(f"{shard}: array {key!r} holds {dtype} samples of shape {list(rest)}, the "
                                        f"first shard {first[0].name} {first[2][key][1]} of {list(first[2][key][0])}")
            # stand-ins of the right shape and dtype (no memory): the checks of a loaded file, no data read
            stubs = {key: np.broadcast_to(np.zeros((), dtype), shape) for key, (shape, dtype) in meta.items()}
            counts.append(check_arrays(stubs, model, str(shard), cast=False).n_samples)
        return cls(path, shards, counts)

    @property
    def n_samples(self) -> int:
        return sum(self.counts)

    def describe(self) -> str:
        return f"{self.path} ({len(self.shards)} shards, {self.n_samples} samples)"

    def offsets(self) -> list[int]:
        """The index of each shard's first sample in the whole set."""
        return [int(c) for c in np.cumsum([0, *self.counts[:-1]])]

    def head(self, n: int, model: Model | onnx.ModelProto) -> SampleData:
        """The first ``n`` samples of the set (all of it when ``n`` is larger), in memory; only the shards
        they lie in are read."""
        n = min(int(n), self.n_samples)
        parts = [piece.load(model) for piece in self.slices(stop=n)]
        out = concat(parts)
        out.source = f"{self.path} (first {n} of {self.n_samples} samples, {len(parts)} of {len(self.shards)} shards)"
        return out

    def slices(self, exclude: tuple[int, int] | None = None, *, stop: int | None = None) -> list[ShardSlice]:
        """The set's samples below ``stop`` (default all) shard by shard, without the range ``exclude``
        (``(start, stop)`` in set indices): one or two slices per shard, none for a shard left empty."""
        stop = self.n_samples if stop is None else stop
        skip = exclude if exclude is not None else (0, 0)
        out = []
        for shard, offset, count in zip(self.shards, self.offsets(), self.counts):
            for a, b in _minus((offset, min(offset + count, stop)), skip):
                out.append(ShardSlice(str(shard), a - offset, b - offset))
        return out


def _minus(span: tuple[int, int], hole: tuple[int, int]) -> list[tuple[int, int]]:
    """``span`` without ``hole`` (both ``[start, stop)``): the non-empty parts left, in order."""
    a, b = span
    parts = [(a, min(b, hole[0])), (max(a, hole[1]), b)] if hole[0] < hole[1] else [(a, b)]
    return [(x, y) for x, y in parts if x < y]


def concat(parts: list[SampleData]) -> SampleData:
    """The samples of ``parts`` one after the other (shared arrays from the first part)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    inputs = {name: array if first.layout_of(name) == SHARED else np.concatenate([p.inputs[name] for p in parts])
              for name, array in first.inputs.items()}
    labels = None if first.labels is None else np.concatenate([p.labels for p in parts])
    notes = list(dict.fromkeys(note for p in parts for note in p.notes))
    return SampleData(inputs, labels, first.source, notes, dict(first.layout))
