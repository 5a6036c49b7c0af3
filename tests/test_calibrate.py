"""``graphopt calibrate`` and graphopt.measure.calibrate: the fit, the kernel set, and a quick calibration
that is written to the user's cache (a temporary one here) and then used by ``--target-cpu auto``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from graphopt.app import cli
from graphopt.measure import calibrate as cal
from graphopt.measure import latency as lat
from graphopt.measure import target as targets

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_nnls_recovers_non_negative_coefficients():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.1, 1.0, size=(40, 6))
    truth = np.array([0.5, 0.0, 2.0, 0.0, 1.0, 0.25])
    assert np.allclose(cal._nnls(a, a @ truth), truth, atol=1e-9)


def test_nnls_meets_the_optimality_conditions_when_a_coefficient_would_be_negative():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 4))
    b = a @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.01 * rng.normal(size=50)
    x = cal._nnls(a, b)
    grad = a.T @ (a @ x - b)
    assert (x >= 0).all() and x[1] == 0.0
    assert np.all(grad[x == 0] >= -1e-8) and np.allclose(grad[x > 0], 0.0, atol=1e-8)


def test_fit_reports_quality_and_zero_for_kinds_never_measured():
    work = lat.conv_work(4, 16, 32, (3, 3), (8, 8), (8, 8))
    true = np.array([2e-6, 3e-11, 0, 0, 0, 1e-8])
    records = [{"kind": "conv", "features": [f * s for f in work.features], "seconds": 0}
               for s in (1.0, 2.0, 3.0, 5.0, 8.0, 13.0)]
    for r in records:
        r["features"][0] = 1.0
        r["seconds"] = float(np.dot(true, r["features"]))
    coefficients, quality = cal.fit(records, overhead=0.0)
    assert quality["conv"]["n"] == 6 and quality["conv"]["median_rel_error"] < 1e-6
    assert quality["depthwise"] == {"n": 0} and not coefficients["depthwise"].any()
    # an int8 kind never measured is left out (zeros would price int8 kernels free)
    assert not set(lat.INT8_KINDS) & set(coefficients)


def test_int8_kinds_are_fitted_in_the_time_base_of_the_float_prices():
    """An int8 kernel timed beside its float twin keeps its measured int8 / float ratio against the
    reference's float price: here the machine runs the twin twice as fast as the reference prices it,
    so the int8 times count double."""
    reference = lat.LatencyModel({k: np.array([0.0, 1e-10, 0, 0, 0, 0]) for k in lat.KINDS})
    twin = lat.conv_work(1, 16, 32, (3, 3), (8, 8), (8, 8))
    records = [{"kind": "int8_conv", "features": [1.0, m, 0, 0, 0, 0], "seconds": m * 0.4e-10,
                "twin_kind": twin.kind, "twin_features": list(twin.features),
                "twin_seconds": reference.time(twin) / 2} for m in (1e6, 2e6, 4e6, 8e6)]
    coefficients, quality = cal.fit(records, overhead=0.0, reference=reference)
    assert coefficients["int8_conv"][1] == pytest.approx(0.8e-10, rel=1e-6) and quality["int8_conv"]["n"] == 4
    # without a twin a record is taken as measured
    plain = [{k: v for k, v in r.items() if not k.startswith("twin")} for r in records]
    coefficients, _ = cal.fit(plain, overhead=0.0, reference=reference)
    assert coefficients["int8_conv"][1] == pytest.approx(0.4e-10, rel=1e-6)


def test_kernel_set_fills_every_kind_the_path_can_run():
    blocked = cal.kernel_set(lat.Nchwc(8, 4), seed=0, scale=0.01, max_macs=2e7)
    kinds = [k.kind for k in blocked]
    assert all(kinds.count(kind) == 3 for kind in lat.KINDS + lat.INT8_KINDS[:-1])  # convert: from the int8 ones
    # every int8 kernel comes with its float twin, priced on the path
    assert all(k.twin is not None and k.twin_work is not None for k in blocked if k.kind.startswith("int8_"))
    again = cal.kernel_set(lat.Nchwc(8, 4), seed=0, scale=0.01, max_macs=2e7)
    assert [k.config for k in again] == [k.config for k in blocked]  # seeded
    # without NCHWc kernels (ARM64 release builds) every conv is im2col: the blocked kinds stay empty
    flat = [k.kind for k in cal.kernel_set(lat.Nchwc(1, 1), seed=0, scale=0.01, max_macs=2e7, tries=2000)]
    assert not {"pointwise", "conv", "depthwise"} & set(flat) and flat.count("im2col") == 3


def test_quick_calibration_is_cached_and_used_by_auto(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(targets.ENV)
    assert cli.main(["calibrate", "--quick"]) == 0
    out = capsys.readouterr().out
    auto = targets.resolve("auto")
    cached = tmp_path / "cache" / "graphopt" / f"latency-{auto.name}.json"
    assert f"wrote {cached}" in out.replace("\n", "")
    meta = json.loads(cached.read_text())["meta"]
    assert meta["kind"] == auto.name and meta["onnxruntime"] and meta["scale"] == 0.01
    assert meta["fit"]["gemm"]["n"] >= 3
    # the int8 kernels and their conversions are measured with the rest: the quantize pass prices with them
    assert all(meta["fit"][k]["n"] >= 3 for k in lat.INT8_KINDS) and auto.latency.has_int8
    assert (auto.profile, auto.profile_path) == ("calibrated", str(cached))
    assert auto.latency.coefficients["gemm"].tolist() == json.loads(cached.read_text())["coefficients"]["gemm"]

    # ... and a run prices with it: prune's time price names the profile, the report says where it came from
    report = tmp_path / "r.json"
    code = cli.main(["optimize", str(MODELS / "lenet5.onnx"), "--preset", "prune", "--target-macs", "0.7",
                     "--option", "prune_filters.latency=time", "--no-verify", "-q", "-o", str(tmp_path / "o.onnx"),
                     "--report", str(report)])
    assert code == 0
    data = json.loads(report.read_text())
    profile = data["target_cpu"]["profile"]
    assert (profile["source"], profile["path"]) == ("calibrated", str(cached))
    prune = next(p for p in data["passes"] if p["name"] == "prune_filters")["stats"]
    assert str(cached) in prune["allocation"]["latency"]["profile"]


@pytest.mark.parametrize("args,message", [
    (["--scale", "0"], "--scale must be a fraction in (0, 1]"),
    (["--quick", "-o", "/no/such/folder/p.json"], "output folder does not exist"),
])
def test_calibrate_refuses_bad_input_in_one_line(args, message, capsys):
    assert cli.main(["calibrate", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_progress_bar_counts_kernels_on_a_terminal():
    import io

    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    with cli._progress_bar(console, quiet=False) as advance:
        for done in range(4):
            advance(done, 3, "conv")
    assert "calibrating conv" in buffer.getvalue() and "3/3" in buffer.getvalue()
    with cli._progress_bar(console, quiet=True) as silent:  # -q: no bar
        silent(1, 3, "conv")
