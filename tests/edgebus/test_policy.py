"""BudgetPolicy: TTFT model, constraints, deadline, hysteresis, memory-driven bit budget, table I/O."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from pathlib import Path

import pytest

from edgebus._cardstore import CardStore, CardStoreConfig
from edgebus._errors import ConfigError
from edgebus._memory import MemoryReading, ScriptedMemoryProbe
from edgebus._policy import (
    KL_QUALITY_METRIC,
    BudgetPolicy,
    Decision,
    InvalidPolicyInput,
    NoFeasibleRepresentation,
    PolicyConfig,
    PolicyInputs,
    RateQualityPoint,
    RateQualityTable,
    balanced_head,
    predict_split,
    split_quality,
)

MB = 1_000_000
KV = 23_040  # SmolLM2-135M fp16 KV bytes per token (FIELD-NOTES)
TOKENS = 1024
GBIT = 1e9 / 8  # bytes per second in one Gbit/s


def card(bits: float, bpt: float, quality: float, *, facts: bool = False) -> RateQualityPoint:
    return RateQualityPoint(
        representation="card",
        bits=bits,
        keep=1.0,
        layers=1.0,
        bytes_per_token=bpt,
        quality=quality,
        facts=facts,
    )


# Sizes per token follow the FIELD-NOTES codec sizes for 1K SmolLM2 tokens (8-bit 12.5 MB ... 2-bit 3.7 MB).
TABLE = RateQualityTable(
    model="smollm2-135m-instruct",
    points=(
        card(8, 12_207, 0.99),
        card(4, 6_445, 0.96),
        card(3, 5_078, 0.90),
        card(2, 3_613, 0.70),
        RateQualityPoint(representation="text", bits=16, keep=1, layers=1, bytes_per_token=0, quality=1.0),
    ),
)
# Receiver peak RAM per candidate: card + fp16 KV (23.6 MB). 8-bit 36.1 MB, 4-bit 30.2, 3-bit 28.8, text 23.6.


def inputs(**overrides: object) -> PolicyInputs:
    """A fast local link where the fp16 inject dominates, so the card sizes are near-ties on TTFT."""
    base: dict[str, object] = {
        "sender_headroom_bytes": 1_000 * MB,
        "receiver_headroom_bytes": 1_000 * MB,
        "bandwidth_bytes_per_s": 45 * GBIT,
        "rtt_s": 0.0001,
        "prefill_tokens_per_s": 300.0,
        "decode_bytes_per_s": 5e9,
        "context_tokens": TOKENS,
        "kv_bytes_per_token": KV,
        "text_bytes": 4 * TOKENS,
        "inject_bytes_per_s": 0.5e9,
    }
    base.update(overrides)
    return PolicyInputs(**base)  # type: ignore[arg-type]


def policy(**config: object) -> BudgetPolicy:
    """Text and whole cards only, unless ``split=True``: the split tests below add the split candidates."""
    settings: dict[str, object] = {"quality_floor": 0.85, "split": False}
    settings.update(config)
    return BudgetPolicy(TABLE, PolicyConfig(**settings))  # type: ignore[arg-type]


def run(p: BudgetPolicy, headrooms: list[float]) -> list[float]:
    """Bits chosen as the receiver's advertised headroom goes through ``headrooms`` (MB)."""
    previous: Decision | None = None
    chosen = []
    for headroom in headrooms:
        previous = p.decide(inputs(receiver_headroom_bytes=int(headroom * MB)), previous)
        chosen.append(previous.bits)
    return chosen


# ---------------------------------------------------------------- the TTFT model


