"""Answerer role, model side: answer a question from a stored card (whole or split), or from text.

Blocking torch work, run in the agent's model thread. Also the start-up measurements the answerer advertises
in its presence info for the readers' budget policy: prefill speed, fitted as ``t(m) = m / tps + q * m**2``
from two lengths (attention makes long prefills slower per token) and refined by the real prefills the node
does (:class:`PrefillModel`), and card decode speed.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from qkv import (
    Budget,
    CardInfo,
    CrossModelCalibration,
    KVSnapshot,
    LoadedModel,
    SplitHead,
    answer_from_card,
    answer_from_text,
    calibration_for_card,
    crossmodel_record,
    encode_observation,
    encode_split,
    observe,
    prefill,
    prefill_head,
    read_card_info,
    receive_card,
    split_head,
)

from .reader_policy import MAX_PRESENCE_NUMBER

#: Token counts prefilled to measure prefill speed at start (after a short warm-up forward).
PREFILL_PROBE_TOKENS = (256, 1024)
#: Weight of one real prefill (or card decode) in the correction of the start-up measurements.
PREFILL_EWMA_ALPHA = 0.5
MAX_QUESTION_CHARS = 4000
MAX_NEW_TOKENS_LIMIT = 256
#: Bounds on a card's own claims about the context it came from (``extra``): above any model's context and
#: any card a bus carries, so a larger claim is a lie that would only bend the rates this node advertises.
MAX_CONTEXT_TOKENS = 1 << 20
MAX_CARD_FP16_BYTES = 1 << 40
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
    head_tokens: int = 0  # a split card: the head it lacks
    calibration: str | None = None  # a card of another model: the calibration it was translated with
    rotated_fp16_bytes: int = 0  # a rotated card: the fp16 KV its decode turns back (0: not rotated)

    def as_dict(self) -> dict[str, Any]:
        return {
            "representation": "split" if self.head_tokens else "card",
            "card_bytes": self.card_bytes,
            "card_tokens": self.card_tokens,
            "head_tokens": self.head_tokens,
            "context_tokens": self.context_tokens,
            "fp16_bytes": self.fp16_bytes,
            "bits": self.bits,
            "sender": self.sender,
            "translated_with": self.calibration,
        }


@dataclass(frozen=True, kw_only=True)
class TextSummary:
    """A document received as text: the answerer re-prefills it when asked."""

    card_id: str
    text_bytes: int
    sender: str

    def as_dict(self) -> dict[str, Any]:
        return {"representation": "text", "text_bytes": self.text_bytes, "sender": self.sender}


def mean_width(info: CardInfo) -> float:
    """Average code width over the K and V blocks present (classes counted once each)."""
    widths = [w for table in (info.key_bits, info.value_bits) for row in table for w in row]
    return sum(widths) / len(widths) if widths else 0.0


def modal_width(info: CardInfo) -> int:
    """The most common code width in the card (what a relay re-encodes at by default)."""
    widths = Counter(w for table in (info.key_bits, info.value_bits) for row in table for w in row)
    return widths.most_common(1)[0][0] if widths else 4


def summarise_card(
    card_id: str, data: bytes, lm: LoadedModel, calibrations: tuple[CrossModelCalibration, ...] = ()
) -> CardSummary:
    """Parse the header and metadata: CardFormatError if malformed, CardCompatError if for another model
    whose calibration to this one is not among ``calibrations``."""
    info = read_card_info(data)
    calibration = calibration_for_card(info, lm.fingerprint, calibrations)
    record = crossmodel_record(info.meta.extra)
    # A card translated at its sender needs no calibration here, but the summary still says which made it.
    translated_with = calibration.id if calibration is not None else None
    if record is not None and record.at == "sender":
        translated_with = record.targets[0][1]
    extra = info.meta.extra
    context_tokens = extra.get("context_tokens")
    fp16 = extra.get("fp16_bytes")
    head = split_head(info)
    return CardSummary(
        card_id=card_id,
        card_bytes=len(data),
        card_tokens=info.num_tokens,
        # Sender-written hints: used only when plausible (they feed the rates this node advertises).
        context_tokens=(
            context_tokens
            if type(context_tokens) is int and info.num_tokens <= context_tokens <= MAX_CONTEXT_TOKENS
            else info.num_tokens
        ),
        fp16_bytes=fp16 if type(fp16) is int and 0 <= fp16 <= MAX_CARD_FP16_BYTES else info.fp16_bytes,
        bits=mean_width(info),
        sender=info.sender,
        head_tokens=0 if head is None else head.num_tokens,
        calibration=translated_with,
        rotated_fp16_bytes=0 if info.rotation == "none" else info.fp16_bytes,
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


def answer_card(
    lm: LoadedModel,
    data: bytes,
    question: str,
    max_new_tokens: int,
    head: KVSnapshot | None = None,
    calibrations: tuple[CrossModelCalibration, ...] = (),
) -> dict[str, Any]:
    """Answer from the card; ``ttft_s`` covers verifying and decoding the card, injection and the question.

    A split card is joined with ``head`` (prefilled ahead from the head message); without one, or when the
    given head does not belong to the card, its head is prefilled from the card's own ids first, and
    ``head_s`` (inside ``ttft_s``) says how long that took. A card of another model is translated with
    the calibration it names, from ``calibrations``.
    """
    from qkv import CardCompatError

    head_source = "none"
    try:
        answer = answer_from_card(
            lm, data, question, max_new_tokens=max_new_tokens, head=head, calibrations=calibrations
        )
        if head is not None:
            head_source = "message"
    except CardCompatError:
        if head is None:
            raise
        # The head message named this card but holds other tokens: the card's own record is authoritative.
        answer = answer_from_card(lm, data, question, max_new_tokens=max_new_tokens)
        head_source = "card (head message did not match)"
    if head is None and answer.head_s > 0:
        head_source = "card"
    return {
        "answer": answer.text,
        "ttft_s": answer.ttft_s,
        "decode_s": answer.decode_s,
        "head_s": answer.head_s,
        "head_source": head_source,
        "total_s": answer.decode_s + answer.head_s + answer.generation.total_s,
        "new_tokens": answer.generation.new_tokens,
    }


def prefill_split_head(lm: LoadedModel, head: SplitHead) -> tuple[KVSnapshot, float]:
    """(snapshot, seconds) of a split's head, prefilled before its card arrives."""
    start = time.perf_counter()
    snapshot = prefill_head(lm, head)
    return snapshot, time.perf_counter() - start


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


