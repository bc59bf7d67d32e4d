"""The reader's side of the budget policy: presence info -> policy inputs -> a plan per receiver."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from edgebus import DEFAULT_ROTATE_BYTES_PER_S, PeerInfo, PolicyConfig, RateQualityTable
from nodes import reader_policy
from nodes._errors import AskError
from nodes.bench.rate_quality import shipped_table_path
from nodes.reader_policy import (
    Document,
    PlanChooser,
    budget_of,
    parse_override,
    receiver_view,
)
from qkv import Budget

MBIT = 1e6 / 8
TABLE = RateQualityTable.load(shipped_table_path("smollm2-135m-instruct"))
FIXED = Budget(bits=4)
DOC_4K = Document(tokens=4096, text_bytes=16_000, sender_headroom=4 << 30, kv_bytes_per_token=23_040)


def peer(
    name: str = "answerer",
    *,
    roles: tuple[str, ...] = ("answerer",),
    bw_mbit: float | None = 100.0,
    **info: Any,
) -> PeerInfo:
    """A receiver as the reader's bus reports it: SmolLM2 on the idle dev box (490 tokens/s at 4K)."""
    advertised: dict[str, Any] = {
        "fingerprint": "fp",
        "headroom": 2 << 30,
        "prefill_tps": 490.0,
        "prefill_q": 0.0,
        "decode_bps": 3e8,
        "links": {"reader": {"bw": (bw_mbit or 0) * MBIT, "rtt": 0.001, "n": 3 if bw_mbit else 0}},
    }
    advertised.update(info)
    return PeerInfo(name, roles, MappingProxyType(advertised), 0.1)


def chooser(**settings: Any) -> PlanChooser:
    config = PolicyConfig(**{"quality_floor": 0.9, **settings})
    return PlanChooser((TABLE, config), fixed=FIXED, assumed_bandwidth_bps=10 * MBIT, name="reader")


def test_the_link_decides_text_split_or_card() -> None:
    c = chooser()
    kinds = {}
    for mbit in (1, 20, 1000):
        (choice,) = c.choose([peer(f"a{mbit}", bw_mbit=mbit)], DOC_4K, fingerprint="fp")
        kinds[mbit] = choice.plan.kind
        assert choice.decision["bandwidth"] == "measured"
        assert choice.decision["inputs"]["bandwidth_bytes_per_s"] == mbit * MBIT
    # 1 Mbit/s: 8.4 s of prefill beats any card; 20 Mbit/s: the head prefills while the tail crosses;
    # 1 Gbit/s: a whole card is there in a fraction of a second.
    assert kinds == {1: "text", 20: "split", 1000: "card"}


def test_a_split_plan_carries_the_balanced_head_and_the_tables_budget() -> None:
    (choice,) = chooser().choose([peer(bw_mbit=20)], DOC_4K, fingerprint="fp")
    assert choice.plan.kind == "split"
    assert 64 <= choice.plan.head_tokens <= 4096 - 64
    assert choice.plan.head_tokens == choice.decision["head_tokens"]
    assert choice.plan.budget == budget_of_condition(choice.decision["condition"])


def budget_of_condition(condition: str) -> Budget:
    from nodes.bench.conditions import parse_condition

    budget = parse_condition(condition).budget
    assert budget is not None
    return budget


def test_before_any_measurement_the_assumed_link_is_used_and_said() -> None:
    (choice,) = chooser().choose([peer(bw_mbit=None)], DOC_4K, fingerprint="fp")
    assert choice.decision["bandwidth"] == "assumed"
    assert choice.decision["inputs"]["bandwidth_bytes_per_s"] == 10 * MBIT


def test_a_relay_is_never_sent_a_split() -> None:
    c = chooser()
    (answerer,) = c.choose([peer(bw_mbit=20)], DOC_4K, fingerprint="fp")
    (relay,) = c.choose([peer("relay", roles=("relay",), bw_mbit=20)], DOC_4K, fingerprint="fp")
    assert answerer.plan.kind == "split"
    assert relay.plan.kind != "split"


