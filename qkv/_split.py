"""Split hand-off: the card carries the KV of the context's tail; the receiver prefills the head itself.

On a slow link a whole card can take longer to cross than the receiver's own re-prefill. Attention is causal,
so the KV of the first ``h`` tokens depends on those tokens only: the sender can send them as token ids (a
few bytes each) and put only the KV of tokens ``[h, n)`` (at their original positions) in the card. The
receiver prefills the head while the card is in flight, then joins head and tail
(:meth:`~qkv._kv.KVSnapshot.followed_by`); time to first token is about
``max(prefill(head), transfer(tail card)) + join + own suffix``. The head is the cheap part to prefill (short
attention spans), the tail the expensive one.

The card stays self-contained: its metadata records the head (``extra["split_head"]``, see
:class:`SplitHead`), covered by the card's digest, so a receiver holding only the card prefills the head from
it. A reader that ignores the key answers as if the head had been evicted. Pieces:

* sender: :func:`tail_observation` restricts one prefill's :class:`~qkv._pipeline.Observation` to the tail
  (``qkv.encode_split`` composes it with the ordinary encoder);
* receiver: :func:`split_head` reads and validates the record from a card, :func:`prefill_head` prefills it,
  :func:`attach_head` checks a prefilled head against the card and joins it to the card's tail.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from ._card import MAX_TOKENS, CardInfo, DecodedCard, read_card_info
from ._errors import CardCompatError, CardFormatError
from ._hf import prefill
from ._kv import KVSnapshot

if TYPE_CHECKING:
    from ._modelstore import LoadedModel
    from ._pipeline import Observation

#: Key of the head record in ``CardMeta.extra`` (and in a head snapshot's ``extra``).
SPLIT_HEAD_KEY = "split_head"
#: Head token ids are vocabulary indices; no tokenizer we load has more than 2**31 entries.
MAX_TOKEN_ID = (1 << 31) - 1


@dataclass(frozen=True, kw_only=True)
class SplitHead:
    """The head a split card lacks: the ids of tokens ``0..h-1`` of the prompt (template included).

    ``template_prefix_tokens`` counts the head's leading template tokens (the tail's are in the card).
    :meth:`to_meta` / :meth:`from_meta` are its wire form, ``{"tokens": h, "ids": [...],
    "template_prefix_tokens": k}``; :meth:`from_meta` validates untrusted input.
    """

    token_ids: tuple[int, ...]
    template_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        ids = tuple(self.token_ids)
        object.__setattr__(self, "token_ids", ids)
        if not 1 <= len(ids) <= MAX_TOKENS:
            raise ValueError(f"a split head holds 1..{MAX_TOKENS} tokens, got {len(ids)}")
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= MAX_TOKEN_ID for i in ids):
            raise ValueError(f"split head token ids must be ints in 0..{MAX_TOKEN_ID}")
        prefix = self.template_prefix_tokens
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix <= len(ids):
            raise ValueError(f"template_prefix_tokens must be an int in 0..{len(ids)}, got {prefix!r}")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def to_meta(self) -> dict[str, Any]:
        """msgpack-safe form, as stored in the card's metadata."""
        return {
            "tokens": self.num_tokens,
            "ids": list(self.token_ids),
            "template_prefix_tokens": self.template_prefix_tokens,
        }

    @classmethod
    def from_meta(cls, value: object) -> SplitHead:
        """Parse :meth:`to_meta`'s form from untrusted input; anything malformed is a CardFormatError."""
        if not isinstance(value, Mapping):
            raise CardFormatError(f"card metadata: {SPLIT_HEAD_KEY} must be a map")
        tokens, ids = value.get("tokens"), value.get("ids")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_TOKENS:
            raise CardFormatError(f"card metadata: {SPLIT_HEAD_KEY}.tokens must be an int in 1..{MAX_TOKENS}")
        if not isinstance(ids, list | tuple) or len(ids) != tokens:
            raise CardFormatError(f"card metadata: {SPLIT_HEAD_KEY}.ids must be a list of {tokens} token ids")
        try:
            return cls(token_ids=tuple(ids), template_prefix_tokens=value.get("template_prefix_tokens", 0))
        except ValueError as exc:
            raise CardFormatError(f"card metadata: {SPLIT_HEAD_KEY}: {exc}") from exc


def split_head(card: bytes | bytearray | memoryview | CardInfo | DecodedCard) -> SplitHead | None:
    """The head a split card lacks, or ``None`` for an ordinary card. Cheap: reads metadata only.

    From bytes, the card's structure is checked but not its digest (``decode_card`` checks that); a
    malformed record raises :class:`CardFormatError`.
    """
    if isinstance(card, DecodedCard):
        info = card.info
    elif isinstance(card, CardInfo):
        info = card
    else:
        info = read_card_info(card)
    record = info.meta.extra.get(SPLIT_HEAD_KEY)
    return None if record is None else SplitHead.from_meta(record)


