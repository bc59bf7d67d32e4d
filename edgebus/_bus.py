"""The :class:`Bus`: sockets, tasks and the protocol that ties the pure modules together.

Sockets of one bus (a bound node has the first three; each configured peer adds the last three)::

    control ROUTER  (bound)     PING->PONG presence/heartbeat, REQUEST/REPLY both ways
    data    ROUTER  (bound)     FETCH->CHUNK | CHUNK_ERROR, ACK          (big transfers never delay control)
    announce XPUB   (bound)     ANNOUNCE / WITHDRAW / BEACON, XPUB_NODROP; a subscription triggers a BEACON
    control DEALER  (per peer)  connects to the peer's control ROUTER (the configured endpoint)
    data    DEALER  (per peer)  connects to the data endpoint learned from the peer's signed PONG
    SUB             (per peer)  connects to the announce endpoint learned from the PONG

Every socket sends with NOBLOCK; a full queue drops the message and counts it (``send_dropped``) rather than
growing memory, and the protocol recovers: chunk requests expire and are re-sent, announcement gaps are
caught by sequence numbers, heartbeats repeat. Every received frame is decoded by :mod:`edgebus._frame`,
checked by the replay window, and dispatched; any rejection is counted by reason, never raised out of a
receive loop.

Lifecycle: UNOPENED -> OPEN (``__aenter__``/``open()``) -> CLOSED (``aclose()``, idempotent: cancels every
task it owns and awaits them, fails pending requests and transfers with :class:`ClosedError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import zmq
import zmq.asyncio

from . import _digest, _frame
from ._announce import Announcement, AnnouncementStream, Change, PeerCatalog
from ._boundary import pack, unpack_untrusted, zmq_errors
from ._config import BusConfig, PeerAddress, bind_endpoints
from ._errors import (
    AlreadyDelivered,
    BusError,
    ClosedError,
    ConfigError,
    DigestMismatch,
    FrameError,
    InsecureRefused,
    PayloadTooLarge,
    PeerGone,
    RemoteError,
    RequestTimeout,
    StoreError,
    TransferError,
)
from ._frame import Codec, Header, Kind
from ._holder import CardHolder, HeldCard
from ._link import LinkEstimate, LinkEstimator, TokenBucket
from ._security import INSECURE_HMAC_KEY, ReplayWindow, ZapAuthenticator, curve_client, curve_server
from ._spool import PartialCard, Spool
from ._stats import BusStats, Counters
from ._transfer import CardManifest, ChunkPuller, chunk_digests, chunk_view, default_card_id, list_digest

log = logging.getLogger("edgebus")

#: Largest announcement payload (card id, sizes, topic, meta).
MAX_ANNOUNCE_BYTES: Final = 64 * 1024
#: Largest FETCH/ACK payload the data ROUTER accepts.
MAX_DATA_CONTROL_BYTES: Final = 4096
#: Chunks between two bandwidth samples of the link estimator.
CHUNKS_PER_SAMPLE: Final = 8
# A chunk that fails its digest this many times is not a transmission error: the sender serves bad bytes
# (a buffer changed after publishing, a broken or hostile peer), and asking again would loop for ever.
CHUNK_ATTEMPTS: Final = 3
#: Added to every socket's ZMQ_MAXMSGSIZE over the largest payload it accepts: CURVE wraps each message part
#: in about 33 bytes of its own, and libzmq drops (for good) a connection whose wire frame exceeds the
#: limit. The frame codec still enforces the exact payload limits.
WIRE_SLACK_BYTES: Final = 4096
#: Worker threads that hash and spool received chunks (BLAKE3 and pwrite release the GIL).
SPOOL_WORKERS: Final = 2
#: libzmq I/O threads per bus, and which one serves a socket's connections (ZMQ_AFFINITY bit masks): card
#: chunks (data ROUTER/DEALER) on one, control, presence and announcements on the other. With one shared
#: I/O thread a request sent during a 64 MiB loopback pull waits behind chunk I/O at both ends: round-trip
#: p50 1.0-3.8 ms (median 2.8, 8 runs) against 1.1-2.0 ms (median 1.5, 7 runs) with two, interleaved in
#: one session; card throughput the same. The p99 (6-15 ms) is CPU contention and did not change.
IO_THREADS: Final = 2
BULK_AFFINITY: Final = 1 << 0
CONTROL_AFFINITY: Final = 1 << 1

TOPIC_CONTROL: Final = b"ctl"
TOPIC_DATA: Final = b"dat"
TOPIC_ANNOUNCE: Final = b"ann"

RequestHandler = Callable[[str, dict[str, Any]], Awaitable[Mapping[str, Any]]]


class BusState(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class _Channel(enum.IntEnum):
    """The receiving socket: the replay window is kept per (sender, channel)."""

    CONTROL_ROUTER = 0
    CONTROL_DEALER = 1
    DATA_ROUTER = 2
    DATA_DEALER = 3
    SUB = 4


@dataclass(frozen=True, slots=True)
class BusEndpoints:
    """Actual bound addresses (ports resolved when 0 was asked for); give ``control`` to peers."""

    control: str
    data: str
    announce: str


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A live peer: its node id, roles, the ``info`` dict it last announced, seconds since heard from."""

    node_id: str
    roles: tuple[str, ...]
    info: Mapping[str, Any]
    age_s: float


class _Outbound:
    """Our connection to one configured peer."""

    def __init__(self, address: PeerAddress, ctl: zmq.asyncio.Socket) -> None:
        self.address = address
        self.ctl = ctl
        self.data: zmq.asyncio.Socket | None = None
        self.sub: zmq.asyncio.Socket | None = None
        self.endpoints: tuple[str, str] | None = None
        self.node_id: str | None = None
        self.roles: tuple[str, ...] = ()
        self.info: Mapping[str, Any] = MappingProxyType({})
        self.last_heard = 0.0
        self.live = False
        self.catalog = PeerCatalog()
        #: The peer's per-receiver data queue in chunks (its PONG's "q"; None from a peer that omits it).
        self.queue_chunks: int | None = None
        self.snapshot_running = False
        self.transfers: dict[str, _Transfer] = {}
        self.tasks: list[asyncio.Task[None]] = []


class _Inbound:
    """A peer that connected to our control ROUTER."""

    def __init__(self, node_id: str, identity: bytes) -> None:
        self.node_id = node_id
        self.identity = identity
        self.roles: tuple[str, ...] = ()
        self.info: Mapping[str, Any] = MappingProxyType({})
        self.last_heard = time.monotonic()


