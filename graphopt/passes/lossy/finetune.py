"""Distillation fine-tuning (LOSSY): train the compressed model's float weights to match the original's outputs.

What it does
------------
The *teacher* is the pipeline's input model (``ctx.original``, run in onnxruntime); the *student* is
the model as the lossy passes before this one left it, run in torch by a small interpreter of the ops
graphopt emits (:mod:`graphopt.compress.distill`). On unlabeled inputs, the student's float weights
follow the gradient of the distillation loss (KL at temperature ``T`` on class scores, relative MSE or
cosine on other outputs and on matched intermediate tensors; :mod:`graphopt.compress.distill.train`)
for ``steps`` batches (or ``epochs`` passes over the data), with Adam and a one-cycle schedule. The
trained values are written back **into the same graph by name**: same nodes, initializer names,
dtypes and shapes; only values change. Structure is kept (:mod:`graphopt.compress.distill.interpreter`):
pruned zeros stay zero, a shared weight trains its codebook, low-rank factors train as factors,
BatchNorm statistics, Clip bounds, Resize scales, shapes and integer tensors stay frozen.

Data: the calibration samples (``--data``) minus the held-out fraction ``holdout``, or ``--train-data``
(a ``.npz`` file or a directory of shards, streamed). Image inputs among the calibration samples are
augmented with shifts and flips (``augment``, ``shift``, ``flip``; a ``--train-data`` set only with
``augment=on``: :mod:`graphopt.compress.distill.data` says why); other inputs never are. The run is
deterministic for a seed.

The gates (each leaves the model unchanged and says why in ``skipped``)
-----------------------------------------------------------------------
1. The engine reproduces onnxruntime on the student *before* training (``self_check``, same rule as 4):
   a model the interpreter computes differently is not trained at all.
2. Held out: the last ``holdout`` fraction of the calibration samples is never trained on (with
   ``--train-data``, none of them is, and all of them are held out). The training is kept unless the
   distillation loss on them rose by more than its noise: with ``d_i`` the change of sample ``i``'s
   loss (paired), refused when ``mean(d) > 1.645 · sd(d)/√n`` (a significant rise, one-sided 5 %;
   :func:`held_out_verdict`). ``held_out`` reports the loss and top-1 agreement with the teacher
   before and after, the mean change, its standard error and ``z``.
3. Written back into a copy, the model is run by onnxruntime (graph optimizations off) and must equal
   the engine's outputs on the held-out samples: ``max |ort − torch| ≤ SELF_CHECK_REL · max(1, max |ort|)``
   per output. Only then are the values written into the model.

Refused in one line (``skipped``): PyTorch not installed (with the install command), an op the
interpreter does not know (named), no teacher, no data, nothing trainable.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from graphopt.compress.distill.engine import torch_or_reason
from graphopt.compress.options import calibration
from graphopt.core.errors import GraphoptError
from graphopt.core.ir import Model
from graphopt.core.ledger import LeftAlone
from graphopt.core.manager import Option, Pass, PassContext, PassResult, register
from graphopt.core.onnx_io import to_proto
from graphopt.core.progress import Steps
from graphopt.measure import ort as gort
from graphopt.measure.calibration import SampleData, check_data, feed_batch_size

#: The self-check's bound, relative to the output's largest magnitude (at least 1). Torch and
#: onnxruntime differ by float32 summation order: 3.8e-7 to 6.1e-7 of it on vgg, resnet, mobilenetv2,
#: inception and the transformer pruned to 0.5 (measured); 1e-4 is far above that and far below what a
#: wrongly written weight does.
SELF_CHECK_REL = 1e-4
#: A held-out loss this small means the lossy passes before changed nothing that matters (float noise).
NOTHING_TO_RECOVER = 1e-9
#: The held-out gate refuses a rise of the mean loss above this many standard errors (one-sided 5 %).
Z_REFUSE = 1.645
#: Samples the self-checks run on.
CHECK_SAMPLES = 64


@register
class Finetune(Pass):
    name = "finetune"
    summary = ("LOSSY: distillation fine-tuning of the float weights (teacher: the input model; no labels), "
               "written back by name, structure kept (needs graphopt[finetune])")
    lossless = False
    wants_original = True
    options = {
        "steps": Option(300, "training steps (batches), unless epochs is set", int, low=1),
        "epochs": Option(0.0, "passes over the training data; > 0 overrides steps", float, low=0),
        "lr": Option(1e-3, "peak learning rate of the one-cycle schedule (Adam)", float, low=0, low_open=True),
        "batch_size": Option(64, "samples per step", int, low=1),
        "temperature": Option(2.0, "softmax temperature of the KL loss on class scores", float, low=0,
                              low_open=True),
        "class_loss": Option("kl", "loss on class scores: kl (at the temperature) or mse on the logits", str,
                             ("kl", "mse")),
        "loss": Option("mse", "loss on outputs that are not class scores (mse is relative to the teacher's "
                              "variance)", str, ("mse", "cosine")),
        "match": Option("", "intermediate tensors to match too (names in both models, comma-separated)", str),
        "match_weight": Option(1.0, "weight of each matched tensor's loss", float, low=0),
        "augment": Option("auto", "shifts and flips for image inputs (never others); auto: for the calibration "
                                  "samples, not for --train-data (a training set is many samples of what the model "
                                  "meets; BENCHMARKS, issue 17); on: for either; off: none", str,
                          ("auto", "on", "off")),
        "shift": Option(2, "augment: largest shift in pixels", int, low=0),
        "flip": Option(True, "augment: random horizontal flips", bool),
        "mixup": Option(0.0, "augment: mix image pairs with weights from Beta(mixup, mixup) (0: off); the teacher "
                             "labels the mixed image", float, low=0),
        "weight_decay": Option(0.0, "Adam weight decay", float, low=0),
        "ema": Option(0.0, "end with the running average of the weights over training, this decay per step "
                           "(0.999: about the last 1000 steps; 0: off, the last step's weights)", float, low=0,
                      high=1, high_open=True),
        "threads": Option(0, "torch threads while training (0: the usable cores less the one the teacher's "
                             "thread takes, at least 1)", int, low=0),
        **calibration(holdout=(0.2, "of the calibration samples: never trained on; training is refused when "
                                    "their loss rises significantly (with --train-data all of them are held "
                                    "out; 0: no check)")),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        torch = torch_or_reason()
        if isinstance(torch, str):
            return _refuse(torch)
        reason = _precondition(model, ctx)
        if reason is not None:
            return _refuse(reason)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.opt(ctx, "threads") or default_threads())
        try:
            return _train(model, ctx, lambda key: self.opt(ctx, key))
        finally:
            torch.set_num_threads(threads)


def default_threads() -> int:
    """Torch's threads when ``threads`` is 0: the cores this process may use, less one for the thread
    that draws, augments and labels the next batch (onnxruntime, one thread) meanwhile; at least 1.
    More threads than cores make torch's and onnxruntime's threads wait for each other (BENCHMARKS,
    issue 17: 2 torch threads beside the teacher took 7.5x the wall time of 1 on 2 cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def _refuse(reason: str, **stats: Any) -> PassResult:
    return PassResult(False, {"trained": 0, "skipped": reason, **stats})


def _precondition(model: Model, ctx: PassContext) -> str | None:
    from graphopt.compress.distill.ops import unsupported_ops
    unknown = unsupported_ops(model)
    if unknown:
        return f"the training engine does not know the op{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
    if ctx.original is None:
        return "no teacher: run it in a pipeline (run_pipeline keeps the input model as the teacher)"
    if ctx.data is None and ctx.train_data is None:
        return "no inputs to train on (give --data or --train-data)"
    if ctx.train_data is None and ctx.data.one_per_run:
        return "the calibration data feeds one sample per run (per-sample layout); training needs samples " \
               "stacked on the batch axis"
    return None


def _train(model: Model, ctx: PassContext, opt) -> PassResult:
    import torch

    from graphopt.compress.distill import data as sources
    from graphopt.compress.distill.interpreter import EngineError, TorchGraph, plan
    from graphopt.compress.distill.train import Prefetch, Settings, evaluate, fit, labelled, output_kinds

    left = LeftAlone()
    kinds = plan(model.graph, left)
    if not kinds:
        return _refuse("nothing to train: no float weight in a weight slot", **left.into({}))
    fit_data, held = _split(ctx.data, opt("holdout"), ctx.train_data is not None)
    source = sources.Source(model, path=ctx.train_data) if ctx.train_data is not None else \
        sources.Source(model, sample=fit_data)
    augment = sources.augment_for(source.first(), opt("augment"), opt("shift"), opt("flip"), opt("mixup"),
                                  training_set=ctx.train_data is not None)
    # a model with a static batch dim takes exactly that many samples per run
    batch_size = feed_batch_size(model, opt("batch_size"), source.first())
    steps = opt("steps")
    if opt("epochs") > 0:
        steps = max(1, int(round(opt("epochs") * source.n_samples / batch_size)))
    match = [n.strip() for n in opt("match").split(",") if n.strip()]
    settings = Settings(steps, opt("lr"), opt("temperature"), opt("loss"), opt("weight_decay"), match,
                        opt("match_weight"), class_loss=opt("class_loss"), ema=opt("ema"))
    check = held if held is not None else source.first()
    check = check.head(min(CHECK_SAMPLES if batch_size == opt("batch_size") else batch_size, check.n_samples))

    torch.manual_seed(ctx.seed)
    graph = TorchGraph(model, kinds)
    teacher = _Teacher(ctx.original, match)
    try:
        first = _self_check(graph, to_proto(model), check)
        if first is not None:
            return _refuse(f"the training engine does not reproduce onnxruntime on this model: {first}",
                           **left.into({}))
    except EngineError as exc:
        return _refuse(f"the training engine cannot run this model: {exc}", **left.into({}))
    except GraphoptError as exc:
        return _refuse(f"onnxruntime cannot run the student: {exc}", **left.into({}))
    out_kinds = output_kinds(teacher(check.feed(0, check.n_samples)), match)
    if not out_kinds:
        return _refuse("no float output to match", **left.into({}))

    stats: dict[str, Any] = {
        "teacher": "the pipeline's input model (onnxruntime)", "data": source.description,
        "training_samples": source.n_samples, "augment": augment.describe(), "steps": steps,
        "epochs": round(steps * batch_size / max(source.n_samples, 1), 3), "batch_size": batch_size,
        "lr": opt("lr"), "outputs": out_kinds,
        "trained": {"initializers": len(kinds), "numbers": graph.trained_count(),
                    "kinds": {k: sum(1 for v in kinds.values() if v == k) for k in ("dense", "masked", "shared")}},
    }
    rng = ctx.rng("finetune")
    if held is not None:
        before, before_each = evaluate(graph, teacher, held, out_kinds, settings, batch_size)
        if before["loss"] <= NOTHING_TO_RECOVER:
            return _refuse(f"nothing to recover: the student already matches the teacher (held-out loss "
                           f"{before['loss']:.3g})", **left.into(stats))
    with Prefetch(labelled(source.batches(batch_size, rng), augment, teacher, rng)) as batches:
        log = fit(graph, batches, out_kinds, settings, _progress(ctx, steps))
    stats.update(loss=log.summary(), seconds_training=round(log.seconds, 2),
                 seconds_training_thread_cpu=round(log.thread_seconds, 2))
    if held is not None:
        after, after_each = evaluate(graph, teacher, held, out_kinds, settings, batch_size)
        verdict = held_out_verdict(before_each, after_each)
        stats["held_out"] = {"samples": held.n_samples, "data": held.source, "before": before, "after": after,
                             **verdict}
        if not verdict["kept"]:
            return _refuse(f"the held-out distillation loss rose ({before['loss']:.4g} -> {after['loss']:.4g}, "
                           f"{verdict['z']:.2f} standard errors on {held.n_samples} samples); the model is "
                           f"unchanged", **left.into(stats))
    else:
        stats["held_out"] = {"samples": 0, "note": "holdout=0: training kept without a held-out check"}

    arrays = graph.arrays()
    trial = model.clone()
    _write(trial, arrays)
    worst: list[float] = []
    problem = _self_check(graph, to_proto(trial), check, worst)
    stats["self_check"] = {"samples": check.n_samples, "rel_tolerance": SELF_CHECK_REL,
                           "rel_error": float(f"{max(worst, default=0.0):.3g}"), "passed": problem is None}
    if problem is not None:
        return _refuse(f"self-check failed after write-back: {problem}; the model is unchanged",
                       **left.into(stats))
    _write(model, arrays)
    return PassResult(True, left.into(stats))


def _split(data: SampleData | None, holdout: float, separate_training: bool) -> \
        tuple[SampleData | None, SampleData | None]:
    """``(what trains, what is held out)`` of the calibration samples. With ``--train-data`` none of them
    trains, so all of them are held out (``holdout`` > 0) and judge the training."""
    if data is None:
        return None, None
    if separate_training:
        return None, (data if holdout > 0 else None)
    return data.split(int(round(data.n_samples * holdout)))


def held_out_verdict(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """Keep the training unless the held-out loss rose by more than its noise (module docstring, gate 2).

    ``d_i = after_i − before_i`` per held-out sample (paired: the same samples, so what the samples
    have in common cancels); the training is refused when the mean rise is significant,
    ``mean(d) > Z_REFUSE · sd(d) / √n`` (one-sided, 5 %), or, with fewer than 2 samples, when ``d``
    is positive at all."""
    d = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    n = d.size
    mean = float(d.mean()) if n else 0.0
    se = float(d.std(ddof=1) / np.sqrt(n)) if n >= 2 else 0.0
    z = mean / se if se > 0 else (0.0 if mean == 0 else float(np.copysign(np.inf, mean)))
    kept = mean <= 0 or (n >= 2 and z <= Z_REFUSE)
    return {"kept": bool(kept), "mean_change": float(f"{mean:.4g}"), "standard_error": float(f"{se:.4g}"),
            "z": round(z, 3) if np.isfinite(z) else z}


def _write(model: Model, arrays: dict[str, np.ndarray]) -> None:
    graph = model.graph
    for name in sorted(arrays):
        graph.set_trained_array(graph.initializers[name], arrays[name])


class _Teacher:
    """The original model in onnxruntime: its outputs (and the matched tensors) for a feed."""

    def __init__(self, original: Model, match: list[str]) -> None:
        try:
            proto, weights = gort.exposed(original, match)   # the weights by reference, not copied
        except ValueError as exc:
            raise GraphoptError(f"finetune.match: the teacher has {exc}") from None
        self.session = gort.session(proto, threads=1, weights=weights)
        self.what = gort.describe(original)

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return gort.run(self.session, feeds, what=self.what)


def _self_check(graph, proto, check: SampleData, worst: list[float] | None = None) -> str | None:
    """``None`` when onnxruntime on ``proto`` equals the engine on ``check`` (module docstring, gate 3),
    else which output is off and by how much. ``worst`` receives the largest error relative to the bound's
    scale."""
    import torch
    data = check_data(proto, check)
    sess = gort.session(proto, threads=1)
    feeds = data.feed(0, data.n_samples)
    want = gort.run(sess, feeds, what="the student")
    with torch.no_grad():
        got = graph({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()
                     if k in graph.input_names})
    for name, ref in want.items():
        value = got[name].numpy()
        if value.shape != ref.shape:
            return f"output {name!r} has shape {list(value.shape)} in torch, {list(ref.shape)} in onnxruntime"
        if ref.dtype.kind != "f":
            if not np.array_equal(value.astype(ref.dtype), ref):
                return f"integer output {name!r} differs"
            continue
        err = float(np.max(np.abs(value.astype(np.float64) - ref))) if ref.size else 0.0
        scale = max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
        bound = SELF_CHECK_REL * scale
        if worst is not None:
            worst.append(err / scale)
        if not err <= bound:
            return f"output {name!r} differs by {err:.3g} (bound {bound:.3g})"
    return None


def _progress(ctx: PassContext, steps: int):
    """Progress through the run's status line (``ctx.say``): a :class:`~graphopt.core.progress.Steps`
    message with the smoothed loss and the time, which the command line draws as a bar."""
    started = time.perf_counter()
    every = max(1, steps // 200)

    def show(step: int, loss: float) -> None:
        if step % every and step != steps:
            return
        elapsed = time.perf_counter() - started
        eta = elapsed / step * (steps - step)
        ctx.say(Steps("finetune", step, steps, f"loss {loss:.4g} {elapsed:.0f}s<{eta:.0f}s"))
    return show
