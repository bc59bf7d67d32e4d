"""Budget policy: which representation (text, card, hybrid) and which compression to send a context in.

Pure: no I/O, no clock, no hidden state. :meth:`BudgetPolicy.decide` maps measured inputs, a calibrated
rate-quality table and the previous decision to a :class:`Decision`; the caller keeps the previous decision
(one per receiver) to get hysteresis.

Time to first token at the receiver (TTFT), with ``n`` context tokens, ``kv`` fp16 KV bytes per token and a
candidate's ``bytes_per_token`` (bpt), ``keep`` (fraction of tokens kept) and ``layers`` (fraction of layers
sent)::

    transfer(w) = rtt + w / bandwidth_bytes_per_s
    text        = transfer(text_bytes) + n / prefill_tokens_per_s
    card        = transfer(bpt * n) + bpt * n / decode_bytes_per_s
                  + kv * n * keep * layers / inject_bytes_per_s
    hybrid      = card + text_bytes / bandwidth_bytes_per_s + n * (1 - keep) / prefill_tokens_per_s

(a hybrid sends the card and the text, and the receiver re-prefills the tokens the card does not carry).
Peak receiver RAM is the card plus the fp16 KV it decodes into (text: the KV its prefill builds); the sender
must hold the card it encodes. A candidate is *feasible* when its quality is at least the floor and both
sides' RAM headroom covers it. A candidate needing more RAM than the previous choice must fit with
``ram_margin`` to spare, so a headroom hovering at a threshold does not flap the choice; moving down to a
smaller one needs no margin.

Choice among feasible candidates (those meeting the deadline, if any does; otherwise all of them, and the
reason says the deadline is missed): the fastest; candidates within ``near_tie`` of the fastest TTFT count as
equally fast, since link estimates are noisier than that, and the highest quality among them wins. This is
why falling memory lowers the bits: the bigger cards stop fitting, and rising memory brings them back.

Hysteresis: the previous choice is kept while it stays feasible (and on time, when something is) unless the
new best is faster by ``switch_margin`` or better in quality by ``quality_margin`` at no more than
``near_tie`` extra TTFT. Every decision is logged on ``edgebus.policy`` with its inputs.

Rate-quality table JSON (written by calibration for one model)::

    {"version": 1, "model": "smollm2-135m-instruct",
     "points": [{"representation": "card", "bits": 4, "keep": 1.0, "layers": 1.0,
                 "bytes_per_token": 6450.0, "quality": 0.97, "facts": false}, ...]}

``quality`` is relative to text (1.0). ``facts`` marks a point measured with a short key-facts text sent
alongside the card (its bytes are negligible next to the card and are left out of the model). Text is always
a candidate: a table without a text row gets one with quality 1.0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, get_args

from ._errors import BusError, ConfigError

__all__ = [
    "BudgetPolicy",
    "Decision",
    "InvalidPolicyInput",
    "NoFeasibleRepresentation",
    "PolicyConfig",
    "PolicyError",
    "PolicyInputs",
    "RateQualityPoint",
    "RateQualityTable",
    "Representation",
]

log = logging.getLogger("edgebus.policy")

Representation = Literal["text", "card", "hybrid"]
_REPRESENTATIONS: tuple[str, ...] = get_args(Representation)
_TABLE_VERSION = 1
#: fp16 tensor copy into the model's cache, measured on the 2-vCPU dev box (FIELD-NOTES: 2.3 GB/s).
DEFAULT_INJECT_BYTES_PER_S = 2.0e9


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

    def __post_init__(self) -> None:
        owner = "RateQualityPoint"
        if self.representation not in _REPRESENTATIONS:
            raise ValueError(f"{owner}.representation must be one of {_REPRESENTATIONS}")
        for name in ("bits", "keep", "layers"):
            _finite(owner, name, getattr(self, name), positive=True, error=ValueError)
        for name in ("bytes_per_token", "quality"):
            _finite(owner, name, getattr(self, name), positive=False, error=ValueError)
        if self.keep > 1 or self.layers > 1:
            raise ValueError(f"{owner}.keep and .layers are fractions in (0, 1]")
        if not isinstance(self.facts, bool):
            raise ValueError(f"{owner}.facts must be a bool")

    @property
    def key(self) -> tuple[str, float, float, float, bool]:
        return (self.representation, self.bits, self.keep, self.layers, self.facts)


_TEXT_POINT = RateQualityPoint(
    representation="text", bits=16.0, keep=1.0, layers=1.0, bytes_per_token=0.0, quality=1.0
)


@dataclass(frozen=True, slots=True)
class RateQualityTable:
    """The rate-quality points calibrated for one model."""

    points: tuple[RateQualityPoint, ...]
    model: str = ""

    def candidates(self) -> tuple[RateQualityPoint, ...]:
        """The points, with a text point added when the table has none."""
        if any(point.representation == "text" for point in self.points):
            return self.points
        return (*self.points, _TEXT_POINT)

    def to_json(self) -> str:
        body = {"version": _TABLE_VERSION, "model": self.model, "points": [asdict(p) for p in self.points]}
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
        unknown = set(document) - {"version", "model", "points"}
        if unknown:
            raise ConfigError(f"{source}: unknown key {sorted(unknown)[0]!r}")
        if document.get("version") != _TABLE_VERSION:
            raise ConfigError(f"{source}: 'version' must be {_TABLE_VERSION}")
        model = document.get("model", "")
        if not isinstance(model, str):
            raise ConfigError(f"{source}: 'model' must be a string")
        raw_points = document.get("points")
        if not isinstance(raw_points, list) or not raw_points:
            raise ConfigError(f"{source}: 'points' must be a non-empty list")
        allowed = {f.name for f in fields(RateQualityPoint)}
        points = []
        for index, raw in enumerate(raw_points):
            where = f"{source}: points[{index}]"
            if not isinstance(raw, dict):
                raise ConfigError(f"{where} must be an object")
            extra = set(raw) - allowed
            if extra:
                raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r}")
            try:
                points.append(RateQualityPoint(**raw))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: {exc}") from exc
        return cls(points=tuple(points), model=model)

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


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    """Operator settings. ``deadline_s``: TTFT the operator wants (``None``: none)."""

    quality_floor: float
    deadline_s: float | None = None
    near_tie: float = 0.10
    switch_margin: float = 0.15
    quality_margin: float = 0.005
    ram_margin: float = 0.10

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


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyInputs:
    """What is known when a context is about to be handed off.

    Headrooms in bytes (the receiver advertises its own), bandwidth in bytes per second (what
    :class:`edgebus.LinkEstimate` calls ``bandwidth_bps``), speeds as measured
    (the receiver's prefill speed is measured at its start and advertised).
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
        ):
            _finite(owner, name, getattr(self, name), positive=positive, error=InvalidPolicyInput)


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What to send, what it is predicted to cost and give, why, and from which inputs."""

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

    @property
    def key(self) -> tuple[str, float, float, float, bool]:
        return (self.representation, self.bits, self.keep, self.layers, self.facts)


@dataclass(frozen=True, slots=True)
class _Estimate:
    point: RateQualityPoint
    wire_bytes: float
    ttft_s: float
    receiver_ram: float
    sender_ram: float


def _estimate(point: RateQualityPoint, x: PolicyInputs) -> _Estimate:
    n = x.context_tokens
    if point.representation == "text":
        wire = float(x.text_bytes)
        ttft = x.rtt_s + wire / x.bandwidth_bytes_per_s + n / x.prefill_tokens_per_s
        return _Estimate(point, wire, ttft, float(x.kv_bytes_per_token * n), 0.0)
    card = point.bytes_per_token * n
    injected = x.kv_bytes_per_token * n * point.keep * point.layers
    ttft = (
        x.rtt_s
        + card / x.bandwidth_bytes_per_s
        + card / x.decode_bytes_per_s
        + injected / x.inject_bytes_per_s
    )
    resident = injected
    wire = card
    if point.representation == "hybrid":
        reprefilled = n * (1 - point.keep)
        wire += x.text_bytes
        ttft += x.text_bytes / x.bandwidth_bytes_per_s + reprefilled / x.prefill_tokens_per_s
        resident += x.kv_bytes_per_token * reprefilled
    return _Estimate(point, wire, ttft, card + resident, card)


def _describe(point: RateQualityPoint) -> str:
    if point.representation == "text":
        return "text"
    facts = "+facts" if point.facts else ""
    return f"{point.representation}{facts}(bits={point.bits:g} keep={point.keep:g} layers={point.layers:g})"


class BudgetPolicy:
    """Chooses a representation per hand-off from a calibrated :class:`RateQualityTable`."""

    def __init__(self, table: RateQualityTable, config: PolicyConfig) -> None:
        self._candidates = table.candidates()
        self._config = config

    @property
    def config(self) -> PolicyConfig:
        return self._config

    def decide(self, inputs: PolicyInputs, previous: Decision | None = None) -> Decision:
        """The representation minimising predicted TTFT under the constraints (module docstring).

        Raises :class:`NoFeasibleRepresentation` when nothing fits the RAM headroom at the quality floor.
        """
        cfg = self._config
        previous_key = previous.key if previous is not None else None
        estimates = [_estimate(point, inputs) for point in self._candidates]
        current = next((e for e in estimates if e.point.key == previous_key), None)
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
            best = min(pool, key=lambda e: (e.ttft_s, -e.point.quality))
            reason = f"no candidate meets the {cfg.deadline_s:g} s deadline; fastest chosen"
        else:
            fastest = min(e.ttft_s for e in pool)
            tied = [e for e in pool if e.ttft_s <= fastest * (1 + cfg.near_tie)]
            best = max(tied, key=lambda e: (e.point.quality, -e.ttft_s, -e.wire_bytes))
            reason = (
                f"fastest feasible of {len(pool)}"
                if best.ttft_s == fastest
                else f"best quality within {cfg.near_tie:.0%} of the fastest ({fastest:.3f} s)"
            )
        chosen = best
        kept = next((e for e in pool if e.point.key == previous_key), None)
        if previous is not None and kept is None:
            reason += (
                f"; previous {previous.representation} bits={previous.bits:g} no longer feasible or on time"
            )
        elif kept is not None and kept is not best:
            faster = best.ttft_s < kept.ttft_s * (1 - cfg.switch_margin)
            better = (
                best.point.quality > kept.point.quality + cfg.quality_margin
                and best.ttft_s <= kept.ttft_s * (1 + cfg.near_tie)
            )
            if not (faster or better):
                chosen = kept
                reason = f"kept previous choice; {_describe(best.point)} not better by the switch margin"
        decision = Decision(
            representation=chosen.point.representation,
            bits=chosen.point.bits,
            keep=chosen.point.keep,
            layers=chosen.point.layers,
            facts=chosen.point.facts,
            predicted_ttft_s=chosen.ttft_s,
            predicted_quality=chosen.point.quality,
            wire_bytes=round(chosen.wire_bytes),
            reason=reason,
            inputs=inputs,
        )
        log.info(
            "decision %s ttft=%.3fs quality=%.3f wire=%d bytes: %s; inputs=%s",
            _describe(chosen.point),
            chosen.ttft_s,
            chosen.point.quality,
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
            e.point.quality >= self._config.quality_floor
            and e.receiver_ram * receiver_factor <= inputs.receiver_headroom_bytes
            and e.sender_ram * sender_factor <= inputs.sender_headroom_bytes
        )
