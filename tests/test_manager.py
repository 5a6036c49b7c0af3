"""The pass manager: registry, options, sequences, fixed points, records, debug checks, dumps."""

from __future__ import annotations

import re

import numpy as np
import pytest
from onnx import helper, numpy_helper

from graphopt.core import onnx_io
from graphopt.core.errors import OptionError
from graphopt.core.ir import Model
from graphopt.core.manager import (
    FixedPoint,
    Option,
    Pass,
    PassContext,
    PassError,
    PassResult,
    Sequential,
    build_pipeline,
    get_pass,
    parse_options,
    registered,
    run_pipeline,
)
from graphopt.measure.analysis import budget_cost
from tests.util import make_model, tensor


def relu_chain(n: int = 3) -> Model:
    nodes = [helper.make_node("Relu", [f"x{i}"], [f"x{i + 1}"]) for i in range(n)]
    proto = make_model(nodes, [tensor("x0", [1, 4])], [tensor(f"x{n}", [1, 4])])
    return onnx_io.from_proto(proto)


class Counting(Pass):
    """Claims a change for its first ``budget`` runs."""

    name = "counting"
    summary = "test pass"
    options = {"budget": Option(2, "runs that claim a change", int), "label": Option("a", "x", str, ("a", "b"))}
    renamed = {"max_changes": "budget"}

    def __init__(self) -> None:
        self.calls = 0

    def run(self, model, ctx):
        self.calls += 1
        return PassResult(self.calls <= self.opt(ctx, "budget"), {"call": self.calls})


class Exploding(Pass):
    name = "exploding"
    summary = "raises"

    def run(self, model, ctx):
        raise ValueError("boom")


class Corrupting(Pass):
    name = "corrupting"
    summary = "breaks an invariant"

    def run(self, model, ctx):
        node = model.graph.toposort()[0]
        node.inputs.append(node.inputs[0])  # a list entry without its edge
        return PassResult(True)


def test_registry_has_cleanup_passes_and_lossless_preset():
    from graphopt.passes.presets import LOSSLESS
    assert {"dead_code", "identity"} <= set(registered())
    pipeline = build_pipeline("lossless")
    assert [p.name for p in pipeline.leaves()] == LOSSLESS and pipeline.lossless
    assert LOSSLESS[-1] == "dead_code"  # every round ends with a clean graph


def test_unknown_pass_and_preset_are_option_errors():
    with pytest.raises(OptionError, match="unknown pass 'nope'"):
        get_pass("nope")
    with pytest.raises(OptionError, match="unknown preset"):
        build_pipeline("nope")
    with pytest.raises(OptionError, match="not both"):
        build_pipeline("lossless", ["dead_code"])


def test_parse_options_types_and_errors():
    pipeline = Sequential([Counting()])
    assert parse_options(["counting.budget=5", "counting.label=b"], pipeline) == {"counting": {"budget": 5, "label": "b"}}
    for bad, message in [("counting.budget=x", "expected int"), ("counting.label=c", "not one of"),
                         ("counting.nope=1", "has no option 'nope'"), ("ghost.k=1", "unknown pass 'ghost'"),
                         ("dead_code.k=1", "not in this pipeline"), ("budget=1", "expected pass.key=value"),
                         ("counting.max_changes=3", "counting.max_changes is now counting.budget")]:
        with pytest.raises(OptionError, match=message):
            parse_options([bad], pipeline)


def test_bool_options_parse_strictly():
    opt = Option(False, "flag", bool)
    assert opt.parse("yes", "p.k") is True and opt.parse("0", "p.k") is False
    with pytest.raises(OptionError):
        opt.parse("maybe", "p.k")


def test_numeric_options_are_bounded():
    count = Option(8, "n", int, low=1)
    assert count.parse("1", "p.n") == 1
    fraction = Option(0.5, "f", float, low=0, high=1, low_open=True)
    assert fraction.parse("1", "p.f") == 1.0
    for opt, text, shown in [(count, "0", "[1, inf)"), (fraction, "0", "(0, 1]"), (fraction, "1.5", "(0, 1]"),
                             (fraction, "nan", "(0, 1]")]:
        with pytest.raises(OptionError, match=rf"option p\.\w: must be in {re.escape(shown)}"):
            opt.parse(text, "p." + opt.help)


def test_every_registered_numeric_option_declares_bounds_its_default_meets():
    for name, cls in registered().items():
        for key, opt in getattr(cls, "options", {}).items():
            if opt.type in (int, float):
                bounded = opt.low is not None or opt.high is not None or opt.choices is not None
                assert bounded, f"{name}.{key} has no bounds"
                opt.check(opt.default, f"{name}.{key}")


