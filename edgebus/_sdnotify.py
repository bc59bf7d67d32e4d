"""systemd readiness and watchdog notifications (the ``sd_notify`` protocol), without libsystemd.

Protocol: one AF_UNIX datagram per message to the socket named by ``$NOTIFY_SOCKET`` (an absolute path, or a
leading ``@`` for the abstract namespace), holding newline-separated ``KEY=value`` lines: ``READY=1``,
``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``. With ``WatchdogSec=`` set, systemd passes the interval in
``$WATCHDOG_USEC`` (and the pid meant to ping in ``$WATCHDOG_PID``) and kills the service when no
``WATCHDOG=1`` arrives in time.

Contract:

* The environment is read once, when a :class:`Notifier` is built (tests pass a mapping). Without
  ``NOTIFY_SOCKET`` every call is a no-op returning ``False``; a malformed variable is a
  :class:`~edgebus._errors.ConfigError` at construction, not a surprise later.
* Sending never blocks, and a failed delivery never raises: it is logged, counted (``failed``) and reported
  by the ``False`` return, because a notification that cannot be delivered is not a reason to stop serving.
  Misuse does raise: a malformed line (``ValueError``), a closed notifier (``ClosedError``).
* :class:`WatchdogPinger` pings from the event loop itself at half the interval, so a wedged loop stops the
  pings and systemd restarts the node. It is owned with ``async with``; leaving the block cancels the task
  and awaits it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from types import TracebackType

from ._errors import ClosedError, ConfigError
from ._tasks import cancel_and_wait

__all__ = ["Notifier", "WatchdogPinger"]

log = logging.getLogger("edgebus.sdnotify")

# sockaddr_un.sun_path is 108 bytes including the terminating NUL of a path name.
_MAX_SOCKET_PATH = 107


def _parse_socket(value: str | None) -> str | None:
    """The address to ``sendto``: a path, or ``"\\0name"`` for an abstract name; ``None`` when unset."""
    if not value:
        return None
    if value.startswith("@"):
        address = "\0" + value[1:]
    elif value.startswith("/"):
        address = value
    else:
        raise ConfigError(f"NOTIFY_SOCKET must be an absolute path or start with '@', got {value!r}")
    if len(value) < 2 or len(address.encode()) > _MAX_SOCKET_PATH:
        raise ConfigError(f"NOTIFY_SOCKET has an unusable length ({len(value)}): {value!r}")
    return address


def _parse_watchdog(env: Mapping[str, str], pid: int) -> float | None:
    """The watchdog interval in seconds, or ``None`` when no watchdog applies to ``pid``."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    if not usec.isdigit() or int(usec) == 0:
        raise ConfigError(f"WATCHDOG_USEC must be a positive integer, got {usec!r}")
    target = env.get("WATCHDOG_PID")
    if target:
        if not target.isdigit():
            raise ConfigError(f"WATCHDOG_PID must be a pid, got {target!r}")
        if int(target) != pid:
            # The watchdog belongs to another process (we are a child of the main one).
            return None
    return int(usec) / 1e6


class Notifier:
    """Sends ``sd_notify`` messages to the service manager. Thread-safe; see the module docstring."""

    def __init__(self, env: Mapping[str, str] | None = None, *, pid: int | None = None) -> None:
        source = os.environ if env is None else env
        self._address = _parse_socket(source.get("NOTIFY_SOCKET"))
        self._watchdog_s = _parse_watchdog(source, os.getpid() if pid is None else pid)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._closed = False
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        """True when a service manager is listening (``NOTIFY_SOCKET`` was set)."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """The interval systemd expects pings within, or ``None`` when no watchdog is asked of us."""
        return self._watchdog_s if self.enabled else None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines as one datagram. True when the datagram was sent."""
        if self._address is None:
            return False
        for line in lines:
            if "\n" in line or "=" not in line:
                raise ValueError(f"an sd_notify line is one KEY=value without newlines, got {line!r}")
        payload = "\n".join(lines).encode()
        with self._lock:
            if self._closed:
                raise ClosedError("notifier is closed")
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # A busy manager must not stall the event loop: drop the datagram instead.
                    self._sock.setblocking(False)
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                self.failed += 1
                log.warning("sd_notify %r failed: %s", lines, exc)
                return False
            self.sent += 1
            return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *self._status_line(status))

    def status(self, text: str) -> bool:
        return self.notify(*self._status_line(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *self._status_line(status))

    @staticmethod
    def _status_line(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        # STATUS is one line; a newline would start a bogus assignment.
        return ("STATUS=" + " ".join(text.splitlines()),)

    def close(self) -> None:
        """Close the socket. Idempotent."""
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class WatchdogPinger:
    """Pings the systemd watchdog from the running event loop at ``interval_s``.

    ``interval_s`` defaults to half of the notifier's watchdog interval; with no watchdog configured the
    pinger starts no task. ``healthy``, when given, is asked before each ping: returning False skips that
    ping (counted in ``skipped``), so systemd restarts a node that knows it is stuck.
    """

    def __init__(
        self,
        notifier: Notifier,
        *,
        interval_s: float | None = None,
        healthy: Callable[[], bool] | None = None,
    ) -> None:
        if interval_s is None and notifier.watchdog_interval_s is not None:
            interval_s = notifier.watchdog_interval_s / 2
        if interval_s is not None and not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self._notifier = notifier
        self._interval_s = interval_s
        self._healthy = healthy
        self._task: asyncio.Task[None] | None = None
        self._state = "unopened"
        self.pings = 0
        self.skipped = 0

    @property
    def interval_s(self) -> float | None:
        return self._interval_s

    @property
    def active(self) -> bool:
        """True while the ping task runs."""
        return self._task is not None and not self._task.done()

    async def __aenter__(self) -> WatchdogPinger:
        if self._state != "unopened":
            raise ClosedError(f"a WatchdogPinger is entered once (state: {self._state})")
        self._state = "opened"
        if self._interval_s is not None and self._notifier.enabled:
            self._task = asyncio.create_task(self._run(self._interval_s), name="edgebus-watchdog")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel the ping task and wait for it. Idempotent."""
        self._state = "closed"
        task, self._task = self._task, None
        if task is None:
            return
        await cancel_and_wait(task)

    def _is_healthy(self) -> bool:
        if self._healthy is None:
            return True
        try:
            return self._healthy()
        except Exception:
            # A health check that crashes says the node is not healthy; the traceback is what to fix.
            log.exception("watchdog health check raised")
            return False

    async def _run(self, interval_s: float) -> None:
        while True:
            if self._is_healthy():
                self._notifier.watchdog()
                self.pings += 1
            else:
                self.skipped += 1
                log.warning("watchdog ping skipped: node reports itself unhealthy")
            await asyncio.sleep(interval_s)