class PrefillModel:
    """Prefill time ``t(m) = m / tokens_per_s + s_per_token2 * m**2``: fitted at start, corrected by use.

    Each real prefill (a text answer, a split's head) moves a multiplicative correction of the fit towards
    ``measured / predicted`` (an EWMA), so a node that got slower or faster than at start advertises it.
    """

    def __init__(self, tokens_per_s: float, s_per_token2: float) -> None:
        if not tokens_per_s > 0 or s_per_token2 < 0:
            raise ValueError("prefill speed must be positive and the quadratic term non-negative")
        self._tps = tokens_per_s
        self._q = s_per_token2
        self._scale = 1.0

    @classmethod
    def fit(cls, samples: list[tuple[int, float]]) -> PrefillModel:
        """Fit from two (tokens, seconds) samples; a negative quadratic term (noise) falls back to linear."""
        (n1, t1), (n2, t2) = sorted(samples)[:1] + sorted(samples)[-1:]
        q = (t2 / n2 - t1 / n1) / (n2 - n1) if n2 != n1 else 0.0
        per_token = t1 / n1 - q * n1
        if q < 0 or per_token <= 0:
            q, per_token = 0.0, t2 / n2
        return cls(1.0 / per_token, q)

    def predict_s(self, tokens: int) -> float:
        return self._scale * (tokens / self._tps + self._q * tokens * tokens)

    def observe(self, tokens: int, seconds: float) -> None:
        """One real prefill of ``tokens`` tokens that took ``seconds``."""
        if tokens <= 0 or seconds <= 0:
            return
        ratio = seconds / (tokens / self._tps + self._q * tokens * tokens)
        self._scale = (1 - PREFILL_EWMA_ALPHA) * self._scale + PREFILL_EWMA_ALPHA * ratio

    def advertised(self) -> dict[str, float]:
        """Presence fields: ``prefill_tps`` (linear term, corrected) and ``prefill_q`` (s per token^2)."""
        return {"prefill_tps": round(self._tps / self._scale, 2), "prefill_q": self._q * self._scale}


