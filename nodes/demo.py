"""``edgebus demo``: hand real contexts from a reader to an answerer and compare with re-reading the text.

For each bundled context the reader prefills it and writes a CacheCard; the answerer decodes the card and
answers the question with only the question's tokens, never seeing the context text. The same answerer also
re-prefills the text (the baseline). Printed per question: the answer both ways, time to first token both
ways, and bytes on the wire (card) vs the fp16 KV it replaces vs the text itself.
"""

from __future__ import annotations

import importlib.resources
import time
from dataclasses import dataclass
from pathlib import Path

from nodes.bench.datasets import QARow, load_rows
from nodes.bench.metrics import best_f1
from nodes.bench.plots import ttft_plot
from nodes.bench.table import format_table


@dataclass(frozen=True, kw_only=True)
class HandoffResult:
    row: QARow
    context_tokens: int
    card_bytes: int
    fp16_bytes: int
    text_bytes: int
    card_answer: str
    text_answer: str
    card_ttft_s: float  # decode + inject + question prefill + first token (+ transfer when over the bus)
    text_ttft_s: float  # prefill of context and question + first token
    encode_s: float
    transfer_s: float = 0.0


def sample_rows(limit: int | None = None) -> list[QARow]:
    path = Path(str(importlib.resources.files("nodes").joinpath("sample/contexts.jsonl")))
    rows = load_rows(path)
    rows.sort(key=lambda r: len(r.context))
    return rows[:limit] if limit else rows


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def print_result(index: int, total: int, res: HandoffResult, bits: int) -> None:
    speedup = res.text_ttft_s / res.card_ttft_s if res.card_ttft_s > 0 else float("inf")
    print(f"\n[{index}/{total}] {res.row.source} · {res.context_tokens} context tokens")
    print(f"  question:        {res.row.question}")
    print(f"  reference:       {res.row.answers[0]}")
    print(f"  from card ({bits}-bit): {res.card_answer!r:<40} TTFT {res.card_ttft_s:6.3f} s")
    print(f"  re-prefill text: {res.text_answer!r:<40} TTFT {res.text_ttft_s:6.3f} s  ({speedup:.1f}x)")
    print(
        f"  bytes: card {_mb(res.card_bytes)} | fp16 KV {_mb(res.fp16_bytes)} "
        f"({res.fp16_bytes / res.card_bytes:.1f}x smaller) | text {_mb(res.text_bytes)}"
    )


def summarise(results: list[HandoffResult], *, bits: int, plot: Path | None) -> None:
    rows = [
        {
            "tokens": r.context_tokens,
            "card_ttft_s": r.card_ttft_s,
            "text_ttft_s": r.text_ttft_s,
            "speedup": r.text_ttft_s / r.card_ttft_s,
            "card_bytes": r.card_bytes,
            "fp16_bytes": r.fp16_bytes,
            "text_bytes": r.text_bytes,
            "card_f1": best_f1(r.card_answer, r.row.answers),
            "text_f1": best_f1(r.text_answer, r.row.answers),
            "same_answer": r.card_answer == r.text_answer,
        }
        for r in results
    ]
    print("\nsummary")
    print(format_table(rows, tuple(rows[0].keys())))
    if plot is not None:
        ttft_plot(
            {
                f"from {bits}-bit card": [(r.context_tokens, r.card_ttft_s) for r in results],
                "re-prefill text": [(r.context_tokens, r.text_ttft_s) for r in results],
            },
            title="receiver time to first token",
            out=plot,
        )
        print(f"plot: {plot}")


def run_in_process(model: str, bits: int, limit: int, max_new_tokens: int) -> list[HandoffResult]:
    from qkv import Budget, answer_from_card, answer_from_text, encode_context, load_model

    lm = load_model(model)
    rows = sample_rows(limit)
    # Warm-up: the first forward of a process pays one-off allocation costs that would skew the first row.
    answer_from_text(lm, rows[0].context, rows[0].question, max_new_tokens=2)
    results: list[HandoffResult] = []
    for i, row in enumerate(rows, 1):
        enc = encode_context(lm, row.context, Budget(bits=bits), sender="reader")
        card = answer_from_card(lm, enc.data, row.question, max_new_tokens=max_new_tokens)
        text = answer_from_text(lm, row.context, row.question, max_new_tokens=max_new_tokens)
        res = HandoffResult(
            row=row,
            context_tokens=enc.context_tokens,
            card_bytes=enc.card_bytes,
            fp16_bytes=enc.fp16_bytes,
            text_bytes=len(row.context.encode()),
            card_answer=card.text,
            text_answer=text.text,
            card_ttft_s=card.ttft_s,
            text_ttft_s=text.ttft_s,
            encode_s=enc.encode_s,
        )
        print_result(i, len(rows), res, bits)
        results.append(res)
    return results


def run_demo(
    *, model: str, bits: int, limit: int, max_new_tokens: int, plot: Path | None, processes: bool
) -> int:
    start = time.perf_counter()
    print(f"edgebus demo: model {model}, {bits}-bit cards, {limit} bundled contexts")
    if processes:
        from nodes.demo_processes import run_over_bus

        results = run_over_bus(model, bits, limit, max_new_tokens)
    else:
        results = run_in_process(model, bits, limit, max_new_tokens)
    summarise(results, bits=bits, plot=plot)
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
