"""Model-side pieces of the reader and answerer roles: plans, head messages, split answers, speed models."""

from __future__ import annotations

from typing import Any

import pytest

from nodes.roles_answerer import PrefillModel, answer_card, prefill_split_head, summarise_card
from nodes.roles_reader import (
    MAX_HEAD_TOKENS,
    PrefillCache,
    SendPlan,
    count_tokens,
    head_message,
    parse_head,
    read_document,
)
from qkv import Budget, SplitHead, answer_from_text, encode_context
from tests.nodes.fleet import DOCUMENT, QUESTION
from tests.qkv.test_card import build_card, split_card

OTHER = "The Rosetta Stone was found in 1799 near the town of Rashid in the Nile delta. It carries a decree."


def context_head(lm: Any, extra: int = 30) -> int:
    """A head length that reaches ``extra`` tokens into the context (past the prompt template's head)."""
    return lm.template.split(lm.tokenizer, DOCUMENT, "").template_prefix_tokens + extra


def test_text_card_and_split_plans(tiny_lm: Any) -> None:
    n = count_tokens(tiny_lm, DOCUMENT)
    text = read_document(tiny_lm, DOCUMENT, SendPlan(kind="text"), sender="r")
    assert (text.data, text.encoded, text.context_tokens) == (DOCUMENT.encode(), None, n)
    assert text.meta()["rep"] == "text"
    card = read_document(tiny_lm, DOCUMENT, SendPlan(kind="card", budget=Budget(bits=4)), sender="r")
    split = read_document(
        tiny_lm, DOCUMENT, SendPlan(kind="split", budget=Budget(bits=4), head_tokens=40), sender="r"
    )
    assert card.encoded is not None
    assert split.encoded is not None
    assert split.head is not None
    assert split.head.num_tokens == 40
    assert (card.context_tokens, split.context_tokens) == (n, n)
    assert split.encoded.card_tokens == n - 40
    assert split.meta()["head_tokens"] == 40
    assert split.reply()["wire_bytes"] == split.encoded.card_bytes + 4 * 40
    assert split.encoded.card_bytes < card.encoded.card_bytes
    with pytest.raises(ValueError, match="head_tokens"):
        read_document(tiny_lm, DOCUMENT, SendPlan(kind="split", budget=Budget(), head_tokens=n), sender="r")
    with pytest.raises(ValueError, match="empty"):
        read_document(tiny_lm, "  ", SendPlan(kind="text"), sender="r")


def test_prefill_cache_makes_several_budgets_from_one_prefill(tiny_lm: Any) -> None:
    cache = PrefillCache()
    first = cache.observe(tiny_lm, DOCUMENT, 32)
    assert cache.observe(tiny_lm, DOCUMENT, 32) is first
    assert cache.observe(tiny_lm, OTHER, 32) is not first
    cards = [
        read_document(
            tiny_lm, DOCUMENT, SendPlan(kind="card", budget=Budget(bits=b)), sender="r", cache=cache
        )
        for b in (8, 2)
    ]
    fresh = read_document(tiny_lm, DOCUMENT, SendPlan(kind="card", budget=Budget(bits=2)), sender="r")
    assert cards[0].encoded is not None
    assert cards[1].encoded is not None
    assert fresh.encoded is not None
    assert cards[1].encoded.prefill_s == cards[0].encoded.prefill_s  # the same prefill, timed once
    assert cards[1].encoded.card_bytes == fresh.encoded.card_bytes


def test_head_message_round_trip_and_malformed_ones(tiny_lm: Any) -> None:
    head = SplitHead(token_ids=(5, 70000, 2**31 - 1), template_prefix_tokens=1)
    data, meta = head_message(head, "tail-card")
    assert len(data) == 12
    assert parse_head(data, meta) == (head, "tail-card")
    bad: list[tuple[bytes, dict[str, Any], str]] = [
        (data[:-1], meta, "bytes for"),
        (data, {**meta, "tokens": 4}, "bytes for"),
        (data, {**meta, "tokens": "3"}, "tokens"),
        (data, {**meta, "tokens": MAX_HEAD_TOKENS + 1}, "tokens"),
        (data, {**meta, "tail": 7}, "tail"),
        (data, {**meta, "template_prefix_tokens": 9}, "template_prefix_tokens"),
        (b"\xff\xff\xff\xff" * 3, meta, "token ids"),  # 2**32 - 1 is no vocabulary index
    ]
    for payload, fields, needle in bad:
        with pytest.raises(ValueError, match=needle):
            parse_head(payload, fields)


