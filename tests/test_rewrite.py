"""The rule engine: application to a fixed point, refusal reasons, no stale matches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from graphopt.core import onnx_io
from graphopt.core.ir import Node
from graphopt.core.ops import const_input, is_op, producer_op, remove_dead, sole_consumer
from graphopt.core.rewrite import Match, NoMatch, Rule, RulePass, apply_rules
from tests.util import init, make_model, run, tensor


@dataclass(kw_only=True)
class NegPair(Match):
    inner: Node


class DoubleNeg(Rule):
    """Neg(Neg(x)) -> x, refused when the inner Neg has other readers."""

    name = "double_neg"
    root_ops = ("Neg",)

    def match(self, graph, node):
        inner = producer_op(graph, node.inputs[0], "Neg")
        if inner is None:
            return None if graph.producer(node.inputs[0]) is None else "input is not a Neg"
        if sole_consumer(graph, inner.outputs[0]) is not node:
            return "inner Neg has other readers"
        if not graph.can_replace(node.outputs[0], inner.inputs[0]):
            return "would rename a model output"
        return NegPair(node, inner=inner)

    def rewrite(self, graph, match):
        inner = match.inner
        graph.replace_all_uses(match.node.outputs[0], inner.inputs[0])
        remove_dead(graph, [match.node, inner])


def test_rule_applies_repeatedly_and_keeps_output_names():
    # Neg^4 collapses in two rewrites; the final output keeps its name.
    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    nodes += [helper.make_node("Neg", [f"n{i}" if i else "r"], [f"n{i + 1}"]) for i in range(4)]
    nodes += [helper.make_node("Exp", ["n4"], ["y"])]
    proto = make_model(nodes, [tensor("x", [3])], [tensor("y", [3])])
    model = onnx_io.from_proto(proto)
    stats = apply_rules(model, [DoubleNeg()])
    out = onnx_io.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    assert stats.applied == {"double_neg": 2} and stats.total == 2
    assert [n.op_type for n in out.graph.node] == ["Relu", "Exp"]
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    np.testing.assert_array_equal(run(proto, {"x": x})[0], run(out, {"x": x})[0])


def test_refusals_are_reported_with_reasons_and_examples():
    proto = make_model([helper.make_node("Neg", ["x"], ["a"], name="first"),
                        helper.make_node("Neg", ["a"], ["b"], name="second"),
                        helper.make_node("Add", ["a", "b"], ["y"])],
                       [tensor("x", [3])], [tensor("y", [3])])
    model = onnx_io.from_proto(proto)
    stats = apply_rules(model, [DoubleNeg()])
    assert stats.total == 0
    # "first" reads a graph input: not an instance of the pattern, so not reported (match returned None)
    assert stats.to_dict() == {"rewrites": 0, "applied": {}, "left_alone": [
        {"rule": "double_neg", "reason": "inner Neg has other readers", "count": 1, "examples": ["second"]}]}
    assert onnx_io.to_proto(model) == proto  # negative case: untouched


def test_output_name_refusal_when_input_feeds_output():
    proto = make_model([helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])],
                       [tensor("x", [3])], [tensor("y", [3])])
    stats = apply_rules(onnx_io.from_proto(proto), [DoubleNeg()])
    assert stats.total == 0 and stats.left.counts[("double_neg", "would rename a model output")] == 1


def test_helpers():
    proto = make_model([helper.make_node("Mul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"]),
                        helper.make_node("Relu", ["m"], ["z"])],
                       [tensor("x", [3])], [tensor("y", [3]), tensor("z", [3])], [init("w", np.ones(3, np.float32))])
    model = onnx_io.from_proto(proto)
    g = model.graph
    mul, relu, _ = g.toposort()
    assert is_op(mul, "Mul", "Add") and not is_op(mul, "Add")
    assert np.array_equal(const_input(g, mul, 1), np.ones(3)) and const_input(g, mul, 0) is None
    assert const_input(g, mul, 5) is None
    assert sole_consumer(g, mul.outputs[0]) is None  # two readers
    assert sole_consumer(g, relu.outputs[0]) is None  # a graph output
    assert producer_op(g, relu.inputs[0], "Mul") is mul and producer_op(g, relu.inputs[0], "Add") is None


def test_clone_is_independent():
    proto = make_model([helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
                        helper.make_node("Exp", ["b"], ["y"])], [tensor("x", [3])], [tensor("y", [3])])
    model = onnx_io.from_proto(proto)
    clone = model.clone()
    apply_rules(clone, [DoubleNeg()])
    assert len(clone.graph) == 1 and len(model.graph) == 3
    assert onnx_io.to_proto(model) == proto


class DoubleNegAbsentAsNoMatch(DoubleNeg):
    """The same rule, answering "absent" with a reason string (NoMatch) instead of None."""

    def match(self, graph, node):
        if producer_op(graph, node.inputs[0], "Neg") is None:
            return NoMatch("input is not a Neg")
        return super().match(graph, node)


def test_no_match_reasons_are_not_reported_as_left_alone():
    proto = make_model([helper.make_node("Neg", ["x"], ["a"], name="first"),
                        helper.make_node("Neg", ["a"], ["b"], name="second"),
                        helper.make_node("Add", ["a", "b"], ["y"])],
                       [tensor("x", [3])], [tensor("y", [3])])
    stats = apply_rules(onnx_io.from_proto(proto), [DoubleNegAbsentAsNoMatch()])
    # "first" answered NoMatch: absent, like None; "second" is a real refusal
    assert stats.to_dict()["left_alone"] == [
        {"rule": "double_neg", "reason": "inner Neg has other readers", "count": 1, "examples": ["second"]}]


class LabelledDoubleNeg(DoubleNeg):
    """The same rule, labelling where it applied (what the input of the outer pair is)."""

    def rewrite(self, graph, match):
        site = f"after {graph.producer(match.inner.inputs[0]).op_type}"
        super().rewrite(graph, match)
        return site


class DoubleNegPass(RulePass):
    name = "double_neg_pass"
    summary = "Neg(Neg(x)) -> x"

    def rules(self, model, ctx):
        return [LabelledDoubleNeg()]


def test_rule_pass_stats_count_rules_sites_and_refusals():
    from graphopt.core.manager import PassContext
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["a"]),
             helper.make_node("Neg", ["a"], ["b"]), helper.make_node("Exp", ["b"], ["c"]),
             helper.make_node("Neg", ["c"], ["d"], name="shared"), helper.make_node("Neg", ["d"], ["e"], name="outer"),
             helper.make_node("Add", ["d", "e"], ["y"])]
    proto = make_model(nodes, [tensor("x", [3])], [tensor("y", [3])])
    model = onnx_io.from_proto(proto)
    result = DoubleNegPass().run(model, PassContext())
    assert result.changed
    assert result.stats == {"rewrites": 1, "applied": {"double_neg": 1}, "sites": {"after Relu": 1},
                            "left_alone": [{"rule": "double_neg", "reason": "inner Neg has other readers",
                                            "count": 1, "examples": ["outer"]},
                                           {"rule": "double_neg", "reason": "input is not a Neg",
                                            "count": 1, "examples": ["shared"]}]}
    again = DoubleNegPass().run(model, PassContext())
    assert not again.changed and again.stats["rewrites"] == 0 and "sites" not in again.stats


def test_every_registered_rule_pass_reports_the_same_keys():
    import graphopt  # noqa: F401  (registers every pass)
    from graphopt.core.manager import PassContext, registered
    rule_passes = [cls for cls in registered().values() if issubclass(cls, RulePass)]
    assert {"simplify", "fuse_patterns", "channel_permute", "fold_batchnorm", "merge_linear", "gemm_rows",
            "horizontal_fusion", "merge_concat_convs"} <= {cls.name for cls in rule_passes}
    proto = make_model([helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])],
                       [tensor("x", [3])], [tensor("y", [3])])
    for cls in rule_passes:
        result = cls().run(onnx_io.from_proto(proto), PassContext())
        assert set(result.stats) == {"rewrites", "applied"}, (cls.name, result.stats)
