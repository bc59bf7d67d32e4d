"""Answerer role, model side: answer a question from a stored card, or from re-prefilled text (baseline).

Blocking torch work, run in the agent's model thread. Also the start-up measurement of prefill speed that the
answerer advertises in its presence info.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from qkv import CardInfo, LoadedModel, answer_from_card, answer_from_text, prefill, read_card_info

#: Tokens prefilled to measure prefill speed at start (after a short warm-up forward).
PREFILL_PROBE_TOKENS = 256
MAX_QUESTION_CHARS = 4000
MAX_NEW_TOKENS_LIMIT = 256
_PROBE_TEXT = (
    "Edge devices hand each other compressed key-value caches so that a receiver can answer questions "
    "about a document without reading it again. "
)


@dataclass(frozen=True, kw_only=True)
class CardSummary:
    """What the answerer records about a card it holds (read from the card header, no tensor work)."""

    card_id: str
    card_bytes: int
    card_tokens: int
    context_tokens: int
    fp16_bytes: int  # whole-context fp16 KV when the sender recorded it, else the card's own
    bits: float
    sender: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "card_bytes": self.card_bytes,
            "card_tokens": self.card_tokens,
            "context_tokens": self.context_tokens,
            "fp16_bytes": self.fp16_bytes,
            "bits": self.bits,
            "sender": self.sender,
        }


def mean_width(info: CardInfo) -> float:
    """Average code width over the K and V blocks present (classes counted once each)."""
    widths = [w for table in (info.key_bits, info.value_bits) for row in table for w in row]
    return sum(widths) / len(widths) if widths else 0.0


def modal_width(info: CardInfo) -> int:
    """The most common code width in the card (what a relay re-encodes at by default)."""
    widths = Counter(w for table in (info.key_bits, info.value_bits) for row in table for w in row)
    return widths.most_common(1)[0][0] if widths else 4


def summarise_card(card_id: str, data: bytes, lm: LoadedModel) -> CardSummary:
    """Parse the header and metadata (CardFormatError if malformed, CardCompatError if for another model)."""
    info = read_card_info(data)
    lm.fingerprint.require_same(info.fingerprint)
    extra = info.meta.extra
    context_tokens = extra.get("context_tokens")
    fp16 = extra.get("fp16_bytes")
    return CardSummary(
        card_id=card_id,
        card_bytes=len(data),
        card_tokens=info.num_tokens,
        context_tokens=context_tokens if type(context_tokens) is int else info.num_tokens,
        fp16_bytes=fp16 if type(fp16) is int else info.fp16_bytes,
        bits=mean_width(info),
        sender=info.sender,
    )


def check_question(question: object, max_new_tokens: object) -> tuple[str, int]:
    """Validate an ``ask`` request's fields (ValueError with the reason)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"'question' is longer than {MAX_QUESTION_CHARS} characters")
    if type(max_new_tokens) is not int or not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"'max_new_tokens' must be an int in 1..{MAX_NEW_TOKENS_LIMIT}")
    return question, max_new_tokens


def answer_card(lm: LoadedModel, data: bytes, question: str, max_new_tokens: int) -> dict[str, Any]:
    """Answer from the card; ``ttft_s`` covers verifying and decoding the card, injection and the question."""
    answer = answer_from_card(lm, data, question, max_new_tokens=max_new_tokens)
    return {
        "answer": answer.text,
        "ttft_s": answer.ttft_s,
        "decode_s": answer.decode_s,
        "total_s": answer.decode_s + answer.generation.total_s,
        "new_tokens": answer.generation.new_tokens,
    }


def answer_text(lm: LoadedModel, context: str, question: str, max_new_tokens: int) -> dict[str, Any]:
    """The re-prefill baseline: read the whole context, then answer."""
    generation = answer_from_text(lm, context, question, max_new_tokens=max_new_tokens)
    tokens = len(lm.template.split(lm.tokenizer, context, question).prefix_ids)
    return {
        "answer": generation.text,
        "ttft_s": generation.ttft_s,
        "total_s": generation.total_s,
        "new_tokens": generation.new_tokens,
        "context_tokens": tokens,
    }


def measure_prefill_speed(lm: LoadedModel, tokens: int = PREFILL_PROBE_TOKENS) -> float:
    """Prefill tokens per second on this node, measured after a warm-up forward."""
    ids: list[int] = []
    while len(ids) < tokens:
        ids.extend(lm.tokenizer.encode(_PROBE_TEXT, add_special_tokens=False))
    prefill(lm, ids[:16])
    start = time.perf_counter()
    prefill(lm, ids[:tokens])
    return tokens / max(time.perf_counter() - start, 1e-9)
