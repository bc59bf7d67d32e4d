"""Node processes for the demo, the hand-off benchmark and the multi-process tests.

:class:`NodeProcess` runs ``python -m nodes.cli node --config FILE --events`` (optionally under a prefix such
as ``ip netns exec NS``) and follows its JSON-lines events: readiness is the ``ready`` event, never a
sleep. :func:`write_fleet_keys` makes CURVE key pairs and the HMAC key for a set of node names.

:func:`run_over_bus` is ``edgebus demo`` over real processes: a reader and an answerer on loopback with
generated keys in a temporary directory, driven by a client bus in this process. Per bundled context: the
reader prefills it and publishes a card; the answerer pulls the card and answers from it (its TTFT plus the
pull time is the card TTFT); the same answerer then re-prefills the text (the baseline). Processes are
always stopped (SIGTERM, then SIGKILL after a grace period), whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

from ._errors import NodeError

if TYPE_CHECKING:
    from .demo import HandoffResult

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
#: Seconds a node may take from start to its ``ready`` event (model load included).
READY_TIMEOUT_S: Final = 180.0
#: Seconds a node gets to drain and exit after SIGTERM before it is killed.
STOP_GRACE_S: Final = 30.0
#: Seconds to wait for one model-backed request (a 4K-token re-prefill takes about 30 s on 2 vCPUs).
REQUEST_TIMEOUT_S: Final = 600.0

Event = dict[str, Any]


class NodeProcess:
    """A running node and the events it printed so far."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read_events())

    @classmethod
    async def start(
        cls,
        name: str,
        config: Path,
        *,
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> NodeProcess:
        log_path = (log_dir or config.parent) / f"{name}.log"
        merged = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *prefix, sys.executable, "-m", "nodes.cli", "node", "--config", str(config), "--events",
                cwd=REPO_ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=log, env=merged,
            )  # fmt: skip
        return cls(name, proc, log_path)

    async def _read_events(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    self.events.append(event)
            self._wake()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def event(
        self, name: str, *, where: Callable[[Event], bool] = lambda _: True, timeout_s: float = 60.0
    ) -> Event:
        """The first event called ``name`` matching ``where``, printed already or yet to come."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    for event in self.events:
                        if event.get("event") == name and where(event):
                            return event
                    if self._reader.done():
                        raise NodeError(
                            f"node {self.name} exited (rc={self.proc.returncode}) before a {name!r} event:\n"
                            f"{self.log_tail()}"
                        )
                    await self._changed.wait()
        except TimeoutError:
            raise NodeError(
                f"node {self.name}: no {name!r} event within {timeout_s} s:\n{self.log_tail()}"
            ) from None

    def count(self, name: str, where: Callable[[Event], bool] = lambda _: True) -> int:
        return sum(1 for e in self.events if e.get("event") == name and where(e))

    async def ready(self, timeout_s: float = READY_TIMEOUT_S) -> Event:
        return await self.event("ready", timeout_s=timeout_s)

    async def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL. Returns the exit code."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace_s):
                    await self.proc.wait()
            except TimeoutError:
                self.kill()
        return await self._finish()

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def _finish(self) -> int:
        rc = await self.proc.wait()
        await self._reader
        return rc


@contextlib.asynccontextmanager
async def node_group() -> AsyncIterator[list[NodeProcess]]:
    """A list to put started nodes in; every one is stopped on the way out, also on errors."""
    nodes: list[NodeProcess] = []
    try:
        yield nodes
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


def write_fleet_keys(directory: Path, names: Sequence[str]) -> Path:
    """``NAME.key``/``NAME.key_secret`` for each name, ``allowed/`` with every public key, ``hmac.key``."""
    from edgebus import new_hmac_key, new_keypair

    allowed = directory / "allowed"
    allowed.mkdir(parents=True, exist_ok=True)
    for name in names:
        public, _ = new_keypair(name, directory)
        (allowed / public.name).write_bytes(public.read_bytes())
    new_hmac_key(directory / "hmac.key")
    return directory


def free_port_base(host: str = "127.0.0.1") -> int:
    """A port P with P, P+1, P+2 free now (a node binds all three), so nodes can start concurrently."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000)
        socks = []
        try:
            for offset in range(3):
                s = socket.socket()
                socks.append(s)
                s.bind((host, base + offset))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no three consecutive free ports found")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def write_node_config(
    path: Path, sections: dict[str, dict[str, Any]], peers: Sequence[dict[str, Any]] = ()
) -> Path:
    """Write a node config from plain dicts (``peers`` become ``[[bus.peers]]`` tables)."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    for peer in peers:
        lines.append("[[bus.peers]]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in peer.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def keys_section(keys: Path, name: str) -> dict[str, Any]:
    return {"secret": keys / f"{name}.key_secret", "allowed": keys / "allowed", "hmac": keys / "hmac.key"}


# ------------------------------------------------------------------------------------------------ demo


async def _run_over_bus(
    model: str, bits: int, limit: int, max_new_tokens: int, out: IO[str] | None
) -> list[HandoffResult]:
    from edgebus import BusKeys, load_public_key

    from .demo import HandoffResult, print_result, sample_rows
    from .roles_client import Target, connect

    rows = sample_rows(limit)
    results: list[HandoffResult] = []
    with tempfile.TemporaryDirectory(prefix="edgebus-demo-") as tmp:
        root = Path(tmp)
        keys = write_fleet_keys(root / "keys", ("reader", "answerer", "client"))
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
        async with node_group() as nodes:
            reader_cfg = write_node_config(
                root / "reader.toml",
                {
                    "node": {
                        "name": "reader",
                        "model": model,
                        "roles": ["reader"],
                        "state_dir": root / "reader",
                    },
                    "bus": {"bind": "tcp://127.0.0.1:0"},
                    "keys": keys_section(keys, "reader"),
                    "reader": {"topic": "kv/demo", "bits": bits},
                },
            )
            reader = await NodeProcess.start("reader", reader_cfg, env=env)
            nodes.append(reader)
            reader_ready = await reader.ready()
            answerer_cfg = write_node_config(
                root / "answerer.toml",
                {
                    "node": {
                        "name": "answerer",
                        "model": model,
                        "roles": ["answerer"],
                        "state_dir": root / "answerer",
                    },
                    "bus": {"bind": "tcp://127.0.0.1:0"},
                    "keys": keys_section(keys, "answerer"),
                    "answerer": {"topics": "kv/", "persist": False, "max_new_tokens": max_new_tokens},
                },
                peers=[{"endpoint": reader_ready["control"], "public_key": keys / "reader.key"}],
            )
            answerer = await NodeProcess.start("answerer", answerer_cfg, env=env)
            nodes.append(answerer)
            answerer_ready = await answerer.ready()
            client_keys = BusKeys.from_files(keys / "client.key_secret", keys / "allowed", keys / "hmac.key")
            targets = [
                Target(endpoint=reader_ready["control"], server_key=load_public_key(keys / "reader.key")),
                Target(endpoint=answerer_ready["control"], server_key=load_public_key(keys / "answerer.key")),
            ]
            async with connect(targets, keys=client_keys) as client:
                # Warm-up: the first generation of a process pays one-off allocation costs.
                await client.request(
                    "answerer",
                    {
                        "op": "ask_text",
                        "context": rows[0].context,
                        "question": rows[0].question,
                        "max_new_tokens": 2,
                    },
                    timeout_s=REQUEST_TIMEOUT_S,
                )
                for index, row in enumerate(rows, 1):
                    sent = await client.request(
                        "reader", {"op": "read", "text": row.context}, timeout_s=REQUEST_TIMEOUT_S
                    )
                    card = await client.request(
                        "answerer",
                        {
                            "op": "ask", "card": sent["card"], "question": row.question,
                            "max_new_tokens": max_new_tokens, "wait_s": REQUEST_TIMEOUT_S / 2,
                        },
                        timeout_s=REQUEST_TIMEOUT_S,
                    )  # fmt: skip
                    text = await client.request(
                        "answerer",
                        {
                            "op": "ask_text", "context": row.context, "question": row.question,
                            "max_new_tokens": max_new_tokens,
                        },
                        timeout_s=REQUEST_TIMEOUT_S,
                    )  # fmt: skip
                    result = HandoffResult(
                        row=row,
                        context_tokens=int(sent["context_tokens"]),
                        card_bytes=int(sent["card_bytes"]),
                        fp16_bytes=int(sent["fp16_bytes"]),
                        text_bytes=len(row.context.encode()),
                        card_answer=str(card["answer"]),
                        text_answer=str(text["answer"]),
                        card_ttft_s=float(card["transfer_s"]) + float(card["ttft_s"]),
                        text_ttft_s=float(text["ttft_s"]),
                        encode_s=float(sent["encode_s"]),
                        transfer_s=float(card["transfer_s"]),
                    )
                    if out is not None:
                        print_result(index, len(rows), result, bits)
                    results.append(result)
    return results


def run_over_bus(model: str, bits: int, limit: int, max_new_tokens: int) -> list[HandoffResult]:
    """``edgebus demo`` over a reader and an answerer process; returns one ``HandoffResult`` per context."""
    return asyncio.run(_run_over_bus(model, bits, limit, max_new_tokens, sys.stdout))