def test_predicted_ttft_follows_the_documented_model() -> None:
    x = inputs(bandwidth_bytes_per_s=0.1 * GBIT, rtt_s=0.02, receiver_headroom_bytes=10**12)
    table = RateQualityTable(
        points=(
            card(4, 6_000, 0.97),
            RateQualityPoint(
                representation="hybrid", bits=4, keep=0.5, layers=0.5, bytes_per_token=3_000, quality=0.98
            ),
        )
    )
    decide = {
        rep: BudgetPolicy(
            RateQualityTable(points=tuple(p for p in table.candidates() if p.representation == rep)),
            PolicyConfig(quality_floor=0.0, split=False),
        ).decide(x)
        for rep in ("card", "hybrid")
    }
    text_only = BudgetPolicy(
        RateQualityTable(points=(TABLE.points[-1],)), PolicyConfig(quality_floor=0)
    ).decide(x)
    n = TOKENS
    expected_text = 0.02 + 4 * n / (0.1 * GBIT) + n / 300
    expected_card = 0.02 + 6_000 * n / (0.1 * GBIT) + 6_000 * n / 5e9 + KV * n / 0.5e9
    expected_hybrid = (
        0.02 + (3_000 * n + 4 * n) / (0.1 * GBIT) + 3_000 * n / 5e9 + KV * n * 0.25 / 0.5e9 + n * 0.5 / 300
    )
    assert math.isclose(text_only.predicted_ttft_s, expected_text)
    assert math.isclose(decide["card"].predicted_ttft_s, expected_card)
    assert math.isclose(decide["hybrid"].predicted_ttft_s, expected_hybrid)
    assert decide["card"].wire_bytes == 6_000 * n
    assert decide["hybrid"].wire_bytes == 3_000 * n + 4 * n


def rotated(point: RateQualityPoint, *, bpt: float, quality: float) -> RateQualityPoint:
    return dataclasses.replace(point, bytes_per_token=bpt, quality=quality, rotated=True, condition="rot")


def test_a_rotated_card_pays_for_turning_its_values_back() -> None:
    plain = card(3, 5_800, 0.93)
    rot = rotated(plain, bpt=5_790, quality=0.99)
    x = inputs(bandwidth_bytes_per_s=1 * GBIT, question_s=0.1, rotate_bytes_per_s=0.7e9)
    both = BudgetPolicy(RateQualityTable(points=(plain, rot)), PolicyConfig(quality_floor=0.9, split=False))
    by_condition = {e.point.condition: e.ttft_s for e in both.estimates(x) if e.representation == "card"}
    # Same decode and inject as the plain card for its bytes, plus the whole context's fp16 KV at 0.7 GB/s.
    plain_s = 0.0001 + 5_800 * TOKENS / GBIT + 5_800 * TOKENS / 5e9 + KV * TOKENS / 0.5e9 + 0.1
    rot_s = 0.0001 + 5_790 * TOKENS / GBIT + 5_790 * TOKENS / 5e9 + KV * TOKENS * (1 / 0.5e9 + 1 / 0.7e9)
    rot_s += 0.1
    assert math.isclose(by_condition[""], plain_s)
    assert math.isclose(by_condition["rot"], rot_s)
    # 34 ms more on 0.21 s: past the near tie, so the faster plain card wins despite its lower quality; a
    # receiver that turns values back ten times faster makes it a tie the better card wins.
    assert both.decide(x).condition == ""
    assert both.decide(dataclasses.replace(x, rotate_bytes_per_s=7e9)).condition == "rot"


def test_a_split_of_a_rotated_card_pays_for_its_tail_only() -> None:
    rot = rotated(card(4, 6_445, 0.96), bpt=6_445, quality=0.96)
    x = split_inputs(rotate_bytes_per_s=0.7e9)
    d = BudgetPolicy(RateQualityTable(points=(rot,)), PolicyConfig(quality_floor=0.9)).decide(x)
    assert d.representation == "split"
    h, n = d.head_tokens, 4096
    unrotated = dataclasses.replace(x, rotate_bytes_per_s=1e30)
    plain = predict_split(rot, unrotated, h)["ttft_s"]
    assert math.isclose(predict_split(rot, x, h)["ttft_s"] - plain, KV * (n - h) / 0.7e9, rel_tol=1e-9)


def test_text_is_chosen_when_the_link_is_slow_and_the_context_short() -> None:
    d = policy().decide(inputs(bandwidth_bytes_per_s=0.001 * GBIT, context_tokens=20, text_bytes=80))
    assert d.representation == "text"
    assert d.predicted_quality == 1.0