def prefill_head(lm: LoadedModel, head: SplitHead) -> KVSnapshot:
    """Receiver side: prefill the head's tokens at positions ``0..h-1``; can run before the card arrives.

    The snapshot records ``head`` in its ``extra`` so that :func:`attach_head` can check it belongs to the
    card. Ids outside this model's vocabulary raise :class:`CardFormatError` (they came from a card).
    """
    vocab = _vocab_size(lm)
    out_of_range = [i for i in head.token_ids if i >= vocab]
    if out_of_range:
        raise CardFormatError(
            f"split head holds token id {out_of_range[0]}, outside this model's vocabulary of {vocab}"
        )
    snapshot = prefill(lm, head.token_ids, template_prefix_tokens=head.template_prefix_tokens)
    return replace(snapshot, extra={SPLIT_HEAD_KEY: head})


def attach_head(head: KVSnapshot, tail: KVSnapshot, expected: SplitHead) -> KVSnapshot:
    """``head`` joined to a split card's ``tail``, after checking the head is the one the card names.

    ``head`` must come from :func:`prefill_head` of ``expected`` (the card's record): the same token ids,
    positions ``0..h-1``; otherwise :class:`CardCompatError`. A card whose tail starts inside its own head
    is malformed (:class:`CardFormatError`).
    """
    recorded = head.extra.get(SPLIT_HEAD_KEY)
    if not isinstance(recorded, SplitHead):
        raise CardCompatError(
            "the head snapshot does not say which tokens it holds: make it with prefill_head"
        )
    if recorded.num_tokens != expected.num_tokens or head.num_tokens != expected.num_tokens:
        raise CardCompatError(
            f"the card's head has {expected.num_tokens} tokens, the given head {head.num_tokens}"
        )
    if recorded != expected:
        raise CardCompatError("the given head was prefilled from other tokens than the card's head")
    expected_positions = torch.arange(expected.num_tokens, dtype=torch.int64)
    if not torch.equal(head.positions.to("cpu", torch.int64), expected_positions):
        raise CardCompatError(f"the head's positions are not 0..{expected.num_tokens - 1}")
    if tail.num_tokens and int(tail.positions[0]) < expected.num_tokens:
        raise CardFormatError(
            f"split card: its KV starts at position {int(tail.positions[0])}, inside its "
            f"{expected.num_tokens}-token head"
        )
    return head.followed_by(tail)


def tail_observation(obs: Observation, head_tokens: int) -> tuple[Observation, SplitHead]:
    """Sender side: ``obs`` restricted to tokens ``[head_tokens, n)``, and the head those tokens follow.

    KV, positions (kept original), window attention (columns of the tail tokens), the context span and the
    template prefix count are cut to the tail. ``head_tokens`` counts from the first token (template
    included) and must be in ``1..n-1``: the card keeps at least one token.
    """
    snapshot = obs.snapshot
    total = snapshot.num_tokens
    if isinstance(head_tokens, bool) or not isinstance(head_tokens, int) or not 1 <= head_tokens < total:
        raise ValueError(
            f"head_tokens must be in 1..{total - 1} for a context of {total} tokens (the card keeps at least "
            f"one token), got {head_tokens!r}"
        )
    if len(obs.prefix_ids) != total:
        raise ValueError("the observation does not carry its token ids: make it with observe()")
    template_prefix = snapshot.template_prefix_tokens
    head = SplitHead(
        token_ids=obs.prefix_ids[:head_tokens], template_prefix_tokens=min(template_prefix, head_tokens)
    )
    tail = KVSnapshot(
        keys=tuple(None if k is None else k[:, head_tokens:] for k in snapshot.keys),
        values=tuple(None if v is None else v[:, head_tokens:] for v in snapshot.values),
        positions=snapshot.positions[head_tokens:],
        fingerprint=snapshot.fingerprint,
        template_prefix_tokens=max(0, template_prefix - head_tokens),
        extra=dict(snapshot.extra),
    )
    start, end = obs.context_span
    restricted = replace(
        obs,
        snapshot=tail,
        attn=None if obs.attn is None else obs.attn[..., head_tokens:],
        context_span=(max(0, start - head_tokens), max(0, end - head_tokens)),
        prefix_ids=obs.prefix_ids[head_tokens:],
    )
    return restricted, head


def _vocab_size(lm: LoadedModel) -> int:
    embeddings: Any = lm.model.get_input_embeddings()
    return int(embeddings.weight.shape[0])
