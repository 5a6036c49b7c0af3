"""Outside test suite: every ONNX backend node test that onnxruntime can run survives load -> IR -> export.

The cases come from the generators the onnx package ships (``onnx.backend.test.case.node``): about
1,900 small models with inputs, built in memory at test time (nothing is committed). For each case:

1. The original model is run by onnxruntime with its graph optimizations off. A case onnxruntime
   rejects or fails on (an unreleased opset, an op or type without a CPU kernel, a preview domain...)
   is out of scope: it is counted, with the reason; its proto must still round-trip exactly.
2. The model goes through the IR (:func:`graphopt.core.onnx_io.round_trip`).
3. The exported ModelProto must serialize to exactly the original's bytes, and onnxruntime must give
   bitwise-identical outputs on it (same dtype, shape and bits; NaN equals NaN; sequences and optionals
   compared element by element).

A case that cannot meet this for a sound reason goes into :data:`EXPECTED_FAILURES` with the reason;
an entry that starts passing fails the sweep, so the table never goes stale.

onnx 1.23 stamps some of these models with IR version 14, and onnxruntime 1.31 reads at most 13:
such originals are lowered to 13 before both runs (the ops and types they use exist in IR 13).
"""

from __future__ import annotations

import collections
import ctypes
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphopt.core.onnx_io import round_trip

ort = pytest.importorskip("onnxruntime")

ORT_MAX_IR_VERSION = 13

# name -> why the case cannot round-trip identically. Empty: every runnable case passes.
EXPECTED_FAILURES: dict[str, str] = {}

# Element types onnxruntime's Python ``run`` cannot turn into numpy arrays; these outputs are read raw.
_NO_NUMPY_TYPES = {
    onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ,
    onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E5M2FNUZ, onnx.TensorProto.UINT4, onnx.TensorProto.INT4,
    onnx.TensorProto.FLOAT4E2M1, onnx.TensorProto.FLOAT8E8M0, onnx.TensorProto.UINT2, onnx.TensorProto.INT2,
}


@dataclass
class SweepResult:
    generated: int = 0
    runnable: int = 0
    passed: int = 0
    out_of_scope_exact: int = 0
    out_of_scope: collections.Counter = field(default_factory=collections.Counter)
    failures: dict[str, str] = field(default_factory=dict)
    expected: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"ONNX backend node sweep ({self.seconds:.1f} s): {self.generated} cases generated, "
            f"{self.runnable} runnable by onnxruntime {ort.__version__}, {self.passed} round-tripped identically, "
            f"{len(self.failures)} failed, {len(self.expected)} expected failures",
            f"out of scope ({self.generated - self.runnable} cases onnxruntime rejects or fails on; "
            f"{self.out_of_scope_exact} of them still round-trip to an identical proto):",
        ]
        lines += [f"  {n:4d}  {reason}" for reason, n in self.out_of_scope.most_common()]
        lines += [f"FAILED {name}: {why}" for name, why in sorted(self.failures.items())]
        return "\n".join(lines)


def _session(model: onnx.ModelProto):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # some cases warn on purpose (e.g. out-of-range casts)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feed(data: Any) -> Any:
    """One test input as onnxruntime takes it: numpy, a list (sequence), None (empty optional) or OrtValue."""
    if isinstance(data, onnx.TensorProto):
        data = numpy_helper.to_array(data)
    if data is None:
        return None
    if isinstance(data, list):
        return [_feed(item) for item in data]
    data = np.asarray(data)
    elem_type = onnx.helper.np_dtype_to_tensor_dtype(data.dtype)
    if elem_type in _NO_NUMPY_TYPES:
        # ml_dtypes arrays (bfloat16, float8...): onnxruntime reads the bits as unsigned ints of that width.
        raw = np.ascontiguousarray(data).view(f"u{data.itemsize}")
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, elem_type)
    return data


def _raw(value) -> tuple[str, tuple[int, ...], bytes]:
    """An OrtValue tensor as (ONNX type, shape, bytes), for element types numpy does not have."""
    size = value.tensor_size_in_bytes()
    return value.data_type(), tuple(value.shape()), ctypes.string_at(value.data_ptr(), size) if size else b""


def _run(model: onnx.ModelProto, inputs: Sequence[Any]) -> list[Any]:
    session = _session(model)
    feeds = {vi.name: _feed(x) for vi, x in zip(model.graph.input, inputs)}
    raw_outputs = any(vi.type.tensor_type.elem_type in _NO_NUMPY_TYPES for vi in model.graph.output)
    if not raw_outputs:
        return session.run(None, feeds)
    feeds = {name: x if isinstance(x, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(x)
             for name, x in feeds.items()}
    return [_raw(v) for v in session.run_with_ort_values(None, feeds)]


def _identical(a: Any, b: Any, where: str = "output") -> str | None:
    """None when ``a`` and ``b`` are the same bits (NaN == NaN), else a one-line description of the difference."""
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if a is None:
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            diff = _identical(x, y, f"{where}[{i}]")
            if diff:
                return diff
        return None
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{where}: keys differ"
        for k in a:
            diff = _identical(a[k], b[k], f"{where}[{k!r}]")
            if diff:
                return diff
        return None
    if isinstance(a, (bytes, str, int)):
        return None if a == b else f"{where}: {a!r:.60} vs {b!r:.60}"
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    if a.dtype.kind == "O":
        return None if a.tolist() == b.tolist() else f"{where}: object arrays differ"
    bits_a = np.ascontiguousarray(a).view(np.uint8).reshape(a.size, a.itemsize) if a.size else a
    bits_b = np.ascontiguousarray(b).view(np.uint8).reshape(b.size, b.itemsize) if b.size else b
    differs = np.any(bits_a != bits_b, axis=-1) if a.size else np.zeros(0, bool)
    if not differs.any():
        return None
    if a.dtype.kind in "fc" and np.all(np.isnan(a.reshape(-1)[differs]) & np.isnan(b.reshape(-1)[differs])):
        return None  # NaNs with different payloads are the same value
    return f"{where}: {int(differs.sum())} of {a.size} elements differ"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0]


