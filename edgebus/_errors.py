"""Exceptions raised by :mod:`edgebus`.

Callers never see a raw ``zmq.ZMQError`` or ``msgpack`` exception: they are translated at the boundary::

    BusError
    ├── ConfigError (ValueError)          bad or missing bus/security configuration
    │   └── InsecureRefused               no keys configured and insecure mode not asked for by name
    ├── FrameError (ValueError)           a frame from a peer that we reject (always counted)
    │   ├── SignatureError                HMAC missing or wrong
    │   ├── ReplayError                   sequence/time outside the replay window
    │   ├── VersionError                  unknown wire version
    │   └── OversizeError                 longer than the configured maximum
    ├── PayloadTooLarge (ValueError)      we refuse to send something over a configured limit
    ├── TransferError                     a card transfer failed for good
    │   ├── DigestMismatch                reassembled payload does not hash to the announced digest
    │   └── AlreadyDelivered              the card was already delivered once (remembered in the spool)
    ├── PeerGone                          the peer expired (no heartbeat) or refused us
    ├── RemoteError                       the peer's request handler failed; ``str()`` is its message
    ├── RequestTimeout (TimeoutError)     no reply in time
    ├── ClosedError                       used after close() (you closed it)
    ├── TransportError                    the socket layer broke under us (translated zmq errors)
    └── StoreError                        card store refused an operation
        ├── StoreFull                     cannot fit even after evicting every unpinned card
        └── CardNotFound (KeyError)       no card with that id
"""

from __future__ import annotations


class BusError(Exception):
    """Base of every error raised by edgebus."""


class ConfigError(BusError, ValueError):
    """Configuration that cannot be used."""


class InsecureRefused(ConfigError):
    """No CURVE keys configured and insecure mode was not requested by name."""


class FrameError(BusError, ValueError):
    """A frame we reject. ``reason`` is the counter key in statistics snapshots."""

    reason = "malformed"


class SignatureError(FrameError):
    reason = "signature"


class ReplayError(FrameError):
    reason = "replay"


class VersionError(FrameError):
    reason = "version"


class OversizeError(FrameError):
    reason = "oversize"


class PayloadTooLarge(BusError, ValueError):
    """We refuse to send a payload over a configured limit (checked before sending, so the peer's
    ``MAXMSGSIZE`` never disconnects us)."""


class TransferError(BusError):
    """A transfer that cannot complete."""


class DigestMismatch(TransferError):
    """The reassembled payload does not match its announced digest."""


class AlreadyDelivered(TransferError):
    """This card id was already delivered to the application (exactly-once delivery)."""


class PeerGone(BusError):
    """The peer stopped answering or refused us."""


class RemoteError(BusError):
    """The peer received the request but its handler failed or refused it."""


class RequestTimeout(BusError, TimeoutError):
    """No reply arrived in time."""


class ClosedError(BusError):
    """The object was closed by its owner."""


class TransportError(BusError):
    """The socket layer failed (a translated ``zmq.ZMQError``)."""


class StoreError(BusError):
    """The card store refused an operation."""


class StoreFull(StoreError):
    """The card does not fit even after evicting every unpinned card."""


class CardNotFound(StoreError, KeyError):
    """No card with that id is in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "card not found"
