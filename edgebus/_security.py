"""Transport security and frame freshness.

* :class:`ReplayWindow` — per (sender, socket) sliding window over 64-bit sequence numbers plus a clock-skew
  bound. A frame is accepted once; a frame older than the window or outside the skew is rejected with
  :class:`ReplayError`. Senders start their counters at the current time in microseconds, so a restarted
  sender continues above its previous numbers. Limitation: a *receiver* restart forgets its windows, so a
  frame recorded less than ``max_skew_s`` ago could be replayed once to a freshly restarted node.
* :class:`ZapAuthenticator` — CURVE client allowlist on a ZAP handler whose task this object owns:
  ``aclose()`` cancels *and awaits* it (pyzmq's ``AsyncioAuthenticator.stop()`` only cancels).
* :func:`curve_server` / :func:`curve_client` — socket options for CurveZMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Any, Final

import zmq
import zmq.asyncio
from zmq.auth.base import Authenticator

from ._errors import ReplayError
from ._tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: HMAC key used when insecure mode is asked for by name and no key is given: catches accidents only.
INSECURE_HMAC_KEY: Final = b"edgebus-insecure-mode-known-key!"
ZAP_DOMAIN: Final = "edgebus"


class ReplayWindow:
    """Accept each (sender, channel, seq) once, within ``size`` of the highest seen and ``max_skew_s``.

    At most ``max_streams`` (sender, channel) pairs are remembered. A forgotten pair's frames are not
    forgotten with it: the window keeps the latest send time of every pair it dropped (capped at the local
    clock when dropped) and refuses a frame of a pair it does not know that was sent no later than that. So
    a peer that floods the window with invented sender names cannot replay another sender's recorded
    frames; the price is that, for a while after a drop, a new pair whose clock runs behind the dropped
    pairs' is refused until its clock passes that time.
    """

    def __init__(self, *, size: int = 4096, max_skew_s: float = 300.0, max_streams: int = 4096) -> None:
        if size < 1 or max_streams < 1 or max_skew_s <= 0:
            raise ValueError("size, max_streams and max_skew_s must be positive")
        self._size = size
        self._max_skew_s = max_skew_s
        self._max_streams = max_streams
        self._mask = (1 << size) - 1
        # (sender, channel) -> (highest seq, bitmap: bit i set = highest - i seen, latest send time)
        self._streams: OrderedDict[tuple[str, int], tuple[int, int, float]] = OrderedDict()
        self._forgotten_until = float("-inf")  # frames of unknown pairs must be sent after this

    def check(self, sender: str, channel: int, seq: int, sent_at: float, now: float) -> None:
        """Record the frame or raise :class:`ReplayError`."""
        if abs(now - sent_at) > self._max_skew_s:
            raise ReplayError(f"timestamp {sent_at - now:+.1f} s from local clock")
        key = (sender, channel)
        state = self._streams.get(key)
        if state is None:
            if sent_at <= self._forgotten_until:
                raise ReplayError("sent before this window dropped streams it no longer remembers")
            if len(self._streams) >= self._max_streams:
                _, (_, _, latest) = self._streams.popitem(last=False)
                self._forgotten_until = max(self._forgotten_until, min(latest, now))
            self._streams[key] = (seq, 1, sent_at)
            return
        highest, bitmap, latest = state
        latest = max(latest, sent_at)
        if seq > highest:
            shift = seq - highest
            bitmap = ((bitmap << shift) | 1) & self._mask if shift < self._size else 1
            self._streams[key] = (seq, bitmap, latest)
        else:
            offset = highest - seq
            if offset >= self._size:
                raise ReplayError(f"seq {seq} older than the window")
            if bitmap >> offset & 1:
                raise ReplayError(f"seq {seq} seen before")
            self._streams[key] = (highest, bitmap | (1 << offset), latest)
        self._streams.move_to_end(key)


def curve_server(sock: zmq.Socket[Any], secret_key: bytes) -> None:
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    sock.curve_secretkey = secret_key
    sock.curve_server = True


def curve_client(sock: zmq.Socket[Any], public_key: bytes, secret_key: bytes, server_key: bytes) -> None:
    sock.curve_publickey = public_key
    sock.curve_secretkey = secret_key
    sock.curve_serverkey = server_key


class _Allowlist:
    """pyzmq credentials provider: allow exactly the configured z85 public keys."""

    def __init__(self, allowed: frozenset[bytes]) -> None:
        self._allowed = allowed
        self.denied = 0

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self._allowed
        if not ok:
            self.denied += 1
            log.warning("CURVE client key %s refused", key[:8].decode(errors="replace"))
        return ok


class ZapAuthenticator(Authenticator):
    """A ZAP handler for one context whose polling task is owned and awaited on close."""

    def __init__(self, context: zmq.asyncio.Context, allowed: frozenset[bytes]) -> None:
        super().__init__(context, log=logging.getLogger("edgebus.zap"))
        self._provider = _Allowlist(allowed)
        self._task: asyncio.Task[None] | None = None

    @property
    def denied(self) -> int:
        """How many CURVE handshakes were refused."""
        return self._provider.denied

    def start(self) -> None:
        super().start()
        self.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self._provider)
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="edgebus-zap")

    async def _serve(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self.zap_socket, zmq.POLLIN)
        try:
            while True:
                await poller.poll()
                # The ZAP socket is a plain (blocking) REP; poll said a request is waiting.
                with contextlib.suppress(zmq.Again):
                    msg = self.zap_socket.recv_multipart(zmq.NOBLOCK)
                    await self.handle_zap_message(msg)
        finally:
            poller.unregister(self.zap_socket)

    async def aclose(self) -> None:
        """Cancel the handler task, await it, then close the ZAP socket. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            try:
                await cancel_and_wait(task)
            finally:
                self.stop()
