"""Announcement catalog (Clone pattern): snapshots, sequenced updates, gaps, epochs, late joiners."""

from __future__ import annotations

import os
from pathlib import Path

from edgebus import Announcement, Bus, BusConfig, PeerAddress
from edgebus._announce import Change, PeerCatalog


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
