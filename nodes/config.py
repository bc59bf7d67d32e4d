"""Node configs: one TOML file per agent, loaded once into frozen, typed objects.

Schema (every section but ``[node]`` optional; a role's section may be left out to take its defaults)::

    [node]
    name = "answerer"                     # bus node id
    model = "smollm2-135m-instruct"       # a model-store name, or a path to a Hugging Face directory
    device = "auto"                       # auto | cpu | cuda
    roles = ["answerer"]                  # any of reader, answerer, relay
    state_dir = "/var/lib/edgebus/a"      # default $EDGEBUS_STATE, else ~/.local/state/edgebus/<name>
    heap_retain_mib = 512                 # freed model memory kept for reuse (glibc); 0: glibc defaults
    heap_prefault = true                  # fault the retained heap in at start (fast first long answer)

    [bus]
    bind = "tcp://127.0.0.1:5560"         # omit for a node that only connects
    insecure = false                      # true: no CURVE, fixed HMAC key (loopback demos only)
    chunk_kib = 1024
    heartbeat_s = 1.0
    peer_timeout_s = 5.0
    stall_timeout_s = 60.0
    rate_limit_mbit = 20.0                # optional pull-rate cap
    [[bus.peers]]
    endpoint = "tcp://127.0.0.1:5550"     # a peer's control endpoint
    public_key = "keys/reader.key"        # its CURVE public key (required unless insecure)

    [keys]                                # required unless insecure
    secret = "keys/answerer.key_secret"
    allowed = "keys/allowed"              # directory of client *.key files allowed to connect
    hmac = "keys/hmac.key"

    [reader]     topic, bits, keep, layers, facts, documents = [paths], doc_topics = "doc/"
    rotation = "none"                     # fixed cards' coding: "hadamard-prerope" (v2 cards, 2-3x lower
    fp16_sinks = 0                        #   KL at the same bytes) and 1 fp16 sink token; see qkv._rotation
    translate = ["cal/a--b.safetensors"]  # cross-model calibrations from this node's model to others
                                          #   (`edgebus calibrate --sender --receiver`): receivers of
                                          #   those models get translated cards; others of another model
                                          #   get text
    translate_at = "receiver"             # or "sender": where the KV is translated
    [reader.policy]                       # what the reader sends each receiver (edgebus.BudgetPolicy)
    mode = "auto"                         # auto: decide per receiver and document; fixed: always a card
                                          #   at [reader] bits/keep/layers/facts
    table = "rq.json"                     # rate-quality table (default <model>-rq.json in the store's
                                          #   profiles/, then the one shipped in qkv/profiles/)
    quality_floor = 0.9                   # least quality relative to text (the table's metric)
    deadline_s = 2.0                      # optional TTFT target
    assumed_link_mbit = 10.0              # bandwidth assumed before the receiver has measured the link
    split = true                          # consider split hand-offs (head ids ahead, tail card behind)
    split_min_head = 256
    [answerer]   topics = "kv/", store_mib, reserve_mib, max_new_tokens, persist, card_wait_s,
                 calibrations = [paths]   # cross-model: calibrations from other senders' models to this
                                          #   one; cards of those models are translated here
    [relay]      topics = "kv/", out_topic, question, max_new_tokens, bits

Relative paths are relative to the config file's directory. Validation is complete at load: an unknown key,
a value of the wrong type or range, a missing or unreadable key file, a role section without its role: each
is a :class:`~nodes._errors.ConfigFileError` naming the dotted key and the file.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from ._errors import ConfigFileError

# qkv.ROTATIONS, repeated so that loading a config does not import torch (a test checks they agree).
CardRotation = Literal["none", "hadamard", "hadamard-prerope"]
CARD_ROTATIONS: Final = ("none", "hadamard", "hadamard-prerope")

ROLES: Final = ("reader", "answerer", "relay")
DEVICES: Final = ("auto", "cpu", "cuda")
#: ``[node] heap_retain_mib``: freed heap a node keeps for its next answer (nodes.heap). An answer from a
#: 4K-token card of SmolLM2-135M frees ~400 MB (the decoded fp32 KV, 189 MB, and the cache's copy of it);
#: mallopt takes an int, hence the cap.
DEFAULT_HEAP_RETAIN_MIB: Final = 512
MAX_HEAP_RETAIN_MIB: Final = 2047
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z", re.ASCII)
_TOPIC = re.compile(r"^[A-Za-z0-9_./:-]{1,200}\Z", re.ASCII)
_ENDPOINT = re.compile(r"^tcp://[^:/]+:\d{1,5}\Z", re.ASCII)
_BITS = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 16, 32})

Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True, kw_only=True)
class PeerConfig:
    endpoint: str
    public_key: Path | None = None


@dataclass(frozen=True, kw_only=True)
class KeysConfig:
    secret: Path
    allowed: Path
    hmac: Path


@dataclass(frozen=True, kw_only=True)
class BusSection:
    bind: str | None = None
    peers: tuple[PeerConfig, ...] = ()
    insecure: bool = False
    chunk_kib: int = 1024
    heartbeat_s: float = 1.0
    peer_timeout_s: float = 5.0
    stall_timeout_s: float = 60.0
    rate_limit_mbit: float | None = None


@dataclass(frozen=True, kw_only=True)
class ReaderPolicyConfig:
    mode: Literal["auto", "fixed"] = "auto"
    table: Path | None = None
    quality_floor: float = 0.9
    deadline_s: float | None = None
    assumed_link_mbit: float = 10.0
    split: bool = True
    split_min_head: int = 256


@dataclass(frozen=True, kw_only=True)
class ReaderConfig:
    topic: str
    bits: int = 4
    keep: float = 1.0
    layers: float = 1.0
    facts: bool = False
    rotation: CardRotation = "none"
    fp16_sinks: int = 0
    documents: tuple[Path, ...] = ()
    doc_topics: str | None = None
    policy: ReaderPolicyConfig = ReaderPolicyConfig()
    translate: tuple[Path, ...] = ()
    translate_at: Literal["receiver", "sender"] = "receiver"


@dataclass(frozen=True, kw_only=True)
class AnswererConfig:
    topics: str = "kv/"
    store_mib: int = 512
    reserve_mib: int = 256
    max_new_tokens: int = 24
    persist: bool = True
    card_wait_s: float = 60.0
    calibrations: tuple[Path, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    out_topic: str
    topics: str = "kv/"
    question: str = "What is this text about?"
    max_new_tokens: int = 16
    bits: int | None = None  # None: the width of the incoming card


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    file: Path
    name: str
    model: str
    device: Device
    roles: tuple[str, ...]
    state_dir: Path
    bus: BusSection
    keys: KeysConfig | None
    reader: ReaderConfig | None
    answerer: AnswererConfig | None
    relay: RelayConfig | None
    heap_retain_mib: int = DEFAULT_HEAP_RETAIN_MIB  # freed model memory kept for reuse (nodes.heap); 0: off
    heap_prefault: bool = True  # make the retained heap resident at start (nodes.heap.prefault_heap)

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def cards_dir(self) -> Path:
        return self.state_dir / "cards"


# ------------------------------------------------------------------------------------------------ loading


class _Table:
    """One TOML table being read: every key read is ticked off; what is left over is an unknown key."""

    def __init__(self, file: Path, prefix: str, data: object) -> None:
        if not isinstance(data, dict):
            raise ConfigFileError(file, prefix, "must be a table")
        self.file = file
        self.prefix = prefix
        self.data: dict[str, Any] = dict(data)
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigFileError:
        return ConfigFileError(self.file, self.key(name), problem)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., *, what: str = "") -> Any:
        self.seen.add(name)
        if name not in self.data:
            if default is ...:
                raise self.error(name, "missing")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int subclass: `true` must not pass as a number.
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            names = what or " or ".join(k.__name__ for k in kinds)
            raise self.error(name, f"expected {names}, got {type(value).__name__} {value!r}")
        return value

    def positive(self, name: str, kind: type, default: Any = ...) -> Any:
        value = self.get(name, kind, default)
        if value is not None and not value > 0:
            raise self.error(name, f"must be positive, got {value!r}")
        return value

    def fraction(self, name: str, default: float) -> float:
        value: float = self.get(name, float, default)
        if not 0 < value <= 1:
            raise self.error(name, f"must be in (0, 1], got {value!r}")
        return value

    def topic(self, name: str, default: Any = ...) -> Any:
        value = self.get(name, str, default)
        if value is not None and not _TOPIC.match(value):
            raise self.error(name, f"{value!r}: use 1-200 of [A-Za-z0-9_./:-]")
        return value

    def bits(self, name: str, default: Any = ...) -> Any:
        value = self.get(name, int, default)
        if value is not None and value not in _BITS:
            raise self.error(name, f"must be one of {sorted(_BITS)}, got {value!r}")
        return value

    def path(self, name: str, default: Any = ..., *, must_exist: str | None = None) -> Any:
        raw = self.get(name, str, default)
        if raw is None:
            return None
        path = Path(os.path.expanduser(raw))
        if not path.is_absolute():
            path = self.file.parent / path
        if must_exist == "file" and not path.is_file():
            raise self.error(name, f"{path}: no such file")
        if must_exist == "dir" and not path.is_dir():
            raise self.error(name, f"{path}: no such directory")
        return path

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def load_node_config(path: Path | str, *, env: Mapping[str, str] | None = None) -> NodeConfig:
    """Read and validate ``path``; ``env`` (default ``os.environ``) supplies ``EDGEBUS_STATE``."""
    file = Path(path)
    env = os.environ if env is None else env
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigFileError(file, "", f"cannot read: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigFileError(file, "", f"not valid TOML: {exc}") from exc
    top = _Table(file, "", raw)

    node = _Table(file, "node", top.get("node", dict, what="a [node] table"))
    name = node.get("name", str)
    if not _NAME.match(name):
        raise node.error("name", f"{name!r}: 1-64 of [A-Za-z0-9_.:-]")
    model = node.get("model", str)
    if model.startswith((".", "/", "~")) or os.sep in model:
        model = str(node.path("model", must_exist="dir"))
    device = node.get("device", str, "auto")
    if device not in DEVICES:
        raise node.error("device", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    roles_raw = node.get("roles", list, [])
    if not roles_raw or not all(isinstance(r, str) and r in ROLES for r in roles_raw):
        raise node.error("roles", f"must be a non-empty list of {', '.join(ROLES)}, got {roles_raw!r}")
    roles = tuple(dict.fromkeys(roles_raw))
    default_state = env.get("EDGEBUS_STATE") or str(Path.home() / ".local" / "state" / "edgebus" / name)
    state_dir = node.path("state_dir", default_state)
    heap_retain_mib = node.get("heap_retain_mib", int, DEFAULT_HEAP_RETAIN_MIB)
    if not 0 <= heap_retain_mib <= MAX_HEAP_RETAIN_MIB:
        raise node.error("heap_retain_mib", f"must be in 0..{MAX_HEAP_RETAIN_MIB}, got {heap_retain_mib!r}")
    heap_prefault = node.get("heap_prefault", bool, True)
    node.finish()

    bus = _bus_section(_Table(file, "bus", top.get("bus", dict, {})))
    keys: KeysConfig | None = None
    if "keys" in raw:
        kt = _Table(file, "keys", top.get("keys", dict))
        keys = KeysConfig(
            secret=kt.path("secret", must_exist="file"),
            allowed=kt.path("allowed", must_exist="dir"),
            hmac=kt.path("hmac", must_exist="file"),
        )
        kt.finish()
        _check_key_files(file, keys)
    elif not bus.insecure:
        raise ConfigFileError(file, "keys", "missing (or set bus.insecure = true, loopback demos only)")
    if not bus.insecure:
        for index, peer in enumerate(bus.peers):
            if peer.public_key is None:
                raise ConfigFileError(file, f"bus.peers[{index}].public_key", "missing (CURVE needs it)")

    sections: dict[str, Any] = {}
    for role in ROLES:
        present = role in raw
        if present and role not in roles:
            raise ConfigFileError(file, role, f"section given but {role!r} is not in node.roles")
        if role in roles:
            table = _Table(file, role, top.get(role, dict, {}))
            sections[role] = _ROLE_READERS[role](table, name)
            table.finish()
    top.finish()
    if "reader" in roles and bus.bind is None:
        raise ConfigFileError(file, "bus.bind", "a reader publishes cards and needs a bind address")
    if "relay" in roles and bus.bind is None:
        raise ConfigFileError(file, "bus.bind", "a relay publishes cards and needs a bind address")
    return NodeConfig(
        file=file,
        name=name,
        model=model,
        device=device,
        roles=roles,
        state_dir=state_dir,
        bus=bus,
        keys=keys,
        reader=sections.get("reader"),
        answerer=sections.get("answerer"),
        relay=sections.get("relay"),
        heap_retain_mib=heap_retain_mib,
        heap_prefault=heap_prefault,
    )


def _bus_section(t: _Table) -> BusSection:
    bind = t.get("bind", str, None)
    if bind is not None and not _ENDPOINT.match(bind):
        raise t.error("bind", f"{bind!r} is not tcp://HOST:PORT")
    peers: list[PeerConfig] = []
    for index, item in enumerate(t.get("peers", list, [])):
        pt = _Table(t.file, f"bus.peers[{index}]", item)
        endpoint = pt.get("endpoint", str)
        if not _ENDPOINT.match(endpoint):
            raise pt.error("endpoint", f"{endpoint!r} is not tcp://HOST:PORT")
        peers.append(PeerConfig(endpoint=endpoint, public_key=pt.path("public_key", None, must_exist="file")))
        pt.finish()
    section = BusSection(
        bind=bind,
        peers=tuple(peers),
        insecure=t.get("insecure", bool, False),
        chunk_kib=t.positive("chunk_kib", int, 1024),
        heartbeat_s=t.positive("heartbeat_s", float, 1.0),
        peer_timeout_s=t.positive("peer_timeout_s", float, 5.0),
        stall_timeout_s=t.positive("stall_timeout_s", float, 60.0),
        rate_limit_mbit=t.positive("rate_limit_mbit", float, None),
    )
    if section.peer_timeout_s <= section.heartbeat_s:
        raise t.error("peer_timeout_s", "must exceed heartbeat_s")
    if section.chunk_kib > 4096:
        raise t.error("chunk_kib", "at most 4096 (4 MiB chunks)")
    t.finish()
    return section


def _check_key_files(file: Path, keys: KeysConfig) -> None:
    """Read every key file now, so a bad one is reported against its key, not at bus start."""
    from edgebus import ConfigError, load_hmac_key, load_keypair, load_public_keys

    for key, action in (
        ("keys.secret", lambda: load_keypair(keys.secret)),
        ("keys.allowed", lambda: load_public_keys(keys.allowed)),
        ("keys.hmac", lambda: load_hmac_key(keys.hmac)),
    ):
        try:
            action()
        except ConfigError as exc:
            raise ConfigFileError(file, key, str(exc)) from exc


def _reader(t: _Table, name: str) -> ReaderConfig:
    return ReaderConfig(
        topic=t.topic("topic", f"kv/{name}"),
        bits=t.bits("bits", 4),
        keep=t.fraction("keep", 1.0),
        layers=t.fraction("layers", 1.0),
        facts=t.get("facts", bool, False),
        rotation=_rotation(t),
        fp16_sinks=_fp16_sinks(t),
        documents=tuple(_paths(t, "documents")),
        doc_topics=t.topic("doc_topics", None),
        policy=_reader_policy(_Table(t.file, "reader.policy", t.get("policy", dict, {}))),
        translate=tuple(_paths(t, "translate")),
        translate_at=_translate_at(t),
    )


def _rotation(t: _Table) -> CardRotation:
    value: str = t.get("rotation", str, "none")
    for known in CARD_ROTATIONS:
        if value == known:
            return known
    raise t.error("rotation", f"must be one of {', '.join(CARD_ROTATIONS)}, got {value!r}")


def _fp16_sinks(t: _Table) -> int:
    value: int = t.get("fp16_sinks", int, 0)
    if not 0 <= value <= 64:
        raise t.error("fp16_sinks", f"must be in 0..64, got {value}")
    return value


def _translate_at(t: _Table) -> Literal["receiver", "sender"]:
    at = t.get("translate_at", str, "receiver")
    if at not in ("receiver", "sender"):
        raise t.error("translate_at", f"must be receiver or sender, got {at!r}")
    return "sender" if at == "sender" else "receiver"


def _reader_policy(t: _Table) -> ReaderPolicyConfig:
    mode = t.get("mode", str, "auto")
    if mode not in ("auto", "fixed"):
        raise t.error("mode", f"must be auto or fixed, got {mode!r}")
    floor = t.get("quality_floor", float, 0.9)
    if not 0 <= floor <= 1:
        raise t.error("quality_floor", f"must be in [0, 1] (relative to text), got {floor!r}")
    min_head = t.positive("split_min_head", int, 256)
    config = ReaderPolicyConfig(
        mode=mode,
        table=t.path("table", None, must_exist="file"),
        quality_floor=floor,
        deadline_s=t.positive("deadline_s", float, None),
        assumed_link_mbit=t.positive("assumed_link_mbit", float, 10.0),
        split=t.get("split", bool, True),
        split_min_head=min_head,
    )
    t.finish()
    return config


def _paths(t: _Table, name: str) -> list[Path]:
    items = t.get(name, list, [])
    out: list[Path] = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise t.error(f"{name}[{index}]", f"expected str, got {type(item).__name__}")
        path = Path(os.path.expanduser(item))
        path = path if path.is_absolute() else t.file.parent / path
        if not path.is_file():
            raise t.error(f"{name}[{index}]", f"{path}: no such file")
        out.append(path)
    return out


def _answerer(t: _Table, _: str) -> AnswererConfig:
    return AnswererConfig(
        topics=t.topic("topics", "kv/"),
        store_mib=t.positive("store_mib", int, 512),
        reserve_mib=t.get("reserve_mib", int, 256),
        max_new_tokens=t.positive("max_new_tokens", int, 24),
        persist=t.get("persist", bool, True),
        card_wait_s=t.positive("card_wait_s", float, 60.0),
        calibrations=tuple(_paths(t, "calibrations")),
    )


def _relay(t: _Table, name: str) -> RelayConfig:
    return RelayConfig(
        out_topic=t.topic("out_topic", f"kv/{name}"),
        topics=t.topic("topics", "kv/"),
        question=t.get("question", str, "What is this text about?"),
        max_new_tokens=t.positive("max_new_tokens", int, 16),
        bits=t.bits("bits", None),
    )


_ROLE_READERS = {"reader": _reader, "answerer": _answerer, "relay": _relay}


def bus_config(cfg: NodeConfig) -> Any:
    """The :class:`edgebus.BusConfig` for this node (key files were checked at load)."""
    from edgebus import BusConfig, BusKeys, PeerAddress, load_public_key

    keys = None if cfg.keys is None else BusKeys.from_files(cfg.keys.secret, cfg.keys.allowed, cfg.keys.hmac)
    peers = tuple(
        PeerAddress(
            endpoint=p.endpoint,
            server_key=None if keys is None or p.public_key is None else load_public_key(p.public_key),
        )
        for p in cfg.bus.peers
    )
    b = cfg.bus
    rate = None if b.rate_limit_mbit is None else b.rate_limit_mbit * 1e6 / 8
    chunk = b.chunk_kib << 10
    return BusConfig(
        node_id=cfg.name,
        spool_dir=cfg.spool_dir,
        bind=b.bind,
        connect=peers,
        keys=keys,
        insecure=keys is None and b.insecure,
        roles=cfg.roles,
        chunk_bytes=chunk,
        credit_bytes=max(8 << 20, 2 * chunk),
        heartbeat_s=b.heartbeat_s,
        peer_timeout_s=b.peer_timeout_s,
        stall_timeout_s=b.stall_timeout_s,
        rate_limit_bps=rate,
    )
