"""Real processes, real sockets: crash-resume, late joiners, a stalled client, an unknown CURVE key."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edgebus import Bus, BusConfig, PeerAddress, PeerGone, RequestTimeout, load_public_key
from tests.edgebus.peer_main import card_bytes, keys_for, make_keys

ROOT = Path(__file__).resolve().parents[2]


class Peer:
    """A ``peer_main`` subprocess whose stdout is a stream of JSON events."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, *args: str) -> Peer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.edgebus.peer_main", *args,
            cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        return cls(proc)

    async def event(self, key: str, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The next event holding ``key`` (others are skipped)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"peer exited (rc={await self.proc.wait()}) before a {key!r} event")
                event: dict[str, Any] = json.loads(line)
                if key in event:
                    return event

    async def stop(self) -> int:
        if self.proc.returncode is None and self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(10):
                return await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


@contextlib.asynccontextmanager
async def peer(*args: str) -> AsyncIterator[Peer]:
    p = await Peer.start(*args)
    try:
        yield p
    finally:
        if p.proc.returncode is None:
            await p.stop()


@pytest.mark.slow
async def test_receiver_killed_midway_resumes_and_delivers_once(tmp_path: Path) -> None:
    mib = 64
    async with peer("serve", "--name", "srv", "--spool", str(tmp_path / "s"), "--mib", str(mib)) as server:
        ready = await server.event("ready", timeout=60)
        want = hashlib.sha256(card_bytes(1, mib)).hexdigest()
        spool = str(tmp_path / "r")
        common = ("--name", "rcv", "--spool", spool, "--connect", ready["control"])
        # Rate-limited to 32 MiB/s so "about half way" is a wide, reliable target.
        first = await Peer.start("fetch", *common, "--rate-mib", "32")
        while (await first.event("progress"))["progress"] < mib // 2:
            pass
        first.proc.send_signal(signal.SIGKILL)
        assert await first.proc.wait() == -signal.SIGKILL
        parts = list(Path(spool).glob("*.log"))  # noqa: ASYNC240 - a tiny directory listing
        assert parts, "the killed receiver left no spooled chunks"
        verified_before = parts[0].stat().st_size // 36
        assert 0 < verified_before < mib

        async with peer("fetch", *common) as second:
            delivered = await second.event("delivered", timeout=60)
        assert delivered["sha256"] == want
        # Resumed: the second run pulled only what the first had not verified (plus at most the credit).
        assert delivered["chunks"] <= mib - verified_before + 8

        async with peer("fetch", *common) as third:
            again = await third.event("already", timeout=30)
        assert again["already"] == ready["cards"][0]


@pytest.mark.slow
async def test_late_joiner_gets_card_published_before_it_started(tmp_path: Path) -> None:
    async with peer(
        "serve", "--name", "srv", "--spool", str(tmp_path / "s"), "--mib", "2", "--cards", "3"
    ) as srv:
        ready = await srv.event("ready", timeout=60)
        args = (
            "--name",
            "late",
            "--spool",
            str(tmp_path / "r"),
            "--connect",
            ready["control"],
            "--expect",
            "3",
        )
        async with peer("fetch", *args) as late:
            got = {(await late.event("delivered"))["sha256"] for _ in range(3)}
    assert got == {hashlib.sha256(card_bytes(1 + i, 2)).hexdigest() for i in range(3)}


@pytest.mark.slow
async def test_stalled_client_keeps_sender_rss_within_budget(tmp_path: Path) -> None:
    mib, cards, send_buffer_mib = 16, 4, 8
    args = ("--name", "srv", "--spool", str(tmp_path / "s"), "--mib", str(mib), "--cards", str(cards))
    async with peer("serve", *args, "--send-buffer-mib", str(send_buffer_mib)) as server:
        ready = await server.event("ready", timeout=60)
        baseline = ready["rss"]  # cards are already held: what remains is queueing
        stall_args = ["--name", "staller", "--spool", str(tmp_path / "x"), "--connect", ready["control"]]
        for card_id in ready["cards"]:
            stall_args += ["--card", card_id]
        async with peer("stall", *stall_args, "--mib", str(mib)) as staller:
            await staller.event("stalling")
            peak = 0
            for _ in range(15):  # about 3 s of hostile requests, sampled by the server itself
                ev = await server.event("rss")
                peak = max(peak, ev["rss"])
            assert ev["dropped"] > 0, "the server never hit its queue limit: the test did not stall it"
    # Zero-copy chunks reference held cards, so queueing adds little; allow the send budget plus slack.
    budget = (send_buffer_mib + 32) << 20
    assert peak - baseline < budget, f"RSS grew {(peak - baseline) >> 20} MiB over {budget >> 20} MiB"


async def test_unknown_curve_key_neither_receives_nor_publishes(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    server_cfg = BusConfig(node_id="server", spool_dir=tmp_path / "s", keys=keys_for(keys, "server"))
    async with Bus(server_cfg) as server:
        await server.publish_card("kv/secret", b"x" * 5000)
        address = PeerAddress(
            endpoint=server.endpoints.control, server_key=load_public_key(keys / "server.key")
        )
        stranger_cfg = BusConfig(
            node_id="stranger", spool_dir=tmp_path / "x", keys=keys_for(keys, "stranger"),
            connect=(address,), heartbeat_s=0.1, peer_timeout_s=0.5,
        )  # fmt: skip
        async with Bus(stranger_cfg) as stranger:
            await stranger.publish_card("kv/evil", b"y" * 5000)
            with pytest.raises(RequestTimeout):
                await stranger.wait_for_peer("server", timeout=2.0)
            with pytest.raises(PeerGone):
                await stranger.request("server", {"hello": 1})
            assert stranger.known_cards() == []
            assert server.peers() == []
            assert server.stats().curve_denied > 0
            assert server.stats().frames_in == 0
        # The allowed client, same server, same moment: works (so the refusal above is the key's doing).
        client_cfg = BusConfig(
            node_id="client", spool_dir=tmp_path / "c", keys=keys_for(keys, "client"), connect=(address,)
        )
        async with Bus(client_cfg) as client:
            await client.wait_for_peer("server", timeout=10)
            assert [a.topic for a in client.known_cards()] == ["kv/secret"]
