"""sd_notify: datagrams on a socket the test owns, environment parsing, the asyncio watchdog pinger."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgebus._errors import ClosedError, ConfigError
from edgebus._sdnotify import Notifier, WatchdogPinger


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd, and the NOTIFY_SOCKET value that names it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield sock, str(path)
    sock.close()


def drain(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``, without blocking."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return messages


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.sent == 0


def test_messages_arrive_as_one_datagram_each(manager: tuple[socket.socket, str]) -> None:
    sock, address = manager
    with Notifier({"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.ready("serving 2 peers") is True
        assert notifier.status("draining\nwith a second line") is True
        assert notifier.watchdog() is True
        assert notifier.stopping() is True
        assert notifier.sent == 4
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 peers"
    assert sock.recv(4096) == b"STATUS=draining with a second line"
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_namespace_address() -> None:
    name = f"edgebus-test-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        with Notifier({"NOTIFY_SOCKET": "@" + name}) as notifier:
            assert notifier.ready() is True
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_a_failed_send_is_counted_not_raised(tmp_path: Path) -> None:
    with Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}) as notifier:
        assert notifier.ready() is False
        assert notifier.failed == 1


def test_lines_with_newlines_or_without_a_key_are_refused(manager: tuple[socket.socket, str]) -> None:
    _, address = manager
    with Notifier({"NOTIFY_SOCKET": address}) as notifier:
        with pytest.raises(ValueError):
            notifier.notify("READY=1\nSTOPPING=1")
        with pytest.raises(ValueError):
            notifier.notify("READY")


def test_notify_after_close_is_a_closed_error(manager: tuple[socket.socket, str]) -> None:
    _, address = manager
    notifier = Notifier({"NOTIFY_SOCKET": address})
    notifier.close()
    notifier.close()
    with pytest.raises(ClosedError):
        notifier.ready()


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({}, None),
    ],
)
def test_watchdog_interval_from_the_environment(env: dict[str, str], interval: float | None) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "/run/systemd/notify", **env})
    assert notifier.watchdog_interval_s == interval


def test_the_environment_is_read_once_at_construction(
    manager: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = manager
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notifier.ready() is True
    assert sock.recv(4096) == b"READY=1"
    notifier.close()


@pytest.mark.parametrize(
    "env",
    [
        {"NOTIFY_SOCKET": "relative/path"},
        {"NOTIFY_SOCKET": "@"},
        {"NOTIFY_SOCKET": "/" + "x" * 200},
        {"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "soon"},
        {"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "0"},
        {"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "10", "WATCHDOG_PID": "me"},
    ],
)
def test_malformed_environment_is_a_config_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Notifier(env)


# ---------------------------------------------------------------- the asyncio pinger


async def test_pinger_pings_at_half_the_interval_and_stops_on_exit(
    manager: tuple[socket.socket, str],
) -> None:
    sock, address = manager
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"})  # 0.1 s
    async with WatchdogPinger(notifier) as pinger:
        assert pinger.interval_s == pytest.approx(0.05)
        assert pinger.active
        await asyncio.sleep(0.32)
    assert not pinger.active
    pings = drain(sock)
    # A ping at start and one every 50 ms: 7 in 320 ms on an idle loop; a loaded CI box may lose a few.
    assert 4 <= len(pings) <= 8
    assert set(pings) == {"WATCHDOG=1"}
    assert pinger.pings == len(pings)
    await asyncio.sleep(0.12)
    assert drain(sock) == []  # nothing after the block ended
    notifier.close()


async def test_an_unhealthy_node_stops_pinging(manager: tuple[socket.socket, str]) -> None:
    sock, address = manager
    healthy = True

    def check() -> bool:
        return healthy

    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "40000"})
    async with WatchdogPinger(notifier, healthy=check) as pinger:
        await asyncio.sleep(0.05)
        healthy = False
        before = pinger.pings
        await asyncio.sleep(0.1)
        assert pinger.pings == before
        assert pinger.skipped >= 2
    assert pinger.pings >= 1
    notifier.close()
    drain(sock)


async def test_a_crashing_health_check_counts_as_unhealthy(
    manager: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, address = manager

    def broken() -> bool:
        raise RuntimeError("probe exploded")

    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "40000"})
    async with WatchdogPinger(notifier, healthy=broken) as pinger:
        await asyncio.sleep(0.05)
    assert pinger.pings == 0
    assert pinger.skipped >= 1
    assert "probe exploded" in caplog.text
    notifier.close()


async def test_pinger_without_a_watchdog_starts_no_task() -> None:
    async with WatchdogPinger(Notifier({})) as pinger:
        assert not pinger.active
        assert pinger.interval_s is None


async def test_pinger_is_entered_once_and_closes_idempotently(manager: tuple[socket.socket, str]) -> None:
    _, address = manager
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
    pinger = WatchdogPinger(notifier)
    async with pinger:
        pass
    await pinger.aclose()
    with pytest.raises(ClosedError):
        async with pinger:
            pass
    notifier.close()


async def test_cancelling_the_owner_stops_the_pinger(manager: tuple[socket.socket, str]) -> None:
    _, address = manager
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
    entered = asyncio.Event()
    pinger = WatchdogPinger(notifier)

    async def owner() -> None:
        async with pinger:
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(owner())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not pinger.active
    notifier.close()


def test_bad_interval_is_refused() -> None:
    with pytest.raises(ValueError):
        WatchdogPinger(Notifier({}), interval_s=0)
