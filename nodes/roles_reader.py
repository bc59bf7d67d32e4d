"""Reader role, model side: turn a document into what the budget policy chose to send.

Runs in the agent's model thread (blocking torch work); the agent publishes the result on the bus. A
:class:`SendPlan` says what to make: the text itself, a card under a budget, or a split (a card of the tail
and the head's token ids, sent ahead). Every artifact is published as a bus card whose announcement meta
carries ``rep`` (``text``, ``card``, ``head`` or ``probe``) so the receiver knows how to read the bytes.

Head wire form (``rep = "head"``): the ids as little-endian uint32, ``HEAD_ID_BYTES`` each (what the policy's
TTFT model counts); the meta names the tail card (``tail``), the token count (``tokens``) and the head's
template prefix tokens. :func:`parse_head` validates it as untrusted input.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from edgebus import HEAD_ID_BYTES
from qkv import (
    Budget,
    CrossModelCalibration,
    EncodedContext,
    LoadedModel,
    Observation,
    SplitHead,
    TranslateAt,
    encode_observation,
    encode_split_observation,
    observe,
)

#: Largest document a reader accepts over the control channel or from a topic, in bytes of UTF-8.
MAX_DOCUMENT_BYTES: Final = 512 * 1024
#: Most head tokens a receiver accepts in a head message (a card holds at most this many too).
MAX_HEAD_TOKENS: Final = 1 << 16
#: array type code of a 4-byte unsigned int (``I`` on every platform we run on; checked, not assumed).
_U32: Final = next(code for code in ("I", "L") if array.array(code).itemsize == HEAD_ID_BYTES)

Kind = Literal["text", "card", "split"]


@dataclass(frozen=True, kw_only=True)
class SendPlan:
    """What to send one receiver (or several that decided alike): the policy's decision made concrete."""

    kind: Kind
    budget: Budget | None = None  # card and split
    head_tokens: int = 0  # split
    translate: CrossModelCalibration | None = None  # a card for a receiver of another model
    translate_at: TranslateAt = "receiver"

    def __post_init__(self) -> None:
        if self.kind != "text" and self.budget is None:
            raise ValueError(f"a {self.kind} plan needs a budget")
        if self.kind == "split" and self.head_tokens < 1:
            raise ValueError("a split plan needs head_tokens >= 1")
        if self.translate is not None and self.kind != "card":
            raise ValueError("only a whole card is translated for another model")

    @property
    def key(self) -> tuple[Any, ...]:
        translation = None if self.translate is None else (self.translate.id, self.translate_at)
        return (self.kind, self.budget, self.head_tokens, translation)


@dataclass(frozen=True, kw_only=True)
class ReadResult:
    """What the reader made for one plan: the text bytes, or a card (and for a split, its head)."""

    plan: SendPlan
    text: bytes = b""
    encoded: EncodedContext | None = None
    context_tokens: int = 0

    @property
    def head(self) -> SplitHead | None:
        return None if self.encoded is None else self.encoded.head

    @property
    def data(self) -> bytes:
        return self.text if self.encoded is None else self.encoded.data

    def meta(self) -> dict[str, Any]:
        """Announcement meta: how to read the bytes, and what a receiver needs to decide to pull them."""
        if self.encoded is None:
            return {"rep": "text", "tokens": self.context_tokens, "text_bytes": len(self.text)}
        enc = self.encoded
        meta: dict[str, Any] = {
            "rep": "card",
            "tokens": enc.context_tokens,
            "card_tokens": enc.card_tokens,
            "head_tokens": 0 if enc.head is None else enc.head.num_tokens,
            "bits": float(enc.budget.bits),
            "fp16_bytes": enc.fp16_bytes,
            "card_bytes": enc.card_bytes,
        }
        if self.plan.translate is not None:
            meta["calibration"] = self.plan.translate.id
        return meta

    def reply(self) -> dict[str, Any]:
        """The read request's reply fields for this artifact (the agent adds ids, topic and decisions)."""
        enc = self.encoded
        head = self.head
        return {
            "representation": self.plan.kind,
            "context_tokens": self.context_tokens,
            "card_tokens": 0 if enc is None else enc.card_tokens,
            "head_tokens": 0 if head is None else head.num_tokens,
            "card_bytes": 0 if enc is None else enc.card_bytes,
            "text_bytes": len(self.text),
            "wire_bytes": len(self.data) + (0 if head is None else HEAD_ID_BYTES * head.num_tokens),
            "fp16_bytes": 0 if enc is None else enc.fp16_bytes,
            "bits": None if enc is None else float(enc.budget.bits),
            "budget": None if enc is None else enc.budget.to_dict(),
            "prefill_s": 0.0 if enc is None else enc.prefill_s,
            "encode_s": 0.0 if enc is None else enc.encode_s,
            "translate": None
            if self.plan.translate is None
            else {"calibration": self.plan.translate.id, "at": self.plan.translate_at},
        }