def test_a_slow_link_picks_the_smallest_card_above_the_floor() -> None:
    d = policy().decide(inputs(bandwidth_bytes_per_s=0.05 * GBIT))
    assert (d.representation, d.bits) == ("card", 3)
    assert "fastest" in d.reason


def test_quality_floor_excludes_faster_cards() -> None:
    d = policy(quality_floor=0.95).decide(inputs(bandwidth_bytes_per_s=0.05 * GBIT))
    assert d.bits == 4
    assert d.predicted_quality >= 0.95


def test_table_without_text_row_still_offers_text() -> None:
    p = BudgetPolicy(RateQualityTable(points=(card(2, 3_613, 0.5),)), PolicyConfig(quality_floor=0.9))
    assert p.decide(inputs()).representation == "text"


# ---------------------------------------------------------------- memory drives the bit budget


def test_falling_receiver_memory_lowers_the_bits_and_rising_memory_restores_them() -> None:
    falling = run(policy(), [1000, 37, 35, 30, 26])
    # 8-bit is kept at 37 MB (it needs 36.1), 4-bit at 35, 3-bit at 30; at 26 only text fits.
    assert falling == [8, 8, 4, 3, 16]
    assert all(a >= b for a, b in itertools.pairwise(falling[:-1]))
    # Rising: a bigger candidate needs 10% spare (3-bit: 31.7 MB, 4-bit: 33.2, 8-bit: 39.7).
    assert run(policy(), [30, 32, 34, 38, 40, 1000]) == [3, 3, 4, 4, 8, 8]


def test_sender_memory_also_bounds_the_card() -> None:
    d = policy().decide(inputs(sender_headroom_bytes=7 * MB))
    assert d.bits == 4  # the 12.5 MB 8-bit card cannot be built at the sender
    assert d.wire_bytes <= 7 * MB


def test_nothing_fits_raises_no_feasible_representation() -> None:
    with pytest.raises(NoFeasibleRepresentation):
        policy().decide(inputs(receiver_headroom_bytes=20 * MB))


def test_scripted_memory_drives_both_the_store_and_the_policy() -> None:
    """One scripted reading sequence: the store sheds and the policy lowers its bits as memory falls."""
    reserve = 10 * MB
    probe = ScriptedMemoryProbe([MemoryReading(available=200 * MB, total=512 * MB, process_rss=0)])
    store = CardStore(
        CardStoreConfig(cap_bytes=64 * MB, reserve_bytes=reserve, probe_interval_s=0), probe=probe
    )
    p = policy()
    store.put("in-flight", b"p" * (8 * MB), pin=True)
    for index in range(6):
        store.put(f"c{index}", b"c" * (8 * MB))
    previous: Decision | None = None
    bits = []
    for available_mb in (200, 45, 39.5, 35):
        available = int(available_mb * MB)
        probe.extend([MemoryReading(available=available, total=512 * MB, process_rss=0)])
        store.refresh()
        # The receiver advertises the memory left above its reserve as its headroom for an incoming card.
        previous = p.decide(inputs(receiver_headroom_bytes=max(0, available - reserve)), previous)
        bits.append(previous.bits)
    assert bits == [8, 4, 3, 16]  # headroom 190, 35, 29.5, 25 MB
    assert store.statistics().evictions == 0  # the store's own 56 MB still fit above the reserve

    # Memory falls below the reserve: the store sheds unpinned cards and nothing fits a new card.
    probe.extend([MemoryReading(available=2 * MB, total=512 * MB, process_rss=0)])
    assert store.refresh() == ("c0",)  # budget 2 + 56 held - 10 reserve = 48 MB: the LRU card goes
    assert "in-flight" in store  # pinned: never shed
    with pytest.raises(NoFeasibleRepresentation):
        p.decide(inputs(receiver_headroom_bytes=0), previous)

    # Memory comes back: the store's budget returns to its cap and the policy to 8-bit cards.
    probe.extend([MemoryReading(available=300 * MB, total=512 * MB, process_rss=0)])
    assert store.refresh() == ()
    assert store.budget == 64 * MB
    assert p.decide(inputs(receiver_headroom_bytes=290 * MB), previous).bits == 8