def test_each_receiver_gets_its_own_decision_and_other_models_text() -> None:
    peers = [peer("far", bw_mbit=1), peer("near", bw_mbit=1000), peer("other", fingerprint="gemma")]
    choices = chooser().choose(peers, DOC_4K, fingerprint="fp")
    assert {c.receiver: c.plan.kind for c in choices} == {"far": "text", "near": "card", "other": "text"}
    # Outside the table (measured for this model) and without a calibration: text, and it says why.
    other = next(c for c in choices if c.receiver == "other")
    assert "no calibration" in other.decision["reason"]
    assert other.decision["policy"] is False


def test_no_receiver_means_the_fixed_budget_for_whoever_joins() -> None:
    (choice,) = chooser().choose([peer("client-1", roles=())], DOC_4K, fingerprint="fp")
    assert choice.receiver == "*"
    assert (choice.plan.kind, choice.plan.budget) == ("card", FIXED)
    assert "no live receiver" in choice.decision["reason"]


@pytest.mark.parametrize(
    ("info", "field"),
    [
        ({"headroom": None}, "headroom"),
        ({"prefill_tps": -1}, "prefill_tps"),
        ({"prefill_tps": 0}, "prefill_tokens_per_s"),  # the policy refuses a zero speed
        ({"decode_bps": "fast"}, "decode_bps"),
        ({"rotate_bps": -5}, "rotate_bps"),
        ({"links": {"reader": [1, 2]}}, "links"),
        ({"links": {"reader": {"bw": float("nan"), "n": 1}}}, "bw"),
        # Finite, but no real headroom: the decision record carrying it could not be packed.
        ({"headroom": 1e20}, "headroom"),
    ],
)
def test_unusable_presence_info_falls_back_to_the_fixed_budget(info: dict[str, Any], field: str) -> None:
    (choice,) = chooser().choose([peer(**info)], DOC_4K, fingerprint="fp")
    assert (choice.plan.kind, choice.plan.budget) == ("card", FIXED)
    assert field in choice.decision["reason"]
    assert choice.decision["policy"] is False


def test_receiver_view_reads_the_advertised_fields() -> None:
    view = receiver_view(peer(bw_mbit=50, prefill_q=1e-7), "reader")
    assert (view.bandwidth_bps, view.rtt_s, view.prefill_q) == (50 * MBIT, 0.001, 1e-7)
    assert receiver_view(peer(bw_mbit=None), "reader").bandwidth_bps is None
    # A node from before rotated cards advertises no rotation speed: the policy's default stands in.
    assert receiver_view(peer(), "reader").rotate_bps == DEFAULT_ROTATE_BYTES_PER_S
    assert receiver_view(peer(rotate_bps=7e8), "reader").rotate_bps == 7e8


def test_hysteresis_is_kept_per_receiver() -> None:
    c = chooser()
    assert c.choose([peer("a", bw_mbit=1000)], DOC_4K, fingerprint="fp")[0].plan.kind == "card"
    # The fastest link at which a fresh receiver already gets a split (a whole card no longer clearly faster).
    mbit = next(
        m
        for m in range(1000, 20, -5)
        if chooser().choose([peer(bw_mbit=m)], DOC_4K, fingerprint="fp")[0].plan.kind == "split"
    )
    fresh = c.choose([peer("b", bw_mbit=mbit)], DOC_4K, fingerprint="fp")[0]
    kept = c.choose([peer("a", bw_mbit=mbit)], DOC_4K, fingerprint="fp")[0]
    assert fresh.plan.kind == "split"
    assert kept.plan.kind == "card"  # receiver a had a card: not worth switching by the margin
    assert "kept previous choice" in kept.decision["reason"]


def test_hysteresis_forgets_the_least_recently_decided_receivers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader_policy, "MAX_REMEMBERED_RECEIVERS", 2)
    c = chooser()
    for name in ("a", "b", "c"):
        c.choose([peer(name, bw_mbit=1000)], DOC_4K, fingerprint="fp")
    mbit = next(
        m
        for m in range(1000, 20, -5)
        if chooser().choose([peer(bw_mbit=m)], DOC_4K, fingerprint="fp")[0].plan.kind == "split"
    )
    assert c.choose([peer("c", bw_mbit=mbit)], DOC_4K, fingerprint="fp")[0].plan.kind == "card"  # kept
    assert c.choose([peer("a", bw_mbit=mbit)], DOC_4K, fingerprint="fp")[0].plan.kind == "split"  # forgotten


# ---------------------------------------------------------------- read-request overrides


