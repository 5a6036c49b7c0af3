"""Passes, their registry, and the managers that run them.

The contract
------------
A pass is an object with ``run(model, ctx) -> PassResult(changed, stats)``:

* ``changed`` is true only when the IR really changed; fixed-point loops stop on it, so a pass that
  reports ``True`` without changing anything would spin until the step limit.
* ``stats`` is a JSON-serialisable dict: what the pass did, and for everything it left alone, why.

A pass class declares ``name`` (registry key), ``summary`` (one line for ``graphopt passes``),
``lossless`` (whether it keeps the model's function within float noise), and ``options``: a dict of
:class:`Option` that ``--option name.key=value`` may set. Unknown passes, unknown keys and values
of the wrong type are :class:`~graphopt.core.errors.OptionError`.

Managers
--------
:class:`Sequential` runs its members once each; :class:`FixedPoint` repeats them until a whole
round changes nothing, or until ``max_steps`` rounds (the limit is reported, never silent). Both are
passes themselves, so they nest. :func:`run_pipeline` runs any of them with timing per pass, and in
debug mode checks the IR invariants and ``onnx.checker`` after every pass and can dump the model
after every pass (``003_fold_batchnorm.onnx``).

When a pass raises, :class:`PassError` names it and the passes that ran before it.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from graphopt.core.errors import GraphoptError, IRError, OptionError
from graphopt.core.ir import Model


@dataclass
class PassResult:
    """What one run of a pass did."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Option:
    """A pass option settable from the command line as ``--option pass.key=value``.

    ``type`` is ``bool``, ``int``, ``float`` or ``str``; ``choices`` restricts values; ``low`` / ``high``
    bound a number (inclusive, or exclusive with ``low_open`` / ``high_open``), so that a count of 0 or
    a fraction of 1.5 is refused with the option's name instead of running a degenerate fit.
    """

    default: Any
    help: str
    type: type = str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    # Values this key once took that another key takes now (value -> "pass.key"): refused with a
    # pointer, like a renamed key (``Pass.renamed``), when a key's meaning moved but its name stayed.
    moved_values: tuple[tuple[str, str], ...] = ()

    def parse(self, text: str, where: str) -> Any:
        """Convert the command-line text to this option's type (OptionError when it does not fit)."""
        moved_to = dict(self.moved_values).get(text.strip().lower())
        if moved_to is not None:
            raise OptionError(f"option {where}: {text.strip()!r} is a value of {moved_to} now")
        try:
            if self.type is bool:
                lowered = text.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(text)
                value: Any = lowered in ("1", "true", "yes", "on")
            else:
                value = self.type(text)
        except ValueError:
            raise OptionError(f"option {where}: expected {self.type.__name__}, got {text!r}") from None
        self.check(value, where)
        return value

    def check(self, value: Any, where: str) -> None:
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"option {where}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.type in (int, float) and not self.allows(value):
            raise OptionError(f"option {where}: must be in {self.bounds()}, got {value!r}")

    def allows(self, value: float) -> bool:
        """Within ``low``/``high`` (NaN never is)."""
        if value != value:
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def bounds(self) -> str:
        """The allowed range in interval notation, e.g. ``[1, inf)`` or ``(0, 1]``."""
        low = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        high = "inf)" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{low}, {high}"


