"""Subprocess for the flood test: pour random cards into a real CardStore and report memory as JSON.

    PYTHONPATH=. python tests/edgebus/store_flood_main.py --cards 1000 --budget-mib 256 [--seed 0]

Each card is fresh random bytes (``os.urandom``), so no page is shared between cards. The store reads real
memory (:class:`PsutilMemoryProbe`) with ``reserve_bytes=0``, so on a machine with spare RAM its budget is the
cap. Every ``--pin-every``-th card is put pinned and held to the end; every card is also pinned "in flight"
for the next ``--in-flight`` puts. After each put the script checks that every pinned card is still in
memory; at the end it checks the long-pinned cards' bytes by sha256.

Output (one JSON object on stdout): ``baseline_rss`` (bytes, measured after imports and store construction,
before any card exists), ``peak_rss_sampled`` (max RSS read after each put), ``vm_hwm`` (the kernel's RSS
high-water mark for the whole run, so transients between samples count too), ``budget``, ``pinned_lost``,
``stats`` (the store's statistics), ``elapsed_s``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections import deque
from contextlib import ExitStack
from pathlib import Path

import psutil

from edgebus._cardstore import CardStore, CardStoreConfig
from edgebus._memory import PsutilMemoryProbe

MIB = 1 << 20


def vm_hwm_bytes() -> int:
    """The kernel's peak resident set size of this process (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def add_flood_arguments(parser: argparse.ArgumentParser) -> None:
    """The flood's shape, shared with the over-the-bus flood (bus_flood_main.py)."""
    parser.add_argument("--cards", type=int, default=1000)
    parser.add_argument("--budget-mib", type=int, default=256)
    parser.add_argument("--min-mib", type=int, default=1)
    parser.add_argument("--max-mib", type=int, default=4)
    parser.add_argument("--pin-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_flood_arguments(parser)
    parser.add_argument("--in-flight", type=int, default=3)
    args = parser.parse_args()

    process = psutil.Process()
    budget = args.budget_mib * MIB
    store = CardStore(CardStoreConfig(cap_bytes=budget, reserve_bytes=0), probe=PsutilMemoryProbe())
    # Sizes come from a seeded generator so runs are comparable; contents are fresh random bytes.
    sizes = random_sizes(args.cards, args.min_mib * MIB, args.max_mib * MIB, args.seed)
    baseline = process.memory_info().rss
    peak = baseline
    long_pinned: dict[str, str] = {}
    in_flight: deque[tuple[str, ExitStack]] = deque()
    pinned_lost = 0
    started = time.perf_counter()
    for index, size in enumerate(sizes):
        card_id = f"card-{index:05d}"
        card = os.urandom(size)
        if index % args.pin_every == 0:
            store.put(card_id, card, pin=True)
            long_pinned[card_id] = hashlib.sha256(card).hexdigest()
        else:
            store.put(card_id, card)
        stack = ExitStack()
        stack.enter_context(store.pinned(card_id))
        in_flight.append((card_id, stack))
        del card
        if len(in_flight) > args.in_flight:
            _, done = in_flight.popleft()
            done.close()
        pinned_now = list(long_pinned) + [cid for cid, _ in in_flight]
        pinned_lost += sum(1 for cid in pinned_now if cid not in store)
        peak = max(peak, process.memory_info().rss)
    elapsed = time.perf_counter() - started
    for card_id, digest in long_pinned.items():
        if card_id not in store or hashlib.sha256(store.get(card_id)).hexdigest() != digest:
            pinned_lost += 1
    report = {
        "baseline_rss": baseline,
        "peak_rss_sampled": peak,
        "vm_hwm": vm_hwm_bytes(),
        "final_rss": process.memory_info().rss,
        "budget": budget,
        "cards": args.cards,
        "bytes_offered": sum(sizes),
        "pinned_lost": pinned_lost,
        "long_pinned": len(long_pinned),
        "elapsed_s": round(elapsed, 2),
        "stats": dataclasses.asdict(store.statistics()),
    }
    for _, stack in in_flight:
        stack.close()
    for card_id in long_pinned:
        store.unpin(card_id)
    store.close()
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0


def random_sizes(count: int, low: int, high: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(count)]


if __name__ == "__main__":
    sys.exit(main())
