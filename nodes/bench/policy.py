"""``edgebus bench policy``: the budget policy's choice against every fixed alternative, measured per link.

Cells: links of 1, 10, 100 and 1000 Mbit/s (a veth between two network namespaces shaped by ``tc tbf``, the
hand-off bench's harness) x contexts of 1K and 4K tokens (real HotpotQA / NarrativeQA contexts). Per link
one reader and one answerer process; the driver first waits until the answerer has measured its link to the
reader (the reader's probe card), so the policy decides from a measured bandwidth. Per context it asks the
reader to read the context with no override (the reader's :class:`edgebus.BudgetPolicy` decides for the
answerer), then once per fixed alternative: ``text``; a card at 8, 4, 3 and 2 bits; an evicted card (4-bit,
half the tokens kept); a split (4-bit tail, head length balanced by the policy). After each read it asks the
answerer a question about what arrived.

TTFT of a run = ``sent_to_ready_s`` (from the reader's send, on its wall clock, to the moment the answerer
holds everything: the card, and for a split the prefilled head; one host, one clock) + the answerer's
``ttft_s`` (decode, join, question, first token; for text the whole re-prefill). Cap: an alternative whose
predicted transfer (its size from the rate-quality table times the tokens, over the link the answerer
measured) exceeds ``cap_s`` is not run and is reported as ``> cap`` with that prediction; one that runs
waits at most ``cap_s`` for its card. Runs are repeated in ``repeats`` interleaved rounds when their
first TTFT was under ``repeat_below_s`` (a 0.2-0.5 s hand-off varies by 0.05-0.1 s from run to run, as much as
the 10% the target allows; a 9 s re-prefill does not), and each alternative's TTFT is its median run's,
with every run's in ``ttft_runs_s``. Per cell the table gives the policy's TTFT over the best measured
alternative (target <= 1.1x) and over the best alternative at or above the quality floor, and the quality
the policy predicted against the floor.
"""

from __future__ import annotations

import asyncio
import math
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tqdm import tqdm

from edgebus import RateQualityPoint, RateQualityTable
from nodes.bench.handoff import (
    SHARED_DATA,
    BenchContext,
    build_contexts,
    driver_main,
    link_pair,
    run_driver,
    spec_client,
    wait_for_link,
)
from nodes.bench.table import format_table, write_json

#: The fixed alternatives: name -> read-request override.
ALTERNATIVES: Final[dict[str, dict[str, Any]]] = {
    "text": {"representation": "text"},
    "card-8": {"representation": "card", "budget": {"bits": 8}},
    "card-4": {"representation": "card", "budget": {"bits": 4}},
    "card-3": {"representation": "card", "budget": {"bits": 3}},
    "card-2": {"representation": "card", "budget": {"bits": 2}},
    "evicted-4-0.5": {"representation": "card", "budget": {"bits": 4, "keep": 0.5}},
    "split-4": {"representation": "split", "budget": {"bits": 4}},
}
#: Table conditions whose quality an alternative has (``None``: not in the table).
_CONDITION: Final = {
    "card-8": "kv-8",
    "card-4": "kv-4",
    "card-3": "kv-3",
    "card-2": "kv-2",
    "split-4": "kv-4",
}
REQUEST_TIMEOUT_S: Final = 900.0
SMALL_CHUNKS_BELOW_MBIT: Final = 5.0


@dataclass(frozen=True, kw_only=True)
class PolicyBenchConfig:
    model: str = "smollm2-135m-instruct"
    links_mbit: tuple[float, ...] = (1, 10, 100, 1000)
    tokens: tuple[int, ...] = (1024, 4096)
    alternatives: tuple[str, ...] = tuple(ALTERNATIVES)
    cap_s: float = 75.0
    repeats: int = 3
    repeat_below_s: float = 10.0
    quality_floor: float = 0.9
    max_new_tokens: int = 4
    data: Path = SHARED_DATA
    policy: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ driver


def _table_points(path: str) -> dict[str, RateQualityPoint]:
    """Condition -> point, the dominated ones too (a fixed alternative may be one of them)."""
    table = RateQualityTable.load(Path(path))
    return {p.condition: p for p in (*table.dominated, *table.points) if p.condition}


