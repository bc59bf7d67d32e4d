"""Budget: validation ranges and the dict round trip a card records."""

from __future__ import annotations

import pytest

from qkv._budget import Budget
from qkv._errors import CardFormatError


def test_defaults_are_a_uniform_4_bit_budget() -> None:
    budget = Budget()
    assert (budget.bits, budget.keep, budget.layers, budget.group_size) == (4.0, 1.0, 1.0, 32)
    assert not budget.evicts


def test_round_trip_through_dict() -> None:
    budget = Budget(bits=3.25, adaptive=True, keep=0.5, obf=True, facts=True, layers=0.6, group_size=64)
    data = budget.to_dict()
    assert data["bits"] == 3.25
    assert data["obf"] is True
    assert Budget.from_dict(data) == budget
    assert Budget.from_dict(Budget().to_dict()) == Budget()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep": 0.0},
        {"keep": 1.5},
        {"layers": 0.0},
        {"layers": -0.1},
        {"group_size": 0},
        {"bits": 3.5},  # a uniform budget needs a real code width
        {"bits": 9},
        {"bits": 0.5, "adaptive": True},
        {"bits": 40.0, "adaptive": True},
        {"bits": float("nan"), "adaptive": True},
        {"bits": True},
        {"obf": 1},
        {"sinks": -1},
        {"obf_rank": 0},
        {"group_size": 32.0},
    ],
)
def test_out_of_range_values_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Budget(**kwargs)  # type: ignore[arg-type]


def test_real_valued_bits_need_adaptive_or_token_mixed() -> None:
    assert Budget(bits=3.25, adaptive=True).bits == 3.25
    assert Budget(bits=2.7, token_mixed=True).bits == 2.7


def test_from_dict_names_unknown_keys() -> None:
    data = Budget().to_dict() | {"zstd": True}
    with pytest.raises(CardFormatError, match="zstd"):
        Budget.from_dict(data)


@pytest.mark.parametrize("data", [[], "bits=4", {"keep": "0.5"}, {"bits": 3.3}, {"obf": "yes"}])
def test_from_dict_refuses_malformed_input_with_a_card_error(data: object) -> None:
    with pytest.raises(CardFormatError):
        Budget.from_dict(data)
