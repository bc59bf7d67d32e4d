"""A memory-aware LRU store of cards (opaque bytes) by id, with pinning, disk spill and persistence.

Contract:

* **Budget.** The store holds at most ``budget`` bytes in memory, where
  ``budget = min(cap_bytes, available + held - reserve_bytes)``: ``available`` comes from a
  :class:`~edgebus._memory.MemoryProbe` and ``held`` is what the store itself holds (those pages are already
  counted as used, so leaving them out would make the store shed itself in a feedback loop). The probe is
  read on every :meth:`CardStore.put`, at most once per ``probe_interval_s``, and on every
  :meth:`CardStore.refresh`.
* **Shedding.** When the budget falls below what is held, the store evicts before doing anything else;
  :meth:`CardStore.refresh` returns the ids it shed.
* **Pinning.** A pinned card (in flight, in use) is never evicted, spilled or shed. Pins are counted:
  ``with store.pinned(card_id) as card: ...`` or ``pin``/``unpin`` in pairs, or ``put(..., pin=True)``.
  Pinned cards may keep the store above a budget that fell under them; they are shed once unpinned.
* **Eviction** is least-recently-used among unpinned cards. A :meth:`CardStore.put` that cannot fit even
  after evicting every unpinned card raises :class:`~edgebus._errors.StoreFull` and changes nothing.
* **Spill** (optional): evicted cards go to ``spill_dir`` (bounded by ``spill_cap_bytes``, LRU there too)
  instead of being dropped, and come back on :meth:`CardStore.get`. Spill files are a cache for this process
  only: stale ones are removed at construction and by :meth:`CardStore.close`.
* **Card files** (spill and persistence) are written to a temporary name and renamed into place, so a
  reader sees a whole file or none. Layout: ``CARD_FILE_HEADER`` (magic ``b"EBCARD01"``, u64 little-endian
  payload length, 32-byte sha256 of the payload) then the payload. A file whose header, length or digest
  does not match is deleted and counted in ``corrupt_spills``, never returned. The sha256 detects torn
  writes and bit rot; it does not authenticate: anyone who can write the directory can write a valid file.
* **Persistence.** :meth:`CardStore.persist` writes every card into a fresh ``snapshot-*`` directory with a
  ``MANIFEST.json`` (ids, sizes, digests, LRU order), fsyncs it, then atomically replaces ``CURRENT`` to
  point at it; :meth:`CardStore.load` reads whatever ``CURRENT`` names. A crash mid-persist leaves the
  previous snapshot in force.
* **Threads.** Every public method takes one lock, so the store can be shared by the event loop and worker
  threads. Spill and persistence do file I/O under that lock: with spill enabled, call it from a worker
  thread (``asyncio.to_thread``) rather than from the event loop.

Card ids are 1-128 characters of ``[A-Za-z0-9._-]`` not starting with ``.``; they name files, so anything
else is refused with :class:`InvalidCardId`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ._errors import CardNotFound, ClosedError, StoreError, StoreFull
from ._memory import MemoryProbe, PsutilMemoryProbe

__all__ = [
    "CARD_FILE_HEADER",
    "CardStore",
    "CardStoreConfig",
    "CardStoreStatistics",
    "InvalidCardId",
]

log = logging.getLogger("edgebus.store")

#: Seconds between two probe reads triggered by ``put`` (``refresh`` always reads). Module level so tests
#: can shorten it.
PROBE_INTERVAL_S = 0.05

CARD_FILE_HEADER = struct.Struct("<8sQ32s")
_CARD_MAGIC = b"EBCARD01"
_CARD_SUFFIX = ".card"
_MANIFEST = "MANIFEST.json"
_CURRENT = "CURRENT"
_MANIFEST_VERSION = 1
_CARD_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_SNAPSHOT = re.compile(r"snapshot-[0-9]+-[0-9a-f]{8}")


class InvalidCardId(StoreError, ValueError):
    """A card id that is not a safe file name (see the module docstring)."""


class _CorruptCardFile(Exception):
    """Internal: a card file failed verification (never leaves this module)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CardStoreConfig:
    """How much a :class:`CardStore` may hold.

    ``cap_bytes``: never hold more than this in memory. ``reserve_bytes``: memory left to everything else
    (the model, the bus, the OS). ``spill_dir``/``spill_cap_bytes``: optional disk overflow; spill is off
    when ``spill_dir`` is ``None``. ``max_cards``: at most this many cards in memory and as many in spill
    (cards come from peers: a flood of tiny ones must not grow the bookkeeping around a byte budget).
    """

    cap_bytes: int
    reserve_bytes: int = 256 << 20
    spill_dir: Path | None = None
    spill_cap_bytes: int = 0
    probe_interval_s: float = PROBE_INTERVAL_S
    max_cards: int = 4096

    def __post_init__(self) -> None:
        for name in ("cap_bytes", "reserve_bytes", "spill_cap_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"CardStoreConfig.{name} must be a non-negative int, got {value!r}")
        if isinstance(self.max_cards, bool) or not isinstance(self.max_cards, int) or self.max_cards < 1:
            raise ValueError(f"CardStoreConfig.max_cards must be a positive int, got {self.max_cards!r}")
        if not self.probe_interval_s >= 0:
            raise ValueError(f"CardStoreConfig.probe_interval_s must be >= 0, got {self.probe_interval_s!r}")
        if self.spill_dir is not None and self.spill_cap_bytes == 0:
            raise ValueError("CardStoreConfig.spill_dir is set but spill_cap_bytes is 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class CardStoreStatistics:
    """A snapshot of a :class:`CardStore`. Counters only grow; the rest describe the moment of the call.

    ``evictions`` counts cards moved out of memory (spilled or dropped); ``dropped`` counts cards lost for
    good (evicted with no room to spill, pushed out of the spill directory, or failed to spill);
    ``corrupt_spills`` counts card files (spilled or persisted) that failed verification.
    """

    entries: int
    bytes: int
    budget: int
    pinned: int
    pinned_bytes: int
    hits: int
    misses: int
    evictions: int
    dropped: int
    spills: int
    spill_loads: int
    corrupt_spills: int
    spill_failures: int
    spill_entries: int
    spill_bytes: int


class _Entry:
    __slots__ = ("data", "pins")

    def __init__(self, data: bytes, pins: int) -> None:
        self.data = data
        self.pins = pins


def _check_id(card_id: str) -> None:
    if not isinstance(card_id, str) or _CARD_ID.fullmatch(card_id) is None:
        raise InvalidCardId(f"invalid card id {card_id!r}: want 1-128 of [A-Za-z0-9._-], no leading '.'")


def _encode_card_file(data: bytes) -> tuple[bytes, str]:
    digest = hashlib.sha256(data).digest()
    return CARD_FILE_HEADER.pack(_CARD_MAGIC, len(data), digest), digest.hex()


def _decode_card_file(raw: bytes, expected_sha256: str | None = None) -> bytes:
    if len(raw) < CARD_FILE_HEADER.size:
        raise _CorruptCardFile("shorter than its header")
    magic, length, digest = CARD_FILE_HEADER.unpack_from(raw)
    if magic != _CARD_MAGIC:
        raise _CorruptCardFile("bad magic")
    if length != len(raw) - CARD_FILE_HEADER.size:
        raise _CorruptCardFile("length does not match the header")
    payload = raw[CARD_FILE_HEADER.size :]
    if hashlib.sha256(payload).digest() != digest:
        raise _CorruptCardFile("sha256 mismatch")
    if expected_sha256 is not None and digest.hex() != expected_sha256:
        raise _CorruptCardFile("sha256 differs from the manifest")
    return payload


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, chunks: tuple[bytes, ...], *, durable: bool) -> None:
    """Write ``chunks`` to a temporary file beside ``path`` and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class CardStore:
    """LRU card store bounded by a memory budget; see the module docstring for the contract."""

    def __init__(
        self,
        config: CardStoreConfig,
        *,
        probe: MemoryProbe | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._probe: MemoryProbe = probe if probe is not None else PsutilMemoryProbe()
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._mem: OrderedDict[str, _Entry] = OrderedDict()
        self._spill: OrderedDict[str, int] = OrderedDict()
        self._bytes = 0
        self._pinned_bytes = 0
        self._spill_bytes = 0
        self._hits = self._misses = self._evictions = self._dropped = 0
        self._spills = self._spill_loads = self._corrupt = self._spill_failures = 0
        self._spill_dir = config.spill_dir
        if self._spill_dir is not None:
            self._spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._remove_spill_files()
        self._budget = 0
        self._last_probe = 0.0
        self._read_budget()

    # ------------------------------------------------------------------ public API

    def put(self, card_id: str, card: bytes, *, pin: bool = False) -> None:
        """Store ``card`` under ``card_id`` (replacing any card with that id; its pins carry over).

        With ``pin=True`` the card is also pinned once (release with :meth:`unpin`). Raises
        :class:`StoreFull` without changing anything when the card cannot fit even after evicting every
        unpinned card.
        """
        _check_id(card_id)
        if not isinstance(card, bytes):
            raise TypeError(f"a card is bytes, got {type(card).__name__}")
        with self._lock:
            self._check_open()
            if self._clock() - self._last_probe >= self._config.probe_interval_s:
                self._read_budget()
            self._shed_to(self._budget)
            old = self._mem.get(card_id)
            other_pinned = self._pinned_bytes - (len(old.data) if old is not None and old.pins else 0)
            if other_pinned + len(card) > self._budget:
                raise StoreFull(
                    f"card {card_id} ({len(card)} bytes) does not fit: budget {self._budget} bytes,"
                    f" {other_pinned} bytes pinned"
                )
            pins = 0
            if old is not None:
                pins = old.pins
                self._remove_from_memory(card_id)
            elif card_id in self._spill:
                self._remove_spill_file(card_id)
            self._shed_to(self._budget - len(card), max_cards=self._config.max_cards - 1)
            self._insert(card_id, card, pins + (1 if pin else 0))

    def get(self, card_id: str) -> bytes:
        """The card's bytes, from memory or from spill (moved back into memory when it fits).

        Raises :class:`CardNotFound` when absent, including when its spill file failed verification.
        """
        _check_id(card_id)
        with self._lock:
            self._check_open()
            data = self._fetch(card_id, must_reside=False)
            self._hits += 1
            return data

    def pin(self, card_id: str) -> bytes:
        """Pin a card (bringing it back from spill if needed) and return its bytes; pair with :meth:`unpin`.

        Raises :class:`CardNotFound`, or :class:`StoreFull` when a spilled card cannot come back into memory.
        """
        _check_id(card_id)
        with self._lock:
            self._check_open()
            data = self._fetch(card_id, must_reside=True)
            self._hits += 1
            entry = self._mem[card_id]
            if entry.pins == 0:
                self._pinned_bytes += len(entry.data)
            entry.pins += 1
            return data

    def unpin(self, card_id: str) -> None:
        """Release one pin. The card becomes the most recently used; shed if the budget fell meanwhile.

        A no-op once the store is closed. Raises :class:`StoreError` if the card is not pinned.
        """
        _check_id(card_id)
        with self._lock:
            if self._closed:
                # close() already dropped every card; a pinned block that outlives it has nothing to release.
                return
            entry = self._mem.get(card_id)
            if entry is None or entry.pins == 0:
                raise StoreError(f"card {card_id} is not pinned")
            entry.pins -= 1
            if entry.pins == 0:
                self._pinned_bytes -= len(entry.data)
                self._mem.move_to_end(card_id)
                self._shed_to(self._budget)

    @contextlib.contextmanager
    def pinned(self, card_id: str) -> Iterator[bytes]:
        """``with store.pinned(card_id) as card:`` keeps the card in memory for the block."""
        data = self.pin(card_id)
        try:
            yield data
        finally:
            self.unpin(card_id)

    def discard(self, card_id: str) -> bool:
        """Remove a card from memory and spill. False if absent; :class:`StoreError` if it is pinned."""
        _check_id(card_id)
        with self._lock:
            self._check_open()
            entry = self._mem.get(card_id)
            if entry is not None:
                if entry.pins:
                    raise StoreError(f"card {card_id} is pinned")
                self._remove_from_memory(card_id)
                return True
            if card_id in self._spill:
                self._remove_spill_file(card_id)
                return True
            return False

    def refresh(self) -> tuple[str, ...]:
        """Re-read memory now, recompute the budget and shed down to it; returns the ids shed (LRU first)."""
        with self._lock:
            self._check_open()
            self._read_budget()
            return self._shed_to(self._budget)

    @property
    def budget(self) -> int:
        with self._lock:
            return self._budget

    def statistics(self) -> CardStoreStatistics:
        with self._lock:
            return CardStoreStatistics(
                entries=len(self._mem),
                bytes=self._bytes,
                budget=self._budget,
                pinned=sum(1 for entry in self._mem.values() if entry.pins),
                pinned_bytes=self._pinned_bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                dropped=self._dropped,
                spills=self._spills,
                spill_loads=self._spill_loads,
                corrupt_spills=self._corrupt,
                spill_failures=self._spill_failures,
                spill_entries=len(self._spill),
                spill_bytes=self._spill_bytes,
            )

    def __contains__(self, card_id: object) -> bool:
        with self._lock:
            return card_id in self._mem or card_id in self._spill

    def __len__(self) -> int:
        """Cards held, in memory and spilled."""
        with self._lock:
            return len(self._mem) + len(self._spill)

    def persist(self, directory: Path) -> int:
        """Write every card (memory and spill, LRU order) as a new snapshot under ``directory``.

        Atomic: ``CURRENT`` is replaced only after the snapshot is complete and fsynced; older snapshots
        are then removed. Returns the number of cards written (a spilled card whose file is corrupt is
        counted and left out).
        """
        with self._lock:
            self._check_open()
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            name = f"snapshot-{time.time_ns()}-{secrets.token_hex(4)}"
            snapshot = directory / name
            snapshot.mkdir(mode=0o700)
            manifest: list[dict[str, object]] = []
            try:
                for card_id in list(self._spill) + list(self._mem):
                    data = self._mem[card_id].data if card_id in self._mem else self._read_spill(card_id)
                    if data is None:
                        continue
                    header, digest = _encode_card_file(data)
                    _write_atomically(snapshot / f"{card_id}{_CARD_SUFFIX}", (header, data), durable=True)
                    manifest.append({"id": card_id, "size": len(data), "sha256": digest})
                body = json.dumps({"version": _MANIFEST_VERSION, "cards": manifest}, indent=1).encode()
                _write_atomically(snapshot / _MANIFEST, (body,), durable=True)
                _fsync_dir(snapshot)
                _write_atomically(directory / _CURRENT, (f"{name}\n".encode(),), durable=True)
                _fsync_dir(directory)
            except BaseException:
                shutil.rmtree(snapshot, ignore_errors=True)
                raise
            for old in directory.iterdir():
                if old.name != name and _SNAPSHOT.fullmatch(old.name) and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
            log.info("persisted %d cards to %s", len(manifest), snapshot)
            return len(manifest)

    def load(self, directory: Path) -> int:
        """Load the snapshot ``directory/CURRENT`` names (none: 0). Returns the number of cards loaded.

        Cards are inserted unpinned, oldest first, so the LRU order survives; a card that no longer fits is
        handled like any put (older ones are evicted or spilled first; one that cannot fit at all is
        skipped). Corrupt card files are counted in ``corrupt_spills`` and skipped. A missing or malformed
        ``CURRENT``/``MANIFEST.json`` raises :class:`StoreError`.
        """
        current = directory / _CURRENT
        if not current.exists():
            return 0
        name = current.read_text().strip()
        if _SNAPSHOT.fullmatch(name) is None:
            raise StoreError(f"{current}: does not name a snapshot: {name[:80]!r}")
        snapshot = directory / name
        cards = self._read_manifest(snapshot / _MANIFEST)
        loaded = 0
        for card_id, size, digest in cards:
            try:
                data = _decode_card_file((snapshot / f"{card_id}{_CARD_SUFFIX}").read_bytes(), digest)
                if len(data) != size:
                    raise _CorruptCardFile("size differs from the manifest")
            except (OSError, _CorruptCardFile) as exc:
                log.warning("persisted card %s in %s dropped: %s", card_id, snapshot, exc)
                with self._lock:
                    self._corrupt += 1
                continue
            try:
                self.put(card_id, data)
            except StoreFull as exc:
                log.warning("persisted card %s not loaded: %s", card_id, exc)
                continue
            loaded += 1
        log.info("loaded %d of %d persisted cards from %s", loaded, len(cards), snapshot)
        return loaded

    def close(self) -> None:
        """Drop every card and delete the spill files. Idempotent; later calls raise :class:`ClosedError`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._mem.clear()
            self._bytes = self._pinned_bytes = 0
            if self._spill_dir is not None:
                self._remove_spill_files()
            self._spill.clear()
            self._spill_bytes = 0

    def __enter__(self) -> CardStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals (lock held)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("card store is closed")

    def _read_budget(self) -> None:
        reading = self._probe.read()
        self._last_probe = self._clock()
        headroom = reading.available + self._bytes - self._config.reserve_bytes
        budget = max(0, min(self._config.cap_bytes, headroom))
        if budget != self._budget:
            log.debug("budget %d -> %d bytes (available %d)", self._budget, budget, reading.available)
        self._budget = budget

    def _insert(self, card_id: str, data: bytes, pins: int) -> None:
        self._mem[card_id] = _Entry(data, pins)
        self._bytes += len(data)
        if pins:
            self._pinned_bytes += len(data)

    def _remove_from_memory(self, card_id: str) -> bytes:
        entry = self._mem.pop(card_id)
        self._bytes -= len(entry.data)
        if entry.pins:
            self._pinned_bytes -= len(entry.data)
        return entry.data

    def _shed_to(self, limit: int, *, max_cards: int | None = None) -> tuple[str, ...]:
        """Evict least-recently-used unpinned cards until at most ``limit`` bytes (and ``max_cards`` cards)
        are held, or only pinned cards are left."""
        shed: list[str] = []
        cards = self._config.max_cards if max_cards is None else max_cards
        while self._bytes > limit or len(self._mem) > cards:
            victim = next((cid for cid, entry in self._mem.items() if entry.pins == 0), None)
            if victim is None:
                break
            data = self._remove_from_memory(victim)
            self._evictions += 1
            shed.append(victim)
            self._spill_out(victim, data)
        if shed:
            log.debug("shed %d cards to fit %d bytes", len(shed), limit)
        return tuple(shed)

    def _fetch(self, card_id: str, *, must_reside: bool) -> bytes:
        entry = self._mem.get(card_id)
        if entry is not None:
            self._mem.move_to_end(card_id)
            return entry.data
        if card_id not in self._spill:
            self._misses += 1
            raise CardNotFound(card_id)
        data = self._read_spill(card_id)
        if data is None:
            self._misses += 1
            raise CardNotFound(card_id)
        self._spill_loads += 1
        if self._pinned_bytes + len(data) <= self._budget:
            self._remove_spill_file(card_id)
            self._shed_to(self._budget - len(data), max_cards=self._config.max_cards - 1)
            self._insert(card_id, data, 0)
        elif must_reside:
            raise StoreFull(f"spilled card {card_id} ({len(data)} bytes) cannot come back into memory")
        return data

    # ------------------------------------------------------------------ spill (lock held)

    def _spill_path(self, card_id: str) -> Path:
        assert self._spill_dir is not None
        return self._spill_dir / f"{card_id}{_CARD_SUFFIX}"

    def _spill_out(self, card_id: str, data: bytes) -> None:
        if self._spill_dir is None or len(data) > self._config.spill_cap_bytes:
            self._dropped += 1
            return
        while self._spill_bytes + len(data) > self._config.spill_cap_bytes or (
            len(self._spill) >= self._config.max_cards
        ):
            oldest = next(iter(self._spill))
            self._remove_spill_file(oldest)
            self._dropped += 1
        header, _ = _encode_card_file(data)
        try:
            _write_atomically(self._spill_path(card_id), (header, data), durable=False)
        except OSError as exc:
            log.warning("could not spill card %s: %s", card_id, exc)
            self._spill_failures += 1
            self._dropped += 1
            return
        self._spill[card_id] = len(data)
        self._spill_bytes += len(data)
        self._spills += 1

    def _read_spill(self, card_id: str) -> bytes | None:
        """The verified payload of a spilled card, or ``None`` after dropping a corrupt or missing file."""
        try:
            data = _decode_card_file(self._spill_path(card_id).read_bytes())
            if len(data) != self._spill[card_id]:
                raise _CorruptCardFile("size differs from what was spilled")
        except (OSError, _CorruptCardFile) as exc:
            log.warning("spilled card %s dropped: %s", card_id, exc)
            self._remove_spill_file(card_id)
            self._corrupt += 1
            self._dropped += 1
            return None
        self._spill.move_to_end(card_id)
        return data

    def _remove_spill_file(self, card_id: str) -> None:
        self._spill_bytes -= self._spill.pop(card_id)
        with contextlib.suppress(FileNotFoundError):
            self._spill_path(card_id).unlink()

    def _remove_spill_files(self) -> None:
        """Delete this store's files (cards and temporaries) from the spill directory; nothing else."""
        assert self._spill_dir is not None
        for path in self._spill_dir.iterdir():
            name = path.name
            ours = (name.endswith(_CARD_SUFFIX) and _CARD_ID.fullmatch(name[: -len(_CARD_SUFFIX)])) or (
                name.startswith(".") and name.endswith(".tmp")
            )
            if ours and path.is_file():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # ------------------------------------------------------------------ persistence helpers

    @staticmethod
    def _read_manifest(path: Path) -> list[tuple[str, int, str]]:
        try:
            document = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: unreadable manifest: {exc}") from exc
        if not isinstance(document, dict) or document.get("version") != _MANIFEST_VERSION:
            raise StoreError(f"{path}: not a version {_MANIFEST_VERSION} manifest")
        cards = document.get("cards")
        if not isinstance(cards, list):
            raise StoreError(f"{path}: 'cards' must be a list")
        out: list[tuple[str, int, str]] = []
        for index, item in enumerate(cards):
            if not isinstance(item, dict):
                raise StoreError(f"{path}: cards[{index}] must be an object")
            card_id, size, digest = item.get("id"), item.get("size"), item.get("sha256")
            if not isinstance(card_id, str) or _CARD_ID.fullmatch(card_id) is None:
                raise StoreError(f"{path}: cards[{index}].id is not a valid card id")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise StoreError(f"{path}: cards[{index}].size must be a non-negative int")
            if not isinstance(digest, str) or re.fullmatch(r"[0-9a-f]{64}", digest) is None:
                raise StoreError(f"{path}: cards[{index}].sha256 must be 64 hex digits")
            out.append((card_id, size, digest))
        return out
