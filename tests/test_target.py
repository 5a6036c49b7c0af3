"""The target CPU: detection from CPU flags (fake /proc/cpuinfo texts, so these hold on any machine), the
kinds' geometry, profile resolution (cache, shipped, uncalibrated), and the channel units it gives pruning."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper

from graphopt.compress import channels
from graphopt.compress.channels.units import group_units
from graphopt.core.errors import OptionError
from graphopt.core.onnx_io import from_proto
from graphopt.measure import cpu, kernels
from graphopt.measure import latency as lat
from graphopt.measure import target as targets
from tests.util import init, make_model, tensor


def _x86(flags: str, name: str = "Some CPU") -> str:
    block = f"processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: {name}\nflags\t\t: fpu sse sse2 {flags}\n\n"
    return block + block.replace("processor\t: 0", "processor\t: 1")


def _arm(features: str) -> str:
    return f"processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp {features} evtstrm cpuid\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize("text,machine,kind,evidence", [
    (_x86("avx avx2 fma f16c"), "x86_64", "avx2", ("avx2", "fma")),
    (_x86("avx avx2 fma avx_vnni"), "x86_64", "avx-vnni", ("avx2", "fma", "avx_vnni")),
    (_x86("avx avx2 fma avx512f avx512bw avx512dq avx512vl"), "x86_64", "avx512", ("avx512f",)),
    (_x86("avx2 fma avx512f avx512bw avx512_vnni"), "x86_64", "avx512-vnni", ("avx512f", "avx512_vnni")),
    (_x86("avx2 fma avx512f avx512_vnni", "AMD EPYC 9654"), "AMD64", "avx512-vnni", ("avx512f", "avx512_vnni")),
    (_arm("asimd aes pmull sha1 sha2 crc32"), "aarch64", "arm64", ("asimd",)),
    (_arm("asimd asimddp i8mm"), "aarch64", "arm64-dot", ("asimddp",)),
    (None, "arm64", "arm64", ("machine arm64",)),          # macOS: no /proc/cpuinfo
])
def test_detection_from_flags(text, machine, kind, evidence):
    found = cpu.detect(text, machine)
    assert found.kind is not None and found.kind.name == kind
    assert found.evidence == evidence


@pytest.mark.parametrize("text,machine", [
    (_x86("avx sse4_2"), "x86_64"),              # no AVX2: no kind describes its kernels
    ("processor\t: 0\nisa\t: rv64imafdc\n", "riscv64"),
    (None, "x86_64"),                              # another OS: no flags to read
    ("", "ppc64le"),
])
def test_undescribed_cpus_are_unknown(text, machine):
    assert cpu.detect(text, machine).kind is None


def test_cpu_name_and_architecture():
    found = cpu.detect(_x86("avx2 fma", "AMD EPYC"), "x86_64")
    assert (found.cpu, found.arch) == ("AMD EPYC", "x86_64")
    assert cpu.detect(_arm("asimd"), "aarch64").arch == "arm64"


def test_kinds_read_off_onnxruntime_source():
    assert [cpu.KINDS[k].block for k in ("avx2", "avx-vnni", "avx512", "avx512-vnni", "arm64", "arm64-dot")] == \
        [8, 8, 16, 16, 1, 1]
    assert cpu.KINDS["avx2"].int8_saturates and cpu.KINDS["avx512"].int8_saturates
    assert not any(cpu.KINDS[k].int8_saturates for k in ("avx-vnni", "avx512-vnni", "arm64", "arm64-dot"))
    assert cpu.kind("NEON") is cpu.KINDS["arm64"] and cpu.kind("avx512vnni") is cpu.KINDS["avx512-vnni"]
    assert cpu.kind("sse") is None


# ---------------------------------------------------------------------------------------------
# resolution


def test_named_kinds_have_their_geometry_and_a_shipped_profile_or_say_they_are_uncalibrated():
    for name, block, unit in (("avx512", 16, 16), ("arm64", 1, 4)):
        t = targets.resolve(name)
        assert (t.name, t.path.block, t.unit(True), t.unit(False)) == (name, block, unit, unit)
        assert t.profile == "uncalibrated" and not t.latency.calibrated and "uncalibrated" in t.line()
    for name, block in (("avx2", 8), ("avx512-vnni", 16)):    # the kinds the project has measured
        t = targets.resolve(name)
        assert t.profile == "shipped" and t.latency.calibrated and t.path.block == block
        assert t.latency.meta["kind"] == name and t.latency.has_int8
        assert f"graphopt/data/latency_{name}.json" in t.line()


def test_bad_names_are_refused_in_one_line():
    with pytest.raises(OptionError, match="unknown CPU kind 'pentium'.*avx2, avx-vnni, avx512") as err:
        targets.resolve("pentium")
    assert "\n" not in str(err.value)


def test_default_is_the_environment_then_auto(monkeypatch):
    monkeypatch.setenv(targets.ENV, "avx512")
    assert targets.resolve().name == "avx512"
    monkeypatch.setenv(targets.ENV, "pentium")
    with pytest.raises(OptionError, match=r"^\$GRAPHOPT_TARGET_CPU: unknown CPU kind 'pentium'"):
        targets.resolve()
    monkeypatch.delenv(targets.ENV)
    assert targets.default_spec() == "auto"


def test_auto_is_this_machine_as_onnxruntime_runs_it():
    t = targets.resolve("auto")
    assert t.native and t.requested == "auto" and t.int8_like_host
    assert t.path.block == kernels.block()
    assert t.host is not None and t.to_dict()["host"]["cpu"] == t.host.cpu


def _profile_file(path, kind: str, block: int) -> None:
    model = lat.LatencyModel.macs_only(lat.Nchwc(block, 4), {"kind": kind, "cpu": "Test CPU", "onnxruntime": "9.9"})
    model.meta.pop("calibrated")
    model.save(path)


def test_a_calibrated_profile_in_the_cache_wins_over_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = targets.cached_profile("avx2")
    assert cache == tmp_path / "graphopt" / "latency-avx2.json"
    cache.parent.mkdir(parents=True)
    _profile_file(cache, "avx2", 8)
    t = targets.resolve("avx2")
    assert (t.profile, t.profile_path) == ("calibrated", str(cache))
    assert f"profile calibrated on this machine at {cache} (onnxruntime 9.9" in t.line()
    _profile_file(cache, "avx2", 16)  # made with another block: not this target's kernels
    t = targets.resolve("avx2")
    assert t.profile == "shipped" and any("not used" in n for n in t.notes)


def test_a_profile_file_is_a_target(tmp_path):
    path = tmp_path / "edge.json"
    _profile_file(path, "avx512-vnni", 16)
    t = targets.resolve(str(path))
    assert (t.name, t.path.block, t.profile, t.profile_path) == ("avx512-vnni", 16, "calibrated", str(path))
    assert any("onnxruntime 9.9" in n for n in t.notes)
    assert f"calibrated, from {path} (measured on Test CPU" in t.line()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"features": ["kernel"]}))
    with pytest.raises(OptionError, match="not a graphopt latency profile"):
        targets.resolve(str(bad))
    with pytest.raises(OptionError, match="cannot read"):
        targets.resolve(str(tmp_path / "missing.json"))


def test_int8_is_measured_here_only_when_the_kernels_match():
    host = cpu.detect(_x86("avx2 fma"), "x86_64")
    other = targets.Target(cpu.KINDS["avx512-vnni"], lat.Nchwc(16, 4), lat.load(), "shipped", host=host)
    same = targets.Target(cpu.KINDS["avx512"], lat.Nchwc(16, 4), lat.load(), "shipped", host=host)
    assert not other.int8_like_host and same.int8_like_host


# ---------------------------------------------------------------------------------------------
# channel units


def _conv_then_gemm():
    """conv1 (3 -> 32) -> Relu -> conv2 (32 -> 24) -> GlobalAveragePool -> Flatten -> fc1 (24 -> 40) ->
    Relu -> fc2 (40 -> 10): two conv groups and one GEMM group."""
    rng = np.random.default_rng(0)
    inits = [init("w1", rng.standard_normal((32, 3, 3, 3)).astype(np.float32)),
             init("w2", rng.standard_normal((24, 32, 3, 3)).astype(np.float32)),
             init("f1", rng.standard_normal((24, 40)).astype(np.float32)),
             init("f2", rng.standard_normal((40, 10)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c"], ["d"]),
             helper.make_node("Flatten", ["d"], ["e"]),
             helper.make_node("MatMul", ["e", "f1"], ["g"], name="fc1"),
             helper.make_node("Relu", ["g"], ["h"]),
             helper.make_node("MatMul", ["h", "f2"], ["y"], name="fc2")]
    return from_proto(make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 10])], inits))


def test_group_units_are_the_block_for_blocked_convs_and_the_lanes_elsewhere():
    model = _conv_then_gemm()
    groups = channels.analyze(model).prunable()
    by_size = {g.size: g.gid for g in groups}
    assert set(by_size) == {32, 24, 40}
    expect = {"avx2": (8, 8, 8), "avx512": (16, 16, 16), "arm64": (4, 4, 4)}
    for name, (conv32, conv24, gemm40) in expect.items():
        units = group_units(model.graph, groups, targets.resolve(name))
        assert (units[by_size[32]], units[by_size[24]], units[by_size[40]]) == (conv32, conv24, gemm40), name
    # an ARM64 build with NCHWc kernels (16-channel blocks, 4 lanes): the conv groups move in blocks,
    # the GEMM's output columns in vectors
    arm_nchwc = targets.Target(cpu.KINDS["arm64"], lat.Nchwc(16, 4), lat.load(), "uncalibrated")
    units = group_units(model.graph, groups, arm_nchwc)
    assert (units[by_size[32]], units[by_size[24]], units[by_size[40]]) == (16, 16, 4)


def test_a_target_below_one_block_per_group_says_so_and_how_to_go_further():
    """resnet's groups (16-64 channels) at a third of the MACs on a 16-channel-block target: every group
    stops at one block (0.525 of the MACs), and the miss says why, not "frozen"."""
    from pathlib import Path

    import graphopt
    models = Path(__file__).resolve().parents[1] / "models"
    result = graphopt.optimize(models / "resnet.onnx", preset="prune", target_macs=0.35,
                               data=models / "fmnist_calib.npz", target_cpu="avx512", run_verify=False,
                               options=["prune_filters.near_fastest=0"])
    target = result.report["target"]
    assert not target["met"] and target["macs"]["reached"] > 0.5
    assert "every prunable group is down to one channel unit of avx512 (16 channels" in target["reason"]
    assert "prune_filters.multiple=8" in target["reason"]
    groups = next(p["stats"]["groups"] for p in result.report["passes"] if p["name"] == "prune_filters")
    assert {g["channels_after"] for g in groups} == {16}
