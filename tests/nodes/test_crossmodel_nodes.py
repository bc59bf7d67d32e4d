"""Cross-model wiring of the nodes: calibrations named in configs, the reader's choice for a receiver of
another model, and a translated card read by an answerer of another model (tiny Llama -> tiny Gemma 3).

The process test runs a Llama reader and two Gemma answerers, one holding the calibration and one not:
the first gets a card translated at the receiver and must answer as this process does from the same card;
the second gets the text.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from edgebus import PeerInfo, load_public_key
from nodes._errors import ConfigFileError
from nodes.crossmodel import load_calibrations
from nodes.demo_processes import NodeProcess, node_group, write_fleet_keys
from nodes.reader_policy import Document, PlanChooser
from nodes.roles_answerer import answer_card, summarise_card
from nodes.roles_client import Target, connect
from nodes.roles_reader import SendPlan, read_document
from qkv import (
    Budget,
    CalibrationError,
    CardCompatError,
    CrossModelCalibration,
    LoadedModel,
    answer_from_card,
    answer_from_text,
    calibrate_pair,
    load_model,
)
from tests.nodes.fleet import DOCUMENT, QUESTION, client_keys, free_port_base, node_config, reader_sees
from tests.qkv.test_crossmodel import SENTENCES, build_tiny_gemma_dir

ENV = {"OMP_NUM_THREADS": "1"}
DOC = Document(tokens=200, text_bytes=len(DOCUMENT), sender_headroom=4 << 30, kv_bytes_per_token=384)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma_dir(tmp_path_factory.mktemp("node-gemma"))


@pytest.fixture(scope="module")
def gemma(gemma_dir: Path) -> LoadedModel:
    return load_model(gemma_dir, device="cpu")


@pytest.fixture(scope="module")
def calibration_file(
    tiny_lm: LoadedModel, gemma: LoadedModel, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("cal") / "llama--gemma.safetensors"
    calibrate_pair(tiny_lm, gemma, SENTENCES, holdout_every=4).save(path)
    return path


@pytest.fixture(scope="module")
def calibration(calibration_file: Path) -> CrossModelCalibration:
    return CrossModelCalibration.load(calibration_file)


async def start_nodes(
    nodes: list[NodeProcess], keys: Path, ep: dict[str, str], configs: tuple[Path, ...]
) -> tuple[list[NodeProcess], list[Target]]:
    """Start one node per config (named as ``ep``'s keys, in order) into ``nodes``, wait until all are ready;
    (the processes, client targets for them)."""
    names = list(ep)
    started = await asyncio.gather(
        *(NodeProcess.start(n, cfg, env=ENV) for n, cfg in zip(names, configs, strict=True))
    )
    nodes.extend(started)
    await asyncio.gather(*(n.ready() for n in started))
    return started, [Target(endpoint=ep[n], server_key=load_public_key(keys / f"{n}.key")) for n in names]


def gemma_peer(name: str, *, roles: tuple[str, ...] = ("answerer",), **info: Any) -> PeerInfo:
    advertised = {"model": "tiny-gemma", "fingerprint": "", "headroom": 1 << 30, **info}
    return PeerInfo(name, roles, MappingProxyType(advertised), 0.1)


def test_configured_calibrations_load_for_the_right_side_only(
    tmp_path: Path, tiny_lm: LoadedModel, gemma: LoadedModel, calibration_file: Path
) -> None:
    config = tmp_path / "node.toml"
    as_sender = load_calibrations(
        config, "reader.translate", [calibration_file], tiny_lm.fingerprint, side="sender"
    )
    as_receiver = load_calibrations(
        config, "answerer.calibrations", [calibration_file], gemma.fingerprint, side="receiver"
    )
    assert as_sender[0].id == as_receiver[0].id
    # The Gemma node cannot translate *from* Gemma with a Llama -> Gemma map, nor hold one map twice.
    with pytest.raises(ConfigFileError, match=r"reader\.translate\[0\].*fitted for sender"):
        load_calibrations(config, "reader.translate", [calibration_file], gemma.fingerprint, side="sender")
    with pytest.raises(ConfigFileError, match=r"answerer\.calibrations\[1\].*second calibration"):
        load_calibrations(
            config, "answerer.calibrations", [calibration_file] * 2, gemma.fingerprint, side="receiver"
        )
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(calibration_file.read_bytes()[:-100])
    with pytest.raises(ConfigFileError, match=r"answerer\.calibrations\[0\]"):
        load_calibrations(config, "answerer.calibrations", [corrupt], gemma.fingerprint, side="receiver")


def test_a_receiver_of_another_model_gets_a_translated_card_only_when_it_can_read_one(
    tiny_lm: LoadedModel, gemma: LoadedModel, calibration: CrossModelCalibration
) -> None:
    mine, theirs = tiny_lm.fingerprint.digest, gemma.fingerprint.digest
    fixed = Budget(bits=3, keep=0.5, layers=0.5)
    at_receiver = PlanChooser(None, fixed=fixed, assumed_bandwidth_bps=1e6, name="reader",
                              translations=[calibration])  # fmt: skip
    peers = [
        gemma_peer("holds", fingerprint=theirs, calibrations=[calibration.id]),
        gemma_peer("lacks", fingerprint=theirs, calibrations=[]),
        gemma_peer("relay", fingerprint=theirs, calibrations=[calibration.id], roles=("relay",)),
        gemma_peer("unknown", fingerprint="0123456789abcdef", calibrations=[calibration.id]),
        gemma_peer("same", fingerprint=mine),
    ]
    choices = {c.receiver: c for c in at_receiver.choose(peers, DOC, fingerprint=mine)}
    assert {name: c.plan.kind for name, c in choices.items()} == {
        "same": "card", "holds": "card", "lacks": "text", "relay": "text", "unknown": "text",
    }  # fmt: skip
    card = choices["holds"].plan
    assert (card.translate, card.translate_at) == (calibration, "receiver")
    # Every layer (a translated card needs them all) and the facts line; bits and keep from the config.
    assert card.budget == Budget(bits=3, keep=0.5, layers=1.0, facts=True)
    assert choices["holds"].decision["translate"]["calibration"] == calibration.id
    assert choices["same"].plan.translate is None
    assert "does not advertise calibration" in choices["lacks"].decision["reason"]
    assert "relay" in choices["relay"].decision["reason"]
    assert "no calibration" in choices["unknown"].decision["reason"]
    assert len({c.plan.key for c in choices.values()}) == 3  # same-model card, translated card, text

    at_sender = PlanChooser(None, fixed=fixed, assumed_bandwidth_bps=1e6, name="reader",
                            translations=[calibration], translate_at="sender")  # fmt: skip
    (lacks,) = at_sender.choose([peers[1]], DOC, fingerprint=mine)
    assert (lacks.plan.kind, lacks.plan.translate_at) == ("card", "sender")
    with pytest.raises(ValueError, match="whole card"):
        SendPlan(kind="split", budget=Budget(), head_tokens=3, translate=calibration)


@pytest.mark.parametrize("at", ["receiver", "sender"])
def test_a_translated_card_is_summarised_and_answered_by_the_other_model(
    tiny_lm: LoadedModel, gemma: LoadedModel, calibration: CrossModelCalibration, at: str
) -> None:
    plan = SendPlan(kind="card", budget=Budget(bits=8, facts=True), translate=calibration, translate_at=at)
    made = read_document(tiny_lm, DOCUMENT, plan, sender="reader")
    assert made.encoded is not None
    assert made.meta()["calibration"] == calibration.id
    assert made.reply()["translate"] == {"calibration": calibration.id, "at": at}
    data = made.encoded.data
    held = (calibration,) if at == "receiver" else ()
    summary = summarise_card("c1", data, gemma, held)
    assert summary.calibration == summary.as_dict()["translated_with"] == calibration.id
    reply = answer_card(gemma, data, QUESTION, 6, None, held)
    assert (
        reply["answer"] == answer_from_card(gemma, data, QUESTION, max_new_tokens=6, calibrations=held).text
    )
    if at == "receiver":
        with pytest.raises(CardCompatError, match=calibration.id):
            summarise_card("c1", data, gemma)
        # The sender's own model reads it as an ordinary card.
        assert summarise_card("c1", data, tiny_lm).calibration is None


@pytest.mark.timeout(180)
async def test_nodes_of_two_models_hand_off_through_a_calibration(
    tiny_lm: LoadedModel,
    tiny_model_dir: Path,
    gemma: LoadedModel,
    gemma_dir: Path,
    calibration_file: Path,
    calibration: CrossModelCalibration,
    tmp_path: Path,
) -> None:
    names = ("reader", "holds", "lacks")
    keys = write_fleet_keys(tmp_path / "keys", (*names, "client"))
    ep = {name: f"tcp://127.0.0.1:{free_port_base()}" for name in names}
    reader_cfg = node_config(
        tmp_path, "reader", tiny_model_dir, keys, roles=["reader"], bind=ep["reader"],
        reader={"topic": "kv/reader", "bits": 8, "translate": [str(calibration_file)]},
    )  # fmt: skip
    answerer = {"topics": "kv/", "persist": False, "max_new_tokens": 6}
    holds_cfg = node_config(
        tmp_path, "holds", gemma_dir, keys, roles=["answerer"], bind=ep["holds"],
        peers=[(ep["reader"], "reader")], answerer={**answerer, "calibrations": [str(calibration_file)]},
    )  # fmt: skip
    lacks_cfg = node_config(
        tmp_path, "lacks", gemma_dir, keys, roles=["answerer"], bind=ep["lacks"],
        peers=[(ep["reader"], "reader")], answerer=answerer,
    )  # fmt: skip
    ask = {"op": "ask", "question": QUESTION, "wait_s": 60, "max_new_tokens": 6}
    async with node_group() as nodes:
        started, targets = await start_nodes(nodes, keys, ep, (reader_cfg, holds_cfg, lacks_cfg))
        async with connect(targets, keys=client_keys(keys)) as client:
            # The reader decides from presence: wait until it has seen both answerers' info.
            await reader_sees(
                client, lambda seen: all("calibrations" in seen.get(n, {}) for n in ("holds", "lacks"))
            )
            sent = await client.request("reader", {"op": "read", "text": DOCUMENT}, timeout_s=60)
            by_card = await client.request("holds", {**ask, "card": sent["cards"]["holds"]}, timeout_s=60)
            by_text = await client.request("lacks", {**ask, "card": sent["cards"]["lacks"]}, timeout_s=60)
            # A plain card of the reader's model, forced by the request: neither Gemma node can read it.
            forced = await client.request(
                "reader", {"op": "read", "text": DOCUMENT, "representation": "card"}, timeout_s=60
            )
            rejected = await asyncio.gather(
                *(n.event("card_rejected", where=lambda e: e["card"] == forced["card"]) for n in started[1:])
            )
            statuses = [await client.request(n, {"op": "status"}, timeout_s=10) for n in ("holds", "lacks")]

    decisions = sent["decisions"]
    assert decisions["holds"]["translate"]["calibration"] == calibration.id
    assert decisions["lacks"]["representation"] == "text"
    assert "does not advertise" in decisions["lacks"]["reason"]
    assert by_card["translated_with"] == calibration.id
    plan = SendPlan(kind="card", budget=Budget(bits=8, facts=True), translate=calibration)
    made = read_document(tiny_lm, DOCUMENT, plan, sender="reader")
    assert made.encoded is not None
    assert by_card["card_bytes"] == made.encoded.card_bytes
    expected = answer_from_card(
        gemma, made.encoded.data, QUESTION, max_new_tokens=6, calibrations=[calibration]
    )
    assert by_card["answer"] == expected.text
    assert by_text["representation"] == "text"
    assert by_text["answer"] == answer_from_text(gemma, DOCUMENT, QUESTION, max_new_tokens=6).text
    # Refused with the reason, counted, and the nodes kept serving.
    assert all("another model" in event["error"] for event in rejected)
    assert [status["rejected"] for status in statuses] == [1, 1]


@pytest.mark.timeout(180)
async def test_a_translation_the_reader_cannot_make_falls_back_to_text(
    tiny_lm: LoadedModel,
    tiny_model_dir: Path,
    gemma: LoadedModel,
    gemma_dir: Path,
    calibration: CrossModelCalibration,
    tmp_path: Path,
) -> None:
    # A calibration fitted with another template head than the reader's cards have: the sender-side
    # translation of every card fails, and the receiver of the other model must get the text instead.
    shifted = dataclasses.replace(calibration.sender, head_tokens=calibration.sender.head_tokens + 3)
    mismatched = dataclasses.replace(calibration, sender=shifted)
    plan = SendPlan(
        kind="card", budget=Budget(bits=8, facts=True), translate=mismatched, translate_at="sender"
    )
    with pytest.raises(CalibrationError, match="was fitted with"):
        read_document(tiny_lm, DOCUMENT, plan, sender="reader")
    mismatched_file = tmp_path / "mismatched.safetensors"
    mismatched.save(mismatched_file)

    names = ("reader", "other")
    keys = write_fleet_keys(tmp_path / "keys", (*names, "client"))
    ep = {name: f"tcp://127.0.0.1:{free_port_base()}" for name in names}
    reader = {"topic": "kv/reader", "bits": 8, "translate": [str(mismatched_file)], "translate_at": "sender"}
    reader_cfg = node_config(
        tmp_path, "reader", tiny_model_dir, keys, roles=["reader"], bind=ep["reader"], reader=reader
    )
    other_cfg = node_config(
        tmp_path, "other", gemma_dir, keys, roles=["answerer"], bind=ep["other"],
        peers=[(ep["reader"], "reader")], answerer={"topics": "kv/", "persist": False, "max_new_tokens": 6},
    )  # fmt: skip
    async with node_group() as nodes:
        _, targets = await start_nodes(nodes, keys, ep, (reader_cfg, other_cfg))
        async with connect(targets, keys=client_keys(keys)) as client:
            await reader_sees(client, lambda seen: "model" in seen.get("other", {}))
            sent = await client.request("reader", {"op": "read", "text": DOCUMENT}, timeout_s=60)
            ask = {"op": "ask", "question": QUESTION, "wait_s": 60, "max_new_tokens": 6}
            answered = await client.request("other", {**ask, "card": sent["cards"]["other"]}, timeout_s=60)
            # The reader kept serving: a second read makes the same choice.
            again = await client.request("reader", {"op": "read", "text": DOCUMENT}, timeout_s=60)

    for reply in (sent, again):
        decision = reply["decisions"]["other"]
        assert decision["representation"] == "text"
        assert "no translated card" in decision["reason"]
        assert "was fitted with" in decision["reason"]
    assert answered["representation"] == "text"
    assert answered["answer"] == answer_from_text(gemma, DOCUMENT, QUESTION, max_new_tokens=6).text
