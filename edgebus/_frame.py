"""The edgebus frame codec: pure functions over bytes, no sockets, no clocks.

Wire layout of one ZeroMQ multipart message (a ROUTER socket adds or strips one routing-id frame in
front; that frame is not part of the codec)::

    part 0    topic     0..255 bytes; pub/sub prefix filtering runs on it
    part 1    header    MAGIC b"EB" | VERSION (1 byte) | MAC (32 bytes) | body
    part 2..  payload   zero or more parts of opaque bytes, sent zero-copy, never inside msgpack

    body = msgpack array [kind, sender, seq, time, length, digest, codec, fields]
        kind    int     a :class:`Kind`
        sender  str     node id of the sender, 1..64 characters
        seq     int     per-sender, per-socket 64-bit sequence number (replay window input)
        time    float   sender's wall clock, seconds since the epoch (replay window input)
        length  int     total payload bytes over parts 2..
        digest  bytes   BLAKE3 (32 bytes, :mod:`edgebus._digest`) of the concatenated payload parts;
                        b"" when length is 0
        codec   int     a :class:`Codec` saying how to read the payload
        fields  map     small kind-specific values: str keys; str/int/float/bool/bytes/None values

    MAC = HMAC-SHA256(key, VERSION || len(topic) as 1 byte || topic || body)

Decoding checks, in order: part count, magic and version (:class:`VersionError`), header length
(:class:`OversizeError`), MAC with ``hmac.compare_digest`` (:class:`SignatureError`), then the body
shape (:class:`FrameError`). Payload length and digest are checked by :func:`check_payload`, kept separate
so a caller can hash big chunks off the event loop.

What the MAC does *not* guarantee: freshness (the replay window in :mod:`edgebus._security` does that),
confidentiality (CURVE does that), or that ``sender`` is who holds the key (every fleet member shares the
HMAC key, so a member can claim any node id).

Versioning rule: any change to the layout above bumps ``VERSION``; a receiver rejects versions it does
not know. New kind-specific ``fields`` keys may be added without a bump (unknown keys are ignored).
"""

from __future__ import annotations

import enum
import hmac
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, TypeAlias

from ._boundary import pack, unpack_untrusted
from ._digest import DIGEST_BYTES, Buffer, digest_parts
from ._errors import FrameError, OversizeError, SignatureError, VersionError

MAGIC: Final = b"EB"
#: 2: payload digests are BLAKE3 (1 used SHA-256).
VERSION: Final = 2
MAC_BYTES: Final = 32
PREFIX_BYTES: Final = len(MAGIC) + 1 + MAC_BYTES
MAX_TOPIC_BYTES: Final = 255
MAX_SENDER_CHARS: Final = 64
#: Default bound on the header part; kind-specific fields are meant to be small.
MAX_HEADER_BYTES: Final = 4096
MAX_SEQ: Final = (1 << 64) - 1

FieldValue: TypeAlias = str | int | float | bool | bytes | None


class Kind(enum.IntEnum):
    """Message kinds. The socket a kind may arrive on is enforced by the bus, not here."""

    PING = 1  # control: client -> server heartbeat with presence
    PONG = 2  # control: server -> client heartbeat reply with presence and endpoints
    REQUEST = 3  # control: either direction
    REPLY = 4  # control: either direction
    ANNOUNCE = 5  # announce: a card is available
    WITHDRAW = 6  # announce: a card is no longer held
    BEACON = 7  # announce: current announcement sequence, sent when a subscription arrives
    FETCH = 8  # data: receiver asks for one chunk
    CHUNK = 9  # data: one chunk of a card
    CHUNK_ERROR = 10  # data: the chunk cannot be served
    ACK = 11  # data: the receiver verified and delivered the whole card


class Codec(enum.IntEnum):
    """How to read the payload parts."""

    NONE = 0  # no payload
    RAW = 1  # opaque bytes (card chunks)
    MSGPACK = 2  # one part holding a msgpack map (control payloads)


@dataclass(frozen=True, slots=True)
class Header:
    """The decoded, authenticated header of one frame."""

    kind: Kind
    sender: str
    seq: int
    time: float
    length: int
    digest: bytes
    codec: Codec
    fields: Mapping[str, FieldValue]


def payload_digest(parts: Sequence[Buffer]) -> bytes:
    """The digest of the concatenated parts; ``b""`` for an empty payload."""
    if sum(len(p) for p in parts) == 0:
        return b""
    return digest_parts(parts)


def make_header(
    kind: Kind,
    sender: str,
    seq: int,
    time: float,
    parts: Sequence[Buffer],
    *,
    codec: Codec | None = None,
    fields: Mapping[str, FieldValue] | None = None,
    digest: bytes | None = None,
) -> Header:
    """Build a header for ``parts``; pass ``digest`` when it is already known (precomputed chunk digests)."""
    length = sum(len(p) for p in parts)
    if codec is None:
        codec = Codec.NONE if length == 0 else Codec.RAW
    return Header(
        kind=kind,
        sender=sender,
        seq=seq,
        time=time,
        length=length,
        digest=payload_digest(parts) if digest is None else digest,
        codec=codec,
        fields=MappingProxyType(dict(fields or {})),
    )