# ---------------------------------------------------------------- deadline and hysteresis


def test_a_deadline_overrides_the_near_tie_quality_preference() -> None:
    # At 3 Gbit/s: 3-bit 62.2 ms (fastest), 4-bit 66.2 ms (within 10%, better quality), 8-bit 83.1 ms.
    assert policy().decide(inputs(bandwidth_bytes_per_s=3 * GBIT)).bits == 4
    d = policy(deadline_s=0.064).decide(inputs(bandwidth_bytes_per_s=3 * GBIT))
    assert d.bits == 3
    assert d.predicted_ttft_s <= 0.064
    assert "deadline" not in d.reason


def test_no_candidate_meets_the_deadline_fastest_is_chosen_and_said() -> None:
    d = policy(deadline_s=0.001).decide(inputs(bandwidth_bytes_per_s=0.05 * GBIT))
    assert d.bits == 3
    assert "deadline" in d.reason


# Around 16 Gbit/s the 8-bit card's TTFT crosses 1.1x the fastest card's: the near-tie boundary.
WOBBLE = tuple(g * GBIT for g in (16, 14.5, 17.5, 15, 17, 14.4, 17.6, 15))


def switches(bits: list[float]) -> int:
    return sum(1 for a, b in itertools.pairwise(bits) if a != b)


def test_link_estimates_wobbling_at_a_boundary_do_not_flap_the_choice() -> None:
    p = policy()
    previous: Decision | None = None
    chosen = []
    for bandwidth in WOBBLE:
        previous = p.decide(inputs(bandwidth_bytes_per_s=bandwidth), previous)
        chosen.append(previous.bits)
    assert switches(chosen) <= 1
    assert "kept previous choice" in previous.reason if previous is not None else False


def test_without_hysteresis_the_same_wobble_does_flap() -> None:
    """The control for the test above: deciding afresh each time flips with every wobble."""
    p = policy()
    assert switches([p.decide(inputs(bandwidth_bytes_per_s=b)).bits for b in WOBBLE]) >= 5


def test_a_large_change_does_switch() -> None:
    p = policy()
    fast = p.decide(inputs())
    slow = p.decide(inputs(bandwidth_bytes_per_s=0.02 * GBIT), fast)
    assert (fast.bits, slow.bits) == (8, 3)
    back = p.decide(inputs(), slow)
    assert back.bits == 8


def test_previous_choice_missing_from_the_table_is_replaced() -> None:
    p = policy()
    stale = dataclasses.replace(p.decide(inputs()), bits=5)
    d = p.decide(inputs(), stale)
    assert d.bits == 8
    assert "no longer feasible" in d.reason


def test_every_decision_is_logged_with_its_inputs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="edgebus.policy"):
        d = policy().decide(inputs(rtt_s=0.0123))
    record = next(r for r in caplog.records if r.name == "edgebus.policy")
    assert "rtt_s=0.0123" in record.getMessage()
    assert d.inputs.rtt_s == 0.0123


# ---------------------------------------------------------------- split: head ids ahead, tail card behind

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


def split_inputs(**overrides: object) -> PolicyInputs:
    """4K tokens to a receiver that prefills 490 tokens/s (the idle 4K re-prefill took 8.4 s)."""
    base: dict[str, object] = {
        "context_tokens": 4096,
        "text_bytes": 4 * 4096,
        "prefill_tokens_per_s": 490.0,
        "bandwidth_bytes_per_s": 20 * MBIT,
        "rtt_s": 0.001,
        "inject_bytes_per_s": 2e9,
        "decode_bytes_per_s": 3e8,
    }
    base.update(overrides)
    return inputs(**base)


