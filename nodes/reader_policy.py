"""The reader's side of the budget policy: from what receivers advertise to a :class:`SendPlan` each.

Inputs per (receiver, document), and where each comes from:

* link bandwidth and RTT: measured by the *receiver* (it pulls, so its bus times the chunks and its
  heartbeats time the round trip) and advertised in its presence info as ``links[<reader>] = {"bw", "rtt",
  "n"}``. Before any transfer (``n == 0``) the reader's own probe card (published at start, see
  :mod:`nodes.agent`) gives the first sample; until that arrives the first decision uses
  ``assumed_link_mbit`` from the config, and the decision says ``bandwidth: assumed``.
* receiver prefill speed (``prefill_tps`` and the quadratic ``prefill_q``), card decode speed
  (``decode_bps``), how fast it turns a rotated card's values back (``rotate_bps``; absent from an older
  node: ``DEFAULT_ROTATE_BYTES_PER_S``), time from a ready cache to the first token (``question_s``), speed
  of joining a split's head to its tail (``join_bps``) and RAM headroom (``headroom``): measured by the
  receiver at start (the speeds refined by its real work) and advertised.
* the sender's own RAM headroom (its memory probe), the document's token count and text bytes.

Receivers of another model (their advertised ``fingerprint`` differs) are outside the table, which was
measured for this model: each gets text, unless this reader holds a calibration to that model (``[reader]
translate``), in which case it gets a whole card translated with it, at the fixed budget with every layer
and the facts line (measured on SQuAD, SmolLM2 -> Gemma: translated KV alone closed 7% of the no-context
-> text F1 gap, with facts 78%; see README). Translating at the receiver also needs the receiver to
advertise the calibration's id (``calibrations`` in its presence info).

Peers' presence info is untrusted: a missing or ill-typed field makes that receiver's decision fall back to
the configured fixed budget, with the reason in the decision. Decisions are kept per receiver (the previous
one feeds the policy's hysteresis) and returned as plain dicts for the read reply and events.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from edgebus import (
    DEFAULT_INJECT_BYTES_PER_S,
    DEFAULT_ROTATE_BYTES_PER_S,
    BudgetPolicy,
    ConfigError,
    Decision,
    InvalidPolicyInput,
    NoFeasibleRepresentation,
    PeerInfo,
    PolicyConfig,
    PolicyInputs,
    RateQualityTable,
    balanced_head,
    predict_split,
)
from qkv import Budget, CrossModelCalibration, TranslateAt

from ._errors import AskError
from .config import ReaderConfig, ReaderPolicyConfig
from .roles_reader import SendPlan

log = logging.getLogger("nodes.policy")

#: Roles whose nodes receive what a reader sends.
RECEIVER_ROLES: Final = frozenset({"answerer", "relay"})
REPRESENTATIONS: Final = ("text", "card", "split")


def find_table(config: ReaderPolicyConfig, model: str) -> Path | None:
    """The rate-quality table file for ``model``: the configured one, the store's, then the shipped one."""
    from nodes.bench.rate_quality import shipped_table_path, table_filename
    from qkv import profiles_dir

    if config.table is not None:
        return config.table
    for candidate in (profiles_dir() / table_filename(model), shipped_table_path(model)):
        if candidate.is_file():
            return candidate
    return None


def load_policy(config: ReaderPolicyConfig, model: str) -> tuple[RateQualityTable, PolicyConfig] | None:
    """The table and settings for ``model`` (None in fixed mode, or when no table exists: logged)."""
    if config.mode == "fixed":
        return None
    path = find_table(config, model)
    if path is None:
        log.warning("no rate-quality table for %s: sending cards at the fixed budget", model)
        return None
    table = RateQualityTable.load(path)
    if table.model and table.model != model:
        raise ConfigError(f"{path}: the table is for {table.model!r}, this node runs {model!r}")
    log.info("budget policy from %s (%d points, quality %s)", path, len(table.points), table.metric)
    settings = PolicyConfig(
        quality_floor=config.quality_floor,
        deadline_s=config.deadline_s,
        split=config.split,
        split_min_head=config.split_min_head,
    )
    return table, settings


