"""An agent node: one process, one model, one bus; roles from its config (reader, answerer, relay).

Lifecycle (:func:`run_node`)::

    load config -> STATUS=loading model -> load model (thread) -> open bus (bind, connect)
    -> load persisted cards -> measure prefill speed -> start roles -> READY=1 (+ "ready" event)
    -> serve until SIGTERM/SIGINT -> drain (up to DRAIN_TIMEOUT_S) -> persist cards -> STOPPING=1 -> close

Contracts:

* **Model work never runs on the event loop.** Every prefill, decode and generation goes through one model
  thread (:class:`ModelWorker`): torch on one model is not re-entrant, and the loop must keep answering
  heartbeats and pinging the systemd watchdog (pinged from the loop itself, so a wedged loop is caught).
* **Control requests** (``Bus.request`` to this node; every reply a map, failures a ``RemoteError`` at the
  caller): ``{"op": "read", "text", "topic"?}`` (reader: prefill, publish a card, reply with its id and
  sizes); ``{"op": "ask", "card", "question", "max_new_tokens"?, "wait_s"?}`` (answerer/relay: answer from
  a held card, waiting up to ``wait_s`` for it to arrive); ``{"op": "ask_text", "context", "question"}``
  (re-prefill baseline); ``{"op": "status"}``.
* **Cards received** are checked (header, model fingerprint) before they are stored; a card is pinned in
  the store while a question uses it. Delivery is exactly once per spool (the bus remembers delivered ids
  across restarts); a card that was delivered before a crash and persisted comes back from the store.
* **Drain**: on SIGTERM the node stops taking new work (requests get "draining"), waits up to
  ``DRAIN_TIMEOUT_S`` for running transfers, relays and answers, cancels what is left (a cancelled transfer
  keeps its verified chunks in the spool and resumes after restart), persists the store atomically if
  configured, sends STOPPING=1 and closes the bus.
* **Events**: with ``events`` on, one JSON object per line on stdout (``ready``, ``card_published``,
  ``card_received``, ``card_relayed``, ``card_rejected``, ``stopping``, ``stopped``): how tests and the
  demo follow a node without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import IO, Any, Final, TypeVar

from edgebus import (
    AlreadyDelivered,
    Announcement,
    Bus,
    BusError,
    CardStore,
    CardStoreConfig,
    MemoryProbe,
    Notifier,
    PeerGone,
    PsutilMemoryProbe,
    TransferError,
    WatchdogPinger,
)

from ._errors import AskError
from .config import AnswererConfig, NodeConfig, bus_config

log = logging.getLogger("nodes.agent")

#: Seconds a stopping node waits for running transfers and model work before cancelling them.
DRAIN_TIMEOUT_S: Final = 20.0
#: Seconds between presence-info refreshes (memory headroom, cards held).
PRESENCE_INTERVAL_S: Final = 2.0
#: Attempts to pull one announced card before giving up on it (backoff doubles from RETRY_BASE_S).
FETCH_ATTEMPTS: Final = 5
RETRY_BASE_S: Final = 0.5
#: Default wait of an ``ask`` for a card that has not arrived yet.
DEFAULT_ASK_WAIT_S: Final = 0.0

T = TypeVar("T")


class EventLog:
    """JSON-lines events on a stream (stdout), or nothing when disabled."""

    def __init__(self, stream: IO[str] | None) -> None:
        self._stream = stream

    def emit(self, event: str, **fields: Any) -> None:
        if self._stream is None:
            return
        self._stream.write(json.dumps({"event": event, "t": time.time(), **fields}, default=str) + "\n")
        self._stream.flush()


class ModelWorker:
    """One thread for all model work, so torch calls are serialised and the event loop stays free."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgebus-model")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    async def aclose(self) -> None:
        """Wait for the job in progress (if any) and stop the thread."""
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)


@dataclass(frozen=True, kw_only=True)
class Received:
    """A card this node holds: its summary plus how it got here."""

    summary: Any  # roles_answerer.CardSummary
    topic: str
    sender: str
    transfer_s: float


