"""Budget policy: which representation (text, card, hybrid, split) and which compression to send a context in.

Pure: no I/O, no clock, no hidden state. :meth:`BudgetPolicy.decide` maps measured inputs, a calibrated
rate-quality table and the previous decision to a :class:`Decision`; the caller keeps the previous decision
(one per receiver) to get hysteresis.

Time to first token at the receiver (TTFT), with ``n`` context tokens, ``kv`` fp16 KV bytes per token and a
candidate's ``bytes_per_token`` (bpt), ``keep`` (fraction of tokens kept) and ``layers`` (fraction of layers
sent)::

    prefill(m)  = m / prefill_tokens_per_s + prefill_s_per_token2 * m**2
    transfer(w) = rtt + w / bandwidth_bytes_per_s
    text        = transfer(text_bytes) + prefill(n) + question_s
    card        = transfer(bpt * n) + bpt * n / decode_bytes_per_s + rot(kv * n * keep * layers)
                  + kv * n * keep * layers / inject_bytes_per_s + question_s
    hybrid      = card + text_bytes / bandwidth_bytes_per_s + prefill(n * (1 - keep))
    split(h)    = max(rtt + HEAD_ID_BYTES * h / bandwidth_bytes_per_s + prefill(h),
                      transfer(HEAD_ID_BYTES * h + bpt * (n - h)))
                  + bpt * (n - h) / decode_bytes_per_s + rot(kv * (n - h)) + kv * n / inject_bytes_per_s
                  + kv * n / join_bytes_per_s + question_s
    rot(w)      = w / rotate_bytes_per_s for a point coded in a rotated basis (``rotated``), else 0

(the quadratic prefill term is attention's cost growing with the length; a rotated card's receiver turns
every decoded value back to the model's basis, a cost that grows with the fp16 KV it yields, not with the
card's bytes: measured 4K tokens, 2 cores, 107 ms to decode an adaptive 3-bit rotated card against 74 ms for
the same bits unrotated; ``question_s``, the receiver's
time from a ready cache to its first token, is common to every candidate and changes no ranking, but it
makes "within ``near_tie``" relative to the TTFT a user sees: on a fast link a 0.1 s smaller transfer is
not worth a lower-quality card when the answer itself takes 2 s; a hybrid sends the card and the text, and
the receiver re-prefills the tokens the card does not carry; a split's receiver copies the whole context's
KV once more to join its head to the tail, ``join_bytes_per_s`` as measured there).

A *split* sends the first ``h`` token ids ahead (``HEAD_ID_BYTES`` each), then a card of the KV of tokens
``[h, n)`` only: the receiver prefills the head itself while the tail crosses the link. The first term of the
max rises with ``h`` and the second falls, so the policy takes the ``h`` where they cross (the smallest ``h``
whose head prefill is no shorter than the tail's transfer, or the one before it if that is faster). A split
exists for every full card point of the table (``keep == layers == 1``) when that ``h`` lies in
``[split_min_head, n - split_min_head]``: below, the card alone is as fast; above, text is. Its head is
exact, so it is no worse than the card point. When the table's metric is ``exp(-KL)`` (``KL_QUALITY_METRIC``)
the policy counts the KL of the tail only, in proportion to its share of the context: quality
``q ** ((n - h) / n)``. Measured with a 2-bit rotated tail after a 47% head (200 rows each, quality bench
``+head-0.47``): KL 0.152 on SQuAD and 0.130 on HotpotQA, where this predicts 0.184 and 0.161, so the rule
errs low. Under any other metric a split has the card point's quality.

Peak receiver RAM is the card plus the fp16 KV it decodes into (text: the KV its prefill builds; split: the
tail card plus the whole context's KV); the sender must hold the card it encodes. A candidate is *feasible*
when its quality is at least the floor and both sides' RAM headroom covers it. A candidate needing more RAM
than the previous choice must fit with ``ram_margin`` to spare, so a headroom hovering at a threshold does
not flap the choice; moving down to a smaller one needs no margin.

Choice among feasible candidates (those meeting the deadline, if any does; otherwise all of them, and the
reason says the deadline is missed): the fastest; candidates within ``near_tie`` of the fastest TTFT count as
equally fast, since link estimates are noisier than that, and the highest quality among them wins (at equal
quality a whole card before a split of it, whose two messages and joined caches are worth it only when they
are clearly faster; then the faster). This is why falling memory lowers the bits: the bigger cards stop
fitting, and rising memory brings them back.

Hysteresis: the previous choice (representation and budget; a split's ``h`` follows the inputs) is kept while
it stays feasible (and on time, when something is) unless the new best is faster by ``switch_margin`` or
better in quality by ``quality_margin`` at no more than ``near_tie`` extra TTFT. Every decision is logged on
``edgebus.policy`` with its inputs.

Rate-quality table JSON (generated from quality-benchmark results for one model)::

    {"version": 1, "model": "smollm2-135m-instruct", "metric": "exp(-kl_vs_text)", "source": "...",
     "points": [{"representation": "card", "bits": 4, "keep": 1.0, "layers": 1.0,
                 "bytes_per_token": 6450.0, "quality": 0.97, "facts": false, "condition": "kv-4"}, ...]}

``quality`` is relative to text (1.0), by the table's ``metric``; ``rotated`` (default false) marks a card
coded in a rotated basis, whose decode costs more (above); ``condition`` names how the sender builds
the point (opaque here: the node maps it to a codec budget; two points differing only there are different
choices). ``facts`` marks a point measured with a short key-facts text sent
alongside the card (its bytes are negligible next to the card and are left out of the model). A table's
points are text, card or hybrid (splits are derived from its cards). Text is always a candidate: a table
without a text row gets one with quality 1.0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from ._errors import BusError, ConfigError

__all__ = [
    "DEFAULT_INJECT_BYTES_PER_S",
    "DEFAULT_ROTATE_BYTES_PER_S",
    "HEAD_ID_BYTES",
    "KL_QUALITY_METRIC",
    "BudgetPolicy",
    "Decision",
    "InvalidPolicyInput",
    "NoFeasibleRepresentation",
    "PointKey",
    "PolicyConfig",
    "PolicyError",
    "PolicyInputs",
    "RateQualityPoint",
    "RateQualityTable",
    "Representation",
    "balanced_head",
    "predict_split",
    "split_quality",
]

log = logging.getLogger("edgebus.policy")

Representation = Literal["text", "card", "hybrid", "split"]
#: What identifies a choice across decisions (for hysteresis): representation, bits, keep, layers, facts,
#: condition.
PointKey = tuple[str, float, float, float, bool, str]
#: What a table's points may be: a split is derived from a card point, never calibrated on its own.
_TABLE_REPRESENTATIONS: tuple[str, ...] = ("text", "card", "hybrid")
_TABLE_VERSION = 1
#: fp16 tensor copy into the model's cache, measured on the 2-vCPU dev box (FIELD-NOTES: 2.3 GB/s).
DEFAULT_INJECT_BYTES_PER_S = 2.0e9
#: fp16 KV bytes per second a receiver turns back from a rotated coding, for a receiver that does not
#: advertise its own (measured on the 2-vCPU dev box, pre-RoPE Hadamard: 0.66-0.87 GB/s at 256 tokens,
#: about 1 GB/s at 4K).
DEFAULT_ROTATE_BYTES_PER_S = 1.0e9
#: Wire bytes per head token id of a split (a little-endian uint32 each).
HEAD_ID_BYTES = 4
#: The table metric under which a split's quality is computed from its tail's share (module docstring).
KL_QUALITY_METRIC = "exp(-kl_vs_text)"


class PolicyError(BusError):
    """The budget policy cannot decide."""


class InvalidPolicyInput(PolicyError, ValueError):
    """An input (possibly advertised by a peer) that is negative, zero where it divides, or not finite."""


class NoFeasibleRepresentation(PolicyError):
    """No candidate, text included, fits the RAM headroom at the quality floor."""


def _finite(owner: str, name: str, value: object, *, positive: bool, error: type[Exception]) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise error(f"{owner}.{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise error(f"{owner}.{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RateQualityPoint:
    """One calibrated operating point of a model: how big a card is per token and how good its answers are."""

    representation: Representation
    bits: float
    keep: float
    layers: float
    bytes_per_token: float
    quality: float
    facts: bool = False
    condition: str = ""
    rotated: bool = False

    def __post_init__(self) -> None:
        owner = "RateQualityPoint"
        if self.representation not in _TABLE_REPRESENTATIONS:
            raise ValueError(f"{owner}.representation must be one of {_TABLE_REPRESENTATIONS}")
        for name in ("bits", "keep", "layers"):
            _finite(owner, name, getattr(self, name), positive=True, error=ValueError)
        for name in ("bytes_per_token", "quality"):
            _finite(owner, name, getattr(self, name), positive=False, error=ValueError)
        if self.keep > 1 or self.layers > 1:
            raise ValueError(f"{owner}.keep and .layers are fractions in (0, 1]")
        for name in ("facts", "rotated"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name} must be a bool")
        if not isinstance(self.condition, str) or len(self.condition) > 200:
            raise ValueError(f"{owner}.condition must be a string of at most 200 characters")

    @property
    def key(self) -> PointKey:
        return (self.representation, self.bits, self.keep, self.layers, self.facts, self.condition)


_TEXT_POINT = RateQualityPoint(
    representation="text", bits=16.0, keep=1.0, layers=1.0, bytes_per_token=0.0, quality=1.0
)


@dataclass(frozen=True, slots=True)
class RateQualityTable:
    """The rate-quality points calibrated for one model.

    ``dominated``: measured points another point beats at no more bytes; the policy never picks them, but
    benchmarks that run such a card as a fixed alternative read its quality here.
    """

    points: tuple[RateQualityPoint, ...]
    model: str = ""
    metric: str = ""
    source: str = ""
    dominated: tuple[RateQualityPoint, ...] = ()

    def candidates(self) -> tuple[RateQualityPoint, ...]:
        """The points, with a text point added when the table has none."""
        if any(point.representation == "text" for point in self.points):
            return self.points
        return (*self.points, _TEXT_POINT)

    def to_json(self) -> str:
        body = {
            "version": _TABLE_VERSION,
            "model": self.model,
            "metric": self.metric,
            "source": self.source,
            "points": [asdict(p) for p in self.points],
        }
        if self.dominated:
            body["dominated"] = [asdict(p) for p in self.dominated]
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "<string>") -> RateQualityTable:
        """Parse a table; any unknown, missing or ill-typed key is a :class:`ConfigError` naming it."""
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{source}: not JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise ConfigError(f"{source}: a rate-quality table is a JSON object")
        unknown = set(document) - {"version", "model", "metric", "source", "points", "dominated"}
        if unknown:
            raise ConfigError(f"{source}: unknown key {sorted(unknown)[0]!r}")
        if document.get("version") != _TABLE_VERSION:
            raise ConfigError(f"{source}: 'version' must be {_TABLE_VERSION}")
        strings = {name: document.get(name, "") for name in ("model", "metric", "source")}
        for name, value in strings.items():
            if not isinstance(value, str):
                raise ConfigError(f"{source}: {name!r} must be a string")
        raw_points = document.get("points")
        if not isinstance(raw_points, list) or not raw_points:
            raise ConfigError(f"{source}: 'points' must be a non-empty list")
        raw_dominated = document.get("dominated", [])
        if not isinstance(raw_dominated, list):
            raise ConfigError(f"{source}: 'dominated' must be a list")
        return cls(
            points=_parse_points(raw_points, f"{source}: points"),
            dominated=_parse_points(raw_dominated, f"{source}: dominated"),
            **strings,
        )

    @classmethod
    def load(cls, path: Path) -> RateQualityTable:
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read rate-quality table: {exc}") from exc
        return cls.from_json(text, source=str(path))

    def save(self, path: Path) -> None:
        """Write atomically (temporary file in the same directory, then rename)."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _parse_points(raw_points: list[Any], where: str) -> tuple[RateQualityPoint, ...]:
    allowed = {f.name for f in fields(RateQualityPoint)}
    points = []
    for index, raw in enumerate(raw_points):
        at = f"{where}[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{at} must be an object")
        extra = set(raw) - allowed
        if extra:
            raise ConfigError(f"{at}: unknown key {sorted(extra)[0]!r}")
        try:
            points.append(RateQualityPoint(**raw))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{at}: {exc}") from exc
    return tuple(points)


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    """Operator settings. ``deadline_s``: TTFT the operator wants (``None``: none). ``split``: consider
    split hand-offs, whose head must be at least ``split_min_head`` tokens (and leave as many for the card):
    a shorter head saves less than a split's costs the model leaves out (its head prefill competing with the
    transfer's receive work for the receiver's CPU; measured: +0.3-0.6 s at 100 Mbit/s on 2 cores).
    """

    quality_floor: float
    deadline_s: float | None = None
    near_tie: float = 0.10
    switch_margin: float = 0.15
    quality_margin: float = 0.005
    ram_margin: float = 0.10
    split: bool = True
    split_min_head: int = 256

    def __post_init__(self) -> None:
        owner = "PolicyConfig"
        _finite(owner, "quality_floor", self.quality_floor, positive=False, error=ConfigError)
        if self.quality_floor > 1:
            raise ConfigError(
                f"{owner}.quality_floor is relative to text and at most 1, got {self.quality_floor}"
            )
        if self.deadline_s is not None:
            _finite(owner, "deadline_s", self.deadline_s, positive=True, error=ConfigError)
        for name in ("near_tie", "switch_margin", "quality_margin", "ram_margin"):
            value = getattr(self, name)
            _finite(owner, name, value, positive=False, error=ConfigError)
            if value >= 1:
                raise ConfigError(f"{owner}.{name} must be < 1, got {value}")
        if not isinstance(self.split, bool):
            raise ConfigError(f"{owner}.split must be a bool")
        if type(self.split_min_head) is not int or self.split_min_head < 1:
            raise ConfigError(f"{owner}.split_min_head must be an int >= 1, got {self.split_min_head!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyInputs:
    """What is known when a context is about to be handed off.

    Headrooms in bytes (the receiver advertises its own), bandwidth in bytes per second (what
    :class:`edgebus.LinkEstimate` calls ``bandwidth_bps``), speeds as measured (the receiver measures its
    prefill at start and advertises the linear and quadratic terms, its card decode speed and how fast it
    turns a rotated card's values back, in fp16 KV bytes per second).
    ``context_tokens`` counts every token the sender prefills (prompt template included).
    """

    sender_headroom_bytes: int
    receiver_headroom_bytes: int
    bandwidth_bytes_per_s: float
    rtt_s: float
    prefill_tokens_per_s: float
    decode_bytes_per_s: float
    context_tokens: int
    kv_bytes_per_token: int
    text_bytes: int
    inject_bytes_per_s: float = DEFAULT_INJECT_BYTES_PER_S
    prefill_s_per_token2: float = 0.0
    question_s: float = 0.0
    join_bytes_per_s: float = DEFAULT_INJECT_BYTES_PER_S
    rotate_bytes_per_s: float = DEFAULT_ROTATE_BYTES_PER_S

    def __post_init__(self) -> None:
        owner = "PolicyInputs"
        for name, positive in (
            ("sender_headroom_bytes", False),
            ("receiver_headroom_bytes", False),
            ("bandwidth_bytes_per_s", True),
            ("rtt_s", False),
            ("prefill_tokens_per_s", True),
            ("decode_bytes_per_s", True),
            ("context_tokens", False),
            ("kv_bytes_per_token", True),
            ("text_bytes", False),
            ("inject_bytes_per_s", True),
            ("prefill_s_per_token2", False),
            ("question_s", False),
            ("join_bytes_per_s", True),
            ("rotate_bytes_per_s", True),
        ):
            _finite(owner, name, getattr(self, name), positive=positive, error=InvalidPolicyInput)

    def prefill_s(self, tokens: float) -> float:
        """Predicted receiver prefill time of ``tokens`` tokens (module docstring)."""
        return tokens / self.prefill_tokens_per_s + self.prefill_s_per_token2 * tokens * tokens

    def unrotate_s(self, point: RateQualityPoint, fp16_bytes: float) -> float:
        """Predicted seconds to turn ``fp16_bytes`` of ``point``'s decoded KV back from its rotated basis."""
        return fp16_bytes / self.rotate_bytes_per_s if point.rotated else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What to send, what it is predicted to cost and give, why, and from which inputs.

    ``head_tokens``: for a split, the tokens whose ids go ahead of the card (0 otherwise).
    """

    representation: Representation
    bits: float
    keep: float
    layers: float
    facts: bool
    predicted_ttft_s: float
    predicted_quality: float
    wire_bytes: int
    reason: str
    inputs: PolicyInputs
    head_tokens: int = 0
    condition: str = ""

    @property
    def key(self) -> PointKey:
        return (self.representation, self.bits, self.keep, self.layers, self.facts, self.condition)

    def describe(self) -> str:
        """One line: what is sent, e.g. ``split(bits=4 keep=1 layers=1 head=900)``."""
        return _describe(
            self.representation,
            self.bits,
            self.keep,
            self.layers,
            self.facts,
            self.head_tokens,
            self.condition,
        )


@dataclass(frozen=True, slots=True)
class _Estimate:
    point: RateQualityPoint
    representation: Representation
    wire_bytes: float
    ttft_s: float
    receiver_ram: float
    sender_ram: float
    quality: float
    head_tokens: int = 0

    @property
    def key(self) -> PointKey:
        p = self.point
        return (self.representation, p.bits, p.keep, p.layers, p.facts, p.condition)


def _estimate(point: RateQualityPoint, x: PolicyInputs) -> _Estimate:
    n = x.context_tokens
    if point.representation == "text":
        wire = float(x.text_bytes)
        ttft = x.rtt_s + wire / x.bandwidth_bytes_per_s + x.prefill_s(n) + x.question_s
        return _Estimate(point, "text", wire, ttft, float(x.kv_bytes_per_token * n), 0.0, point.quality)
    card = point.bytes_per_token * n
    injected = x.kv_bytes_per_token * n * point.keep * point.layers
    ttft = (
        x.rtt_s
        + card / x.bandwidth_bytes_per_s
        + card / x.decode_bytes_per_s
        + x.unrotate_s(point, injected)
        + injected / x.inject_bytes_per_s
        + x.question_s
    )
    resident = injected
    wire = card
    if point.representation == "hybrid":
        reprefilled = n * (1 - point.keep)
        wire += x.text_bytes
        ttft += x.text_bytes / x.bandwidth_bytes_per_s + x.prefill_s(reprefilled)
        resident += x.kv_bytes_per_token * reprefilled
    return _Estimate(point, point.representation, wire, ttft, card + resident, card, point.quality)


def _split_ttft(point: RateQualityPoint, x: PolicyInputs, head: int) -> tuple[float, float, float]:
    """(TTFT, head side, tail side) of a split at ``head`` tokens (module docstring)."""
    n, bw = x.context_tokens, x.bandwidth_bytes_per_s
    ids = HEAD_ID_BYTES * head
    tail_card = point.bytes_per_token * (n - head)
    head_side = x.rtt_s + ids / bw + x.prefill_s(head)
    tail_side = x.rtt_s + (ids + tail_card) / bw
    kv = x.kv_bytes_per_token * n
    after = (
        tail_card / x.decode_bytes_per_s
        + x.unrotate_s(point, x.kv_bytes_per_token * (n - head))
        + kv / x.inject_bytes_per_s
        + kv / x.join_bytes_per_s
        + x.question_s
    )
    return max(head_side, tail_side) + after, head_side, tail_side


def predict_split(point: RateQualityPoint, inputs: PolicyInputs, head: int) -> dict[str, float]:
    """A split's predicted seconds at ``head`` tokens: ``ttft_s``, ``head_side_s`` (ids sent and
    prefilled), ``tail_side_s`` (tail card transferred), for comparing with what a run measures."""
    ttft, head_side, tail_side = _split_ttft(point, inputs, head)
    return {"ttft_s": ttft, "head_side_s": head_side, "tail_side_s": tail_side}


def balanced_head(point: RateQualityPoint, inputs: PolicyInputs) -> int:
    """The head length in ``0..n`` that minimises a split's predicted TTFT (module docstring)."""
    n = inputs.context_tokens
    # Bisection for the smallest h whose head side is no shorter than its tail side (monotone in h).
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        _, head_side, tail_side = _split_ttft(point, inputs, mid)
        if head_side >= tail_side:
            hi = mid
        else:
            lo = mid + 1
    return min((h for h in (lo - 1, lo) if 0 <= h <= n), key=lambda h: _split_ttft(point, inputs, h)[0])


