"""The reader's budget policy and split hand-offs with real node processes (tiny model, loopback, CURVE).

The reader decides per receiver from what the answerer advertises (after the probe card measured the link)
and sends text, a card or a split; the answerer answers each as the same steps in this process would.
A hostile reader's malformed artifacts are refused and counted, and the answerer keeps answering.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import pytest

from edgebus import (
    Bus,
    BusConfig,
    BusKeys,
    RateQualityPoint,
    RateQualityTable,
    load_public_key,
)
from nodes._errors import AskError
from nodes.bench.handoff import wait_for_link
from nodes.demo_processes import NodeProcess, node_group, write_fleet_keys
from nodes.roles_client import Target, connect
from nodes.roles_reader import SendPlan, read_document
from qkv import Budget, answer_from_card, answer_from_text
from tests.nodes.fleet import DOCUMENT, FLEET, QUESTION, client_keys, free_port_base, node_config

ENV = {"OMP_NUM_THREADS": "1"}
ASK = {"op": "ask", "question": QUESTION, "wait_s": 30, "max_new_tokens": 8}


def _fake_reader(tmp_path: Path, keys: Path, endpoint: str) -> BusConfig:
    """A bare bus holding the reader's keys: the tests publish whatever artifacts they want from it."""
    return BusConfig(
        node_id="reader",
        spool_dir=tmp_path / "fake-spool",
        bind=endpoint,
        keys=BusKeys.from_files(keys / "reader.key_secret", keys / "allowed", keys / "hmac.key"),
        roles=("reader",),
    )


def _tiny_table(path: Path) -> Path:
    """A rate-quality table in the tiny model's units (384 fp16 KV bytes per token)."""
    points = (
        RateQualityPoint(representation="card", bits=16, keep=1, layers=1, bytes_per_token=385, quality=1.0,
                         condition="kv-fp16"),
        RateQualityPoint(representation="card", bits=4, keep=1, layers=1, bytes_per_token=121, quality=0.98,
                         condition="kv-4"),
    )  # fmt: skip
    RateQualityTable(points=points).save(path)
    return path


