"""Replay window, key files, fail-closed start, the owned ZAP task, and error translation at the boundary."""

from __future__ import annotations

import asyncio
import inspect
import stat
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.asyncio

from edgebus import (
    Bus,
    BusConfig,
    ConfigError,
    FrameError,
    InsecureRefused,
    ReplayError,
    TransportError,
    load_hmac_key,
    load_keypair,
    new_hmac_key,
    new_keypair,
)
from edgebus._boundary import MSGPACK_DECODE_ERRORS, unpack_untrusted, zmq_errors
from edgebus._security import ReplayWindow, ZapAuthenticator


def test_replay_window_accepts_once_and_tolerates_reordering() -> None:
    w = ReplayWindow(size=8, max_skew_s=10)
    for seq in (100, 102, 101, 105):
        w.check("a", 0, seq, 0.0, 0.0)
    for seq in (100, 105):
        with pytest.raises(ReplayError):
            w.check("a", 0, seq, 0.0, 0.0)
    w.check("a", 0, 103, 0.0, 0.0)  # late but inside the window
    w.check("a", 1, 100, 0.0, 0.0)  # another channel has its own numbers
    w.check("b", 0, 100, 0.0, 0.0)
    w.check("a", 0, 200, 0.0, 0.0)
    with pytest.raises(ReplayError):
        w.check("a", 0, 150, 0.0, 0.0)  # older than the window
    with pytest.raises(ReplayError):
        w.check("a", 0, 201, 11.0, 0.0)  # clock skew


def test_flooding_the_window_with_new_senders_does_not_reopen_a_replay() -> None:
    w = ReplayWindow(size=8, max_skew_s=300, max_streams=4)
    w.check("victim", 0, 1000, 50.0, 50.0)  # recorded by an attacker
    for i in range(10):  # invented names push the victim out of the window
        w.check(f"fake-{i}", 0, 1, 60.0 + i, 60.0 + i)
    with pytest.raises(ReplayError):
        w.check("victim", 0, 1000, 50.0, 80.0)  # the recorded frame, replayed
    w.check("victim", 0, 1001, 80.0, 80.0)  # the victim's next frame is sent after the drop: accepted
    # A forgotten sender's clock ahead of ours does not hold new senders off beyond our own clock.
    w2 = ReplayWindow(size=8, max_skew_s=300, max_streams=1)
    w2.check("ahead", 0, 1, 250.0, 10.0)
    w2.check("b", 0, 1, 11.0, 11.0)  # drops "ahead": forgotten until min(250, 11)
    w2.check("c", 0, 1, 12.0, 12.0)


def test_keypair_files(tmp_path: Path) -> None:
    public, secret = new_keypair("node-1", tmp_path)
    assert public.name == "node-1.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub, sec = load_keypair(secret)
    assert len(pub) == 40
    assert len(sec) == 40
    with pytest.raises(ConfigError):
        new_keypair("node-1", tmp_path)
    with pytest.raises(ConfigError):
        new_keypair("../evil", tmp_path)
    key_file = new_hmac_key(tmp_path / "hmac.key")
    assert len(load_hmac_key(key_file)) == 32
    with pytest.raises(ConfigError):
        new_hmac_key(key_file)
    (tmp_path / "bad.key").write_text("zz")
    with pytest.raises(ConfigError):
        load_hmac_key(tmp_path / "bad.key")


async def test_no_keys_means_refuse_to_start(tmp_path: Path) -> None:
    bus = Bus(BusConfig(node_id="a", spool_dir=tmp_path))
    with pytest.raises(InsecureRefused):
        await bus.open()
    async with Bus(BusConfig(node_id="a", spool_dir=tmp_path, insecure=True)) as ok:
        assert ok.endpoints.control.startswith("tcp://127.0.0.1:")


async def test_zap_authenticator_task_is_awaited_on_close() -> None:
    ctx = zmq.asyncio.Context()
    try:
        auth = ZapAuthenticator(ctx, frozenset())
        auth.start()
        task = auth._task
        assert task is not None
        await asyncio.sleep(0)
        assert not task.done()
        await auth.aclose()
        assert task.done()
        await auth.aclose()  # idempotent
        assert auth.zap_socket is None
    finally:
        ctx.term()


def test_every_zmq_error_becomes_transport_error() -> None:
    errors = [
        cls for _, cls in inspect.getmembers(zmq.error, inspect.isclass) if issubclass(cls, zmq.ZMQError)
    ]
    assert zmq.Again in errors
    for cls in errors:
        exc = cls(zmq.EAGAIN) if cls is not zmq.ZMQError else cls(zmq.EINVAL)
        with pytest.raises(TransportError) as info, zmq_errors("test"):
            raise exc
        assert info.value.__cause__ is exc


def test_every_msgpack_error_becomes_frame_error() -> None:
    msgpack_errors = [
        cls
        for _, cls in inspect.getmembers(msgpack.exceptions, inspect.isclass)
        if issubclass(cls, Exception) and cls.__module__.startswith("msgpack")
    ]
    for cls in msgpack_errors:
        assert issubclass(cls, MSGPACK_DECODE_ERRORS), cls
    samples = [
        b"\xc1",
        b"\x92\x01",
        b"\x81\x01\x02",
        b"\x01\x02",
        b"\xdd\xff\xff\xff\xff",
        b"\x91" * 5000,
        b"",
    ]
    for data in samples:
        with pytest.raises(FrameError):
            unpack_untrusted(data, max_bytes=1 << 20)
    with pytest.raises(FrameError):
        unpack_untrusted(b"\x00" * 100, max_bytes=10)
