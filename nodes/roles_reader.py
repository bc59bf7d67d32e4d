"""Reader role, model side: prefill a document and turn it into a CacheCard plus its announcement meta.

Runs in the agent's model thread (blocking torch work); the agent publishes the result on the bus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qkv import Budget, EncodedContext, LoadedModel, encode_context

#: Largest document a reader accepts over the control channel or from a topic, in bytes of UTF-8.
MAX_DOCUMENT_BYTES = 512 * 1024


@dataclass(frozen=True, kw_only=True)
class ReadResult:
    encoded: EncodedContext
    bits: float

    def meta(self) -> dict[str, Any]:
        """Announcement meta: what a receiver needs to decide whether to pull the card."""
        enc = self.encoded
        return {
            "tokens": enc.context_tokens,
            "card_tokens": enc.card_tokens,
            "bits": self.bits,
            "fp16_bytes": enc.fp16_bytes,
            "card_bytes": enc.card_bytes,
        }

    def reply(self, topic: str) -> dict[str, Any]:
        enc = self.encoded
        return {
            "card": enc.card_id,
            "topic": topic,
            "context_tokens": enc.context_tokens,
            "card_tokens": enc.card_tokens,
            "card_bytes": enc.card_bytes,
            "fp16_bytes": enc.fp16_bytes,
            "bits": self.bits,
            "prefill_s": enc.prefill_s,
            "encode_s": enc.encode_s,
        }


def read_document(lm: LoadedModel, text: str, budget: Budget, *, sender: str) -> ReadResult:
    """Prefill ``text`` and encode it under ``budget`` (ValueError for an empty document)."""
    if not text.strip():
        raise ValueError("the document is empty")
    encoded = encode_context(lm, text, budget, sender=sender)
    return ReadResult(encoded=encoded, bits=float(budget.bits))


def decode_document(data: bytes) -> str:
    """A document received as bytes (from a topic): UTF-8 text, bounded."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ValueError(f"document of {len(data)} bytes exceeds {MAX_DOCUMENT_BYTES}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"document is not UTF-8: {exc}") from exc
