"""Benchmark condition names: the ``+gN`` group-size and ``+reread`` modifiers and their byte accounting."""

from __future__ import annotations

import pytest

from nodes.bench.conditions import parse_condition


def test_group_size_modifier_sets_the_budget_group() -> None:
    condition = parse_condition("uniform-2+g128+evict-0.5")
    assert condition.budget is not None
    assert (condition.budget.bits, condition.budget.group_size, condition.budget.keep) == (2, 128, 0.5)
    default = parse_condition("uniform-2", group_size=64).budget
    assert default is not None
    assert default.group_size == 64


def test_an_adaptive_base_targets_its_own_group_overhead() -> None:
    """adaptive-B stores what uniform-B stores: B bits plus 32/N for the fp16 scale and zero."""
    budget = parse_condition("adaptive-2+g128").budget
    assert budget is not None
    assert budget.adaptive
    assert budget.bits == pytest.approx(2 + 32 / 128)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("uniform-2+g64+g128", "more than one group size"),
        ("uniform-2+g0", "group_size"),
        ("uniform-2+gx", "gx"),
    ],
)
def test_bad_group_sizes_are_refused(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_condition(name)


def test_reread_modifier_picks_the_importance_source() -> None:
    assert parse_condition("uniform-4+evict-0.5").importance == "window"
    reread = parse_condition("uniform-4+evict-0.5+reread")
    assert reread.importance == "reread"
    assert reread.budget == parse_condition("uniform-4+evict-0.5").budget  # the card records the same budget


def test_head_modifier_names_the_split_head_fraction() -> None:
    condition = parse_condition("uniform-2+g128+rot+s1+head-0.47")
    assert condition.head_fraction == 0.47
    assert condition.budget == parse_condition("uniform-2+g128+rot+s1").budget  # applied per row
    assert parse_condition("uniform-2").head_fraction is None
    for bad in ("uniform-2+head-0", "uniform-2+head-1.5"):
        with pytest.raises(ValueError, match="head fraction"):
            parse_condition(bad)
