"""Helpers for tests that run real node processes: configs for a reader, a relay and an answerer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgebus import BusKeys
from nodes.demo_processes import free_port_base, keys_section, write_node_config

__all__ = ["client_keys", "free_port_base", "node_config", "reader_sees"]

FLEET = ("reader", "relay", "answerer", "client")
QUESTION = "Who wrote the first program?"
DOCUMENT = (
    "Ada Lovelace wrote the first program for the Analytical Engine in 1843. Charles Babbage designed the "
    "engine in London; it was never finished. Her notes describe how it could compute Bernoulli numbers."
)


def node_config(
    root: Path,
    name: str,
    model: Path,
    keys: Path,
    *,
    roles: list[str],
    bind: str | None,
    peers: list[tuple[str, str]] = (),  # type: ignore[assignment]
    bus: dict[str, Any] | None = None,
    **role_sections: dict[str, Any],
) -> Path:
    """One node's config; ``peers`` are (endpoint, peer name) pairs whose public keys are in ``keys``."""
    sections: dict[str, dict[str, Any]] = {
        "node": {"name": name, "model": model, "device": "cpu", "roles": roles, "state_dir": root / name},
        "bus": {**({"bind": bind} if bind else {}), "heartbeat_s": 0.5, "peer_timeout_s": 3.0, **(bus or {})},
        "keys": keys_section(keys, name),
        **role_sections,
    }
    return write_node_config(
        root / f"{name}.toml",
        sections,
        peers=[{"endpoint": endpoint, "public_key": keys / f"{peer}.key"} for endpoint, peer in peers],
    )


def client_keys(keys: Path) -> BusKeys:
    """The test client's keys from a fleet's key directory (``write_fleet_keys`` with a ``client``)."""
    return BusKeys.from_files(keys / "client.key_secret", keys / "allowed", keys / "hmac.key")


async def reader_sees(
    client: Any, wanted: Callable[[Mapping[str, Any]], bool], *, timeout_s: float = 30.0
) -> None:
    """Poll the reader's status until ``wanted(peers)`` holds (peers: node name -> its presence info).

    The reader decides per receiver it sees and addresses a card to those: a read issued before a receiver's
    first presence arrives leaves that receiver out.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        status = await client.request("reader", {"op": "status"}, timeout_s=10)
        peers = {p["node"]: p["info"] for p in status["peers"]}
        if wanted(peers):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the reader saw only {sorted(peers)} within {timeout_s} s")
        await asyncio.sleep(0.1)