def _probe_ids(lm: LoadedModel, tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < tokens:
        ids.extend(lm.tokenizer.encode(_PROBE_TEXT, add_special_tokens=False))
    return ids[:tokens]


def measure_prefill(lm: LoadedModel, sizes: tuple[int, ...] = PREFILL_PROBE_TOKENS) -> PrefillModel:
    """Prefill speed on this node at two lengths, measured after a warm-up forward."""
    limit = int(getattr(lm.model.config, "max_position_embeddings", max(sizes)) or max(sizes))
    sizes = tuple(min(size, limit // 2) for size in sizes)
    prefill(lm, _probe_ids(lm, 16))
    samples = []
    for size in sizes:
        ids = _probe_ids(lm, size)
        start = time.perf_counter()
        prefill(lm, ids)
        samples.append((size, max(time.perf_counter() - start, 1e-9)))
    return PrefillModel.fit(samples)


#: Decodes of each start-up probe card; the fastest counts (the first pays for cold caches, and a busy
#: second core only ever adds time).
DECODE_PROBE_REPEATS = 5
#: Advertised when a rotated card decodes no slower than its unrotated twin (nothing measurable to undo).
UNMEASURABLE_ROTATE_BPS = 1e12


@dataclass(kw_only=True)
class CardSpeeds:
    """How fast this node turns a received card into its first token: measured at start on probe cards,
    advertised in presence (the senders' policy predicts with them) and refined by real answers.

    ``decode_bps``: card bytes per second verified and decoded; ``rotate_bps``: fp16 KV bytes per second a
    rotated card's values take to turn back (on top of its decode at ``decode_bps``); ``question_s``: from a
    ready cache to the first token; ``join_bps``: whole-context fp16 KV bytes per second joining a split's
    prefilled head to its tail.
    """

    decode_bps: float
    rotate_bps: float
    question_s: float
    join_bps: float

    def advertised(self) -> dict[str, float]:
        # Capped as readers cap what they accept: one odd timing must not make this node's presence
        # unpackable or ignored.
        return {
            "decode_bps": round(min(self.decode_bps, MAX_PRESENCE_NUMBER)),
            "rotate_bps": round(min(self.rotate_bps, MAX_PRESENCE_NUMBER)),
            "question_s": round(min(self.question_s, MAX_PRESENCE_NUMBER), 4),
            "join_bps": round(min(self.join_bps, MAX_PRESENCE_NUMBER)),
        }

    def observe(
        self, summary: CardSummary, *, decode_s: float, head_s: float, ttft_s: float, joined_bytes: int
    ) -> None:
        """One real answer from the card ``summary`` describes (``joined_bytes``: the fp16 KV joined to a
        head sent ahead, 0 when there was none)."""
        if decode_s < 0 or head_s < 0 or ttft_s <= 0:
            return  # not a timing this node took; nothing to learn from it
        alpha = PREFILL_EWMA_ALPHA
        if summary.card_bytes > 0 and decode_s > 0:
            if summary.rotated_fp16_bytes:
                # What the plain decode speed does not explain is the rotation's (a faster-than-predicted
                # decode says nothing about it).
                unrotate_s = decode_s - summary.card_bytes / self.decode_bps
                if unrotate_s > 0:
                    bps = summary.rotated_fp16_bytes / unrotate_s
                    self.rotate_bps = (1 - alpha) * self.rotate_bps + alpha * bps
            else:
                self.decode_bps = (1 - alpha) * self.decode_bps + alpha * summary.card_bytes / decode_s
        if joined_bytes > 0 and head_s > 0:
            self.join_bps = (1 - alpha) * self.join_bps + alpha * joined_bytes / head_s
        question_s = ttft_s - decode_s - head_s
        if question_s > 0:
            self.question_s = (1 - alpha) * self.question_s + alpha * question_s


def _fastest_decode_s(lm: LoadedModel, data: bytes) -> float:
    return min(receive_card(lm, data).decode_s for _ in range(DECODE_PROBE_REPEATS))


def measure_card_answer(lm: LoadedModel, tokens: int = 256) -> CardSpeeds:
    """This node's :class:`CardSpeeds`, from cards of the probe text.

    Decode: a plain and a rotated 4-bit card of the text, each decoded a few times; the rotated card's
    extra time over what its bytes take at the plain speed is its rotation. The question seconds run from a
    ready cache to the first token (the question's prefill and one decode step): a cost every
    representation pays after its context is in place. Join: a split card of the same text answered with
    its head prefilled ahead; bytes are the whole context's fp16 KV, the unit the policy counts in.
    """
    text = lm.tokenizer.decode(_probe_ids(lm, tokens))
    question = "What is this text about?"
    obs = observe(lm, text)
    fp16 = obs.snapshot.fp16_bytes()  # what a whole card of the text decodes into
    whole = encode_observation(lm, obs, Budget(bits=4), context=text)
    answer = answer_from_card(lm, whole.data, question, max_new_tokens=1)
    plain_s = _fastest_decode_s(lm, whole.data)
    rotated = encode_observation(lm, obs, Budget(bits=4, rotation="hadamard-prerope"), context=text)
    unrotate_s = _fastest_decode_s(lm, rotated.data) - plain_s * rotated.card_bytes / whole.card_bytes
    split = encode_split(lm, text, Budget(bits=4), head_tokens=obs.snapshot.num_tokens // 2)
    assert split.head is not None
    joined = answer_from_card(lm, split.data, question, max_new_tokens=1, head=prefill_head(lm, split.head))
    return CardSpeeds(
        decode_bps=whole.card_bytes / max(plain_s, 1e-9),
        rotate_bps=fp16 / unrotate_s if unrotate_s > 0 else UNMEASURABLE_ROTATE_BPS,
        question_s=answer.generation.ttft_s,
        join_bps=fp16 / max(joined.head_s, 1e-9),
    )


def measure_prefill_speed(lm: LoadedModel, tokens: int = PREFILL_PROBE_TOKENS[0]) -> float:
    """Prefill tokens per second on this node at one length, measured after a warm-up forward."""
    ids = _probe_ids(lm, tokens)
    prefill(lm, ids[:16])
    start = time.perf_counter()
    prefill(lm, ids)
    return tokens / max(time.perf_counter() - start, 1e-9)
