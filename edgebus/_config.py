"""Frozen, typed, keyword-only configuration for a :class:`~edgebus.Bus`.

Validation happens in ``__post_init__``; every problem is a :class:`ConfigError` naming the field. A config
with neither ``keys`` nor ``insecure=True`` raises :class:`InsecureRefused` when the bus opens (fail closed).

Endpoints: ``bind`` is one ``tcp://HOST:PORT`` spec. The bus binds three sockets on that host: control
(ROUTER), data (ROUTER) and announcements (XPUB). With port 0 each gets an ephemeral port; with port P they
use P, P+1, P+2. Peers are given the *control* endpoint only; the rest is learned from the peer's signed
heartbeat reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import ConfigError
from ._keys import load_hmac_key, load_keypair, load_public_key, load_public_keys
from ._transfer import MAX_CHUNKS

_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z", re.ASCII)
_TCP = re.compile(r"^tcp://(?P<host>[^:/]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})\Z", re.ASCII)


@dataclass(frozen=True, slots=True, kw_only=True)
class BusKeys:
    """CURVE key pair (z85), the allowlist of client public keys (z85) and the shared HMAC key."""

    public_key: bytes
    secret_key: bytes
    allowed_clients: frozenset[bytes]
    hmac_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("public_key", "secret_key"):
            if len(getattr(self, name)) != 40:
                raise ConfigError(f"keys.{name}: expected a 40-character z85 key")
        if any(len(k) != 40 for k in self.allowed_clients):
            raise ConfigError("keys.allowed_clients: expected 40-character z85 keys")
        if len(self.hmac_key) < 16:
            raise ConfigError("keys.hmac_key: shorter than 16 bytes")

    @classmethod
    def from_files(
        cls, secret_file: Path | str, allowed_dir: Path | str, hmac_key_file: Path | str
    ) -> BusKeys:
        public, secret = load_keypair(secret_file)
        return cls(
            public_key=public,
            secret_key=secret,
            allowed_clients=load_public_keys(allowed_dir),
            hmac_key=load_hmac_key(hmac_key_file),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAddress:
    """A peer's control endpoint and, under CURVE, its z85 server public key."""

    endpoint: str
    server_key: bytes | None = None

    def __post_init__(self) -> None:
        if not _TCP.match(self.endpoint):
            raise ConfigError(f"connect: {self.endpoint!r} is not tcp://HOST:PORT")
        if self.server_key is not None and len(self.server_key) != 40:
            raise ConfigError(f"connect: server_key for {self.endpoint} is not a 40-character z85 key")

    @classmethod
    def from_key_file(cls, endpoint: str, public_key_file: Path | str) -> PeerAddress:
        return cls(endpoint=endpoint, server_key=load_public_key(public_key_file))


@dataclass(frozen=True, slots=True, kw_only=True)
class BusConfig:
    """Everything a bus needs; sizes in bytes, times in seconds."""

    node_id: str
    spool_dir: Path
    bind: str | None = "tcp://127.0.0.1:0"
    connect: tuple[PeerAddress, ...] = ()
    keys: BusKeys | None = None
    insecure: bool = False
    roles: tuple[str, ...] = ()
    chunk_bytes: int = 1 << 20
    credit_bytes: int = 8 << 20
    max_chunk_bytes: int = 4 << 20
    max_card_bytes: int = 1 << 30
    held_cards_bytes: int = 1 << 30
    send_buffer_bytes: int = 16 << 20
    max_control_bytes: int = 1 << 20
    max_presence_bytes: int = 4096
    heartbeat_s: float = 1.0
    peer_timeout_s: float = 5.0
    reconnect_s: float = 0.1
    reconnect_max_s: float = 5.0
    request_timeout_s: float = 5.0
    chunk_timeout_s: float = 5.0
    stall_timeout_s: float = 60.0
    rate_limit_bps: float | None = None
    replay_window: int = 4096
    max_clock_skew_s: float = 300.0
    max_handlers: int = 64
    announcement_queue: int = 4096

    def __post_init__(self) -> None:
        if not _NODE_ID.match(self.node_id):
            raise ConfigError(f"node_id: {self.node_id!r} must be 1-64 of [A-Za-z0-9_.:-]")
        if not isinstance(self.spool_dir, Path):
            raise ConfigError("spool_dir: must be a pathlib.Path")
        if self.bind is not None and not _TCP.match(self.bind):
            raise ConfigError(f"bind: {self.bind!r} is not tcp://HOST:PORT")
        if not isinstance(self.connect, tuple) or not all(isinstance(p, PeerAddress) for p in self.connect):
            raise ConfigError("connect: must be a tuple of PeerAddress")
        if self.keys is not None:
            missing = [p.endpoint for p in self.connect if p.server_key is None]
            if missing:
                raise ConfigError(f"connect: CURVE needs server_key for {', '.join(missing)}")
        positive = (
            "chunk_bytes", "credit_bytes", "max_chunk_bytes", "max_card_bytes", "held_cards_bytes",
            "send_buffer_bytes", "max_control_bytes", "max_presence_bytes", "heartbeat_s", "peer_timeout_s",
            "reconnect_s", "reconnect_max_s", "request_timeout_s", "chunk_timeout_s", "stall_timeout_s",
            "replay_window", "max_clock_skew_s", "max_handlers", "announcement_queue",
        )  # fmt: skip
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be positive")
        if self.chunk_bytes > self.max_chunk_bytes:
            raise ConfigError("chunk_bytes: larger than max_chunk_bytes")
        if self.credit_bytes < self.chunk_bytes:
            raise ConfigError("credit_bytes: smaller than one chunk")
        if -(-self.max_card_bytes // self.chunk_bytes) > MAX_CHUNKS:
            # Receivers refuse such cards: a card this node may publish must be one they can pull.
            raise ConfigError(f"chunk_bytes: max_card_bytes would take more than {MAX_CHUNKS} chunks")
        if self.peer_timeout_s <= self.heartbeat_s:
            raise ConfigError("peer_timeout_s: must exceed heartbeat_s")
        if self.rate_limit_bps is not None and not self.rate_limit_bps > 0:
            raise ConfigError("rate_limit_bps: must be positive or None")

    @property
    def send_hwm_chunks(self) -> int:
        """Per-peer data queue limit in chunks, from ``send_buffer_bytes``."""
        return max(2, self.send_buffer_bytes // self.chunk_bytes)


def bind_endpoints(bind: str) -> tuple[str, str, str]:
    """The (control, data, announce) endpoints to bind for a ``tcp://HOST:PORT`` spec."""
    m = _TCP.match(bind)
    if m is None:
        raise ConfigError(f"bind: {bind!r} is not tcp://HOST:PORT")
    host, port = m["host"], int(m["port"])
    if port == 0:
        return (bind, bind, bind)
    if port + 2 > 65535:
        raise ConfigError("bind: port + 2 exceeds 65535")
    return tuple(f"tcp://{host}:{port + i}" for i in range(3))  # type: ignore[return-value]
