"""Memory readings behind one seam.

Everything in :mod:`edgebus` that reacts to memory pressure reads it through a :class:`MemoryProbe`, so tests
can play scripted pressure scenarios while production code reads the real numbers:

* :class:`PsutilMemoryProbe` reads ``psutil`` and, when the process runs under a cgroup memory limit
  (systemd ``MemoryMax=``/``MemoryHigh=``, a container), the tighter of the host and the cgroup figures.
  psutil reports host memory only, so a node capped at 2 GiB on a 16 GiB host would otherwise believe it
  has 14 GiB to spare.
* :class:`ScriptedMemoryProbe` returns readings a test wrote down in advance. It doubles the *input* of the
  code under test, never the code itself.

All figures are bytes. ``available`` is what the process could still allocate without swapping or hitting
its cgroup limit (reclaimable page cache counts as available, as in ``MemAvailable``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

# cgroup v1 reports "no limit" as a page-rounded LONG_MAX; anything this large is treated as unlimited.
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryReading:
    """One reading, in bytes."""

    available: int
    total: int
    process_rss: int

    def __post_init__(self) -> None:
        for name in ("available", "total", "process_rss"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"MemoryReading.{name} must be a non-negative int, got {value!r}")


class MemoryProbe(Protocol):
    """Source of memory readings. Implementations must be safe to call from any thread."""

    def read(self) -> MemoryReading: ...


@dataclass(frozen=True, slots=True)
class CgroupMemoryFiles:
    """The memory files of one cgroup directory (found by :func:`discover_cgroup_levels`)."""

    limit: Path
    usage: Path
    stat: Path
    inactive_key: str
    v1: bool
    # v2 ``memory.high``: above it the kernel throttles and reclaims hard, so it is the limit that matters
    # in practice (systemd ``MemoryHigh=``).
    throttle: Path | None = None


def _read_int(path: Path) -> int | None:
    """The integer in a cgroup file, ``None`` for ``max`` (v2 unlimited) or an unreadable file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_stat_value(path: Path, key: str) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _ancestors(start: Path, mount: Path) -> list[Path]:
    """``start`` and its parents up to and including ``mount``; limits on a parent slice bind us too."""
    chain = []
    current = start
    while True:
        chain.append(current)
        if current == mount or mount not in current.parents:
            break
        current = current.parent
    return chain


def discover_cgroup_levels(
    *, proc_cgroup: Path = Path("/proc/self/cgroup"), mount: Path = Path("/sys/fs/cgroup")
) -> tuple[CgroupMemoryFiles, ...]:
    """Find the cgroup directories (own and ancestors) whose memory limits apply to this process.

    Handles the unified hierarchy (v2: the lower of ``memory.max`` and ``memory.high``) and the legacy memory
    controller (v1: ``memory.limit_in_bytes``). Returns an empty tuple where neither can be read: the host
    figures are then the only limit, which is the correct answer outside any cgroup limit.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return ()
    levels: list[CgroupMemoryFiles] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "" and (mount / "cgroup.controllers").exists():
            root, v1 = mount, False
        elif "memory" in controllers.split(","):
            root, v1 = mount / "memory", True
        else:
            continue
        own = root / rel.lstrip("/")
        # Inside a cgroup namespace or a container the path printed may not exist under our mount; the
        # mount root is then our own cgroup.
        start = own if own.is_dir() else root
        for directory in _ancestors(start, root):
            if v1:
                level = CgroupMemoryFiles(
                    directory / "memory.limit_in_bytes",
                    directory / "memory.usage_in_bytes",
                    directory / "memory.stat",
                    "total_inactive_file",
                    True,
                )
            else:
                level = CgroupMemoryFiles(
                    directory / "memory.max",
                    directory / "memory.current",
                    directory / "memory.stat",
                    "inactive_file",
                    False,
                    directory / "memory.high",
                )
            if level.limit.exists():
                levels.append(level)
    return tuple(levels)


def _cgroup_headroom(levels: Iterable[CgroupMemoryFiles]) -> tuple[int, int] | None:
    """``(limit, available)`` of the tightest limited level, or ``None`` when none is limited."""
    best: tuple[int, int] | None = None
    for level in levels:
        limit = _read_int(level.limit)
        if limit is not None and level.v1 and limit >= _V1_UNLIMITED:
            limit = None
        throttle = _read_int(level.throttle) if level.throttle is not None else None
        if throttle is not None:
            limit = throttle if limit is None else min(limit, throttle)
        if limit is None:
            continue
        usage = _read_int(level.usage)
        if usage is None:
            continue
        # Inactive file pages are charged to the cgroup but reclaimed before the limit bites.
        reclaimable = _read_stat_value(level.stat, level.inactive_key)
        available = max(0, limit - usage + reclaimable)
        if best is None or available < best[1]:
            best = (limit, available)
    return best


class PsutilMemoryProbe:
    """Real readings: host memory from psutil, tightened by any cgroup memory limit on this process.

    The cgroup directories are located once, at construction; each :meth:`read` costs a few small file
    reads (about 50 us), so callers that read often should rate-limit (the card store does).
    """

    def __init__(
        self,
        *,
        cgroup_levels: tuple[CgroupMemoryFiles, ...] | None = None,
        process: psutil.Process | None = None,
    ) -> None:
        self._levels = discover_cgroup_levels() if cgroup_levels is None else cgroup_levels
        self._process = process if process is not None else psutil.Process(os.getpid())

    def read(self) -> MemoryReading:
        host = psutil.virtual_memory()
        available, total = int(host.available), int(host.total)
        limited = _cgroup_headroom(self._levels)
        if limited is not None:
            total = min(total, limited[0])
            available = min(available, limited[1])
        rss = int(self._process.memory_info().rss)
        return MemoryReading(available=available, total=total, process_rss=rss)


class ScriptedMemoryProbe:
    """Test input: returns the scripted readings in order, then repeats the last one.

    ``reads`` counts calls, so a test can check that a caller rate-limits its reads.
    """

    def __init__(self, readings: Iterable[MemoryReading]) -> None:
        self._pending = list(readings)
        if not self._pending:
            raise ValueError("ScriptedMemoryProbe needs at least one reading")
        self._last = self._pending[0]
        self._lock = threading.Lock()
        self.reads = 0

    def extend(self, readings: Iterable[MemoryReading]) -> None:
        """Queue more readings after the ones not yet returned."""
        with self._lock:
            self._pending.extend(readings)

    def read(self) -> MemoryReading:
        with self._lock:
            self.reads += 1
            if self._pending:
                self._last = self._pending.pop(0)
            return self._last
