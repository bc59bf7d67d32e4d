"""Keep memory the model thread frees inside the process, so the next answer does not fault it back in.

Why: with glibc's defaults, model work in a worker thread (the agent's model thread) allocates from a
thread arena made of 64 MiB heaps that are unmapped as soon as they empty, and anything above the dynamic
mmap threshold is its own mapping. An answer from a 4K-token card builds a ~190 MB KV cache, frees it, and
the next answer maps and zero-fills it again: 46 000 page faults per answer, measured here. In one process
on this machine that cost 0.1 s; in a node, right after a card lands, the same faults ran ~10x slower
(``clear_page`` took 90% of the model thread), and answers from a card took 2-6x longer than the same
calls in one process. One arena (the main one), a fixed mmap threshold and a bounded trim threshold keep
the freed blocks for reuse: 0 faults per answer in steady state.

Steady state came only after the first long answer, though: a fresh node's first answer from a 4K-token
card still faulted ~90 000 pages, at ~20 us each right after a transfer on the Firecracker VMs here (memory
the guest had freed goes back to the host, which must supply it again), and took 1.3-1.4 s against
0.38-0.48 s for the next. :func:`prefault_heap` touches the retained size once at start and frees it into
the retained heap, so the first long answer finds its memory resident.

:func:`retain_heap` is called once, before the node starts any thread (``M_ARENA_MAX`` only governs arenas
made afterwards). It is glibc-only (``mallopt``); elsewhere it reports that it did nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass
from typing import Final

MIB: Final = 1 << 20
# mallopt parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD: Final = -1
M_TOP_PAD: Final = -2
M_MMAP_THRESHOLD: Final = -3
M_ARENA_MAX: Final = -8
#: glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit); blocks larger than this
#: (a long prefill's attention scratch) stay separate mappings and go back to the kernel when freed.
MAX_MMAP_THRESHOLD: Final = 32 * MIB
#: Below the mmap threshold, so the blocks come from (and go back to) the heap.
PREFAULT_BLOCK: Final = 16 * MIB


@dataclass(frozen=True, kw_only=True)
class HeapSettings:
    """What :func:`retain_heap` applied (``applied`` False: nothing, glibc defaults stand)."""

    applied: bool
    retain_bytes: int = 0
    reason: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "applied": self.applied,
            "retain_mib": self.retain_bytes // MIB,
            "mmap_threshold_mib": MAX_MMAP_THRESHOLD // MIB if self.applied else 0,
            "arenas": 1 if self.applied else 0,
            "reason": self.reason,
        }


def retain_heap(retain_mib: int) -> HeapSettings:
    """Keep up to ``retain_mib`` MiB of freed heap in the process (0: leave glibc's defaults alone)."""
    if retain_mib < 0:
        raise ValueError(f"retain_mib must be >= 0, got {retain_mib}")
    if retain_mib == 0:
        return HeapSettings(applied=False, reason="heap_retain_mib = 0")
    libc = _glibc()
    if libc is None:
        return HeapSettings(applied=False, reason="no glibc mallopt in this process")
    retain = retain_mib * MIB
    # Order matters: setting the mmap threshold turns off glibc's dynamic threshold, which would otherwise
    # also move the trim threshold. The trim threshold only says when to trim; the top pad is what a trim
    # leaves in place (without it, a trim returns everything above 128 KiB).
    for param, value in (
        (M_ARENA_MAX, 1),
        (M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, retain),
        (M_TOP_PAD, retain),
    ):
        if libc.mallopt(param, value) != 1:
            return HeapSettings(applied=False, reason=f"mallopt({param}, {value}) refused")
    return HeapSettings(applied=True, retain_bytes=retain)


def prefault_heap(settings: HeapSettings) -> int:
    """Make the heap ``settings`` retain resident now; returns the bytes touched (0 when not applied).

    Touches blocks below the mmap threshold and frees them: with the retained trim threshold and top pad
    they stay in the heap, and the next allocations are served from pages already faulted in.
    """
    if not settings.applied:
        return 0
    libc = _glibc()
    if libc is None:
        return 0
    held: list[int] = []
    try:
        for _ in range(settings.retain_bytes // PREFAULT_BLOCK):
            pointer = libc.malloc(PREFAULT_BLOCK)
            if not pointer:
                break
            held.append(pointer)
            # A write (not a read, which maps the shared zero page) makes the kernel supply each page.
            ctypes.memset(pointer, 0, PREFAULT_BLOCK)
    finally:
        for pointer in reversed(held):
            libc.free(pointer)
    return len(held) * PREFAULT_BLOCK


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library, if it is glibc (``mallopt``, ``malloc``, ``free`` typed); else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    try:
        libc.gnu_get_libc_version  # noqa: B018 - musl has a mallopt that ignores everything
    except AttributeError:
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.free.restype = None
    return libc