class _Transfer:
    """Receiver-side state of one running fetch.

    The data DEALER loop starts a verify-and-spool job in the worker pool for each wanted chunk as it
    arrives (:meth:`start_job`); job results, sender refusals and bus closure arrive on ``events``, which the
    fetching task drains. Chunk buffers are referenced only until their job finishes, so the receiver holds at
    most ``credit_bytes`` of chunks (plus chunks queued by ZeroMQ) at a time.
    """

    def __init__(self, puller: ChunkPuller, partial: PartialCard, pool: ThreadPoolExecutor) -> None:
        self.puller = puller
        self.partial = partial
        self.events: asyncio.Queue[tuple[str, int, Any, bytes]] = asyncio.Queue()
        self.in_flight: set[int] = set()
        self.jobs: set[asyncio.Future[bool]] = set()
        self._pool = pool

    def start_job(self, index: int, chunk: memoryview, digest: bytes) -> None:
        """Hash and spool ``chunk`` in a worker thread; its outcome arrives as a ``written`` event."""
        self.in_flight.add(index)
        job = asyncio.get_running_loop().run_in_executor(
            self._pool, self.partial.write_verified, index, chunk, digest
        )
        self.jobs.add(job)
        job.add_done_callback(functools.partial(self._report, index=index, digest=digest))

    def close(self) -> None:
        """Close the spool files once no job can write through their descriptors any more.

        Normally every job has finished; after an interrupted wait (a second cancellation) the close waits
        for the stragglers, because a descriptor closed under a running ``pwrite`` could be reused by an
        unrelated file.
        """
        pending = [job for job in self.jobs if not job.done()]
        if not pending:
            self.partial.close()
            return
        waiter = asyncio.gather(*pending, return_exceptions=True)
        waiter.add_done_callback(lambda _: self.partial.close())

    def _report(self, job: asyncio.Future[bool], *, index: int, digest: bytes) -> None:
        self.jobs.discard(job)
        if job.cancelled():
            self.events.put_nowait(("written", index, False, digest))
        elif (exc := job.exception()) is not None:
            self.events.put_nowait(("spool-error", index, exc, digest))
        else:
            self.events.put_nowait(("written", index, job.result(), digest))


def _last_endpoint(sock: zmq.asyncio.Socket) -> str:
    value = sock.getsockopt(zmq.LAST_ENDPOINT)
    return value.decode() if isinstance(value, bytes) else str(value)


def _now() -> float:
    return time.time()


