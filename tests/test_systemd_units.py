"""The systemd unit: ``systemd-analyze verify`` clean, ``security`` exposure <= 2.0, and the notify protocol.

How verify checks the real unit text: ``systemd-analyze verify`` fails when an ``ExecStart=`` binary does not
exist, and ``/opt/edgebus/.venv/bin/edgebus`` does not exist on a dev or CI box. Instead of editing the unit,
the test builds a throwaway root directory holding the unit *unchanged* in ``etc/systemd/system``, a copy of
the host's ``/usr/lib/systemd/system`` (the targets the unit is ordered against) and an executable stub at
``opt/edgebus/.venv/bin/edgebus``, then runs ``systemd-analyze verify --root=...``: every path in the unit is
resolved inside that root, so all of the text is checked. A control run without the stub must fail, which
shows the path really is checked. verify exits 0 even on "Failed to parse ..., ignoring" warnings, hence the
empty-stderr assertion.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from edgebus._sdnotify import Notifier, WatchdogPinger

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edgebus-node@.service"
EXEC = Path("opt/edgebus/.venv/bin/edgebus")
HOST_UNITS = next(
    (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None
)
# The node's default drain timeout (seconds) that TimeoutStopSec must cover, with persistence after it.
DRAIN_TIMEOUT_S = 20
MAX_EXPOSURE = 2.0

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit_settings() -> dict[str, list[str]]:
    """``Key -> [values]`` over all sections (systemd allows repeated keys, so configparser does not fit)."""
    settings: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def seconds(value: str) -> float:
    """A plain systemd time span: ``30``, ``30s``, ``2min``, ``1min 30s``."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    if HOST_UNITS is None:
        pytest.fail("systemd-analyze is installed but no system unit directory was found")
    root = tmp_path / "root"
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy2(UNIT, root / "etc/systemd/system" / UNIT.name)
    stub = root / EXEC
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False)


@needs_systemd_analyze
def test_verify_is_clean_on_the_unchanged_unit(unit_root: Path) -> None:
    installed = (unit_root / "etc/systemd/system" / UNIT.name).read_text()
    assert installed == UNIT.read_text()
    done = analyze("verify", f"--root={unit_root}", "--man=no", "edgebus-node@reader.service")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@needs_systemd_analyze
def test_verify_control_fails_without_the_executable(unit_root: Path) -> None:
    (unit_root / EXEC).unlink()
    done = analyze("verify", f"--root={unit_root}", "--man=no", "edgebus-node@reader.service")
    assert done.returncode != 0
    assert str(Path("/") / EXEC) in done.stderr


@needs_systemd_analyze
def test_security_exposure_is_at_most_two() -> None:
    done = analyze("security", "--offline=true", str(UNIT))
    assert done.returncode == 0, done.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match is not None, done.stdout[-2000:]
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, done.stdout


def test_unit_declares_what_the_node_relies_on() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == ["/opt/edgebus/.venv/bin/edgebus node --config /etc/edgebus/%i.toml"]
    assert s["Restart"] == ["on-failure"]
    assert s["DynamicUser"] == ["yes"]
    assert s["StateDirectory"] == ["edgebus/%i"]
    assert s["CacheDirectory"] == ["edgebus"]
    assert "EDGEBUS_HOME=%C/edgebus" in s["Environment"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert s["CapabilityBoundingSet"] == [""]
    assert seconds(s["TimeoutStopSec"][0]) > DRAIN_TIMEOUT_S
    assert seconds(s["WatchdogSec"][0]) >= 10  # the pinger runs at half of it
    assert "MemoryMax" in s
    # psutil reads /proc/meminfo to size the card store; ProcSubset=pid would hide it.
    assert "ProcSubset" not in s


# ---------------------------------------------------------------- the notify protocol, as systemd sees it


def manager_socket(kind: str, tmp_path: Path) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        address = str(tmp_path / "notify")
        sock.bind(address)
        return sock, address
    name = f"edgebus-units-{secrets.token_hex(6)}"
    sock.bind("\0" + name)
    return sock, "@" + name


@pytest.mark.parametrize("kind", ["path", "abstract"])
async def test_ready_watchdog_stopping_sequence(kind: str, tmp_path: Path) -> None:
    """What a node does under ``Type=notify`` + ``WatchdogSec=``, received on a socket the test owns.

    The watchdog is scaled down (the unit's 30 s become 0.2 s) so the test sees several pings.
    """
    sock, address = manager_socket(kind, tmp_path)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
        with Notifier(env) as notifier:
            assert notifier.watchdog_interval_s == pytest.approx(0.2)
            async with WatchdogPinger(notifier) as pinger:
                notifier.ready("serving")
                await asyncio.sleep(0.35)
            notifier.stopping("draining")
        received = []
        while True:
            try:
                received.append((await asyncio.wait_for(loop.sock_recv(sock, 4096), 0.2)).decode())
            except TimeoutError:
                break
    finally:
        sock.close()
    assert "READY=1\nSTATUS=serving" in received
    assert received[-1] == "STOPPING=1\nSTATUS=draining"
    pings = [m for m in received if m == "WATCHDOG=1"]
    assert len(pings) == pinger.pings >= 3  # at 0, 0.1, 0.2, 0.3 s on an idle loop


def test_pinger_interval_from_the_units_watchdog() -> None:
    watchdog_s = seconds(unit_settings()["WatchdogSec"][0])
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": str(int(watchdog_s * 1_000_000))}
    assert WatchdogPinger(Notifier(env)).interval_s == pytest.approx(watchdog_s / 2)
