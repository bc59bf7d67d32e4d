"""Announcement catalog (Clone pattern): snapshots, sequenced updates, gaps, epochs, late joiners."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgebus import Announcement, Bus, BusConfig, FrameError, PeerAddress
from edgebus._announce import MAX_CATALOG_CARDS, Change, PeerCatalog
from edgebus._transfer import MAX_CHUNKS


def ann(card_id: str, topic: str = "kv/x") -> Announcement:
    return Announcement(card_id, 10, topic, "pub", chunk_bytes=4, digest=bytes(32))


def test_updates_wait_for_a_snapshot_then_apply_in_order() -> None:
    cat = PeerCatalog()
    assert cat.on_update(1, Change(3, added=ann("c"))) == ([], True)
    fresh, again = cat.on_snapshot(1, 2, [ann("a"), ann("b")])
    assert [a.card_id for a in fresh] == ["a", "b", "c"]
    assert not again
    assert cat.on_update(1, Change(3, added=ann("c"))) == ([], False)  # duplicate ignored
    assert cat.on_update(1, Change(4, withdrawn="a")) == ([], False)
    assert set(cat.cards) == {"b", "c"}


def test_gap_epoch_change_and_position_force_a_resync() -> None:
    cat = PeerCatalog()
    cat.on_snapshot(1, 5, [])
    assert cat.on_update(1, Change(7, added=ann("x"))) == ([], True)  # 6 is missing
    assert not cat.synced
    fresh, again = cat.on_snapshot(1, 7, [ann("x")])
    assert [a.card_id for a in fresh] == ["x"]
    assert not again
    assert not cat.on_position(1, 7)
    assert cat.on_position(1, 8)  # the publisher is ahead: we missed something
    cat.on_snapshot(1, 8, [ann("x")])
    assert cat.on_position(2, 0)  # publisher restarted


def test_pending_update_after_snapshot_with_a_hole_asks_again() -> None:
    cat = PeerCatalog()
    cat.on_update(1, Change(9, added=ann("z")))
    fresh, again = cat.on_snapshot(1, 5, [])
    assert again
    assert fresh == []


def test_a_change_far_ahead_of_every_snapshot_costs_one_more_snapshot_not_a_loop() -> None:
    cat = PeerCatalog()
    cat.on_update(1, Change(10**9, added=ann("z")))  # a peer announcing far ahead of its own snapshots
    assert cat.on_snapshot(1, 5, []) == ([], True)
    assert cat.on_snapshot(1, 5, []) == ([], False)
    assert cat.synced


def test_a_snapshot_listing_a_card_twice_offers_it_once() -> None:
    fresh, _ = PeerCatalog().on_snapshot(1, 1, [ann("a"), ann("a", "kv/y")])
    assert [(a.card_id, a.topic) for a in fresh] == [("a", "kv/y")]


def test_the_catalog_of_one_publisher_is_bounded() -> None:
    cat = PeerCatalog()
    cat.on_snapshot(1, 0, [ann(f"s{i}") for i in range(MAX_CATALOG_CARDS + 5)])
    assert len(cat.cards) == MAX_CATALOG_CARDS
    for seq in range(1, 11):
        cat.on_update(1, Change(seq, added=ann(f"u{seq}")))
    assert len(cat.cards) == MAX_CATALOG_CARDS
    assert "u10" in cat.cards
    assert "s5" not in cat.cards  # the oldest went first


def test_announcements_of_too_many_chunks_are_refused() -> None:
    wire = {"id": "c", "size": 1 << 20, "chunk": 1, "topic": "kv/x", "digest": bytes(32), "meta": {}}
    with pytest.raises(FrameError, match="chunks"):
        Announcement.from_wire("pub", wire, max_chunk_bytes=1 << 22, max_card_bytes=1 << 30)
    ok = Announcement.from_wire(
        "pub", {**wire, "chunk": 4096}, max_chunk_bytes=1 << 22, max_card_bytes=1 << 30
    )
    assert ok.manifest.n_chunks == 256
    assert MAX_CHUNKS >= (1 << 30) // 4096


async def test_late_joiner_and_dropped_announcement_recovery(tmp_path: Path) -> None:
    cfg = BusConfig(
        node_id="pub", spool_dir=tmp_path / "p", insecure=True, heartbeat_s=0.05, peer_timeout_s=1
    )
    async with Bus(cfg) as pub:
        early = await pub.publish_card("kv/early", os.urandom(1000))
        await pub.publish_card("other/x", os.urandom(1000))
        sub_cfg = BusConfig(
            node_id="sub", spool_dir=tmp_path / "s", insecure=True, bind=None, heartbeat_s=0.05,
            peer_timeout_s=1, connect=(PeerAddress(endpoint=pub.endpoints.control),),
        )  # fmt: skip
        async with Bus(sub_cfg) as sub:
            stream = sub.announcements("kv/")
            got = await anext(stream)
            assert got.card_id == early
            assert got.sender == "pub"
            # Simulate a dropped announcement: bump the sequence without sending anything.
            pub._ann_seq += 1
            late = await pub.publish_card("kv/late", os.urandom(1000))
            assert (await anext(stream)).card_id == late
            assert sub.stats().announcement_gaps >= 1
            assert {a.card_id for a in sub.known_cards() if a.topic.startswith("kv/")} == {early, late}
            await stream.aclose()
