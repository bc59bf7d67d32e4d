"""A bus node run as a real subprocess by the process tests: ``python -m tests.edgebus.peer_main MODE ...``.

Every mode prints JSON lines on stdout (one event per line) so the parent can follow it without sleeping:

* ``serve``  bind, publish ``--cards`` cards of ``--mib`` MiB (seeded bytes), print ``{"ready": ...}``, then
  report ``{"rss": bytes, "held": bytes}`` every 0.2 s until stdin closes.
* ``fetch``  connect to ``--connect``, fetch every card announced on ``--topic``, print
  ``{"progress": chunks}`` while pulling and ``{"delivered": id, "sha256": hex, "chunks": n}`` per
  card, exit 0 after ``--expect`` deliveries; ``{"already": id}`` when the spool says a card was
  delivered before.
* ``stall``  a hostile client: raw DEALER + SUB sockets that ask the server for every chunk many times
  and never read anything; runs until stdin closes.

Key material for CURVE runs comes from ``--keys DIR`` (made by :func:`make_keys`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import psutil

from edgebus import (
    AlreadyDelivered,
    Bus,
    BusConfig,
    BusKeys,
    PeerAddress,
    load_hmac_key,
    load_keypair,
    load_public_key,
    new_hmac_key,
    new_keypair,
)


def card_bytes(seed: int, mib: int) -> bytes:
    return random.Random(seed).randbytes(mib << 20)


def make_keys(directory: Path, names: tuple[str, ...] = ("server", "client", "stranger")) -> Path:
    """Key pairs for ``names`` plus an HMAC key; ``allowed/`` holds every name but ``stranger``."""
    allowed = directory / "allowed"
    allowed.mkdir(parents=True, exist_ok=True)
    for name in names:
        public, _ = new_keypair(name, directory)
        if name != "stranger":
            (allowed / public.name).write_bytes(public.read_bytes())
    new_hmac_key(directory / "hmac.key")
    return directory


def keys_for(directory: Path, name: str) -> BusKeys:
    public, secret = load_keypair(directory / f"{name}.key_secret")
    allowed = frozenset(load_public_key(p) for p in (directory / "allowed").glob("*.key"))
    return BusKeys(
        public_key=public,
        secret_key=secret,
        allowed_clients=allowed,
        hmac_key=load_hmac_key(directory / "hmac.key"),
    )


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


async def _stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


async def serve(args: argparse.Namespace) -> None:
    keys = keys_for(args.keys, args.name) if args.keys else None
    config = BusConfig(
        node_id=args.name,
        spool_dir=args.spool,
        keys=keys,
        insecure=keys is None,
        held_cards_bytes=args.held_mib << 20,
        send_buffer_bytes=args.send_buffer_mib << 20,
        heartbeat_s=0.2,
        peer_timeout_s=2.0,
    )
    proc = psutil.Process()
    async with Bus(config) as bus:
        ids = []
        for i in range(args.cards):
            ids.append(await bus.publish_card(args.topic, card_bytes(args.seed + i, args.mib)))
        emit(ready=True, control=bus.endpoints.control, cards=ids, rss=proc.memory_info().rss)
        waiter = asyncio.create_task(_stdin_closed())
        try:
            while not waiter.done():
                stats = bus.stats()
                emit(rss=proc.memory_info().rss, served=stats.chunks_served, dropped=stats.send_dropped)
                await asyncio.wait({waiter}, timeout=0.2)
        finally:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter


async def fetch(args: argparse.Namespace) -> None:
    keys = keys_for(args.keys, args.name) if args.keys else None
    server_key = load_public_key(args.keys / f"{args.server}.key") if args.keys else None
    config = BusConfig(
        node_id=args.name,
        spool_dir=args.spool,
        bind=None,
        keys=keys,
        insecure=keys is None,
        connect=(PeerAddress(endpoint=args.connect, server_key=server_key),),
        rate_limit_bps=args.rate_mib * float(1 << 20) if args.rate_mib else None,
        heartbeat_s=0.2,
        peer_timeout_s=2.0,
    )
    async with Bus(config) as bus:

        async def report() -> None:
            while True:
                emit(progress=bus.stats().chunks_received)
                await asyncio.sleep(0.05)

        reporter = asyncio.create_task(report())
        done = 0
        try:
            async with bus.announcements(args.topic) as anns:
                async for ann in anns:
                    try:
                        data = await bus.fetch_card(ann)
                    except AlreadyDelivered:
                        emit(already=ann.card_id)
                    else:
                        emit(
                            delivered=ann.card_id,
                            sha256=hashlib.sha256(data).hexdigest(),
                            chunks=bus.stats().chunks_received,
                        )
                    done += 1
                    if done >= args.expect:
                        break
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter


async def stall(args: argparse.Namespace) -> None:
    """Connect like a peer, request every chunk repeatedly, never read: the server must stay bounded."""
    import time

    import zmq
    import zmq.asyncio

    from edgebus import _frame

    hmac_key = load_hmac_key(args.keys / "hmac.key") if args.keys else b"edgebus-insecure-mode-known-key!"
    ctx = zmq.asyncio.Context()
    ctl = ctx.socket(zmq.DEALER)
    ctl.linger = 0
    ctl.connect(args.connect)
    seq = time.time_ns() // 1000

    def frame(kind: _frame.Kind, fields: dict[str, Any], payload: bytes = b"") -> list[Any]:
        nonlocal seq
        seq += 1
        parts = [payload] if payload else []
        codec = _frame.Codec.MSGPACK if payload else None
        header = _frame.make_header(kind, args.name, seq, time.time(), parts, codec=codec, fields=fields)
        return _frame.encode_frame(b"ctl", header, parts, hmac_key)

    import msgpack

    ping = msgpack.packb({"roles": [], "info": {}, "t": 1.0})
    await ctl.send_multipart(frame(_frame.Kind.PING, {}, ping))
    _, _, payload = _frame.decode_frame(
        [bytes(p) for p in await ctl.recv_multipart()], hmac_key, max_payload_bytes=1 << 20
    )
    pong = msgpack.unpackb(bytes(payload[0]))
    host = args.connect.rsplit(":", 1)[0]
    data = ctx.socket(zmq.DEALER)
    data.linger = 0
    data.rcvhwm = 1  # our side queues almost nothing; TCP buffers fill and the server's queue backs up
    data.setsockopt(zmq.RCVBUF, 65536)
    data.connect(f"{host}:{pong['data'].rsplit(':', 1)[1]}")
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.rcvhwm = 1
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"{host}:{pong['ann'].rsplit(':', 1)[1]}")
    emit(stalling=True)
    waiter = asyncio.create_task(_stdin_closed())
    try:
        while not waiter.done():
            for card_id in args.card:
                for index in range(args.mib):
                    fields = {"c": card_id, "i": index, "m": 1 << 30}
                    with contextlib.suppress(zmq.Again):
                        await data.send_multipart(frame(_frame.Kind.FETCH, fields), flags=zmq.NOBLOCK)
            await asyncio.wait({waiter}, timeout=0.05)
    finally:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        ctx.destroy(linger=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "fetch", "stall"])
    parser.add_argument("--name", required=True)
    parser.add_argument("--spool", type=Path, required=True)
    parser.add_argument("--keys", type=Path)
    parser.add_argument("--server", default="server")
    parser.add_argument("--connect", default="")
    parser.add_argument("--topic", default="kv/")
    parser.add_argument("--mib", type=int, default=4)
    parser.add_argument("--cards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--expect", type=int, default=1)
    parser.add_argument("--rate-mib", type=float, default=0.0)
    parser.add_argument("--held-mib", type=int, default=1024)
    parser.add_argument("--send-buffer-mib", type=int, default=16)
    parser.add_argument("--card", action="append", default=[])
    args = parser.parse_args(argv)
    asyncio.run({"serve": serve, "fetch": fetch, "stall": stall}[args.mode](args))


if __name__ == "__main__":
    main()
