"""Relay role, model side: answer from a card, append the relay's own tokens' KV, and re-encode it.

Multi-hop hand-off: reader -> relay -> answerer. The relay decodes the incoming card, answers its configured
question from it, and appends a short note with that answer to the *cache*: it prefills the note's tokens on
top of the decoded KV at their true positions (``next_position + arange``), so the extended card means
"the context, then the note", exactly as if the note had followed the context in one prefill. The new card
is encoded at one uniform width and carries the original sender's metadata plus ``relayed_by`` and ``note``.

:func:`append_tokens` uses transformers' public cache API (``DynamicCache`` layers, explicit
``position_ids``); it refuses models whose cache drops tokens (sliding-window layers), since the appended
snapshot would then be missing some.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qkv._card import CardMeta, EncodingPlan, decode_card, encode_card, read_card_info
from qkv._errors import CardCompatError
from qkv._hf import build_cache, generate_from_snapshot
from qkv._kv import KVSnapshot
from qkv._modelstore import LoadedModel

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


def append_tokens(lm: LoadedModel, snapshot: KVSnapshot, token_ids: Sequence[int]) -> KVSnapshot:
    """``snapshot`` extended by the KV of ``token_ids``, prefilled on top of it at their true positions."""
    if not token_ids:
        return snapshot
    cache = build_cache(lm, snapshot)
    positions = snapshot.next_position + torch.arange(len(token_ids), dtype=torch.int64)
    ids = torch.tensor([list(token_ids)], dtype=torch.int64, device=lm.device)
    with torch.no_grad():
        lm.model(
            input_ids=ids,
            position_ids=positions.to(lm.device).unsqueeze(0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    expected = snapshot.num_tokens + len(token_ids)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for index, layer in enumerate(cache.layers):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.shape[-2] != expected:
            raise CardCompatError(
                f"layer {index} of this model's cache does not keep every token; cannot append to a card"
            )
        keys.append(k[0])
        values.append(v[0])
    return KVSnapshot(
        keys=tuple(keys),
        values=tuple(values),
        positions=torch.cat([snapshot.positions, positions]),
        fingerprint=snapshot.fingerprint,
        template_prefix_tokens=snapshot.template_prefix_tokens,
    )


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
    extended = append_tokens(lm, card.snapshot, note_ids)
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
