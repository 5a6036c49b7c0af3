"""Unlabeled training inputs: shuffled batches, epoch after epoch, augmented to fit the input kind.

Sources
-------
* the calibration samples (:class:`graphopt.measure.calibration.SampleData`, in memory);
* ``--train-data FILE.npz``: one file, read once;
* ``--train-data DIR``: every ``*.npz`` in it is a shard (:mod:`graphopt.measure.sampledir`, the reader
  ``--data DIR`` uses too), read one at a time in a new shuffled order each epoch, so a set larger than
  memory streams. Each shard is checked against the model's inputs
  like ``--data`` (:func:`graphopt.measure.calibration.load_data`); a ``labels`` array is allowed and
  ignored: distillation needs none.

Only the stacked layout trains (samples on the batch axis); shared arrays are fed with every batch.

Augmentation (``augment``: ``auto`` | ``on`` | ``off``)
----------------------------------------------------
``auto`` augments the calibration samples and leaves ``--train-data`` as it is; ``on`` augments either.
Why the source decides: the calibration samples are few (512 by default; the pass trains on 410 of
them for about 47 epochs at its 300 steps), and without new views the student learns them by heart:
on the zoo at 0.35 of the MACs augmentation gained mobilenetv2 0.24 point, and vgg without it was
refused by the held-out gate. A training set is many samples of what the model will meet (60,000
Fashion-MNIST images, 5-6 epochs): the pruned student has no memorising to prevent (its training loss
equals its held-out loss) and is short of capacity, which shifted and flipped views spend on inputs
the deployment does not see: mobilenetv2 at 0.35 ended 0.31-0.44 point closer to its teacher without
them and resnet 0.31 (the same recipe and seeds; BENCHMARKS, issue 17, sixth round).

Augmented, a float input of rank 4 whose array looks like images (channels 1, 3 or 4 on axis 1 for
NCHW, on axis 3 for NHWC, both spatial dims ≥ 8) gets, per sample, a random shift of up to ``shift``
pixels in each direction (edge-replicated, so a background stays background) and, with ``flip``, a
horizontal flip with probability ½. Every other input (token ids and other integer inputs, masks,
audio, states) is fed as it is: a shifted sentence or a flipped state is not a plausible input.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphopt.core.errors import DataError
from graphopt.core.ir import Model
from graphopt.measure.calibration import SHARED, STACKED, SampleData, load_data
from graphopt.measure.sampledir import count_samples, shard_paths

IMAGE_CHANNELS = (1, 3, 4)
MIN_IMAGE_SIDE = 8


@dataclass
class Augment:
    """Per-sample random shifts and flips of the image inputs (``layout``: input name -> nchw | nhwc)."""

    shift: int = 0
    flip: bool = False
    layout: dict[str, str] = field(default_factory=dict)
    mixup: float = 0.0
    unless: str = ""    # why shifts and flips are off where they would apply (said in describe)

    def active(self) -> bool:
        return bool(self.layout) and (self.shift > 0 or self.flip or self.mixup > 0)

    def describe(self) -> str:
        if not self.active():
            return f"none: {self.unless}" if self.unless and self.layout else "none"
        parts = ([f"shifts up to {self.shift} px"] if self.shift else []) + \
            (["horizontal flips"] if self.flip else []) + ([f"mixup (Beta({self.mixup:g}, {self.mixup:g}))"]
                                                           if self.mixup > 0 else [])
        return f"{' and '.join(parts)} on {', '.join(f'{k} ({v})' for k, v in sorted(self.layout.items()))}"

    def __call__(self, feeds: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if not self.active():
            return feeds
        out = dict(feeds)
        n = next(len(feeds[k]) for k in self.layout)
        dy, dx = rng.integers(-self.shift, self.shift + 1, size=(2, n))
        flips = rng.random(n) < 0.5 if self.flip else np.zeros(n, dtype=bool)
        if self.mixup > 0:
            partner = rng.permutation(n)
            lam = rng.beta(self.mixup, self.mixup, size=n)
        for name, layout in self.layout.items():
            x = feeds[name] if layout == "nchw" else np.transpose(feeds[name], (0, 3, 1, 2))
            y = _shift_flip(x, dy, dx, flips, self.shift) if self.shift or self.flip else x
            if self.mixup > 0:
                w = lam.astype(y.dtype).reshape(-1, 1, 1, 1)
                y = w * y + (1 - w) * y[partner]
            out[name] = y if layout == "nchw" else np.ascontiguousarray(np.transpose(y, (0, 2, 3, 1)))
        return out


def _shift_flip(x: np.ndarray, dy: np.ndarray, dx: np.ndarray, flips: np.ndarray, s: int) -> np.ndarray:
    """NCHW images shifted by (dy, dx) per sample with edge padding, flipped where ``flips``."""
    h, w = x.shape[2], x.shape[3]
    padded = np.pad(x, ((0, 0), (0, 0), (s, s), (s, s)), mode="edge") if s else x
    out = np.empty_like(x)
    for i in range(len(x)):
        crop = padded[i, :, s + dy[i]:s + dy[i] + h, s + dx[i]:s + dx[i] + w]
        out[i] = crop[:, :, ::-1] if flips[i] else crop
    return out


def image_layout(array: np.ndarray) -> str | None:
    """``nchw`` / ``nhwc`` when a stacked float array looks like images, else ``None``."""
    if array.dtype.kind != "f" or array.ndim != 4:
        return None
    if array.shape[1] in IMAGE_CHANNELS and min(array.shape[2:]) >= MIN_IMAGE_SIDE:
        return "nchw"
    if array.shape[3] in IMAGE_CHANNELS and min(array.shape[1:3]) >= MIN_IMAGE_SIDE:
        return "nhwc"
    return None


def augment_for(sample: SampleData, mode: str, shift: int, flip: bool, mixup: float = 0.0, *,
                training_set: bool = False) -> Augment:
    """The augmentation ``mode`` (``auto`` | ``on`` | ``off``) gives the inputs of ``sample``;
    ``training_set``: the samples are ``--train-data`` (``auto`` leaves them as they are), not the
    calibration samples."""
    if mode == "off":
        return Augment()
    layout = {name: kind for name, array in sample.inputs.items()
              if sample.layout_of(name) == STACKED and (kind := image_layout(array)) is not None}
    if mode == "auto" and training_set:
        # mixup is never on unless asked for, so an asked-for mixup stays
        return Augment(0, False, layout, mixup, unless="no shifts or flips on --train-data (augment=on adds them)")
    return Augment(shift, flip, layout, mixup)


class Source:
    """Batches of training feeds, forever: shuffled each epoch, shard by shard for a directory (whole
    batches only)."""

    def __init__(self, model: Model, *, sample: SampleData | None = None, path: str | Path | None = None) -> None:
        self.model = model
        self.sample = sample
        self.shards: list[Path] = []
        if path is not None:
            self.shards = shard_paths(path)
            self.description = str(path) if len(self.shards) == 1 else f"{path} ({len(self.shards)} shards)"
        else:
            assert sample is not None
            self.description = sample.source
        self.n_samples = sample.n_samples if sample is not None and not self.shards else \
            sum(count_samples(p) for p in self.shards)

    def first(self) -> SampleData:
        """The first shard (or the samples): its arrays decide the augmentation."""
        return self._load(self.shards[0]) if self.shards else self.sample

    def _load(self, path: Path) -> SampleData:
        data = load_data(path, self.model)
        if any(kind not in (STACKED, SHARED) for kind in data.layout.values()):
            raise DataError(f"{path}: training data must hold its samples on the batch axis (stacked layout)")
        return data

    def batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        while True:
            parts = [self.sample] if not self.shards else [self.shards[i] for i in rng.permutation(len(self.shards))]
            for part in parts:
                data = part if isinstance(part, SampleData) else self._load(part)
                order = rng.permutation(data.n_samples)
                # whole batches only (a static batch dim takes nothing else); the order changes each epoch,
                # so every sample is seen; a part smaller than one batch is one batch
                for start in range(0, max(len(order) - batch_size, 0) + 1, batch_size):
                    yield data.take(np.sort(order[start:start + batch_size])).feed(0, batch_size)
