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
from graphopt.core.manager import PassContext, build_pipeline, parse_options, run_pipeline
from graphopt.measure import analysis, calibration
from graphopt.measure.verify import Tolerance, VerifyReport
from graphopt.measure.verify import verify as run_verification

ModelLike = str | os.PathLike | onnx.ModelProto | Model
DataLike = str | os.PathLike | calibration.SampleData | None

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
    """

    model: onnx.ModelProto
    report: dict[str, Any]
    passed: bool
    ir: Model


def load_model(model: ModelLike) -> tuple[Model, ModelLike]:
    """The IR of ``model`` and a reference that stays unchanged while passes mutate the IR."""
    if isinstance(model, Model):
        return model, onnx_io.to_proto(model)
    if isinstance(model, onnx.ModelProto):
        return onnx_io.from_proto(model), model
    if isinstance(model, (str, os.PathLike)):
        return onnx_io.load(model), Path(model)
    raise GraphoptError(f"expected a path, an onnx.ModelProto or a graphopt Model, got {type(model).__name__}")


def sample_data(model: Model, data: DataLike, *, samples: int | None = None, seed: int = 0,
                input_shapes: Mapping[str, Sequence[int]] | None = None) -> calibration.SampleData:
    """User data (validated against the model), or seeded random inputs when ``data`` is None."""
    if isinstance(data, calibration.SampleData):
        out = data
    elif data is not None:
        out = calibration.load_data(data, model)
    else:
        return calibration.random_data(model, samples or DEFAULT_RANDOM_SAMPLES, seed=seed,
                                       input_shapes=dict(input_shapes or {}))
    return out.head(samples) if samples else out


def _cost(model: Model, input_shapes: Mapping[str, Sequence[int]] | None, file_bytes: int | None) -> dict[str, Any]:
    cost = analysis.analyze(model, input_shapes=dict(input_shapes or {}) or None)
    cost.file_bytes = file_bytes
    return cost.summary()


def _file_bytes(source: ModelLike) -> int | None:
    if isinstance(source, Path):
        data = source.with_name(source.name + ".data")
        return source.stat().st_size + (data.stat().st_size if data.exists() else 0)
    if isinstance(source, onnx.ModelProto):
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
             progress: Callable[[str], None] | None = None) -> OptimizeResult:
    """Run a pass pipeline on ``model``, verify the result with onnxruntime, optionally write it.

    Parameters
    ----------
    model : path, ModelProto or IR Model. A path is never overwritten.
    output : where to write the optimized model (atomically). ``None``: not written.
    preset, passes : the pipeline — a preset name (default ``lossless``) or pass names.
    options : ``["pass.key=value", ...]`` or ``{"pass.key": value}``.
    data : ``.npz`` path or SampleData for calibration and verification; ``None``: seeded random inputs.
    input_shapes : concrete dims for dynamic input dims, ``{"input": (1, 3, 224, 224)}``.
    verify_data : held-out samples to verify on instead of ``data``. Lossy passes fit weights to
        ``data``, so verifying on the same samples overstates their accuracy; the report says which
        data the verdict used (``verify.data`` and ``verify.held_out``).
    target_macs, target_params, max_drop : budgets for lossy passes (fractions; accuracy points).
    tolerance : verification tolerance; ``None`` derives it (see :mod:`graphopt.measure.verify`).
    samples : cap on the number of samples used.
    run_verify : verify the result (default). When off, ``passed`` is True and the report says so.
    write_failed : write the output even when verification fails (for inspection).
    debug, dump_dir : check IR invariants after each pass; dump the model after each pass.

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
    parsed_options = parse_options(option_pairs, pipeline)
    _check_budgets(target_macs, target_params, max_drop)
    _check_sampling(samples, seed)
    output_path = Path(output) if output is not None else None
    ctx_progress("loading the model")
    ir, reference = load_model(model)
    if output_path is not None:
        _check_output(output_path, reference)
    ctx_progress("preparing sample data")
    sample = sample_data(ir, data, samples=samples, seed=seed, input_shapes=input_shapes)
    check = sample if verify_data is None else sample_data(ir, verify_data, samples=samples, seed=seed,
                                                           input_shapes=input_shapes)
    before = _cost(ir, input_shapes, _file_bytes(reference))

    ctx = PassContext(options=parsed_options, seed=seed, data=sample, target_macs=target_macs,
                      target_params=target_params, max_drop=max_drop, baseline=(before["macs"], before["params"]),
                      debug=debug,
                      dump_dir=Path(dump_dir) if dump_dir is not None else None, progress=progress)
    _, records = run_pipeline(pipeline, ir, ctx)
    proto = onnx_io.to_proto(ir)
    after = _cost(ir, input_shapes, onnx_io.serialized_size(proto))

    mode = "equivalence" if pipeline.lossless else "accuracy"
    if run_verify:
        ctx_progress("verifying with onnxruntime")
    verify_dict, passed = _verdict(reference, proto, check, mode, tolerance, max_drop, run_verify,
                                   held_out=verify_data is not None)

    report: dict[str, Any] = {
        "graphopt_version": __version__,
        "model": str(model) if isinstance(model, (str, os.PathLike)) else "<in memory>",
        "output": None,
        "preset": None if passes else (preset or "lossless"),
        "passes_requested": [p.name for p in pipeline.leaves()],
        "options": {f"{p}.{k}": v for p, kv in parsed_options.items() for k, v in kv.items()},
        "data": sample.source,
        "samples": sample.n_samples,
        "seed": seed,
        "before": before,
        "after": after,
        "passes": [r.to_dict() for r in records],
        "verify": verify_dict,
    }
    if output_path is not None and (passed or write_failed):
        ctx_progress(f"writing {output_path}")
        onnx_io.save(ir, output_path)
        report["output"] = str(output_path)
        report["after"]["file_bytes"] = _file_bytes(output_path)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return OptimizeResult(proto, report, passed, ir)


