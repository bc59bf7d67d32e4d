"""The receiver's spool directory: verified chunks and delivered card ids survive a process restart.

Layout under ``spool_dir``::

    delivered.log              one line per delivered card: "<card_id> <transfer digest hex>"
    <card_id>-<d16>.part       chunk bytes at their offsets (sparse until complete); d16 = digest prefix
    <card_id>-<d16>.log        36-byte records: chunk index (u32 big-endian) + the chunk's digest

A chunk is hashed, then written to ``.part``, then recorded in ``.log``; on reopening, every recorded chunk
is hashed again from ``.part`` and kept only if it still matches, so a torn write costs a re-fetch, never a
corrupt card. Files are not fsynced: the contract covers a killed process (the page cache survives), not
a power cut. ``delivered.log`` is appended before the card is handed to the application, so a crash in
between loses that delivery rather than repeating it (at most once across a crash, exactly once otherwise).
It remembers the newest :data:`DELIVERED_KEPT` ids: once it holds twice that many it is rewritten (a
temporary file, then an atomic rename) with the newest half, so a node that runs for months keeps a bounded
log and set. A card delivered more than that many deliveries ago and announced again is fetched again:
senders withdraw or evict their cards long before that.

A :class:`PartialCard` is used as: :meth:`PartialCard.open` (once: opens both files, returns the chunks
already verified), :meth:`PartialCard.write_verified` per chunk, :meth:`PartialCard.close` (idempotent),
then :meth:`PartialCard.map_card` (the delivered card) and :meth:`PartialCard.remove`.
Writes of different chunks may run concurrently in worker threads: they share the two descriptors,
``pwrite`` at disjoint offsets and 36-byte ``O_APPEND`` records, neither of which needs a lock.

Delivery reads nothing back: the card handed to the application is a read-only ``mmap`` of ``.part``, the
same page-cache pages the chunk writes filled. ``.part`` (created 0600) is unlinked right after mapping,
so no name leads to the mapped file any more and nothing can truncate it under the mapping.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import mmap
import os
import struct
from pathlib import Path
from typing import Final

from ._digest import digest as chunk_digest
from ._errors import StoreError
from ._transfer import CardManifest

log = logging.getLogger("edgebus.spool")

#: Delivered card ids remembered (and kept in delivered.log after a compaction): ~80 bytes each.
DELIVERED_KEPT: Final = 65536

_RECORD = struct.Struct(">I32s")
assert _RECORD.size == 36
#: Fault every page of a delivered card's mapping in at once (Linux); elsewhere pages map on first touch.
_MAP_POPULATE: Final = getattr(mmap, "MAP_POPULATE", 0)


class PartialCard:
    """One card being received into the spool."""

    def __init__(self, directory: Path, manifest: CardManifest) -> None:
        stem = f"{manifest.card_id}-{manifest.digest.hex()[:16]}"
        self.manifest = manifest
        self.part_path = directory / f"{stem}.part"
        self.log_path = directory / f"{stem}.log"
        self._part_fd: int | None = None
        self._log_fd: int | None = None

    def open(self) -> dict[int, bytes]:
        """Open both files for writing; returns the chunks already spooled and still valid (blocking).

        Opening once per transfer, not once per chunk, keeps four system calls off every chunk.
        """
        try:
            verified = self.load_verified()
        except OSError as exc:
            raise StoreError(f"spool {self.part_path.parent}: {exc}") from exc
        if self._part_fd is None:
            try:
                self._part_fd = os.open(self.part_path, os.O_WRONLY | os.O_CREAT, 0o600)
                self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            except OSError as exc:
                self.close()
                raise StoreError(f"spool {self.part_path.parent}: {exc}") from exc
        return verified

    def close(self) -> None:
        """Close the descriptors opened by :meth:`open` (idempotent; in-flight writes must be done)."""
        fds, self._part_fd, self._log_fd = (self._part_fd, self._log_fd), None, None
        for fd in fds:
            if fd is not None:
                os.close(fd)

    def load_verified(self) -> dict[int, bytes]:
        """Chunks already spooled and still matching their recorded digest (blocking: run in a thread)."""
        try:
            raw = self.log_path.read_bytes()
        except FileNotFoundError:
            return {}
        records: dict[int, bytes] = {}
        for off in range(0, len(raw) - len(raw) % _RECORD.size, _RECORD.size):
            index, digest = _RECORD.unpack_from(raw, off)
            if index < self.manifest.n_chunks:
                records[index] = digest
        if not records:
            return {}
        good: dict[int, bytes] = {}
        try:
            fd = os.open(self.part_path, os.O_RDONLY)
        except FileNotFoundError:
            return {}
        try:
            for index, digest in records.items():
                length = self.manifest.chunk_len(index)
                data = os.pread(fd, length, index * self.manifest.chunk_bytes)
                if len(data) == length and hmac.compare_digest(chunk_digest(data), digest):
                    good[index] = digest
        finally:
            os.close(fd)
        return good

    def write_verified(self, index: int, data: memoryview, digest: bytes) -> bool:
        """Hash ``data``; if it matches ``digest`` spool it and record it (after :meth:`open`).

        Blocking, and both the hash and ``os.pwrite`` release the GIL: run it in a worker thread so
        one chunk is hashed and written while the event loop receives the next.
        """
        part_fd, log_fd = self._part_fd, self._log_fd
        if part_fd is None or log_fd is None:
            raise StoreError(f"spool file {self.part_path.name} is not open")
        if len(data) != self.manifest.chunk_len(index):
            return False
        if not hmac.compare_digest(chunk_digest(data), digest):
            return False
        offset = index * self.manifest.chunk_bytes
        written = 0
        while written < len(data):  # a regular file takes it all at once; loop anyway, as write(2) allows
            written += os.pwrite(part_fd, data[written:], offset + written)
        os.write(log_fd, _RECORD.pack(index, digest))
        return True

    def map_card(self) -> memoryview:
        """The complete card as a read-only view of the spool file's pages (blocking: run in a thread).

        Nothing is read back or copied: the view maps the page-cache pages the chunk writes filled, with
        ``MAP_POPULATE`` so the mapping is complete when this returns. It stays valid after :meth:`remove`
        (an unlinked file lives on while mapped) and is unmapped when the last reference to it goes.
        """
        size = self.manifest.size
        if size == 0:
            return memoryview(b"")
        try:
            fd = os.open(self.part_path, os.O_RDONLY)
        except OSError as exc:
            raise StoreError(f"spooled card {self.manifest.card_id}: {exc}") from exc
        try:
            on_disk = os.fstat(fd).st_size
            if on_disk != size:
                raise StoreError(f"spooled card {self.manifest.card_id} has {on_disk} bytes, not {size}")
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ)
        except OSError as exc:
            raise StoreError(f"spooled card {self.manifest.card_id}: {exc}") from exc
        finally:
            os.close(fd)
        return memoryview(mapping)

    def remove(self) -> None:
        self.close()
        for path in (self.part_path, self.log_path):
            path.unlink(missing_ok=True)


class Spool:
    """Spool directory of one receiving node."""

    def __init__(self, directory: Path, *, kept: int = DELIVERED_KEPT) -> None:
        if kept < 1:
            raise ValueError("kept must be >= 1")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"spool {directory}: {exc}") from exc
        self.directory = directory
        self._delivered_path = directory / "delivered.log"
        self._kept = kept
        # id -> its log line, oldest first (dicts keep insertion order): what a compaction rewrites.
        self._delivered: dict[str, str] = {}
        try:
            text = self._delivered_path.read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            parts = line.split()
            # A torn or corrupted line (a killed write, a bad sector) is skipped, not fatal: it costs at most
            # one repeated delivery.
            if len(parts) == 2 and line.isascii() and _is_digest_hex(parts[1]):
                self._delivered.pop(parts[0], None)
                self._delivered[parts[0]] = " ".join(parts)
        if len(self._delivered) > kept:
            self._compact()

    def is_delivered(self, card_id: str) -> bool:
        return card_id in self._delivered

    @property
    def delivered_count(self) -> int:
        """Delivered ids remembered now (at most twice ``kept``)."""
        return len(self._delivered)

    def mark_delivered(self, manifest: CardManifest) -> None:
        """Append to ``delivered.log`` (small, unbuffered write: safe against a killed process)."""
        line = f"{manifest.card_id} {manifest.digest.hex()}"
        try:
            fd = os.open(self._delivered_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, (line + "\n").encode("ascii"))
            finally:
                os.close(fd)
        except OSError as exc:
            raise StoreError(f"spool {self._delivered_path}: {exc}") from exc
        self._delivered[manifest.card_id] = line
        if len(self._delivered) >= 2 * self._kept:
            self._compact()

    def _compact(self) -> None:
        """Keep the newest ``kept`` ids, in memory and in the log (rewritten whole, then renamed over).

        Best effort: if the rewrite fails (disk full), the old log is intact, only longer than it needs to
        be, and the delivery that triggered the compaction goes on; the next one tries again.
        """
        newest = list(self._delivered.items())[-self._kept :]
        tmp = self._delivered_path.with_suffix(".log.tmp")
        try:
            # Buffered: a short write raises instead of renaming a truncated log over the whole one.
            with open(tmp, "wb") as handle:
                handle.write("".join(line + "\n" for _, line in newest).encode("ascii"))
            os.replace(tmp, self._delivered_path)
        except (OSError, UnicodeError) as exc:
            log.warning("spool %s: compacting delivered.log failed (%s); kept as it is", self.directory, exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return
        self._delivered = dict(newest)

    def partial(self, manifest: CardManifest) -> PartialCard:
        return PartialCard(self.directory, manifest)


def _is_digest_hex(text: str) -> bool:
    """A transfer digest as delivered.log writes it: 64 lowercase hex digits."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)
