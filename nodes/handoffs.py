"""Receiver-side bookkeeping of hand-offs: when each began and became usable, and split heads in progress.

TTFT accounting (what an ``ask`` reply reports): a hand-off *starts* when this node begins pulling its first
piece (a split's head message, else the card or text itself) and is *ready* when everything the answer
needs is here: the card stored and, for a split, the head prefilled. ``handoff_s = ready - start`` on this
node's monotonic clock; the answer's own ``ttft_s`` (decode, join, question, first token) comes after it,
so ``handoff_ttft_s = handoff_s + ttft_s`` is the time to first token of a question that was waiting from the
moment the reader started sending. ``sent_to_ready_s`` measures from the reader's wall clock instead (its
``sent_at``, in the announcement): it also counts the announcement's trip, and is meaningful only where the
two clocks agree (one host, as in the benchmarks).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

#: Split heads kept prefilled (or in progress) at once; each holds a KV snapshot of its head.
MAX_HEADS: Final = 4
#: Start times remembered (a head message whose card never comes leaves one behind).
MAX_TIMINGS: Final = 4096


@dataclass(frozen=True, kw_only=True)
class HeadResult:
    """A prefilled split head: the snapshot, its prefill time and when it was done (monotonic)."""

    snapshot: Any  # qkv.KVSnapshot
    prefill_s: float
    tokens: int
    done: float


@dataclass(frozen=True, kw_only=True)
class Timing:
    """When a hand-off started (monotonic), and the reader's wall-clock send time, if it said."""

    started: float
    sent_at: float | None = None


def sent_at(meta: Any) -> float | None:
    """The reader's ``sent_at`` (wall clock) from announcement meta, if it is a sane number."""
    value = meta.get("sent_at") if hasattr(meta, "get") else None
    if isinstance(value, float) and 0 < value < 1e11:
        return value
    return None


class HandoffBook:
    """Start times by card id (the id an ``ask`` names) and split heads by their tail card id."""

    def __init__(self, max_heads: int = MAX_HEADS) -> None:
        self._timings: OrderedDict[str, Timing] = OrderedDict()
        self._heads: OrderedDict[str, asyncio.Future[HeadResult | None]] = OrderedDict()
        self._max_heads = max_heads

    def begin(self, card_id: str, started: float, sent: float | None) -> None:
        """Record the start of the hand-off of ``card_id`` unless an earlier piece already started it."""
        if card_id not in self._timings:
            self._timings[card_id] = Timing(started=started, sent_at=sent)
            while len(self._timings) > MAX_TIMINGS:
                self._timings.popitem(last=False)

    def timing(self, card_id: str) -> Timing | None:
        return self._timings.get(card_id)

    def add_head(self, tail_card: str, job: asyncio.Future[HeadResult | None]) -> None:
        """A head being prefilled for ``tail_card``; the oldest is forgotten (and cancelled, so a prefill
        not yet started never runs) beyond ``max_heads``: heads come from peers, faster than they prefill."""
        replaced = self._heads.get(tail_card)
        if replaced is not None and replaced is not job:
            replaced.cancel()
        self._heads[tail_card] = job
        self._heads.move_to_end(tail_card)
        while len(self._heads) > self._max_heads:
            _, dropped = self._heads.popitem(last=False)
            dropped.cancel()

    def head(self, tail_card: str) -> asyncio.Future[HeadResult | None] | None:
        return self._heads.get(tail_card)

    def forget(self, card_id: str) -> None:
        """The card is gone (shed or never usable): drop its timing and head."""
        self._timings.pop(card_id, None)
        self._heads.pop(card_id, None)


def handoff_times(
    timing: Timing | None, stored: float, head: HeadResult | None, *, now_wall: float, now: float
) -> dict[str, float | None]:
    """The reply's accounting fields (module docstring) for a card stored at ``stored`` (monotonic)."""
    ready = max(stored, head.done) if head is not None else stored
    if timing is None:
        return {"handoff_s": None, "sent_to_ready_s": None}
    ready_wall = now_wall - (now - ready)
    return {
        "handoff_s": ready - timing.started,
        "sent_to_ready_s": None if timing.sent_at is None else ready_wall - timing.sent_at,
    }


def monotonic() -> float:
    return time.monotonic()
