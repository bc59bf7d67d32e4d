"""nodes.heap: a node keeps the memory its model thread frees, so the next answer does not fault it back in.

The churn test runs in fresh interpreters (mallopt settings are process-wide and the arena setting only
governs threads started afterwards): a worker thread, like the agent's model thread, allocates and touches
blocks of the size of one layer's KV at 4K tokens, frees them all, and does it again; the page faults of
each round are counted with ``RUSAGE_THREAD``. With ``prefault_heap`` first, even the first round finds its
memory resident.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from nodes.heap import HeapSettings, retain_heap

BLOCK_MIB = 3  # one layer's fp32 K or V of SmolLM2-135M at 4096 tokens
BLOCKS = 40
PAGES_PER_ROUND = BLOCKS * BLOCK_MIB * 256

_CHURN = textwrap.dedent(
    """
    import ctypes, json, resource, sys, threading
    from nodes.heap import prefault_heap, retain_heap

    settings = retain_heap(int(sys.argv[1]))
    touched = prefault_heap(settings) if sys.argv[4] == "prefault" else 0
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    block, blocks = int(sys.argv[2]) << 20, int(sys.argv[3])
    faults = []

    def rounds():
        for _ in range(4):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            held = [libc.malloc(block) for _ in range(blocks)]
            for pointer in held:
                ctypes.memset(pointer, 1, block)
            for pointer in held:
                libc.free(pointer)
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

    worker = threading.Thread(target=rounds)
    worker.start()
    worker.join()
    print(json.dumps({"applied": settings.applied, "faults": faults, "touched": touched}))
    """
)


def _churn(retain_mib: int, *, prefault: bool = False) -> dict[str, object]:
    mode = "prefault" if prefault else "lazy"
    out = subprocess.run(
        [sys.executable, "-c", _CHURN, str(retain_mib), str(BLOCK_MIB), str(BLOCKS), mode],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and RUSAGE_THREAD")
def test_retained_heap_serves_the_next_round_without_page_faults() -> None:
    tuned = _churn(256)
    assert tuned["applied"] is True
    faults = tuned["faults"]
    assert isinstance(faults, list)
    # The first round maps fresh memory; the repeats reuse what the first freed.
    assert faults[0] >= PAGES_PER_ROUND // 2, faults
    assert max(faults[1:]) <= PAGES_PER_ROUND // 20, faults
    # glibc's defaults: the worker's arena unmaps its emptied heaps, and every round faults again (about
    # half of the pages once the dynamic mmap threshold has moved, here).
    untuned = _churn(0)
    assert untuned["applied"] is False
    assert min(untuned["faults"][1:]) >= PAGES_PER_ROUND // 4, untuned  # type: ignore[index]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and RUSAGE_THREAD")
def test_prefaulted_heap_serves_even_the_first_round_without_page_faults() -> None:
    warm = _churn(256, prefault=True)
    assert warm["touched"] == 256 << 20
    faults = warm["faults"]
    assert isinstance(faults, list)
    assert max(faults) <= PAGES_PER_ROUND // 20, faults
    # Nothing to make resident when the heap is not retained (glibc would trim it straight back).
    assert _churn(0, prefault=True)["touched"] == 0


def test_zero_leaves_the_defaults_and_negative_is_refused() -> None:
    assert retain_heap(0) == HeapSettings(applied=False, reason="heap_retain_mib = 0")
    with pytest.raises(ValueError, match=">= 0"):
        retain_heap(-1)


def test_settings_report_what_was_applied() -> None:
    settings = HeapSettings(applied=True, retain_bytes=512 << 20)
    assert settings.as_dict() == {
        "applied": True,
        "retain_mib": 512,
        "mmap_threshold_mib": 32,
        "arenas": 1,
        "reason": "",
    }
