"""The target CPU of a run: which kind of CPU the model is for, and the latency profile its prices come from.

``--target-cpu`` (API: ``target_cpu``) takes

* ``auto`` (the default): the machine graphopt runs on. Its kind comes from the CPU's flags
  (:func:`graphopt.measure.cpu.here`) and is checked against what onnxruntime does here
  (:func:`graphopt.measure.kernels.nchwc_rule`): where the two disagree on the NCHWc block (an OS without
  AVX-512 state, an ARM64 build with the NCHWc kernels on, a CPU no kind describes), onnxruntime's
  geometry wins, since it is what will run, and the target's notes say so.
* a kind's name (:data:`graphopt.measure.cpu.KINDS`: ``avx2``, ``avx512``, ``arm64``...): that CPU, with
  the geometry read from onnxruntime's source (its NCHWc input multiple is the one measured here, 4).
* a profile file written by ``graphopt calibrate -o FILE`` on the machine the model is for: its kind,
  geometry and coefficients.

The environment variable ``GRAPHOPT_TARGET_CPU`` replaces the default ``auto`` (a CI runner or a build
server that always optimizes for one fleet).

Profiles: the first that exists of

1. a profile calibrated for the kind with ``graphopt calibrate`` (cached as
   ``$XDG_CACHE_HOME/graphopt/latency-KIND.json``, ``~/.cache/graphopt`` without it) — provided its
   NCHWc block is the target's;
2. the profile shipped for the kind (``graphopt/data/latency_KIND.json``: ``avx2`` and ``avx512-vnni``,
   measured on the machines graphopt has been developed on);
3. none: the target is *uncalibrated*, and graphopt prices in MACs with the kind's block geometry
   (:meth:`graphopt.measure.latency.LatencyModel.macs_only`), and says so in the report.

A target is ``native`` when it is the kind of the machine graphopt runs on: only then does a
measurement here (int8 overflow, for one) say what the target will do.

Refused (:class:`~graphopt.core.errors.OptionError`, one line): a name that is no kind and no file, a
file that is not a latency profile.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnxruntime as ort

from graphopt.core.errors import OptionError
from graphopt.measure import cpu, kernels
from graphopt.measure.latency import LatencyModel, Nchwc

__all__ = ["ENV", "SHIPPED", "Target", "cache_dir", "cached_profile", "default_spec", "of", "resolve"]

ENV = "GRAPHOPT_TARGET_CPU"
SHIPPED = Path(__file__).parents[1] / "data"

#: The NCHWc input multiple onnxruntime 1.31-1.32 shows on AVX2 (:func:`graphopt.measure.kernels.nchwc_rule`);
#: the transformer's rule is the same code for every block size, so a kind that cannot be probed here takes it.
INPUT_MULTIPLE = 4


@dataclass(frozen=True)
class Target:
    """The CPU a run optimizes for.

    Attributes
    ----------
    kind : the kind (:class:`graphopt.measure.cpu.Kind`; for an undescribed CPU, one made from onnxruntime's
        geometry, named ``unknown``).
    path : the NCHWc rule prices use (block, input multiple).
    latency : the latency model: the profile's coefficients, or MACs when ``profile == "uncalibrated"``.
    profile : ``"calibrated"`` (a cached or given ``graphopt calibrate`` profile), ``"shipped"`` or
        ``"uncalibrated"``.
    profile_path : the profile's file, or ``None``.
    requested : what the user asked for (``auto``, a kind, a file).
    host : what the detection saw on the machine graphopt runs on.
    native : the target is the kind of the machine graphopt runs on.
    notes : what the report should say besides (disagreements, profiles passed over).
    """

    kind: cpu.Kind
    path: Nchwc
    latency: LatencyModel
    profile: str
    profile_path: str | None = None
    requested: str = "auto"
    host: cpu.Detection | None = None
    native: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def calibrated(self) -> bool:
        return self.profile != "uncalibrated"

    @property
    def int8_like_host(self) -> bool:
        """This machine's integer kernels overflow (or not) as the target's do, so an int8 model measured
        here behaves as it will there."""
        if self.native:
            return True
        return (self.host is not None and self.host.kind is not None
                and self.host.kind.int8_saturates == self.kind.int8_saturates)

    def unit(self, blocked: bool) -> int:
        """Channels the target computes together: a blocked conv's NCHWc block, else a vector of lanes. A
        count between two units costs what the next unit costs."""
        return self.path.block if blocked and self.path.block > 1 else self.kind.lanes

    def profile_line(self) -> str:
        """Where the prices come from, in words."""
        meta = self.latency.meta
        if self.profile == "uncalibrated":
            return (f"uncalibrated: no latency profile for {self.name}, so prices are MACs with its "
                    f"{self.path.block}-channel block geometry (graphopt calibrate on such a CPU makes one)"
                    if self.path.block > 1 else
                    f"uncalibrated: no latency profile for {self.name}, so prices are MACs "
                    "(graphopt calibrate on such a CPU makes one)")
        measured = f"measured on {meta.get('cpu', '?')} with onnxruntime {meta.get('onnxruntime', '?')}"
        if self.profile == "shipped":
            return f"shipped (graphopt/data/{Path(self.profile_path or '?').name}, {measured})"
        if self.requested == self.profile_path:  # a file the user gave
            return f"calibrated, from {self.profile_path} ({measured})"
        return (f"calibrated on this machine at {self.profile_path} (onnxruntime {meta.get('onnxruntime', '?')}, "
                f"{meta.get('date', '?')})")

    def line(self) -> str:
        """One line for the console: the target, how it was chosen, and its profile."""
        how = f"asked for; this machine: {self._host_name()}"
        if self.requested == "auto" and self.host is not None:
            how = f"detected: {self.host.cpu}, {' '.join(self.host.evidence)}"
        return f"target CPU {self.name} ({how}); profile {self.profile_line()}"

    def to_dict(self) -> dict[str, Any]:
        """The report's ``target_cpu`` entry."""
        out: dict[str, Any] = {
            "name": self.name, "summary": self.line(), "requested": self.requested, "arch": self.kind.arch,
            "nchwc_block": self.path.block, "input_multiple": self.path.input_multiple,
            "lanes": self.kind.lanes, "int8": self.kind.int8, "native": self.native,
            "profile": {"source": self.profile, "path": self.profile_path,
                        "cpu": self.latency.meta.get("cpu"), "onnxruntime": self.latency.meta.get("onnxruntime"),
                        "date": self.latency.meta.get("date"), "summary": self.profile_line()},
        }
        if self.host is not None:
            out["host"] = {"cpu": self.host.cpu, "evidence": list(self.host.evidence),
                           "kind": self.host.kind.name if self.host.kind else None}
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def _host_name(self) -> str:
        return self.host.kind.name if self.host is not None and self.host.kind is not None else "unknown"