@pytest.mark.timeout(180)
async def test_policy_decides_and_every_representation_answers(
    tiny_lm: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    keys = write_fleet_keys(tmp_path / "keys", FLEET)
    # A head reaching 30 tokens past the prompt template, into the document.
    head = tiny_lm.template.split(tiny_lm.tokenizer, DOCUMENT, "").template_prefix_tokens + 30
    reader_ep, answerer_ep = (f"tcp://127.0.0.1:{free_port_base()}" for _ in range(2))
    reader_cfg = node_config(
        tmp_path, "reader", tiny_model_dir, keys, roles=["reader"], bind=reader_ep,
        reader={"topic": "kv/reader", "bits": 4},
        **{"reader.policy": {"table": _tiny_table(tmp_path / "rq.json"), "quality_floor": 0.5}},
    )  # fmt: skip
    answerer_cfg = node_config(
        tmp_path, "answerer", tiny_model_dir, keys, roles=["answerer"], bind=answerer_ep,
        peers=[(reader_ep, "reader")], answerer={"topics": "kv/", "persist": False, "max_new_tokens": 8},
    )  # fmt: skip
    async with node_group() as nodes:
        reader = await NodeProcess.start("reader", reader_cfg, env=ENV)
        nodes.append(reader)
        answerer = await NodeProcess.start("answerer", answerer_cfg, env=ENV)
        nodes.append(answerer)
        await asyncio.gather(reader.ready(), answerer.ready())
        probed = await answerer.event("link_probed")
        targets = [
            Target(endpoint=ep, server_key=load_public_key(keys / f"{name}.key"))
            for name, ep in (("reader", reader_ep), ("answerer", answerer_ep))
        ]
        async with connect(targets, keys=client_keys(keys)) as client:
            link = await wait_for_link(client, timeout_s=30)
            decided = await client.request("reader", {"op": "read", "text": DOCUMENT}, timeout_s=60)
            by_policy = await client.request("answerer", {**ASK, "card": decided["card"]}, timeout_s=60)
            text_sent = await client.request(
                "reader", {"op": "read", "text": DOCUMENT, "representation": "text"}, timeout_s=60
            )
            by_text = await client.request("answerer", {**ASK, "card": text_sent["card"]}, timeout_s=60)
            split_sent = await client.request(
                "reader",
                {"op": "read", "text": DOCUMENT, "representation": "split", "budget": {"bits": 16},
                 "head_tokens": head},
                timeout_s=60,
            )  # fmt: skip
            by_split = await client.request("answerer", {**ASK, "card": split_sent["card"]}, timeout_s=60)
            with pytest.raises(AskError, match="representation"):
                await client.request(
                    "reader", {"op": "read", "text": DOCUMENT, "representation": 3}, timeout_s=10
                )
            with pytest.raises(AskError, match="head_tokens"):
                await client.request(
                    "reader",
                    {"op": "read", "text": DOCUMENT, "representation": "split", "head_tokens": 10**6},
                    timeout_s=30,
                )
        head_event = await answerer.event("head_prefilled", where=lambda e: e["card"] == split_sent["card"])

    assert probed["bytes"] == 512 * 1024
    assert link["n"] >= 1
    decision = decided["decisions"]["answerer"]
    assert decision["policy"] is True
    assert decision["bandwidth"] == "measured"
    assert decision["inputs"]["bandwidth_bytes_per_s"] == link["bw"]
    assert decided["representation"] == decision["representation"]
    assert reader.count("decision", lambda e: e["receiver"] == "answerer") == 1

    text_answer = answer_from_text(tiny_lm, DOCUMENT, QUESTION, max_new_tokens=8).text
    if decided["representation"] == "text":
        expected = text_answer
    else:
        budget = Budget(bits=int(decision["bits"]))
        plan = SendPlan(kind=decided["representation"], budget=budget, head_tokens=decision["head_tokens"])
        made = read_document(tiny_lm, DOCUMENT, plan, sender="reader")
        assert made.encoded is not None
        expected = answer_from_card(tiny_lm, made.encoded.data, QUESTION, max_new_tokens=8).text
    assert by_policy["answer"] == expected

    assert (text_sent["representation"], by_text["representation"]) == ("text", "text")
    assert by_text["answer"] == text_answer
    assert text_sent["decisions"]["*"]["policy"] is False

    assert (split_sent["head_tokens"], by_split["head_tokens"]) == (head, head)
    assert by_split["head_source"] == "message"
    assert by_split["answer"] == text_answer  # fp16 tail + exactly prefilled head = the text itself
    assert head_event["tokens"] == head

    for reply in (by_policy, by_text, by_split):
        assert 0 <= reply["handoff_s"] <= reply["sent_to_ready_s"] + 0.5
        assert reply["handoff_ttft_s"] == pytest.approx(reply["handoff_s"] + reply["ttft_s"])


@pytest.mark.timeout(120)
async def test_hostile_artifacts_are_refused_and_the_answerer_keeps_answering(
    tiny_lm: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    keys = write_fleet_keys(tmp_path / "keys", FLEET)
    fake_ep, answerer_ep = (f"tcp://127.0.0.1:{free_port_base()}" for _ in range(2))
    answerer_cfg = node_config(
        tmp_path, "answerer", tiny_model_dir, keys, roles=["answerer"], bind=answerer_ep,
        peers=[(fake_ep, "reader")], answerer={"topics": "kv/", "persist": False, "max_new_tokens": 8},
    )  # fmt: skip
    fake = _fake_reader(tmp_path, keys, fake_ep)
    hostile: list[tuple[bytes, dict[str, Any]]] = [
        (b"\x01\x02\x03\x04\x05", {"rep": "head", "tail": "t" * 32, "tokens": 2}),
        (b"\x01\x00\x00\x00", {"rep": "head", "tail": ["not", "an", "id"], "tokens": 1}),
        # Well-formed, but ids outside the tiny model's 259-token vocabulary: refused when prefilled.
        (struct.pack("<2I", 1000, 1001), {"rep": "head", "tail": "u" * 32, "tokens": 2}),
        (b"\xff\xfe\xfd", {"rep": "text"}),
        (b"%PDF-1.7", {"rep": "pdf"}),
        (b"EBKV" + bytes(200), {"rep": "card"}),
        # Ids the model knows, but more of them than its 1024 positions: refused before any prefill.
        (struct.pack("<2000I", *([5] * 2000)), {"rep": "head", "tail": "v" * 32, "tokens": 2000}),
        (b"   \n ", {"rep": "text"}),  # an empty document
    ]
    async with node_group() as nodes, Bus(fake) as bus:
        answerer = await NodeProcess.start("answerer", answerer_cfg, env=ENV)
        nodes.append(answerer)
        ready = await answerer.ready()
        await bus.wait_for_peer("answerer", timeout=30)
        for index, (data, meta) in enumerate(hostile):
            await bus.publish_card("kv/x", data, card_id=f"bad-{index}", meta=meta)
        await bus.publish_card(
            "kv/x", DOCUMENT.encode(), card_id="not-yours", meta={"rep": "text", "for": ["b"]}
        )
        await bus.publish_card("kv/x", DOCUMENT.encode(), card_id="good", meta={"rep": "text"})
        await answerer.event("card_received", where=lambda e: e["card"] == "good")
        for index in range(len(hostile)):
            await answerer.event("card_rejected", where=lambda e, i=index: e["card"] == f"bad-{i}")
        target = Target(endpoint=ready["control"], server_key=load_public_key(keys / "answerer.key"))
        async with connect([target], keys=client_keys(keys)) as client:
            reply = await client.request("answerer", {**ASK, "card": "good"}, timeout_s=60)
            status = await client.request("answerer", {"op": "status"}, timeout_s=10)
            # Addressed to another receiver: not pulled unasked (status above), pulled once asked for.
            with pytest.raises(AskError, match=r"no card .* pulling it now"):
                await client.request("answerer", {**ASK, "card": "not-yours", "wait_s": 0}, timeout_s=10)
            pulled = await answerer.event("card_pulled_on_demand", where=lambda e: e["card"] == "not-yours")
            again = await client.request("answerer", {**ASK, "card": "not-yours", "wait_s": 30}, timeout_s=60)
    assert reply["answer"] == answer_from_text(tiny_lm, DOCUMENT, QUESTION, max_new_tokens=8).text
    assert again["answer"] == reply["answer"]
    assert pulled["addressed"] == ["b"]
    assert answerer.count("card_rejected") == len(hostile)
    assert answerer.count("card_received") == 2
    assert status["store"]["entries"] == 1
    assert status["task_failures"] == 0


@pytest.mark.timeout(120)
async def test_a_relay_asked_about_another_receivers_card_answers_it_without_forwarding_it(
    tiny_lm: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # The ask comes before the card is announced (addressed to another receiver): the announcement is
    # pulled as soon as it arrives. A card pulled only because it was asked for is not this relay's to
    # forward; a card addressed to no one, published after it, is forwarded as usual.
    keys = write_fleet_keys(tmp_path / "keys", FLEET)
    fake_ep, relay_ep = (f"tcp://127.0.0.1:{free_port_base()}" for _ in range(2))
    relay_cfg = node_config(
        tmp_path, "relay", tiny_model_dir, keys, roles=["relay"], bind=relay_ep, peers=[(fake_ep, "reader")],
        relay={"topics": "kv/", "out_topic": "relayed/", "question": QUESTION, "max_new_tokens": 4},
    )  # fmt: skip
    fake = _fake_reader(tmp_path, keys, fake_ep)
    card = read_document(tiny_lm, DOCUMENT, SendPlan(kind="card", budget=Budget(bits=4)), sender="reader")
    assert card.encoded is not None
    data = card.encoded.data
    async with node_group() as nodes, Bus(fake) as bus:
        relay = await NodeProcess.start("relay", relay_cfg, env=ENV)
        nodes.append(relay)
        ready = await relay.ready()
        await bus.wait_for_peer("relay", timeout=30)
        target = Target(endpoint=ready["control"], server_key=load_public_key(keys / "relay.key"))
        async with connect([target], keys=client_keys(keys)) as client:
            asking = asyncio.ensure_future(client.request("relay", {**ASK, "card": "for-b"}, timeout_s=60))
            await asyncio.sleep(0.5)  # the ask is waiting before the card exists
            assert not asking.done()
            await bus.publish_card("kv/x", data, card_id="for-b", meta={"rep": "card", "for": ["b"]})
            reply = await asking
            await bus.publish_card("kv/x", data, card_id="anyone", meta={"rep": "card"})
            await relay.event("card_relayed", where=lambda e: e["source"] == "anyone")
    assert reply["answer"] == answer_from_card(tiny_lm, data, QUESTION, max_new_tokens=8).text
    assert relay.count("card_pulled_on_demand") == 1
    assert relay.count("card_relayed") == 1
