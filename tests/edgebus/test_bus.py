"""Bus lifecycle, requests, presence, CURVE on loopback, statistics and the public surface."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import zmq

import edgebus
from edgebus import (
    Bus,
    BusConfig,
    BusState,
    ClosedError,
    ConfigError,
    PayloadTooLarge,
    PeerAddress,
    PeerGone,
    RemoteError,
    RequestTimeout,
    load_public_key,
)
from edgebus._bus import BULK_AFFINITY, CONTROL_AFFINITY, IO_THREADS
from tests.edgebus.peer_main import keys_for, make_keys

FAST = {"heartbeat_s": 0.05, "peer_timeout_s": 0.5}


def test_exported_members() -> None:
    # Order is ruff's (RUF022: constants, then classes, then functions); here: no duplicates, all resolve.
    assert len(set(edgebus.__all__)) == len(edgebus.__all__)
    for name in edgebus.__all__:
        assert getattr(edgebus, name) is not None
    assert {"Bus", "BusConfig", "Announcement", "BusStats", "LinkEstimate", "new_keypair"} <= set(
        edgebus.__all__
    )


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="node_id"):
        BusConfig(node_id="bad id!", spool_dir=tmp_path)
    with pytest.raises(ConfigError, match="credit_bytes"):
        BusConfig(node_id="a", spool_dir=tmp_path, credit_bytes=10)
    with pytest.raises(ConfigError, match="bind"):
        BusConfig(node_id="a", spool_dir=tmp_path, bind="udp://x")
    with pytest.raises(ConfigError, match="chunk_bytes: max_card_bytes would take more than"):
        BusConfig(node_id="a", spool_dir=tmp_path, chunk_bytes=1024, credit_bytes=1024)  # 1 GiB: 2^20 chunks


async def test_lifecycle_states_and_idempotent_close(tmp_path: Path) -> None:
    bus = Bus(BusConfig(node_id="a", spool_dir=tmp_path, insecure=True))
    assert bus.state is BusState.UNOPENED
    async with bus:
        assert bus.state is BusState.OPEN
        tasks = set(bus._tasks)
        assert tasks
    assert bus.state is BusState.CLOSED
    assert all(t.done() for t in tasks)
    await bus.aclose()
    with pytest.raises(ClosedError):
        await bus.publish_card("x", b"1")
    with pytest.raises(ClosedError):
        await bus.open()


async def test_close_while_a_request_is_pending_fails_it(tmp_path: Path) -> None:
    async with Bus(BusConfig(node_id="a", spool_dir=tmp_path / "a", insecure=True, **FAST)) as a:
        gate = asyncio.Event()

        async def slow(peer: str, payload: dict[str, Any]) -> dict[str, Any]:
            await gate.wait()
            return {}

        a.on_request(slow)
        cfg = BusConfig(
            node_id="b", spool_dir=tmp_path / "b", insecure=True, bind=None,
            connect=(PeerAddress(endpoint=a.endpoints.control),), **FAST,
        )  # fmt: skip
        b = Bus(cfg)
        await b.open()
        await b.wait_for_peer("a", timeout=5)
        pending = asyncio.create_task(b.request("a", {}, timeout=30))
        await asyncio.sleep(0.05)
        await b.aclose()
        with pytest.raises(ClosedError):
            await pending
        gate.set()


async def test_requests_both_ways_errors_and_presence(tmp_path: Path) -> None:
    async with Bus(
        BusConfig(node_id="a", spool_dir=tmp_path / "a", insecure=True, roles=("holder",), **FAST)
    ) as a:

        async def echo(peer: str, payload: dict[str, Any]) -> dict[str, Any]:
            if payload.get("fail"):
                raise ValueError("as asked")
            if payload.get("hang"):
                await asyncio.Event().wait()
            return {"peer": peer, "got": payload}

        a.on_request(echo)
        cfg = BusConfig(
            node_id="b", spool_dir=tmp_path / "b", insecure=True, bind=None,
            connect=(PeerAddress(endpoint=a.endpoints.control),), **FAST,
        )  # fmt: skip
        async with Bus(cfg) as b:
            b.on_request(echo)
            b.set_presence_info({"ram_mb": 512})
            info = await b.wait_for_peer("a", timeout=5)
            assert info.roles == ("holder",)
            assert await b.request("a", {"x": 1}) == {"peer": "b", "got": {"x": 1}}
            assert await a.request("b", {"y": 2}) == {"peer": "a", "got": {"y": 2}}
            with pytest.raises(RemoteError, match="as asked"):
                await b.request("a", {"fail": True})
            with pytest.raises(RequestTimeout):
                await b.request("a", {"hang": True}, timeout=0.2)
            with pytest.raises(PeerGone):
                await b.request("nobody", {})
            with pytest.raises(PayloadTooLarge):
                await b.request("a", {"blob": b"x" * (2 << 20)})
            with pytest.raises(PayloadTooLarge):
                b.set_presence_info({"blob": "x" * 10_000})
            b.set_presence_info({"ram_mb": 256})
            while [p.info.get("ram_mb") for p in a.peers()] != [256]:  # noqa: ASYNC110 - test polling
                await asyncio.sleep(0.02)
            assert b.link("a").rtt_s > 0
            stats = b.stats()
            assert dataclasses.is_dataclass(stats)
            with pytest.raises(dataclasses.FrozenInstanceError):
                stats.frames_in = 0  # type: ignore[misc]
        # b is gone: a notices within the peer timeout
        while a.peers():  # noqa: ASYNC110 - test polling with the suite's timeout
            await asyncio.sleep(0.05)


async def test_card_chunks_and_control_use_separate_io_threads(tmp_path: Path) -> None:
    # The bench's control-busy row measures what this buys; here, that every socket is placed as meant.
    async with Bus(BusConfig(node_id="a", spool_dir=tmp_path / "a", insecure=True, **FAST)) as a:
        cfg = BusConfig(
            node_id="b", spool_dir=tmp_path / "b", insecure=True, bind=None,
            connect=(PeerAddress(endpoint=a.endpoints.control),), **FAST,
        )  # fmt: skip
        async with Bus(cfg) as b:
            await b.wait_for_peer("a", timeout=5)
            link = b._outbound[0]
            while link.data is None or link.sub is None:  # noqa: ASYNC110 - attached on the first PONG
                await asyncio.sleep(0.01)
            bulk = [a._data_router, link.data]
            control = [a._ctl_router, a._xpub, link.ctl, link.sub]
            assert a._ctx is not None
            assert a._ctx.get(zmq.IO_THREADS) == IO_THREADS == 2
            assert [s.getsockopt(zmq.AFFINITY) for s in bulk if s is not None] == [BULK_AFFINITY] * 2
            assert [s.getsockopt(zmq.AFFINITY) for s in control if s is not None] == [CONTROL_AFFINITY] * 4
            assert BULK_AFFINITY & CONTROL_AFFINITY == 0


async def test_curve_on_loopback_end_to_end(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    server_cfg = BusConfig(node_id="server", spool_dir=tmp_path / "s", keys=keys_for(keys, "server"), **FAST)
    async with Bus(server_cfg) as server:
        card = b"secret bytes" * 10_000
        card_id = await server.publish_card("kv/c", card, meta={"layers": 30})
        address = PeerAddress(
            endpoint=server.endpoints.control, server_key=load_public_key(keys / "server.key")
        )
        client_cfg = BusConfig(
            node_id="client",
            spool_dir=tmp_path / "c",
            keys=keys_for(keys, "client"),
            connect=(address,),
            **FAST,
        )
        async with Bus(client_cfg) as client:
            ann = await anext(client.announcements())
            assert (ann.card_id, dict(ann.meta)) == (card_id, {"layers": 30})
            assert await client.fetch_card(ann) == card
    with pytest.raises(ConfigError, match="server_key"):
        BusConfig(
            node_id="x",
            spool_dir=tmp_path,
            keys=keys_for(keys, "client"),
            connect=(PeerAddress(endpoint="tcp://127.0.0.1:1"),),
        )


async def test_curve_carries_chunks_as_large_as_the_receiver_allows(tmp_path: Path) -> None:
    # CURVE adds a few bytes to every wire frame: a receiver limit of exactly max_chunk_bytes would make
    # libzmq drop the data connection for good at the first full-size chunk.
    keys = make_keys(tmp_path / "keys")
    limits = {"chunk_bytes": 64 << 10, "max_chunk_bytes": 64 << 10, "credit_bytes": 128 << 10}
    server_cfg = BusConfig(
        node_id="server", spool_dir=tmp_path / "s", keys=keys_for(keys, "server"), **FAST, **limits
    )
    async with Bus(server_cfg) as server:
        card = bytes(range(256)) * 1000  # four chunks, the first three full-size
        await server.publish_card("kv/c", card)
        address = PeerAddress(
            endpoint=server.endpoints.control, server_key=load_public_key(keys / "server.key")
        )
        client_cfg = BusConfig(
            node_id="client", spool_dir=tmp_path / "c", keys=keys_for(keys, "client"), connect=(address,),
            chunk_timeout_s=0.5, stall_timeout_s=3.0, **FAST, **limits,
        )  # fmt: skip
        async with Bus(client_cfg) as client:
            ann = await anext(client.announcements())
            assert await client.fetch_card(ann) == card


async def test_receiver_credit_is_capped_by_the_senders_queue(tmp_path: Path) -> None:
    # The receiver asks for 16 chunks at a time; the sender queues 4 per peer. Uncapped, the sender drops
    # requested chunks and the receiver waits out chunk_timeout_s for each one.
    chunk = 1 << 20
    server_cfg = BusConfig(
        node_id="server", spool_dir=tmp_path / "s", insecure=True, chunk_bytes=chunk,
        send_buffer_bytes=4 * chunk, **FAST,
    )  # fmt: skip
    async with Bus(server_cfg) as server:
        card = bytes(range(256)) * (32 * chunk // 256)  # 32 chunks
        await server.publish_card("kv/c", card)
        client_cfg = BusConfig(
            node_id="client", spool_dir=tmp_path / "c", insecure=True, bind=None, credit_bytes=16 * chunk,
            connect=(PeerAddress(endpoint=server.endpoints.control),), chunk_timeout_s=60.0, **FAST,
        )  # fmt: skip
        async with Bus(client_cfg) as client:
            ann = await anext(client.announcements())
            async with asyncio.timeout(30):
                assert await client.fetch_card(ann) == card
        stats = server.stats()
        assert stats.send_dropped == 0
        assert stats.chunks_served == 32


async def test_a_peers_presence_info_is_held_to_this_nodes_limit(tmp_path: Path) -> None:
    # Every peer's info is kept and copied into status replies: a peer configured with a larger limit
    # must not push more than ours into our peer table. Its PINGs are refused and counted instead.
    async with Bus(BusConfig(node_id="a", spool_dir=tmp_path / "a", insecure=True, **FAST)) as a:
        cfg = BusConfig(
            node_id="b", spool_dir=tmp_path / "b", insecure=True, bind=None, max_presence_bytes=64 << 10,
            connect=(PeerAddress(endpoint=a.endpoints.control),), **FAST,
        )  # fmt: skip
        async with Bus(cfg) as b:
            b.set_presence_info({"ram_mb": 1})
            while [p.info.get("ram_mb") for p in a.peers()] != [1]:  # noqa: ASYNC110 - test polling
                await asyncio.sleep(0.02)
            b.set_presence_info({"ram_mb": 2, "blob": "x" * 10_000})
            async with asyncio.timeout(10):
                while not a.stats().rejected.get("malformed"):  # noqa: ASYNC110 - test polling
                    await asyncio.sleep(0.02)
            assert [p.info.get("ram_mb") for p in a.peers()] == [1]


async def test_asking_about_a_name_keeps_no_link_state(tmp_path: Path) -> None:
    async with Bus(BusConfig(node_id="a", spool_dir=tmp_path / "a", insecure=True, **FAST)) as a:
        for i in range(100):
            assert a.link(f"client-{i}").samples == 0
        assert not a._links  # clients come and go; their names must not accumulate
