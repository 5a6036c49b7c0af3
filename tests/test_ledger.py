"""The LeftAlone ledger: counts per (rule, reason), a few examples each, sorted JSON."""

from graphopt.core.ledger import LeftAlone


def test_counts_reasons_and_keeps_a_few_examples():
    left = LeftAlone(examples=2)
    for name in ("a", "b", "c"):
        left.add("weight is shared", name, rule="fold")
    left.add("not constant", "d")
    assert len(left) == 4 and left.reasons() == {"weight is shared", "not constant"}
    assert left.to_list() == [
        {"reason": "not constant", "count": 1, "examples": ["d"]},
        {"rule": "fold", "reason": "weight is shared", "count": 3, "examples": ["a", "b"]},
    ]


def test_into_sets_left_alone_only_when_something_was_refused():
    assert LeftAlone().into({"x": 1}) == {"x": 1}
    left = LeftAlone()
    left.add("why", count=2)
    assert left.into({})["left_alone"] == [{"reason": "why", "count": 2, "examples": []}]


def test_merge_adds_counts_and_caps_examples():
    a, b = LeftAlone(examples=2), LeftAlone(examples=2)
    a.add("r", "x")
    b.add("r", "y")
    b.add("r", "z")
    a.merge(b)
    assert a.to_list() == [{"reason": "r", "count": 3, "examples": ["x", "y"]}]