def test_split_balances_head_prefill_against_tail_transfer() -> None:
    x = split_inputs()
    d = policy(split=True, quality_floor=0.95).decide(x)
    assert d.representation == "split"
    assert d.bits == 4  # the floor leaves 8-bit and 4-bit; at 20 Mbit/s the smaller card splits better
    h, n, bpt = d.head_tokens, 4096, 6_445
    head_side = x.rtt_s + 4 * h / x.bandwidth_bytes_per_s + h / 490
    tail_side = x.rtt_s + (4 * h + bpt * (n - h)) / x.bandwidth_bytes_per_s
    after = bpt * (n - h) / 3e8 + KV * n / 2e9 + KV * n / x.join_bytes_per_s  # decode, inject, join
    assert math.isclose(d.predicted_ttft_s, max(head_side, tail_side) + after)
    # Balanced: one token either way moves the slower side past the other.
    assert abs(head_side - tail_side) <= 1 / 490 + bpt / x.bandwidth_bytes_per_s
    assert d.wire_bytes == round(4 * h + bpt * (n - h))
    assert d.predicted_quality == 0.96  # the card's quality at that budget
    assert "head=" in d.describe()


def test_split_beats_both_text_and_card_where_neither_is_fast() -> None:
    x = split_inputs()
    whole = policy(quality_floor=0.95).decide(x)  # no split candidates
    split = policy(split=True, quality_floor=0.95).decide(x)
    text = x.prefill_s(4096) + x.rtt_s + x.text_bytes / x.bandwidth_bytes_per_s
    assert whole.representation == "text"  # a 26 MB card needs 10.6 s at 20 Mbit/s; text 8.4 s
    assert split.predicted_ttft_s < 0.6 * min(whole.predicted_ttft_s, text)


def test_no_split_on_a_fast_link_or_for_a_short_context_on_a_slow_one() -> None:
    fast = policy(split=True).decide(split_inputs(bandwidth_bytes_per_s=1000 * MBIT))
    assert fast.representation == "card"  # the balancing head is below split_min_head
    slow = policy(split=True).decide(split_inputs(bandwidth_bytes_per_s=0.1 * MBIT, context_tokens=200))
    assert slow.representation == "text"  # the balancing head is nearly the whole context


def test_under_the_kl_metric_a_split_counts_the_kl_of_its_tail_only() -> None:
    low = card(2, 3_600, 0.80)  # under the floor as a whole card
    kl_table = RateQualityTable(points=(low,), metric=KL_QUALITY_METRIC)
    x = split_inputs(bandwidth_bytes_per_s=10 * MBIT)
    config = PolicyConfig(quality_floor=0.85)
    d = BudgetPolicy(kl_table, config).decide(x)
    assert d.representation == "split"
    tail = (4096 - d.head_tokens) / 4096
    assert math.isclose(d.predicted_quality, 0.80**tail)  # exp(-KL * tail share)
    assert d.predicted_quality >= 0.85 > low.quality
    assert split_quality(low, 4096, 0, tail_kl=True) == 0.80  # no head: the card itself
    assert split_quality(low, 4096, 4096, tail_kl=True) == 1.0  # all head: the text
    # Under another metric nothing says how quality scales with the tail: the card's own, under the floor.
    other = RateQualityTable(points=(low,), metric="f1_vs_text")
    assert BudgetPolicy(other, config).decide(x).representation == "text"


def test_split_quality_floor_and_receiver_ram_follow_the_card() -> None:
    p = policy(split=True, quality_floor=0.97)
    d = p.decide(split_inputs())
    assert (d.representation, d.bits) == ("split", 8)  # 4-bit (0.96) is under the floor
    tail = 12_207 * (4096 - d.head_tokens)
    # Receiver RAM: the tail card plus the whole context's fp16 KV, so a headroom just under that refuses it.
    tight = split_inputs(receiver_headroom_bytes=int(tail + KV * 4096) - 1)
    assert p.decide(tight).representation != "split"


def test_quadratic_prefill_term_slows_text_and_lengthens_the_head() -> None:
    linear = policy(split=True).decide(split_inputs())
    quadratic = split_inputs(prefill_s_per_token2=2e-7)
    assert math.isclose(quadratic.prefill_s(4096), 4096 / 490 + 2e-7 * 4096**2)
    d = policy(split=True).decide(quadratic)
    assert d.representation == "split"
    assert d.head_tokens < linear.head_tokens  # longer heads cost more, so the card carries more


