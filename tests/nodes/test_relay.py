"""Relay: appending a note's KV on top of a card equals prefilling context and note in one pass."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nodes import roles_relay
from nodes.roles_relay import RelayedCard, relay_card, relayed_meta
from qkv import extend_snapshot
from qkv._budget import Budget
from qkv._card import read_card_info
from qkv._errors import CardCompatError, CardFormatError
from qkv._hf import generate_from_text, prefill
from qkv._pipeline import answer_from_card, encode_context

CONTEXT = "Ada Lovelace wrote the first program for the Analytical Engine in 1843, in London."
QUESTION = "Who wrote the first program?"


def test_append_tokens_matches_one_prefill(tiny_lm: Any) -> None:
    ids = tiny_lm.tokenizer.encode(CONTEXT, add_special_tokens=False)
    head, tail = ids[:40], ids[40:]
    joint = prefill(tiny_lm, ids)
    appended = extend_snapshot(tiny_lm, prefill(tiny_lm, head), tail)
    assert appended.num_tokens == joint.num_tokens
    assert torch.equal(appended.positions, joint.positions)
    for a, b in zip(appended.keys, joint.keys, strict=True):
        assert a is not None
        assert b is not None
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(appended.values, joint.values, strict=True):
        assert a is not None
        assert b is not None
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_append_keeps_true_positions_after_a_gap(tiny_lm: Any) -> None:
    snap = prefill(tiny_lm, tiny_lm.tokenizer.encode(CONTEXT, add_special_tokens=False))
    # An evicted-looking snapshot: positions jump; appended tokens continue after the last one.
    gapped = type(snap)(
        keys=snap.keys, values=snap.values, positions=snap.positions * 2, fingerprint=snap.fingerprint
    )
    out = extend_snapshot(tiny_lm, gapped, [5, 6, 7])
    assert out.positions[-3:].tolist() == [int(gapped.positions[-1]) + 1 + i for i in range(3)]


def test_lossless_relay_answers_like_reading_context_and_note(tiny_lm: Any) -> None:
    card = encode_context(tiny_lm, CONTEXT, Budget(bits=32), sender="reader")
    out = relay_card(tiny_lm, card.data, sender="relay", question=QUESTION, max_new_tokens=6, bits=32)
    info = read_card_info(out.data, verify=True)
    assert info.card_id == out.card_id
    assert info.num_tokens == card.card_tokens + out.appended_tokens
    assert info.meta.extra["relayed_by"] == ["relay"]
    assert info.meta.extra["context_tokens"] == card.context_tokens
    assert out.hops == 1
    assert out.note.startswith("\nNote from relay:")

    relayed = answer_from_card(tiny_lm, out.data, QUESTION, max_new_tokens=8)
    parts = tiny_lm.template.split(tiny_lm.tokenizer, CONTEXT, QUESTION)
    note_ids = tiny_lm.tokenizer.encode(out.note, add_special_tokens=False)
    reference = generate_from_text(
        tiny_lm, [*parts.prefix_ids, *note_ids], parts.suffix_ids, max_new_tokens=8
    )
    assert relayed.generation.token_ids == reference.token_ids


def test_quantised_relay_is_deterministic_and_counts_hops(tiny_lm: Any) -> None:
    card = encode_context(tiny_lm, CONTEXT, Budget(bits=4), sender="reader")
    first = relay_card(tiny_lm, card.data, sender="r1", question=QUESTION, max_new_tokens=4)
    again = relay_card(tiny_lm, card.data, sender="r1", question=QUESTION, max_new_tokens=4)
    assert (first.answer, first.note, first.appended_tokens) == (
        again.answer,
        again.note,
        again.appended_tokens,
    )
    assert len(first.data) == len(again.data)
    assert first.bits == 4
    second = relay_card(tiny_lm, first.data, sender="r2", question=QUESTION, max_new_tokens=4)
    assert read_card_info(second.data).meta.extra["relayed_by"] == ["r1", "r2"]
    assert second.hops == 2


def test_relay_refuses_too_many_hops(tiny_lm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(roles_relay, "MAX_HOPS", 1)
    card = encode_context(tiny_lm, CONTEXT, Budget(bits=4), sender="reader")
    once = relay_card(tiny_lm, card.data, sender="r1", question=QUESTION, max_new_tokens=2)
    with pytest.raises(CardCompatError, match="relayed 1 times"):
        relay_card(tiny_lm, once.data, sender="r2", question=QUESTION, max_new_tokens=2)


def test_relay_rejects_garbage(tiny_lm: Any) -> None:
    with pytest.raises(CardFormatError):
        relay_card(tiny_lm, b"QKVC" + bytes(100), sender="r", question=QUESTION, max_new_tokens=2)


def test_relayed_card_is_not_addressed_to_the_incoming_cards_receivers() -> None:
    # The reader addressed the incoming card to the relay; the relayed card is for whoever subscribes to
    # the relay's topic, so it must not carry that address on (an answerer would skip it as not its own).
    out = RelayedCard(
        data=b"x" * 10, card_id="b" * 32, answer="a", note="n", appended_tokens=3, hops=2, bits=4
    )
    incoming = {"for": ["relay"], "rep": "card", "tail": "c" * 32, "sent_at": 12.5, "bits": 3, "topic": "kv"}
    meta = relayed_meta(incoming, card_id="a" * 32, out=out)
    assert meta == {
        "sent_at": 12.5,
        "topic": "kv",
        "hops": 2,
        "bits": 4,
        "card_bytes": 10,
        "source": "a" * 32,
    }
    assert incoming["for"] == ["relay"]  # the incoming announcement's metadata is left as it was