def test_split_answers_with_a_prefilled_head_or_from_the_card_alone(tiny_lm: Any) -> None:
    plan = SendPlan(kind="split", budget=Budget(bits=16), head_tokens=context_head(tiny_lm))
    split = read_document(tiny_lm, DOCUMENT, plan, sender="r")
    assert split.encoded is not None
    assert split.head is not None
    data = split.encoded.data
    assert summarise_card("c", data, tiny_lm).head_tokens == context_head(tiny_lm)
    head, seconds = prefill_split_head(tiny_lm, split.head)
    assert seconds > 0
    joined = answer_card(tiny_lm, data, QUESTION, 8, head)
    alone = answer_card(tiny_lm, data, QUESTION, 8)
    text = answer_from_text(tiny_lm, DOCUMENT, QUESTION, max_new_tokens=8)
    assert joined["answer"] == alone["answer"] == text.text  # fp16 tail, exact head: the text's answer
    assert (joined["head_source"], alone["head_source"]) == ("message", "card")
    assert joined["head_s"] < alone["head_s"]  # the head was ready: only the join is left


def test_a_head_that_does_not_belong_to_the_card_falls_back_to_the_cards_own(tiny_lm: Any) -> None:
    plan = SendPlan(kind="split", budget=Budget(bits=16), head_tokens=context_head(tiny_lm))
    split = read_document(tiny_lm, DOCUMENT, plan, sender="r")
    other = read_document(tiny_lm, OTHER, plan, sender="r")
    assert split.encoded is not None
    assert other.head is not None
    assert split.head != other.head
    wrong, _ = prefill_split_head(tiny_lm, other.head)
    reply = answer_card(tiny_lm, split.encoded.data, QUESTION, 8, wrong)
    assert reply["head_source"].startswith("card")
    assert reply["answer"] == answer_card(tiny_lm, split.encoded.data, QUESTION, 8)["answer"]


def test_prefill_model_fits_two_lengths_and_follows_real_runs() -> None:
    truth = PrefillModel(500.0, 2e-7)
    model = PrefillModel.fit([(256, truth.predict_s(256)), (1024, truth.predict_s(1024))])
    assert model.predict_s(4096) == pytest.approx(truth.predict_s(4096))
    # Noise that bends the fit downwards falls back to the longer run's speed.
    linear = PrefillModel.fit([(256, 1.0), (1024, 2.0)])
    assert linear.advertised() == {"prefill_tps": 512.0, "prefill_q": 0.0}
    # The node got twice as slow: real prefills move the advertised speed towards it.
    for _ in range(10):
        model.observe(2048, 2 * truth.predict_s(2048))
    assert model.predict_s(2048) == pytest.approx(2 * truth.predict_s(2048), rel=0.01)
    assert model.advertised()["prefill_tps"] == pytest.approx(250.0, rel=0.01)


def test_a_cards_implausible_claims_about_its_context_are_not_believed(tiny_lm: Any) -> None:
    # context_tokens and fp16_bytes come from the card's sender and feed the rates this node advertises:
    # 2**62 tokens once made the advertised join_bps too large to pack, and the presence loop died.
    data = encode_context(tiny_lm, DOCUMENT, Budget(bits=4)).data
    header, metadata, payload = split_card(data)
    honest = summarise_card("c", data, tiny_lm)
    for claims in ({"context_tokens": 2**62, "fp16_bytes": -1}, {"context_tokens": 1, "fp16_bytes": 2**62}):
        metadata["extra"] = claims
        summary = summarise_card("c", build_card(metadata, payload, major=header[1]), tiny_lm)
        assert (summary.context_tokens, summary.fp16_bytes) == (honest.context_tokens, honest.fp16_bytes)
    metadata["extra"] = {"context_tokens": honest.card_tokens + 7, "fp16_bytes": 1234}
    summary = summarise_card("c", build_card(metadata, payload, major=header[1]), tiny_lm)
    assert (summary.context_tokens, summary.fp16_bytes) == (honest.card_tokens + 7, 1234)
