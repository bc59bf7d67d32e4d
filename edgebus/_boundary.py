"""Translation of dependency errors at the boundary.

Callers of :mod:`edgebus` never see ``zmq.ZMQError`` or a ``msgpack`` exception. Two entry points:

* :func:`zmq_errors` — a context manager mapping every ``zmq.ZMQError`` to :class:`TransportError`
  (``zmq.Again`` included: we always send with ``NOBLOCK`` and treat a full queue as a transport refusal).
* :func:`unpack_untrusted` — msgpack decoding of bytes from a peer with size limits; any decoding failure
  (every ``msgpack`` exception, plus the ``ValueError``/``TypeError``/``OverflowError``/``RecursionError``
  that ``unpackb`` can leak) becomes :class:`FrameError` with reason ``"malformed"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import msgpack
import zmq

from ._errors import FrameError, TransportError

#: Exceptions ``msgpack.unpackb`` may raise on hostile input (msgpack's own tree derives from these).
MSGPACK_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    msgpack.exceptions.UnpackException,
    msgpack.exceptions.ExtraData,
    msgpack.exceptions.FormatError,
    msgpack.exceptions.StackError,
    msgpack.exceptions.BufferFull,
    msgpack.exceptions.OutOfData,
    ValueError,
    TypeError,
    OverflowError,
    RecursionError,
)


@contextlib.contextmanager
def zmq_errors(action: str) -> Iterator[None]:
    """Translate ``zmq.ZMQError`` raised inside the block into :class:`TransportError`."""
    try:
        yield
    except zmq.ZMQError as exc:
        raise TransportError(f"{action}: {exc} (errno {exc.errno})") from exc


def unpack_untrusted(data: bytes | memoryview, *, max_bytes: int) -> Any:
    """Decode msgpack bytes from a peer. Raises :class:`FrameError` on anything but clean msgpack."""
    if len(data) > max_bytes:
        raise FrameError(f"msgpack body of {len(data)} bytes exceeds {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    except MSGPACK_DECODE_ERRORS as exc:
        raise FrameError(f"undecodable msgpack: {type(exc).__name__}") from exc


def pack(obj: Any) -> bytes:
    """Encode a local value with msgpack; an unencodable value is a local programming error (TypeError)."""
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data