def _out_of_scope_reason(exc: BaseException) -> str:
    """A short, groupable reason why onnxruntime refuses a case (no node names, no source paths)."""
    text = _first_line(exc)
    for marker, reason in [
        ("only *guarantees* support for models stamped with official released onnx opset",
         "opset not released for onnxruntime (under development)"),
        ("Could not find an implementation for", "no CPU kernel for this op/version/type"),
        ("Failed to find kernel for", "no CPU kernel for this op/version/type"),
        ("is not a registered function/op", "op not registered (preview/training domain)"),
        ("No corresponding Numpy type", "element type not exchangeable with numpy"),
        ("can't be converted to MLDataType", "input element type not accepted by onnxruntime's Python API"),
    ]:
        if marker in str(exc):
            return reason
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : |/onnxruntime_src/\S+ ", "", text)
    text = re.sub(r"onnxruntime::\S+\(.*?\) ", "", text)  # C++ signatures
    return f"{type(exc).__name__}: {text[:120]}"


def _proto_difference(original: onnx.ModelProto, exported: onnx.ModelProto) -> str:
    import difflib

    from google.protobuf import text_format
    a = text_format.MessageToString(original).splitlines()
    b = text_format.MessageToString(exported).splitlines()
    changed = [line for line in difflib.unified_diff(a, b, lineterm="", n=0) if line[:1] in "+-"
               and not line.startswith(("+++", "---"))]
    return "exported proto differs: " + (" | ".join(changed[:6]) or "same text, different bytes")


def _check_case(case, result: SweepResult) -> None:
    original = onnx.ModelProto()
    original.CopyFrom(case.model)  # the generators' list is module-global; never mutate it
    if original.ir_version > ORT_MAX_IR_VERSION:
        original.ir_version = ORT_MAX_IR_VERSION
    inputs = case.data_sets[0][0]
    try:
        expected = _run(original, inputs)
    except Exception as exc:  # noqa: BLE001 - anything onnxruntime refuses is out of scope
        result.out_of_scope[_out_of_scope_reason(exc)] += 1
        # Nothing to run, but the proto must still come back exactly.
        try:
            exact = (round_trip(original).SerializeToString(deterministic=True)
                     == original.SerializeToString(deterministic=True))
        except Exception as exc:  # noqa: BLE001
            exact, why = False, f"round trip raised {type(exc).__name__}: {_first_line(exc)}"
        else:
            why = "exported proto differs"
        if exact:
            result.out_of_scope_exact += 1
        else:
            result.failures[case.name] = f"(out of scope for onnxruntime) {why}"
        return
    result.runnable += 1
    problems = []
    try:
        exported = round_trip(original)
    except Exception as exc:  # noqa: BLE001 - collect every failure, report them all at the end
        problems.append(f"round trip raised {type(exc).__name__}: {_first_line(exc)}")
    else:
        if exported.SerializeToString(deterministic=True) != original.SerializeToString(deterministic=True):
            problems.append(_proto_difference(original, exported))
        try:
            actual = _run(exported, inputs)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"onnxruntime fails on the export: {_first_line(exc)}")
        else:
            difference = _identical(expected, actual)
            if difference:
                problems.append(f"outputs differ: {difference}")
    problem = "; ".join(problems) or None
    if case.name in EXPECTED_FAILURES:
        if problem is None:
            result.failures[case.name] = "listed in EXPECTED_FAILURES but passes now: remove the entry"
        else:
            result.expected[case.name] = problem
    elif problem is None:
        result.passed += 1
    else:
        result.failures[case.name] = problem


def _generate_cases() -> list:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators compute expected outputs with 1/0, log(0)...
        return list(collect_testcases())


def run_sweep() -> SweepResult:
    start = time.perf_counter()
    cases = _generate_cases()
    result = SweepResult(generated=len(cases))
    for case in cases:
        _check_case(case, result)
    result.seconds = time.perf_counter() - start
    return result


def test_identical_helper_is_strict():
    nan_a = np.array([np.nan, 1.0], np.float32)
    nan_b = np.array([np.nan, 1.0], np.float32).view(np.uint32)
    nan_b[0] |= 1  # another NaN payload
    assert _identical([nan_a], [nan_b.view(np.float32)]) is None
    assert _identical(np.array([0.0], np.float32), np.array([-0.0], np.float32))  # bits differ
    assert _identical(np.array([1], np.int32), np.array([1], np.int64))
    assert _identical(np.zeros((2, 1)), np.zeros((1, 2)))
    assert _identical([np.zeros(1)], [np.zeros(1), np.zeros(1)])
    assert _identical(None, np.zeros(1))
    assert _identical(np.array(["a"], object), np.array(["b"], object))
    assert _identical(("FLOAT8E4M3FN", (2,), b"\x01\x02"), ("FLOAT8E4M3FN", (2,), b"\x01\x03"))
    assert _identical(np.zeros(0, np.float32), np.zeros(0, np.float32)) is None


def test_node_sweep_round_trips_exactly():
    result = run_sweep()
    print()
    print(result.summary())
    assert result.generated > 1500, "the onnx backend node generators produced too few cases"
    assert result.runnable > 1000, "onnxruntime ran too few cases: is the harness feeding inputs correctly?"
    assert not result.failures, result.summary()
    assert result.passed + len(result.expected) == result.runnable
    assert result.out_of_scope_exact == result.generated - result.runnable
