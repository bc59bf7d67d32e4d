"""Chunked card transfer with byte-credit flow control (the ZeroMQ guide's credit-based file transfer).

A card of ``size`` bytes is cut into chunks of ``chunk_bytes`` (the last one shorter). Its transfer digest
is a hash list: ``H(H(chunk_0) || H(chunk_1) || ...)``, H the protocol's BLAKE3 (:mod:`edgebus._digest`).
Each CHUNK frame carries its chunk's digest in the signed header; the receiver checks the chunk against it
before spooling, and checks the list of verified chunk digests against the announced card digest before
delivering. Any altered chunk therefore fails one of the two checks, end to end, while every byte is hashed
only once per side.

Receiver state machine (:class:`ChunkPuller`), one per transfer::

    missing --take_requests--> outstanding --on_verified--> verified      (all verified: done)
                                   |  ^
                                   |  +----- on_rejected (bad digest/length) ---+
                                   +--expire (no answer in time)--> missing

The receiver never has more than ``credit_bytes`` requested and not yet verified (at least one chunk),
which bounds its memory; the sender only sends what was requested, and its per-peer queue is bounded by a
high-water mark counted in chunks. The sender side is stateless per request: :func:`chunk_view`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ._digest import DIGEST_BYTES, digest, digest_parts
from ._errors import FrameError

# A card is at most this many chunks: a receiver keeps a few dozen bytes of state per chunk, so a tiny
# announced chunk size must not turn an allowed card size into gigabytes of bookkeeping (1 GiB at 4 KiB).
MAX_CHUNKS = 1 << 18

CARD_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z", re.ASCII)


def valid_card_id(card_id: object) -> str:
    """Return ``card_id`` if it is a safe id (also a safe file name); raise :class:`FrameError` otherwise."""
    if not isinstance(card_id, str) or not CARD_ID.match(card_id):
        raise FrameError(f"bad card id {card_id!r}")
    return card_id


def default_card_id(data: bytes | memoryview) -> str:
    """The default card id: the first 32 hex characters of the bytes' digest."""
    return digest(data).hex()[:32]


def chunk_digests(data: bytes | memoryview, chunk_bytes: int) -> list[bytes]:
    view = memoryview(data)
    return [digest(view[o : o + chunk_bytes]) for o in range(0, len(view), chunk_bytes)]


def list_digest(digests: Iterable[bytes]) -> bytes:
    """The card's transfer digest from its chunk digests in order."""
    return digest_parts(digests)


@dataclass(frozen=True, slots=True)
class CardManifest:
    """What a receiver needs to pull and verify a card."""

    card_id: str
    size: int
    chunk_bytes: int
    digest: bytes

    def __post_init__(self) -> None:
        valid_card_id(self.card_id)
        if self.size < 0 or self.chunk_bytes <= 0 or len(self.digest) != DIGEST_BYTES:
            raise FrameError("bad manifest")
        if self.n_chunks > MAX_CHUNKS:
            raise FrameError(f"a card of {self.n_chunks} chunks; at most {MAX_CHUNKS}")

    @property
    def n_chunks(self) -> int:
        return -(-self.size // self.chunk_bytes)

    def chunk_len(self, index: int) -> int:
        if not 0 <= index < self.n_chunks:
            raise FrameError(f"chunk {index} outside 0..{self.n_chunks - 1}")
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)


def chunk_view(data: memoryview, manifest: CardManifest, index: int) -> memoryview:
    """Sender side: the zero-copy slice for chunk ``index``."""
    start = index * manifest.chunk_bytes
    return data[start : start + manifest.chunk_len(index)]


class ChunkPuller:
    """Receiver-side credit window over one card's chunks (pure state; the bus does the I/O)."""

    def __init__(self, manifest: CardManifest, verified: Iterable[int], credit_bytes: int) -> None:
        self.manifest = manifest
        self._credit = credit_bytes
        self._verified: set[int] = set(verified)
        self._missing: list[int] = [
            i for i in range(manifest.n_chunks - 1, -1, -1) if i not in self._verified
        ]
        self._outstanding: dict[int, float] = {}  # index -> time requested
        self._outstanding_bytes = 0

    @property
    def done(self) -> bool:
        return len(self._verified) == self.manifest.n_chunks

    @property
    def verified_count(self) -> int:
        return len(self._verified)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def take_requests(self, now: float) -> list[int]:
        """Indices to request now, lowest first, within the credit (always at least one if any is missing)."""
        out: list[int] = []
        while self._missing:
            size = self.manifest.chunk_len(self._missing[-1])
            if self._outstanding and self._outstanding_bytes + size > self._credit:
                break
            index = self._missing.pop()
            self._outstanding[index] = now
            self._outstanding_bytes += size
            out.append(index)
        return out

    def is_outstanding(self, index: int) -> bool:
        return index in self._outstanding

    def _release(self, index: int) -> bool:
        if self._outstanding.pop(index, None) is None:
            return False
        self._outstanding_bytes -= self.manifest.chunk_len(index)
        return True

    def wants(self, index: int) -> bool:
        """A chunk for ``index`` is useful (not verified yet), even if its request had expired."""
        return 0 <= index < self.manifest.n_chunks and index not in self._verified

    def on_verified(self, index: int) -> None:
        if index in self._verified:
            return
        if not self._release(index) and index in self._missing:
            self._missing.remove(index)
        self._verified.add(index)

    def on_rejected(self, index: int) -> None:
        """A chunk failed verification: ask for it again."""
        if self._release(index):
            self._missing.append(index)

    def expire(self, now: float, timeout: float) -> list[int]:
        """Requests older than ``timeout`` go back to missing; returns them."""
        late = [i for i, t in self._outstanding.items() if now - t > timeout]
        for index in late:
            self._release(index)
        self._missing.extend(sorted(late, reverse=True))
        return late