def test_split_is_kept_while_its_head_length_follows_a_wobbling_link() -> None:
    p = policy(split=True)
    previous: Decision | None = None
    heads, kinds = [], []
    for mbit in (20, 18, 22, 19, 21):
        previous = p.decide(split_inputs(bandwidth_bytes_per_s=mbit * MBIT), previous)
        heads.append(previous.head_tokens)
        kinds.append(previous.key)
    assert len(set(kinds)) == 1
    assert len(set(heads)) == 5  # the head length is recomputed from each input, not frozen


def test_the_answers_own_time_makes_small_transfer_gains_near_ties() -> None:
    """At 1 Gbit/s the cards differ by 0.1-0.3 s of transfer: against 2 s of answering that is a tie."""
    x = split_inputs(bandwidth_bytes_per_s=1000 * MBIT)
    bare = policy(split=True).decide(x)
    answered = policy(split=True).decide(split_inputs(bandwidth_bytes_per_s=1000 * MBIT, question_s=2.0))
    assert bare.bits == 3  # the fastest transfer wins when nothing else counts
    # 3-bit 2.24 s, 4-bit 2.35 s (within 10%: better quality wins), 8-bit 2.59 s (15% slower: out).
    assert answered.bits == 4
    assert answered.predicted_ttft_s > 2.0
    text = policy().decide(split_inputs(bandwidth_bytes_per_s=0.01 * MBIT, question_s=2.0))
    assert text.representation == "text"
    assert math.isclose(text.predicted_ttft_s, 0.001 + 4 * 4096 / (0.01 * MBIT) + 4096 / 490 + 2.0)


def test_a_slow_join_at_the_receiver_costs_the_split_its_lead() -> None:
    assert policy(split=True).decide(split_inputs()).representation == "split"
    # Joining 94 MB of fp16 KV at 10 MB/s takes 9.4 s: more than the split saves at 20 Mbit/s.
    assert policy(split=True).decide(split_inputs(join_bytes_per_s=1e7)).representation != "split"


def test_split_is_derived_never_read_from_a_table() -> None:
    with pytest.raises(ValueError, match="representation"):
        RateQualityPoint(representation="split", bits=4, keep=1, layers=1, bytes_per_token=1, quality=1)
    evicted = RateQualityPoint(
        representation="card", bits=4, keep=0.5, layers=1, bytes_per_token=3_000, quality=0.99
    )
    p = BudgetPolicy(RateQualityTable(points=(evicted,)), PolicyConfig(quality_floor=0.9))
    assert all(e.representation != "split" for e in p.estimates(split_inputs()))


def test_bad_split_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="split_min_head"):
        PolicyConfig(quality_floor=0.9, split_min_head=0)


# ---------------------------------------------------------------- validation and table I/O


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bandwidth_bytes_per_s", 0),
        ("bandwidth_bytes_per_s", float("nan")),
        ("rtt_s", -1),
        ("receiver_headroom_bytes", float("inf")),
        ("prefill_tokens_per_s", 0),
        ("kv_bytes_per_token", True),
        ("context_tokens", "1024"),
    ],
)
def test_bad_inputs_are_refused_with_a_typed_error(field: str, value: object) -> None:
    with pytest.raises(InvalidPolicyInput, match=field):
        inputs(**{field: value})


def test_bad_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        PolicyConfig(quality_floor=1.5)
    with pytest.raises(ConfigError):
        PolicyConfig(quality_floor=0.9, deadline_s=0)
    with pytest.raises(ConfigError):
        PolicyConfig(quality_floor=0.9, switch_margin=1.0)