def test_overrides_name_a_fixed_alternative() -> None:
    assert parse_override({"text": "x"}, FIXED) is None
    text = parse_override({"representation": "text"}, FIXED)
    assert text is not None
    assert text.kind == "text"
    card = parse_override({"representation": "card", "budget": {"bits": 2, "keep": 0.5}}, FIXED)
    assert card is not None
    assert card.budget == Budget(bits=2, keep=0.5)
    split = parse_override({"representation": "split", "head_tokens": 100}, FIXED)
    assert split is not None
    assert (split.budget, split.head_tokens) == (FIXED, 100)
    auto = parse_override({"representation": "split"}, FIXED)
    assert auto is not None
    assert auto.head_tokens is None


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"representation": "pdf"}, "representation"),
        ({"budget": {"bits": 4}}, "go with"),
        ({"representation": "card", "budget": [4]}, "budget"),
        ({"representation": "card", "budget": {"colour": 1}}, "colour"),
        ({"representation": "card", "budget": {"bits": 5.5}}, "budget"),
        ({"representation": "split", "head_tokens": 0}, "head_tokens"),
        ({"representation": "split", "head_tokens": True}, "head_tokens"),
        ({"representation": "split", "budget": {"layers": 0.5}}, "layer"),
    ],
)
def test_malformed_overrides_are_refused_by_name(body: dict[str, Any], needle: str) -> None:
    with pytest.raises(AskError, match=needle):
        parse_override(body, FIXED)


def test_a_split_override_without_a_head_takes_the_policys_balanced_head() -> None:
    c = chooser()
    policy = c.choose([peer(bw_mbit=20)], DOC_4K, fingerprint="fp")[0]
    assert policy.plan.kind == "split"
    assert policy.plan.budget is not None
    override = parse_override({"representation": "split", "budget": policy.plan.budget.to_dict()}, FIXED)
    assert override is not None
    choice = c.resolve(override, [peer(bw_mbit=20)], DOC_4K, fingerprint="fp")
    assert choice.plan.head_tokens == policy.plan.head_tokens
    # The record says what the balance rested on: both sides' predicted seconds and the link used.
    predicted = choice.decision["predicted"]
    assert predicted["bandwidth"] == "measured"
    assert predicted["bandwidth_mbit"] == pytest.approx(20, rel=1e-3)
    assert predicted["head_side_s"] == pytest.approx(predicted["tail_side_s"], rel=0.02)
    with pytest.raises(AskError, match="live receiver"):
        c.resolve(override, [], DOC_4K, fingerprint="fp")


def test_a_split_override_is_balanced_with_the_point_of_its_own_budget() -> None:
    from edgebus import RateQualityPoint

    def point(condition: str, bytes_per_token: float) -> RateQualityPoint:
        return RateQualityPoint(representation="card", bits=3, keep=1, layers=1, quality=0.93,
                                bytes_per_token=bytes_per_token, condition=condition)  # fmt: skip

    table = RateQualityTable(points=(point("kv-3", 5822.6), point("uniform-3+g64", 5102.6)))
    settings = PolicyConfig(quality_floor=0.9)
    c = PlanChooser((table, settings), fixed=FIXED, assumed_bandwidth_bps=MBIT, name="reader")
    heads = {}
    for group in (32, 64):
        override = parse_override(
            {"representation": "split", "budget": {"bits": 3, "group_size": group}}, FIXED
        )
        assert override is not None
        heads[group] = c.resolve(override, [peer(bw_mbit=20)], DOC_4K, fingerprint="fp").plan.head_tokens
    # A smaller tail per token crosses the link sooner: the head that balances it is shorter.
    assert heads[64] < heads[32]


def test_budget_of_a_decision_without_condition_uses_its_fields(tmp_path: Path) -> None:
    c = chooser()
    (choice,) = c.choose([peer(bw_mbit=1000)], DOC_4K, fingerprint="fp")
    assert choice.plan.budget is not None
    assert choice.plan.budget.bits == choice.decision["bits"]
    from edgebus import Decision, PolicyInputs

    inputs = PolicyInputs(**choice.decision["inputs"])
    bare = Decision(representation="card", bits=3.0, keep=1.0, layers=1.0, facts=False, predicted_ttft_s=1,
                    predicted_quality=1, wire_bytes=1, reason="", inputs=inputs)  # fmt: skip
    assert budget_of(bare) == Budget(bits=3)
