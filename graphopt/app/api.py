"""The Python API: ``optimize``, ``verify`` and ``inspect``, mirroring the command line.

Each takes a model as a path, an ``onnx.ModelProto`` or an IR :class:`~graphopt.core.ir.Model`, and
returns the result together with a report. Errors in the input raise
:class:`~graphopt.core.errors.GraphoptError` (the CLI turns them into one line and exit code 2).
Each call is one scratch run (:mod:`graphopt.core.scratch`): it writes no file but the outputs it is
asked for, and removes its temporary files however it ends.

Example
-------
>>> import graphopt
>>> result = graphopt.optimize("models/resnet.onnx", output="resnet.opt.onnx",
...                            data="models/fmnist_calib.npz")            # doctest: +SKIP
>>> result.passed, result.report["after"]["nodes"]                         # doctest: +SKIP
(True, 35)
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

import graphopt.passes  # noqa: F401  (registers every pass and preset)
from graphopt import __version__
from graphopt.core import onnx_io, scratch
from graphopt.core.errors import GraphoptError, OptionError
from graphopt.core.ir import Model
from graphopt.core.manager import (Pass, PassContext, Sequential, build_pipeline, get_pass, parse_options,
                                   registered, run_pipeline)
from graphopt.app import report
from graphopt.measure import analysis, calibration, observed, sampledir
from graphopt.measure import calibrate as calibration_run
from graphopt.measure import probe as probes
from graphopt.measure import target as targets
from graphopt.measure.executor import KINDS, Executor, check_choice
from graphopt.measure.executor import opened as run_executor
from graphopt.measure.ray_executor import require_ray
from graphopt.measure.verify import Tolerance, VerifyReport, run_alike
from graphopt.measure.verify import verify as run_verification

ModelLike = str | os.PathLike | onnx.ModelProto | Model
DataLike = str | os.PathLike | calibration.SampleData | None

#: ``--quantize`` values: the quantize pass's weight bits they set.
QUANTIZE = {"int8": "int8", "w4a8": "int4"}

#: Samples drawn when the user gives no data: enough for a stable verdict, cheap on big models.
DEFAULT_RANDOM_SAMPLES = 32


@dataclass
class OptimizeResult:
    """What :func:`optimize` returns.

    Attributes
    ----------
    model : the optimized ModelProto.
    report : the report dict (the JSON report's content).
    passed : the verification verdict (``True`` when verification was skipped).
    ir : the optimized IR, for further work in Python.
    target_met : every ``--target-macs`` / ``--target-params`` was reached (``True`` without targets);
        ``report["target"]`` says what was reached and, when missed, the main reason.
    """

    model: onnx.ModelProto
    report: dict[str, Any]
    passed: bool
    ir: Model
    target_met: bool = True


def load_model(model: ModelLike) -> tuple[Model, ModelLike]:
    """The IR of ``model`` and a reference that stays unchanged while passes mutate the IR."""
    if isinstance(model, Model):
        return model, model.clone()   # its weight arrays shared, not copied: the passes replace, never write them
    if isinstance(model, onnx.ModelProto):
        return onnx_io.from_proto(model), model
    if isinstance(model, (str, os.PathLike)):
        return onnx_io.load(model), Path(model)
    raise GraphoptError(f"expected a path, an onnx.ModelProto or a graphopt Model, got {type(model).__name__}")


def sample_data(model: Model, data: DataLike, *, samples: int | None = None, seed: int = 0,
                input_shapes: Mapping[str, Sequence[int]] | None = None,
                probe: probes.Probe | None = None) -> calibration.SampleData:
    """User data (validated against the model), or seeded random inputs when ``data`` is None, drawn at
    ``probe``'s shapes with its value rules (``input_shapes`` when there is no probe)."""
    if isinstance(data, calibration.SampleData):
        out = data
    elif data is not None and Path(data).is_dir():
        # a directory of shards: its head in memory (sampledir.HEAD_SAMPLES unless --samples says)
        return sampledir.SampleDir.open(data, model).head(samples or sampledir.HEAD_SAMPLES, model)
    elif data is not None:
        out = calibration.load_data(data, model)
    else:
        shapes = probe.shapes if probe is not None else dict(input_shapes or {})
        return calibration.random_data(model, samples or DEFAULT_RANDOM_SAMPLES, seed=seed, input_shapes=shapes,
                                       values=probe.values if probe is not None else None)
    return out.head(samples) if samples else out


def probe_shapes(model: Model) -> dict[str, tuple[int, ...]] | None:
    """The probe's input shapes when ``model`` has dynamic dims besides the batch (else ``None``: batch 1)."""
    return dict(probes.choose(model).shapes) if probes.has_dynamic_dims(model) else None


def probe_inputs(model: Model, data: DataLike, *, samples: int | None = None, seed: int = 0,
                 input_shapes: Mapping[str, Sequence[int]] | None = None
                 ) -> tuple[calibration.SampleData, probes.Probe]:
    """The samples to work on and the probe they were drawn at (see :mod:`graphopt.measure.probe`).

    User data fixes the first shape; random data is drawn at the probe's. Either way the probe carries
    a second shape the original runs on, for verification, when the model has dynamic dims."""
    user = None if data is None else sample_data(model, data, samples=samples, seed=seed)
    probe = probes.choose(model, input_shapes, seed=seed, data=user)
    return (user if user is not None else sample_data(model, None, samples=samples, seed=seed, probe=probe)), probe


def _cost(model: Model, input_shapes: Mapping[str, Sequence[int]] | None, file_bytes: int | None,
          sample: calibration.SampleData | None = None) -> dict[str, Any]:
    """The report's ``before``/``after`` entry; sizes only data decides are read off a run of the first
    sample (:mod:`graphopt.measure.observed`)."""
    cost = observed.cost_at_sample(model, dict(input_shapes or {}) or None, sample)
    cost.file_bytes = file_bytes
    return cost.summary()


def _file_bytes(source: ModelLike) -> int | None:
    if isinstance(source, Path):
        data = source.with_name(source.name + ".data")
        return source.stat().st_size + (data.stat().st_size if data.exists() else 0)
    if isinstance(source, (onnx.ModelProto, Model)):
        return onnx_io.serialized_size(source)
    return None


def default_output(path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.opt.onnx`` (any other name gets ``.opt.onnx`` appended)."""
    path = Path(path)
    stem = path.name[:-5] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + ".opt.onnx")


def _check_output(output: Path, source: ModelLike) -> None:
    if output.exists() and output.is_dir():
        raise GraphoptError(f"{output}: is a directory, expected an output file name")
    if not output.parent.exists():
        raise GraphoptError(f"{output.parent}: output folder does not exist")
    if isinstance(source, Path) and output.exists() and output.resolve() == source.resolve():
        raise GraphoptError(f"{output}: refusing to overwrite the input model; choose another output")


@scratch.run()
def optimize(model: ModelLike, *, output: str | os.PathLike | None = None, preset: str | None = None,
             passes: Sequence[str] | None = None, options: Sequence[str] | Mapping[str, Any] = (),
             data: DataLike = None, input_shapes: Mapping[str, Sequence[int]] | None = None,
             target_macs: float | None = None, target_params: float | None = None, max_drop: float | None = None,
             tolerance: Tolerance | None = None, samples: int | None = None, seed: int = 0,
             run_verify: bool = True, write_failed: bool = False, debug: bool = False,
             dump_dir: str | os.PathLike | None = None, verify_data: DataLike = None,
             allow_partial: bool = False, quantize: str | None = None,
             train_data: str | os.PathLike | None = None, target_cpu: str | None = None,
             executor: str | Executor | None = None, workers: int | None = None, ray_address: str | None = None,
             progress: Callable[[str], None] | None = None) -> OptimizeResult:
    """Run a pass pipeline on ``model``, verify the result with onnxruntime, optionally write it.

    Parameters
    ----------
    model : path, ModelProto or IR Model. A path is never overwritten.
    output : where to write the optimized model (atomically). ``None``: not written.
    preset, passes : the pipeline — a preset name (default ``lossless``) or pass names.
    options : ``["pass.key=value", ...]`` or ``{"pass.key": value}``.
    data : ``.npz`` path or SampleData for calibration and verification; ``None``: seeded random inputs.
        A directory of ``.npz`` shards: its first ``samples`` (default 512) are held in memory for
        everything, and the statistics that are sums over samples stream every shard
        (:mod:`graphopt.measure.sampledir`; ``report["data_shards"]``).
    input_shapes : concrete dims for dynamic input dims, ``{"input": (1, 3, 224, 224)}``.
    verify_data : held-out samples to verify on instead of ``data``. Lossy passes fit weights to
        ``data``, so verifying on the same samples overstates their accuracy; the report says which
        data the verdict used (``verify.data`` and ``verify.held_out``).
    target_macs, target_params, max_drop : budgets for lossy passes (fractions; accuracy points).
    tolerance : verification tolerance; ``None`` derives it (see :mod:`graphopt.measure.verify`).
    samples : cap on the number of samples used.
    run_verify : verify the result (default). When off, ``passed`` is True and the report says so.
    write_failed : write the output even when verification fails or a target is missed (for inspection).
    allow_partial : a missed ``target_macs`` / ``target_params`` still writes the output (the report and
        ``target_met`` say it was missed). Without it a missed target writes nothing, like a failed verdict.
    debug, dump_dir : check IR invariants after each pass; dump the model after each pass.
    quantize : ``"int8"`` or ``"w4a8"``: run the ``quantize`` pass last, after the preset or passes
        (``prune`` then int8, ``lowrank`` then int8, ...); see :func:`with_quantize`.
    train_data : unlabeled inputs for a training pass (``finetune``): a ``.npz`` file or a directory of
        ``.npz`` shards, streamed. The calibration ``data`` is used when it is not given.
    target_cpu : the CPU the model is for: ``"auto"`` (this machine), a kind (``"avx2"``, ``"avx512"``,
        ``"arm64"``, ...) or a profile file from ``graphopt calibrate -o``; ``None``:
        ``$GRAPHOPT_TARGET_CPU`` or ``"auto"``. The lossy passes price channels, ranks and int8 formats
        for it (:mod:`graphopt.measure.target`); ``report["target_cpu"]`` says which and where its
        latency profile came from.
    executor, workers, ray_address : where the passes' independent evaluations run (sensitivity tables,
        the guards' candidates, calibration statistics in shards; :mod:`graphopt.measure.executor`):
        ``"process"`` (default) in this process, or in a pool of ``workers`` local processes
        (``0``: one per core); ``"ray"`` as Ray tasks on a local cluster of ``workers`` CPUs (default one
        per core) started for the run and shut down when it ends, or on the cluster at ``ray_address``
        (which implies ``"ray"``; needs the ``ray`` extra); or an :class:`Executor` you made and close.
        The output does not depend on it.

    Returns
    -------
    OptimizeResult

    Raises
    ------
    GraphoptError
        Bad model, data, pass name or option. Nothing is written.
    """
    started = time.perf_counter()
    ctx_progress = progress or (lambda message: None)
    pipeline = build_pipeline(preset, passes)
    option_pairs = [f"{k}={v}" for k, v in options.items()] if isinstance(options, Mapping) else list(options)
    pipeline, option_pairs = with_quantize(pipeline, option_pairs, quantize)
    parsed_options = parse_options(option_pairs, pipeline)
    _check_budgets(target_macs, target_params, max_drop)
    _check_sampling(samples, seed)
    _check_train_data(train_data, pipeline)
    cpu_target = targets.resolve(target_cpu)
    _check_executor(executor, workers, ray_address)
    output_path = Path(output) if output is not None else None
    ctx_progress("loading the model")
    ir, reference = load_model(model)
    if output_path is not None:
        _check_output(output_path, reference)
    ctx_progress("preparing sample data")
    data_dir = None
    if isinstance(data, (str, os.PathLike)) and Path(data).is_dir():
        # a calibration set in shards: summed statistics stream all of it, the rest uses its head
        data_dir = sampledir.SampleDir.open(data, ir)
        data = data_dir.head(samples or sampledir.HEAD_SAMPLES, ir)
    sample, probe = probe_inputs(ir, data, samples=samples, seed=seed, input_shapes=input_shapes)
    check = sample if verify_data is None else sample_data(ir, verify_data, samples=samples, seed=seed)
    shapes = _analysis_shapes(input_shapes, probe)
    before = _cost(ir, shapes, _file_bytes(reference), sample)

    ctx = PassContext(options=parsed_options, seed=seed, data=sample, data_dir=data_dir, target_macs=target_macs,
                      target_params=target_params, max_drop=max_drop, baseline=(before["macs"], before["params"]),
                      input_shapes=shapes, train_data=train_data, debug=debug,
                      dump_dir=Path(dump_dir) if dump_dir is not None else None, progress=progress, target=cpu_target)
    with run_executor(executor, workers, address=ray_address) as ctx.executor:
        _, records = run_pipeline(pipeline, ir, ctx)
    ctx.executor = None
    after = _cost(ir, shapes, onnx_io.serialized_size(ir), sample)

    mode = "equivalence" if pipeline.lossless else "accuracy"
    if run_verify:
        ctx_progress("verifying with onnxruntime")
    # The IR itself is verified: its sessions take its weights by reference (no copy of the model).
    verify_dict, passed = _verdict(reference, ir, check, mode, tolerance, max_drop, run_verify,
                                   held_out=verify_data is not None, as_deployed=cpu_target.int8_like_host)
    if run_verify and probe.alternate is not None:
        ctx_progress("verifying at a second input shape")
        passed = _verify_alternate(reference, ir, ir, probe, mode, tolerance, seed, verify_dict) and passed

    target = target_outcome(target_macs, target_params, before, after, records)
    report: dict[str, Any] = {
        "graphopt_version": __version__,
        "model": str(model) if isinstance(model, (str, os.PathLike)) else "<in memory>",
        "output": None,
        "preset": None if passes else (preset or "lossless"),
        "quantize": quantize,
        "passes_requested": [p.name for p in pipeline.leaves()],
        "options": {f"{p}.{k}": v for p, kv in parsed_options.items() for k, v in kv.items()},
        "data": sample.source,
        "samples": sample.n_samples,
        "data_shards": None if data_dir is None else {"path": str(data_dir.path), "shards": len(data_dir.shards),
                                                      "samples": data_dir.n_samples},
        "probe": probe.to_dict(),
        "seed": seed,
        "target_cpu": cpu_target.to_dict(),
        "before": before,
        "after": after,
        "passes": [r.to_dict() for r in records],
        "verify": verify_dict,
        "target": target,
    }
    target_met = target is None or target["met"] or allow_partial
    if output_path is not None and ((passed and target_met) or write_failed):
        ctx_progress(f"writing {output_path}")
        onnx_io.save(ir, output_path)
        report["output"] = str(output_path)
        report["after"]["file_bytes"] = _file_bytes(output_path)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return OptimizeResult(onnx_io.to_proto(ir), report, passed, ir, target is None or target["met"])


def with_quantize(pipeline: Pass, option_pairs: list[str], quantize: str | None) -> tuple[Pass, list[str]]:
    """``pipeline`` followed by the ``quantize`` pass (unless it already ends with it, as the ``int8``
    preset does), with ``quantize.weights`` set from ``quantize`` unless the options set it.

    Quantization goes last because every other pass works on float weights: a lossless cleanup after it
    would fold the DequantizeLinear of each weight back into a float constant."""
    if quantize is None:
        return pipeline, option_pairs
    if quantize not in QUANTIZE:
        raise OptionError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    leaves = [p.name for p in pipeline.leaves()]
    if "quantize" in leaves[:-1]:
        raise OptionError("--quantize: the pipeline quantizes before its last pass; nothing may run after quantize")
    if leaves[-1] != "quantize":
        pipeline = Sequential([pipeline, get_pass("quantize")], name=f"{pipeline.name}+quantize")
    if not any(pair.split("=", 1)[0].strip() == "quantize.weights" for pair in option_pairs):
        option_pairs = [*option_pairs, f"quantize.weights={QUANTIZE[quantize]}"]
    return pipeline, option_pairs


def _analysis_shapes(given: Mapping[str, Sequence[int]] | None,
                     probe: probes.Probe) -> dict[str, tuple[int, ...]] | None:
    """The shapes costs are counted at: the given ones, else the probe's when the model has dynamic dims
    besides the batch (a batch-only model is counted at batch 1 without them)."""
    if given:
        return {k: tuple(v) for k, v in given.items()}
    return dict(probe.shapes) if probe.dynamic else None


#: Samples verified at the second probe shape.
ALTERNATE_SAMPLES = 8


def _verify_alternate(reference: ModelLike, proto: ModelLike, ir: Model, probe: probes.Probe, mode: str,
                      tolerance: Tolerance | None, seed: int, verify_dict: dict[str, Any]) -> bool:
    """:func:`second_shape_problems`, recorded in the report's verification entry; True when there are none."""
    problems = second_shape_problems(reference, proto, ir, probe, mode=mode, tolerance=tolerance, seed=seed)
    verify_dict["shapes"] = [{k: list(v) for k, v in shape.items()} for shape in (probe.shapes, probe.alternate)]
    verify_dict["second_shape"] = {"shapes": {k: list(v) for k, v in probe.alternate.items()},
                                   "samples": ALTERNATE_SAMPLES, "passed": not problems}
    if problems:
        verify_dict["passed"] = False
        verify_dict.setdefault("reasons", []).extend(problems)
    return not problems


def second_shape_problems(reference: ModelLike, candidate: ModelLike, ir: Model, probe: probes.Probe, *,
                          mode: str, tolerance: Tolerance | None = None, seed: int = 0) -> list[str]:
    """Verify again on random samples at the probe's second shape (a rewrite right at one shape only fails
    here); empty when it passes or there is no second shape. Lossless runs need equivalence there too. A
    lossy run's verdict is given on the first shape's data, so at the second the candidate must only run and
    give outputs of the reference's shapes and types."""
    if probe.alternate is None:
        return []
    data = calibration.random_data(ir, ALTERNATE_SAMPLES, seed=seed, input_shapes=probe.alternate,
                                   values=probe.values)
    where = f"at the second shape ({probes.describe_shapes(probe.alternate)})"
    if mode == "equivalence":
        report = run_verification(reference, candidate, data, tolerance=tolerance, mode=mode)
        return [] if report.passed else [f"{where}: {r}" for r in report.reasons or ["outputs differ"]]
    return [f"{where}: {r}" for r in run_alike(reference, candidate, data)]


#: A target counts as reached when the result is within this fraction above it (0.5 -> at most 0.525).
TARGET_SLACK = 0.05


def target_outcome(target_macs: float | None, target_params: float | None, before: Mapping[str, Any],
                   after: Mapping[str, Any], records: Sequence[Any]) -> dict[str, Any] | None:
    """What the run reached against its targets (fractions of the input model's MACs / params, counted at the
    analysis shapes): ``{"macs": {"target", "reached", "met"}, "params": ..., "met", "reason"}``, or ``None``
    without targets. Reached within :data:`TARGET_SLACK` counts as met; an unknown count (a MAC whose shape is
    data-dependent) is not met. The reason of a miss is read from the lossy passes' stats (why they stopped,
    what they left alone)."""
    if target_macs is None and target_params is None:
        return None
    out: dict[str, Any] = {}
    for key, target in (("macs", target_macs), ("params", target_params)):
        if target is None:
            continue
        b, a = before.get(key), after.get(key)
        reached = round(a / b, 4) if a is not None and b else None
        out[key] = {"target": target, "reached": reached,
                    "met": reached is not None and reached <= target * (1 + TARGET_SLACK)}
    out["met"] = all(v["met"] for v in out.values())
    if not out["met"]:
        unknown = [k for k in ("macs", "params") if k in out and out[k]["reached"] is None]
        out["reason"] = (f"{' and '.join(unknown)} unknown at the analysed shapes" if unknown
                         else _miss_reason(records))
    return out


def _miss_reason(records: Sequence[Any]) -> str:
    """The first lossy pass's own account of why it did less: why it skipped, why its allocation stopped
    short of the target (``allocation.not_met``: the groups at their floor, or its ``--max-drop`` guard
    relaxed the target), else what it left alone most."""
    passes = registered()
    for record in records:
        if record.name not in passes or passes[record.name].lossless:
            continue
        stats = record.stats if isinstance(record.stats, Mapping) else {}
        if stats.get("skipped"):
            return f"{record.name}: {stats['skipped']}"
        allocation = stats.get("allocation")
        if isinstance(allocation, Mapping) and allocation.get("not_met"):
            return f"{record.name}: {allocation['not_met']}"
        left = stats.get("left_alone") or []
        if left:
            worst = max(left, key=lambda e: e.get("count", 1))
            total = sum(e.get("count", 1) for e in left)
            return f"{record.name}: {total} left alone, most because {worst.get('reason')}"
    return "the passes found nothing more to remove without breaking their accuracy guard"


def _check_budgets(target_macs: float | None, target_params: float | None, max_drop: float | None) -> None:
    """Targets are fractions in (0, 1]; an accuracy budget is never negative."""
    for name, value in (("target_macs", target_macs), ("target_params", target_params)):
        if value is not None and not 0.0 < value <= 1.0:
            raise OptionError(f"--{name.replace('_', '-')} must be a fraction in (0, 1], got {value}")
    if max_drop is not None and max_drop < 0:
        raise OptionError(f"--max-drop must be >= 0 accuracy points, got {max_drop}")


def _verdict(reference: ModelLike, proto: ModelLike, check: Any, mode: str,
             tolerance: Tolerance | None, max_drop: float | None, run_verify: bool,
             held_out: bool, as_deployed: bool = True) -> tuple[dict[str, Any], bool]:
    """The verification's report entry and whether it passed (a skipped verification passes, and says so)."""
    if not run_verify:
        return {"passed": True, "mode": mode, "skipped": True, "reasons": []}, True
    tol = tolerance
    if max_drop is not None:
        tol = dataclasses.replace(tol or Tolerance(), max_drop=max_drop)
    verdict = run_verification(reference, proto, check, tolerance=tol, mode=mode, as_deployed=as_deployed)
    out = verdict.to_dict()
    out.update(data=check.source, samples=check.n_samples, held_out=held_out)
    return out, verdict.passed


def _check_train_data(train_data: str | os.PathLike | None, pipeline: Any) -> None:
    """A pipeline that fine-tunes has its engine (else the install command, before any pass runs);
    ``train_data`` names .npz shards, and a pass of the pipeline trains on them."""
    from graphopt.measure.sampledir import shard_paths
    from graphopt.compress.distill.engine import torch_or_reason
    trains = any(p.name == "finetune" for p in pipeline.leaves())
    if trains and isinstance(reason := torch_or_reason(), str):
        raise OptionError(f"finetune {reason}")
    if train_data is None:
        return
    if not trains:
        raise OptionError("--train-data: only the finetune pass reads it, and this pipeline has none (end a lossy preset with +finetune)")
    shard_paths(train_data)


def _check_executor(executor: str | Executor | None, workers: int | None, ray_address: str | None) -> None:
    """Refuse a bad executor choice before any work: an unknown kind, a negative worker count, an
    address without Ray, the Ray executor without Ray installed (one line with the install command)."""
    if executor is not None and not isinstance(executor, str):
        if not isinstance(executor, Executor):
            raise OptionError(f"the executor must be one of {', '.join(KINDS)} or an Executor, got {executor!r}")
        return
    try:
        check_choice(executor, workers, ray_address)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    if executor == "ray" or ray_address is not None:
        require_ray()


def _check_sampling(samples: int | None, seed: int) -> None:
    """``--samples`` caps the data (0 would silently mean no cap); numpy seeds are non-negative."""
    if samples is not None and samples < 1:
        raise OptionError(f"--samples must be >= 1, got {samples}")
    if seed < 0:
        raise OptionError(f"--seed must be >= 0, got {seed}")


@scratch.run()
def verify(reference: ModelLike, candidate: ModelLike, *, data: DataLike = None,
           input_shapes: Mapping[str, Sequence[int]] | None = None, mode: str = "equivalence",
           tolerance: Tolerance | None = None, samples: int | None = None,
           seed: int = 0) -> VerifyReport:
    """Compare two models with onnxruntime (graph optimizations off); see ``graphopt.measure.verify.verify``."""
    if mode not in ("equivalence", "accuracy"):
        raise OptionError(f"unknown verification mode {mode!r} (equivalence or accuracy)")
    _check_sampling(samples, seed)
    ref_ir, ref = load_model(reference)
    _, cand = load_model(candidate)
    sample, probe = probe_inputs(ref_ir, data, samples=samples, seed=seed, input_shapes=input_shapes)
    report = run_verification(ref, cand, sample, tolerance=tolerance, mode=mode)
    problems = second_shape_problems(ref, cand, ref_ir, probe, mode=mode, tolerance=tolerance, seed=seed)
    if probe.alternate is not None:
        report.notes.append(f"also verified at {probes.describe_shapes(probe.alternate)}: "
                            f"{'failed' if problems else 'passed'}")
    if problems:
        report.passed = False
        report.reasons.extend(problems)
    return report


@dataclass
class CalibrationResult:
    """What :func:`calibrate` returns: the profile, the file it went to (``cached``: the user's cache,
    where ``target_cpu="auto"`` finds it), this machine's CPU kind, and the seconds it took."""

    profile: Any
    path: Path
    kind: str
    cached: bool
    seconds: float


@scratch.run()
def calibrate(*, output: str | os.PathLike | None = None, scale: float = 1.0, seed: int = 0,
              progress: Callable[[int, int, str], None] | None = None) -> CalibrationResult:
    """Measure the latency profile of this machine (:mod:`graphopt.measure.calibrate`: about 600 kernels
    timed with onnxruntime's profiler at ``scale=1``, minutes) and write it.

    Without ``output`` it goes to the user's cache as the profile of this machine's CPU kind
    (``$XDG_CACHE_HOME/graphopt/latency-KIND.json``), which ``target_cpu="auto"`` and the kind's name then
    use instead of the shipped or uncalibrated one; with ``output`` to that file, for ``target_cpu=FILE``
    on another machine. ``progress(done, total, kind)`` is called per kernel.

    Raises
    ------
    OptionError
        ``scale`` outside (0, 1], a negative ``seed``.
    GraphoptError
        ``output`` is a directory or its folder does not exist; the file cannot be written.
    """
    if not 0.0 < scale <= 1.0:
        raise OptionError(f"--scale must be a fraction in (0, 1], got {scale}")
    _check_sampling(None, seed)
    here = targets.resolve("auto")
    path = Path(output) if output is not None else targets.cached_profile(here.name)
    if output is not None:
        _check_output(path, None)
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GraphoptError(f"cannot create the cache folder {path.parent} ({exc.strerror or exc}); "
                                f"set XDG_CACHE_HOME or give -o FILE") from None
    started = time.perf_counter()
    command = f"graphopt calibrate --scale {scale:g} --seed {seed}"
    profile = calibration_run.calibrate(here.name, here.host.cpu if here.host else "?", seed=seed, scale=scale,
                                        command=command, progress=progress)
    report.write_text_atomic(path, profile.to_text(), "profile")
    return CalibrationResult(profile, path, here.name, output is None, round(time.perf_counter() - started, 3))


@scratch.run()
def inspect(model: ModelLike, *, input_shapes: Mapping[str, Sequence[int]] | None = None) -> analysis.ModelCost:
    """Params, MACs, bytes and the per-layer table of ``model`` (see :mod:`graphopt.measure.analysis`), at
    ``input_shapes``, else at probe shapes when the model has dynamic dims besides the batch."""
    ir, source = load_model(model)
    cost = analysis.analyze(ir, input_shapes=dict(input_shapes or {}) or probe_shapes(ir))
    cost.file_bytes = _file_bytes(source)
    return cost
