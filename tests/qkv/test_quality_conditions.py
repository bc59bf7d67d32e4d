"""Benchmark condition names: the ``+gN`` group-size, ``+reread`` and ``+head-F`` modifiers and their byte
accounting."""

from __future__ import annotations

from typing import Any

import pytest

from edgebus import HEAD_ID_BYTES
from nodes.bench.conditions import parse_condition
from qkv import encode_split


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


def test_a_head_row_is_a_real_split_and_its_bytes_are_the_wire_bytes(tiny_lm: Any) -> None:
    from nodes.bench.datasets import QARow
    from nodes.bench.quality import _run_row

    row = QARow(
        id="r",
        context="The Denver Broncos defeated the Carolina Panthers 24-10 to win Super Bowl 50 in 2016.",
        question="Who won Super Bowl 50?",
        answers=("Denver Broncos",),
        source="test",
    )
    names = ["text", "uniform-2+g128+rot", "uniform-2+g128+rot+head-0.5", "uniform-2+g128+rot+head-0.95"]
    out = _run_row(tiny_lm, row, [parse_condition(n) for n in names], profile=None, max_new_tokens=4, kl=True)
    whole, split = out["uniform-2+g128+rot"], out["uniform-2+g128+rot+head-0.5"]
    assert out["text"]["kl"] == 0.0
    prompt = len(tiny_lm.template.split(tiny_lm.tokenizer, row.context, row.question).prefix_ids)
    head = round(0.5 * prompt)
    tail = encode_split(tiny_lm, row.context, parse_condition("uniform-2+g128+rot").budget, head_tokens=head)
    assert split["card_bytes"] == tail.card_bytes + HEAD_ID_BYTES * head
    assert split["fp16_bytes"] == whole["fp16_bytes"]  # the whole context's, as for a card
    # Nearly all of the context exact (the head): nearly the text's answer distribution.
    assert out["uniform-2+g128+rot+head-0.95"]["kl"] < 0.2 * whole["kl"]