def split_quality(point: RateQualityPoint, context_tokens: int, head: int, *, tail_kl: bool) -> float:
    """A split's quality at ``head`` tokens (module docstring); ``tail_kl``: the table's metric is
    ``KL_QUALITY_METRIC``."""
    if not tail_kl or context_tokens <= 0 or point.quality <= 0:
        return point.quality
    return math.pow(point.quality, (context_tokens - head) / context_tokens)


def _split_estimate(
    point: RateQualityPoint, x: PolicyInputs, min_head: int, *, tail_kl: bool
) -> _Estimate | None:
    """The split of ``point``'s card at the balancing head length, or None when no split is worth it."""
    n = x.context_tokens
    if n < 2 * min_head:
        return None
    head = balanced_head(point, x)
    if not min_head <= head <= n - min_head:
        return None
    tail_card = point.bytes_per_token * (n - head)
    wire = HEAD_ID_BYTES * head + tail_card
    receiver_ram = tail_card + x.kv_bytes_per_token * n
    ttft = _split_ttft(point, x, head)[0]
    quality = split_quality(point, n, head, tail_kl=tail_kl)
    return _Estimate(point, "split", wire, ttft, receiver_ram, tail_card, quality, head_tokens=head)


def _describe(
    representation: str,
    bits: float,
    keep: float,
    layers: float,
    facts: bool,
    head_tokens: int = 0,
    condition: str = "",
) -> str:
    if representation == "text":
        return "text"
    extra = "+facts" if facts else ""
    head = f" head={head_tokens}" if representation == "split" else ""
    named = f" {condition}" if condition else ""
    return f"{representation}{extra}(bits={bits:g} keep={keep:g} layers={layers:g}{head}{named})"