def _check_budgets(target_macs: float | None, target_params: float | None, max_drop: float | None) -> None:
    """Targets are fractions in (0, 1]; an accuracy budget is never negative."""
    for name, value in (("target_macs", target_macs), ("target_params", target_params)):
        if value is not None and not 0.0 < value <= 1.0:
            raise OptionError(f"--{name.replace('_', '-')} must be a fraction in (0, 1], got {value}")
    if max_drop is not None and max_drop < 0:
        raise OptionError(f"--max-drop must be >= 0 accuracy points, got {max_drop}")


def _verdict(reference: onnx.ModelProto, proto: onnx.ModelProto, check: Any, mode: str,
             tolerance: Tolerance | None, max_drop: float | None, run_verify: bool,
             held_out: bool) -> tuple[dict[str, Any], bool]:
    """The verification's report entry and whether it passed (a skipped verification passes, and says so)."""
    if not run_verify:
        return {"passed": True, "mode": mode, "skipped": True, "reasons": []}, True
    tol = tolerance
    if max_drop is not None:
        tol = dataclasses.replace(tol or Tolerance(), max_drop=max_drop)
    verdict = run_verification(reference, proto, check, tolerance=tol, mode=mode)
    out = verdict.to_dict()
    out.update(data=check.source, samples=check.n_samples, held_out=held_out)
    return out, verdict.passed


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
    sample = sample_data(ref_ir, data, samples=samples, seed=seed, input_shapes=input_shapes)
    return run_verification(ref, cand, sample, tolerance=tolerance, mode=mode)


@scratch.run()
def inspect(model: ModelLike, *, input_shapes: Mapping[str, Sequence[int]] | None = None) -> analysis.ModelCost:
    """Params, MACs, bytes and the per-layer table of ``model`` (see :mod:`graphopt.measure.analysis`)."""
    ir, source = load_model(model)
    cost = analysis.analyze(ir, input_shapes=dict(input_shapes or {}) or None)
    cost.file_bytes = _file_bytes(source)
    return cost
