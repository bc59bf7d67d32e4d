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
  caller): ``{"op": "read", "text", "topic"?, "representation"?, "budget"?, "head_tokens"?}`` (reader:
  decide per live receiver what to send, make and publish it, reply with its id, sizes and the decisions;
  ``representation`` overrides the policy with a fixed alternative); ``{"op": "ask", "card", "question",
  "max_new_tokens"?, "wait_s"?}`` (answerer/relay: answer from a held card or text, waiting up to ``wait_s``
  for it to arrive); ``{"op": "ask_text", "context", "question"}`` (re-prefill baseline);
  ``{"op": "status"}``.
* **What a reader sends** (:mod:`nodes.reader_policy`): per (receiver, document) the budget policy picks
  text, a card at a budget, or a split (the head's token ids first, then a card of the tail); receivers that
  decided alike share one artifact, announced with ``for`` (their node ids) and ``rep`` (how to read it).
  At start a reader publishes a small random *probe* card on ``probe/<name>`` that receivers pull once, so
  the first decision has a measured bandwidth. Receivers advertise what the policy needs in their presence
  info: ``headroom``, ``prefill_tps``/``prefill_q``, ``decode_bps`` and ``links`` (their measured bandwidth
  and RTT to each peer).
* **Split hand-offs** at the receiver: the head message starts ``prefill_head`` in the model thread at once;
  an ``ask`` joins it when the card lands. A card whose head never came (or does not match) still answers,
  prefilling the head from the card's own ids. TTFT accounting: :mod:`nodes.handoffs`.
* **Cards received** are checked (header, model fingerprint) before they are stored; a card is pinned in
  the store while a question uses it. Delivery is exactly once per spool (the bus remembers delivered ids
  across restarts); a card that was delivered before a crash and persisted comes back from the store.
* **Drain**: on SIGTERM the node stops taking new work (requests get "draining"), waits up to
  ``DRAIN_TIMEOUT_S`` for running transfers, relays and answers, cancels what is left (a cancelled transfer
  keeps its verified chunks in the spool and resumes after restart), persists the store atomically if
  configured, sends STOPPING=1 and closes the bus.
* **Events**: with ``events`` on, one JSON object per line on stdout (``ready``, ``card_published``,
  ``card_received``, ``card_relayed``, ``card_rejected``, ``card_pulled_on_demand``, ``decision``,
  ``head_prefilled``, ``link_probed``, ``stopping``, ``stopped``): how tests and the demo follow a node
  without sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import IO, TYPE_CHECKING, Any, Final, TypeVar

from edgebus import (
    DELIVERED_KEPT,
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
from .handoffs import HandoffBook, HeadResult, handoff_times, monotonic, sent_at
from .heap import HeapSettings, prefault_heap, retain_heap

if TYPE_CHECKING:
    from .reader_policy import Override, PlanChooser
    from .roles_answerer import CardSpeeds, CardSummary, PrefillModel

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
#: Size of the random card a reader publishes at start so receivers measure the link before the first
#: document (512 KiB: 4 s at 1 Mbit/s, several round trips' worth at 1 Gbit/s).
PROBE_BYTES: Final = 512 * 1024
PROBE_TOPIC: Final = "probe/"
#: Most peers whose link estimates a receiver advertises (presence info is bounded).
MAX_ADVERTISED_LINKS: Final = 16
#: Announced card ids an agent remembers having taken up: as many as the bus's delivered log keeps.
SEEN_KEPT: Final = DELIVERED_KEPT

T = TypeVar("T")
#: What an intake does with a pulled card: (announcement, bytes, seconds the pull took).
Handler = Callable[[Announcement, bytes, float], Awaitable[None]]


class EventLog:
    """JSON-lines events on a stream (stdout), or nothing when disabled."""

    def __init__(self, stream: IO[str] | None) -> None:
        self._stream = stream

    def emit(self, event: str, **fields: Any) -> None:
        if self._stream is None:
            return
        try:
            self._stream.write(json.dumps({"event": event, "t": time.time(), **fields}, default=str) + "\n")
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            # Whoever followed the events is gone (pipe closed): the node's work goes on without them.
            log.warning("event stream closed; no more events are written")
            self._stream = None


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
    """A card (or text) this node holds: its summary plus how and when it got here."""

    summary: Any  # roles_answerer.CardSummary or TextSummary
    topic: str
    sender: str
    transfer_s: float
    stored: float = 0.0  # monotonic time it was stored
    text: bool = False


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
        self._book = HandoffBook()
        self._chooser: PlanChooser | None = None
        self._prefill_model: PrefillModel | None = None
        self._speeds: CardSpeeds | None = None
        self._prefill_cache: Any = None  # roles_reader.PrefillCache, made on the first read
        self._calibrations: tuple[Any, ...] = ()  # qkv.CrossModelCalibration to this model (answerer)
        # Announced ids already taken up, oldest first; bounded (SEEN_KEPT) so months of announcements do
        # not grow it: a forgotten id announced again is refused by the bus's delivered log, not re-fetched.
        self._seen: dict[str, None] = {}
        # Ids of announcements addressed to other receivers (bounded like _seen), with their handler, so
        # that an ask naming one pulls it on demand: addressing says who pulls unasked, not who may read (a
        # receiver that joined after the reader decided was left out of the address). Only ids are kept;
        # the announcement is looked up in the bus's catalogue when asked (gone if the sender withdrew it).
        self._not_ours: dict[str, Handler] = {}
        self._asked: collections.Counter[str] = collections.Counter()  # card ids asks are waiting for
        self._on_demand: set[str] = set()  # pulled because asked for: answered, never relayed
        self._arrived = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._work: set[asyncio.Task[Any]] = set()
        self._draining = False
        self._prefill_tps = 0.0  # the start-up fit's linear speed (status and the ready event)
        self._published = 0
        self._failures = 0
        self._rejected = 0

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
                self._calibrations = await asyncio.to_thread(self._load_calibrations)
                await self._load_persisted()
                self.notifier.status("measuring prefill and decode speed")
                speeds = await self._worker.run(_measure_speeds, self.lm)
                prefill_model, self._speeds = speeds
                self._prefill_model = prefill_model
                self._prefill_tps = float(prefill_model.advertised()["prefill_tps"])
                self._refresh_presence()
                if cfg.reader is not None:
                    self._chooser = await asyncio.to_thread(_plan_chooser, cfg, self.lm)
                    await bus.publish_card(
                        PROBE_TOPIC + cfg.name,
                        os.urandom(PROBE_BYTES),
                        card_id=f"probe-{secrets.token_hex(8)}",
                        meta={"rep": "probe"},
                    )
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

    def _spawn(self, coro: Awaitable[T], name: str, *, work: bool) -> asyncio.Task[T]:
        """Own every task: background loops in ``_tasks``, drainable jobs in ``_work``."""
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        task.set_name(f"{self.config.name}-{name}")
        group = self._work if work else self._tasks
        group.add(task)
        task.add_done_callback(group.discard)
        task.add_done_callback(self._log_failure)
        return task

    def _log_failure(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failures += 1
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def _healthy(self) -> bool:
        return self._bus is not None and self._failures == 0

    def _load_calibrations(self) -> tuple[Any, ...]:
        """The answerer's cross-model calibrations (ConfigFileError, stopping the node, if unusable)."""
        from .crossmodel import load_calibrations

        paths = self._holder_cfg.calibrations
        if not paths:
            return ()
        loaded = load_calibrations(
            self.config.file, "answerer.calibrations", paths, self.lm.fingerprint, side="receiver"
        )
        for calibration in loaded:
            log.info("cards of %s are translated with %s", calibration.sender.describe(), calibration.id)
        return loaded

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
        if prefixes:
            prefixes.add(PROBE_TOPIC)
        for prefix in sorted(prefixes):
            self._spawn(self._intake(prefix, self._on_card), f"intake-{prefix}", work=False)
        if cfg.reader is not None:
            for path in cfg.reader.documents:
                self._spawn(self._read_file(path), f"read-{path.name}", work=True)
            if cfg.reader.doc_topics is not None:
                self._spawn(self._intake(cfg.reader.doc_topics, self._on_document), "documents", work=False)
        self._spawn(self._presence_loop(), "presence", work=False)

    async def _intake(self, prefix: str, handle: Handler) -> None:
        assert self._bus is not None
        async with self._bus.announcements(prefix) as stream:
            async for ann in stream:
                if self._draining:
                    return
                if ann.card_id in self._seen:
                    continue
                self._seen[ann.card_id] = None
                if len(self._seen) > SEEN_KEPT:
                    del self._seen[next(iter(self._seen))]
                addressed = ann.meta.get("for")
                if addressed is not None and (
                    not isinstance(addressed, list) or self.config.name not in addressed
                ):
                    # Another receiver's hand-off (or a malformed list: not ours either): pulled only if
                    # asked for (_pull_on_demand), at once when an ask is already waiting for it.
                    self._not_ours[ann.card_id] = handle
                    if len(self._not_ours) > SEEN_KEPT:
                        del self._not_ours[next(iter(self._not_ours))]
                    asked_as = _answers_to(ann)
                    if asked_as is not None and asked_as in self._asked:
                        self._pull_on_demand(asked_as)
                    continue
                self._spawn(self._receive(ann, handle), f"fetch-{ann.card_id[:8]}", work=True)

    async def _receive(self, ann: Announcement, handle: Handler) -> None:
        """Pull one announced card, retrying while its sender still announces it."""
        assert self._bus is not None
        bus = self._bus
        delay = RETRY_BASE_S
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            start = time.monotonic()
            kind = ann.meta.get("rep")
            # A split's clock starts with its head message, keyed by the tail card the asks will name.
            clock = ann.meta.get("tail") if kind == "head" else ann.card_id
            if kind != "probe" and isinstance(clock, str) and len(clock) <= 128:
                self._book.begin(clock, start, sent_at(ann.meta))
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
                    self._seen.pop(ann.card_id, None)
                    self.events.emit("card_failed", card=ann.card_id, error=str(exc))
                    return
                await asyncio.sleep(delay)
                delay *= 2
                continue
            except BusError as exc:
                # This node's own spool failed (disk full, permissions): not retried, not fatal either.
                log.error("card %s could not be received: %s", ann.card_id, exc)
                self._seen.pop(ann.card_id, None)
                self.events.emit("card_failed", card=ann.card_id, error=str(exc))
                return
            transfer_s = time.monotonic() - start
            # The store and the codec take bytes; the bus may hand over a view of its spool (a copy here
            # costs milliseconds against the transfer's seconds). Dropping the view before the handling
            # (a model's seconds) unmaps the spool's pages now rather than after it.
            card = data if isinstance(data, bytes) else bytes(data)
            del data
            try:
                await handle(ann, card, transfer_s)
            except Exception as exc:
                # The typed refusals are _reject calls in the handlers; anything else a peer's artifact
                # provokes (a model error on a document, a relay it cannot republish) is still that
                # artifact's failure, not this node's: counted as a rejection, never a health failure that
                # would have systemd restart the node for every such card a peer announces.
                log.exception("card %s from %s could not be handled", ann.card_id, ann.sender)
                self._reject(ann, f"could not be handled ({type(exc).__name__}: {exc})")
            return

    def _holds(self, card_id: str) -> bool:
        return self._store is not None and card_id in self._store

    async def _on_card(self, ann: Announcement, data: bytes, transfer_s: float) -> None:
        """A pulled artifact, read as its ``rep`` says: a probe, a split's head, a text or a KV card."""
        kind = ann.meta.get("rep", "card")
        if kind == "probe":
            link = self._bus.link(ann.sender) if self._bus is not None else None
            self._refresh_presence()
            self.events.emit(
                "link_probed",
                sender=ann.sender,
                bytes=len(data),
                transfer_s=transfer_s,
                bandwidth_bps=link.bandwidth_bps if link else None,
                samples=link.samples if link else 0,
            )
        elif kind == "head":
            self._on_head(ann, data)
        elif kind == "text":
            await self._on_text(ann, data, transfer_s)
        elif kind == "card":
            await self._on_kv_card(ann, data, transfer_s)
        else:
            self._reject(ann, f"unknown representation {kind!r}")

    def _reject(self, ann: Announcement, error: str) -> None:
        """An artifact refused as untrusted input: logged, counted as an event, the node keeps running."""
        self._rejected += 1
        log.warning("card %s from %s rejected: %s", ann.card_id, ann.sender, error)
        self._book.forget(ann.card_id)
        self.events.emit("card_rejected", card=ann.card_id, sender=ann.sender, error=error)

    def _on_head(self, ann: Announcement, data: bytes) -> None:
        """A split's head: start prefilling it in the model thread now, while its tail card is in flight."""
        from qkv import CardError

        from .roles_answerer import prefill_split_head
        from .roles_reader import parse_head

        try:
            head, tail = parse_head(data, ann.meta)
        except ValueError as exc:
            self._reject(ann, str(exc))
            return

        async def prefill_head_now() -> HeadResult | None:
            try:
                snapshot, seconds = await self._worker.run(prefill_split_head, self.lm, head)
            except (CardError, ValueError) as exc:
                # Ids outside this model's vocabulary, or more than its positions: untrusted input, not a
                # failure of this node. The card, when it comes, answers with its own head.
                self._reject(ann, str(exc))
                return None
            except Exception as exc:  # as in _receive: a peer's head, not this node
                log.exception("head for %s could not be prefilled", tail)
                self._reject(ann, f"head could not be prefilled ({type(exc).__name__}: {exc})")
                return None
            if self._prefill_model is not None:
                self._prefill_model.observe(head.num_tokens, seconds)
            self.events.emit("head_prefilled", card=tail, tokens=head.num_tokens, prefill_s=seconds)
            return HeadResult(snapshot=snapshot, prefill_s=seconds, tokens=head.num_tokens, done=monotonic())

        self._book.add_head(tail, self._spawn(prefill_head_now(), f"head-{tail[:8]}", work=True))

    async def _on_text(self, ann: Announcement, data: bytes, transfer_s: float) -> None:
        from .roles_answerer import TextSummary
        from .roles_reader import decode_document

        assert self._store is not None
        try:
            decode_document(data)
            self._store.put(ann.card_id, data)
        except (ValueError, BusError) as exc:
            self._reject(ann, str(exc))
            return
        summary = TextSummary(card_id=ann.card_id, text_bytes=len(data), sender=ann.sender)
        self._stored(ann, summary, transfer_s, nbytes=len(data), text=True)

    def _stored(self, ann: Announcement, summary: Any, transfer_s: float, *, nbytes: int, text: bool) -> None:
        self._received[ann.card_id] = Received(
            summary=summary,
            topic=ann.topic,
            sender=ann.sender,
            transfer_s=transfer_s,
            stored=time.monotonic(),
            text=text,
        )
        self._wake_waiters()
        self._refresh_presence()  # the link estimate moved: let readers see it before their next decision
        self.events.emit(
            "card_received",
            card=ann.card_id,
            topic=ann.topic,
            sender=ann.sender,
            bytes=nbytes,
            transfer_s=transfer_s,
            **{k: v for k, v in summary.as_dict().items() if k != "sender"},
        )

    async def _on_kv_card(self, ann: Announcement, data: bytes, transfer_s: float) -> None:
        """A pulled KV card: check it, store it, and relay it when this node is a relay for its topic."""
        from qkv import CardError

        from .roles_answerer import summarise_card

        assert self._store is not None
        try:
            summary = await self._worker.run(summarise_card, ann.card_id, data, self.lm, self._calibrations)
        except CardError as exc:
            self._reject(ann, str(exc))
            return
        try:
            self._store.put(ann.card_id, data)
        except BusError as exc:
            self._reject(ann, str(exc))
            return
        self._stored(ann, summary, transfer_s, nbytes=len(data), text=False)
        relay = self.config.relay
        # A card pulled only because someone asked this node about it was another relay's to forward.
        forward = ann.card_id not in self._on_demand
        if relay is not None and forward and ann.topic.startswith(relay.topics) and not self._draining:
            if summary.head_tokens:
                log.warning("card %s is a split card: relays forward whole cards only", ann.card_id)
                return
            if summary.calibration is not None:
                log.warning("card %s was made by another model: relays forward their own", ann.card_id)
                return
            await self._relay(ann, data)

    async def _relay(self, ann: Announcement, data: bytes) -> None:
        from qkv import CardError

        from .roles_relay import relay_card, relayed_meta

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
            except (CardError, ValueError) as exc:  # ValueError: a card too big to re-encode with the note
                self._not_relayed(ann, str(exc))
                return
        meta = relayed_meta(ann.meta, card_id=ann.card_id, out=out)
        try:
            card_id = await self._bus.publish_card(relay.out_topic, out.data, card_id=out.card_id, meta=meta)
        except BusError as exc:  # the incoming metadata left no room for the hop's, or the store is full
            self._not_relayed(ann, str(exc))
            return
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

    def _not_relayed(self, ann: Announcement, error: str) -> None:
        """The card is held and answered from, but this relay cannot forward it."""
        log.warning("card %s not relayed: %s", ann.card_id, error)
        self._rejected += 1
        self.events.emit("card_rejected", card=ann.card_id, sender=ann.sender, error=error)

    async def _on_document(self, ann: Announcement, data: bytes, _: float) -> None:
        from .roles_reader import decode_document

        try:
            text = decode_document(data)
        except ValueError as exc:
            self._reject(ann, str(exc))
            return
        await self._read(text, None)

    async def _read_file(self, path: Any) -> None:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        await self._read(text, None)

    async def _read(self, text: str, topic: str | None, override: Override | None = None) -> dict[str, Any]:
        """Decide per live receiver what to send (or take ``override``), make it, publish it, reply."""
        from .reader_policy import Choice, Document
        from .roles_reader import count_tokens

        reader = self.config.reader
        assert reader is not None
        assert self._bus is not None
        assert self._chooser is not None
        topic = topic or reader.topic
        tokens = await self._worker.run(count_tokens, self.lm, text)
        doc = Document(
            tokens=tokens,
            text_bytes=len(text.encode("utf-8")),
            sender_headroom=self._probe.read().available,
            kv_bytes_per_token=_kv_bytes_per_token(self.lm),
        )
        fingerprint = self.lm.fingerprint.digest
        if override is not None:
            choices = [self._chooser.resolve(override, self._bus.peers(), doc, fingerprint=fingerprint)]
        else:
            choices = self._chooser.choose(self._bus.peers(), doc, fingerprint=fingerprint)
        for choice in choices:
            self.events.emit("decision", receiver=choice.receiver, **choice.decision)
        groups: dict[tuple[Any, ...], list[Choice]] = {}
        for choice in choices:
            groups.setdefault(choice.plan.key, []).append(choice)
        sent = []
        for group in groups.values():
            try:
                sent.append(await self._send(text, topic, group))
            except AskError as exc:
                if group[0].plan.translate is None:
                    raise
                # A translated card this document cannot make (a calibration fitted on another prompt
                # shape): those receivers get the text rather than nothing.
                fallback = [_as_text(c, f"no translated card ({exc}): text") for c in group]
                for choice in fallback:
                    self.events.emit("decision", receiver=choice.receiver, **choice.decision)
                choices = [c for c in choices if c not in group] + fallback
                sent.append(await self._send(text, topic, fallback))
        reply = dict(sent[0])
        reply["decisions"] = {c.receiver: c.decision for c in choices}
        reply["cards"] = {r: s["card"] for s in sent for r in s["receivers"]}
        if len(sent) > 1:
            reply["artifacts"] = sent
        self.events.emit("card_published", **{k: v for k, v in reply.items() if k != "artifacts"})
        return reply

    async def _send(self, text: str, topic: str, group: list[Any]) -> dict[str, Any]:
        """Make one plan's artifact and publish it for ``group``'s receivers: a split's head first."""
        from qkv import CalibrationError, CardCompatError

        from .roles_reader import PrefillCache, head_message, read_document

        assert self._bus is not None
        bus, plan = self._bus, group[0].plan
        if self._prefill_cache is None:
            self._prefill_cache = PrefillCache()
        try:
            result = await self._worker.run(
                functools.partial(read_document, sender=self.config.name, cache=self._prefill_cache),
                self.lm,
                text,
                plan,
            )
        except (ValueError, CalibrationError, CardCompatError) as exc:
            # CardCompatError: a translation at the sender whose calibration does not fit this card.
            raise AskError(f"cannot make a {plan.kind} of this document: {exc}") from None
        receivers = [c.receiver for c in group if c.receiver != "*"]
        addressed: dict[str, Any] = {"for": receivers} if receivers else {}
        sent_at_wall = time.time()
        head_card = None
        encoded = result.encoded
        if result.head is not None and encoded is not None:
            data, meta = head_message(result.head, encoded.card_id)
            head_card = await bus.publish_card(
                topic,
                data,
                card_id=f"head-{encoded.card_id}",
                meta={**meta, **addressed, "sent_at": sent_at_wall},
            )
        # A text's id is fresh per send: the same document sent twice is two hand-offs, each timed, where
        # a content id would make the second a duplicate the receiver skips.
        card_id = await bus.publish_card(
            topic,
            result.data,
            card_id=f"text-{secrets.token_hex(12)}" if encoded is None else encoded.card_id,
            meta={**result.meta(), **addressed, "sent_at": sent_at_wall},
        )
        self._published += 1
        reply = result.reply()
        reply.update(
            card=card_id, head_card=head_card, topic=topic, receivers=receivers, sent_at=sent_at_wall
        )
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
        if self._prefill_model is not None:
            info.update(self._prefill_model.advertised())
        if self._speeds is not None:
            info.update(self._speeds.advertised())
        if self._store is not None:
            stats = self._store.statistics()
            info.update(cards=stats.entries, store_bytes=stats.bytes, store_budget=stats.budget)
            info["links"] = self._links()
            info["calibrations"] = [c.id for c in self._calibrations]
        if self.config.reader is not None:
            info["budget"] = self._budget_info()
        self._bus.set_presence_info(info)

    def _links(self) -> dict[str, dict[str, float]]:
        """This receiver's measured links to its peers, for their budget policies (bounded)."""
        assert self._bus is not None
        out: dict[str, dict[str, float]] = {}
        for peer in self._bus.peers()[:MAX_ADVERTISED_LINKS]:
            link = self._bus.link(peer.node_id)
            if link.samples or link.rtt_s:
                out[peer.node_id] = {"bw": round(link.bandwidth_bps), "rtt": link.rtt_s, "n": link.samples}
        return out

    def _budget_info(self) -> dict[str, Any]:
        r = self.config.reader
        assert r is not None
        mode = "auto" if self._chooser is not None and self._chooser.policy is not None else "fixed"
        return {"bits": r.bits, "keep": r.keep, "layers": r.layers, "facts": r.facts, "policy": mode}

    async def _presence_loop(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_INTERVAL_S)
            if self._store is not None:
                shed = await asyncio.to_thread(self._store.refresh)
                # Also what a put evicted to make room: anything no longer held is no longer received.
                gone = set(shed) | {card_id for card_id in self._received if card_id not in self._store}
                for card_id in gone:
                    self._received.pop(card_id, None)
                    self._book.forget(card_id)
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
        from .reader_policy import fixed_budget, parse_override
        from .roles_reader import MAX_DOCUMENT_BYTES

        self._need_role("reader")
        assert self.config.reader is not None
        override = parse_override(body, fixed_budget(self.config.reader))
        text, topic = body.get("text"), body.get("topic")
        if not isinstance(text, str) or not text.strip():
            raise AskError("'text' must be a non-empty string")
        if len(text.encode()) > MAX_DOCUMENT_BYTES:
            raise AskError(f"'text' exceeds {MAX_DOCUMENT_BYTES} bytes")
        if topic is not None and (not isinstance(topic, str) or not 0 < len(topic) <= 200):
            raise AskError("'topic' must be a string of 1-200 characters")
        return await self._read(text, topic, override)

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
        head = await self._head_for(card_id, record)
        try:
            data = self._store.pin(card_id)
        except KeyError:
            raise AskError(f"card {card_id} is no longer held (evicted under memory pressure)") from None
        try:
            if record.text:
                result = await self._answer_text(data.decode("utf-8"), question, max_new)
            else:
                snapshot = None if head is None else head.snapshot
                result = await self._worker.run(
                    answer_card, self.lm, data, question, max_new, snapshot, self._calibrations
                )
                self._observe_answer(result, record.summary)
        finally:
            self._store.unpin(card_id)
        result.update(record.summary.as_dict())
        result.update(card=card_id, node=self.config.name, transfer_s=record.transfer_s)
        result["head_prefill_s"] = None if head is None else head.prefill_s
        now, now_wall = time.monotonic(), time.time()
        result.update(
            handoff_times(self._book.timing(card_id), record.stored, head, now_wall=now_wall, now=now)
        )
        if result["handoff_s"] is not None:
            result["handoff_ttft_s"] = result["handoff_s"] + float(result["ttft_s"])
        return result

    def _observe_answer(self, result: Mapping[str, Any], summary: CardSummary) -> None:
        """A real card answer refines the advertised card speeds (start-up cards are small)."""
        if self._speeds is None:
            return
        joined = 0
        if result.get("head_source") == "message":
            joined = _kv_bytes_per_token(self.lm) * summary.context_tokens
        self._speeds.observe(
            summary,
            decode_s=float(result["decode_s"]),
            head_s=float(result["head_s"]),
            ttft_s=float(result["ttft_s"]),
            joined_bytes=joined,
        )

    async def _head_for(self, card_id: str, record: Received) -> HeadResult | None:
        """The prefilled head of a split card, waiting for its prefill; None if it never came or failed."""
        from qkv import CardError

        job = self._book.head(card_id)
        if job is None or record.text or not record.summary.head_tokens:
            return None
        try:
            return await asyncio.shield(job)  # None: the head was refused (and reported) as input
        except asyncio.CancelledError:
            if job.cancelled():
                return None  # the head job was cancelled (drain); answer by prefilling from the card
            raise
        except (CardError, RuntimeError, ValueError) as exc:
            # A bad head (ids outside the vocabulary, a model error) falls back to the card's own head ids.
            log.warning("head of %s could not be prefilled (%s): prefilling it from the card", card_id, exc)
            return None

    async def _answer_text(self, context: str, question: str, max_new: int) -> dict[str, Any]:
        """Re-prefill ``context`` and answer; the real prefill refines the advertised prefill speed."""
        from .roles_answerer import answer_text

        result = await self._worker.run(answer_text, self.lm, context, question, max_new)
        if self._prefill_model is not None:
            self._prefill_model.observe(int(result["context_tokens"]), float(result["ttft_s"]))
        return result

    async def _wait_for_card(self, card_id: str, wait_s: float) -> Received:
        """The card ``card_id`` once received or held, waiting up to ``wait_s``; counted as asked meanwhile,
        so an announcement for other receivers that arrives during the wait is pulled at once."""
        deadline = time.monotonic() + wait_s
        self._asked[card_id] += 1
        try:
            return await self._wait_for_card_asked(card_id, deadline, wait_s)
        finally:
            self._asked[card_id] -= 1
            if self._asked[card_id] <= 0:
                del self._asked[card_id]

    async def _wait_for_card_asked(self, card_id: str, deadline: float, wait_s: float) -> Received:
        from qkv import CardCompatError, CardFormatError

        from .roles_answerer import TextSummary, summarise_card
        from .roles_reader import decode_document

        assert self._store is not None
        pulling: bool | None = None  # once, after the held checks; intake pulls what is announced later
        while True:
            record = self._received.get(card_id)
            if record is not None:
                return record
            if card_id in self._store:
                # Loaded from a persisted snapshot: summarise it on first use.
                data = self._store.get(card_id)
                summary: CardSummary | TextSummary
                try:
                    summary = await self._worker.run(
                        summarise_card, card_id, data, self.lm, self._calibrations
                    )
                    text = False
                except CardCompatError as exc:
                    raise AskError(f"card {card_id} is held but cannot be read here: {exc}") from None
                except CardFormatError:
                    # Not a card: a document handed over as text (or nothing usable).
                    try:
                        decode_document(data)
                    except ValueError:
                        raise AskError(f"card {card_id} is held but is neither a card nor text") from None
                    summary, text = TextSummary(card_id=card_id, text_bytes=len(data), sender=""), True
                record = self._received[card_id] = Received(
                    summary=summary, topic="", sender=summary.sender, transfer_s=0.0, text=text
                )
                return record
            if self._draining:
                raise AskError("node is draining (shutting down)")
            if pulling is None:
                pulling = self._pull_on_demand(card_id)
            left = deadline - time.monotonic()
            if left <= 0:
                note = " (addressed to other receivers: pulling it now)" if pulling else ""
                raise AskError(f"no card {card_id} here (not received{' in time' if wait_s else ''}){note}")
            waiter = self._arrived
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await waiter.wait()

    def _pull_on_demand(self, card_id: str) -> bool:
        """Start pulling ``card_id`` (and its split head) if it was announced for other receivers only."""
        if not self._not_ours or self._bus is None:
            return False
        wanted = [
            ann
            for ann in self._bus.known_cards()
            if ann.card_id in self._not_ours and _answers_to(ann) == card_id
        ]
        # A split's head first, so its prefill can start while the tail card is still in flight.
        wanted.sort(key=lambda ann: ann.card_id == card_id)
        for ann in wanted:
            handle = self._not_ours.pop(ann.card_id)
            addressed = ann.meta.get("for")
            if not isinstance(addressed, list) or not all(isinstance(a, str) for a in addressed):
                addressed = None  # untrusted metadata: printed only when it is a list of names
            log.info("card %s was addressed to %s: pulled on demand", ann.card_id, addressed)
            self.events.emit("card_pulled_on_demand", card=ann.card_id, addressed=addressed)
            self._on_demand.add(ann.card_id)
            self._spawn(self._receive_on_demand(ann, handle), f"fetch-{ann.card_id[:8]}", work=True)
        return bool(wanted)

    async def _receive_on_demand(self, ann: Announcement, handle: Handler) -> None:
        try:
            await self._receive(ann, handle)
        finally:
            self._on_demand.discard(ann.card_id)

    def _wake_waiters(self) -> None:
        self._arrived.set()
        self._arrived = asyncio.Event()

    async def _req_ask_text(self, body: dict[str, Any]) -> dict[str, Any]:
        from .roles_answerer import check_question
        from .roles_reader import MAX_DOCUMENT_BYTES

        self._need_role("answerer", "relay")
        context = body.get("context")
        if not isinstance(context, str) or not context.strip():
            raise AskError("'context' must be a non-empty string")
        if len(context.encode()) > MAX_DOCUMENT_BYTES:
            raise AskError(f"'context' exceeds {MAX_DOCUMENT_BYTES} bytes")
        try:
            question, max_new = check_question(
                body.get("question"), body.get("max_new_tokens", self._holder_cfg.max_new_tokens)
            )
        except ValueError as exc:
            raise AskError(str(exc)) from None
        result = await self._answer_text(context, question, max_new)
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
            "rejected": self._rejected,
            # Background tasks that failed: any makes the watchdog stop pinging (systemd restarts the node).
            "task_failures": self._failures,
            "bus": _plain(bus.stats()),
        }
        if self._store is not None:
            out["store"] = _plain(self._store.statistics())
            out["cards"] = {cid: rec.summary.as_dict() for cid, rec in list(self._received.items())[-32:]}
        if self.config.reader is not None:
            out["budget"] = self._budget_info()
        return out


def _plain(snapshot: Any) -> dict[str, Any]:
    """A frozen statistics dataclass as a msgpack-safe dict (mappings copied into plain dicts)."""
    return {
        f.name: dict(value) if isinstance(value, Mapping) else value
        for f in fields(snapshot)
        for value in (getattr(snapshot, f.name),)
    }


def _measure_speeds(lm: Any) -> tuple[PrefillModel, CardSpeeds]:
    """This node's prefill model and card speeds, at start."""
    from .roles_answerer import measure_card_answer, measure_prefill

    return measure_prefill(lm), measure_card_answer(lm)


def _plan_chooser(config: NodeConfig, lm: Any) -> PlanChooser:
    from .crossmodel import load_calibrations
    from .reader_policy import PlanChooser, fixed_budget, load_policy

    reader = config.reader
    assert reader is not None
    translations = load_calibrations(
        config.file, "reader.translate", reader.translate, lm.fingerprint, side="sender"
    )
    return PlanChooser(
        load_policy(reader.policy, lm.name),
        fixed=fixed_budget(reader),
        assumed_bandwidth_bps=reader.policy.assumed_link_mbit * 1e6 / 8,
        name=config.name,
        translations=translations,
        translate_at=reader.translate_at,
    )


def _as_text(choice: Any, reason: str) -> Any:
    """``choice`` (a reader_policy.Choice) turned into sending the text, with ``reason``."""
    from .roles_reader import SendPlan

    decision = {"representation": "text", "head_tokens": 0, "policy": False, "reason": reason}
    return replace(choice, plan=SendPlan(kind="text"), decision=decision)


def _answers_to(ann: Announcement) -> str | None:
    """The card id an ask names to get this artifact: a split head's tail card, else its own id."""
    if ann.meta.get("rep") != "head":
        return ann.card_id
    tail = ann.meta.get("tail")
    return tail if isinstance(tail, str) else None


def _kv_bytes_per_token(lm: Any) -> int:
    """fp16 K and V bytes per context token of this model (what a whole card decodes into)."""
    fp = lm.fingerprint
    return int(2 * fp.num_layers * fp.num_kv_heads * fp.head_dim * 2)


# ---------------------------------------------------------------------------------------------- entry


async def _serve(config: NodeConfig, heap: HeapSettings, events: EventLog, notifier: Notifier) -> None:
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
        if config.heap_prefault and heap.applied:
            notifier.status("faulting in the retained heap")
            started = time.monotonic()
            touched = await asyncio.to_thread(prefault_heap, heap)
            log.info("heap: %d MiB made resident in %.2f s", touched >> 20, time.monotonic() - started)
        await Agent(config, lm, events=events, notifier=notifier).run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run_node(config: NodeConfig, *, events: bool = False) -> int:
    """Run a node until SIGTERM/SIGINT; returns the process exit code."""
    # Before any thread starts: the arena setting only governs arenas made afterwards.
    heap = retain_heap(config.heap_retain_mib)
    log.info("heap: %s", heap.as_dict())
    with Notifier() as notifier:
        asyncio.run(_serve(config, heap, EventLog(sys.stdout if events else None), notifier))
    return 0
