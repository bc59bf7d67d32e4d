"""Reader, relay and answerer as real processes over loopback (CURVE), with the tiny model.

The answers from cards handed over the bus must equal the same steps run in this process; SIGTERM drains
and persists; a restarted answerer serves the persisted card and does not receive it a second time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edgebus import load_public_key
from nodes._errors import AskError
from nodes.demo_processes import NodeProcess, node_group, write_fleet_keys
from nodes.roles_client import Target, connect
from nodes.roles_relay import relay_card
from qkv._budget import Budget
from qkv._pipeline import answer_from_card, encode_context
from tests.nodes.fleet import DOCUMENT, FLEET, QUESTION, client_keys, free_port_base, node_config, reader_sees

ENV = {"OMP_NUM_THREADS": "1"}
RELAY_QUESTION = "What did Babbage design?"


def _target(ready: dict[str, Any], keys: Path, name: str) -> Target:
    return Target(endpoint=ready["control"], server_key=load_public_key(keys / f"{name}.key"))


def _endpoints() -> dict[str, str]:
    return {name: f"tcp://127.0.0.1:{free_port_base()}" for name in ("reader", "relay", "answerer")}


@pytest.mark.timeout(120)
async def test_handoff_answers_like_one_process_and_drains(
    tiny_lm: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    keys = write_fleet_keys(tmp_path / "keys", FLEET)
    ep = _endpoints()
    reader_cfg = node_config(
        tmp_path, "reader", tiny_model_dir, keys, roles=["reader"], bind=ep["reader"],
        reader={"topic": "kv/reader", "bits": 4},
    )  # fmt: skip
    answerer_cfg = node_config(
        tmp_path, "answerer", tiny_model_dir, keys, roles=["answerer"], bind=ep["answerer"],
        peers=[(ep["reader"], "reader")], answerer={"topics": "kv/", "persist": True, "max_new_tokens": 8},
    )  # fmt: skip
    async with node_group() as nodes:
        reader, answerer = await asyncio.gather(
            NodeProcess.start("reader", reader_cfg, env=ENV),
            NodeProcess.start("answerer", answerer_cfg, env=ENV),
        )
        nodes.extend([reader, answerer])
        r_ready, a_ready = await asyncio.gather(reader.ready(), answerer.ready())
        targets = [_target(r_ready, keys, "reader"), _target(a_ready, keys, "answerer")]
        async with connect(targets, keys=client_keys(keys)) as client:
            assert client.nodes == ["answerer", "reader"]
            sent = await client.request("reader", {"op": "read", "text": DOCUMENT}, timeout_s=60)
            reply = await client.request(
                "answerer",
                {"op": "ask", "card": sent["card"], "question": QUESTION, "wait_s": 120},
                timeout_s=180,
            )
            status = await client.request("answerer", {"op": "status"}, timeout_s=10)
            with pytest.raises(AskError, match="no card"):
                await client.request(
                    "answerer", {"op": "ask", "card": "f" * 32, "question": "q"}, timeout_s=10
                )
            with pytest.raises(AskError, match="not a reader"):
                await client.request("answerer", {"op": "read", "text": "x"}, timeout_s=10)
            with pytest.raises(AskError, match="question"):
                await client.request(
                    "answerer", {"op": "ask", "card": sent["card"], "question": 7}, timeout_s=10
                )

        card = encode_context(tiny_lm, DOCUMENT, Budget(bits=4), sender="reader")
        assert reply["answer"] == answer_from_card(tiny_lm, card.data, QUESTION, max_new_tokens=8).text
        assert reply["bits"] == 4
        assert reply["card_bytes"] == sent["card_bytes"] == card.card_bytes
        assert reply["context_tokens"] == sent["context_tokens"] == card.context_tokens
        assert reply["transfer_s"] > 0
        assert reader.count("card_published") == 1
        assert answerer.count("card_received") == 1
        assert [p["node"] for p in status["peers"]] == ["reader"]
        assert status["peers"][0]["info"]["budget"]["bits"] == 4

        assert await answerer.stop() == 0
        assert answerer.count("stopping") == answerer.count("stopped") == 1
        assert (tmp_path / "answerer" / "cards" / "CURRENT").is_file()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_relay_chain_and_restart(tiny_lm: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    keys = write_fleet_keys(tmp_path / "keys", FLEET)
    ep = _endpoints()
    reader_cfg = node_config(
        tmp_path, "reader", tiny_model_dir, keys, roles=["reader"], bind=ep["reader"],
        reader={"topic": "kv/reader", "bits": 4},
    )  # fmt: skip
    relay_cfg = node_config(
        tmp_path, "relay", tiny_model_dir, keys, roles=["relay"], bind=ep["relay"],
        peers=[(ep["reader"], "reader")],
        relay={"topics": "kv/reader", "out_topic": "kv/relay", "question": RELAY_QUESTION,
               "max_new_tokens": 6},
    )  # fmt: skip
    answerer_cfg = node_config(
        tmp_path, "answerer", tiny_model_dir, keys, roles=["answerer"], bind=ep["answerer"],
        peers=[(ep["reader"], "reader"), (ep["relay"], "relay")],
        answerer={"topics": "kv/", "persist": True, "max_new_tokens": 8},
    )  # fmt: skip
    async with node_group() as nodes:
        # All three start at once (fixed ports): peers reconnect until the others are up.
        reader, relay, answerer = await asyncio.gather(
            NodeProcess.start("reader", reader_cfg, env=ENV),
            NodeProcess.start("relay", relay_cfg, env=ENV),
            NodeProcess.start("answerer", answerer_cfg, env=ENV),
        )
        nodes.extend([reader, relay, answerer])
        r_ready, _, a_ready = await asyncio.gather(reader.ready(), relay.ready(), answerer.ready())
        targets = [_target(r_ready, keys, "reader"), _target(a_ready, keys, "answerer")]
        async with connect(targets, keys=client_keys(keys)) as client:
            assert client.nodes == ["answerer", "reader"]
            # Receivers advertise the card speeds they measured at start (the reader's policy reads them).
            speeds = ("decode_bps", "rotate_bps", "question_s", "join_bps")
            await reader_sees(
                client,
                lambda peers: (
                    {"relay", "answerer"} <= peers.keys()
                    and all(peers["answerer"].get(k, 0) > 0 for k in speeds)
                ),
            )
            sent = await client.request("reader", {"op": "read", "text": DOCUMENT}, timeout_s=60)
            direct = await client.request(
                "answerer",
                {"op": "ask", "card": sent["card"], "question": QUESTION, "wait_s": 120},
                timeout_s=180,
            )
            relayed_event = await relay.event("card_relayed", where=lambda e: e["source"] == sent["card"])
            via_relay = await client.request(
                "answerer",
                {"op": "ask", "card": relayed_event["card"], "question": QUESTION, "wait_s": 120},
                timeout_s=180,
            )
            status = await client.request("answerer", {"op": "status"}, timeout_s=10)
            with pytest.raises(AskError, match="no card"):
                await client.request(
                    "answerer", {"op": "ask", "card": "f" * 32, "question": "q"}, timeout_s=10
                )
            with pytest.raises(AskError, match="not a reader"):
                await client.request("answerer", {"op": "read", "text": "x"}, timeout_s=10)

        # The same steps in this process give the same answers.
        card = encode_context(tiny_lm, DOCUMENT, Budget(bits=4), sender="reader")
        assert card.card_id == sent["card"] or card.card_bytes == sent["card_bytes"]
        assert direct["answer"] == answer_from_card(tiny_lm, card.data, QUESTION, max_new_tokens=8).text
        out = relay_card(tiny_lm, card.data, sender="relay", question=RELAY_QUESTION, max_new_tokens=6)
        assert relayed_event["answer"] == out.answer
        assert via_relay["answer"] == answer_from_card(tiny_lm, out.data, QUESTION, max_new_tokens=8).text
        assert via_relay["card_tokens"] == direct["card_tokens"] + out.appended_tokens

        assert direct["bits"] == 4
        assert direct["card_bytes"] == sent["card_bytes"]
        assert direct["context_tokens"] == sent["context_tokens"]
        assert direct["transfer_s"] > 0
        assert {p["node"] for p in status["peers"]} == {"reader", "relay"}
        assert status["store"]["entries"] == 2

        # SIGTERM: drain, persist, exit 0.
        assert await answerer.stop() == 0
        assert answerer.count("stopped") == 1
        assert (tmp_path / "answerer" / "cards" / "CURRENT").is_file()

        # Restart: the persisted card answers; the bus does not deliver it a second time.
        again = await NodeProcess.start("answerer-2", answerer_cfg, env=ENV, log_dir=tmp_path)
        nodes.append(again)
        b_ready = await again.ready()
        await again.event("card_already_delivered", where=lambda e: e["card"] == sent["card"])
        async with connect([_target(b_ready, keys, "answerer")], keys=client_keys(keys)) as client:
            later = await client.request(
                "answerer", {"op": "ask", "card": sent["card"], "question": QUESTION}, timeout_s=60
            )
        assert later["answer"] == direct["answer"]
        assert again.count("card_received", lambda e: e["card"] == sent["card"]) == 0
        delivered = (tmp_path / "answerer" / "spool" / "delivered.log").read_text().split()
        assert delivered.count(sent["card"]) == 1


@pytest.mark.timeout(150)
async def test_a_receiver_that_joins_after_the_read_pulls_the_card_when_asked(
    tiny_lm: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # The reader addresses a card to the receivers it sees when it reads; one that connects afterwards is
    # not in the address, and must still answer when asked about that card (it pulls it then).
    keys = write_fleet_keys(tmp_path / "keys", ("reader", "answerer", "late", "client"))
    ep = {name: f"tcp://127.0.0.1:{free_port_base()}" for name in ("reader", "answerer", "late")}
    reader_cfg = node_config(
        tmp_path, "reader", tiny_model_dir, keys, roles=["reader"], bind=ep["reader"],
        reader={"topic": "kv/reader", "bits": 4},
    )  # fmt: skip
    answerer = {"topics": "kv/", "persist": False, "max_new_tokens": 8}
    early_cfg, late_cfg = (
        node_config(
            tmp_path,
            name,
            tiny_model_dir,
            keys,
            roles=["answerer"],
            bind=ep[name],
            peers=[(ep["reader"], "reader")],
            answerer=answerer,
        )
        for name in ("answerer", "late")
    )
    async with node_group() as nodes:
        reader, early = await asyncio.gather(
            NodeProcess.start("reader", reader_cfg, env=ENV),
            NodeProcess.start("answerer", early_cfg, env=ENV),
        )
        nodes.extend([reader, early])
        r_ready, _ = await asyncio.gather(reader.ready(), early.ready())
        async with connect([_target(r_ready, keys, "reader")], keys=client_keys(keys)) as client:
            await reader_sees(client, lambda peers: "answerer" in peers)
            sent = await client.request("reader", {"op": "read", "text": DOCUMENT}, timeout_s=60)
        assert set(sent["decisions"]) == {"answerer"}
        await early.event("card_received", where=lambda e: e["card"] == sent["card"])

        late = await NodeProcess.start("late", late_cfg, env=ENV)
        nodes.append(late)
        l_ready = await late.ready()
        async with connect([_target(l_ready, keys, "late")], keys=client_keys(keys)) as client:
            reply = await client.request(
                "late",
                {"op": "ask", "card": sent["card"], "question": QUESTION, "wait_s": 60},
                timeout_s=90,
            )
        pulled = await late.event("card_pulled_on_demand")
    card = encode_context(tiny_lm, DOCUMENT, Budget(bits=4), sender="reader")
    assert reply["answer"] == answer_from_card(tiny_lm, card.data, QUESTION, max_new_tokens=8).text
    assert pulled == {**pulled, "card": sent["card"], "addressed": ["answerer"]}
    assert late.count("card_received") == 1
