"""Helpers for tests that run real node processes: configs for a reader, a relay and an answerer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgebus import BusKeys
from nodes.demo_processes import free_port_base, keys_section, write_node_config

__all__ = ["client_keys", "free_port_base", "node_config"]

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
