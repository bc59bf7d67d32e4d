"""Statistics as frozen snapshots (the live counters stay private to the bus)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType


@dataclass(frozen=True, slots=True, kw_only=True)
class BusStats:
    """A point-in-time copy of a bus's counters. ``rejected`` maps reason -> frames rejected."""

    frames_in: int
    frames_out: int
    rejected: Mapping[str, int]
    send_dropped: int
    chunks_served: int
    chunks_received: int
    chunks_duplicate: int
    cards_published: int
    cards_delivered: int
    acks_received: int
    announcements_dropped: int
    announcement_gaps: int
    snapshots_applied: int
    requests_handled: int
    curve_denied: int
    task_failures: int

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


class Counters:
    """Mutable counters owned by one bus; :meth:`snapshot` freezes them."""

    def __init__(self) -> None:
        self.values: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()

    def snapshot(self, *, curve_denied: int) -> BusStats:
        names = [f.name for f in fields(BusStats) if f.name not in ("rejected", "curve_denied")]
        return BusStats(
            rejected=MappingProxyType(dict(self.rejected)),
            curve_denied=curve_denied,
            **{name: self.values[name] for name in names},
        )
