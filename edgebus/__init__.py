"""edgebus: an asyncio ZeroMQ bus that moves CacheCards (opaque bytes) and small control messages.

    async with Bus(config) as bus:
        card_id = await bus.publish_card("kv/doc", data, meta={...})
        async for ann in bus.announcements("kv/"):
            data = await bus.fetch_card(ann)

See :mod:`edgebus._bus` for the socket layout and :mod:`edgebus._frame` for the wire format.
"""

from ._announce import Announcement, AnnouncementStream
from ._bus import Bus, BusEndpoints, BusState, PeerInfo, RequestHandler
from ._cardstore import CardStore, CardStoreConfig, CardStoreStatistics, InvalidCardId
from ._config import BusConfig, BusKeys, PeerAddress
from ._errors import (
    AlreadyDelivered,
    BusError,
    CardNotFound,
    ClosedError,
    ConfigError,
    DigestMismatch,
    FrameError,
    InsecureRefused,
    OversizeError,
    PayloadTooLarge,
    PeerGone,
    RemoteError,
    ReplayError,
    RequestTimeout,
    SignatureError,
    StoreError,
    StoreFull,
    TransferError,
    TransportError,
    VersionError,
)
from ._keys import load_hmac_key, load_keypair, load_public_key, load_public_keys, new_hmac_key, new_keypair
from ._link import LinkEstimate
from ._memory import MemoryProbe, MemoryReading, PsutilMemoryProbe, ScriptedMemoryProbe
from ._policy import (
    DEFAULT_INJECT_BYTES_PER_S,
    DEFAULT_ROTATE_BYTES_PER_S,
    HEAD_ID_BYTES,
    KL_QUALITY_METRIC,
    BudgetPolicy,
    Decision,
    InvalidPolicyInput,
    NoFeasibleRepresentation,
    PointKey,
    PolicyConfig,
    PolicyError,
    PolicyInputs,
    RateQualityPoint,
    RateQualityTable,
    Representation,
    balanced_head,
    predict_split,
    split_quality,
)
from ._sdnotify import Notifier, WatchdogPinger
from ._spool import DELIVERED_KEPT
from ._stats import BusStats

__all__ = [
    "DEFAULT_INJECT_BYTES_PER_S",
    "DEFAULT_ROTATE_BYTES_PER_S",
    "DELIVERED_KEPT",
    "HEAD_ID_BYTES",
    "KL_QUALITY_METRIC",
    "AlreadyDelivered",
    "Announcement",
    "AnnouncementStream",
    "BudgetPolicy",
    "Bus",
    "BusConfig",
    "BusEndpoints",
    "BusError",
    "BusKeys",
    "BusState",
    "BusStats",
    "CardNotFound",
    "CardStore",
    "CardStoreConfig",
    "CardStoreStatistics",
    "ClosedError",
    "ConfigError",
    "Decision",
    "DigestMismatch",
    "FrameError",
    "InsecureRefused",
    "InvalidCardId",
    "InvalidPolicyInput",
    "LinkEstimate",
    "MemoryProbe",
    "MemoryReading",
    "NoFeasibleRepresentation",
    "Notifier",
    "OversizeError",
    "PayloadTooLarge",
    "PeerAddress",
    "PeerGone",
    "PeerInfo",
    "PointKey",
    "PolicyConfig",
    "PolicyError",
    "PolicyInputs",
    "PsutilMemoryProbe",
    "RateQualityPoint",
    "RateQualityTable",
    "RemoteError",
    "ReplayError",
    "Representation",
    "RequestHandler",
    "RequestTimeout",
    "ScriptedMemoryProbe",
    "SignatureError",
    "StoreError",
    "StoreFull",
    "TransferError",
    "TransportError",
    "VersionError",
    "WatchdogPinger",
    "balanced_head",
    "load_hmac_key",
    "load_keypair",
    "load_public_key",
    "load_public_keys",
    "new_hmac_key",
    "new_keypair",
    "predict_split",
    "split_quality",
]
