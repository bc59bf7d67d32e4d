"""Context -> CacheCard -> answer: the codec's pieces composed the way a sender and a receiver use them.

The sender (:func:`encode_context`) prefills the context once, then applies a :class:`~qkv._budget.Budget`:
token eviction (with optional Orthogonal BackFill), layer selection, adaptive or uniform widths, token-level
mixed precision and fact extraction, and writes one CacheCard. The receiver (:func:`answer_from_card`)
verifies and decodes the card against its own model fingerprint and generates from it with only its own
question tokens; it never sees the context text. A split card (:func:`encode_split`, ``qkv._split``) holds
only the KV of the context's tail and the head's token ids; the receiver prefills the head itself.

Cross-model (``qkv._crossmodel``): ``encode_context(..., translate=calibration)`` writes a card that names
the calibration a receiver of another model must translate it with (``translate_at="receiver"``: the card
stays an ordinary card of the sender's model), or one already translated into the receiver's KV space
(``translate_at="sender"``). :func:`receive_card` (used by :func:`answer_from_card`, ``calibrations=``)
turns either into a snapshot for the receiver's model, or refuses with a CardCompatError naming what is
missing.

Honest accounting: ``fp16_bytes`` is the fp16 size of the *whole* context's KV before any eviction or layer
selection, so ``fp16_bytes / card_bytes`` is the compression a receiver actually gets over sending the cache.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ._allocate import SensitivityProfile
from ._budget import Budget
from ._calibrate import default_profile
from ._card import CardInfo, CardMeta, DecodedCard, EncodingPlan, decode_card, encode_card, read_card_info
from ._crossmodel import (
    CROSSMODEL_KEY,
    CrossModelCalibration,
    CrossModelRecord,
    TranslateAt,
    crossmodel_record,
    join_receiver_head,
    receiver_suffix_ids,
    require_calibration,
    translate_snapshot,
)
from ._errors import CalibrationError, CardCompatError, CardFormatError
from ._evict import evict
from ._facts import extract_facts
from ._hf import Generation, generate_from_snapshot, generate_from_text, prefill, prefill_observed
from ._importance import attention_mass_by_class, class_bits_for_budget, head_importance, token_classes
from ._kv import KVSnapshot, ModelFingerprint
from ._layers import select_layers
from ._modelstore import LoadedModel
from ._split import SPLIT_HEAD_KEY, SplitHead, attach_head, prefill_head, split_head, tail_observation

#: Shares of tokens in the importance classes used by token-level mixed precision (most important first).
TOKEN_CLASS_SHARES = (0.1, 0.3, 0.6)
FP16_SINK_BITS = 16.0  # what an fp16 sink token costs per value (no scales)


@dataclass(frozen=True, kw_only=True)
class EncodedContext:
    """A card and what it cost to make."""

    data: bytes
    card_id: str
    budget: Budget
    context_tokens: int  # tokens the sender prefilled (template included)
    card_tokens: int  # tokens kept in the card
    layers_sent: int
    fp16_bytes: int  # fp16 KV of the whole context: the ratio's denominator
    facts: str
    prefill_s: float
    encode_s: float  # everything after the prefill: attention stats, eviction, allocation, packing
    # Split hand-off: the head the card lacks (its tokens are in ``context_tokens``, not ``card_tokens``).
    head: SplitHead | None = None

    @property
    def card_bytes(self) -> int:
        return len(self.data)

    @property
    def ratio(self) -> float:
        return self.fp16_bytes / len(self.data)


@dataclass(frozen=True, kw_only=True)
class CardAnswer:
    """The receiver's answer from a card; ``ttft_s`` counts card decoding too."""

    generation: Generation
    decode_s: float
    card: DecodedCard  # its snapshot is the KV that was injected (see ReceivedCard)
    # Prefilling a head here (a split card's, when none was given; a translated card's template head).
    head_s: float = 0.0
    translate_s: float = 0.0  # a card of another model, translated here
    calibration_id: str | None = None  # the calibration that translated the card (here or at the sender)

    @property
    def text(self) -> str:
        return self.generation.text

    @property
    def ttft_s(self) -> float:
        return self.decode_s + self.head_s + self.translate_s + self.generation.ttft_s