def fixed_budget(reader: ReaderConfig) -> Budget:
    return Budget(
        bits=reader.bits,
        keep=reader.keep,
        layers=reader.layers,
        facts=reader.facts,
        rotation=reader.rotation,
        fp16_sinks=reader.fp16_sinks,
    )


def budget_of(decision: Decision) -> Budget:
    """The codec budget a decision names: its condition when the table gave one, else its plain fields."""
    budget = _condition_budget(decision.condition) if decision.condition else None
    if budget is not None:
        return budget
    return Budget(
        bits=int(decision.bits) if float(decision.bits).is_integer() else decision.bits,
        keep=decision.keep,
        layers=decision.layers,
        facts=decision.facts,
    )


def _condition_budget(condition: str) -> Budget | None:
    """The budget a table condition names (None for a name this version cannot parse)."""
    from nodes.bench.conditions import parse_condition

    try:
        return parse_condition(condition).budget
    except ValueError:
        return None


def plan_of(decision: Decision) -> SendPlan:
    if decision.representation == "text":
        return SendPlan(kind="text")
    if decision.representation == "split":
        return SendPlan(kind="split", budget=budget_of(decision), head_tokens=decision.head_tokens)
    if decision.representation == "card":
        return SendPlan(kind="card", budget=budget_of(decision))
    raise ValueError(f"the reader cannot send a {decision.representation} yet")


# ------------------------------------------------------------------------------------------------ overrides


@dataclass(frozen=True, kw_only=True)
class Override:
    """A read request's fixed alternative (a split without ``head_tokens``: the policy's balanced head)."""

    kind: str
    budget: Budget | None = None
    head_tokens: int | None = None


def parse_override(body: Mapping[str, Any], fixed: Budget) -> Override | None:
    """A read request's fixed alternative (``representation``, ``budget``, ``head_tokens``), or None.

    Untrusted: anything malformed is an :class:`AskError` naming the field.
    """
    kind = body.get("representation")
    if kind is None:
        if "budget" in body or "head_tokens" in body:
            raise AskError("'budget' and 'head_tokens' go with 'representation'")
        return None
    if kind not in REPRESENTATIONS:
        raise AskError(f"'representation' must be one of {', '.join(REPRESENTATIONS)}")
    if kind == "text":
        return Override(kind="text")
    raw = body.get("budget", {})
    if not isinstance(raw, dict) or len(raw) > 16:
        raise AskError("'budget' must be a map of budget fields")
    known = {f.name for f in fields(Budget)}
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise AskError(f"'budget': unknown field {unknown[0]!r}")
    try:
        budget = Budget(**{**fixed.to_dict(), **raw})
    except (TypeError, ValueError) as exc:
        raise AskError(f"'budget': {exc}") from None
    if kind == "card":
        return Override(kind="card", budget=budget)
    head = body.get("head_tokens")
    if head is not None and (type(head) is not int or head < 1):
        raise AskError("'head_tokens' must be an int >= 1 (or left out: the policy's balanced head)")
    if budget.layers < 1:
        raise AskError("a split cannot use layer selection ('budget.layers' < 1)")
    return Override(kind="split", budget=budget, head_tokens=head)


# ------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True, kw_only=True)
class ReceiverView:
    """What one receiver advertises that the policy needs (validated: see :func:`receiver_view`)."""

    node: str
    relay: bool
    headroom: int
    prefill_tps: float
    prefill_q: float
    decode_bps: float
    rotate_bps: float
    question_s: float
    join_bps: float
    bandwidth_bps: float | None  # None: not measured yet
    rtt_s: float


#: Receivers whose last decision is remembered for hysteresis (the least recently decided go first).
MAX_REMEMBERED_RECEIVERS: Final = 1024

#: The largest number a presence field may hold: above any real byte count or rate, and small enough that
#: whatever the policy derives from it still packs into a msgpack integer (decision records carry them).
MAX_PRESENCE_NUMBER: Final = 1e15


def _num(info: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = info.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_PRESENCE_NUMBER
    ):
        raise ValueError(
            f"presence field {key!r} must be a number in 0..{MAX_PRESENCE_NUMBER:g}, got {value!r}"
        )
    return float(value)