def test_table_round_trips_through_json_and_disk(tmp_path: Path) -> None:
    path = tmp_path / "rq.json"
    table = RateQualityTable(
        model="m",
        points=(*TABLE.points, card(4, 7_000, 0.97, facts=True)),
        dominated=(card(3, 9_000, 0.9),),
    )
    table.save(path)
    assert RateQualityTable.load(path) == table
    # Dominated points are kept for reference only: never a candidate for the policy.
    assert card(3, 9_000, 0.9) not in table.candidates()
    assert [p.name for p in tmp_path.iterdir()] == ["rq.json"]
    assert json.loads(path.read_text())["version"] == 1


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        ("[1]", "object"),
        ('{"version": 2, "points": []}', "version"),
        ('{"version": 1, "points": [], "extra": 1}', "extra"),
        ('{"version": 1, "points": []}', "points"),
        ('{"version": 1, "points": [{"representation": "card"}]}', "points[0]"),
        (
            '{"version": 1, "points": [{"representation": "text", "bits": 16, "keep": 1, "layers": 1, '
            '"bytes_per_token": 0, "quality": 1}], "dominated": [{"representation": "card"}]}',
            "dominated[0]",
        ),
        (
            '{"version": 1, "points": [{"representation": "text", "bits": 16, "keep": 1, "layers": 1, '
            '"bytes_per_token": 0, "quality": 1}], "dominated": {}}',
            "'dominated' must be a list",
        ),
        (
            '{"version": 1, "points": [{"representation": "pdf", "bits": 4, "keep": 1, "layers": 1, '
            '"bytes_per_token": 1, "quality": 1}]}',
            "representation",
        ),
        (
            '{"version": 1, "points": [{"representation": "card", "bits": 4, "keep": 2, "layers": 1, '
            '"bytes_per_token": 1, "quality": 1}]}',
            "keep",
        ),
        (
            '{"version": 1, "points": [{"representation": "card", "bits": 4, "keep": 1, "layers": 1, '
            '"bytes_per_token": 1, "quality": 1, "colour": "red"}]}',
            "colour",
        ),
        ("{not json", "JSON"),
    ],
)
def test_malformed_tables_name_the_problem(tmp_path: Path, document: str, needle: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(document)
    with pytest.raises(ConfigError, match=r"bad\.json") as raised:
        RateQualityTable.load(path)
    assert needle in str(raised.value)


def test_points_differing_only_in_condition_are_different_choices(tmp_path: Path) -> None:
    plain = card(4, 6_445, 0.96)
    profiled = dataclasses.replace(plain, condition="adaptive-4", quality=0.98)
    assert plain.key != profiled.key
    d = BudgetPolicy(
        RateQualityTable(points=(plain, profiled)), PolicyConfig(quality_floor=0.5, split=False)
    ).decide(inputs(bandwidth_bytes_per_s=0.05 * GBIT))
    assert d.condition == "adaptive-4"  # same size, better quality
    assert "adaptive-4" in d.describe()
    table = RateQualityTable(points=(plain, profiled), model="m", metric="exp(-kl)", source="runs.json")
    table.save(tmp_path / "t.json")
    assert RateQualityTable.load(tmp_path / "t.json") == table


def test_balanced_head_is_where_head_prefill_meets_tail_transfer() -> None:
    x = split_inputs()
    point = card(4, 6_445, 0.96)
    h = balanced_head(point, x)
    prefill_h = x.prefill_s(h)
    tail = (6_445 * (4096 - h) + 4 * h) / x.bandwidth_bytes_per_s
    assert abs(prefill_h - tail) < 0.01 * tail
    sides = predict_split(point, x, h)
    assert math.isclose(sides["head_side_s"], x.rtt_s + 4 * h / x.bandwidth_bytes_per_s + prefill_h)
    assert math.isclose(sides["tail_side_s"], x.rtt_s + tail)
    assert sides["ttft_s"] > max(sides["head_side_s"], sides["tail_side_s"])
    assert balanced_head(point, split_inputs(bandwidth_bytes_per_s=1e12)) == 0  # the card is there at once
    assert balanced_head(point, split_inputs(bandwidth_bytes_per_s=1.0)) == 4096  # the card never arrives


def test_missing_table_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        RateQualityTable.load(tmp_path / "absent.json")
