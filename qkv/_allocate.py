"""Per-layer, per-tensor code widths that meet an average bit budget at the least predicted distortion.

Input: a distortion table ``table[layer]["k" | "v"][width]`` (the rise in next-token KL when only that
tensor of that layer is quantized at that width, measured by calibration) and a budget in stored bits per
value *including* side information: a width ``w <= 8`` costs ``w + 32 / group_size`` bits per value (an fp16
scale and an fp16 zero per group), 16 (fp16) costs 16, 32 (raw fp32) costs 32. Every allocated tensor holds
the same number of values (all layers share the snapshot's tokens, heads and head_dim), so the average is a
plain mean over the allocated tensors. Distortions are assumed additive across tensors.

Algorithm (a multiple-choice knapsack): work in integer cost units of ``1 / group_size`` bit per value.

1. Lagrangian greedy: start every tensor at its cheapest width; on each tensor's lower convex hull of
   (cost, distortion), take upgrade segments in order of distortion saved per bit, and stop at the first one
   that does not fit. The result is optimal for the budget it spends.
2. Final fill: spend the leftover ``L`` exactly (a small dynamic programme over every remaining upgrade of
   every tensor, hull or not).

Guarantees (tested against brute force): the budget is never exceeded; with ``lam`` the gain per bit of the
segment that stopped the greedy, the LP relaxation gives ``optimum >= prefix - lam * L``, so
``Allocation.gap_bound = lam * L - fill_gain`` bounds the distance to the true optimum (0 when the greedy
stopped exactly or took everything). A bigger budget never gives a larger total distortion: with the same
greedy prefix the exact fill only gets more room; a longer prefix contains the blocking segment, which saves
``lam * cost >= lam * L >=`` any fill of the smaller budget (every remaining upgrade saves at most ``lam`` per
unit, by the hull's convexity and the greedy order).

:class:`SensitivityProfile` stores a table with what it was measured for, as versioned JSON; anything
missing, malformed, of another version or for another model raises :class:`~qkv._errors.CalibrationError`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from ._errors import CalibrationError
from ._rotation import ROTATIONS, Rotation, check_rotation

TENSORS = ("k", "v")
DEFAULT_WIDTHS = (2, 3, 4, 5, 6, 7, 8, 16)
ALLOWED_WIDTHS = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 16, 32})
PROFILE_VERSION = 1

#: ``table[layer]["k" | "v"][width] -> distortion``
DistortionTable = Sequence[Mapping[str, Mapping[int, float]]]


def _cost_units(width: int, group_size: int) -> int:
    if width not in ALLOWED_WIDTHS:
        raise ValueError(f"width {width} is not one of {sorted(ALLOWED_WIDTHS)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if width <= 8:
        return width * group_size + 32
    return width * group_size


def width_cost(width: int, group_size: int) -> float:
    """Stored bits per value of ``width`` with groups of ``group_size``, scale and zero counted."""
    return _cost_units(width, group_size) / group_size


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """Widths per layer (``None`` for a layer not allocated) and what they are predicted to cost."""

    key_bits: tuple[int | None, ...]
    value_bits: tuple[int | None, ...]
    bits_per_value: float  # mean stored bits per value over allocated tensors, overhead counted
    distortion: float  # predicted total (sum over allocated tensors)
    gap_bound: float  # distortion - optimum <= gap_bound


@dataclass(frozen=True)
class _Option:
    units: int
    distortion: float
    width: int


def _options(row: Mapping[int, float], widths: Sequence[int], group_size: int, where: str) -> list[_Option]:
    options: list[_Option] = []
    for width in widths:
        if width not in row:
            raise ValueError(f"distortion table has no width {width} for {where}")
        value = float(row[width])
        if not math.isfinite(value):
            raise ValueError(f"distortion for {where} width {width} is not finite")
        options.append(_Option(_cost_units(width, group_size), value, width))
    # Cheapest first; for equal cost the lower distortion (then the wider code) first.
    options.sort(key=lambda o: (o.units, o.distortion, -o.width))
    return options


def _lower_hull(options: list[_Option]) -> list[_Option]:
    """Non-dominated options on the lower convex hull, from the cheapest; gains per unit strictly fall."""
    frontier: list[_Option] = []
    for option in options:
        if frontier and option.distortion >= frontier[-1].distortion:
            continue  # costs at least as much and saves nothing
        frontier.append(option)
    hull: list[_Option] = []
    for option in frontier:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            gain_ab = (a.distortion - b.distortion) / (b.units - a.units)
            gain_bo = (b.distortion - option.distortion) / (option.units - b.units)
            if gain_ab > gain_bo:
                break
            hull.pop()
        hull.append(option)
    return hull


def _exact_fill(
    current: list[_Option], options: list[list[_Option]], leftover: int
) -> tuple[list[_Option], float]:
    """Best upgrades within ``leftover`` units (each tensor changes at most once): new choices, gain."""
    upgrades = [
        [
            (o.units - cur.units, cur.distortion - o.distortion, o)
            for o in opts
            if o.units > cur.units and o.distortion < cur.distortion and o.units - cur.units <= leftover
        ]
        for cur, opts in zip(current, options, strict=True)
    ]
    useful = max((d for ups in upgrades for d, _, _ in ups), default=0)
    capacity = min(leftover, useful)
    if capacity <= 0:
        return list(current), 0.0
    best = np.zeros(capacity + 1)
    choices = []  # per tensor: index into its upgrades (-1 = none) that is best at each capacity
    for ups in upgrades:
        previous = best.copy()
        choice = np.full(capacity + 1, -1, dtype=np.int64)
        for index, (units, gain, _) in enumerate(ups):
            candidate = np.full(capacity + 1, -np.inf)
            candidate[units:] = previous[: capacity + 1 - units] + gain
            better = candidate > best
            best = np.where(better, candidate, best)
            choice = np.where(better, index, choice)
        choices.append(choice)
    chosen = list(current)
    remaining = capacity
    for tensor in range(len(upgrades) - 1, -1, -1):
        index = int(choices[tensor][remaining])
        if index >= 0:
            units, _, option = upgrades[tensor][index]
            chosen[tensor] = option
            remaining -= units
    return chosen, float(best[capacity])


def allocate_bits(
    table: DistortionTable,
    budget_bits: float,
    *,
    group_size: int = 32,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    layers: Sequence[int] | None = None,
) -> Allocation:
    """Widths for ``layers`` (default: all) whose mean stored bits per value stays within ``budget_bits``.

    Raises ``ValueError`` if even the cheapest width of every tensor exceeds the budget, or on a bad table.
    """
    if not math.isfinite(budget_bits):
        raise ValueError(f"budget_bits must be finite, got {budget_bits}")
    chosen_layers = list(range(len(table))) if layers is None else sorted(set(layers))
    if not chosen_layers:
        raise ValueError("no layers to allocate")
    if chosen_layers[0] < 0 or chosen_layers[-1] >= len(table):
        raise ValueError(f"layers must be in 0..{len(table) - 1}, got {chosen_layers}")
    unique_widths = sorted(set(widths))
    if not unique_widths:
        raise ValueError("no widths to choose from")
    items = [(layer, tensor) for layer in chosen_layers for tensor in TENSORS]
    options = []
    for layer, tensor in items:
        if tensor not in table[layer]:
            raise ValueError(f"distortion table has no {tensor!r} for layer {layer}")
        options.append(_options(table[layer][tensor], unique_widths, group_size, f"layer {layer} {tensor}"))
    # The tolerance absorbs binary rounding of budgets such as 3.3 bits, never a whole unit.
    capacity = math.floor(budget_bits * len(items) * group_size + 1e-6)

    hulls = [_lower_hull(opts) for opts in options]
    current = [hull[0] for hull in hulls]
    used = sum(o.units for o in current)
    if used > capacity:
        cheapest = used / len(items) / group_size
        raise ValueError(f"budget {budget_bits} bits per value is below the cheapest mix ({cheapest:.4g})")
    segments = sorted(
        (
            (
                (hull[step].distortion - hull[step + 1].distortion)
                / (hull[step + 1].units - hull[step].units),
                item,
                step,
            )
            for item, hull in enumerate(hulls)
            for step in range(len(hull) - 1)
        ),
        key=lambda s: (-s[0], s[1], s[2]),
    )
    blocking_gain = 0.0
    for gain, item, step in segments:
        cost = hulls[item][step + 1].units - hulls[item][step].units
        if used + cost > capacity:
            blocking_gain = gain
            break
        current[item] = hulls[item][step + 1]
        used += cost

    leftover = capacity - used
    final, fill_gain = _exact_fill(current, options, leftover)
    spent = sum(o.units for o in final)
    distortion = sum(o.distortion for o in final)
    gap = max(0.0, blocking_gain * leftover - fill_gain) if blocking_gain > 0 else 0.0

    key_bits: list[int | None] = [None] * len(table)
    value_bits: list[int | None] = [None] * len(table)
    for (layer, tensor), option in zip(items, final, strict=True):
        (key_bits if tensor == "k" else value_bits)[layer] = option.width
    return Allocation(
        key_bits=tuple(key_bits),
        value_bits=tuple(value_bits),
        bits_per_value=spent / len(items) / group_size,
        distortion=distortion,
        gap_bound=gap,
    )


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _malformed(message: str) -> CalibrationError:
    return CalibrationError(f"malformed sensitivity profile: {message}")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_row(index: int, row: object, widths: tuple[int, ...]) -> dict[str, dict[int, float]]:
    if not isinstance(row, dict) or set(row) != set(TENSORS):
        raise _malformed(f"layer {index} needs exactly the keys k and v")
    parsed: dict[str, dict[int, float]] = {}
    for tensor in TENSORS:
        cells = row[tensor]
        if not isinstance(cells, dict) or set(cells) != {str(w) for w in widths}:
            raise _malformed(f"layer {index} {tensor} needs exactly the widths {list(widths)}")
        parsed[tensor] = {}
        for width in widths:
            value = cells[str(width)]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise _malformed(f"layer {index} {tensor} width {width} is not a finite number")
            parsed[tensor][width] = float(value)
    return parsed


@dataclass(frozen=True, kw_only=True)
class SensitivityProfile:
    """A calibrated distortion table and what it was measured for (model, group size, widths)."""

    fingerprint_digest: str
    model_name: str
    group_size: int
    widths: tuple[int, ...]
    table: tuple[Mapping[str, Mapping[int, float]], ...]
    created: str = field(default_factory=_utc_now)
    version: int = PROFILE_VERSION
    # The card coding the table was measured under (see qkv._rotation, Budget.fp16_sinks): distortions of
    # one coding do not predict another's. Written only when not the defaults, so older files stay valid.
    rotation: Rotation = "none"
    fp16_sinks: int = 0

    def __post_init__(self) -> None:
        check_rotation(self.rotation)
        if not _is_int(self.fp16_sinks) or self.fp16_sinks < 0:
            raise ValueError(f"fp16_sinks must be an int >= 0, got {self.fp16_sinks!r}")

    def to_dict(self) -> dict[str, Any]:
        coding: dict[str, Any] = {}
        if self.rotation != "none":
            coding["rotation"] = self.rotation
        if self.fp16_sinks:
            coding["fp16_sinks"] = self.fp16_sinks
        return {
            **coding,
            "version": self.version,
            "fingerprint_digest": self.fingerprint_digest,
            "model_name": self.model_name,
            "group_size": self.group_size,
            "widths": list(self.widths),
            "created": self.created,
            # JSON object keys are strings; from_dict turns them back into ints.
            "table": [
                {tensor: {str(w): float(row[tensor][w]) for w in self.widths} for tensor in TENSORS}
                for row in self.table
            ],
        }

    @classmethod
    def from_dict(cls, data: object) -> SensitivityProfile:
        """Validate a parsed profile; every defect raises :class:`CalibrationError`."""
        if not isinstance(data, dict):
            raise CalibrationError("malformed sensitivity profile: top level is not an object")
        version = data.get("version")
        if not _is_int(version) or version != PROFILE_VERSION:
            raise CalibrationError(f"sensitivity profile version {version!r}, expected {PROFILE_VERSION}")
        digest, name, created = data.get("fingerprint_digest"), data.get("model_name"), data.get("created")
        if not isinstance(digest, str) or not isinstance(name, str) or not isinstance(created, str):
            raise _malformed("fingerprint_digest, model_name and created must be strings")
        group_size = data.get("group_size")
        if not _is_int(group_size) or not 1 <= group_size <= 4096:
            raise _malformed("group_size must be an int in 1..4096")
        raw_widths = data.get("widths")
        if not isinstance(raw_widths, list) or not raw_widths:
            raise _malformed("widths must be a non-empty list")
        if not all(_is_int(w) and w in ALLOWED_WIDTHS for w in raw_widths):
            raise _malformed(f"widths must be among {sorted(ALLOWED_WIDTHS)}")
        widths = tuple(sorted(set(raw_widths)))
        raw_table = data.get("table")
        if not isinstance(raw_table, list) or not raw_table:
            raise _malformed("table must be a non-empty list")
        rotation = data.get("rotation", "none")
        if rotation not in ROTATIONS:
            raise _malformed(f"rotation must be one of {', '.join(ROTATIONS)}")
        fp16_sinks = data.get("fp16_sinks", 0)
        if not _is_int(fp16_sinks) or not 0 <= fp16_sinks <= 1 << 20:
            raise _malformed("fp16_sinks must be an int in 0..2**20")
        return cls(
            rotation=rotation,
            fp16_sinks=fp16_sinks,
            fingerprint_digest=digest,
            model_name=name,
            group_size=group_size,
            widths=widths,
            table=tuple(_parse_row(index, row, widths) for index, row in enumerate(raw_table)),
            created=created,
            version=PROFILE_VERSION,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> SensitivityProfile:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"sensitivity profile is not JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temporary file, then rename), so a reader never sees half a profile."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.to_json())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        fingerprint_digest: str | None = None,
        group_size: int | None = None,
    ) -> SensitivityProfile:
        """Read a profile; with the keywords given, also check its model and group size."""
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise CalibrationError(f"cannot read sensitivity profile {path}: {exc}") from exc
        profile = cls.from_json(text)
        profile.require(fingerprint_digest=fingerprint_digest, group_size=group_size)
        return profile

    def require(
        self,
        *,
        fingerprint_digest: str | None = None,
        group_size: int | None = None,
        rotation: str | None = None,
        fp16_sinks: int | None = None,
    ) -> None:
        """Raise :class:`CalibrationError` if this profile was made for another model or card coding."""
        if rotation is not None and rotation != self.rotation:
            raise CalibrationError(
                f"sensitivity profile was measured with rotation {self.rotation!r}, not {rotation!r}"
            )
        if fp16_sinks is not None and fp16_sinks != self.fp16_sinks:
            raise CalibrationError(
                f"sensitivity profile was measured with {self.fp16_sinks} fp16 sink tokens, not {fp16_sinks}"
            )
        if fingerprint_digest is not None and fingerprint_digest != self.fingerprint_digest:
            raise CalibrationError(
                f"sensitivity profile is for model {self.fingerprint_digest} ({self.model_name}), "
                f"not {fingerprint_digest}"
            )
        if group_size is not None and group_size != self.group_size:
            raise CalibrationError(
                f"sensitivity profile was measured with group size {self.group_size}, not {group_size}"
            )

    def allocate(self, budget_bits: float, *, layers: Sequence[int] | None = None) -> Allocation:
        """:func:`allocate_bits` over this profile's table, widths and group size."""
        return allocate_bits(
            self.table, budget_bits, group_size=self.group_size, widths=self.widths, layers=layers
        )