def receiver_view(peer: PeerInfo, reader: str) -> ReceiverView:
    """Validate a receiver's presence info (ValueError naming the field)."""
    info = peer.info
    links = info.get("links", {})
    link = links.get(reader, {}) if isinstance(links, Mapping) else None
    if not isinstance(link, Mapping):
        raise ValueError("presence field 'links' must map node ids to link estimates")
    samples = _num(link, "n", 0)
    return ReceiverView(
        node=peer.node_id,
        relay="relay" in peer.roles,
        headroom=int(_num(info, "headroom")),
        prefill_tps=_num(info, "prefill_tps"),
        prefill_q=_num(info, "prefill_q", 0.0),
        decode_bps=_num(info, "decode_bps"),
        rotate_bps=_num(info, "rotate_bps", DEFAULT_ROTATE_BYTES_PER_S),
        question_s=_num(info, "question_s", 0.0),
        join_bps=_num(info, "join_bps", DEFAULT_INJECT_BYTES_PER_S),
        bandwidth_bps=_num(link, "bw") if samples > 0 else None,
        rtt_s=_num(link, "rtt", 0.0),
    )


@dataclass(frozen=True, kw_only=True)
class Document:
    """The document about to be sent, and the sender's own state."""

    tokens: int
    text_bytes: int
    sender_headroom: int
    kv_bytes_per_token: int


@dataclass(frozen=True, kw_only=True)
class Choice:
    """What to send one receiver and why (``decision`` is the reply's and the event's record)."""

    receiver: str
    plan: SendPlan
    decision: dict[str, Any]


