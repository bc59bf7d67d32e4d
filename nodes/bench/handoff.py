"""``edgebus bench handoff``: receiver TTFT from a CacheCard vs re-prefilling the text, over real links.

Setup per condition: a reader node and an answerer node (separate processes, CURVE keys). ``loopback`` runs
both on 127.0.0.1; ``<N>mbit`` puts each in its own network namespace joined by a veth shaped to N Mbit/s
both ways (``tc tbf``; addresses from 198.18.0.0/15), and the driver runs in the answerer's namespace.

Contexts of 1K, 2K and 4K tokens (model tokens of the context itself, template excluded) are built by
concatenating real HotpotQA and NarrativeQA contexts from ``../shared/data``; the question is the first
row's. Per context the driver asks the reader to read it (prefill + encode + publish), then asks the answerer
about the card, then asks the answerer to re-prefill the text.

Honest accounting: ``card_ttft_s`` = pull time of the card at the answerer (from the start of its fetch to
delivery, over the real link) + the answerer's TTFT from the card (verify + decode + inject + question
prefill + first token). ``text_ttft_s`` is the answerer's prefill of context and question + first token; the
text's own transfer (tens of kB) is left out, which favours the baseline.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tqdm import tqdm

from nodes.bench.datasets import QARow, load_rows
from nodes.bench.table import format_table, write_json

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
SHARED_DATA: Final = REPO_ROOT.parent / "shared" / "data"
SOURCES: Final = ("hotpotqa_distractor_dev_supporting.jsonl", "narrativeqa_summaries_valid.jsonl")
READER_IP: Final = "198.18.3.1"
ANSWERER_IP: Final = "198.18.3.2"
PORT: Final = 5550
REQUEST_TIMEOUT_S: Final = 600.0


@dataclass(frozen=True, kw_only=True)
class HandoffBenchConfig:
    model: str = "smollm2-135m-instruct"
    bits: int = 4
    tokens: tuple[int, ...] = (1024, 2048, 4096)
    conditions: tuple[str, ...] = ("loopback", "100mbit", "20mbit")
    max_new_tokens: int = 16
    data: Path = SHARED_DATA


@dataclass(frozen=True, kw_only=True)
class BenchContext:
    tokens: int
    text: str
    question: str
    answers: tuple[str, ...]


def build_contexts(tokenizer: Any, sizes: Sequence[int], data: Path) -> list[BenchContext]:
    """One context of exactly ``n`` tokens per size: real contexts concatenated, alternating the sources."""
    pools = [load_rows(data / name, limit=400) for name in SOURCES]
    rows: list[QARow] = [r for pair in zip(*pools, strict=False) for r in pair]
    out: list[BenchContext] = []
    for n in sizes:
        ids: list[int] = []
        for row in rows:
            ids.extend(tokenizer.encode(row.context + "\n\n", add_special_tokens=False))
            if len(ids) >= n:
                break
        if len(ids) < n:
            raise ValueError(f"the shared data holds fewer than {n} tokens of context")
        first = rows[0]
        out.append(
            BenchContext(
                tokens=n, text=tokenizer.decode(ids[:n]), question=first.question, answers=first.answers
            )
        )
    return out


def _condition_rate(name: str) -> float | None:
    if name == "loopback":
        return None
    if name.endswith("mbit") and name[:-4].replace(".", "", 1).isdigit():
        return float(name[:-4])
    raise ValueError(f"condition {name!r}: use loopback or <N>mbit")


# ------------------------------------------------------------------------------------------------ driver


def _requests(contexts: Sequence[BenchContext], max_new_tokens: int) -> list[Any]:
    warm = contexts[0]
    requests: list[Any] = [
        [
            "answerer",
            {"op": "ask_text", "context": warm.text[:2000], "question": warm.question, "max_new_tokens": 2},
        ]
    ]
    for ctx in contexts:
        requests.append(["reader", {"op": "read", "text": ctx.text}])
        requests.append(["answerer", {"op": "ask", "card": "$last", "question": ctx.question, "wait_s": 300,
                                      "max_new_tokens": max_new_tokens}])  # fmt: skip
        requests.append(["answerer", {"op": "ask_text", "context": ctx.text, "question": ctx.question,
                                      "max_new_tokens": max_new_tokens}])  # fmt: skip
    return requests


async def _drive_chained(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the spec's requests in order over one client bus (inside the answerer's namespace for shaped
    links); ``"$last"`` as a card id means the card of the latest ``read`` reply."""
    from edgebus import BusKeys, load_public_key
    from nodes.roles_client import Target, connect

    keys = Path(spec["keys"])
    client_keys = BusKeys.from_files(keys / "client.key_secret", keys / "allowed", keys / "hmac.key")
    targets = [
        Target(endpoint=endpoint, server_key=load_public_key(keys / f"{name}.key"))
        for name, endpoint in spec["targets"].items()
    ]
    replies: list[dict[str, Any]] = []
    last_card = ""
    async with connect(targets, keys=client_keys, timeout_s=60) as client:
        for node, payload in tqdm(spec["requests"], desc="requests", file=sys.stderr):
            body = dict(payload)
            if body.get("card") == "$last":
                body["card"] = last_card
            reply = await client.request(node, body, timeout_s=REQUEST_TIMEOUT_S)
            if body.get("op") == "read":
                last_card = str(reply["card"])
            replies.append(reply)
    return replies


# ------------------------------------------------------------------------------------------------ runs