def _mac(key: bytes, topic: bytes, body: bytes) -> bytes:
    # One-shot hmac.digest runs in C end to end; an hmac.new object costs several Python-level calls per
    # frame, which shows on the control path. Headers are small, so joining them first is cheap.
    return hmac.digest(key, b"".join((bytes((VERSION, len(topic))), topic, body)), "sha256")


def encode_header(topic: bytes, header: Header, key: bytes) -> bytes:
    """Serialize and sign ``header`` for ``topic``. Raises ValueError on values outside the layout."""
    if len(topic) > MAX_TOPIC_BYTES:
        raise ValueError(f"topic of {len(topic)} bytes exceeds {MAX_TOPIC_BYTES}")
    if not 0 <= header.seq <= MAX_SEQ:
        raise ValueError("seq outside 64 bits")
    body = pack(
        [
            int(header.kind),
            header.sender,
            header.seq,
            float(header.time),
            header.length,
            header.digest,
            int(header.codec),
            dict(header.fields),
        ]
    )
    return MAGIC + bytes((VERSION,)) + _mac(key, topic, body) + body


def encode_frame(topic: bytes, header: Header, parts: Sequence[Buffer], key: bytes) -> list[Buffer]:
    """The multipart message ``[topic, header, *parts]`` ready for ``send_multipart(copy=False)``."""
    return [topic, encode_header(topic, header, key), *parts]


def _field_ok(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int | bool | bytes)


def decode_header(
    topic: bytes, data: bytes, key: bytes, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> Header:
    """Authenticate and decode one header part. Raises a :class:`FrameError` subclass on any defect."""
    if len(topic) > MAX_TOPIC_BYTES:
        raise OversizeError(f"topic of {len(topic)} bytes")
    if len(data) < PREFIX_BYTES + 1 or data[:2] != MAGIC:
        raise FrameError("not an edgebus header")
    if data[2] != VERSION:
        raise VersionError(f"wire version {data[2]} (this node speaks {VERSION})")
    if len(data) > max_header_bytes:
        raise OversizeError(f"header of {len(data)} bytes exceeds {max_header_bytes}")
    body = data[PREFIX_BYTES:]
    # Lengths were checked above, so compare_digest always sees two 32-byte values.
    if not hmac.compare_digest(data[3:PREFIX_BYTES], _mac(key, topic, body)):
        raise SignatureError("header MAC does not verify")
    decoded = unpack_untrusted(body, max_bytes=max_header_bytes)
    if not isinstance(decoded, list) or len(decoded) != 8:
        raise FrameError("header body is not an 8-element array")
    kind, sender, seq, time, length, digest, codec, fields = decoded
    if type(kind) is not int or kind not in Kind._value2member_map_:
        raise FrameError(f"unknown kind {kind!r}")
    if not isinstance(sender, str) or not 0 < len(sender) <= MAX_SENDER_CHARS:
        raise FrameError("bad sender")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise FrameError("bad seq")
    if not isinstance(time, float) or not math.isfinite(time):
        raise FrameError("bad time")
    if type(length) is not int or length < 0:
        raise FrameError("bad length")
    if not isinstance(digest, bytes) or len(digest) != (DIGEST_BYTES if length else 0):
        raise FrameError("bad digest")
    if type(codec) is not int or codec not in Codec._value2member_map_:
        raise FrameError(f"unknown codec {codec!r}")
    if not isinstance(fields, dict) or not all(
        isinstance(k, str) and _field_ok(v) for k, v in fields.items()
    ):
        raise FrameError("bad fields")
    return Header(
        kind=Kind(kind),
        sender=sender,
        seq=seq,
        time=time,
        length=length,
        digest=digest,
        codec=Codec(codec),
        fields=MappingProxyType(fields),
    )


def check_payload(header: Header, parts: Sequence[Buffer], *, verify_digest: bool = True) -> None:
    """Check the payload parts against the signed length (always) and digest (unless told not to)."""
    length = sum(len(p) for p in parts)
    if length != header.length:
        raise FrameError(f"payload is {length} bytes, header says {header.length}")
    if (header.codec is Codec.NONE) != (length == 0):
        raise FrameError("codec does not match payload presence")
    if verify_digest and length and not hmac.compare_digest(payload_digest(parts), header.digest):
        raise SignatureError("payload digest does not match the signed header")


def decode_frame(
    parts: Sequence[Buffer],
    key: bytes,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_payload_bytes: int,
    verify_digest: bool = True,
) -> tuple[bytes, Header, list[memoryview]]:
    """Decode ``[topic, header, *payload]``: returns (topic, header, payload parts as memoryviews)."""
    if len(parts) < 2:
        raise FrameError(f"{len(parts)} parts; need at least topic and header")
    if len(parts) > 2 + 64:
        raise FrameError(f"{len(parts)} parts")
    topic = bytes(parts[0])
    header = decode_header(topic, bytes(parts[1]), key, max_header_bytes=max_header_bytes)
    payload = [memoryview(p) for p in parts[2:]]
    if header.length > max_payload_bytes:
        raise OversizeError(f"payload of {header.length} bytes exceeds {max_payload_bytes}")
    check_payload(header, payload, verify_digest=verify_digest)
    return topic, header, payload
