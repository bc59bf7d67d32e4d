"""The short-lived client behind ``edgebus send``, ``ask`` and ``status`` (and the demo and bench drivers).

A client is a bus node with no bind address that connects to one or more running nodes, waits until each
answers a heartbeat, and sends control requests (see :mod:`nodes.agent` for the ops). Its node id is
``client-<pid>-<random>`` so it never collides with a running node's. Bus failures are translated at this
boundary: no answer in time -> :class:`NodeUnreachable`; a refusal -> :class:`AskError` with the node's
reason.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edgebus import Bus, BusConfig, BusKeys, PeerAddress, PeerGone, RemoteError, RequestTimeout

from ._errors import AskError, NodeUnreachable

#: Seconds to wait for every target to answer its first heartbeat.
CONNECT_TIMEOUT_S: Final = 15.0
#: Poll interval while waiting for targets: the client does not know their node ids in advance.
_CONNECT_POLL_S: Final = 0.02


@dataclass(frozen=True, kw_only=True)
class Target:
    endpoint: str
    server_key: bytes | None = None


class Client:
    """A connected client; use :func:`connect`. ``nodes``: the node ids that answered, sorted."""

    def __init__(self, bus: Bus, nodes: Sequence[str]) -> None:
        self.bus = bus
        self.nodes = list(nodes)

    @property
    def node(self) -> str:
        """The only node (for clients of one target)."""
        if len(self.nodes) != 1:
            raise AskError(f"connected to {len(self.nodes)} nodes; name one")
        return self.nodes[0]

    async def request(self, node: str, payload: Mapping[str, Any], *, timeout_s: float) -> dict[str, Any]:
        try:
            return await self.bus.request(node, payload, timeout=timeout_s)
        except RemoteError as exc:
            raise AskError(f"{node}: {exc}") from None
        except RequestTimeout:
            raise NodeUnreachable(f"{node}: no reply within {timeout_s:.0f} s") from None
        except PeerGone as exc:
            raise NodeUnreachable(f"{node}: {exc}") from None


@asynccontextmanager
async def connect(
    targets: Sequence[Target], *, keys: BusKeys | None, timeout_s: float | None = None
) -> AsyncIterator[Client]:
    """Connect to every target and wait until each is live (NodeUnreachable after ``timeout_s``, default
    ``CONNECT_TIMEOUT_S``)."""
    unique = list({t.endpoint: t for t in targets}.values())
    with tempfile.TemporaryDirectory(prefix="edgebus-client-") as spool:
        config = BusConfig(
            node_id=f"client-{os.getpid()}-{secrets.token_hex(3)}",
            spool_dir=Path(spool),
            bind=None,
            connect=tuple(PeerAddress(endpoint=t.endpoint, server_key=t.server_key) for t in unique),
            keys=keys,
            insecure=keys is None,
        )
        async with Bus(config) as bus:
            wait = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
            nodes = await _wait_live(bus, [t.endpoint for t in unique], wait)
            yield Client(bus, nodes)


async def _wait_live(bus: Bus, endpoints: list[str], timeout_s: float) -> list[str]:
    # A client binds nothing, so every live peer is one of its targets; their node ids are learned from the
    # first heartbeat replies and not known in advance, so there is no id to wait_for_peer() on: poll.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        live = [p.node_id for p in bus.peers()]
        if len(live) >= len(endpoints):
            return sorted(live)
        if loop.time() > deadline:
            raise NodeUnreachable(
                f"{len(endpoints) - len(live)} of {', '.join(endpoints)} "
                f"did not answer within {timeout_s:.0f} s"
            )
        await asyncio.sleep(_CONNECT_POLL_S)


def _size(n: object) -> str:
    if not isinstance(n, int | float):
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _budget(b: object) -> str:
    if not isinstance(b, Mapping):
        return "-"
    policy = f", policy {b['policy']}" if b.get("policy") else ""
    return f"{b.get('bits')}-bit keep {b.get('keep')} layers {b.get('layers')}{policy}"


def format_status(report: Mapping[str, Any]) -> str:
    """Human-readable ``status`` reply: the node, then one line per live peer with its measured link."""
    mem = report.get("memory") or {}
    lines = [
        f"{report.get('node')} [{', '.join(report.get('roles') or [])}] model {report.get('model')} on "
        f"{report.get('device')}, prefill {float(report.get('prefill_tps') or 0):.0f} tokens/s, "
        f"RAM available {_size(mem.get('available'))} of {_size(mem.get('total'))}, "
        f"rss {_size(mem.get('rss'))}" + (" (draining)" if report.get("draining") else "")
    ]
    store = report.get("store")
    if isinstance(store, Mapping):
        lines.append(
            f"  store: {store.get('entries')} cards, {_size(store.get('bytes'))} of budget "
            f"{_size(store.get('budget'))}, {store.get('pinned')} pinned"
        )
    if "budget" in report:
        lines.append(f"  budget: {_budget(report['budget'])}")
    peers = report.get("peers") or []
    if not peers:
        lines.append("  peers: none live")
    for p in peers:
        info = p.get("info") or {}
        bw = p.get("bandwidth_bps") if p.get("samples") else None
        link = f"{_size(bw)}/s" if isinstance(bw, int | float) and bw > 0 else "no transfer yet"
        lines.append(
            f"  peer {p.get('node')} [{', '.join(p.get('roles') or [])}] seen {p.get('age_s')} s ago: "
            f"link {link}, rtt {float(p.get('rtt_s') or 0) * 1e3:.1f} ms, "
            f"headroom {_size(info.get('headroom'))}, prefill {info.get('prefill_tps', '-')} tokens/s, "
            f"budget {_budget(info.get('budget'))}"
        )
    return "\n".join(lines)