def count_tokens(lm: LoadedModel, text: str) -> int:
    """Tokens the reader prefills for ``text``: the prompt template's head and the context."""
    return len(lm.template.split(lm.tokenizer, text, "").prefix_ids)


class PrefillCache:
    """The last document's prefill (with window attention), so that cards of one document at several
    budgets (receivers that decided differently, a benchmark's alternatives) cost one prefill.

    Holds one observation (the KV of one context: ~190 MB at 4K SmolLM2 tokens in fp32, plus the window's
    attention). Used from the model thread only.
    """

    def __init__(self) -> None:
        self._key: tuple[str, int] | None = None
        self._obs: Observation | None = None

    def observe(self, lm: LoadedModel, text: str, window: int) -> Observation:
        key = (text, window)
        if self._key != key or self._obs is None:
            self._obs, self._key = None, None  # release the old one before the new prefill allocates
            self._obs, self._key = observe(lm, text, window=window), key
        return self._obs


def read_document(
    lm: LoadedModel, text: str, plan: SendPlan, *, sender: str, cache: PrefillCache | None = None
) -> ReadResult:
    """Make what ``plan`` says from ``text`` (ValueError for an empty document or an impossible plan)."""
    if not text.strip():
        raise ValueError("the document is empty")
    if plan.kind == "text":
        return ReadResult(plan=plan, text=text.encode("utf-8"), context_tokens=count_tokens(lm, text))
    budget = plan.budget
    assert budget is not None
    cache = cache or PrefillCache()
    obs = cache.observe(lm, text, budget.window)
    if plan.kind == "split":
        encoded = encode_split_observation(
            lm, obs, budget, head_tokens=plan.head_tokens, context=text, sender=sender
        )
    else:
        encoded = encode_observation(
            lm,
            obs,
            budget,
            context=text,
            sender=sender,
            translate=() if plan.translate is None else plan.translate,
            translate_at=plan.translate_at,
        )
    return ReadResult(plan=plan, encoded=encoded, context_tokens=encoded.context_tokens)


def head_message(head: SplitHead, tail_card: str) -> tuple[bytes, dict[str, Any]]:
    """(bytes, announcement meta) of the head a split sends ahead of its tail card."""
    ids = array.array(_U32, head.token_ids)
    if sys.byteorder != "little":
        ids.byteswap()
    meta = {
        "rep": "head",
        "tail": tail_card,
        "tokens": head.num_tokens,
        "template_prefix_tokens": head.template_prefix_tokens,
    }
    return ids.tobytes(), meta


def parse_head(data: bytes, meta: Mapping[str, Any]) -> tuple[SplitHead, str]:
    """(head, tail card id) of a head message from a peer; ValueError naming what is wrong."""
    tokens, tail = meta.get("tokens"), meta.get("tail")
    if not isinstance(tail, str) or not 0 < len(tail) <= 128:
        raise ValueError("head message: 'tail' must be a card id")
    if type(tokens) is not int or not 1 <= tokens <= MAX_HEAD_TOKENS:
        raise ValueError(f"head message: 'tokens' must be an int in 1..{MAX_HEAD_TOKENS}")
    if len(data) != HEAD_ID_BYTES * tokens:
        raise ValueError(f"head message: {len(data)} bytes for {tokens} token ids")
    ids = array.array(_U32)
    ids.frombytes(data)
    if sys.byteorder != "little":
        ids.byteswap()
    prefix = meta.get("template_prefix_tokens", 0)
    # SplitHead checks the ids' range and the prefix count (ValueError); the model's vocabulary is checked
    # when the head is prefilled.
    return SplitHead(token_ids=tuple(ids), template_prefix_tokens=prefix), tail


def decode_document(data: bytes) -> str:
    """A document received as bytes (from a topic): UTF-8 text, bounded, not blank."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ValueError(f"document of {len(data)} bytes exceeds {MAX_DOCUMENT_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"document is not UTF-8: {exc}") from exc
    if not text.strip():
        raise ValueError("the document is empty")
    return text
