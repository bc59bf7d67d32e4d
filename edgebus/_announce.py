"""Card announcements: a per-publisher catalog kept in sync with snapshot + sequenced updates.

This is the ZeroMQ guide's Clone pattern. Each publisher numbers its announcement changes
(ANNOUNCE/WITHDRAW) 1, 2, 3... within an *epoch* (a random number chosen at start, so a restarted
publisher is recognised). A subscriber's :class:`PeerCatalog` for that publisher:

* buffers updates until it has a snapshot (``(epoch, seq, cards)`` fetched over the control channel);
* after the snapshot, applies buffered and live updates with ``seq == last + 1``, ignores ``seq <= last``,
  and on ``seq > last + 1`` (a gap: dropped at a full queue, or sent before our subscription arrived)
  asks for a new snapshot;
* treats a BEACON (sent by the publisher when a subscription arrives) and the ``(epoch, seq)`` in every
  heartbeat reply as an update that changes nothing: a mismatch means a gap. So nothing published before
  the subscription, and nothing dropped, stays missing for longer than one heartbeat.

:class:`AnnouncementStream` is the application's view: current matching cards first, then new ones.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from ._errors import FrameError
from ._transfer import CardManifest, valid_card_id

MAX_PENDING_UPDATES: Final = 1024
# Cards remembered per publisher: each announcement may carry up to 64 KiB of metadata, so an unbounded
# catalog would let one peer grow this node's memory for ever. The oldest announcement goes first.
MAX_CATALOG_CARDS: Final = 4096
MAX_TOPIC_CHARS: Final = 200


@dataclass(frozen=True, slots=True)
class Announcement:
    """A card some peer holds and will serve: pass it to ``Bus.fetch_card``."""

    card_id: str
    size: int
    topic: str
    sender: str
    meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    chunk_bytes: int = 1 << 20
    digest: bytes = b""

    @property
    def manifest(self) -> CardManifest:
        return CardManifest(self.card_id, self.size, self.chunk_bytes, self.digest)

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.card_id,
            "size": self.size,
            "topic": self.topic,
            "chunk": self.chunk_bytes,
            "digest": self.digest,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_wire(
        cls, sender: str, obj: object, *, max_chunk_bytes: int, max_card_bytes: int
    ) -> Announcement:
        """Validate a decoded announcement from ``sender``; raise :class:`FrameError` if unusable."""
        if not isinstance(obj, dict):
            raise FrameError("announcement is not a map")
        card_id = valid_card_id(obj.get("id"))
        size, chunk, topic = obj.get("size"), obj.get("chunk"), obj.get("topic")
        digest, meta = obj.get("digest"), obj.get("meta", {})
        if type(size) is not int or not 0 <= size <= max_card_bytes:
            raise FrameError(f"announced size {size!r} outside 0..{max_card_bytes}")
        if type(chunk) is not int or not 0 < chunk <= max_chunk_bytes:
            raise FrameError(f"announced chunk size {chunk!r} outside 1..{max_chunk_bytes}")
        if not isinstance(topic, str) or len(topic) > MAX_TOPIC_CHARS:
            raise FrameError("bad topic")
        if not isinstance(digest, bytes):
            raise FrameError("bad digest")
        CardManifest(card_id, size, chunk, digest)  # what a pull needs: digest length, at most MAX_CHUNKS
        if not isinstance(meta, dict):
            raise FrameError("meta is not a map")
        return cls(card_id, size, topic, sender, MappingProxyType(meta), chunk, digest)


@dataclass(frozen=True, slots=True)
class Change:
    """One sequenced change from a publisher: an added card, or a withdrawn card id."""

    seq: int
    added: Announcement | None = None
    withdrawn: str | None = None


class PeerCatalog:
    """What one publisher holds, as far as this subscriber knows (pure state machine)."""

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.seq = 0
        self.synced = False
        self.cards: dict[str, Announcement] = {}
        self._pending: deque[tuple[int, Change]] = deque(maxlen=MAX_PENDING_UPDATES)

    def on_update(self, epoch: int, change: Change) -> tuple[list[Announcement], bool]:
        """Apply a live change. Returns (new announcements, whether a snapshot is needed)."""
        if not self.synced:
            self._pending.append((epoch, change))
            return [], True
        if epoch != self.epoch:
            self._desync()
            self._pending.append((epoch, change))
            return [], True
        if change.seq <= self.seq:
            return [], False
        if change.seq > self.seq + 1:
            self._desync()
            self._pending.append((epoch, change))
            return [], True
        return self._apply(change), False

    def on_position(self, epoch: int, seq: int) -> bool:
        """A beacon or heartbeat says the publisher is at (epoch, seq). Returns whether to resync."""
        if not self.synced:
            return True
        if epoch != self.epoch or seq > self.seq:
            self._desync()
            return True
        return False

    def on_snapshot(self, epoch: int, seq: int, cards: list[Announcement]) -> tuple[list[Announcement], bool]:
        """Replace the catalog. Returns (announcements not known before, whether to snapshot again)."""
        before = set(self.cards)
        self.cards = {a.card_id: a for a in cards[-MAX_CATALOG_CARDS:]}
        self.epoch, self.seq, self.synced = epoch, seq, True
        fresh = [a for a in self.cards.values() if a.card_id not in before]
        pending, self._pending = list(self._pending), deque(maxlen=MAX_PENDING_UPDATES)
        for _, change in sorted((p for p in pending if p[0] == epoch), key=lambda p: p[1].seq):
            if change.seq <= self.seq:
                continue
            if change.seq > self.seq + 1:
                # Updates between the snapshot and this one were lost: ask again, without this change
                # (kept, a peer announcing far ahead of its own snapshots would make us ask for ever).
                self._desync()
                return fresh, True
            fresh.extend(self._apply(change))
        return fresh, False

    def _desync(self) -> None:
        self.synced = False

    def _apply(self, change: Change) -> list[Announcement]:
        self.seq = change.seq
        if change.added is not None:
            known = change.added.card_id in self.cards
            self.cards[change.added.card_id] = change.added
            if len(self.cards) > MAX_CATALOG_CARDS:
                del self.cards[next(iter(self.cards))]
            return [] if known else [change.added]
        if change.withdrawn is not None:
            self.cards.pop(change.withdrawn, None)
        return []


class AnnouncementStream:
    """Async iterator of announcements whose topic starts with ``prefix``.

    Yields the cards already known when it was created, then new ones as they arrive. Bounded: when the
    application falls more than ``maxlen`` behind, the oldest entries are dropped and counted. Ends when
    the bus closes or :meth:`aclose` is called. Also an async context manager.
    """

    def __init__(
        self, prefix: str, maxlen: int, on_drop: Callable[[], None], on_close: Callable[[Any], None]
    ):
        self.prefix = prefix
        self._queue: deque[Announcement] = deque()
        self._maxlen = maxlen
        self._on_drop = on_drop
        self._on_close = on_close
        self._wakeup = asyncio.Event()
        self._closed = False

    def offer(self, ann: Announcement) -> None:
        if self._closed or not ann.topic.startswith(self.prefix):
            return
        if len(self._queue) >= self._maxlen:
            self._queue.popleft()
            self._on_drop()
        self._queue.append(ann)
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    async def aclose(self) -> None:
        self.close()
        self._on_close(self)

    def __aiter__(self) -> AnnouncementStream:
        return self

    async def __anext__(self) -> Announcement:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._queue.popleft()

    async def __aenter__(self) -> AnnouncementStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