def default_spec() -> str:
    """``$GRAPHOPT_TARGET_CPU``, else ``auto``."""
    return os.environ.get(ENV, "").strip() or "auto"


def cache_dir() -> Path:
    """Where ``graphopt calibrate`` keeps profiles: ``$XDG_CACHE_HOME/graphopt``, else ``~/.cache/graphopt``."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "graphopt"


def cached_profile(kind_name: str) -> Path:
    """The cache file of ``kind_name``'s calibrated profile (it may not exist)."""
    return cache_dir() / f"latency-{kind_name}.json"


def resolve(spec: str | None = None) -> Target:
    """The target for ``spec`` (``auto``, a kind's name or a profile file; ``None``: :func:`default_spec`).

    Raises
    ------
    OptionError
        ``spec`` is no kind and no readable profile file (the message lists the kinds; it names
        ``$GRAPHOPT_TARGET_CPU`` when the spec came from there).
    """
    where = "--target-cpu" if spec else f"${ENV}"
    spec = (spec or default_spec()).strip()
    if spec.lower() == "auto":
        return _auto()
    named = cpu.kind(spec)
    here = cpu.here()
    if named is not None:
        native = here.kind is not None and here.kind.name == named.name
        path = kernels.nchwc_rule()[0] if native else _geometry(named)
        return replace(_with_profile(named, path, requested=spec, native=native), host=here)
    if spec.endswith(".json") or Path(spec).is_file():
        return replace(_from_file(Path(spec), here, where), host=here)
    raise OptionError(f"{where}: unknown CPU kind {spec!r}; expected auto, a profile .json file "
                      f"(graphopt calibrate -o FILE), or one of {', '.join(cpu.KINDS)}")


