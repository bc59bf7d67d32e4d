"""Exceptions raised by :mod:`nodes` (agents, CLI, node benchmarks).

Every one is an error a user can cause (a bad config, an unreachable node, a refused question); the CLI
prints them as one line and exits 2. Errors of the packages underneath keep their own trees
(``edgebus.BusError``, ``qkv.QkvError``)::

    NodeError
    ├── ConfigFileError (ValueError)   a node config that cannot be used: names the key and the file
    ├── NodeUnreachable                no node answered at the endpoint in time
    ├── AskError                       the node refused or failed a request (unknown card, draining, ...)
    ├── NetnsError                     a network-namespace lab could not be built (not root, no ``ip``)
    └── BenchInputError (ValueError)   benchmark result files that cannot be read or merged
"""

from __future__ import annotations

from pathlib import Path


class NodeError(Exception):
    """Base of every error raised by :mod:`nodes`."""


class ConfigFileError(NodeError, ValueError):
    """A node config problem; ``key`` is the dotted TOML key (``""`` for the whole file)."""

    def __init__(self, file: Path | str, key: str, problem: str) -> None:
        self.file = Path(file)
        self.key = key
        self.problem = problem
        where = f"{self.file}: {key}" if key else str(self.file)
        super().__init__(f"{where}: {problem}")


class NodeUnreachable(NodeError):
    """No node answered at the given endpoint in time."""


class AskError(NodeError):
    """A node refused or failed a request; ``str()`` carries the node's reason."""


class NetnsError(NodeError):
    """A network namespace, veth link or qdisc could not be set up."""


class BenchInputError(NodeError, ValueError):
    """Benchmark result files that cannot be read or combined (other rows, other conditions, bad JSON)."""
