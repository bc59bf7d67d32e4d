"""Hostile input: random and mutated frames thrown at a live node's sockets. Zero crashes, all counted."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from edgebus import Bus, BusConfig, PeerAddress
from edgebus._frame import Codec, Kind, decode_frame, encode_frame, make_header
from edgebus._security import INSECURE_HMAC_KEY

KEY = INSECURE_HMAC_KEY


class Signer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.seq = time.time_ns() // 1000

    def frame(
        self, kind: Kind, topic: bytes, fields: dict[str, Any], payload: dict[str, Any] | None
    ) -> list[bytes]:
        self.seq += 1
        parts = [msgpack.packb(payload)] if payload is not None else []
        codec = Codec.MSGPACK if payload is not None else None
        header = make_header(kind, self.name, self.seq, time.time(), parts, codec=codec, fields=fields)
        return [bytes(p) for p in encode_frame(topic, header, parts, KEY)]


def mutate(rng: random.Random, frame: list[bytes]) -> list[bytes]:
    """One hostile variant of a valid frame; never the frame itself."""
    parts = [bytearray(p) for p in frame]
    choice = rng.randrange(7)
    if choice == 0:  # flip bytes somewhere
        target = parts[rng.randrange(len(parts))]
        if not target:
            target.append(0)
        for _ in range(rng.randint(1, 4)):
            target[rng.randrange(len(target))] ^= rng.randint(1, 255)
    elif choice == 1:  # truncate one part
        i = rng.randrange(len(parts))
        parts[i] = parts[i][: rng.randrange(max(1, len(parts[i])))] if parts[i] else bytearray(b"x")
    elif choice == 2:  # add a part
        parts.insert(rng.randrange(len(parts) + 1), bytearray(rng.randbytes(rng.randint(0, 64))))
    elif choice == 3 and len(parts) > 1:  # drop a part
        del parts[rng.randrange(len(parts))]
    elif choice == 4:  # replay as is
        pass
    elif choice == 5:  # random garbage of the same shape
        parts = [bytearray(rng.randbytes(len(p))) for p in parts]
    else:  # a random multipart message
        parts = [bytearray(rng.randbytes(rng.randint(0, 300))) for _ in range(rng.randint(1, 5))]
    return [bytes(p) for p in parts]


async def throw_frames(tmp_path: Path, count: int, seed: int) -> None:
    cfg = BusConfig(node_id="target", spool_dir=tmp_path, insecure=True, heartbeat_s=5.0, peer_timeout_s=60)
    async with Bus(cfg) as bus:
        ctx = zmq.asyncio.Context()
        try:
            ctl, data = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
            for sock, endpoint in ((ctl, bus.endpoints.control), (data, bus.endpoints.data)):
                sock.linger = 0
                sock.connect(endpoint)
            signer = Signer("fuzzer")
            ping = {"roles": [], "info": {}, "t": 1.0}
            seeds = [
                (ctl, signer.frame(Kind.PING, b"ctl", {}, ping)),
                (ctl, signer.frame(Kind.REQUEST, b"ctl", {"r": 1, "op": "nope"}, {})),
                (ctl, signer.frame(Kind.REPLY, b"ctl", {"r": 99, "ok": True}, {})),
                (data, signer.frame(Kind.FETCH, b"dat", {"c": "card", "i": 0, "m": 1 << 20}, None)),
                (data, signer.frame(Kind.ACK, b"dat", {"c": "card"}, None)),
            ]
            for sock, frame in seeds:  # the originals: valid except REPLY (no such request) - counted too
                await sock.send_multipart(frame)
            rng = random.Random(seed)
            for _ in range(count):
                sock, frame = seeds[rng.randrange(len(seeds))]
                await sock.send_multipart(mutate(rng, frame))
            # Ordered sockets: once these answers arrive, every frame before them was processed.
            await ctl.send_multipart(signer.frame(Kind.PING, b"ctl", {}, ping))
            await data.send_multipart(signer.frame(Kind.FETCH, b"dat", {"c": "zz", "i": 0, "m": 1}, None))
            answers: list[Kind] = []
            while sorted(answers) != [
                Kind.PONG,
                Kind.PONG,
                Kind.REPLY,
            ]:  # seed PING, final PING, seed REQUEST
                _, header, _ = decode_frame(await ctl.recv_multipart(), KEY, max_payload_bytes=1 << 20)
                answers.append(header.kind)
            while True:
                _, header, _ = decode_frame(await data.recv_multipart(), KEY, max_payload_bytes=1 << 20)
                if header.fields.get("c") == "zz":
                    break
            stats = bus.stats()
            accepted_originals = 4  # PING, REQUEST, FETCH, ACK; the stray REPLY is rejected
            assert stats.frames_in == len(seeds) + count + 2
            assert stats.rejected_total == len(seeds) - accepted_originals + count
            assert stats.task_failures == 0
            assert set(stats.rejected) <= {
                "malformed",
                "signature",
                "replay",
                "version",
                "oversize",
                "unexpected",
            }
            # Still fully alive: a legitimate request gets a legitimate answer.
            await ctl.send_multipart(signer.frame(Kind.PING, b"ctl", {}, ping))
            _, header, _ = decode_frame(await ctl.recv_multipart(), KEY, max_payload_bytes=1 << 20)
            assert header.kind is Kind.PONG, (header, bus.stats())
        finally:
            ctx.destroy(linger=0)


async def test_five_thousand_hostile_frames(tmp_path: Path) -> None:
    await throw_frames(tmp_path, 5_000, seed=1)


@pytest.mark.slow
async def test_hundred_thousand_hostile_frames(tmp_path: Path) -> None:
    await throw_frames(tmp_path, 100_000, seed=2)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_hostile_pongs_leak_no_sockets_and_bend_no_link_estimate(tmp_path: Path) -> None:
    # A fake peer answers every PING with a PONG advertising an endpoint libzmq refuses (a port in Arabic-
    # Indic digits passes str.isdigit) or an echo that would make the RTT the machine's uptime.
    ctx = zmq.asyncio.Context()
    try:
        router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        port = router.bind_to_random_port("tcp://127.0.0.1")
        cfg = BusConfig(
            node_id="target", spool_dir=tmp_path, insecure=True, bind=None, heartbeat_s=0.01,
            peer_timeout_s=30, connect=(PeerAddress(endpoint=f"tcp://127.0.0.1:{port}"),),
        )  # fmt: skip
        signer = Signer("fake-peer")
        async with Bus(cfg) as bus:
            fds = None
            for i in range(300):
                ident, *_ = await router.recv_multipart()
                bad = {
                    "data": "tcp://127.0.0.1:\u0661\u0662\u0663",
                    "ann": "tcp://127.0.0.1:\u0661\u0662\u0664",
                }
                good = {"data": f"tcp://127.0.0.1:{port + 1}", "ann": f"tcp://127.0.0.1:{port + 2}"}
                pong = {"roles": [], "info": {}, "t": 1e-9, "ae": 1, "an": 0, **(good if i == 0 else bad)}
                await router.send_multipart([ident, *signer.frame(Kind.PONG, b"ctl", {}, pong)])
                if i == 10:
                    fds = _open_fds()
            await asyncio.sleep(0.1)
            stats = bus.stats()
            assert fds is not None
            assert _open_fds() <= fds + 4
            assert stats.task_failures == 0, stats
            assert stats.rejected.get("malformed", 0) >= 250, stats
            assert bus.link("fake-peer").rtt_s < 1.0
    finally:
        ctx.destroy(linger=0)