def of(ctx: Any) -> Target:
    """The run's target: ``ctx.target`` (a :class:`graphopt.core.manager.PassContext`'s), resolved from
    :func:`default_spec` and kept there on first use, so every pass of a run prices for the same CPU."""
    if getattr(ctx, "target", None) is None:
        ctx.target = resolve()
    return ctx.target


def _geometry(kind: cpu.Kind) -> Nchwc:
    return Nchwc(kind.block, INPUT_MULTIPLE) if kind.nchwc else Nchwc(1, 1)


def _auto() -> Target:
    detection = cpu.here()
    rule, matched = kernels.nchwc_rule()
    notes = [] if matched else [f"onnxruntime's NCHWc rule here matches no input multiple; "
                                f"{rule.input_multiple} assumed"]
    kind = detection.kind
    if kind is None:
        kind = cpu.Kind("unknown", detection.arch, rule.block, rule.block if rule.block > 1 else 4, "unknown",
                        "a CPU no kind describes: onnxruntime's geometry, measured here")
        notes.append(f"no CPU kind describes this CPU ({', '.join(detection.evidence)}): "
                     f"onnxruntime's {rule.block}-channel geometry is used")
    elif kind.block != rule.block:
        notes.append(f"the CPU's flags say {kind.name} ({kind.block}-channel blocks) but onnxruntime here "
                     f"blocks {rule.block}: onnxruntime's geometry is used")
        kind = replace(kind, block=rule.block)
    target = _with_profile(kind, rule, requested="auto", native=True, notes=tuple(notes))
    return replace(target, host=detection)


def _with_profile(kind: cpu.Kind, path: Nchwc, *, requested: str, native: bool,
                  notes: tuple[str, ...] = ()) -> Target:
    """The target with the first profile of the module docstring's order that fits its geometry."""
    notes_out = list(notes)
    cached = cached_profile(kind.name)
    if cached.is_file():
        model = _read_profile(cached)
        if model.path.block == path.block:
            return Target(kind, path, model, "calibrated", str(cached), requested, None, native, tuple(notes_out))
        notes_out.append(f"{cached} was calibrated with {model.path.block}-channel blocks, not "
                         f"{path.block}: not used")
    shipped = SHIPPED / f"latency_{kind.name}.json"
    if shipped.is_file():
        model = _read_profile(shipped)
        if model.path.block == path.block:
            return Target(kind, path, model, "shipped", str(shipped), requested, None, native, tuple(notes_out))
    model = LatencyModel.macs_only(path, {"kind": kind.name})
    return Target(kind, path, model, "uncalibrated", None, requested, None, native, tuple(notes_out))


def _from_file(path: Path, here: cpu.Detection, where: str) -> Target:
    model = _read_profile(path, where)
    name = str(model.meta.get("kind", ""))
    known = cpu.kind(name)
    if known is None:
        raise OptionError(f"{where} {path}: the profile names no CPU kind it was calibrated on "
                          f"(meta.kind {name!r}); expected one of {', '.join(cpu.KINDS)}")
    kind = replace(known, block=model.path.block)
    native = here.kind is not None and here.kind.name == known.name
    notes = (f"onnxruntime {model.meta.get('onnxruntime')} made this profile; this is {ort.__version__}",) \
        if model.meta.get("onnxruntime") not in (None, ort.__version__) else ()
    return Target(kind, model.path, model, "calibrated", str(path), str(path), None, native, notes)


def _read_profile(path: Path, where: str = "--target-cpu") -> LatencyModel:
    """A profile file, or a one-line refusal naming it."""
    try:
        return LatencyModel.from_json(json.loads(path.read_text()))
    except OSError as exc:
        raise OptionError(f"{where} {path}: cannot read the profile ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise OptionError(f"{where} {path}: not a graphopt latency profile ({exc})") from None
