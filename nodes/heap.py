"""Keep memory the model thread frees inside the process, so the next answer does not fault it back in.

Why: with glibc's defaults, model work in a worker thread (the agent's model thread) allocates from a
thread arena made of 64 MiB heaps that are unmapped as soon as they empty, and anything above the dynamic
mmap threshold is its own mapping. An answer from a 4K-token card builds a ~190 MB KV cache, frees it, and
the next answer maps and zero-fills it again: 46 000 page faults per answer, measured here. In one process
on this machine that cost 0.1 s; in a node, right after a card lands, the same faults ran ~10x slower
(``clear_page`` took 90% of the model thread), and answers from a card took 2-6x longer than the same
calls in one process. One arena (the main one), a fixed mmap threshold and a bounded trim threshold keep
the freed blocks for reuse: 0 faults per answer in steady state.

:func:`retain_heap` is called once, before the node starts any thread (``M_ARENA_MAX`` only governs arenas
made afterwards). It is glibc-only (``mallopt``); elsewhere it reports that it did nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
    mallopt = _mallopt()
    if mallopt is None:
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
        if mallopt(param, value) != 1:
            return HeapSettings(applied=False, reason=f"mallopt({param}, {value}) refused")
    return HeapSettings(applied=True, retain_bytes=retain)


def _mallopt() -> ctypes._NamedFuncPointer | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    try:
        libc.gnu_get_libc_version  # noqa: B018 - musl has a mallopt that ignores everything
    except AttributeError:
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn
