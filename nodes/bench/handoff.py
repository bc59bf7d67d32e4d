"""``edgebus bench handoff``: receiver TTFT from a CacheCard vs re-prefilling the text, over real links.

Setup per condition: a reader node and an answerer node (separate processes, CURVE keys). ``loopback`` runs
both on 127.0.0.1; ``<N>mbit`` puts each in its own network namespace joined by a veth shaped to N Mbit/s
both ways (``tc tbf``; addresses from 198.18.0.0/15), and the driver runs in the answerer's namespace.

Contexts of 1K, 2K and 4K tokens (model tokens of the context itself, template excluded) are built by
concatenating real HotpotQA and NarrativeQA contexts from ``../shared/data``; the question is the first
row's. Per context the driver asks the reader to read it into a card at ``bits`` (prefill + encode +
publish; the read request names the card, overriding the reader's budget policy), asks the answerer about
it; with ``split`` it does the same with a split hand-off (head ids first, then a tail card at ``bits``,
head length balanced by the reader's policy from the answerer's advertised prefill speed and measured link);
then it asks the answerer to re-prefill the text.

Honest accounting: ``card_ttft_s`` = pull time of the card at the answerer (from the start of its fetch to
delivery, over the real link) + the answerer's TTFT from the card (verify + decode + inject + question
prefill + first token). ``split_ttft_s`` = from the reader's send of the head message (its wall clock; one
host) to the moment the answerer has both the prefilled head and the tail card (``sent_to_ready_s``), + the
answerer's TTFT from the joined cache. ``text_ttft_s`` is the answerer's prefill of context and question +
first token; the text's own transfer (tens of kB) is left out, which favours the baseline.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
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
#: Seconds to wait for the answerer to have measured its link to the reader (the probe card).
LINK_WAIT_S: Final = 120.0


@dataclass(frozen=True, kw_only=True)
class HandoffBenchConfig:
    model: str = "smollm2-135m-instruct"
    bits: int = 4
    group_size: int = 32  # values per quantization group (its fp16 scale and zero)
    condition: str | None = None  # a quality-bench condition naming the card budget (overrides the two above)
    tokens: tuple[int, ...] = (1024, 2048, 4096)
    conditions: tuple[str, ...] = ("loopback", "100mbit", "20mbit")
    max_new_tokens: int = 16
    data: Path = SHARED_DATA
    split: bool = True  # also a split hand-off at the policy's balanced head length, per context


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


# ------------------------------------------------------------------------------------------------ harness


@dataclass(frozen=True, kw_only=True)
class LinkPair:
    """A running reader and answerer joined by one link (see :func:`link_pair`)."""

    name: str
    work: Path
    keys: Path
    reader_ep: str
    answerer_ep: str
    answerer_prefix: list[str]
    threads: dict[str, str]


@asynccontextmanager
async def link_pair(
    name: str,
    root: Path,
    *,
    model: str,
    reader: dict[str, Any],
    policy: dict[str, Any] | None = None,
    reader_bus: dict[str, Any] | None = None,
) -> AsyncIterator[LinkPair]:
    """Start a reader and an answerer (CURVE keys) over the condition's link; stop them on exit.

    ``loopback``: both on 127.0.0.1; ``<N>mbit``: each in its own namespace, joined by a veth shaped to N
    Mbit/s both ways. ``reader``, ``policy`` and ``reader_bus`` go into the reader's ``[reader]``,
    ``[reader.policy]`` and ``[bus]``.
    """
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
        common = {"model": model, "device": "cpu"}
        sections: dict[str, dict[str, Any]] = {
            "node": {"name": "reader", "roles": ["reader"], "state_dir": work / "reader", **common},
            "bus": {"bind": reader_ep, **(reader_bus or {})},
            "keys": keys_section(keys, "reader"),
            "reader": {"topic": "kv/bench", **reader},
        }
        if policy:
            sections["reader.policy"] = policy
        reader_cfg = write_node_config(work / "reader.toml", sections)
        answerer_cfg = write_node_config(
            work / "answerer.toml",
            {
                "node": {"name": "answerer", "roles": ["answerer"], "state_dir": work / "answerer", **common},
                "bus": {"bind": answerer_ep},
                "keys": keys_section(keys, "answerer"),
                "answerer": {"persist": False, "store_mib": 2048, "card_wait_s": 600.0},
            },
            peers=[{"endpoint": reader_ep, "public_key": keys / "reader.key"}],
        )
        async with node_group() as nodes:
            reader_node = await NodeProcess.start("reader", reader_cfg, prefix=reader_prefix, env=threads)
            nodes.append(reader_node)
            # One after the other: each node measures its prefill and decode speed at start, and two
            # nodes sharing this machine's cores would measure each other.
            await reader_node.ready()
            answerer = await NodeProcess.start("answerer", answerer_cfg, prefix=answerer_prefix, env=threads)
            nodes.append(answerer)
            await answerer.ready()
            yield LinkPair(
                name=name,
                work=work,
                keys=keys,
                reader_ep=reader_ep,
                answerer_ep=answerer_ep,
                answerer_prefix=answerer_prefix,
                threads=threads,
            )


async def run_driver(pair: LinkPair, module: str, spec: dict[str, Any]) -> Any:
    """Run ``python -m MODULE drive SPEC`` in the answerer's namespace (so the client's traffic to the
    answerer never crosses the shaped link); returns what it printed as JSON. The spec gets the pair's
    ``keys`` and ``targets``."""
    full = {
        "keys": str(pair.keys),
        "targets": {"reader": pair.reader_ep, "answerer": pair.answerer_ep},
        **spec,
    }
    spec_path = pair.work / "drive.json"
    await asyncio.to_thread(spec_path.write_text, json.dumps(full))
    proc = await asyncio.create_subprocess_exec(
        *pair.answerer_prefix, sys.executable, "-m", module, "drive", str(spec_path),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **pair.threads},
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench driver failed in condition {pair.name} (rc={proc.returncode})")
    return json.loads(out)


def driver_main(
    argv: Sequence[str] | None, module: str, drive: Callable[[dict[str, Any]], Coroutine[Any, Any, Any]]
) -> int:
    """The ``python -m MODULE drive SPEC.json`` entry :func:`run_driver` starts: run ``drive`` on the spec
    and print its result as JSON."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "drive":
        print(json.dumps(asyncio.run(drive(json.loads(Path(args[1]).read_text(encoding="utf-8"))))))
        return 0
    bench = module.rsplit(".", 1)[-1]
    print(f"usage: python -m {module} drive SPEC.json  (the bench itself: edgebus bench {bench})")
    return 2


@asynccontextmanager
async def spec_client(spec: dict[str, Any]) -> AsyncIterator[Any]:
    """A client connected to the spec's targets with the fleet's client keys."""
    from edgebus import BusKeys, load_public_key
    from nodes.roles_client import Target, connect

    keys = Path(spec["keys"])
    client_keys = BusKeys.from_files(keys / "client.key_secret", keys / "allowed", keys / "hmac.key")
    targets = [
        Target(endpoint=endpoint, server_key=load_public_key(keys / f"{name}.key"))
        for name, endpoint in spec["targets"].items()
    ]
    async with connect(targets, keys=client_keys, timeout_s=60) as client:
        yield client


# ------------------------------------------------------------------------------------------------ driver


#: Replies to the warm-up requests at the head of :func:`_requests`.
WARM_REPLIES: Final = 3


def _requests(contexts: Sequence[BenchContext], config: HandoffBenchConfig) -> list[Any]:
    warm = contexts[0]
    requests: list[Any] = [
        [
            "answerer",
            {"op": "ask_text", "context": warm.text[:2000], "question": warm.question, "max_new_tokens": 2},
        ]
    ]
    budget = card_budget(config)
    card = {"representation": "card", "budget": budget}
    # Warm-up at the full length, not measured: a fresh answerer's first answer over a long cache maps and
    # zero-fills the memory later answers reuse (nodes.heap), 0.6-1.1 s vs 0.4 s to first token at 4K.
    # Its own text (a card id is its content's digest: the measured read of the same text would be a
    # duplicate the answerer skips), of the same length.
    warm_text = ("(warm-up) " + warm.text)[: len(warm.text)]
    requests.append(["reader", {"op": "read", "text": warm_text, **card}])
    requests.append(["answerer", {"op": "ask", "card": "$last", "question": warm.question, "wait_s": 300,
                                  "max_new_tokens": config.max_new_tokens}])  # fmt: skip
    for ctx in contexts:
        ask = {"op": "ask", "card": "$last", "question": ctx.question, "wait_s": 300,
               "max_new_tokens": config.max_new_tokens}  # fmt: skip
        requests.append(["reader", {"op": "read", "text": ctx.text, **card}])
        requests.append(["answerer", ask])
        if config.split:
            split = {"representation": "split", "budget": budget}
            requests.append(["reader", {"op": "read", "text": ctx.text, **split}])
            requests.append(["answerer", ask])
        requests.append(["answerer", {"op": "ask_text", "context": ctx.text, "question": ctx.question,
                                      "max_new_tokens": config.max_new_tokens}])  # fmt: skip
    return requests


def card_budget(config: HandoffBenchConfig) -> dict[str, Any]:
    """The read requests' budget fields for the card and the split's tail."""
    if config.condition is None:
        return {"bits": config.bits, "group_size": config.group_size}
    from nodes.bench.conditions import parse_condition

    budget = parse_condition(config.condition).budget
    if budget is None or budget.keep < 1 or budget.layers < 1:
        raise ValueError(f"{config.condition!r} is not a whole-card condition (a split needs every token)")
    return budget.to_dict()


async def _drive_chained(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the spec's requests in order over one client bus (inside the answerer's namespace for shaped
    links); ``"$last"`` as a card id means the card of the latest ``read`` reply."""
    replies: list[dict[str, Any]] = []
    last_card = ""
    async with spec_client(spec) as client:
        await wait_for_link(client)
        for node, payload in tqdm(spec["requests"], desc="requests", file=sys.stderr):
            body = dict(payload)
            if body.get("card") == "$last":
                body["card"] = last_card
            reply = await client.request(node, body, timeout_s=REQUEST_TIMEOUT_S)
            if body.get("op") == "read":
                last_card = str(reply["card"])
            replies.append(reply)
    return replies


async def wait_for_link(client: Any, timeout_s: float = LINK_WAIT_S) -> dict[str, Any]:
    """Wait until the reader sees the answerer's measured link to it (the answerer pulled the reader's
    probe card); returns that link estimate. A timeout is an error: decisions would use the assumed link."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        status = await client.request("reader", {"op": "status"}, timeout_s=30)
        for peer in status.get("peers", []):
            link = (peer.get("info") or {}).get("links", {}).get("reader", {})
            if peer.get("node") == "answerer" and link.get("n", 0) > 0:
                return dict(link)
        if loop.time() > deadline:
            raise RuntimeError(f"the answerer measured no link to the reader within {timeout_s} s")
        await asyncio.sleep(0.5)


# ------------------------------------------------------------------------------------------------ runs


async def _run_condition(
    name: str, contexts: Sequence[BenchContext], config: HandoffBenchConfig, root: Path
) -> list[dict[str, Any]]:
    async with link_pair(name, root, model=config.model, reader={"bits": config.bits}) as pair:
        spec = {"requests": _requests(contexts, config)}
        replies: list[dict[str, Any]] = await run_driver(pair, "nodes.bench.handoff", spec)
    rows: list[dict[str, Any]] = []
    per_context = 5 if config.split else 3
    for index, ctx in enumerate(contexts):
        chunk = replies[WARM_REPLIES + per_context * index : WARM_REPLIES + per_context * (index + 1)]
        sent, card, text = chunk[0], chunk[1], chunk[-1]
        card_ttft = float(card["transfer_s"]) + float(card["ttft_s"])
        row = {
            "condition": name,
            "tokens": ctx.tokens,
            "bits": card_budget(config)["bits"],
            "group_size": card_budget(config)["group_size"],
            "condition_name": config.condition,
            "card_bytes": sent["card_bytes"],
            "fp16_bytes": sent["fp16_bytes"],
            "text_bytes": len(ctx.text.encode()),
            "transfer_s": float(card["transfer_s"]),
            "card_answer_ttft_s": float(card["ttft_s"]),
            "card_ttft_s": card_ttft,
            "card_handoff_ttft_s": card.get("handoff_ttft_s"),
            "text_ttft_s": float(text["ttft_s"]),
            "ratio": card_ttft / float(text["ttft_s"]),
            "link_mbit": (sent["card_bytes"] * 8 / 1e6) / float(card["transfer_s"]),
            "same_answer": card["answer"] == text["answer"],
            "card_answer": card["answer"],
            "text_answer": text["answer"],
        }
        if config.split:
            split_sent, split = chunk[2], chunk[3]
            # From the reader's send (head message first) to the first token: the head prefill and the
            # tail's transfer overlap, then decode, join, question.
            split_ttft = float(split["sent_to_ready_s"]) + float(split["ttft_s"])
            row.update(
                split_head_tokens=split_sent["head_tokens"],
                split_card_bytes=split_sent["card_bytes"],
                split_head_prefill_s=split.get("head_prefill_s"),
                split_transfer_s=float(split["transfer_s"]),
                split_ttft_s=split_ttft,
                split_ratio=split_ttft / float(text["ttft_s"]),
                split_same_answer=split["answer"] == text["answer"],
                split_answer=split["answer"],
                # Where the time after both sides went: ready = head prefilled and tail stored.
                split_sent_to_ready_s=float(split["sent_to_ready_s"]),
                split_answer_ttft_s=float(split["ttft_s"]),
                split_decode_s=split.get("decode_s"),
                split_join_s=split.get("head_s"),
            )
            # What the reader predicted when it balanced the head, beside what the run measured.
            decisions: dict[str, dict[str, Any]] = split_sent.get("decisions") or {}
            predicted = next(iter(decisions.values()), {}).get("predicted")
            if isinstance(predicted, dict):
                row.update(
                    split_predicted_head_s=predicted.get("head_side_s"),
                    split_predicted_tail_s=predicted.get("tail_side_s"),
                    split_predicted_ttft_s=predicted.get("ttft_s"),
                    split_predicted_link_mbit=predicted.get("bandwidth_mbit"),
                    split_predicted_link=predicted.get("bandwidth"),
                )
        rows.append(row)
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
            if "split_ttft_s" in r:
                series.setdefault(f"split, {r['condition']}", []).append((r["tokens"], r["split_ttft_s"]))
            series.setdefault(f"re-prefill, {r['condition']}", []).append((r["tokens"], r["text_ttft_s"]))
        card = config.condition or f"{config.bits}-bit"
        ttft_plot(series, title=f"receiver TTFT: {card} card vs re-prefill", out=plot)
        print(f"plot: {plot}")
    return rows


_COLUMNS = (
    "condition", "tokens", "card_bytes", "transfer_s", "link_mbit", "card_answer_ttft_s",
    "card_ttft_s", "text_ttft_s", "ratio", "same_answer", "split_head_tokens", "split_card_bytes",
    "split_head_prefill_s", "split_ttft_s", "split_ratio", "split_same_answer",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return driver_main(argv, "nodes.bench.handoff", _drive_chained)


if __name__ == "__main__":
    sys.exit(main())