class Agent:
    """The running node; see the module docstring. Build with a loaded model, then ``await run(stop)``."""

    def __init__(
        self,
        config: NodeConfig,
        lm: Any,
        *,
        events: EventLog,
        notifier: Notifier,
        probe: MemoryProbe | None = None,
    ) -> None:
        self.config = config
        self.lm = lm
        self.events = events
        self.notifier = notifier
        self._probe = probe or PsutilMemoryProbe()
        self._worker = ModelWorker()
        self._bus: Bus | None = None
        self._store: CardStore | None = None
        self._holder_cfg = config.answerer or AnswererConfig()
        self._received: dict[str, Received] = {}
        self._seen: set[str] = set()
        self._arrived = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._work: set[asyncio.Task[Any]] = set()
        self._draining = False
        self._prefill_tps = 0.0
        self._published = 0
        self._failures = 0

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        if {"answerer", "relay"} & set(cfg.roles):
            reserve = self._holder_cfg.reserve_mib << 20
            self._store = CardStore(
                CardStoreConfig(cap_bytes=self._holder_cfg.store_mib << 20, reserve_bytes=reserve),
                probe=self._probe,
            )
        try:
            async with Bus(bus_config(cfg)) as bus, WatchdogPinger(self.notifier, healthy=self._healthy):
                self._bus = bus
                bus.on_request(self._on_request)
                await self._load_persisted()
                self.notifier.status("measuring prefill speed")
                self._prefill_tps = await self._worker.run(_measure_prefill, self.lm)
                self._refresh_presence()
                self._start_roles()
                endpoints = bus.endpoints if cfg.bus.bind else None
                self.notifier.ready(f"serving as {', '.join(cfg.roles)}")
                self.events.emit(
                    "ready",
                    node=cfg.name,
                    roles=list(cfg.roles),
                    control=endpoints.control if endpoints else None,
                    prefill_tps=self._prefill_tps,
                )
                log.info(
                    "%s ready (%s), prefill %.0f tokens/s", cfg.name, ", ".join(cfg.roles), self._prefill_tps
                )
                await stop.wait()
                await self._shutdown()
        finally:
            await self._cancel(self._tasks | self._work)
            await self._worker.aclose()
            if self._store is not None:
                self._store.close()
            self.events.emit("stopped", node=cfg.name)

    async def _shutdown(self) -> None:
        self._draining = True
        self._arrived.set()  # wake asks waiting for cards: they fail with "draining"
        self.notifier.stopping("draining")
        self.events.emit("stopping", node=self.config.name, in_flight=len(self._work))
        await self._cancel(self._tasks)
        if self._work:
            _, pending = await asyncio.wait(self._work, timeout=DRAIN_TIMEOUT_S)
            if pending:
                log.warning("drain timeout: cancelling %d unfinished jobs", len(pending))
            await self._cancel(pending)
        if self._store is not None and self._holder_cfg.persist:
            self.notifier.status("persisting cards")
            written = await asyncio.to_thread(self._store.persist, self.config.cards_dir)
            log.info("persisted %d cards to %s", written, self.config.cards_dir)

    @staticmethod
    async def _cancel(tasks: set[asyncio.Task[Any]]) -> None:
        live = [t for t in tasks if not t.done()]
        for task in live:
            task.cancel()
        if live:
            await asyncio.gather(*live, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any], name: str, *, work: bool) -> None:
        """Own every task: background loops in ``_tasks``, drainable jobs in ``_work``."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(f"{self.config.name}-{name}")
        group = self._work if work else self._tasks
        group.add(task)
        task.add_done_callback(group.discard)
        task.add_done_callback(self._log_failure)

    def _log_failure(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failures += 1
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def _healthy(self) -> bool:
        return self._bus is not None and self._failures == 0

    async def _load_persisted(self) -> None:
        if self._store is None or not self._holder_cfg.persist:
            return
        loaded = await asyncio.to_thread(self._store.load, self.config.cards_dir)
        if loaded:
            log.info("loaded %d persisted cards", loaded)

    # ------------------------------------------------------------------ roles

    def _start_roles(self) -> None:
        cfg = self.config
        prefixes: set[str] = set()
        if cfg.answerer is not None:
            prefixes.add(cfg.answerer.topics)
        if cfg.relay is not None:
            prefixes.add(cfg.relay.topics)
        for prefix in sorted(prefixes):
            self._spawn(self._intake(prefix, self._on_card), f"intake-{prefix}", work=False)
        if cfg.reader is not None:
            for path in cfg.reader.documents:
                self._spawn(self._read_file(path), f"read-{path.name}", work=True)
            if cfg.reader.doc_topics is not None:
                self._spawn(self._intake(cfg.reader.doc_topics, self._on_document), "documents", work=False)
        self._spawn(self._presence_loop(), "presence", work=False)

    async def _intake(
        self, prefix: str, handle: Callable[[Announcement, bytes, float], Awaitable[None]]
    ) -> None:
        assert self._bus is not None
        async with self._bus.announcements(prefix) as stream:
            async for ann in stream:
                if self._draining:
                    return
                if ann.card_id in self._seen:
                    continue
                self._seen.add(ann.card_id)
                self._spawn(self._receive(ann, handle), f"fetch-{ann.card_id[:8]}", work=True)

    async def _receive(
        self, ann: Announcement, handle: Callable[[Announcement, bytes, float], Awaitable[None]]
    ) -> None:
        """Pull one announced card, retrying while its sender still announces it."""
        assert self._bus is not None
        bus = self._bus
        delay = RETRY_BASE_S
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            start = time.monotonic()
            try:
                data = await bus.fetch_card(ann)
            except AlreadyDelivered:
                log.info("card %s was delivered before (spool); not fetched again", ann.card_id)
                self.events.emit("card_already_delivered", card=ann.card_id, held=self._holds(ann.card_id))
                return
            except (TransferError, PeerGone) as exc:
                still = any(k.card_id == ann.card_id for k in bus.known_cards())
                log.warning("pull of %s failed (attempt %d): %s", ann.card_id, attempt, exc)
                if not still or attempt == FETCH_ATTEMPTS:
                    self._seen.discard(ann.card_id)
                    self.events.emit("card_failed", card=ann.card_id, error=str(exc))
                    return
                await asyncio.sleep(delay)
                delay *= 2
                continue
            await handle(ann, data, time.monotonic() - start)
            return

    def _holds(self, card_id: str) -> bool:
        return self._store is not None and card_id in self._store

    async def _on_card(self, ann: Announcement, data: bytes, transfer_s: float) -> None:
        """A pulled KV card: check it, store it, and relay it when this node is a relay for its topic."""
        from qkv import CardError

        from .roles_answerer import summarise_card

        assert self._store is not None
        try:
            summary = await self._worker.run(summarise_card, ann.card_id, data, self.lm)
        except CardError as exc:
            log.warning("card %s from %s rejected: %s", ann.card_id, ann.sender, exc)
            self.events.emit("card_rejected", card=ann.card_id, sender=ann.sender, error=str(exc))
            return
        try:
            self._store.put(ann.card_id, data)
        except BusError as exc:
            log.warning("card %s not stored: %s", ann.card_id, exc)
            self.events.emit("card_rejected", card=ann.card_id, sender=ann.sender, error=str(exc))
            return
        self._received[ann.card_id] = Received(
            summary=summary, topic=ann.topic, sender=ann.sender, transfer_s=transfer_s
        )
        self._wake_waiters()
        self.events.emit(
            "card_received",
            card=ann.card_id,
            topic=ann.topic,
            sender=ann.sender,
            bytes=len(data),
            transfer_s=transfer_s,
            tokens=summary.card_tokens,
        )
        relay = self.config.relay
        if relay is not None and ann.topic.startswith(relay.topics) and not self._draining:
            await self._relay(ann, data)

    async def _relay(self, ann: Announcement, data: bytes) -> None:
        from qkv import CardError

        from .roles_relay import relay_card

        relay = self.config.relay
        assert relay is not None
        assert self._bus is not None
        assert self._store is not None
        with self._store.pinned(ann.card_id):
            try:
                out = await self._worker.run(
                    functools.partial(
                        relay_card,
                        sender=self.config.name,
                        question=relay.question,
                        max_new_tokens=relay.max_new_tokens,
                        bits=relay.bits,
                    ),
                    self.lm,
                    data,
                )
            except CardError as exc:
                log.warning("card %s not relayed: %s", ann.card_id, exc)
                self.events.emit("card_rejected", card=ann.card_id, sender=ann.sender, error=str(exc))
                return
        meta = dict(ann.meta)
        meta.update(hops=out.hops, bits=out.bits, card_bytes=len(out.data), source=ann.card_id)
        card_id = await self._bus.publish_card(relay.out_topic, out.data, card_id=out.card_id, meta=meta)
        self._published += 1
        self.events.emit(
            "card_relayed",
            card=card_id,
            source=ann.card_id,
            topic=relay.out_topic,
            answer=out.answer,
            appended_tokens=out.appended_tokens,
            bytes=len(out.data),
        )

    async def _on_document(self, ann: Announcement, data: bytes, _: float) -> None:
        from .roles_reader import decode_document

        try:
            text = decode_document(data)
        except ValueError as exc:
            self.events.emit("card_rejected", card=ann.card_id, sender=ann.sender, error=str(exc))
            return
        await self._read(text, None)

    async def _read_file(self, path: Any) -> None:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        await self._read(text, None)

    async def _read(self, text: str, topic: str | None) -> dict[str, Any]:
        from qkv import Budget

        from .roles_reader import read_document

        reader = self.config.reader
        assert reader is not None
        assert self._bus is not None
        budget = Budget(bits=reader.bits, keep=reader.keep, layers=reader.layers, facts=reader.facts)
        result = await self._worker.run(
            functools.partial(read_document, sender=self.config.name), self.lm, text, budget
        )
        topic = topic or reader.topic
        card_id = await self._bus.publish_card(
            topic, result.encoded.data, card_id=result.encoded.card_id, meta=result.meta()
        )
        self._published += 1
        reply = result.reply(topic)
        reply["card"] = card_id
        self.events.emit("card_published", **reply)
        return reply

    # ------------------------------------------------------------------ presence

    def _refresh_presence(self) -> None:
        assert self._bus is not None
        reading = self._probe.read()
        info: dict[str, Any] = {
            "model": self.lm.name,
            "fingerprint": self.lm.fingerprint.digest,
            "device": str(self.lm.device),
            "prefill_tps": round(self._prefill_tps, 1),
            "headroom": max(0, reading.available - (self._holder_cfg.reserve_mib << 20)),
            "rss": reading.process_rss,
            "draining": self._draining,
        }
        if self._store is not None:
            stats = self._store.statistics()
            info.update(cards=stats.entries, store_bytes=stats.bytes, store_budget=stats.budget)
        if self.config.reader is not None:
            r = self.config.reader
            info["budget"] = {"bits": r.bits, "keep": r.keep, "layers": r.layers, "facts": r.facts}
        self._bus.set_presence_info(info)

    async def _presence_loop(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_INTERVAL_S)
            if self._store is not None:
                shed = await asyncio.to_thread(self._store.refresh)
                for card_id in shed:
                    self._received.pop(card_id, None)
            self._refresh_presence()

    # ------------------------------------------------------------------ requests

    async def _on_request(self, peer: str, body: dict[str, Any]) -> Mapping[str, Any]:
        op = body.get("op")
        if op == "status":
            return self.status()
        if self._draining:
            raise AskError("node is draining (shutting down)")
        handlers: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "read": self._req_read,
            "ask": self._req_ask,
            "ask_text": self._req_ask_text,
        }
        handler = handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            raise AskError(f"unknown op {op!r}; expected one of status, {', '.join(handlers)}")
        task = asyncio.current_task()
        if task is not None:
            # Requests count as work in flight: the drain waits for them.
            self._work.add(task)
            task.add_done_callback(self._work.discard)
        return await handler(body)

    def _need_role(self, *roles: str) -> None:
        if not set(roles) & set(self.config.roles):
            raise AskError(f"node {self.config.name!r} is not a {' or '.join(roles)}")

    async def _req_read(self, body: dict[str, Any]) -> dict[str, Any]:
        from .roles_reader import MAX_DOCUMENT_BYTES

        self._need_role("reader")
        text, topic = body.get("text"), body.get("topic")
        if not isinstance(text, str) or not text.strip():
            raise AskError("'text' must be a non-empty string")
        if len(text.encode()) > MAX_DOCUMENT_BYTES:
            raise AskError(f"'text' exceeds {MAX_DOCUMENT_BYTES} bytes")
        if topic is not None and (not isinstance(topic, str) or not 0 < len(topic) <= 200):
            raise AskError("'topic' must be a string of 1-200 characters")
        return await self._read(text, topic)

    async def _req_ask(self, body: dict[str, Any]) -> dict[str, Any]:
        from .roles_answerer import answer_card, check_question

        self._need_role("answerer", "relay")
        assert self._store is not None
        card_id = body.get("card")
        if not isinstance(card_id, str) or not 0 < len(card_id) <= 128:
            raise AskError("'card' must be a card id")
        try:
            question, max_new = check_question(
                body.get("question"), body.get("max_new_tokens", self._holder_cfg.max_new_tokens)
            )
        except ValueError as exc:
            raise AskError(str(exc)) from None
        wait_s = body.get("wait_s", DEFAULT_ASK_WAIT_S)
        if not isinstance(wait_s, int | float) or isinstance(wait_s, bool) or not wait_s >= 0:
            raise AskError("'wait_s' must be a non-negative number")
        record = await self._wait_for_card(card_id, min(float(wait_s), self._holder_cfg.card_wait_s))
        try:
            data = self._store.pin(card_id)
        except KeyError:
            raise AskError(f"card {card_id} is no longer held (evicted under memory pressure)") from None
        try:
            result = await self._worker.run(answer_card, self.lm, data, question, max_new)
        finally:
            self._store.unpin(card_id)
        result.update(record.summary.as_dict())
        result.update(card=card_id, node=self.config.name, transfer_s=record.transfer_s)
        return result

    async def _wait_for_card(self, card_id: str, wait_s: float) -> Received:
        from .roles_answerer import summarise_card

        assert self._store is not None
        deadline = time.monotonic() + wait_s
        while True:
            record = self._received.get(card_id)
            if record is not None:
                return record
            if card_id in self._store:
                # Loaded from a persisted snapshot: summarise it on first use.
                data = self._store.get(card_id)
                summary = await self._worker.run(summarise_card, card_id, data, self.lm)
                record = self._received[card_id] = Received(
                    summary=summary, topic="", sender=summary.sender, transfer_s=0.0
                )
                return record
            if self._draining:
                raise AskError("node is draining (shutting down)")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AskError(f"no card {card_id} here (not received{' in time' if wait_s else ''})")
            waiter = self._arrived
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await waiter.wait()

    def _wake_waiters(self) -> None:
        self._arrived.set()
        self._arrived = asyncio.Event()

    async def _req_ask_text(self, body: dict[str, Any]) -> dict[str, Any]:
        from .roles_answerer import answer_text, check_question

        self._need_role("answerer", "relay")
        context = body.get("context")
        if not isinstance(context, str) or not context.strip():
            raise AskError("'context' must be a non-empty string")
        try:
            question, max_new = check_question(
                body.get("question"), body.get("max_new_tokens", self._holder_cfg.max_new_tokens)
            )
        except ValueError as exc:
            raise AskError(str(exc)) from None
        result = await self._worker.run(answer_text, self.lm, context, question, max_new)
        result["node"] = self.config.name
        return result

    def status(self) -> dict[str, Any]:
        """What ``edgebus status`` prints: this node, its live peers with link estimates, memory, budget."""
        assert self._bus is not None
        bus = self._bus
        reading = self._probe.read()
        peers = []
        for peer in bus.peers():
            if not peer.roles and peer.node_id.startswith("client-"):
                continue  # short-lived CLI clients (this status request's own among them)
            link = bus.link(peer.node_id)
            peers.append(
                {
                    "node": peer.node_id,
                    "roles": list(peer.roles),
                    "age_s": round(peer.age_s, 3),
                    "info": dict(peer.info),
                    "bandwidth_bps": link.bandwidth_bps,
                    "rtt_s": link.rtt_s,
                    "samples": link.samples,
                }
            )
        out: dict[str, Any] = {
            "node": self.config.name,
            "roles": list(self.config.roles),
            "model": self.lm.name,
            "device": str(self.lm.device),
            "prefill_tps": self._prefill_tps,
            "draining": self._draining,
            "memory": {"available": reading.available, "total": reading.total, "rss": reading.process_rss},
            "peers": peers,
            "published": self._published,
            "bus": _plain(bus.stats()),
        }
        if self._store is not None:
            out["store"] = _plain(self._store.statistics())
            out["cards"] = {cid: rec.summary.as_dict() for cid, rec in list(self._received.items())[-32:]}
        if self.config.reader is not None:
            r = self.config.reader
            out["budget"] = {"bits": r.bits, "keep": r.keep, "layers": r.layers, "facts": r.facts}
        return out


def _plain(snapshot: Any) -> dict[str, Any]:
    """A frozen statistics dataclass as a msgpack-safe dict (mappings copied into plain dicts)."""
    return {
        f.name: dict(value) if isinstance(value, Mapping) else value
        for f in fields(snapshot)
        for value in (getattr(snapshot, f.name),)
    }


def _measure_prefill(lm: Any) -> float:
    from .roles_answerer import measure_prefill_speed

    return measure_prefill_speed(lm)


# ---------------------------------------------------------------------------------------------- entry


async def _serve(config: NodeConfig, events: EventLog, notifier: Notifier) -> None:
    from qkv import load_model

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        notifier.status(f"loading model {config.model}")
        needs_attention = config.reader is not None and (config.reader.keep < 1 or config.reader.layers < 1)
        lm = await asyncio.to_thread(
            functools.partial(
                load_model,
                config.model,
                device=config.device,
                attn_implementation="eager" if needs_attention else None,
            )
        )
        await Agent(config, lm, events=events, notifier=notifier).run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run_node(config: NodeConfig, *, events: bool = False) -> int:
    """Run a node until SIGTERM/SIGINT; returns the process exit code."""
    with Notifier() as notifier:
        asyncio.run(_serve(config, EventLog(sys.stdout if events else None), notifier))
    return 0