def predicted_wire_bytes(
    alternative: str, tokens: int, text_bytes: int, points: Mapping[str, RateQualityPoint]
) -> float | None:
    """Bytes an alternative will put on the link, from the table (None where it cannot say: a split)."""
    override = ALTERNATIVES[alternative]
    if override["representation"] == "text":
        return float(text_bytes)
    if override["representation"] != "card":
        return None
    budget = override["budget"]
    bits = budget["bits"]
    point = points.get(f"kv-{bits}")
    if point is not None:
        per_token = point.bytes_per_token
    else:
        # A width the table does not hold (older tables drop dominated points): scale a plain card of
        # another width. Groups of 32 with an fp16 scale and zero cost one bit per value on top of it.
        plain = [(int(k[3:]), p) for k, p in points.items() if k[3:].isdigit() and k.startswith("kv-")]
        if not plain:
            return None
        width, ref = min(plain, key=lambda item: abs(item[0] - bits))
        per_token = ref.bytes_per_token * (bits + 1) / (width + 1)
    return per_token * tokens * float(budget.get("keep", 1.0))


async def _drive(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Per context, in rounds: the policy's read, then each alternative's (capped); one answer after each."""
    points = _table_points(spec["table"])
    rows: list[dict[str, Any]] = []
    async with spec_client(spec) as client:
        # Warm-up: a process's first re-prefill and first answer from a card pay one-off costs (in two runs,
        # the first card answer of a fresh answerer was slower than a later one of the same card in 4 of 5
        # cells, once 5x); neither is measured.
        warm = {"question": "What is this?", "max_new_tokens": 2}
        await client.request(
            "answerer", {"op": "ask_text", "context": spec["warm"], **warm}, timeout_s=REQUEST_TIMEOUT_S
        )
        await wait_for_link(client)
        sent = await client.request(
            "reader",
            {"op": "read", "text": spec["warm"][:500], "representation": "card", "budget": {"bits": 4}},
            timeout_s=REQUEST_TIMEOUT_S,
        )
        await client.request(
            "answerer",
            {"op": "ask", "card": sent["card"], "wait_s": 120, **warm},
            timeout_s=REQUEST_TIMEOUT_S,
        )
        for ctx in spec["contexts"]:
            # Rounds interleave the alternatives, so a slow spell of the machine hits them all alike; only
            # runs shorter than repeat_below_s are repeated (their noise is a larger part of them).
            runs: dict[str, list[dict[str, Any]]] = {}
            for round_ in range(int(spec["repeats"])):
                for name in ["policy", *spec["alternatives"]]:
                    if round_ > 0:
                        first = runs[name][0]
                        if first["ttft_s"] is None or first["ttft_s"] >= float(spec["repeat_below_s"]):
                            continue
                    one = await _run_once(client, ctx, name, spec, points)
                    if round_ > 0 and one["ttft_s"] is None:
                        continue  # a failed repeat: the runs that completed stand
                    runs.setdefault(name, []).append(one)
            rows.extend(_median_run(done) for done in runs.values())
    return rows


async def _run_once(
    client: Any,
    ctx: Mapping[str, Any],
    name: str,
    spec: Mapping[str, Any],
    points: Mapping[str, RateQualityPoint],
) -> dict[str, Any]:
    """One read of ``ctx`` (the policy's, or an alternative's) and one answer from what arrived."""
    from nodes._errors import NodeError

    cap = float(spec["cap_s"])
    text_bytes = len(ctx["text"].encode())
    link = await wait_for_link(client)
    bandwidth = float(link["bw"])
    # Tokens the reader prefills are the context plus the prompt template's few: close enough for a
    # prediction.
    wire = None if name == "policy" else predicted_wire_bytes(name, ctx["tokens"], text_bytes, points)
    predicted = None if wire is None else wire / bandwidth
    row: dict[str, Any] = {
        "tokens": ctx["tokens"],
        "alternative": name,
        "link_measured_mbit": bandwidth * 8 / 1e6,
        "predicted_transfer_s": predicted,
    }
    if predicted is not None and predicted > cap:
        return {**row, "capped": True, "ttft_s": None}
    override = {} if name == "policy" else ALTERNATIVES[name]
    sent = await client.request(
        "reader", {"op": "read", "text": ctx["text"], **override}, timeout_s=REQUEST_TIMEOUT_S
    )
    ask = {"op": "ask", "card": sent["card"], "question": ctx["question"], "wait_s": cap,
           "max_new_tokens": spec["max_new_tokens"]}  # fmt: skip
    try:
        answer = await client.request("answerer", ask, timeout_s=REQUEST_TIMEOUT_S)
    except NodeError as exc:
        return {**row, **_sent_fields(sent), "capped": True, "ttft_s": None, "error": str(exc)}
    return {
        **row,
        **_sent_fields(sent),
        "capped": False,
        "ttft_s": float(answer["sent_to_ready_s"]) + float(answer["ttft_s"]),
        "handoff_ttft_s": answer.get("handoff_ttft_s"),
        "answer_ttft_s": float(answer["ttft_s"]),
        "sent_to_ready_s": float(answer["sent_to_ready_s"]),
        "head_prefill_s": answer.get("head_prefill_s"),
        "answer": answer["answer"],
    }


def _median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run of median TTFT (the lower middle of an even count), with every run's TTFT beside it."""
    timed = sorted((r for r in runs if r["ttft_s"] is not None), key=lambda r: r["ttft_s"])
    if not timed:
        return runs[0]
    return {**timed[(len(timed) - 1) // 2], "ttft_runs_s": [r["ttft_s"] for r in runs]}


def _sent_fields(sent: dict[str, Any]) -> dict[str, Any]:
    decision: dict[str, Any] = next(iter(sent.get("decisions", {}).values()), {})
    return {
        "representation": sent["representation"],
        "bits": sent.get("bits"),
        "head_tokens": sent.get("head_tokens", 0),
        "wire_bytes": sent["wire_bytes"],
        "card_bytes": sent["card_bytes"],
        "decision": decision,
    }


# ------------------------------------------------------------------------------------------------ runs


def _quality(row: dict[str, Any], points: Mapping[str, RateQualityPoint]) -> float | None:
    if row["alternative"] == "policy":
        quality = row.get("decision", {}).get("predicted_quality")
        return None if quality is None else float(quality)
    if row["alternative"] == "text":
        return 1.0
    condition = _CONDITION.get(row["alternative"])
    return None if condition is None or condition not in points else points[condition].quality


def summarise(rows: list[dict[str, Any]], floor: float) -> list[dict[str, Any]]:
    """One line per (link, tokens): the policy's choice and TTFT against the best alternatives."""
    cells: dict[tuple[float, int], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["link_mbit"], row["tokens"]), []).append(row)
    out = []
    for (link, tokens), group in sorted(cells.items()):
        policy = next((r for r in group if r["alternative"] == "policy"), None)
        measured = [r for r in group if r["alternative"] != "policy" and r.get("ttft_s") is not None]
        best = min(measured, key=lambda r: r["ttft_s"], default=None)
        good = [r for r in measured if (r.get("quality") or 0) >= floor]
        best_good = min(good, key=lambda r: r["ttft_s"], default=None)
        p_ttft = None if policy is None else policy.get("ttft_s")
        decision: dict[str, Any] = {} if policy is None else policy.get("decision", {})
        out.append(
            {
                "link_mbit": link,
                "tokens": tokens,
                "policy_choice": _label(policy),
                "policy_ttft_s": p_ttft,
                "best": _label(best),
                "best_ttft_s": None if best is None else best["ttft_s"],
                "policy_vs_best": None if p_ttft is None or best is None else p_ttft / best["ttft_s"],
                "best_at_floor": _label(best_good),
                "policy_vs_best_at_floor": (
                    None if p_ttft is None or best_good is None else p_ttft / best_good["ttft_s"]
                ),
                "policy_quality": decision.get("predicted_quality"),
                "floor": floor,
                "bandwidth": decision.get("bandwidth"),
            }
        )
    return out


def _label(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row["alternative"] != "policy":
        return str(row["alternative"])
    d = row.get("decision", {})
    rep = d.get("representation", "?")
    if rep == "text":
        return "text"
    head = f" h={d.get('head_tokens')}" if rep == "split" else ""
    return f"{rep}-{d.get('bits', 0):g}{head}"


def _cell(row: dict[str, Any]) -> dict[str, Any]:
    """A row for printing: a capped run shows ``> cap`` and its predicted transfer."""
    out = dict(row)
    if row.get("capped"):
        predicted = row.get("predicted_transfer_s")
        out["ttft_s"] = "> cap" + (f" ({predicted:.0f} s transfer)" if predicted else "")
    return out


_ROW_COLUMNS = (
    "link_mbit", "tokens", "alternative", "representation", "bits", "head_tokens", "wire_bytes",
    "link_measured_mbit", "predicted_transfer_s", "sent_to_ready_s", "answer_ttft_s", "ttft_s", "quality",
)  # fmt: skip
_SUMMARY_COLUMNS = (
    "link_mbit", "tokens", "policy_choice", "policy_ttft_s", "best", "best_ttft_s", "policy_vs_best",
    "best_at_floor", "policy_vs_best_at_floor", "policy_quality", "floor", "bandwidth",
)  # fmt: skip


async def _run_link(
    link: float, contexts: Sequence[BenchContext], config: PolicyBenchConfig, root: Path, table: Path
) -> list[dict[str, Any]]:
    name = f"{link:g}mbit"
    policy = {"quality_floor": config.quality_floor, "table": str(table), **config.policy}
    # Below SMALL_CHUNKS_BELOW_MBIT the reader serves 64 KiB chunks (as configs/field-base.toml does): a
    # 1 MiB chunk takes 8.4 s at 1 Mbit/s, longer than the bus's 5 s chunk timeout, and never completes.
    bus = {"chunk_kib": 64} if link < SMALL_CHUNKS_BELOW_MBIT else {}
    async with link_pair(
        name, root, model=config.model, reader={"bits": 4}, policy=policy, reader_bus=bus
    ) as pair:
        spec = {
            "table": str(table),
            "cap_s": config.cap_s,
            "repeats": config.repeats,
            "repeat_below_s": config.repeat_below_s,
            "max_new_tokens": config.max_new_tokens,
            "alternatives": list(config.alternatives),
            "warm": contexts[0].text[:2000],
            "contexts": [{"tokens": c.tokens, "text": c.text, "question": c.question} for c in contexts],
        }
        rows: list[dict[str, Any]] = await run_driver(pair, "nodes.bench.policy", spec)
    return [{"link_mbit": link, **row} for row in rows]


def run_policy_bench(
    json_out: Path | None, plot: Path | None, *, config: PolicyBenchConfig | None = None
) -> list[dict[str, Any]]:
    """Run every link, print the per-run and per-cell tables, write JSON (and a PNG); returns the cells."""
    from transformers import AutoTokenizer

    from nodes.bench.rate_quality import shipped_table_path
    from nodes.reader_policy import find_table
    from qkv import model_dir

    from ..config import ReaderPolicyConfig

    config = config or PolicyBenchConfig()
    table = find_table(ReaderPolicyConfig(), config.model) or shipped_table_path(config.model)
    points = _table_points(str(table))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir(config.model)))
    contexts = build_contexts(tokenizer, config.tokens, config.data)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgebus-policy-") as tmp:
        for link in tqdm(config.links_mbit, desc="links"):
            done = asyncio.run(_run_link(link, contexts, config, Path(tmp), table))
            for row in done:
                row["quality"] = _quality(row, points)
            rows.extend(done)
            print(format_table([_cell(r) for r in done], _ROW_COLUMNS), flush=True)
    cells = summarise(rows, config.quality_floor)
    print("\nevery run (TTFT = reader's send to first token; capped runs not run)")
    print(format_table([_cell(r) for r in rows], _ROW_COLUMNS))
    print(f"\npolicy vs best per cell (target policy/best <= 1.1; quality floor {config.quality_floor})")
    print(format_table(cells, _SUMMARY_COLUMNS))
    if json_out is not None:
        write_json([{"kind": "cell", **c} for c in cells] + [{"kind": "run", **r} for r in rows], json_out)
    if plot is not None:
        _plot(rows, plot)
        print(f"plot: {plot}")
    return cells


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    from nodes.bench.plots import ttft_plot

    for tokens in sorted({r["tokens"] for r in rows}):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["tokens"] == tokens and r.get("ttft_s") is not None:
                series.setdefault(r["alternative"], []).append((math.log10(r["link_mbit"]), r["ttft_s"]))
        ttft_plot(
            series,
            title=f"receiver TTFT at {tokens} tokens: policy vs fixed alternatives",
            out=out.with_name(f"{out.stem}_{tokens}{out.suffix}"),
            xlabel="log10 link Mbit/s",
        )


def main(argv: Sequence[str] | None = None) -> int:
    return driver_main(argv, "nodes.bench.policy", _drive)


if __name__ == "__main__":
    sys.exit(main())
