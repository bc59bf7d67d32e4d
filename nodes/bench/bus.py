"""edgebus transport benchmark over loopback, each row beside a raw pyzmq baseline.

Rows (sender/server in a child process, receiver/client in this one, both sides the same for bus and raw):

* ``card``        one ``card_mib`` MiB card: ``Bus.fetch_card`` (credit pull, chunk hashing, spooling,
                  end-to-end digest) vs raw PUSH/PULL of 1 MiB zero-copy messages. Target: bus >= 0.7x raw.
* ``card-curve``  the same with CurveZMQ on both. Target: >= 0.7x raw CURVE.
* ``control``     1000 sequential small request/replies: ``Bus.request`` vs a raw zmq.asyncio
                  DEALER/ROUTER echo.
                  Target: bus p99 <= 2x raw p99.

Times are wall clock from the first request to the last byte in the receiver's hands.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from edgebus import (
    Bus,
    BusConfig,
    BusKeys,
    PeerAddress,
    load_hmac_key,
    load_keypair,
    new_hmac_key,
    new_keypair,
)

CHUNK = 1 << 20
RPC_COUNT = 1000


def _keys(directory: Path, name: str) -> BusKeys:
    public, secret = load_keypair(directory / f"{name}.key_secret")
    allowed = frozenset(load_keypair(directory / f"{n}.key_secret")[0] for n in ("server", "client"))
    return BusKeys(
        public_key=public,
        secret_key=secret,
        allowed_clients=allowed,
        hmac_key=load_hmac_key(directory / "hmac"),
    )


def _make_keys(directory: Path) -> None:
    for name in ("server", "client"):
        new_keypair(name, directory)
    new_hmac_key(directory / "hmac")


# ---------------------------------------------------------------- child processes


def _bus_server(conn: Connection, keydir: str | None, card_mib: int, spool: str) -> None:
    async def main() -> None:
        keys = _keys(Path(keydir), "server") if keydir else None
        cfg = BusConfig(node_id="server", spool_dir=Path(spool), keys=keys, insecure=keys is None)
        async with Bus(cfg) as bus:

            async def echo(peer: str, payload: dict[str, Any]) -> dict[str, Any]:
                return payload

            bus.on_request(echo)
            if card_mib:
                await bus.publish_card("bench/card", os.urandom(card_mib << 20))
            conn.send(bus.endpoints.control)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    asyncio.run(main())


def _raw_push(conn: Connection, keydir: str | None, card_mib: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    if keydir:
        _, secret = load_keypair(Path(keydir) / "server.key_secret")
        sock.curve_secretkey, sock.curve_server = secret, True
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    data = memoryview(os.urandom(card_mib << 20))
    conn.send(port)
    conn.recv()  # go
    for off in range(0, len(data), CHUNK):
        sock.send(data[off : off + CHUNK], copy=False)
    conn.recv()  # done
    ctx.destroy(linger=0)


def _raw_router(conn: Connection) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    conn.send(port)
    for _ in range(RPC_COUNT + 10):
        sock.send_multipart(sock.recv_multipart())
    conn.recv()
    ctx.destroy(linger=0)


# ---------------------------------------------------------------- measurements in this process


async def _bus_card(keydir: Path | None, card_mib: int, tmp: Path) -> float:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_bus_server, args=(child, str(keydir) if keydir else None, card_mib, str(tmp / "s"))
    )
    proc.start()
    try:
        endpoint = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
        keys = _keys(keydir, "client") if keydir else None
        server_key = load_keypair(keydir / "server.key_secret")[0] if keydir else None
        cfg = BusConfig(
            node_id="client", spool_dir=tmp / f"r{time.monotonic_ns()}", bind=None, keys=keys,
            insecure=keys is None,
            connect=(PeerAddress(endpoint=endpoint, server_key=server_key),),
        )  # fmt: skip
        async with Bus(cfg) as bus:
            ann = await anext(bus.announcements("bench/"))
            start = time.perf_counter()
            data = await bus.fetch_card(ann)
            elapsed = time.perf_counter() - start
            assert len(data) == card_mib << 20
        return elapsed
    finally:
        parent.send("stop")
        proc.join(30)


def _raw_card(keydir: Path | None, card_mib: int) -> float:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_raw_push, args=(child, str(keydir) if keydir else None, card_mib))
    proc.start()
    zctx = zmq.Context()
    try:
        port = parent.recv()
        sock = zctx.socket(zmq.PULL)
        sock.linger = 0
        if keydir:
            public, secret = load_keypair(keydir / "client.key_secret")
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = load_keypair(keydir / "server.key_secret")[0]
        sock.connect(f"tcp://127.0.0.1:{port}")
        parent.send("go")
        start = time.perf_counter()
        got = 0
        while got < card_mib << 20:
            got += len(sock.recv(copy=False).buffer)
        elapsed = time.perf_counter() - start
        parent.send("done")
        return elapsed
    finally:
        zctx.destroy(linger=0)
        proc.join(30)


def _percentiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100)
    return q[49], q[98]


async def _bus_rpc(tmp: Path) -> list[float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_bus_server, args=(child, None, 0, str(tmp / "rpc")))
    proc.start()
    try:
        endpoint = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
        cfg = BusConfig(
            node_id="client", spool_dir=tmp / "rpc-c", bind=None, insecure=True,
            connect=(PeerAddress(endpoint=endpoint),),
        )  # fmt: skip
        async with Bus(cfg) as bus:
            await bus.wait_for_peer("server", timeout=10)
            payload = {"blob": b"x" * 100}
            for _ in range(10):
                await bus.request("server", payload)
            samples = []
            for _ in range(RPC_COUNT):
                t = time.perf_counter()
                await bus.request("server", payload)
                samples.append(time.perf_counter() - t)
        return samples
    finally:
        parent.send("stop")
        proc.join(30)


async def _raw_rpc() -> list[float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_raw_router, args=(child,))
    proc.start()
    zctx = zmq.asyncio.Context()
    try:
        port = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
        sock = zctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(f"tcp://127.0.0.1:{port}")
        msg = b"x" * 100
        for _ in range(10):
            await sock.send(msg)
            await sock.recv()
        samples = []
        for _ in range(RPC_COUNT):
            t = time.perf_counter()
            await sock.send(msg)
            await sock.recv()
            samples.append(time.perf_counter() - t)
        return samples
    finally:
        parent.send("stop")
        zctx.destroy(linger=0)
        proc.join(30)


async def _run(card_mib: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmpname:
        tmp = Path(tmpname)
        keydir = tmp / "keys"
        _make_keys(keydir)
        size = card_mib << 20
        for name, keys in (("card", None), ("card-curve", keydir)):
            raw = _raw_card(keys, card_mib)
            bus = await _bus_card(keys, card_mib, tmp)
            rows.append({
                "row": name, "bytes": size,
                "bus_gbps": size / bus / 1e9, "raw_gbps": size / raw / 1e9,
                "ratio": raw / bus, "target": ">= 0.7",
            })  # fmt: skip
        raw_p50, raw_p99 = _percentiles(await _raw_rpc())
        bus_p50, bus_p99 = _percentiles(await _bus_rpc(tmp))
        rows.append({
            "row": "control", "count": RPC_COUNT,
            "bus_p50_us": bus_p50 * 1e6, "bus_p99_us": bus_p99 * 1e6,
            "raw_p50_us": raw_p50 * 1e6, "raw_p99_us": raw_p99 * 1e6,
            "ratio": bus_p99 / raw_p99, "target": "<= 2.0 (p99)",
        })  # fmt: skip
    return rows


def run_bus_bench(json_out: Path | None = None, card_mib: int = 64) -> list[dict[str, Any]]:
    """Run every row, print a table, optionally write the rows as JSON; returns the rows."""
    rows = asyncio.run(_run(card_mib))
    print(f"{'row':<12} {'edgebus':>22} {'raw pyzmq':>22} {'ratio':>7}  target")
    for r in rows:
        if r["row"] == "control":
            bus = f"p50 {r['bus_p50_us']:.0f} p99 {r['bus_p99_us']:.0f} us"
            raw = f"p50 {r['raw_p50_us']:.0f} p99 {r['raw_p99_us']:.0f} us"
        else:
            bus, raw = f"{r['bus_gbps']:.2f} GB/s", f"{r['raw_gbps']:.2f} GB/s"
        print(f"{r['row']:<12} {bus:>22} {raw:>22} {r['ratio']:>7.2f}  {r['target']}")
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    run_bus_bench()
