"""Relay role, model side: answer from a card, append the relay's own tokens' KV, and re-encode it.

Multi-hop hand-off: reader -> relay -> answerer. The relay decodes the incoming card, answers its configured
question from it, and appends a short note with that answer to the *cache*: it prefills the note's tokens on
top of the decoded KV at their true positions (``next_position + arange``), so the extended card means
"the context, then the note", exactly as if the note had followed the context in one prefill. The new card
is encoded at one uniform width and carries the original sender's metadata plus ``relayed_by`` and ``note``.

Appending is :func:`qkv.extend_snapshot`; it refuses cards with unsent layers, since the note's KV in the
sent layers would then depend on layers that never saw the context.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qkv import (
    CardCompatError,
    CardMeta,
    EncodingPlan,
    LoadedModel,
    decode_card,
    encode_card,
    extend_snapshot,
    generate_from_snapshot,
    read_card_info,
)

from .roles_answerer import modal_width

#: Most hops a card may have been relayed; a relay refuses to extend a card that went round this often.
MAX_HOPS = 8


@dataclass(frozen=True, kw_only=True)
class RelayedCard:
    data: bytes
    card_id: str
    answer: str
    note: str
    appended_tokens: int
    hops: int
    bits: int


def relay_card(
    lm: LoadedModel,
    data: bytes,
    *,
    sender: str,
    question: str,
    max_new_tokens: int,
    bits: int | None = None,
) -> RelayedCard:
    """Answer ``question`` from the card, append a note with the answer, re-encode it.

    Raises a ``qkv.CardError`` for a card that is malformed, for another model, or relayed too often.
    """
    info = read_card_info(data)
    hops_before = info.meta.extra.get("relayed_by", [])
    if not isinstance(hops_before, list) or not all(isinstance(h, str) for h in hops_before):
        hops_before = []
    if len(hops_before) >= MAX_HOPS:
        raise CardCompatError(f"card was already relayed {len(hops_before)} times")
    dtype: Any = getattr(lm.model, "dtype", torch.float32)
    card = decode_card(data, expect=lm.fingerprint, device=lm.device, dtype=dtype)
    suffix = lm.template.split(lm.tokenizer, "", question).suffix_ids
    answer = generate_from_snapshot(lm, card.snapshot, suffix, max_new_tokens=max_new_tokens).text
    note = f"\nNote from {sender}: {answer.strip() or '(no answer)'}\n"
    note_ids = lm.tokenizer.encode(note, add_special_tokens=False)
    extended = extend_snapshot(lm, card.snapshot, note_ids)
    width = bits if bits is not None else modal_width(info)
    plan = EncodingPlan.uniform(extended.num_layers, width, group_size=info.group_size)
    meta = CardMeta(
        sender=sender,
        facts=card.meta.facts,
        budget=card.meta.budget,
        extra={**card.meta.extra, "relayed_by": [*hops_before, sender], "note": note},
    )
    out = encode_card(extended, plan, meta=meta)
    return RelayedCard(
        data=out,
        card_id=read_card_info(out).card_id,
        answer=answer,
        note=note,
        appended_tokens=len(note_ids),
        hops=len(hops_before) + 1,
        bits=width,
    )


#: Announcement fields that describe the incoming hand-off, not the relayed card: the receivers the reader
#: addressed (the relayed card is for whoever subscribes to the relay's topic), and a split's parts.
INCOMING_ONLY_META = frozenset({"for", "rep", "tail"})


def relayed_meta(incoming: Mapping[str, Any], *, card_id: str, out: RelayedCard) -> dict[str, Any]:
    """The announcement metadata of a relayed card: the incoming card's, less its addressing, plus the hop."""
    meta = {k: v for k, v in incoming.items() if k not in INCOMING_ONLY_META}
    meta.update(hops=out.hops, bits=out.bits, card_bytes=len(out.data), source=card_id)
    return meta
