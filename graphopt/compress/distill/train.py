"""Knowledge distillation: the loss, the training loop, and the held-out measure.

Loss (summed over the graph outputs and the matched intermediate tensors, teacher ``t``, student ``s``)
--------------------------------------------------------------------------------------------------
* class scores (a float ``[N, C]`` output, ``C > 1``, the verifier's rule): Hinton's soft targets,
  ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per sample (the ``T²`` keeps the gradient's scale as ``T``
  changes), or, with ``class_loss=mse``, the logits' relative MSE below (Kim et al. 2021, "Comparing
  Kullback-Leibler divergence and mean squared error loss in knowledge distillation");
* any other float output or matched tensor: ``mse`` — ``mean((s − t)²) / var(t)``, the mean squared
  error relative to the teacher's variance, so outputs of different scales weigh alike — or ``cosine``,
  ``1 − cos(s, t)`` per sample;
* integer and bool outputs carry no gradient and are not in the loss.

The teacher labels each batch as the student sees it, after augmentation (:func:`labelled`): with
mixup, the mixed image (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and
consistent": the same view for both, "function matching"). :class:`Prefetch` prepares the next
batch in a thread while torch trains on this one.

Optimiser: Adam with a one-cycle schedule (Smith & Topin 2019: the learning rate warms up over the
first 10 % of the steps to ``lr``, then anneals to zero), the schedule the feasibility study of issue
17 used. The student's float weights train as :mod:`graphopt.compress.distill.interpreter` parametrises
them; nothing else moves.

Weight averaging (``ema`` = ``d`` > 0, Polyak & Juditsky 1992; the exponential form of Tarvainen &
Valpola 2017): a shadow copy ``θ̄ ← d·θ̄ + (1 − d)·θ`` follows the parameters after every step, and
the shadow is what the run ends with (what the held-out gate judges and what is written back). With
the warm-up bias corrected (``d_t = min(d, (1 + t)/(10 + t))``) the average covers about the last
``1/(1 − d)`` steps. The average of parameters keeps their structure: a parameter is a free value, a
masked weight's parameter (the mask applies in the forward) or a codebook, so averaging moves only
what training moves.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from graphopt.compress.distill.interpreter import TorchGraph
from graphopt.measure.calibration import SampleData
from graphopt.measure.verify import is_class_scores

Feeds = dict[str, np.ndarray]
Teacher = Callable[[Feeds], dict[str, np.ndarray]]


@dataclass
class Settings:
    steps: int
    lr: float = 1e-3
    temperature: float = 2.0
    loss: str = "mse"                  # for outputs that are not class scores: mse | cosine
    weight_decay: float = 0.0
    match: Sequence[str] = ()          # intermediate tensors matched besides the outputs
    match_weight: float = 1.0
    warmup: float = 0.1                # fraction of the steps the one-cycle schedule warms up
    class_loss: str = "kl"             # on class scores: kl (at the temperature) | mse (on the logits)
    ema: float = 0.0                   # decay of the parameters' running average (0: off)


@dataclass
class Log:
    """What a training run did: the loss per step (smoothed for the progress line), its wall time and
    the CPU time of the thread that trains (the student's forward and backward passes; the next batch
    is made in another thread; with more than one torch thread, only this thread's share). On an
    idle machine with a core for each thread a step takes about the student's time, so
    ``thread_seconds`` is what the training costs there; ``seconds`` also counts waiting for a
    shared machine."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    thread_seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        if not self.losses:
            return {}
        k = max(1, len(self.losses) // 10)  # means over the first and last tenth: one step is noisy
        return {"first": round(float(np.mean(self.losses[:k])), 6), "last": round(float(np.mean(self.losses[-k:])), 6)}


def output_kinds(teacher_out: Mapping[str, np.ndarray], match: Sequence[str]) -> dict[str, str]:
    """``name -> classes | float`` for every tensor in the loss (integer and bool tensors are left out)."""
    kinds = {}
    for name, array in teacher_out.items():
        if array.dtype.kind != "f":
            continue
        kinds[name] = "classes" if is_class_scores(array) and name not in match else "float"
    return kinds


def distill_loss(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                 kinds: Mapping[str, str], settings: Settings, per_sample: bool = False) -> torch.Tensor:
    """The module docstring's loss, averaged over the batch; ``per_sample``: one value per sample (the
    rows of the first tensor in ``kinds``; a term whose tensor has other rows, or none, counts its mean
    for every sample). The mean of the per-sample values is the batch loss."""
    terms = []
    for name, kind in kinds.items():
        s, t = student[name].float(), teacher[name].float()
        weight = settings.match_weight if name in settings.match else 1.0
        if kind == "classes" and settings.class_loss == "kl":
            temp = settings.temperature
            term = F.kl_div(F.log_softmax(s / temp, dim=1), F.log_softmax(t / temp, dim=1), log_target=True,
                            reduction="none").sum(1) * temp * temp
        elif kind != "classes" and settings.loss == "cosine":
            term = 1 - F.cosine_similarity(_rows(s), _rows(t), dim=1)
        else:
            term = ((s - t) ** 2).reshape(len(_rows(s)), -1).mean(1) / t.var(unbiased=False).clamp_min(1e-12)
        terms.append(weight * term)
    if not terms:
        return torch.zeros(0 if per_sample else (), dtype=torch.float32)
    if not per_sample:
        return sum(term.mean() for term in terms)
    rows = len(terms[0])
    return sum(term if len(term) == rows else term.mean() for term in terms)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as one row per sample (a scalar is one row)."""
    return x.reshape(len(x), -1) if x.ndim else x.reshape(1, 1)


def labelled(batches: Iterator[Feeds], augment: Callable[[Feeds, np.random.Generator], Feeds],
             teacher: Teacher, rng: np.random.Generator) -> Iterator[tuple[Feeds, dict[str, np.ndarray]]]:
    """``(augmented feeds, the teacher's outputs on them)``: the teacher labels the very view the
    student sees (a mixed image included), so the student matches the teacher's function there."""
    for feeds in batches:
        feeds = augment(feeds, rng)
        yield feeds, teacher(feeds)


class Prefetch:
    """The items of ``source``, made ``depth`` ahead in a background thread.

    While torch trains on one batch, the next is drawn, augmented and labelled by the teacher
    (onnxruntime and numpy release the GIL): on two cores the teacher's time hides behind the
    student's. ``source`` is consumed by the one thread only, in order, so a seeded run is
    deterministic. An exception in the thread is raised by ``next``; :meth:`close` stops the thread.
    """

    def __init__(self, source: Iterator, depth: int = 2) -> None:
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="finetune-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            for item in self._source:
                if not self._put((True, item)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((False, exc))
            return
        self._put((False, StopIteration()))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self):
        ok, item = self._queue.get()
        if not ok:
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Average:
    """The exponential running average of ``params`` (the module docstring's ``θ̄``), bias-corrected in
    its first steps so that it does not lean on the starting point."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.params, self.decay, self.updates = list(params), decay, 0
        self.shadow = [p.detach().clone() for p in self.params]

    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        with torch.no_grad():
            for avg, p in zip(self.shadow, self.params):
                avg.mul_(d).add_(p.detach(), alpha=1.0 - d)

    def copy_to_parameters(self) -> None:
        with torch.no_grad():
            for avg, p in zip(self.shadow, self.params):
                p.copy_(avg)


def fit(graph: TorchGraph, batches: Iterator[tuple[Feeds, dict[str, np.ndarray]]], kinds: Mapping[str, str],
        settings: Settings, progress: Callable[[int, float], None] | None = None) -> Log:
    """Train ``graph``'s parameters for ``settings.steps`` batches of ``(feeds, teacher outputs)``;
    ``progress(step, smoothed loss)``."""
    log = Log()
    started, thread_started = time.perf_counter(), time.thread_time()
    params = list(graph.parameters())
    opt = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.steps >= 4:
        # OneCycleLR needs at least one step in each phase
        pct = min(0.5, max(settings.warmup, 2.0 / settings.steps))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.steps,
                                                    pct_start=pct)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    graph.train(False)   # inference semantics: nothing in the interpreter has a train mode, but say so
    average = Average(params, settings.ema) if settings.ema > 0 else None
    smoothed = None
    for step in range(settings.steps):
        feeds, labels = next(batches)
        target = {k: torch.from_numpy(v) for k, v in labels.items() if k in kinds}
        out = graph({k: torch.from_numpy(v) for k, v in feeds.items() if k in graph.input_names},
                    extra=settings.match)
        loss = distill_loss(out, target, kinds, settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if average is not None:
            average.update()
        value = float(loss.detach())
        log.losses.append(value)
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        if progress is not None:
            progress(step + 1, smoothed)
    if average is not None:
        average.copy_to_parameters()
    log.seconds = time.perf_counter() - started
    log.thread_seconds = time.thread_time() - thread_started
    return log


def evaluate(graph: TorchGraph, teacher: Teacher, data: SampleData, kinds: Mapping[str, str], settings: Settings,
             batch_size: int = 64) -> tuple[dict[str, float], np.ndarray]:
    """Mean loss on ``data`` (no augmentation) and, with class scores, the student's top-1 agreement
    with the teacher (percent); and the loss of each sample (for a paired comparison)."""
    losses, agree, scored = [], 0, 0
    with torch.no_grad():
        for start, stop in data.spans(batch_size):
            feeds = data.feed(start, stop)
            t_np = teacher(feeds)
            out = graph({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()
                         if k in graph.input_names}, extra=settings.match)
            target = {k: torch.from_numpy(v) for k, v in t_np.items() if k in kinds}
            rows = stop - start
            per = distill_loss(out, target, kinds, settings, per_sample=True).double().numpy()
            losses.append(np.broadcast_to(per, (rows,)) if per.size in (1, rows) else np.full(rows, per.mean()))
            for name, kind in kinds.items():
                if kind == "classes":
                    agree += int((out[name].argmax(1).numpy() == t_np[name].argmax(1)).sum())
                    scored += rows
    per_sample = np.concatenate(losses) if losses else np.zeros(0)
    result = {"loss": round(float(per_sample.mean()) if per_sample.size else 0.0, 6)}
    if scored:
        result["agreement"] = round(100.0 * agree / scored, 3)
    return result, per_sample