class PlanChooser:
    """Per (receiver, document) decisions, keeping each receiver's previous one for hysteresis.

    ``policy``: the table and settings from :func:`load_policy`, or None to always send the fixed budget.
    """

    def __init__(
        self,
        policy: tuple[RateQualityTable, PolicyConfig] | None,
        *,
        fixed: Budget,
        assumed_bandwidth_bps: float,
        name: str,
        translations: Sequence[CrossModelCalibration] = (),
        translate_at: TranslateAt = "receiver",
    ) -> None:
        self._translations = {c.receiver.fingerprint.digest: c for c in translations}
        self._translate_at: TranslateAt = translate_at
        self._policy: BudgetPolicy | None = None
        self._relay_policy: BudgetPolicy | None = None
        self._table: RateQualityTable | None = None
        if policy is not None:
            table, settings = policy
            self._table = table
            self._policy = BudgetPolicy(table, settings)
            # A relay re-encodes whole cards: it is never sent a split.
            self._relay_policy = BudgetPolicy(table, replace(settings, split=False))
        self._fixed = fixed
        self._assumed = assumed_bandwidth_bps
        self._name = name
        # The last decision per receiver (hysteresis), newest last; bounded, as receivers come and go.
        self._previous: OrderedDict[str, Decision] = OrderedDict()

    @property
    def policy(self) -> BudgetPolicy | None:
        return self._policy

    def receivers(self, peers: Sequence[PeerInfo], fingerprint: str) -> list[PeerInfo]:
        """Live peers that receive cards and run this model (or do not say which they run)."""
        return [
            p
            for p in peers
            if RECEIVER_ROLES & set(p.roles) and p.info.get("fingerprint", fingerprint) == fingerprint
        ]

    def other_models(self, peers: Sequence[PeerInfo], fingerprint: str) -> list[PeerInfo]:
        """Live peers that receive cards and say they run another model."""
        return [
            p
            for p in peers
            if RECEIVER_ROLES & set(p.roles) and p.info.get("fingerprint", fingerprint) != fingerprint
        ]

    def choose(self, peers: Sequence[PeerInfo], doc: Document, *, fingerprint: str) -> list[Choice]:
        """One choice per live receiver; with none live, one fixed-budget card for whoever joins later."""
        receivers = self.receivers(peers, fingerprint)
        others = self.other_models(peers, fingerprint)
        if not receivers and not others:
            return [self._fixed_choice("*", "no live receiver: the configured budget")]
        return [self._choose_one(peer, doc) for peer in receivers] + [self._cross_model(p) for p in others]

    def _cross_model(self, peer: PeerInfo) -> Choice:
        """A receiver of another model: a translated card when a calibration allows it, else text."""
        info = peer.info
        digest, model = info.get("fingerprint"), str(info.get("model", "another model"))[:80]
        calibration = self._translations.get(digest) if isinstance(digest, str) else None
        at = self._translate_at
        held = info.get("calibrations", [])
        why_text = None
        if "relay" in peer.roles:
            why_text = f"a relay re-encodes cards of its own model ({model}), not translated ones"
        elif calibration is None:
            why_text = f"it runs {model} and this reader holds no calibration to it ([reader] translate)"
        elif at == "receiver" and not (isinstance(held, list) and calibration.id in held):
            why_text = f"it runs {model} and does not advertise calibration {calibration.id}"
        if why_text is not None or calibration is None:
            record = {"representation": "text", "head_tokens": 0, "policy": False,
                      "reason": f"{why_text}: text"}  # fmt: skip
            log.info("decision for %s: text: %s", peer.node_id, why_text)
            return Choice(receiver=peer.node_id, plan=SendPlan(kind="text"), decision=record)
        budget = replace(self._fixed, layers=1.0, facts=True, adaptive=False, token_mixed=False)
        record = {
            "representation": "card", "bits": budget.bits, "keep": budget.keep, "layers": 1.0,
            "facts": True, "head_tokens": 0, "policy": False,
            "translate": {"calibration": calibration.id, "at": at, "receiver_model": model},
            "reason": f"it runs {model}: a card translated at the {at} with calibration {calibration.id}",
        }  # fmt: skip
        log.info("decision for %s: card translated at the %s (%s)", peer.node_id, at, calibration.id)
        plan = SendPlan(kind="card", budget=budget, translate=calibration, translate_at=at)
        return Choice(receiver=peer.node_id, plan=plan, decision=record)

    def _fixed_choice(self, receiver: str, reason: str) -> Choice:
        b = self._fixed
        record = {"representation": "card", "bits": b.bits, "keep": b.keep, "layers": b.layers,
                  "head_tokens": 0, "reason": reason, "policy": False}  # fmt: skip
        log.info("decision for %s: fixed card bits=%g: %s", receiver, b.bits, reason)
        return Choice(receiver=receiver, plan=SendPlan(kind="card", budget=b), decision=record)

    def _inputs(self, peer: PeerInfo, doc: Document) -> tuple[PolicyInputs, bool]:
        """(policy inputs, whether the bandwidth was measured); ValueError for unusable presence info."""
        view = receiver_view(peer, self._name)
        measured = view.bandwidth_bps is not None and view.bandwidth_bps > 0
        inputs = PolicyInputs(
            sender_headroom_bytes=doc.sender_headroom,
            receiver_headroom_bytes=view.headroom,
            bandwidth_bytes_per_s=view.bandwidth_bps if measured and view.bandwidth_bps else self._assumed,
            rtt_s=view.rtt_s,
            prefill_tokens_per_s=view.prefill_tps,
            prefill_s_per_token2=view.prefill_q,
            decode_bytes_per_s=view.decode_bps,
            question_s=view.question_s,
            join_bytes_per_s=view.join_bps,
            rotate_bytes_per_s=view.rotate_bps,
            context_tokens=doc.tokens,
            kv_bytes_per_token=doc.kv_bytes_per_token,
            text_bytes=doc.text_bytes,
        )
        return inputs, measured

    def resolve(
        self, override: Override, peers: Sequence[PeerInfo], doc: Document, *, fingerprint: str
    ) -> Choice:
        """The plan of a read request's fixed alternative (a split's head from the policy when not given)."""
        record: dict[str, Any] = {"representation": override.kind, "policy": False,
                                  "reason": "fixed alternative named by the read request"}  # fmt: skip
        if override.budget is not None:
            record["budget"] = override.budget.to_dict()
        if override.kind == "text":
            plan = SendPlan(kind="text")
        elif override.kind == "card":
            plan = SendPlan(kind="card", budget=override.budget)
        else:
            assert override.budget is not None
            head = override.head_tokens
            if head is None:
                head, record["predicted"] = self._balanced_head(
                    override.budget, peers, doc, fingerprint=fingerprint
                )
                record["reason"] += "; head length balanced by the policy"
            plan = SendPlan(kind="split", budget=override.budget, head_tokens=head)
        record["head_tokens"] = plan.head_tokens
        return Choice(receiver="*", plan=plan, decision=record)

    def _balanced_head(
        self, budget: Budget, peers: Sequence[PeerInfo], doc: Document, *, fingerprint: str
    ) -> tuple[int, dict[str, Any]]:
        """(head tokens, the prediction behind them: seconds per side and the inputs that set them)."""
        receivers = self.receivers(peers, fingerprint)
        cards = [
            p for p in (self._table.points if self._table is not None else ()) if p.representation == "card"
        ]
        # The point measured for exactly this budget (its bytes per token: a group size or an adaptive
        # allocation changes them at the same bits), else a whole card at the same bits.
        point = next((p for p in cards if p.condition and _condition_budget(p.condition) == budget), None)
        if point is None:
            point = next((p for p in cards if p.keep == 1 and p.layers == 1 and p.bits == budget.bits), None)
        if point is None or not receivers:
            raise AskError(
                "a split without 'head_tokens' needs a live receiver and a table point at its bits"
            )
        try:
            inputs, measured = self._inputs(receivers[0], doc)
        except (ValueError, InvalidPolicyInput) as exc:
            raise AskError(f"cannot balance the head: {exc}") from None
        head = min(max(balanced_head(point, inputs), 1), doc.tokens - 1)
        predicted: dict[str, Any] = {k: round(v, 4) for k, v in predict_split(point, inputs, head).items()}
        predicted.update(
            bandwidth_mbit=round(inputs.bandwidth_bytes_per_s * 8 / 1e6, 3),
            bandwidth="measured" if measured else "assumed",
            prefill_tps=round(inputs.prefill_tokens_per_s, 1),
        )
        return head, predicted

    def _choose_one(self, peer: PeerInfo, doc: Document) -> Choice:
        if self._policy is None:
            return self._fixed_choice(peer.node_id, "fixed mode (or no rate-quality table)")
        try:
            inputs, measured = self._inputs(peer, doc)
        except (ValueError, InvalidPolicyInput) as exc:
            log.warning("receiver %s advertises unusable policy inputs: %s", peer.node_id, exc)
            return self._fixed_choice(peer.node_id, f"unusable presence info ({exc}): the configured budget")
        relay = "relay" in peer.roles
        policy = self._relay_policy if relay and self._relay_policy is not None else self._policy
        previous = self._previous.get(peer.node_id)
        try:
            decision = policy.decide(inputs, previous)
        except NoFeasibleRepresentation as exc:
            record = {"representation": "text", "head_tokens": 0, "policy": True,
                      "reason": f"{exc}: text, the least the receiver must hold"}  # fmt: skip
            return Choice(receiver=peer.node_id, plan=SendPlan(kind="text"), decision=record)
        self._previous[peer.node_id] = decision
        self._previous.move_to_end(peer.node_id)
        while len(self._previous) > MAX_REMEMBERED_RECEIVERS:
            self._previous.popitem(last=False)
        record = decision_record(decision)
        record["bandwidth"] = "measured" if measured else "assumed"
        return Choice(receiver=peer.node_id, plan=plan_of(decision), decision=record)


def decision_record(d: Decision) -> dict[str, Any]:
    """A decision as a plain, msgpack- and JSON-safe dict: what was chosen, predicted, why, from what."""
    x = d.inputs
    return {
        "representation": d.representation,
        "bits": d.bits,
        "keep": d.keep,
        "layers": d.layers,
        "facts": d.facts,
        "condition": d.condition,
        "head_tokens": d.head_tokens,
        "predicted_ttft_s": round(d.predicted_ttft_s, 4),
        "predicted_quality": d.predicted_quality,
        "wire_bytes": d.wire_bytes,
        "reason": d.reason,
        "policy": True,
        "inputs": {f.name: getattr(x, f.name) for f in fields(x)},
    }