def _describe_estimate(e: _Estimate) -> str:
    p = e.point
    return _describe(e.representation, p.bits, p.keep, p.layers, p.facts, e.head_tokens, p.condition)


class BudgetPolicy:
    """Chooses a representation per hand-off from a calibrated :class:`RateQualityTable`."""

    def __init__(self, table: RateQualityTable, config: PolicyConfig) -> None:
        self._candidates = table.candidates()
        self._config = config
        self._tail_kl = table.metric == KL_QUALITY_METRIC

    @property
    def config(self) -> PolicyConfig:
        return self._config

    def estimates(self, inputs: PolicyInputs) -> list[_Estimate]:
        """Every candidate's prediction: the table's points, then a split per full card point."""
        out = [_estimate(point, inputs) for point in self._candidates]
        if self._config.split:
            for point in self._candidates:
                if point.representation == "card" and point.keep == 1 and point.layers == 1:
                    split = _split_estimate(point, inputs, self._config.split_min_head, tail_kl=self._tail_kl)
                    if split is not None:
                        out.append(split)
        return out

    def decide(self, inputs: PolicyInputs, previous: Decision | None = None) -> Decision:
        """The representation minimising predicted TTFT under the constraints (module docstring).

        Raises :class:`NoFeasibleRepresentation` when nothing fits the RAM headroom at the quality floor.
        """
        cfg = self._config
        previous_key = previous.key if previous is not None else None
        estimates = self.estimates(inputs)
        current = next((e for e in estimates if e.key == previous_key), None)
        feasible = [e for e in estimates if self._fits(e, inputs, current)]
        if not feasible:
            log.warning("no feasible representation; inputs=%s", inputs)
            raise NoFeasibleRepresentation(
                f"nothing fits: receiver headroom {inputs.receiver_headroom_bytes} bytes, sender headroom"
                f" {inputs.sender_headroom_bytes} bytes, quality floor {cfg.quality_floor}"
            )
        pool = feasible
        missed_deadline = False
        if cfg.deadline_s is not None:
            on_time = [e for e in feasible if e.ttft_s <= cfg.deadline_s]
            missed_deadline = not on_time
            pool = on_time or feasible
        if missed_deadline:
            best = min(pool, key=lambda e: (e.ttft_s, -e.quality))
            reason = f"no candidate meets the {cfg.deadline_s:g} s deadline; fastest chosen"
        else:
            fastest = min(e.ttft_s for e in pool)
            tied = [e for e in pool if e.ttft_s <= fastest * (1 + cfg.near_tie)]
            best = max(
                tied,
                key=lambda e: (e.quality, e.representation != "split", -e.ttft_s, -e.wire_bytes),
            )
            reason = (
                f"fastest feasible of {len(pool)}"
                if best.ttft_s == fastest
                else f"best quality within {cfg.near_tie:.0%} of the fastest ({fastest:.3f} s)"
            )
        chosen = best
        kept = next((e for e in pool if e.key == previous_key), None)
        if previous is not None and kept is None:
            reason += f"; previous {previous.describe()} no longer feasible or on time"
        elif kept is not None and kept is not best:
            faster = best.ttft_s < kept.ttft_s * (1 - cfg.switch_margin)
            not_slower = best.ttft_s <= kept.ttft_s * (1 + cfg.near_tie)
            better = best.quality > kept.quality + cfg.quality_margin and not_slower
            if not (faster or better):
                chosen = kept
                reason = f"kept previous choice; {_describe_estimate(best)} not better by the switch margin"
        decision = Decision(
            representation=chosen.representation,
            bits=chosen.point.bits,
            keep=chosen.point.keep,
            layers=chosen.point.layers,
            facts=chosen.point.facts,
            predicted_ttft_s=chosen.ttft_s,
            predicted_quality=chosen.quality,
            wire_bytes=round(chosen.wire_bytes),
            reason=reason,
            inputs=inputs,
            head_tokens=chosen.head_tokens,
            condition=chosen.point.condition,
        )
        log.info(
            "decision %s ttft=%.3fs quality=%.3f wire=%d bytes: %s; inputs=%s",
            decision.describe(),
            chosen.ttft_s,
            chosen.quality,
            decision.wire_bytes,
            reason,
            inputs,
        )
        return decision

    def _fits(self, e: _Estimate, inputs: PolicyInputs, current: _Estimate | None) -> bool:
        """Quality floor and RAM on both sides; moving to a bigger candidate needs ``ram_margin`` spare."""
        receiver_factor = sender_factor = 1.0
        if current is not None and e is not current:
            if e.receiver_ram > current.receiver_ram:
                receiver_factor += self._config.ram_margin
            if e.sender_ram > current.sender_ram:
                sender_factor += self._config.ram_margin
        return (
            e.quality >= self._config.quality_floor
            and e.receiver_ram * receiver_factor <= inputs.receiver_headroom_bytes
            and e.sender_ram * sender_factor <= inputs.sender_headroom_bytes
        )