class Pass:
    """Base class of every pass; subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    options: ClassVar[dict[str, Option]] = {}
    # Option keys this pass no longer has -> the key that replaced them: refused with a pointer, so a
    # script written for an older release fails loudly instead of silently meaning something else.
    renamed: ClassVar[dict[str, str]] = {}
    # The pass reads ``ctx.original`` (the pipeline's input model, e.g. as a teacher): run_pipeline keeps a
    # copy of it only when some pass in the pipeline asks, so other pipelines pay no copy.
    wants_original: ClassVar[bool] = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def opt(self, ctx: PassContext, key: str) -> Any:
        """This pass's option ``key``: the user's value or the declared default."""
        if key not in self.options:
            raise IRError(f"pass {self.name} reads undeclared option {key!r}")
        return ctx.options.get(self.name, {}).get(key, self.options[key].default)

    def leaves(self) -> Iterable[Pass]:
        """The registered passes this pass runs (itself for a leaf pass)."""
        yield self

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


@dataclass
class PassContext:
    """What a pass may use besides the IR.

    Attributes
    ----------
    options : pass name -> option key -> value (already validated).
    seed : the run's seed; :meth:`rng` derives one generator per pass from it, so a pass's random
        choices do not depend on which other passes ran.
    data : sample data (``graphopt.measure.calibration.SampleData``) for calibration, or ``None``.
    data_dir : the calibration set when it is a directory of ``.npz`` shards
        (``graphopt.measure.sampledir.SampleDir``), else ``None``. ``data`` is then its head, in memory;
        the statistics that are sums over samples (prune's consumer statistics and re-fit, lowrank's
        input statistics and compensation) stream every shard of it
        (``docs/decisions/calibration-shards.md``).
    target_macs, target_params : global budgets as fractions of the original (``0.5`` = half).
    baseline : ``(MACs, params)`` of the pipeline's *input* model (either may be ``None`` when shapes
        are unknown), which the budgets are fractions of, so a lossless cleanup that runs first (BN
        folding removes a few percent of the MACs) does not count towards a lossy pass's target.
        ``graphopt.app.api.optimize`` passes the cost it reports as "before"; :func:`run_pipeline`
        computes it with ``measure`` when it is missing and a budget is set.
    measure : ``model -> (MACs, params)`` (``graphopt.measure.analysis.budget_cost``), given by the layer
        that knows how to measure; the core cannot (it is below ``graphopt.measure``).
    max_drop : the accuracy drop (points) lossy passes may spend.
    input_shapes : the concrete input shapes costs are counted at (given, or the probe's for a model with
        dynamic dims besides the batch; ``graphopt.measure.probe``), or ``None`` for batch 1.
    original : the pipeline's input model, unchanged (a copy kept by :func:`run_pipeline` when a pass in
        the pipeline sets ``wants_original``), else ``None``.
    train_data : where a training pass reads unlabeled inputs besides ``data`` (a ``.npz`` file or a
        directory of ``.npz`` shards; ``graphopt.compress.distill.data``), or ``None``.
    debug, dump_dir : check invariants after each pass / write the model after each pass.
    progress : called with a one-line status message, or ``None``.
    target : the CPU the model is for (``graphopt.measure.target.Target``: its kind, channel geometry and
        latency profile), which the lossy passes price with; ``None``: the default target
        (``graphopt.measure.target.resolve``), resolved by the pass that needs it.
    executor : where independent evaluations run (``graphopt.measure.executor``: in this process, a
        local process pool, a Ray cluster), or ``None`` for this process; passes ask
        ``graphopt.measure.executor.executor_for(ctx)``. The result does not depend on it.
    """

    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    data: Any = None
    data_dir: Any = None
    target_macs: float | None = None
    target_params: float | None = None
    max_drop: float | None = None
    baseline: tuple[int | None, int | None] | None = None
    measure: Callable[[Model], tuple[int | None, int | None]] | None = None
    input_shapes: dict[str, tuple[int, ...]] | None = None
    original: Model | None = field(default=None, repr=False)
    train_data: Any = None
    debug: bool = False
    dump_dir: Path | None = None
    progress: Callable[[str], None] | None = None
    target: Any = field(default=None, repr=False, compare=False)
    executor: Any = field(default=None, repr=False, compare=False)
    runner: _Runner | None = field(default=None, repr=False, compare=False)

    def rng(self, pass_name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(pass_name.encode())])

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


class PassError(Exception):
    """A pass raised or broke the IR: names the pass and what ran before it.

    Not a :class:`GraphoptError`: it is a bug, and the CLI reports it as an internal error (exit 3).
    """


# ---------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, type[Pass]] = {}
_PRESETS: dict[str, Callable[[], Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name``."""
    if not cls.name or not cls.summary:
        raise IRError(f"{cls.__name__} needs a name and a one-line summary")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise IRError(f"two passes named {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def register_preset(name: str, summary: str) -> Callable[[Callable[[], Pass]], Callable[[], Pass]]:
    """Decorator for a function building a preset's pass (usually a manager)."""
    def wrap(build: Callable[[], Pass]) -> Callable[[], Pass]:
        build.summary = summary  # type: ignore[attr-defined]
        _PRESETS[name] = build
        return build
    return wrap


def registered() -> dict[str, type[Pass]]:
    """Name -> pass class, sorted by name: what has registered (importing :mod:`graphopt.passes`, as
    :mod:`graphopt` itself does, registers every pass and preset the project ships)."""
    return dict(sorted(_REGISTRY.items()))


def presets() -> dict[str, Callable[[], Pass]]:
    return dict(sorted(_PRESETS.items()))


def get_pass(name: str) -> Pass:
    passes = registered()
    if name not in passes:
        raise OptionError(f"unknown pass {name!r} (known: {', '.join(passes)})")
    return passes[name]()


def build_pipeline(preset: str | None = None, names: Sequence[str] | None = None) -> Pass:
    """The pass to run: a preset by name, or a :class:`Sequential` of the named passes.

    A preset may end with ``+pass`` suffixes (``prune+finetune``): the preset, then those passes, in
    order. Only a lossy preset takes them: a pass after a lossless pipeline would make it lossy for
    nothing to recover.
    """
    if preset is not None and names:
        raise OptionError("give either a preset or a list of passes, not both")
    if names:
        return Sequential([get_pass(n) for n in names], name="passes")
    preset = preset or "lossless"
    base, *suffixes = [part.strip() for part in preset.split("+")]
    known = presets()
    if base not in known:
        raise OptionError(f"unknown preset {base!r} (known: {', '.join(known)})")
    pipeline = known[base]()
    if not suffixes:
        return pipeline
    if pipeline.lossless:
        raise OptionError(f"preset {preset!r}: a +pass suffix follows a lossy preset, and {base!r} is lossless")
    return Sequential([pipeline, *(get_pass(name) for name in suffixes)], name=preset)


def parse_options(pairs: Iterable[str], pipeline: Pass) -> dict[str, dict[str, Any]]:
    """Parse ``pass.key=value`` strings against the options the pipeline's passes declare.

    Options of passes that are registered but not in the pipeline are rejected too: a typo in a
    pass name must not pass silently.
    """
    in_pipeline = {p.name: p for p in pipeline.leaves()}
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        pass_name, dot, opt_key = key.strip().partition(".")
        if not sep or not dot or not pass_name or not opt_key:
            raise OptionError(f"option {pair!r}: expected pass.key=value")
        if pass_name not in in_pipeline:
            if pass_name in registered():
                raise OptionError(f"option {pair!r}: pass {pass_name!r} is not in this pipeline")
            raise OptionError(f"option {pair!r}: unknown pass {pass_name!r}")
        declared = in_pipeline[pass_name].options
        new_key = in_pipeline[pass_name].renamed.get(opt_key)
        if new_key is not None:
            raise OptionError(f"option {pair!r}: {pass_name}.{opt_key} is now {pass_name}.{new_key}")
        if opt_key not in declared:
            known = ", ".join(declared) or "none"
            raise OptionError(f"option {pair!r}: pass {pass_name!r} has no option {opt_key!r} (known: {known})")
        out.setdefault(pass_name, {})[opt_key] = declared[opt_key].parse(text, key)
    return out


# ---------------------------------------------------------------------------------------------
# managers


class Sequential(Pass):
    """Run each member once, in order; changed when any member changed."""

    summary = "run passes in order"

    def __init__(self, passes: Sequence[Pass], name: str = "sequential") -> None:
        self.passes = list(passes)
        self.name = name  # type: ignore[misc]
        self.lossless = all(p.lossless for p in self.passes)  # type: ignore[misc]

    def leaves(self) -> Iterable[Pass]:
        for p in self.passes:
            yield from p.leaves()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if ctx.runner is None:  # run directly rather than through run_pipeline
            ctx.runner = _Runner()
        changed = False
        for p in self.passes:
            changed |= ctx.runner.run_one(p, model, ctx).changed
        return PassResult(changed, {})


class FixedPoint(Sequential):
    """Repeat the members until one whole round changes nothing, at most ``max_steps`` rounds."""

    summary = "repeat passes until nothing changes"

    def __init__(self, passes: Sequence[Pass], name: str = "fixed_point", max_steps: int = 10) -> None:
        super().__init__(passes, name)
        self.max_steps = max_steps

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        changed_any = False
        for step in range(1, self.max_steps + 1):
            if not super().run(model, ctx).changed:
                return PassResult(changed_any, {"rounds": step, "converged": True})
            changed_any = True
        return PassResult(changed_any, {"rounds": self.max_steps, "converged": False,
                                        "note": f"stopped at the step limit ({self.max_steps}) while still changing"})


@dataclass
class PassRecord:
    """One execution of one leaf pass, as the report lists it."""

    name: str
    changed: bool
    seconds: float
    stats: dict[str, Any]
    group: bool = False  # a manager's summary (rounds, convergence), not a leaf pass

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "changed": self.changed, "seconds": round(self.seconds, 4), "stats": self.stats}
        if self.group:
            out["group"] = True
        return out


