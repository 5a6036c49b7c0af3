"""CPU kinds: what onnxruntime's CPU kernels (MLAS) do on a kind of CPU, and which kind this machine is.

A model optimized on one machine often runs on another (a laptop for an edge box, a build server for
the fleet), and what a pruned channel or a factorization's rank saves depends on the kernels that run
it there. A :class:`Kind` holds the facts graphopt prices with, read from onnxruntime's source
(``onnxruntime/core/mlas/lib/platform.cpp`` and the NCHWc transformer) and checked on this machine
where it can be (:mod:`graphopt.measure.kernels`):

* ``block``: the channel block of the blocked (NCHWc) convolutions. MLAS sets 8 with SSE/AVX/AVX2 and
  16 once AVX-512F is there; a blocked conv pads its channels up to whole blocks, so 17 channels cost
  what 32 do with AVX-512. On ARM64 the NCHWc kernels are a build option that onnxruntime's release
  builds leave off (at the time of writing: they were slower at low thread counts), so the default is
  1, onnxruntime's own value for "no NCHWc kernels": convs run as im2col + SGEMM.
* ``lanes``: float32 values per vector register (8 AVX2, 16 AVX-512, 4 NEON): the width a GEMM's
  output columns are computed in; a partial vector costs a whole one.
* ``int8``: how the u8 x s8 integer kernels multiply. ``saturating``: x86 without VNNI adds pairs of
  products in saturating 16-bit lanes (``vpmaddubsw``), so full 8-bit weights can overflow and int8
  convs measured no faster than float here (docs/decisions/quantization.md); ``vnni``: AVX512-VNNI or
  AVX-VNNI dot products into 32 bits; ``neon``: ARM widening multiplies; ``dot``: ARM's dot-product
  extension (``asimddp``). None of the last three overflow.

Detection (:func:`detect`) reads the CPU's feature flags: ``/proc/cpuinfo`` on Linux; elsewhere the
machine name (an ARM64 machine counts as ``arm64``, an x86-64 one as unknown, to be settled by what
onnxruntime does: :func:`graphopt.measure.target.resolve`). A CPU none of the kinds describes (x86
without AVX2, another architecture) is ``None``: the caller falls back to onnxruntime's own geometry.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ALIASES", "KINDS", "Detection", "Kind", "detect", "here", "kind"]


@dataclass(frozen=True)
class Kind:
    """One kind of CPU as onnxruntime's kernels see it (module docstring)."""

    name: str
    arch: str
    block: int
    lanes: int
    int8: str
    summary: str

    @property
    def nchwc(self) -> bool:
        """Whether onnxruntime runs 2-D convs in its blocked layout here (a block of 1 means it does not)."""
        return self.block > 1

    @property
    def int8_saturates(self) -> bool:
        """u8 x s8 products are summed in saturating 16-bit lanes (full 8-bit weights may overflow)."""
        return self.int8 == "saturating"


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("avx2", "x86_64", 8, 8, "saturating",
         "x86-64 with AVX2 and FMA, no AVX-512 or VNNI (8-channel NCHWc blocks; int8 no faster than float)"),
    Kind("avx-vnni", "x86_64", 8, 8, "vnni",
         "x86-64 with AVX2 and AVX-VNNI, no AVX-512 (8-channel blocks; int8 dot products)"),
    Kind("avx512", "x86_64", 16, 16, "saturating",
         "x86-64 with AVX-512 (F, BW, DQ, VL), no VNNI (16-channel NCHWc blocks)"),
    Kind("avx512-vnni", "x86_64", 16, 16, "vnni",
         "x86-64 with AVX-512 and AVX512-VNNI (16-channel NCHWc blocks; int8 dot products)"),
    Kind("arm64", "arm64", 1, 4, "neon",
         "ARM64 with NEON, no dot product (onnxruntime's release builds: convs as im2col + SGEMM, no NCHWc)"),
    Kind("arm64-dot", "arm64", 1, 4, "dot",
         "ARM64 with the dot-product extension (asimddp; no NCHWc in onnxruntime's release builds)"),
)}

#: Other names users type for a kind.
ALIASES = {"neon": "arm64", "aarch64": "arm64", "avx512vnni": "avx512-vnni", "avxvnni": "avx-vnni"}


def kind(name: str) -> Kind | None:
    """The kind named ``name`` (case-insensitive, aliases allowed), or ``None``."""
    key = name.strip().lower()
    return KINDS.get(ALIASES.get(key, key))


@dataclass(frozen=True)
class Detection:
    """What :func:`detect` found: the kind (``None`` when no kind describes the CPU), the CPU's name, its
    architecture, and the evidence (the flags that decided, or the machine name when there were no flags)."""

    kind: Kind | None
    cpu: str
    arch: str
    evidence: tuple[str, ...] = field(default_factory=tuple)


def detect(cpuinfo: str | None, machine: str) -> Detection:
    """The kind of the CPU described by ``cpuinfo`` (the text of ``/proc/cpuinfo``, or ``None`` where
    there is none) on ``machine`` (``platform.machine()``).

    x86 flags: ``avx512f`` makes an AVX-512 kind (MLAS switches to 16-channel blocks on it alone), with
    ``avx512_vnni`` the VNNI one; else ``avx2`` with ``fma`` an AVX2 kind, with ``avx_vnni`` the VNNI
    one; else none. ARM64: ``asimddp`` in the ``Features`` line makes ``arm64-dot``, else ``arm64``.
    Without flags: an ARM64 machine is ``arm64`` (the kind without dot product: the conservative one);
    anything else is unknown.
    """
    flags = _flags(cpuinfo or "")
    name = _cpu_name(cpuinfo or "") or platform.processor() or machine
    arch = _arch(machine)

    def found(kind_name: str | None, *evidence: str) -> Detection:
        return Detection(KINDS[kind_name] if kind_name else None, name, arch, evidence)

    if flags and arch == "x86_64":
        if "avx512f" in flags:
            vnni = "avx512_vnni" in flags
            return found("avx512-vnni" if vnni else "avx512", "avx512f", *(("avx512_vnni",) if vnni else ()))
        if "avx2" in flags and "fma" in flags:
            vnni = "avx_vnni" in flags
            return found("avx-vnni" if vnni else "avx2", "avx2", "fma", *(("avx_vnni",) if vnni else ()))
        return found(None, "no avx2")
    if arch == "arm64":
        if not flags:
            return found("arm64", f"machine {machine}")
        dot = "asimddp" in flags
        return found("arm64-dot" if dot else "arm64", "asimddp" if dot else "asimd")
    return found(None, f"machine {machine}")


def here() -> Detection:
    """:func:`detect` on this machine."""
    path = Path("/proc/cpuinfo")
    try:
        text = path.read_text() if path.exists() else None
    except OSError:  # a sandbox may hide it: the machine name still says the architecture
        text = None
    return detect(text, platform.machine())


def _arch(machine: str) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if m in ("arm64", "aarch64", "armv8", "armv8l"):
        return "arm64"
    return m


def _flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor: the ``flags`` line on x86, ``Features`` on ARM."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def _cpu_name(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("model name", "hardware", "cpu model"):
            return value.strip()
    return ""