def _layer_widths(
    lm: LoadedModel,
    budget: Budget,
    num_layers: int,
    sent: Sequence[int],
    profile: SensitivityProfile | None,
    *,
    sink_share: float = 0.0,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-layer key and value widths; layers not sent get width 0.

    An adaptive budget without an explicit profile uses the one calibrated for this model and card coding,
    if any. ``sink_share`` is the fraction of tokens stored fp16 as sinks: an adaptive budget pays their 16
    bits per value and spends what remains on the rest.
    """
    if not budget.adaptive:
        width = int(budget.bits)
        keys = tuple(width if i in sent else 0 for i in range(num_layers))
        return keys, keys
    if profile is None:
        profile = default_profile(
            lm, budget.group_size, rotation=budget.rotation, fp16_sinks=budget.fp16_sinks
        )
    if profile is None:
        coding = ""
        if budget.rotation != "none" or budget.fp16_sinks:
            coding = f" --rotation {budget.rotation} --fp16-sinks {budget.fp16_sinks}"
        raise CalibrationError(
            "an adaptive budget needs a sensitivity profile: run "
            f"`edgebus calibrate --model NAME --data FILE --group-size {budget.group_size}{coding}`"
        )
    profile.require(group_size=budget.group_size, rotation=budget.rotation, fp16_sinks=budget.fp16_sinks)
    bits = budget.bits
    if 0.0 < sink_share < 1.0:
        bits = (budget.bits - FP16_SINK_BITS * sink_share) / (1.0 - sink_share)
    allocation = profile.allocate(bits, layers=list(sent))
    key_bits = tuple(int(w) if w is not None else 0 for w in allocation.key_bits)
    value_bits = tuple(int(w) if w is not None else 0 for w in allocation.value_bits)
    return key_bits, value_bits


def _class_widths(
    widths: Sequence[int], shares: Sequence[float], class_mass: Sequence[float]
) -> tuple[tuple[int, ...], ...]:
    """Per layer, one width per importance class whose token-weighted mean stays within the layer's width.

    Classes share the layer's quantization groups, so the scale/zero overhead is the same as uniform.
    """
    cache: dict[int, tuple[int, ...]] = {}
    out: list[tuple[int, ...]] = []
    for width in widths:
        if width == 0 or width > 8:
            out.append(tuple(width for _ in shares))
            continue
        if width not in cache:
            cache[width] = class_bits_for_budget(shares, float(width), class_mass=class_mass)
        out.append(cache[width])
    return tuple(out)


def _token_mixed_widths(budget: Budget, num_layers: int, sent: Sequence[int]) -> tuple[int, ...]:
    """Base width per layer for token-mixed (non-adaptive) budgets: the code-width average, floored."""
    width = math.floor(budget.bits)
    return tuple(width if i in sent else 0 for i in range(num_layers))


@dataclass(frozen=True, kw_only=True)
class Observation:
    """What one prefill of a context yields: the KV, and window attention when a budget needs it."""

    snapshot: KVSnapshot
    attn: torch.Tensor | None  # [layers, heads, window, tokens], or None
    context_span: tuple[int, int]  # [start, end) of the context tokens
    prefill_s: float
    prefix_ids: tuple[int, ...] = ()  # the prefilled token ids (a split card sends the head's)


def observe(lm: LoadedModel, context: str, *, window: int | None = None) -> Observation:
    """Prefill ``context``; with ``window``, also the attention of its last ``window`` tokens."""
    parts = lm.template.split(lm.tokenizer, context, "")
    start = time.perf_counter()
    attn: torch.Tensor | None = None
    if window is not None:
        snapshot, attn = prefill_observed(
            lm, parts.prefix_ids, window=window, template_prefix_tokens=parts.template_prefix_tokens
        )
    else:
        snapshot = prefill(lm, parts.prefix_ids, template_prefix_tokens=parts.template_prefix_tokens)
    return Observation(
        snapshot=snapshot,
        attn=attn,
        context_span=parts.context_token_span,
        prefill_s=time.perf_counter() - start,
        prefix_ids=parts.prefix_ids,
    )


def needs_attention(budget: Budget) -> bool:
    """True when the budget uses attention statistics (eviction, token classes, layer selection)."""
    return budget.keep < 1.0 or budget.token_mixed or budget.layers < 1.0


def encode_context(
    lm: LoadedModel,
    context: str,
    budget: Budget | None = None,
    *,
    sender: str = "",
    profile: SensitivityProfile | None = None,
    translate: CrossModelCalibration | Sequence[CrossModelCalibration] = (),
    translate_at: TranslateAt = "receiver",
) -> EncodedContext:
    """Prefill ``context`` with ``lm`` and write one CacheCard under ``budget``.

    With ``translate`` (calibrations from ``lm`` to other models) the card is for those models too: see
    :func:`encode_observation`.
    """
    budget = budget or Budget()
    obs = observe(lm, context, window=budget.window if needs_attention(budget) else None)
    return encode_observation(
        lm, obs, budget, context=context, sender=sender, profile=profile, translate=translate,
        translate_at=translate_at,
    )  # fmt: skip


def encode_observation(
    lm: LoadedModel,
    obs: Observation,
    budget: Budget,
    *,
    context: str,
    sender: str = "",
    profile: SensitivityProfile | None = None,
    extra: Mapping[str, Any] | None = None,
    translate: CrossModelCalibration | Sequence[CrossModelCalibration] = (),
    translate_at: TranslateAt = "receiver",
) -> EncodedContext:
    """Apply ``budget`` to an observed prefill and write the card (``context`` feeds fact extraction).

    ``extra`` adds keys to the card's ``CardMeta.extra`` (overriding the defaults of the same name).

    Cross-model (``translate``: calibrations from ``lm`` to other models, see ``qkv._crossmodel``):
    ``translate_at="receiver"`` writes an ordinary card of ``lm`` whose metadata names, per receiver model,
    the calibration to translate it with (any number of receivers); ``translate_at="sender"`` translates the
    (evicted) context KV with the one calibration given and writes a card in the receiver's KV space,
    context only, uniform width ``budget.bits``. Both refuse layer selection and an eviction window
    shorter than the template tail (ValueError), and a calibration of another sender model or template
    (CalibrationError); at the sender, adaptive and token-mixed widths are refused (they are measured on the
    sender's model).
    """
    calibrations = (translate,) if isinstance(translate, CrossModelCalibration) else tuple(translate)
    if calibrations:
        _check_translation(lm, obs, budget, calibrations, translate_at)
        record = CrossModelRecord.for_calibrations(calibrations, at=translate_at)
        if translate_at == "sender":
            calibration = calibrations[0]
            return _encode_translated(lm, obs, budget, calibration, record, context=context, sender=sender)
        extra = {CROSSMODEL_KEY: record.to_meta(), **(extra or {})}
    if needs_attention(budget) and obs.attn is None:
        raise ValueError("this budget needs window attention: observe(..., window=budget.window)")
    start = time.perf_counter()
    context_tokens = obs.snapshot.num_tokens
    fp16_bytes = obs.snapshot.fp16_bytes()
    num_layers = obs.snapshot.num_layers
    snapshot, per_head = _evicted(lm, obs, budget)

    sent: tuple[int, ...] = tuple(range(num_layers))
    if budget.layers < 1.0 and per_head is not None:
        sent = select_layers(per_head, fraction=budget.layers, context_span=obs.context_span)
        keep_layer = set(sent)
        snapshot = replace(
            snapshot,
            keys=tuple(k if i in keep_layer else None for i, k in enumerate(snapshot.keys)),
            values=tuple(v if i in keep_layer else None for i, v in enumerate(snapshot.values)),
        )

    sinks = snapshot.positions < budget.fp16_sinks
    sink_count = int(sinks.sum())
    if budget.token_mixed and not budget.adaptive:
        key_bits = value_bits = _token_mixed_widths(budget, num_layers, sent)
    else:
        key_bits, value_bits = _layer_widths(
            lm, budget, num_layers, sent, profile, sink_share=sink_count / snapshot.num_tokens
        )

    classes: torch.Tensor | None = None
    class_key_bits = class_value_bits = None
    if budget.token_mixed and per_head is not None:
        received = per_head.mean(dim=(0, 1))
        classes = token_classes(received, shares=TOKEN_CLASS_SHARES)
        mass = attention_mass_by_class(received, classes, len(TOKEN_CLASS_SHARES))
        class_key_bits = _class_widths(key_bits, TOKEN_CLASS_SHARES, mass)
        class_value_bits = _class_widths(value_bits, TOKEN_CLASS_SHARES, mass)

    plan = EncodingPlan(
        key_bits=key_bits,
        value_bits=value_bits,
        group_size=budget.group_size,
        token_classes=classes,
        class_key_bits=class_key_bits,
        class_value_bits=class_value_bits,
        rotation=budget.rotation,
    ).with_fp16_tokens(sinks.cpu())
    meta = _card_meta(
        budget,
        context=context,
        sender=sender,
        extra={"context_tokens": context_tokens, "fp16_bytes": fp16_bytes, "layers_sent": list(sent)},
        more=extra,
    )
    data = encode_card(snapshot, plan, meta=meta)
    encode_s = time.perf_counter() - start
    return EncodedContext(
        data=data,
        card_id=read_card_info(data).card_id,
        budget=budget,
        context_tokens=context_tokens,
        card_tokens=snapshot.num_tokens,
        layers_sent=len(sent),
        fp16_bytes=fp16_bytes,
        facts=meta.facts,
        prefill_s=obs.prefill_s,
        encode_s=encode_s,
    )


def _evicted(lm: LoadedModel, obs: Observation, budget: Budget) -> tuple[KVSnapshot, torch.Tensor | None]:
    """The observed snapshot after the budget's token eviction, and per-head importance of the kept tokens.

    Importance (``[layers, kv_heads, tokens]``) is ``None`` when the budget uses no attention statistics.
    """
    snapshot = obs.snapshot
    if obs.attn is None or not needs_attention(budget):
        return snapshot, None
    per_head = head_importance(obs.attn, num_kv_heads=lm.fingerprint.num_kv_heads)
    if budget.keep < 1.0:
        snapshot = evict(
            snapshot,
            per_head,
            keep=budget.keep,
            sinks=budget.sinks,
            window=budget.window,
            obf=budget.obf,
            obf_rank=budget.obf_rank,
        )
        # The statistics' columns are the observed tokens, in position order: find the kept ones by position
        # (a split card's tail starts at its head's length, not at 0).
        per_head = per_head[:, :, torch.searchsorted(obs.snapshot.positions, snapshot.positions)]
    return snapshot, per_head


def _card_meta(
    budget: Budget,
    *,
    context: str,
    sender: str,
    extra: Mapping[str, Any],
    more: Mapping[str, Any] | None = None,
) -> CardMeta:
    return CardMeta(
        sender=sender,
        created=time.time(),
        facts=extract_facts(context).to_text() if budget.facts else "",
        budget=budget.to_dict(),
        extra={**extra, **(more or {})},
    )


def _check_translation(
    lm: LoadedModel,
    obs: Observation,
    budget: Budget,
    calibrations: Sequence[CrossModelCalibration],
    translate_at: TranslateAt,
) -> None:
    """Refuse, before any work, a translated card the receivers could not use (see encode_observation)."""
    if translate_at not in ("receiver", "sender"):
        raise ValueError(f"translate_at must be 'receiver' or 'sender', got {translate_at!r}")
    if translate_at == "sender" and len(calibrations) != 1:
        raise ValueError(f"a card translated at the sender is for one receiver, got {len(calibrations)}")
    if translate_at == "sender" and (budget.adaptive or budget.token_mixed):
        raise ValueError("a card translated at the sender takes a uniform width (adaptive/token_mixed off)")
    if budget.layers < 1.0:
        raise ValueError("a translated card needs every layer: no layer selection (budget.layers < 1)")
    head, end = obs.context_span[0], obs.context_span[1]
    tail = obs.snapshot.num_tokens - end
    for calibration in calibrations:
        side = calibration.sender
        if side.fingerprint != lm.fingerprint:
            raise CalibrationError(f"{calibration.describe()} is not for this sender model, {lm.name}")
        if (side.head_tokens, side.tail_tokens) != (head, tail):
            raise CalibrationError(
                f"{calibration.describe()} was fitted with {side.head_tokens} template tokens before the "
                f"context and {side.tail_tokens} after ({side.template}); this prompt has {head} and {tail}"
            )
        if budget.keep < 1.0 and budget.window < tail:
            raise ValueError(
                f"eviction must keep the {tail}-token template tail (budget.window >= {tail}): the receiver "
                "finds the context's end from it"
            )


def _encode_translated(
    lm: LoadedModel,
    obs: Observation,
    budget: Budget,
    calibration: CrossModelCalibration,
    record: CrossModelRecord,
    *,
    context: str,
    sender: str,
) -> EncodedContext:
    """A card translated at the sender: the evicted context KV mapped into the receiver's KV space."""
    if needs_attention(budget) and obs.attn is None:
        raise ValueError("this budget needs window attention: observe(..., window=budget.window)")
    start = time.perf_counter()
    snapshot, _ = _evicted(lm, obs, budget)
    receiver = calibration.receiver.fingerprint
    translated = translate_snapshot(snapshot, calibration, receiver)
    plan = EncodingPlan.uniform(
        receiver.num_layers, int(budget.bits), group_size=budget.group_size, rotation=budget.rotation
    )
    # fp16_bytes stays the sender's whole prompt (what it prefilled), as for every card.
    meta = _card_meta(
        budget,
        context=context,
        sender=sender,
        extra={
            "context_tokens": obs.snapshot.num_tokens,
            "fp16_bytes": obs.snapshot.fp16_bytes(),
            "layers_sent": list(range(receiver.num_layers)),
            CROSSMODEL_KEY: record.to_meta(),
        },
    )
    data = encode_card(translated, plan, meta=meta)
    return EncodedContext(
        data=data,
        card_id=read_card_info(data).card_id,
        budget=budget,
        context_tokens=obs.snapshot.num_tokens,
        card_tokens=translated.num_tokens,
        layers_sent=receiver.num_layers,
        fp16_bytes=obs.snapshot.fp16_bytes(),
        facts=meta.facts,
        prefill_s=obs.prefill_s,
        encode_s=time.perf_counter() - start,
    )


def encode_split(
    lm: LoadedModel,
    context: str,
    budget: Budget | None = None,
    *,
    head_tokens: int,
    sender: str = "",
    profile: SensitivityProfile | None = None,
) -> EncodedContext:
    """A split card: the KV of tokens ``[head_tokens, n)`` under ``budget``, plus the head's token ids.

    One prefill of the whole context (the tail's KV depends on the head); ``budget`` applies to the tail
    only (the receiver prefills the head exactly). ``head_tokens`` counts from the first token, template
    included: 0 writes an ordinary card, ``1..n-1`` a split one (``qkv._split``), anything else is a
    ValueError. Layer selection is refused: the joined cache would lack the tail in some layers only.
    ``fp16_bytes`` and ``context_tokens`` stay the whole context's.
    """
    budget = budget or Budget()
    _check_split(budget, head_tokens)
    obs = observe(lm, context, window=budget.window if needs_attention(budget) else None)
    return encode_split_observation(
        lm, obs, budget, head_tokens=head_tokens, context=context, sender=sender, profile=profile
    )


def _check_split(budget: Budget, head_tokens: int) -> None:
    if isinstance(head_tokens, bool) or not isinstance(head_tokens, int) or head_tokens < 0:
        raise ValueError(f"head_tokens must be an int >= 0, got {head_tokens!r}")
    if head_tokens and budget.layers < 1.0:
        raise ValueError("a split card cannot use layer selection (budget.layers < 1)")


def encode_split_observation(
    lm: LoadedModel,
    obs: Observation,
    budget: Budget,
    *,
    head_tokens: int,
    context: str,
    sender: str = "",
    profile: SensitivityProfile | None = None,
) -> EncodedContext:
    """:func:`encode_split` from a context already observed (``obs``: its prefill, with the attention
    statistics ``budget`` needs)."""
    _check_split(budget, head_tokens)
    if head_tokens == 0:
        return encode_observation(lm, obs, budget, context=context, sender=sender, profile=profile)
    tail, head = tail_observation(obs, head_tokens)
    context_tokens, fp16_bytes = obs.snapshot.num_tokens, obs.snapshot.fp16_bytes()
    encoded = encode_observation(
        lm,
        tail,
        budget,
        context=context,
        sender=sender,
        profile=profile,
        extra={"context_tokens": context_tokens, "fp16_bytes": fp16_bytes, SPLIT_HEAD_KEY: head.to_meta()},
    )
    return replace(encoded, context_tokens=context_tokens, fp16_bytes=fp16_bytes, head=head)


@dataclass(frozen=True, kw_only=True)
class ReceivedCard:
    """A card made ready for the receiver's model: verified, decoded, joined with its head, translated.

    ``snapshot`` (the card's) is injected as it is; a translated one (here, or at the sender) holds this
    receiver's own template head and the context, but not its template tail: :meth:`suffix_ids` adds it. The
    card's snapshot is the KV to inject, not the one decoded: a joined or translated card's decoded KV is not
    kept, so that an answer holds one copy of the context's KV, not two (at 4K tokens of SmolLM2-135M, 189 MB
    each).
    """

    card: DecodedCard
    calibration_id: str | None = None  # the calibration that translated the KV, here or at the sender
    decode_s: float = 0.0
    head_s: float = 0.0  # prefilling a head here (split card; template head of a translated card)
    translate_s: float = 0.0

    @property
    def snapshot(self) -> KVSnapshot:
        return self.card.snapshot

    @property
    def translated(self) -> bool:
        return self.calibration_id is not None

    def suffix_ids(self, lm: LoadedModel, question: str, *, facts: str | None = None) -> tuple[int, ...]:
        """The tokens the receiver prefills after ``snapshot`` to ask ``question``."""
        if self.translated:
            return receiver_suffix_ids(lm, question, facts=facts)
        return lm.template.split(lm.tokenizer, "", question, facts=facts).suffix_ids


def receive_card(
    lm: LoadedModel,
    data: bytes | memoryview,
    *,
    calibrations: Sequence[CrossModelCalibration] = (),
    head: KVSnapshot | None = None,
) -> ReceivedCard:
    """Verify and decode ``data`` for ``lm``; join a split card's head; translate another model's card.

    * A card of this model decodes as it is (a split card is joined with ``head``, or with its head
      prefilled here; a head of other tokens or length is a CardCompatError).
    * A card of another model whose record names a calibration to this model (translate at receiver) is
      decoded against its own fingerprint and translated with that calibration, taken from
      ``calibrations``; without it, :class:`CardCompatError` naming the calibration id and both models.
    * A card translated at its sender into this model's KV space is joined with this receiver's own
      template head (no calibration needed).

    Any other card of another model is a CardCompatError; a malformed record a CardFormatError. A missing
    calibration is refused before the payload is hashed or decoded.
    """
    info = read_card_info(data)  # structure only: decode_card below verifies the digest
    record = _checked_record(info)
    if record is not None and head is not None:
        raise CardCompatError("a head was given, but the card is a cross-model card, not a split card")
    if record is not None and record.at == "receiver" and info.fingerprint != lm.fingerprint:
        calibration = _named_calibration(info, record, lm.fingerprint, calibrations)
        return _translate_here(lm, data, calibration)
    start = time.perf_counter()
    card = decode_card(data, expect=lm.fingerprint, device=lm.device, dtype=_model_dtype(lm))
    decode_s = time.perf_counter() - start
    if record is not None and record.at == "sender":
        start = time.perf_counter()
        snapshot = join_receiver_head(
            lm, card.snapshot, head_tokens=record.receiver_head_tokens, what=f"card {info.card_id}"
        )
        return ReceivedCard(
            card=replace(card, snapshot=snapshot),
            calibration_id=record.targets[0][1],
            decode_s=decode_s,
            head_s=time.perf_counter() - start,
        )
    head_s = 0.0
    expected = split_head(card)
    if expected is not None:
        start = time.perf_counter()
        given = head if head is not None else prefill_head(lm, expected)
        card = replace(card, snapshot=attach_head(given, card.snapshot, expected))
        head_s = time.perf_counter() - start
    elif head is not None:
        raise CardCompatError(
            "a head was given, but the card is not a split card: it holds the whole context"
        )
    return ReceivedCard(card=card, decode_s=decode_s, head_s=head_s)


def calibration_for_card(
    info: CardInfo, receiver: ModelFingerprint, calibrations: Sequence[CrossModelCalibration] = ()
) -> CrossModelCalibration | None:
    """Whether a receiver of ``receiver``'s model can use this card, from its header and metadata only.

    Returns the calibration the card must be translated with here, or ``None`` when the card is for this
    model as it is (including a card translated at its sender). Raises what :func:`receive_card` would:
    :class:`CardCompatError` (another model, a calibration it lacks), :class:`CardFormatError` (a malformed
    record). A store can check cards on arrival with it; the digest is checked when the card is decoded.
    """
    record = _checked_record(info)
    if record is not None and record.at == "receiver" and info.fingerprint != receiver:
        return _named_calibration(info, record, receiver, calibrations)
    receiver.require_same(info.fingerprint)
    return None


def _checked_record(info: CardInfo) -> CrossModelRecord | None:
    """The card's cross-model record, checked against the card (CardFormatError), or ``None``."""
    record = crossmodel_record(info.meta.extra)
    if record is not None:
        record.check_card(info.fingerprint, template_prefix_tokens=info.template_prefix_tokens)
        if split_head(info) is not None:
            raise CardFormatError("a cross-model card cannot also be a split card")
    return record


def _named_calibration(
    info: CardInfo,
    record: CrossModelRecord,
    receiver: ModelFingerprint,
    calibrations: Sequence[CrossModelCalibration],
) -> CrossModelCalibration:
    """The calibration the record names for ``receiver``, from ``calibrations``, else CardCompatError."""
    sender = info.fingerprint
    wanted = record.calibration_for(receiver)
    if wanted is None:
        named = ", ".join(digest for digest, _ in record.targets)
        raise CardCompatError(
            f"card was made by {sender.architecture} ({sender.digest}) and names calibrations for receiver "
            f"models {named} only; this receiver is {receiver.architecture} ({receiver.digest})"
        )
    return require_calibration(calibrations, sender=sender, receiver=receiver, calibration_id=wanted)


def _translate_here(
    lm: LoadedModel, data: bytes | memoryview, calibration: CrossModelCalibration
) -> ReceivedCard:
    """A card of the calibration's sender model, translated into ``lm``'s KV space here."""
    start = time.perf_counter()
    # Translation runs on the CPU, in float32.
    card = decode_card(data, expect=calibration.sender.fingerprint)
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    translated = translate_snapshot(card.snapshot, calibration, lm.fingerprint)
    translate_s = time.perf_counter() - start
    start = time.perf_counter()
    snapshot = join_receiver_head(
        lm, translated, head_tokens=calibration.receiver.head_tokens, what=calibration.describe()
    )
    return ReceivedCard(
        card=replace(card, snapshot=snapshot),
        calibration_id=calibration.id,
        decode_s=decode_s,
        head_s=time.perf_counter() - start,
        translate_s=translate_s,
    )


def answer_from_card(
    lm: LoadedModel,
    data: bytes | memoryview,
    question: str,
    *,
    max_new_tokens: int = 24,
    use_facts: bool = True,
    head: KVSnapshot | None = None,
    calibrations: Sequence[CrossModelCalibration] = (),
) -> CardAnswer:
    """Verify and decode ``data`` for ``lm`` (CardError if it cannot use it), then answer ``question``.

    A split card is joined with ``head`` (from :func:`~qkv._split.prefill_head` of the card's head; a head
    of other tokens or length is a CardCompatError); without one, the head is prefilled here first. A card
    of another model is translated with the calibration it names, from ``calibrations``
    (:func:`receive_card`).
    """
    received = receive_card(lm, data, calibrations=calibrations, head=head)
    meta = received.card.meta
    facts = meta.facts if use_facts and meta.facts else None
    suffix = received.suffix_ids(lm, question, facts=facts)
    generation = generate_from_snapshot(lm, received.snapshot, suffix, max_new_tokens=max_new_tokens)
    return CardAnswer(
        generation=generation,
        decode_s=received.decode_s,
        card=received.card,
        head_s=received.head_s,
        translate_s=received.translate_s,
        calibration_id=received.calibration_id,
    )


def answer_from_text(
    lm: LoadedModel, context: str, question: str, *, facts: str | None = None, max_new_tokens: int = 24
) -> Generation:
    """The re-prefill baseline: the receiver reads the whole text itself."""
    parts = lm.template.split(lm.tokenizer, context, question, facts=facts)
    return generate_from_text(lm, parts.prefix_ids, parts.suffix_ids, max_new_tokens=max_new_tokens)


def _model_dtype(lm: LoadedModel) -> torch.dtype:
    dtype: Any = getattr(lm.model, "dtype", torch.float32)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