class _Runner:
    """Runs passes for :func:`run_pipeline`: timing, records, debug checks and dumps, error context."""

    def __init__(self) -> None:
        self.records: list[PassRecord] = []
        self.dumps = 0

    def run_one(self, p: Pass, model: Model, ctx: PassContext) -> PassResult:
        start = time.perf_counter()
        if isinstance(p, Sequential):
            result = p.run(model, ctx)  # members are recorded one by one
            if isinstance(p, FixedPoint):
                self.records.append(PassRecord(p.name, result.changed, time.perf_counter() - start, result.stats,
                                               group=True))
            return result
        ctx.say(f"running {p.name}")
        try:
            result = p.run(model, ctx)
        except GraphoptError:
            raise
        except Exception as exc:
            before = ", ".join(r.name for r in self.records) or "none"
            raise PassError(f"pass {p.name} failed: {type(exc).__name__}: {exc} (passes run before it: {before})") from exc
        if not isinstance(result, PassResult):
            raise PassError(f"pass {p.name} returned {type(result).__name__}, not PassResult")
        self.records.append(PassRecord(p.name, bool(result.changed), time.perf_counter() - start, result.stats))
        if ctx.debug:
            self._debug_check(p, model)
        if ctx.dump_dir is not None:
            self._dump(p, model, ctx.dump_dir)
        return result

    def _debug_check(self, p: Pass, model: Model) -> None:
        try:
            model.check_invariants()
            _check_onnx(model)
        except (IRError, onnx.checker.ValidationError) as exc:
            raise PassError(f"after pass {p.name}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc

    def _dump(self, p: Pass, model: Model, dump_dir: Path) -> None:
        from graphopt.core.onnx_io import save
        self.dumps += 1
        dump_dir.mkdir(parents=True, exist_ok=True)
        save(model, dump_dir / f"{self.dumps:03d}_{p.name}.onnx")


def _check_onnx(model: Model) -> None:
    """``onnx.checker.check_model`` on the model; from a file in the run's scratch directory when the
    model is over protobuf's 2 GiB limit (the checker serializes a ModelProto in memory)."""
    from graphopt.core import scratch
    from graphopt.core.onnx_io import fits_protobuf, save, to_proto
    proto = to_proto(model)
    if fits_protobuf(proto):
        onnx.checker.check_model(proto)
        return
    with scratch.directory("check") as folder:
        save(proto, folder / "model.onnx", external_data=True)
        onnx.checker.check_model(str(folder / "model.onnx"))


def run_pipeline(pipeline: Pass, model: Model, ctx: PassContext) -> tuple[bool, list[PassRecord]]:
    """Run ``pipeline`` on ``model`` in place; returns (changed, one record per pass execution)."""
    if ctx.baseline is None and ctx.measure is not None and (ctx.target_macs is not None
                                                             or ctx.target_params is not None):
        ctx.baseline = ctx.measure(model)
    if ctx.original is None and any(p.wants_original for p in pipeline.leaves()):
        ctx.original = model.clone()
    ctx.runner = _Runner()
    try:
        result = ctx.runner.run_one(pipeline, model, ctx)
        return result.changed, ctx.runner.records
    finally:
        ctx.runner = None