async def _run_condition(
    name: str, contexts: Sequence[BenchContext], config: HandoffBenchConfig, root: Path
) -> list[dict[str, Any]]:
    from nodes.demo_processes import (
        NodeProcess,
        free_port_base,
        keys_section,
        node_group,
        write_fleet_keys,
        write_node_config,
    )
    from nodes.netns import NetnsLab

    rate = _condition_rate(name)
    work = root / name
    work.mkdir()
    keys = write_fleet_keys(work / "keys", ("reader", "answerer", "client"))
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    with NetnsLab() if rate is not None else _NoLab() as lab:
        if rate is not None:
            reader_host, answerer_host = lab.host("rd"), lab.host("an")
            lab.link(reader_host, READER_IP, answerer_host, ANSWERER_IP, rate_mbit=rate)
            reader_ep, answerer_ep = f"tcp://{READER_IP}:{PORT}", f"tcp://{ANSWERER_IP}:{PORT}"
            reader_prefix, answerer_prefix = lab.prefix(reader_host), lab.prefix(answerer_host)
        else:
            reader_ep = f"tcp://127.0.0.1:{free_port_base()}"
            answerer_ep = f"tcp://127.0.0.1:{free_port_base()}"
            reader_prefix = answerer_prefix = []
        common = {"model": config.model, "device": "cpu"}
        reader_cfg = write_node_config(
            work / "reader.toml",
            {
                "node": {"name": "reader", "roles": ["reader"], "state_dir": work / "reader", **common},
                "bus": {"bind": reader_ep},
                "keys": keys_section(keys, "reader"),
                "reader": {"topic": "kv/bench", "bits": config.bits},
            },
        )
        answerer_cfg = write_node_config(
            work / "answerer.toml",
            {
                "node": {"name": "answerer", "roles": ["answerer"], "state_dir": work / "answerer", **common},
                "bus": {"bind": answerer_ep},
                "keys": keys_section(keys, "answerer"),
                "answerer": {"persist": False, "store_mib": 2048},
            },
            peers=[{"endpoint": reader_ep, "public_key": keys / "reader.key"}],
        )
        async with node_group() as nodes:
            reader = await NodeProcess.start("reader", reader_cfg, prefix=reader_prefix, env=threads)
            nodes.append(reader)
            answerer = await NodeProcess.start("answerer", answerer_cfg, prefix=answerer_prefix, env=threads)
            nodes.append(answerer)
            await asyncio.gather(reader.ready(), answerer.ready())
            spec = {
                "keys": str(keys),
                "targets": {"reader": reader_ep, "answerer": answerer_ep},
                "requests": _requests(contexts, config.max_new_tokens),
            }
            spec_path = work / "drive.json"
            await asyncio.to_thread(spec_path.write_text, json.dumps(spec))
            proc = await asyncio.create_subprocess_exec(
                *answerer_prefix, sys.executable, "-m", "nodes.bench.handoff", "drive", str(spec_path),
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **threads},
            )  # fmt: skip
            out, _ = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"bench driver failed in condition {name} (rc={proc.returncode})")
            replies: list[dict[str, Any]] = json.loads(out)
    rows: list[dict[str, Any]] = []
    for index, ctx in enumerate(contexts):
        sent, card, text = replies[1 + 3 * index : 4 + 3 * index]
        card_ttft = float(card["transfer_s"]) + float(card["ttft_s"])
        rows.append(
            {
                "condition": name,
                "tokens": ctx.tokens,
                "bits": config.bits,
                "card_bytes": sent["card_bytes"],
                "fp16_bytes": sent["fp16_bytes"],
                "text_bytes": len(ctx.text.encode()),
                "transfer_s": float(card["transfer_s"]),
                "card_answer_ttft_s": float(card["ttft_s"]),
                "card_ttft_s": card_ttft,
                "text_ttft_s": float(text["ttft_s"]),
                "ratio": card_ttft / float(text["ttft_s"]),
                "link_mbit": (sent["card_bytes"] * 8 / 1e6) / float(card["transfer_s"]),
                "same_answer": card["answer"] == text["answer"],
                "card_answer": card["answer"],
                "text_answer": text["answer"],
            }
        )
    return rows


class _NoLab:
    def __enter__(self) -> Any:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def run_handoff_bench(
    json_out: Path | None, plot: Path | None, *, config: HandoffBenchConfig | None = None
) -> list[dict[str, Any]]:
    """Run every condition, print the table, write JSON and a PNG; returns the rows."""
    from transformers import AutoTokenizer

    from nodes.bench.plots import ttft_plot
    from qkv import model_dir

    config = config or HandoffBenchConfig()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir(config.model)))
    contexts = build_contexts(tokenizer, config.tokens, config.data)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgebus-handoff-") as tmp:
        for name in tqdm(config.conditions, desc="conditions"):
            rows.extend(asyncio.run(_run_condition(name, contexts, config, Path(tmp))))
            print(format_table([r for r in rows if r["condition"] == name], _COLUMNS), flush=True)
    print("\nreceiver TTFT, card (transfer included) vs re-prefill")
    print(format_table(rows, _COLUMNS))
    write_json(rows, json_out)
    if plot is not None:
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            series.setdefault(f"card, {r['condition']}", []).append((r["tokens"], r["card_ttft_s"]))
            series.setdefault(f"re-prefill, {r['condition']}", []).append((r["tokens"], r["text_ttft_s"]))
        ttft_plot(series, title=f"receiver TTFT: {config.bits}-bit card vs re-prefill", out=plot)
        print(f"plot: {plot}")
    return rows


_COLUMNS = (
    "condition", "tokens", "card_bytes", "fp16_bytes", "transfer_s", "link_mbit", "card_answer_ttft_s",
    "card_ttft_s", "text_ttft_s", "ratio", "same_answer",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "drive":
        replies = asyncio.run(_drive_chained(json.loads(Path(args[1]).read_text())))
        print(json.dumps(replies))
        return 0
    print("usage: python -m nodes.bench.handoff drive SPEC.json  (the bench itself: edgebus bench handoff)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
