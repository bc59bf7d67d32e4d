"""CardSpeeds: what an answerer advertises about turning cards into first tokens, and how real answers refine
it (a rotated card's extra decode time goes to the rotation speed, not to the plain decode speed)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest

from nodes.roles_answerer import CardSpeeds, CardSummary, measure_card_answer, summarise_card
from qkv import Budget, encode_observation, observe, read_card_info
from tests.nodes.fleet import DOCUMENT

PLAIN = CardSummary(
    card_id="c",
    card_bytes=6_000_000,
    card_tokens=1000,
    context_tokens=1000,
    fp16_bytes=23_000_000,
    bits=4.0,
    sender="s",
)
ROTATED = replace(PLAIN, rotated_fp16_bytes=23_000_000)


def speeds() -> CardSpeeds:
    return CardSpeeds(decode_bps=3e8, rotate_bps=1e9, question_s=0.1, join_bps=2e9)


def test_a_plain_answer_refines_the_decode_speed_only() -> None:
    s = speeds()
    s.observe(PLAIN, decode_s=0.04, head_s=0.0, ttft_s=0.2, joined_bytes=0)
    assert math.isclose(s.decode_bps, 0.5 * 3e8 + 0.5 * 6e6 / 0.04)
    assert s.rotate_bps == 1e9
    assert math.isclose(s.question_s, 0.5 * 0.1 + 0.5 * 0.16)
    assert s.join_bps == 2e9  # no head was sent ahead


def test_a_rotated_answer_charges_what_the_decode_speed_does_not_explain_to_the_rotation() -> None:
    s = speeds()
    # 6 MB at 300 MB/s is 20 ms; the other 46 ms turned 23 MB of fp16 KV back: 0.5 GB/s.
    s.observe(ROTATED, decode_s=0.066, head_s=0.0, ttft_s=0.2, joined_bytes=0)
    assert s.decode_bps == 3e8
    assert math.isclose(s.rotate_bps, 0.5 * 1e9 + 0.5 * 23e6 / 0.046)
    # Decoded faster than the plain speed predicts: nothing to learn about the rotation.
    before = s.rotate_bps
    s.observe(ROTATED, decode_s=0.01, head_s=0.0, ttft_s=0.2, joined_bytes=0)
    assert (s.rotate_bps, s.decode_bps) == (before, 3e8)


def test_a_head_sent_ahead_refines_the_join_speed() -> None:
    s = speeds()
    s.observe(PLAIN, decode_s=0.02, head_s=0.05, ttft_s=0.3, joined_bytes=23_000_000)
    assert math.isclose(s.join_bps, 0.5 * 2e9 + 0.5 * 23e6 / 0.05)
    assert set(s.advertised()) == {"decode_bps", "rotate_bps", "question_s", "join_bps"}


def test_start_up_measurement_and_card_summaries_tell_rotated_cards(tiny_lm: Any) -> None:
    measured = measure_card_answer(tiny_lm, tokens=64)
    for name in ("decode_bps", "rotate_bps", "question_s", "join_bps"):
        value = getattr(measured, name)
        assert math.isfinite(value), name
        assert value > 0, name
    obs = observe(tiny_lm, DOCUMENT)
    plain = encode_observation(tiny_lm, obs, Budget(bits=4), context=DOCUMENT)
    rotated = encode_observation(tiny_lm, obs, Budget(bits=4, rotation="hadamard-prerope"), context=DOCUMENT)
    assert summarise_card("p", plain.data, tiny_lm).rotated_fp16_bytes == 0
    summary = summarise_card("r", rotated.data, tiny_lm)
    assert summary.rotated_fp16_bytes == read_card_info(rotated.data).fp16_bytes > 0


@pytest.mark.parametrize("decode_s", [0.0, -1.0])
def test_unusable_timings_change_nothing(decode_s: float) -> None:
    s = speeds()
    s.observe(ROTATED, decode_s=decode_s, head_s=0.0, ttft_s=0.0, joined_bytes=0)
    assert s == speeds()