def test_fixed_point_stops_when_a_round_changes_nothing():
    counting = Counting()
    ctx = PassContext(options={"counting": {"budget": 2}})
    changed, records = run_pipeline(FixedPoint([counting], max_steps=10), relu_chain(), ctx)
    assert changed and counting.calls == 3
    leaf = [r for r in records if not r.group]
    assert [r.changed for r in leaf] == [True, True, False]
    group = [r for r in records if r.group]
    assert group[0].stats == {"rounds": 3, "converged": True}


def test_fixed_point_step_limit_is_reported():
    counting = Counting()
    ctx = PassContext(options={"counting": {"budget": 100}})
    _, records = run_pipeline(FixedPoint([counting], max_steps=4, name="loop"), relu_chain(), ctx)
    assert counting.calls == 4
    group = next(r for r in records if r.group)
    assert group.name == "loop" and group.stats["converged"] is False and "step limit" in group.stats["note"]


def test_records_have_timing_and_stats():
    _, records = run_pipeline(Sequential([Counting(), get_pass("dead_code")]), relu_chain(), PassContext())
    assert [r.name for r in records] == ["counting", "dead_code"]
    assert all(r.seconds >= 0 for r in records)
    assert records[0].to_dict()["stats"] == {"call": 1}


def test_pass_error_names_the_pass_and_its_predecessors():
    with pytest.raises(PassError, match=r"pass exploding failed: ValueError: boom \(passes run before it: counting\)"):
        run_pipeline(Sequential([Counting(), Exploding()]), relu_chain(), PassContext())


def test_debug_mode_catches_a_broken_invariant():
    with pytest.raises(PassError, match="after pass corrupting"):
        run_pipeline(Sequential([Corrupting()]), relu_chain(), PassContext(debug=True))
    # without debug the corruption goes unnoticed by the manager
    run_pipeline(Sequential([Corrupting()]), relu_chain(), PassContext(debug=False))


def test_dump_dir_gets_one_model_per_pass(tmp_path):
    run_pipeline(Sequential([Counting(), get_pass("dead_code")]), relu_chain(), PassContext(dump_dir=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["001_counting.onnx", "002_dead_code.onnx"]
    assert len(onnx_io.load(tmp_path / "002_dead_code.onnx").graph) == 3


def test_rng_is_per_pass_and_seeded():
    a, b = PassContext(seed=7), PassContext(seed=7)
    assert np.array_equal(a.rng("x").random(4), b.rng("x").random(4))
    assert not np.array_equal(a.rng("x").random(4), a.rng("y").random(4))
    assert not np.array_equal(a.rng("x").random(4), PassContext(seed=8).rng("x").random(4))


class DropsAHalfLayer(Pass):
    """Stands in for a cleanup that changes the cost before a lossy pass reads the budget."""

    name = "drops_a_layer"
    summary = "test pass"

    def run(self, model, ctx):
        graph = model.graph
        gemm = next(n for n in graph.nodes if n.op_type == "Gemm")
        graph.set_input(gemm, 1, graph.add_initializer(np.ones((4, 2), np.float32), "narrow"))
        return PassResult(True)


def _gemm_model() -> Model:
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"])]
    proto = make_model(nodes, [tensor("x", [1, 4])], [tensor("y", [1, 8])],
                       [numpy_helper.from_array(np.ones((4, 8), np.float32), "w")])
    return onnx_io.from_proto(proto)


def test_budgets_are_fractions_of_the_pipelines_input_model():
    model = _gemm_model()
    ctx = PassContext(target_macs=0.5, measure=budget_cost)
    run_pipeline(Sequential([DropsAHalfLayer()]), model, ctx)
    assert ctx.baseline == (32, 32)  # recorded before the first pass changed the cost
    untouched = PassContext(measure=budget_cost)
    run_pipeline(Sequential([DropsAHalfLayer()]), _gemm_model(), untouched)
    assert untouched.baseline is None  # no budget, no analysis


def test_shared_option_vocabulary_means_the_same_in_every_lossy_pass():
    """An option name the lossy passes share has one type and one range everywhere it is declared."""
    from graphopt.compress.options import SHARED
    seen: dict[str, tuple] = {}
    for cls in registered().values():
        for key in SHARED & set(cls.options):
            o = cls.options[key]
            shape = (o.type, o.low, o.high, o.low_open, o.high_open)
            assert seen.setdefault(key, shape) == shape, f"{cls.name}.{key} differs from another pass's {key}"


def test_a_value_that_moved_to_another_key_is_refused_with_a_pointer():
    opt = Option(True, "re-fit or not", bool, moved_values=(("downstream", "p.scope"),))
    assert opt.parse("false", "p.refit") is False
    with pytest.raises(OptionError, match="'Downstream' is a value of p.scope now"):
        opt.parse("Downstream", "p.refit")
