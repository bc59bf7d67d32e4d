"""Credit window, spool resume, digest checks, exactly-once delivery (in one process, real sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgebus import (
    AlreadyDelivered,
    Bus,
    BusConfig,
    ClosedError,
    DigestMismatch,
    FrameError,
    PeerAddress,
    StoreError,
)
from edgebus._spool import Spool
from edgebus._transfer import CardManifest, ChunkPuller, chunk_digests, list_digest, valid_card_id

CHUNK = 64 * 1024


def manifest_for(data: bytes, chunk: int = CHUNK, card_id: str = "card") -> CardManifest:
    return CardManifest(card_id, len(data), chunk, list_digest(chunk_digests(data, chunk)))


def test_puller_respects_credit_and_reissues_late_requests() -> None:
    m = CardManifest("c", 10 * 100 + 50, 100, b"\0" * 32)
    puller = ChunkPuller(m, verified={0, 1}, credit_bytes=300)
    assert puller.take_requests(0.0) == [2, 3, 4]
    assert puller.take_requests(0.0) == []
    puller.on_verified(2)
    assert puller.take_requests(1.0) == [5]
    puller.on_rejected(3)
    assert puller.take_requests(1.0) == [3]
    assert sorted(puller.expire(5.5, timeout=5.0)) == [4]
    assert puller.take_requests(5.5) == [4]
    for i in range(11):
        puller.on_verified(i)
    assert puller.done
    assert m.chunk_len(10) == 50


def test_first_chunk_is_requested_even_when_bigger_than_credit() -> None:
    puller = ChunkPuller(CardManifest("c", 1000, 1000, b"\0" * 32), verified=(), credit_bytes=10)
    assert puller.take_requests(0.0) == [0]


def test_spool_keeps_verified_chunks_and_drops_torn_ones(tmp_path: Path) -> None:
    data = os.urandom(5 * CHUNK + 10)
    m = manifest_for(data)
    digests = chunk_digests(data, CHUNK)
    partial = Spool(tmp_path).partial(m)
    assert partial.open() == {}
    for i in (0, 2, 5):
        view = memoryview(data)[i * CHUNK : (i + 1) * CHUNK]
        assert partial.write_verified(i, view, digests[i])
    assert not partial.write_verified(1, memoryview(b"x" * CHUNK), digests[1])  # wrong bytes refused
    partial.close()
    partial.close()  # idempotent
    with pytest.raises(StoreError):  # closed: refuses rather than writing through a stale descriptor
        partial.write_verified(3, memoryview(data)[3 * CHUNK : 4 * CHUNK], digests[3])
    assert set(Spool(tmp_path).partial(m).load_verified()) == {0, 2, 5}
    with open(partial.part_path, "r+b") as f:  # a torn or corrupted chunk on disk
        f.seek(2 * CHUNK)
        f.write(b"\0" * 10)
    with open(partial.log_path, "ab") as f:  # and a torn log record
        f.write(b"\0\0")
    assert set(Spool(tmp_path).partial(m).load_verified()) == {0, 5}


def test_mapped_card_is_read_only_and_outlives_the_spool_files(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 7)
    m = manifest_for(data)
    partial = Spool(tmp_path).partial(m)
    partial.open()
    for i, digest in enumerate(chunk_digests(data, CHUNK)):
        assert partial.write_verified(i, memoryview(data)[i * CHUNK : (i + 1) * CHUNK], digest)
    partial.close()
    view = partial.map_card()
    partial.remove()
    assert not partial.part_path.exists()
    assert view.readonly
    assert view == data
    with pytest.raises(TypeError):
        view[0] = 1  # type: ignore[index]


def test_mapping_a_spool_file_of_the_wrong_size_is_a_store_error(tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK)
    partial = Spool(tmp_path).partial(manifest_for(data))
    partial.part_path.write_bytes(data[:-1])
    with pytest.raises(StoreError, match="bytes, not"):
        partial.map_card()
    partial.part_path.write_bytes(data + b"x")
    with pytest.raises(StoreError, match="bytes, not"):
        partial.map_card()
    assert Spool(tmp_path).partial(manifest_for(b"")).map_card() == b""


def test_delivered_ids_survive_reopen(tmp_path: Path) -> None:
    m = manifest_for(b"abc")
    spool = Spool(tmp_path)
    assert not spool.is_delivered("card")
    spool.mark_delivered(m)
    assert Spool(tmp_path).is_delivered("card")


def test_the_delivered_log_keeps_the_newest_ids_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path, kept=4)
    for index in range(11):
        spool.mark_delivered(manifest_for(b"abc", card_id=f"c{index}"))
        assert spool.delivered_count <= 8
    # Compacted at 8 (to c4..c7), then c8..c10 appended: seven ids, the oldest forgotten.
    remembered = {f"c{i}" for i in range(11) if spool.is_delivered(f"c{i}")}
    assert remembered == {f"c{i}" for i in range(4, 11)}
    log = (tmp_path / "delivered.log").read_text().splitlines()
    assert [line.split()[0] for line in log] == [f"c{i}" for i in range(4, 11)]
    assert not list(tmp_path.glob("*.tmp"))
    # A log longer than the bound (written by a node with a larger one) is cut on open, newest kept.
    reopened = Spool(tmp_path, kept=2)
    assert {f"c{i}" for i in range(11) if reopened.is_delivered(f"c{i}")} == {"c9", "c10"}
    assert len((tmp_path / "delivered.log").read_text().splitlines()) == 2


def test_a_corrupt_delivered_log_costs_lines_not_the_start(tmp_path: Path) -> None:
    digest = "ab" * 32
    (tmp_path / "delivered.log").write_bytes(
        f"c1 {digest}\nc\xff2 {digest}\ntorn\nc3 {digest[:10]}\nc4 {digest}\n".encode("latin-1")
    )
    spool = Spool(tmp_path, kept=1)  # two good ids over a bound of 1: compacted on open
    assert (spool.is_delivered("c1"), spool.is_delivered("c4"), spool.delivered_count) == (False, True, 1)
    assert (tmp_path / "delivered.log").read_text() == f"c4 {digest}\n"


def test_a_failed_compaction_keeps_the_log_and_the_delivery(tmp_path: Path) -> None:
    spool = Spool(tmp_path, kept=1)
    spool.mark_delivered(manifest_for(b"abc", card_id="a"))
    (tmp_path / "delivered.log.tmp").mkdir()  # the rewrite cannot open its temporary file
    spool.mark_delivered(manifest_for(b"abc", card_id="b"))  # reaches 2 * kept: compaction fails, quietly
    assert (spool.is_delivered("a"), spool.is_delivered("b")) == (True, True)
    assert [line.split()[0] for line in (tmp_path / "delivered.log").read_text().splitlines()] == ["a", "b"]
    (tmp_path / "delivered.log.tmp").rmdir()
    spool.mark_delivered(manifest_for(b"abc", card_id="c"))  # the next delivery compacts
    assert (spool.is_delivered("b"), spool.is_delivered("c")) == (False, True)


@contextlib.asynccontextmanager
async def pair(tmp_path: Path, spool: str = "r", **receiver: object) -> AsyncIterator[tuple[Bus, Bus]]:
    sender_cfg = BusConfig(node_id="s", spool_dir=tmp_path / "s", insecure=True, chunk_bytes=CHUNK)
    async with Bus(sender_cfg) as sender:
        cfg = BusConfig(
            node_id="r", spool_dir=tmp_path / spool, insecure=True, bind=None,
            connect=(PeerAddress(endpoint=sender.endpoints.control),),
            credit_bytes=2 * CHUNK, chunk_bytes=CHUNK,
        )  # fmt: skip
        async with Bus(dataclasses.replace(cfg, **receiver)) as receiver_bus:  # type: ignore[arg-type]
            await receiver_bus.wait_for_peer("s", timeout=10)
            yield sender, receiver_bus


async def test_cancelled_fetch_resumes_in_a_new_bus_and_delivers_once(tmp_path: Path) -> None:
    data = os.urandom(40 * CHUNK + 123)
    # The first receiver is paced to 2 MiB/s so cancelling leaves a partial spool.
    async with pair(tmp_path, rate_limit_bps=float(2 << 20)) as (sender, receiver):
        card_id = await sender.publish_card("kv/a", data)
        ann = await anext(receiver.announcements("kv/"))
        task = asyncio.create_task(receiver.fetch_card(ann))
        while receiver.stats().chunks_received < 10:  # noqa: ASYNC110 - polling a counter in a test
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        first_run = receiver.stats().chunks_received
    assert first_run < 41
    async with pair(tmp_path) as (sender, receiver):
        await sender.publish_card("kv/a", data)
        async with receiver.announcements("kv/") as stream:
            ann = await anext(stream)
        assert ann.card_id == card_id
        assert await receiver.fetch_card(ann) == data
        assert receiver.stats().chunks_received <= 41 - first_run + 4 + 2  # resumed (+ credit in flight)
        with pytest.raises(AlreadyDelivered):
            await receiver.fetch_card(ann)
        assert receiver.is_delivered(card_id)


async def test_fetch_delivers_a_read_only_view_and_clears_the_spool(tmp_path: Path) -> None:
    data = os.urandom(5 * CHUNK + 99)
    async with pair(tmp_path) as (sender, receiver):
        await sender.publish_card("kv/a", data)
        ann = await anext(receiver.announcements())
        card = await receiver.fetch_card(ann)
        assert isinstance(card, memoryview)
        assert card.readonly
        assert card == data
        assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["delivered.log"]


async def test_wrong_announced_digest_is_caught_end_to_end(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK)
    async with pair(tmp_path) as (sender, receiver):
        await sender.publish_card("kv/a", data, card_id="the-card")
        ann = await anext(receiver.announcements())
        forged = dataclasses.replace(ann, digest=bytes(32))
        with pytest.raises(DigestMismatch):
            await receiver.fetch_card(forged)
        assert not receiver.is_delivered("the-card")
        assert await receiver.fetch_card(ann) == data


async def test_a_sender_serving_changed_bytes_fails_the_fetch_instead_of_looping(tmp_path: Path) -> None:
    # The chunk digests are taken at publish time; a buffer changed afterwards is served as it is now.
    data = bytearray(os.urandom(4 * CHUNK))
    async with pair(tmp_path, stall_timeout_s=600.0) as (sender, receiver):
        await sender.publish_card("kv/a", data, card_id="changed")
        data[2 * CHUNK + 5] ^= 0xFF
        ann = await anext(receiver.announcements())
        async with asyncio.timeout(20):
            with pytest.raises(DigestMismatch, match="chunk 2 failed its digest 3 times"):
                await receiver.fetch_card(ann)
        assert receiver.stats().rejected["chunk_digest"] == 3
        assert not receiver.is_delivered("changed")


async def test_concurrent_fetches_of_one_card_deliver_once(tmp_path: Path) -> None:
    data = os.urandom(8 * CHUNK)
    async with pair(tmp_path) as (sender, receiver):
        await sender.publish_card("kv/a", data)
        ann = await anext(receiver.announcements())
        results = await asyncio.gather(
            receiver.fetch_card(ann), receiver.fetch_card(ann), return_exceptions=True
        )
        assert sorted(type(r).__name__ for r in results) == ["AlreadyDelivered", "memoryview"]
        assert receiver.stats().cards_delivered == 1
        assert receiver.link("s").samples >= 1


async def test_unwritable_spool_fails_the_fetch_with_store_error(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK)
    async with pair(tmp_path) as (sender, receiver):
        await sender.publish_card("kv/a", data)
        ann = await anext(receiver.announcements())
        part = Spool(tmp_path / "r").partial(ann.manifest).part_path
        part.mkdir()  # a directory where the spool file should be: open(2) fails even for root
        with pytest.raises(StoreError):
            await receiver.fetch_card(ann)
        assert not receiver.is_delivered(ann.card_id)
        part.rmdir()
        assert await receiver.fetch_card(ann) == data


@pytest.mark.parametrize("card_id", ["abc\n", "abc\r", "\u0661\u0662", "a b", "", "x" * 65, "../x"])
def test_card_ids_that_would_break_the_delivered_log_are_refused(card_id: str) -> None:
    # "$" matches before a final newline: an id "abc\n" would split its delivered.log line, and be
    # fetched and delivered again after a restart.
    with pytest.raises(FrameError):
        valid_card_id(card_id)
    assert valid_card_id("abc-1_Z") == "abc-1_Z"


async def test_fetches_and_a_second_close_wait_for_a_closing_bus(tmp_path: Path) -> None:
    data = os.urandom(40 * CHUNK)
    async with pair(tmp_path, rate_limit_bps=float(1 << 20)) as (sender, receiver):
        await sender.publish_card("kv/a", data)
        ann = await anext(receiver.announcements())
        # The second fetch of the same card waits on the first's lock while the bus closes.
        fetches = [asyncio.create_task(receiver.fetch_card(ann)) for _ in range(2)]
        while receiver.stats().chunks_received < 2:  # noqa: ASYNC110 - polling a counter in a test
            await asyncio.sleep(0.01)
        closers = [asyncio.create_task(receiver.aclose()) for _ in range(2)]
        await closers[1]
        assert closers[0].done()  # the second close returned only once everything was released
        results = await asyncio.gather(*fetches, return_exceptions=True)
        assert [type(r) for r in results] == [ClosedError, ClosedError]


def test_spool_file_errors_are_store_errors(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    manifest = manifest_for(b"abc", card_id="a")
    partial = spool.partial(manifest)
    partial.log_path.mkdir()  # the chunk log cannot be read back
    with pytest.raises(StoreError):
        partial.open()
    (tmp_path / "delivered.log").unlink(missing_ok=True)
    (tmp_path / "delivered.log").mkdir()  # nor the delivered log appended to
    with pytest.raises(StoreError):
        spool.mark_delivered(manifest)
    assert not spool.is_delivered("a")
