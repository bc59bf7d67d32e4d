"""Subprocesses for the bus flood test: cards cross a real ZeroMQ bus into a node's budgeted CardStore.

    PYTHONPATH=. python tests/edgebus/bus_flood_main.py send --spool DIR [--cards 1000 --seed 0]
    PYTHONPATH=. python tests/edgebus/bus_flood_main.py receive --spool DIR --connect ENDPOINT \
        [--cards 1000 --budget-mib 256]

``send`` binds a :class:`~edgebus.Bus` on 127.0.0.1 (insecure mode) and prints ``{"control": endpoint}``;
once the receiver is connected it publishes ``--cards`` cards of seeded random sizes (``--min-mib`` to
``--max-mib``), each fresh ``os.urandom`` bytes, as ``card-NNNNN`` with ``meta={"index": N}``. It never holds
more than ``--window`` cards: it publishes the next one only when fewer than ``--window`` published cards
are unacknowledged (the receiver ACKs each card once delivered), and its ``held_cards_bytes`` is exactly
``--window`` cards of the largest size, so the bus's own holder evicts acknowledged cards to make room (and
would withdraw an unpulled one, failing the receiver's pull, if the pacing were wrong). When stdin closes it
prints its report: ``baseline_rss`` (after Bus start), ``vm_hwm``, ``published``, ``acks``.

``receive`` connects to the sender and pulls every announced card with :meth:`~edgebus.Bus.fetch_card`,
copies the delivered spool view into owned bytes (as ``nodes.agent`` does), releases the view, and puts the
copy into a :class:`~edgebus.CardStore` with ``cap_bytes=--budget-mib`` and ``reserve_bytes=0`` reading real
memory (:class:`~edgebus.PsutilMemoryProbe`). Every ``--pin-every``-th card (by index) is put pinned and held
to the end; after each put it counts pinned cards missing from the store, at the end it checks their bytes
by sha256. It prints one JSON object: ``baseline_rss`` (after imports, Bus start, store construction and
catalog sync, before any card), ``peak_rss_sampled`` (after each put), ``vm_hwm`` (the kernel's RSS
high-water mark for the whole run), ``budget``, ``received``, ``bytes_received``, ``pinned_lost``,
``spool_files_max`` (files in the spool directory, sampled after each card), ``spool_files_end``,
``elapsed_s``, ``stats`` (the store's) and ``bus`` (the bus's counters).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Final

import psutil

from edgebus import Bus, BusConfig, CardStore, CardStoreConfig, PeerAddress, PsutilMemoryProbe
from tests.edgebus.peer_main import emit
from tests.edgebus.store_flood_main import MIB, add_flood_arguments, random_sizes, vm_hwm_bytes

SENDER: Final = "flood-sender"
RECEIVER: Final = "flood-receiver"
TOPIC: Final = "flood/"
#: The sender learns of deliveries only through its ACK counter; it re-reads it this often while paced.
ACK_POLL_S: Final = 0.002
#: Heartbeats often enough to connect fast, a peer timeout long enough for a loaded 2-core box.
HEARTBEAT_S: Final = 0.2
PEER_TIMEOUT_S: Final = 5.0
#: Waits for the other process to appear (interpreter start and imports under load).
PEER_WAIT_S: Final = 120.0


async def send(args: argparse.Namespace) -> None:
    config = BusConfig(
        node_id=SENDER,
        spool_dir=args.spool,
        insecure=True,
        held_cards_bytes=args.window * args.max_mib * MIB,
        heartbeat_s=HEARTBEAT_S,
        peer_timeout_s=PEER_TIMEOUT_S,
    )
    process = psutil.Process()
    async with Bus(config) as bus:
        emit(control=bus.endpoints.control)
        await bus.wait_for_peer(RECEIVER, synced=False, timeout=PEER_WAIT_S)
        baseline = process.memory_info().rss
        sizes = random_sizes(args.cards, args.min_mib * MIB, args.max_mib * MIB, args.seed)
        for index, size in enumerate(sizes):
            # The bus exposes ACKs only as a counter, so there is no event to wait on: poll it.
            while index - bus.stats().acks_received >= args.window:  # noqa: ASYNC110
                await asyncio.sleep(ACK_POLL_S)
            card = os.urandom(size)
            await bus.publish_card(TOPIC, card, card_id=f"card-{index:05d}", meta={"index": index})
            del card  # the bus's holder keeps the only reference until it evicts the card
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        stats = bus.stats()
        emit(
            baseline_rss=baseline,
            vm_hwm=vm_hwm_bytes(),
            published=stats.cards_published,
            acks=stats.acks_received,
            held_cards_bytes=config.held_cards_bytes,
            send_dropped=stats.send_dropped,
        )


async def receive(args: argparse.Namespace) -> dict[str, Any]:
    config = BusConfig(
        node_id=RECEIVER,
        spool_dir=args.spool,
        bind=None,
        insecure=True,
        connect=(PeerAddress(endpoint=args.connect),),
        heartbeat_s=HEARTBEAT_S,
        peer_timeout_s=PEER_TIMEOUT_S,
    )
    process = psutil.Process()
    budget = args.budget_mib * MIB
    async with Bus(config) as bus:
        store = CardStore(CardStoreConfig(cap_bytes=budget, reserve_bytes=0), probe=PsutilMemoryProbe())
        await bus.wait_for_peer(SENDER, timeout=PEER_WAIT_S)
        baseline = peak = process.memory_info().rss
        long_pinned: dict[str, str] = {}
        pinned_lost = received = bytes_received = spool_files_max = 0
        started = time.perf_counter()
        async with bus.announcements(TOPIC) as announcements:
            async for ann in announcements:
                view = await bus.fetch_card(ann)
                card = bytes(view)
                # Unmap the spool pages now: the store's copy is the one that stays.
                view.release()
                pin = ann.meta["index"] % args.pin_every == 0
                store.put(ann.card_id, card, pin=pin)
                if pin:
                    long_pinned[ann.card_id] = hashlib.sha256(card).hexdigest()
                del card
                pinned_lost += sum(1 for card_id in long_pinned if card_id not in store)
                peak = max(peak, process.memory_info().rss)
                spool_files_max = max(spool_files_max, len(os.listdir(args.spool)))
                received += 1
                bytes_received += ann.size
                if received == args.cards:
                    break
        elapsed = time.perf_counter() - started
        for card_id, digest in long_pinned.items():
            if card_id not in store or hashlib.sha256(store.get(card_id)).hexdigest() != digest:
                pinned_lost += 1
        bus_stats = bus.stats()
        report = {
            "baseline_rss": baseline,
            "peak_rss_sampled": peak,
            "vm_hwm": vm_hwm_bytes(),
            "final_rss": process.memory_info().rss,
            "budget": budget,
            "received": received,
            "bytes_received": bytes_received,
            "pinned_lost": pinned_lost,
            "long_pinned": len(long_pinned),
            "spool_files_max": spool_files_max,
            "spool_files_end": sorted(os.listdir(args.spool)),
            "elapsed_s": round(elapsed, 2),
            "stats": dataclasses.asdict(store.statistics()),
            "bus": {
                "cards_delivered": bus_stats.cards_delivered,
                "chunks_received": bus_stats.chunks_received,
                "send_dropped": bus_stats.send_dropped,
                "rejected": bus_stats.rejected_total,
            },
        }
        for card_id in long_pinned:
            store.unpin(card_id)
        store.close()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["send", "receive"])
    parser.add_argument("--spool", type=Path, required=True)
    parser.add_argument("--connect", default="")
    add_flood_arguments(parser)
    parser.add_argument("--window", type=int, default=4)
    args = parser.parse_args()
    if args.mode == "send":
        asyncio.run(send(args))
    else:
        emit(**asyncio.run(receive(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
