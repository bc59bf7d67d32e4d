"""Three hosts in network namespaces: reader -(100 Mbit/s)- relay -(10 Mbit/s)- answerer.

The relay host also routes, so the answerer pulls the reader's cards across both shaped links and the
relay's cards across the slow one. Answers must equal the same steps run in this process; a link outage and
a SIGKILLed answerer in the middle of a transfer must both end with the card delivered, once.
Addresses are from 198.18.0.0/15 only; the lab (namespaces, links) is torn down even when a test fails.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nodes.demo_processes import REPO_ROOT, NodeProcess, node_group, write_fleet_keys
from nodes.netns import Host, Link, NetnsLab
from tests.conftest import _tiny_tokenizer, tiny_llama_config
from tests.nodes.fleet import FLEET, QUESTION, node_config

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ENV = {"OMP_NUM_THREADS": "1"}
READER_IP, RELAY_IP_A, RELAY_IP_C, ANSWERER_IP = "198.18.1.1", "198.18.1.2", "198.18.2.1", "198.18.2.2"
PORT = 5550
RELAY_QUESTION = "What is this about?"
# Byte-level tokenizer: one token per byte, so about 1500 tokens; at 32 bits the card is about 9 MB, which
# takes about 7 s across the 10 Mbit/s link: long enough to break things in the middle of it.
LONG_DOCUMENT = " ".join(
    f"Record {i}: the station at grid {i * 7 % 97} reported wind {i % 13} knots and {i % 5} mm rain."
    for i in range(20)
)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Llama whose KV is big enough per token to make multi-second transfers."""
    import torch
    from transformers import LlamaForCausalLM

    directory = tmp_path_factory.mktemp("wide-llama")
    torch.manual_seed(1)
    config = tiny_llama_config(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=32, num_hidden_layers=6,
        intermediate_size=256, max_position_embeddings=4096,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    _tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def wide_lm(wide_model_dir: Path) -> Any:
    from qkv._modelstore import load_model

    return load_model(wide_model_dir, device="cpu")


@dataclass
class Chain:
    lab: NetnsLab
    reader: Host
    relay: Host
    answerer: Host
    fast: Link
    slow: Link


@pytest.fixture
def chain() -> Iterator[Chain]:
    with NetnsLab() as lab:
        reader, relay, answerer = lab.host("reader"), lab.host("relay"), lab.host("answer")
        fast = lab.link(reader, READER_IP, relay, RELAY_IP_A, rate_mbit=100)
        slow = lab.link(relay, RELAY_IP_C, answerer, ANSWERER_IP, rate_mbit=10)
        lab.forward(relay)
        lab.route(reader, "198.18.2.0/24", RELAY_IP_A)
        lab.route(answerer, "198.18.1.0/24", RELAY_IP_C)
        yield Chain(lab, reader, relay, answerer, fast, slow)


def _ep(ip: str) -> str:
    return f"tcp://{ip}:{PORT}"


async def _drive(
    lab: NetnsLab, host: Host, keys: Path, targets: dict[str, str], requests: list[Any]
) -> list[Any]:
    spec = {
        "keys": str(keys),
        "targets": {name: [ep, str(keys / f"{name}.key")] for name, ep in targets.items()},
        "requests": requests,
    }
    path = keys.parent / f"drive-{len(list(keys.parent.glob('drive-*')))}.json"
    path.write_text(json.dumps(spec))
    proc = await asyncio.create_subprocess_exec(
        *lab.prefix(host), sys.executable, "-m", "tests.netns.drive", str(path),
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    replies = [json.loads(line) for line in out.decode().splitlines()]
    for reply in replies:
        assert "ok" in reply, reply
    return [r["ok"] for r in replies]


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    write_fleet_keys(tmp_path / "keys", FLEET)
    return tmp_path


def _part_bytes(spool: Path) -> int:
    return sum(p.stat().st_size for p in spool.glob("*.part")) if spool.is_dir() else 0


async def _wait_partial(spool: Path, at_least: int, timeout_s: float = 60) -> None:
    """Until the answerer's spool holds ``at_least`` bytes of a card in progress.

    The spool files are another process's: there is no event to wait on, so this polls them.
    """
    async with asyncio.timeout(timeout_s):
        while True:
            if _part_bytes(spool) >= at_least:
                return
            await asyncio.sleep(0.05)


async def _reader_sees(
    lab: NetnsLab, host: Host, keys: Path, targets: dict[str, str], names: set[str], timeout_s: float = 30.0
) -> None:
    """Poll the reader's status until it lists ``names`` as peers: it addresses a card to the receivers it
    sees when it reads, so a read issued before a receiver's first presence leaves that receiver out."""
    deadline = time.monotonic() + timeout_s
    while True:
        (status,) = await _drive(lab, host, keys, targets, [["reader", {"op": "status"}]])
        seen = {p["node"] for p in status["peers"]}
        if names <= seen:
            return
        assert time.monotonic() < deadline, f"the reader saw only {sorted(seen)} within {timeout_s} s"
        await asyncio.sleep(0.2)


async def test_handoff_and_relay_across_three_hosts(
    chain: Chain, fleet_dir: Path, tiny_model_dir: Path, tiny_lm: Any
) -> None:
    from nodes.roles_relay import relay_card
    from qkv._budget import Budget
    from qkv._pipeline import answer_from_card, encode_context

    keys, lab = fleet_dir / "keys", chain.lab
    document = "Ada Lovelace wrote the first program for the Analytical Engine designed by Charles Babbage."
    any_ip, model = _ep("0.0.0.0"), tiny_model_dir
    relay_section = {
        "topics": "kv/reader",
        "out_topic": "kv/relay",
        "question": RELAY_QUESTION,
        "max_new_tokens": 6,
    }
    cfg = {
        "reader": node_config(
            fleet_dir, "reader", model, keys, roles=["reader"], bind=any_ip, reader={"bits": 4}
        ),
        "relay": node_config(
            fleet_dir, "relay", model, keys, roles=["relay"], bind=any_ip, peers=[(_ep(READER_IP), "reader")],
            relay=relay_section,
        ),
        "answerer": node_config(
            fleet_dir, "answerer", model, keys, roles=["answerer"], bind=any_ip,
            peers=[(_ep(READER_IP), "reader"), (_ep(RELAY_IP_C), "relay")],
            answerer={"max_new_tokens": 8, "persist": False},
        ),
    }  # fmt: skip
    hosts = {"reader": chain.reader, "relay": chain.relay, "answerer": chain.answerer}
    async with node_group() as nodes:
        procs = await asyncio.gather(
            *(NodeProcess.start(n, cfg[n], prefix=lab.prefix(hosts[n]), env=ENV) for n in cfg)
        )
        nodes.extend(procs)
        await asyncio.gather(*(p.ready() for p in procs))
        relay = procs[1]
        targets = {"reader": _ep(READER_IP), "answerer": _ep("127.0.0.1")}
        await _reader_sees(lab, chain.answerer, keys, targets, {"relay", "answerer"})
        (sent,) = await _drive(
            lab, chain.answerer, keys, targets, [["reader", {"op": "read", "text": document}]]
        )
        relayed = await relay.event("card_relayed", where=lambda e: e["source"] == sent["card"])
        direct, via = await _drive(lab, chain.answerer, keys, targets, [
            ["answerer", {"op": "ask", "card": sent["card"], "question": QUESTION, "wait_s": 60}],
            ["answerer", {"op": "ask", "card": relayed["card"], "question": QUESTION, "wait_s": 60}],
        ])  # fmt: skip
    card = encode_context(tiny_lm, document, Budget(bits=4), sender="reader")
    assert direct["answer"] == answer_from_card(tiny_lm, card.data, QUESTION, max_new_tokens=8).text
    out = relay_card(tiny_lm, card.data, sender="relay", question=RELAY_QUESTION, max_new_tokens=6)
    assert relayed["answer"] == out.answer
    assert via["answer"] == answer_from_card(tiny_lm, out.data, QUESTION, max_new_tokens=8).text
    assert via["card_tokens"] == direct["card_tokens"] + out.appended_tokens


async def _start_pair(chain: Chain, fleet_dir: Path, model: Path) -> tuple[NodeProcess, Path, dict[str, Any]]:
    keys = fleet_dir / "keys"
    reader_cfg = node_config(
        fleet_dir, "reader", model, keys, roles=["reader"], bind=_ep("0.0.0.0"),
        bus={"chunk_kib": 256}, reader={"bits": 32},
    )  # fmt: skip
    answerer_cfg = node_config(
        fleet_dir, "answerer", model, keys, roles=["answerer"], bind=_ep("0.0.0.0"),
        peers=[(_ep(READER_IP), "reader")], bus={"chunk_kib": 256, "stall_timeout_s": 120.0},
        answerer={"max_new_tokens": 8, "persist": False},
    )  # fmt: skip
    reader = await NodeProcess.start("reader", reader_cfg, prefix=chain.lab.prefix(chain.reader), env=ENV)
    return reader, answerer_cfg, await reader.ready()


async def test_link_outage_mid_transfer_completes(
    chain: Chain, fleet_dir: Path, wide_model_dir: Path, wide_lm: Any
) -> None:
    from qkv._budget import Budget
    from qkv._pipeline import answer_from_card, encode_context

    keys, lab = fleet_dir / "keys", chain.lab
    async with node_group() as nodes:
        reader, answerer_cfg, _ = await _start_pair(chain, fleet_dir, wide_model_dir)
        nodes.append(reader)
        answerer = await NodeProcess.start(
            "answerer", answerer_cfg, prefix=lab.prefix(chain.answerer), env=ENV
        )
        nodes.append(answerer)
        await answerer.ready()
        targets = {"reader": _ep(READER_IP), "answerer": _ep("127.0.0.1")}
        (sent,) = await _drive(
            lab, chain.answerer, keys, targets, [["reader", {"op": "read", "text": LONG_DOCUMENT}]]
        )
        assert sent["card_bytes"] > 5_000_000
        await _wait_partial(fleet_dir / "answerer" / "spool", 1 << 20)
        lab.set_link(chain.slow, up=False)
        await asyncio.sleep(4)  # the outage itself: nothing to wait for but time
        assert answerer.count("card_received") == 0
        lab.set_link(chain.slow, up=True)
        received = await answerer.event(
            "card_received", where=lambda e: e["card"] == sent["card"], timeout_s=180
        )
        (reply,) = await _drive(lab, chain.answerer, keys, targets, [
            ["answerer", {"op": "ask", "card": sent["card"], "question": QUESTION}],
        ])  # fmt: skip
    assert received["bytes"] == sent["card_bytes"]
    assert answerer.count("card_received") == 1
    card = encode_context(wide_lm, LONG_DOCUMENT, Budget(bits=32), sender="reader")
    assert reply["answer"] == answer_from_card(wide_lm, card.data, QUESTION, max_new_tokens=8).text


async def test_answerer_killed_mid_transfer_gets_the_card_once(
    chain: Chain, fleet_dir: Path, wide_model_dir: Path
) -> None:
    keys, lab = fleet_dir / "keys", chain.lab
    spool = fleet_dir / "answerer" / "spool"
    async with node_group() as nodes:
        reader, answerer_cfg, _ = await _start_pair(chain, fleet_dir, wide_model_dir)
        nodes.append(reader)
        first = await NodeProcess.start("answerer", answerer_cfg, prefix=lab.prefix(chain.answerer), env=ENV)
        nodes.append(first)
        await first.ready()
        targets = {"reader": _ep(READER_IP), "answerer": _ep("127.0.0.1")}
        (sent,) = await _drive(
            lab, chain.answerer, keys, targets, [["reader", {"op": "read", "text": LONG_DOCUMENT}]]
        )
        await _wait_partial(spool, 2 << 20)
        first.kill()
        assert await first.stop() != 0
        assert first.count("card_received") == 0
        partial_before = _part_bytes(spool)
        assert 0 < partial_before < sent["card_bytes"]

        second = await NodeProcess.start(
            "answerer-2", answerer_cfg, prefix=lab.prefix(chain.answerer), env=ENV, log_dir=fleet_dir
        )
        nodes.append(second)
        await second.ready()
        received = await second.event(
            "card_received", where=lambda e: e["card"] == sent["card"], timeout_s=180
        )
        (reply,) = await _drive(lab, chain.answerer, keys, targets, [
            ["answerer", {"op": "ask", "card": sent["card"], "question": QUESTION}],
        ])  # fmt: skip
        # Resumed, not restarted: the second pull moved less than the whole card.
        assert received["bytes"] == sent["card_bytes"]
        assert reply["card_bytes"] == sent["card_bytes"]
        # A third start of the answerer must not receive it again.
        assert await second.stop() == 0
        third = await NodeProcess.start(
            "answerer-3", answerer_cfg, prefix=lab.prefix(chain.answerer), env=ENV, log_dir=fleet_dir
        )
        nodes.append(third)
        await third.ready()
        await third.event("card_already_delivered", where=lambda e: e["card"] == sent["card"])
    assert second.count("card_received") == 1
    assert third.count("card_received") == 0
    assert (spool / "delivered.log").read_text().split().count(sent["card"]) == 1
