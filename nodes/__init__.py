"""nodes: the agent processes (reader, answerer, relay roles) and the ``edgebus`` command line.

Kept light on purpose: importing ``nodes`` (as the CLI does on every command) loads neither torch nor zmq;
the agent and the roles import them when they run.
"""

from ._errors import AskError, BenchInputError, ConfigFileError, NetnsError, NodeError, NodeUnreachable
from .config import NodeConfig, load_node_config

__all__ = [
    "AskError",
    "BenchInputError",
    "ConfigFileError",
    "NetnsError",
    "NodeConfig",
    "NodeError",
    "NodeUnreachable",
    "load_node_config",
]