def _str_tuple(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > 32 or not all(isinstance(v, str) for v in value):
        raise FrameError(f"bad {what}")
    return tuple(value)


def _field(header: Header, name: str, kind: type[Any]) -> Any:
    value = header.fields.get(name)
    if type(value) is not kind:
        raise FrameError(f"{header.kind.name}: field {name!r} missing or not {kind.__name__}")
    return value


class Bus:
    """An asyncio ZeroMQ bus node. Use ``async with Bus(config) as bus:``."""

    def __init__(self, config: BusConfig) -> None:
        self.config = config
        self._state = BusState.UNOPENED
        self._closed = asyncio.Event()  # set once aclose has released everything
        self._ctx: zmq.asyncio.Context | None = None
        self._zap: ZapAuthenticator | None = None
        self._hmac_key = INSECURE_HMAC_KEY
        self._counters = Counters()
        self._replay = ReplayWindow(size=config.replay_window, max_skew_s=config.max_clock_skew_s)
        self._seq: dict[str, itertools.count[int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sockets: list[zmq.asyncio.Socket] = []
        self._ctl_router: zmq.asyncio.Socket | None = None
        self._data_router: zmq.asyncio.Socket | None = None
        self._xpub: zmq.asyncio.Socket | None = None
        self._endpoints: BusEndpoints | None = None
        self._outbound: list[_Outbound] = []
        self._inbound: dict[str, _Inbound] = {}
        self._holder = CardHolder(config.held_cards_bytes)
        self._ann_epoch = secrets.randbits(63)
        self._ann_seq = 0
        self._streams: set[AnnouncementStream] = set()
        self._pending: dict[int, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._request_ids = itertools.count(1)
        self._handler: RequestHandler | None = None
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._fetch_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._links: dict[str, LinkEstimator] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._presence: dict[str, Any] = {}
        self._presence_packed = pack({})
        self._changed = asyncio.Event()
        self._hb_wakeup = asyncio.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._spool: Spool | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def state(self) -> BusState:
        return self._state

    async def __aenter__(self) -> Bus:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Bind, connect and start the tasks. Raises :class:`InsecureRefused` without keys or insecure."""
        if self._state is not BusState.UNOPENED:
            raise ClosedError(f"bus is {self._state.value}; open() works once")
        cfg = self.config
        if cfg.keys is None and not cfg.insecure:
            raise InsecureRefused("no CURVE keys configured; pass keys=... or insecure=True by name")
        if cfg.keys is not None:
            self._hmac_key = cfg.keys.hmac_key
        self._state = BusState.OPEN
        try:
            self._spool = Spool(cfg.spool_dir)
            self._pool = ThreadPoolExecutor(
                max_workers=SPOOL_WORKERS, thread_name_prefix=f"edgebus-{cfg.node_id}"
            )
            self._ctx = zmq.asyncio.Context(io_threads=IO_THREADS)
            if cfg.keys is not None:
                self._zap = ZapAuthenticator(self._ctx, cfg.keys.allowed_clients)
                self._zap.start()
            with zmq_errors("bind"):
                if cfg.bind is not None:
                    self._bind(cfg.bind)
                for address in cfg.connect:
                    self._connect(address)
            self._spawn(self._heartbeat_loop(), "heartbeat")
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop everything this bus owns and wait for it. Safe to call twice or from ``__aexit__``."""
        if self._state is BusState.CLOSED:
            await self._closed.wait()  # a second caller returns once the first has released everything
            return
        self._state = BusState.CLOSED
        try:
            tasks = list(self._tasks) + list(self._handler_tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            try:
                self._release()
                if self._zap is not None:
                    await self._zap.aclose()
                if self._pool is not None:
                    pool, self._pool = self._pool, None
                    await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)
                if self._ctx is not None:
                    for sock in self._sockets:
                        sock.close(linger=0)
                    self._ctx.term()
            finally:
                self._closed.set()

    def _release(self) -> None:
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(ClosedError("bus closed"))
        self._pending.clear()
        for stream in self._streams:
            stream.close()
        for link in self._outbound:
            for transfer in link.transfers.values():
                transfer.events.put_nowait(("closed", -1, None, b""))
        self._notify()

    def _check_open(self) -> None:
        if self._state is not BusState.OPEN:
            raise ClosedError(f"bus is {self._state.value}")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"edgebus-{self.config.node_id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._counters.values["task_failures"] += 1
            log.error("edgebus task %s failed", task.get_name(), exc_info=task.exception())

    def _notify(self) -> None:
        """Wake everything waiting for a peer/catalog change."""
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ sockets

    def _socket(
        self,
        kind: int,
        *,
        max_msg: int,
        sndhwm: int = 1000,
        rcvhwm: int = 1000,
        bulk: bool = False,
    ) -> zmq.asyncio.Socket:
        """A socket with the bus's limits and liveness options; ``bulk`` for the card-chunk sockets."""
        assert self._ctx is not None
        cfg = self.config
        sock = self._ctx.socket(kind)
        self._sockets.append(sock)
        sock.setsockopt(zmq.AFFINITY, BULK_AFFINITY if bulk else CONTROL_AFFINITY)
        sock.linger = 0
        sock.sndhwm = sndhwm
        sock.rcvhwm = rcvhwm
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg + WIRE_SLACK_BYTES)
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(cfg.heartbeat_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(cfg.peer_timeout_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, min(int(cfg.peer_timeout_s * 1000), 6_553_500))
        sock.setsockopt(zmq.RECONNECT_IVL, int(cfg.reconnect_s * 1000))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(cfg.reconnect_max_s * 1000))
        return sock

    def _bind(self, bind: str) -> None:
        cfg = self.config
        ctl_ep, data_ep, ann_ep = bind_endpoints(bind)
        ctl = self._socket(zmq.ROUTER, max_msg=max(cfg.max_control_bytes, _frame.MAX_HEADER_BYTES))
        data = self._socket(zmq.ROUTER, max_msg=MAX_DATA_CONTROL_BYTES, sndhwm=cfg.send_hwm_chunks, bulk=True)
        xpub = self._socket(zmq.XPUB, max_msg=1024, sndhwm=cfg.announcement_queue)
        for sock in (ctl, data):
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        xpub.setsockopt(zmq.XPUB_NODROP, 1)
        xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        for sock, endpoint in ((ctl, ctl_ep), (data, data_ep), (xpub, ann_ep)):
            if cfg.keys is not None:
                curve_server(sock, cfg.keys.secret_key)
            sock.bind(endpoint)
        self._ctl_router, self._data_router, self._xpub = ctl, data, xpub
        self._endpoints = BusEndpoints(
            control=_last_endpoint(ctl), data=_last_endpoint(data), announce=_last_endpoint(xpub)
        )
        self._spawn(self._recv_loop(ctl, _Channel.CONTROL_ROUTER, self._on_control_router), "ctl-router")
        self._spawn(self._recv_loop(data, _Channel.DATA_ROUTER, self._on_data_router), "data-router")
        self._spawn(self._xpub_loop(xpub), "xpub")

    def _client_socket(
        self, kind: int, address: PeerAddress, *, bulk: bool = False, **opts: int
    ) -> zmq.asyncio.Socket:
        sock = self._socket(kind, bulk=bulk, **opts)
        keys = self.config.keys
        if keys is not None and address.server_key is not None:
            curve_client(sock, keys.public_key, keys.secret_key, address.server_key)
        return sock

    def _connect(self, address: PeerAddress) -> None:
        cfg = self.config
        ctl = self._client_socket(
            zmq.DEALER, address, max_msg=max(cfg.max_control_bytes, _frame.MAX_HEADER_BYTES)
        )
        ctl.connect(address.endpoint)
        link = _Outbound(address, ctl)
        self._outbound.append(link)
        self._spawn(self._recv_loop(ctl, _Channel.CONTROL_DEALER, self._control_dealer_handler(link)), "ctl")

    def _attach_peer_sockets(self, link: _Outbound, data_ep: str, ann_ep: str) -> None:
        """Connect (or re-connect after a peer restart on new ports) the data DEALER and SUB."""
        if link.endpoints == (data_ep, ann_ep):
            return
        cfg = self.config
        data = self._client_socket(
            zmq.DEALER, link.address, max_msg=cfg.max_chunk_bytes, rcvhwm=cfg.send_hwm_chunks, bulk=True
        )
        sub = self._client_socket(
            zmq.SUB, link.address, max_msg=MAX_ANNOUNCE_BYTES, rcvhwm=cfg.announcement_queue
        )
        try:
            sub.setsockopt(zmq.SUBSCRIBE, TOPIC_ANNOUNCE)
            with zmq_errors("connect"):
                data.connect(data_ep)
                sub.connect(ann_ep)
        except BaseException:
            # The peer advertised endpoints libzmq refuses: keep what we had, leak nothing (it may repeat).
            self._close_sockets([data, sub])
            raise
        old_socks = [s for s in (link.data, link.sub) if s is not None]
        if old_socks:
            self._spawn(self._retire(link.tasks, old_socks), "retire")
        link.data, link.sub, link.endpoints = data, sub, (data_ep, ann_ep)
        link.catalog = PeerCatalog()
        link.tasks = [
            self._spawn(self._recv_loop(data, _Channel.DATA_DEALER, self._data_dealer_handler(link)), "data"),
            self._spawn(self._recv_loop(sub, _Channel.SUB, self._sub_handler(link)), "sub"),
        ]

    async def _retire(self, tasks: list[asyncio.Task[None]], socks: list[zmq.asyncio.Socket]) -> None:
        """Stop the receive loops of replaced sockets, then close the sockets."""
        for task in tasks:
            task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._close_sockets(socks)

    def _close_sockets(self, socks: list[zmq.asyncio.Socket]) -> None:
        for sock in socks:
            sock.close(linger=0)
            if sock in self._sockets:
                self._sockets.remove(sock)

    # ------------------------------------------------------------------ sending

    def _next_seq(self, role: str) -> int:
        counter = self._seq.get(role)
        if counter is None:
            # Start at the clock in microseconds so a restarted sender stays above its old numbers.
            counter = self._seq[role] = itertools.count(time.time_ns() // 1000)
        return next(counter)

    def _seal(
        self,
        role: str,
        kind: Kind,
        topic: bytes,
        parts: list[_digest.Buffer],
        *,
        codec: Codec | None = None,
        fields: Mapping[str, _frame.FieldValue] | None = None,
        digest: bytes | None = None,
    ) -> list[_digest.Buffer]:
        header = _frame.make_header(
            kind, self.config.node_id, self._next_seq(role), _now(), parts,
            codec=codec, fields=fields, digest=digest,
        )  # fmt: skip
        return _frame.encode_frame(topic, header, parts, self._hmac_key)

    async def _send(
        self, sock: zmq.asyncio.Socket, frames: list[_digest.Buffer], ident: bytes | None = None
    ) -> bool:
        """Send without blocking; a full queue or a vanished ROUTER peer drops the message (counted)."""
        if ident is not None:
            frames = [ident, *frames]
        try:
            # pyzmq copies parts under its copy_threshold (64 KiB) anyway: only chunks go zero-copy.
            await sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._counters.values["send_dropped"] += 1
            return False
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.ENOTSOCK, zmq.ETERM):
                self._counters.values["send_dropped"] += 1
                return False
            raise
        self._counters.values["frames_out"] += 1
        return True

    async def _send_msgpack(
        self,
        sock: zmq.asyncio.Socket,
        role: str,
        kind: Kind,
        topic: bytes,
        payload: Mapping[str, Any],
        *,
        ident: bytes | None = None,
        fields: Mapping[str, _frame.FieldValue] | None = None,
        limit: int | None = None,
    ) -> bool:
        body = pack(dict(payload))
        limit = self.config.max_control_bytes if limit is None else limit
        if len(body) > limit:
            raise PayloadTooLarge(f"{kind.name} payload of {len(body)} bytes exceeds {limit}")
        frames = self._seal(role, kind, topic, [body], codec=Codec.MSGPACK, fields=fields)
        return await self._send(sock, frames, ident)

    # ------------------------------------------------------------------ receiving

    async def _recv_loop(
        self,
        sock: zmq.asyncio.Socket,
        channel: _Channel,
        handler: Callable[[bytes | None, Header, list[memoryview]], Awaitable[None]],
    ) -> None:
        routed = sock.type == zmq.ROUTER
        max_payload = {
            _Channel.CONTROL_ROUTER: self.config.max_control_bytes,
            _Channel.CONTROL_DEALER: self.config.max_control_bytes,
            _Channel.DATA_ROUTER: MAX_DATA_CONTROL_BYTES,
            _Channel.DATA_DEALER: self.config.max_chunk_bytes,
            _Channel.SUB: MAX_ANNOUNCE_BYTES,
        }[channel]
        while True:
            try:
                msg = await sock.recv_multipart(copy=False)
            except zmq.ZMQError:
                if self._state is BusState.CLOSED or sock.closed:
                    return
                raise
            self._counters.values["frames_in"] += 1
            try:
                ident: bytes | None = None
                if routed:
                    if not msg:
                        raise FrameError("empty routed message")
                    ident = msg[0].bytes
                    msg = msg[1:]
                # Chunks are hashed in a worker thread together with the spool write.
                verify = channel is not _Channel.DATA_DEALER
                _, header, payload = _frame.decode_frame(
                    [f.buffer for f in msg], self._hmac_key,
                    max_payload_bytes=max_payload, verify_digest=verify,
                )  # fmt: skip
                self._replay.check(header.sender, channel, header.seq, header.time, _now())
                await handler(ident, header, payload)
            except FrameError as exc:
                self._counters.rejected[exc.reason] += 1
                log.debug("rejected frame on %s: %s", channel.name, exc)
            except (BusError, zmq.ZMQError) as exc:
                self._counters.rejected["unusable"] += 1
                log.debug("could not act on a frame on %s: %s", channel.name, exc)

    def _payload_map(self, header: Header, payload: list[memoryview]) -> dict[str, Any]:
        if header.codec is not Codec.MSGPACK or len(payload) != 1:
            raise FrameError(f"{header.kind.name}: expected one msgpack payload part")
        obj = unpack_untrusted(payload[0], max_bytes=max(self.config.max_control_bytes, MAX_ANNOUNCE_BYTES))
        if not isinstance(obj, dict):
            raise FrameError(f"{header.kind.name}: payload is not a map")
        return obj

    def _unexpected(self, header: Header) -> FrameError:
        err = FrameError(f"{header.kind.name} not expected on this socket")
        err.reason = "unexpected"
        return err

    # control ROUTER: peers that connected to us

    async def _on_control_router(
        self, ident: bytes | None, header: Header, payload: list[memoryview]
    ) -> None:
        assert ident is not None
        assert self._ctl_router is not None
        assert self._endpoints is not None
        body = self._payload_map(header, payload)
        if header.kind is Kind.PING:
            info = self._peer_info(body.get("info"), "PING")
            peer = self._inbound.get(header.sender)
            if peer is None or peer.identity != ident:
                peer = self._inbound[header.sender] = _Inbound(header.sender, ident)
                self._notify()
            peer.roles = _str_tuple(body.get("roles"), "roles")
            peer.info = info
            peer.last_heard = time.monotonic()
            echo = body.get("t")
            pong = {
                "roles": list(self.config.roles),
                "info": self._presence,
                "t": echo if isinstance(echo, float) else 0.0,
                "data": self._endpoints.data,
                "ann": self._endpoints.announce,
                "ae": self._ann_epoch,
                "an": self._ann_seq,
                "q": self.config.send_hwm_chunks,
            }
            await self._send_msgpack(
                self._ctl_router, "ctl-router", Kind.PONG, TOPIC_CONTROL, pong, ident=ident
            )
        elif header.kind is Kind.REQUEST:
            self._start_handler(self._ctl_router, "ctl-router", ident, header, body)
        elif header.kind is Kind.REPLY:
            self._on_reply(header, body)
        else:
            raise self._unexpected(header)

    # control DEALER: the peer we connected to

    def _control_dealer_handler(
        self, link: _Outbound
    ) -> Callable[[bytes | None, Header, list[memoryview]], Awaitable[None]]:
        async def handle(_: bytes | None, header: Header, payload: list[memoryview]) -> None:
            body = self._payload_map(header, payload)
            if header.kind is Kind.PONG:
                self._on_pong(link, header, body)
            elif header.kind is Kind.REQUEST:
                if header.sender != link.node_id:
                    raise FrameError("REQUEST from an unknown sender")
                self._start_handler(link.ctl, "ctl-dealer", None, header, body)
            elif header.kind is Kind.REPLY:
                self._on_reply(header, body)
            else:
                raise self._unexpected(header)

        return handle

    def _on_pong(self, link: _Outbound, header: Header, body: dict[str, Any]) -> None:
        data_ep, ann_ep = body.get("data"), body.get("ann")
        epoch, seq, echo = body.get("ae"), body.get("an"), body.get("t")
        info = self._peer_info(body.get("info"), "PONG")
        if not isinstance(data_ep, str) or not isinstance(ann_ep, str):
            raise FrameError("PONG: bad endpoints")
        if type(epoch) is not int or type(seq) is not int:
            raise FrameError("PONG: bad announcement position")
        if link.node_id is not None and link.node_id != header.sender:
            # Same address, different node (a replacement): forget what we knew about the old one.
            link.endpoints = None
        link.node_id = header.sender
        link.roles = _str_tuple(body.get("roles"), "roles")
        link.info = info
        queue = body.get("q")
        link.queue_chunks = queue if type(queue) is int and queue > 0 else None
        link.last_heard = time.monotonic()
        # The echo is our own PING's clock, but the peer sends it back: an RTT longer than the peer timeout
        # is no measurement (it would stretch every chunk timeout derived from the link estimate).
        rtt = time.monotonic() - echo if isinstance(echo, float) and echo > 0 else -1.0
        if 0.0 <= rtt <= self.config.peer_timeout_s:
            self._link(header.sender).add_rtt(rtt)
        self._attach_peer_sockets(link, self._peer_endpoint(link, data_ep), self._peer_endpoint(link, ann_ep))
        if not link.live:
            link.live = True
            self._notify()
        if link.catalog.on_position(epoch, seq):
            self._request_snapshot(link)

    def _peer_info(self, info: object, what: str) -> MappingProxyType[str, Any]:
        """A peer's presence info, held to the limit this node sets its own to (``max_presence_bytes``):
        every peer's info is kept and copied into status replies, so one peer must not fill them."""
        if not isinstance(info, dict):
            raise FrameError(f"{what}: info is not a map")
        if len(pack(info)) > self.config.max_presence_bytes:
            raise FrameError(f"{what}: presence info over {self.config.max_presence_bytes} bytes")
        return MappingProxyType(info)

    @staticmethod
    def _peer_endpoint(link: _Outbound, advertised: str) -> str:
        """Use the advertised port on the host we reached the peer at (it may have bound 0.0.0.0)."""
        host = link.address.endpoint.rsplit(":", 1)[0]
        port = advertised.rsplit(":", 1)[-1]
        # str.isdigit alone accepts other scripts' digits, which libzmq refuses at connect.
        if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise FrameError("PONG: bad endpoint")
        return f"{host}:{port}"

    # data ROUTER: serve chunks

    async def _on_data_router(self, ident: bytes | None, header: Header, payload: list[memoryview]) -> None:
        assert ident is not None
        assert self._data_router is not None
        card_id = _field(header, "c", str)
        if header.kind is Kind.FETCH:
            index, max_chunk = _field(header, "i", int), _field(header, "m", int)
            card = self._holder.get(card_id)
            reason = ""
            if card is None:
                reason = "unknown card"
            elif not 0 <= index < card.manifest.n_chunks:
                reason = "bad index"
            elif card.manifest.chunk_bytes > max_chunk:
                reason = "chunk larger than the receiver accepts"
            if card is None or reason:
                fields: dict[str, _frame.FieldValue] = {"c": card_id, "i": index, "why": reason}
                frames = self._seal("data-router", Kind.CHUNK_ERROR, TOPIC_DATA, [], fields=fields)
                await self._send(self._data_router, frames, ident)
                return
            view = chunk_view(card.data, card.manifest, index)
            frames = self._seal(
                "data-router", Kind.CHUNK, TOPIC_DATA, [view],
                fields={"c": card_id, "i": index}, digest=card.digests[index],
            )  # fmt: skip
            if await self._send(self._data_router, frames, ident):
                self._counters.values["chunks_served"] += 1
        elif header.kind is Kind.ACK:
            card = self._holder.get(card_id)
            if card is not None:
                card.acked_by.add(header.sender)
            self._counters.values["acks_received"] += 1
        else:
            raise self._unexpected(header)

    # data DEALER: receive chunks for running transfers

    def _data_dealer_handler(
        self, link: _Outbound
    ) -> Callable[[bytes | None, Header, list[memoryview]], Awaitable[None]]:
        async def handle(_: bytes | None, header: Header, payload: list[memoryview]) -> None:
            if header.sender != link.node_id:
                raise FrameError("data from an unexpected sender")
            card_id, index = _field(header, "c", str), _field(header, "i", int)
            transfer = link.transfers.get(card_id)
            if header.kind is Kind.CHUNK:
                if len(payload) != 1:
                    raise FrameError("CHUNK: expected one payload part")
                if (
                    transfer is None
                    or index in transfer.in_flight
                    or not transfer.puller.is_outstanding(index)
                ):
                    self._counters.values["chunks_duplicate"] += 1
                    return
                self._counters.values["chunks_received"] += 1
                # Straight to a worker from here: the fetching task need not wake up for every chunk.
                transfer.start_job(index, payload[0], header.digest)
            elif header.kind is Kind.CHUNK_ERROR:
                why = header.fields.get("why")
                if transfer is not None:
                    transfer.events.put_nowait(("error", index, str(why)[:200], b""))
            else:
                raise self._unexpected(header)

        return handle

    # SUB: announcements

    def _sub_handler(
        self, link: _Outbound
    ) -> Callable[[bytes | None, Header, list[memoryview]], Awaitable[None]]:
        async def handle(_: bytes | None, header: Header, payload: list[memoryview]) -> None:
            if link.node_id is None or header.sender != link.node_id:
                raise FrameError("announcement from an unexpected sender")
            epoch, seq = _field(header, "e", int), _field(header, "n", int)
            if header.kind is Kind.BEACON:
                need = link.catalog.on_position(epoch, seq)
                fresh: list[Announcement] = []
            elif header.kind is Kind.ANNOUNCE:
                ann = self._announcement(header.sender, self._payload_map(header, payload))
                fresh, need = link.catalog.on_update(epoch, Change(seq, added=ann))
            elif header.kind is Kind.WITHDRAW:
                card_id = _field(header, "c", str)
                fresh, need = link.catalog.on_update(epoch, Change(seq, withdrawn=card_id))
            else:
                raise self._unexpected(header)
            if need:
                self._counters.values["announcement_gaps"] += 1
                self._request_snapshot(link)
            self._offer(fresh)

        return handle

    def _announcement(self, sender: str, obj: object) -> Announcement:
        return Announcement.from_wire(
            sender,
            obj,
            max_chunk_bytes=self.config.max_chunk_bytes,
            max_card_bytes=self.config.max_card_bytes,
        )

    def _offer(self, fresh: list[Announcement]) -> None:
        for ann in fresh:
            for stream in list(self._streams):
                stream.offer(ann)
        if fresh:
            self._notify()

    def _request_snapshot(self, link: _Outbound) -> None:
        if link.snapshot_running or link.node_id is None or self._state is not BusState.OPEN:
            return
        link.snapshot_running = True
        self._spawn(self._fetch_snapshot(link), "snapshot")

    async def _fetch_snapshot(self, link: _Outbound) -> None:
        try:
            assert link.node_id is not None
            reply = await self._request(
                link.node_id, {}, op="snapshot", deadline_s=self.config.request_timeout_s
            )
            epoch, seq, cards = reply.get("e"), reply.get("n"), reply.get("cards")
            if type(epoch) is not int or type(seq) is not int or not isinstance(cards, list):
                raise FrameError("bad snapshot")
            anns = [self._announcement(link.node_id, c) for c in cards]
            fresh, again = link.catalog.on_snapshot(epoch, seq, anns)
            self._counters.values["snapshots_applied"] += 1
            self._offer(fresh)
            self._notify()  # readiness: the catalog may have become synced
        except FrameError as exc:
            self._counters.rejected[exc.reason] += 1
            again = False
        except (PeerGone, RequestTimeout, RemoteError, PayloadTooLarge) as exc:
            log.debug("snapshot from %s failed: %s", link.node_id, exc)
            again = False  # the next heartbeat's position check asks again
        finally:
            link.snapshot_running = False
        if again:
            self._request_snapshot(link)

    # XPUB: subscriptions arriving

    async def _xpub_loop(self, xpub: zmq.asyncio.Socket) -> None:
        while True:
            try:
                msg = await xpub.recv()
            except zmq.ZMQError:
                if self._state is BusState.CLOSED or xpub.closed:
                    return
                raise
            if msg[:1] == b"\x01":
                # A subscriber arrived: tell it where we are so it can tell whether it missed anything.
                frames = self._seal(
                    "xpub", Kind.BEACON, TOPIC_ANNOUNCE, [], fields={"e": self._ann_epoch, "n": self._ann_seq}
                )
                await self._send(xpub, frames)

    async def _publish_change(self, kind: Kind, payload: Mapping[str, Any] | None, card_id: str) -> None:
        if self._xpub is None:
            return
        self._ann_seq += 1
        fields: dict[str, _frame.FieldValue] = {"e": self._ann_epoch, "n": self._ann_seq, "c": card_id}
        parts: list[_digest.Buffer] = [] if payload is None else [pack(dict(payload))]
        codec = Codec.NONE if payload is None else Codec.MSGPACK
        frames = self._seal("xpub", kind, TOPIC_ANNOUNCE, parts, codec=codec, fields=fields)
        if not await self._send(self._xpub, frames):
            # Subscribers see the gap in sequence numbers (or in the next heartbeat) and resync.
            self._counters.values["announcements_dropped"] += 1

    # ------------------------------------------------------------------ requests

    def _start_handler(
        self, sock: zmq.asyncio.Socket, role: str, ident: bytes | None, header: Header, body: dict[str, Any]
    ) -> None:
        rid = _field(header, "r", int)
        op = _field(header, "op", str)
        if len(self._handler_tasks) >= self.config.max_handlers:
            self._spawn(self._reply(sock, role, ident, rid, False, {"error": "busy"}), "reply")
            return
        task = asyncio.get_running_loop().create_task(
            self._handle_request(sock, role, ident, header.sender, rid, op, body)
        )
        self._handler_tasks.add(task)
        task.add_done_callback(self._handler_tasks.discard)
        task.add_done_callback(self._task_done)

    async def _handle_request(
        self,
        sock: zmq.asyncio.Socket,
        role: str,
        ident: bytes | None,
        peer: str,
        rid: int,
        op: str,
        body: dict[str, Any],
    ) -> None:
        ok = True
        result: Mapping[str, Any]
        if op == "snapshot":
            result = {
                "e": self._ann_epoch,
                "n": self._ann_seq,
                "cards": [self._held_announcement(c).to_wire() for c in self._holder.cards()],
            }
        elif op == "app" and self._handler is not None:
            try:
                result = await self._handler(peer, body)
                pack(dict(result))  # fail here, in the handler's name, if it is not encodable
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the application's handler failed: tell the peer, keep serving
                log.warning("request handler failed for %s: %r", peer, exc)
                ok, result = False, {"error": f"{type(exc).__name__}: {exc}"[:500]}
        else:
            ok, result = False, {"error": f"no handler for {op!r}"}
        self._counters.values["requests_handled"] += 1
        await self._reply(sock, role, ident, rid, ok, result)

    async def _reply(
        self,
        sock: zmq.asyncio.Socket,
        role: str,
        ident: bytes | None,
        rid: int,
        ok: bool,
        result: Mapping[str, Any],
    ) -> None:
        try:
            await self._send_msgpack(
                sock, role, Kind.REPLY, TOPIC_CONTROL, result, ident=ident, fields={"r": rid, "ok": ok}
            )
        except PayloadTooLarge as exc:
            await self._send_msgpack(
                sock,
                role,
                Kind.REPLY,
                TOPIC_CONTROL,
                {"error": str(exc)},
                ident=ident,
                fields={"r": rid, "ok": False},
            )

    def _on_reply(self, header: Header, body: dict[str, Any]) -> None:
        rid, ok = _field(header, "r", int), _field(header, "ok", bool)
        entry = self._pending.get(rid)
        if entry is None or entry[0] != header.sender:
            raise FrameError("REPLY to no pending request")
        future = entry[1]
        if future.done():
            return
        if ok:
            future.set_result(body)
        else:
            future.set_exception(RemoteError(str(body.get("error", "remote failure"))))

    def _route(self, peer: str) -> tuple[zmq.asyncio.Socket, str, bytes | None]:
        for link in self._outbound:
            if link.node_id == peer and link.live:
                return link.ctl, "ctl-dealer", None
        inbound = self._inbound.get(peer)
        if inbound is not None and self._ctl_router is not None:
            return self._ctl_router, "ctl-router", inbound.identity
        raise PeerGone(f"no live connection to {peer!r}")

    async def _request(
        self, peer: str, payload: Mapping[str, Any], *, op: str, deadline_s: float
    ) -> dict[str, Any]:
        sock, role, ident = self._route(peer)
        rid = next(self._request_ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (peer, future)
        try:
            sent = await self._send_msgpack(
                sock, role, Kind.REQUEST, TOPIC_CONTROL, payload, ident=ident, fields={"r": rid, "op": op}
            )
            if not sent:
                raise PeerGone(f"cannot queue a request to {peer!r}")
            async with asyncio.timeout(deadline_s):
                return await future
        except TimeoutError:
            raise RequestTimeout(f"no reply from {peer!r} within {deadline_s} s") from None
        finally:
            self._pending.pop(rid, None)

    # ------------------------------------------------------------------ heartbeat and liveness

    async def _heartbeat_loop(self) -> None:
        cfg = self.config
        while True:
            now = time.monotonic()
            ping = {"roles": list(cfg.roles), "info": self._presence, "t": now}
            for link in self._outbound:
                await self._send_msgpack(link.ctl, "ctl-dealer", Kind.PING, TOPIC_CONTROL, ping)
                if link.live and now - link.last_heard > cfg.peer_timeout_s:
                    link.live = False
                    self._peer_gone(link.node_id)
            for node_id, inbound in list(self._inbound.items()):
                if now - inbound.last_heard > cfg.peer_timeout_s:
                    del self._inbound[node_id]
                    self._peer_gone(node_id)
            self._hb_wakeup.clear()
            # A periodic timer: wakes early only when presence info changed.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cfg.heartbeat_s):
                    await self._hb_wakeup.wait()

    def _peer_gone(self, node_id: str | None) -> None:
        if node_id is None:
            return
        if any(link.node_id == node_id and link.live for link in self._outbound) or node_id in self._inbound:
            return
        for peer, future in self._pending.values():
            if peer == node_id and not future.done():
                future.set_exception(PeerGone(f"{node_id!r} stopped answering"))
        self._notify()

    # ------------------------------------------------------------------ public API

    @property
    def endpoints(self) -> BusEndpoints:
        """Bound addresses (ports resolved). Raises :class:`ConfigError` for a bus without ``bind``."""
        if self._endpoints is None:
            raise ConfigError(
                "this bus has no bind address" if self._state is BusState.OPEN else "bus not open"
            )
        return self._endpoints

    def on_request(self, handler: RequestHandler | None) -> None:
        """Set the handler ``async (peer_id, payload) -> reply`` for control requests (None removes it)."""
        self._handler = handler

    async def request(
        self,
        peer: str,
        payload: Mapping[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the documented API takes a per-call timeout
    ) -> dict[str, Any]:
        """Send a small control request to ``peer``; returns its handler's reply.

        Raises :class:`RequestTimeout`, :class:`PeerGone`, :class:`RemoteError`, :class:`PayloadTooLarge`.
        """
        self._check_open()
        return await self._request(
            peer, payload, op="app", deadline_s=timeout or self.config.request_timeout_s
        )

    def set_presence_info(self, info: Mapping[str, Any]) -> None:
        """Replace the ``info`` dict announced with every heartbeat (msgpack-encodable, small)."""
        try:
            packed = pack(dict(info))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"presence info is not msgpack-encodable: {exc}") from exc
        if len(packed) > self.config.max_presence_bytes:
            raise PayloadTooLarge(
                f"presence info of {len(packed)} bytes exceeds {self.config.max_presence_bytes}"
            )
        self._presence = dict(info)
        self._presence_packed = packed
        self._hb_wakeup.set()

    def peers(self) -> list[PeerInfo]:
        """Live peers (either direction) with their last presence info."""
        now = time.monotonic()
        seen: dict[str, PeerInfo] = {}
        for link in self._outbound:
            if link.live and link.node_id is not None:
                seen[link.node_id] = PeerInfo(link.node_id, link.roles, link.info, now - link.last_heard)
        for inbound in self._inbound.values():
            age = now - inbound.last_heard
            if inbound.node_id not in seen or seen[inbound.node_id].age_s > age:
                seen[inbound.node_id] = PeerInfo(inbound.node_id, inbound.roles, inbound.info, age)
        return sorted(seen.values(), key=lambda p: p.node_id)

    async def wait_for_peer(
        self,
        node_id: str,
        *,
        synced: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 - a readiness wait with its own deadline
    ) -> PeerInfo:
        """Wait until ``node_id`` is live (and, with ``synced``, its announcement catalog is in sync).

        This is the readiness signal: no sleeping and hoping. Raises :class:`RequestTimeout`.
        """
        self._check_open()

        def ready() -> PeerInfo | None:
            for link in self._outbound:
                if link.node_id == node_id and link.live and (link.catalog.synced or not synced):
                    return next(p for p in self.peers() if p.node_id == node_id)
            if not synced or not any(link.node_id == node_id for link in self._outbound):
                return next((p for p in self.peers() if p.node_id == node_id), None)
            return None

        try:
            async with asyncio.timeout(timeout):
                while (info := ready()) is None:
                    self._check_open()
                    await self._changed.wait()
        except TimeoutError:
            raise RequestTimeout(f"{node_id!r} not ready within {timeout} s") from None
        return info

    def link(self, peer: str) -> LinkEstimate:
        """Measured bandwidth (bytes/s over real transfers) and RTT (heartbeats) to ``peer``."""
        known = self._links.get(peer)  # asking about a name keeps nothing: callers pass peers' names
        return (known or LinkEstimator()).estimate()

    def _link(self, peer: str) -> LinkEstimator:
        est = self._links.get(peer)
        if est is None:
            est = self._links[peer] = LinkEstimator()
        return est

    def stats(self) -> BusStats:
        """A frozen snapshot of the counters."""
        return self._counters.snapshot(curve_denied=self._zap.denied if self._zap is not None else 0)

    def announcements(self, topic_prefix: str = "") -> AnnouncementStream:
        """Cards announced by peers we connect to, topic starting with ``topic_prefix``: known ones first."""
        self._check_open()
        stream = AnnouncementStream(
            topic_prefix,
            self.config.announcement_queue,
            on_drop=lambda: self._counters.values.update(announcements_dropped=1),
            on_close=self._streams.discard,
        )
        for link in self._outbound:
            for ann in link.catalog.cards.values():
                stream.offer(ann)
        self._streams.add(stream)
        return stream

    def known_cards(self) -> list[Announcement]:
        """Every card currently announced by the peers we connect to."""
        return [ann for link in self._outbound for ann in link.catalog.cards.values()]

    def _held_announcement(self, card: HeldCard) -> Announcement:
        m = card.manifest
        return Announcement(
            m.card_id, m.size, card.topic, self.config.node_id, card.meta, m.chunk_bytes, m.digest
        )

    async def publish_card(
        self,
        topic: str,
        data: bytes | memoryview,
        *,
        card_id: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> str:
        """Hold ``data`` for pulls and announce it; returns the card id (default: digest hex, 32 chars).

        The bytes are referenced, not copied: do not mutate a buffer you published. Raises
        :class:`PayloadTooLarge`, :class:`StoreFull`, :class:`ConfigError` (no ``bind``: nothing to serve
        from).
        """
        self._check_open()
        if self._xpub is None:
            raise ConfigError("publishing needs a bind address")
        view = memoryview(data).cast("B")
        if len(view) > self.config.max_card_bytes:
            raise PayloadTooLarge(f"card of {len(view)} bytes exceeds max_card_bytes")
        if card_id is not None:
            try:
                _frame_card_id = CardManifest(card_id, 0, 1, b"\0" * 32).card_id
            except FrameError as exc:
                raise ConfigError(f"card_id {card_id!r}: letters, digits, '-', '_' (at most 64)") from exc
            card_id = _frame_card_id
        chunk = self.config.chunk_bytes

        def digest_card() -> tuple[str, list[bytes]]:
            return (card_id or default_card_id(view), chunk_digests(view, chunk))

        assert self._pool is not None
        final_id, digests = await asyncio.get_running_loop().run_in_executor(self._pool, digest_card)
        self._check_open()
        manifest = CardManifest(final_id, len(view), chunk, list_digest(digests))
        card = HeldCard(manifest, view, digests, topic, MappingProxyType(dict(meta or {})))
        wire = self._held_announcement(card).to_wire()
        if len(pack(wire)) > MAX_ANNOUNCE_BYTES:
            raise PayloadTooLarge("announcement (topic + meta) exceeds 64 KiB")
        for evicted in self._holder.add(card):
            await self._publish_change(Kind.WITHDRAW, None, evicted)
        self._counters.values["cards_published"] += 1
        await self._publish_change(Kind.ANNOUNCE, wire, final_id)
        return final_id

    async def withdraw_card(self, card_id: str) -> bool:
        """Stop holding a published card; returns whether it was held."""
        self._check_open()
        if not self._holder.remove(card_id):
            return False
        await self._publish_change(Kind.WITHDRAW, None, card_id)
        return True

    def is_delivered(self, card_id: str) -> bool:
        """Whether this node (this spool) already delivered ``card_id`` to the application."""
        return self._spool is not None and self._spool.is_delivered(card_id)

    async def fetch_card(self, ann: Announcement) -> memoryview:
        """Pull, verify and deliver the announced card: exactly once per spool.

        Resumes from chunks already verified in the spool (after a disconnect, a cancellation or a process
        restart). Raises :class:`AlreadyDelivered`, :class:`PeerGone` (never connected to the sender),
        :class:`DigestMismatch`, :class:`TransferError` (stalled, or the sender no longer holds it),
        :class:`StoreError` (the spool cannot be written), :class:`ClosedError`.

        Returns the card as a read-only ``memoryview`` of the verified spool file, mapped (``mmap``) rather
        than read back, so delivery copies nothing; it stays valid after the spool file is removed and is
        unmapped when the last reference goes (or on ``release()``). Pass ``bytes(card)`` where an owned
        copy is needed.

        Memory: while pulling, the receiver references at most ``credit_bytes`` of chunks (plus what
        ZeroMQ queues, at most ``send_buffer_bytes // chunk_bytes`` chunks); verified chunks live in the
        spool's page cache, not in this process's heap, and the delivered view maps those same pages
        (file-backed, so the kernel can write them back and drop them under memory pressure).
        """
        self._check_open()
        lock, users = self._fetch_locks.get(ann.card_id, (asyncio.Lock(), 0))
        self._fetch_locks[ann.card_id] = (lock, users + 1)
        try:
            async with lock:
                return await self._fetch_locked(ann)
        finally:
            lock, users = self._fetch_locks[ann.card_id]
            if users == 1:
                del self._fetch_locks[ann.card_id]
            else:
                self._fetch_locks[ann.card_id] = (lock, users - 1)

    async def _fetch_locked(self, ann: Announcement) -> memoryview:
        self._check_open()  # a fetch that waited on the lock while the bus closed
        assert self._spool is not None
        assert self._pool is not None
        manifest = ann.manifest
        if self._spool.is_delivered(manifest.card_id):
            raise AlreadyDelivered(f"card {manifest.card_id} was already delivered")
        if manifest.chunk_bytes > self.config.max_chunk_bytes or manifest.size > self.config.max_card_bytes:
            raise TransferError("card exceeds this node's limits")
        link = next((lk for lk in self._outbound if lk.node_id == ann.sender), None)
        if link is None:
            raise PeerGone(f"not connected to {ann.sender!r}")
        loop = asyncio.get_running_loop()
        partial = self._spool.partial(manifest)
        opening = loop.run_in_executor(self._pool, partial.open)
        try:
            verified = await asyncio.shield(opening)
        except BaseException:
            # A cancelled wait does not stop the thread: close whatever it opens once it is done.
            opening.add_done_callback(lambda job: partial.close())
            raise
        puller = ChunkPuller(manifest, verified, self._credit(link, manifest))
        transfer = _Transfer(puller, partial, self._pool)
        try:
            if link.transfers.setdefault(manifest.card_id, transfer) is not transfer:
                raise TransferError("a transfer of this card is already running")
            try:
                await self._pull(link, transfer, verified)
            finally:
                link.transfers.pop(manifest.card_id, None)  # no new jobs from here on
                if transfer.jobs:
                    await asyncio.wait(transfer.jobs)
        finally:
            transfer.close()
        if list_digest(verified[i] for i in range(manifest.n_chunks)) != manifest.digest:
            await loop.run_in_executor(self._pool, partial.remove)
            raise DigestMismatch(
                f"card {manifest.card_id}: chunk digests do not hash to the announced digest"
            )
        data = await loop.run_in_executor(self._pool, partial.map_card)
        self._check_open()
        # Recorded before handing over, with no await in between: exactly once unless the process dies here.
        self._spool.mark_delivered(manifest)
        partial.remove()
        self._counters.values["cards_delivered"] += 1
        if link.data is not None:
            frames = self._seal("data-dealer", Kind.ACK, TOPIC_DATA, [], fields={"c": manifest.card_id})
            with contextlib.suppress(BusError):
                await self._send(link.data, frames)
        return data

    async def _pull(self, link: _Outbound, transfer: _Transfer, verified: dict[int, bytes]) -> None:
        cfg = self.config
        puller, manifest = transfer.puller, transfer.puller.manifest
        bucket = self._bucket(link) if cfg.rate_limit_bps else None
        last_progress = sample_start = time.monotonic()
        sample_bytes = sample_chunks = 0
        bad_copies: dict[int, int] = {}
        while not puller.done:
            self._check_open()
            now = time.monotonic()
            if now - last_progress > cfg.stall_timeout_s:  # also when chunks arrive, but none verify
                raise TransferError(f"card {manifest.card_id}: no progress for {cfg.stall_timeout_s} s")
            for index in puller.take_requests(now):
                if bucket is not None:
                    await bucket.acquire(manifest.chunk_len(index))
                if link.data is not None:
                    fields: dict[str, _frame.FieldValue] = {
                        "c": manifest.card_id, "i": index, "m": cfg.max_chunk_bytes,
                    }  # fmt: skip
                    await self._send(
                        link.data, self._seal("data-dealer", Kind.FETCH, TOPIC_DATA, [], fields=fields)
                    )
            if transfer.events.empty():
                timeout = self._chunk_timeout(link)
                try:
                    async with asyncio.timeout(timeout):
                        first = await transfer.events.get()
                except TimeoutError:
                    puller.expire(time.monotonic(), timeout)
                    if time.monotonic() - last_progress > cfg.stall_timeout_s:
                        raise TransferError(
                            f"card {manifest.card_id}: no progress for {cfg.stall_timeout_s} s"
                        ) from None
                    continue
            else:
                first = transfer.events.get_nowait()
            # Take every event already queued before asking for more: one wake-up, one batch of requests.
            batch = [first]
            while not transfer.events.empty():
                batch.append(transfer.events.get_nowait())
            for event, index, buf, digest in batch:
                if event == "closed":
                    raise ClosedError("bus closed during the transfer")
                if event == "error":
                    raise TransferError(f"card {manifest.card_id}: sender refused chunk {index}: {buf}")
                if event == "spool-error":
                    raise StoreError(f"card {manifest.card_id}: spooling chunk {index} failed: {buf}")
                transfer.in_flight.discard(index)
                if buf:
                    verified[index] = digest
                    puller.on_verified(index)
                    last_progress = time.monotonic()
                    sample_bytes += manifest.chunk_len(index)
                    sample_chunks += 1
                    if sample_chunks >= CHUNKS_PER_SAMPLE or puller.done:
                        self._link(link.node_id or "?").add_transfer(
                            sample_bytes, last_progress - sample_start
                        )
                        sample_start, sample_bytes, sample_chunks = last_progress, 0, 0
                else:
                    self._counters.rejected["chunk_digest"] += 1
                    bad_copies[index] = bad_copies.get(index, 0) + 1
                    if bad_copies[index] >= CHUNK_ATTEMPTS:
                        raise DigestMismatch(
                            f"card {manifest.card_id}: chunk {index} failed its digest {CHUNK_ATTEMPTS} "
                            "times: the sender serves other bytes than it announced"
                        )
                    puller.on_rejected(index)

    def _credit(self, link: _Outbound, manifest: CardManifest) -> int:
        """Bytes to keep requested: ours, capped so the sender's queue never overflows.

        The sender drops a chunk its per-peer queue has no room for, and the request then waits out
        ``chunk_timeout_s``: a receiver configured with more credit than the sender's ``send_buffer_bytes``
        would stall on every window. libzmq's writer sees freed queue slots only in batches of half the
        high-water mark, so half the peer's queue is what is safe to have in flight.
        """
        if link.queue_chunks is None:
            return self.config.credit_bytes
        return min(self.config.credit_bytes, max(1, link.queue_chunks // 2) * manifest.chunk_bytes)

    def _chunk_timeout(self, link: _Outbound) -> float:
        """Wait for a chunk: the configured floor, or longer when the measured link is slow."""
        est = self._link(link.node_id or "?").estimate()
        if est.samples and est.bandwidth_bps > 0:
            return max(
                self.config.chunk_timeout_s, 2 * self.config.credit_bytes / est.bandwidth_bps + est.rtt_s
            )
        return self.config.chunk_timeout_s

    def _bucket(self, link: _Outbound) -> TokenBucket:
        key = link.node_id or link.address.endpoint
        bucket = self._buckets.get(key)
        if bucket is None:
            rate = self.config.rate_limit_bps or 1.0
            bucket = self._buckets[key] = TokenBucket(rate, max(float(self.config.chunk_bytes), rate / 10))
        return bucket
