"""Cross-model hand-off benchmark: a card made by one model, read by another through a fitted KV map.

For each QA row the receiver answers under five conditions::

    no-context          the question only
    text                the receiver reads the context itself (the reference)
    translated-kv       the sender prefills the context and writes a real CacheCard at the budget
                        (``--bits``) naming the calibration; the receiver gets only the card's bytes and
                        answers with ``qkv.answer_from_card(..., calibrations=)``. ``--translate-at``
                        says where the KV is translated: ``receiver`` (the card holds the sender's KV) or
                        ``sender`` (the card holds the receiver-space KV)
    translated-kv+facts the same with a facts card (``Budget(facts=True)``): the facts line (qkv._facts) in
                        the receiver's suffix
    facts-only          the facts line and the question, no KV
    translated-kv+vm    translated-kv with the calibration's variance matching on (a diagnostic)

The calibration is fitted on contexts from ``calib_data`` starting at row ``calib_offset`` and never on a
context that is scored (contexts equal to a scored row's are skipped), so rows scored and rows fitted are
disjoint. ``gap_closed`` = (F1 - F1[no-context]) / (F1[text] - F1[no-context]). ``sent_bytes`` is what the
sender ships for that condition: the card's bytes (header, metadata, facts and scales included), or the
UTF-8 text; ``ttft_s`` of a card condition counts decoding, translation and the receiver's head prefill.
The sender prefills each context once; the three cards are encoded from that one prefill.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nodes.bench.crossmodel_args import DEFAULT_CALIB_OFFSET, add_pair_arguments
from nodes.bench.datasets import QARow, dataset_name, load_rows
from nodes.bench.metrics import best_em, best_f1
from nodes.bench.table import format_table
from qkv import (
    Budget,
    CalibrationError,
    CrossModelCalibration,
    LoadedModel,
    TranslateAt,
    answer_from_card,
    calibrate_pair,
    encode_observation,
    extract_facts,
    generate_from_text,
    load_model,
    needs_attention,
    observe,
)

CONDITIONS = ("no-context", "text", "translated-kv", "translated-kv+facts", "facts-only", "translated-kv+vm")
COLUMNS = ("dataset", "direction", "condition", "n", "f1", "em", "gap_closed", "sent_bytes", "ttft_s")


@dataclass
class _Tally:
    n: int = 0
    f1: float = 0.0
    em: float = 0.0
    sent_bytes: int = 0
    ttft: float = 0.0


def calibration_texts(
    calib_data: Path, *, rows: int, offset: int, exclude: Sequence[QARow] = ()
) -> list[str]:
    """Up to ``rows`` distinct contexts of ``calib_data`` from file row ``offset`` on, none of ``exclude``."""
    scored = {row.context.strip() for row in exclude}
    texts: dict[str, None] = {}
    for row in load_rows(calib_data, offset=offset):
        context = row.context.strip()
        if context and context not in scored:
            texts.setdefault(context)
        if len(texts) >= rows:
            break
    return list(texts)


def fit_or_load_calibration(
    sender: LoadedModel,
    receiver: LoadedModel,
    texts: Sequence[str],
    *,
    path: Path | None,
    ridge: float = 0.05,
    span: int = 2,
    variance_match: bool = False,
) -> CrossModelCalibration:
    """Load ``path`` when it holds a calibration for this pair, else fit one (and save it to ``path``)."""
    if path is not None and path.is_file():
        try:
            return CrossModelCalibration.load(path, sender=sender.fingerprint, receiver=receiver.fingerprint)
        except CalibrationError as exc:
            print(f"refitting: {exc}", file=sys.stderr)
    from tqdm import tqdm

    calibration = calibrate_pair(
        sender,
        receiver,
        texts,
        ridge=ridge,
        span=span,
        variance_match=variance_match,
        progress=lambda it: iter(tqdm(it, total=len(texts), desc="calibrate", unit="text", file=sys.stderr)),
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        calibration.save(path)
    return calibration


def _score_row(
    sender: LoadedModel,
    receiver: LoadedModel,
    calibration: CrossModelCalibration,
    matched: CrossModelCalibration,
    row: QARow,
    *,
    budget: Budget,
    translate_at: TranslateAt,
    max_new_tokens: int,
) -> dict[str, dict[str, Any]]:
    facts = extract_facts(row.context).to_text() or None
    out: dict[str, dict[str, Any]] = {}
    template, tokenizer = receiver.template, receiver.tokenizer
    for name in ("no-context", "facts-only", "text"):
        context = row.context if name == "text" else ""
        parts = template.split(
            tokenizer, context, row.question, facts=facts if name == "facts-only" else None
        )
        gen = generate_from_text(receiver, parts.prefix_ids, parts.suffix_ids, max_new_tokens=max_new_tokens)
        sent = len(facts.encode()) if name == "facts-only" and facts else 0
        if name == "text":
            sent = len(row.context.encode())
        out[name] = {"answer": gen.text, "ttft_s": gen.ttft_s, "sent_bytes": sent}
    window = budget.window if needs_attention(budget) else None
    observation = observe(sender, row.context, window=window)  # one sender prefill for the three cards
    variants = (
        ("translated-kv", calibration, dataclasses.replace(budget, facts=False)),
        ("translated-kv+facts", calibration, dataclasses.replace(budget, facts=True)),
        ("translated-kv+vm", matched, dataclasses.replace(budget, facts=False)),
    )
    for name, used, card_budget in variants:
        card = encode_observation(
            sender, observation, card_budget, context=row.context, translate=used, translate_at=translate_at
        )
        answer = answer_from_card(
            receiver, card.data, row.question, max_new_tokens=max_new_tokens, use_facts=card_budget.facts,
            calibrations=(used,),
        )  # fmt: skip
        out[name] = {"answer": answer.text, "ttft_s": answer.ttft_s, "sent_bytes": card.card_bytes}
    for record in out.values():
        record["f1"] = best_f1(record["answer"], row.answers)
        record["em"] = best_em(record["answer"], row.answers)
    return out


def _summarise(dataset: str, direction: str, tallies: dict[str, _Tally]) -> list[dict[str, Any]]:
    def mean_f1(name: str) -> float:
        t = tallies[name]
        return t.f1 / t.n if t.n else 0.0

    base, ref = mean_f1("no-context"), mean_f1("text")
    rows = []
    for name in CONDITIONS:
        t = tallies[name]
        if not t.n:
            continue
        f1 = t.f1 / t.n
        rows.append(
            {
                "dataset": dataset,
                "direction": direction,
                "condition": name,
                "n": t.n,
                "f1": f1,
                "em": t.em / t.n,
                "gap_closed": (f1 - base) / (ref - base) if ref != base else None,
                "sent_bytes": t.sent_bytes / t.n,
                "ttft_s": t.ttft / t.n,
            }
        )
    return rows


def calibration_summary(calibration: CrossModelCalibration) -> dict[str, Any]:
    q = calibration.quality
    return {
        "id": calibration.id,
        "sender": calibration.sender.describe(),
        "receiver": calibration.receiver.describe(),
        "layer_map": [list(m) for m in calibration.layer_map],
        "ridge": calibration.ridge,
        "variance_match": calibration.variance_match,
        "alignment": calibration.alignment,
        **q.to_dict(),
    }


def run_crossmodel_bench(
    sender: str | LoadedModel,
    receiver: str | LoadedModel,
    data: Path,
    *,
    limit: int = 50,
    offset: int = 0,
    calib_data: Path,
    calib_rows: int = 100,
    calib_offset: int = DEFAULT_CALIB_OFFSET,
    calibration_path: Path | None = None,
    ridge: float = 0.05,
    span: int = 2,
    variance_match: bool = False,
    budget: Budget | None = None,
    translate_at: TranslateAt = "receiver",
    max_new_tokens: int = 24,
    json_out: Path | None = None,
    plot: Path | None = None,
) -> dict[str, Any]:
    """Score the conditions on the first ``limit`` rows of ``data``; returns (and writes) the summary.

    ``budget`` (default ``Budget(bits=4)``) is the card's; its ``facts`` flag is set per condition.
    """
    budget = budget or Budget(bits=4)
    from tqdm import tqdm

    sender_lm = load_model(sender) if isinstance(sender, str) else sender
    receiver_lm = load_model(receiver) if isinstance(receiver, str) else receiver
    rows = load_rows(data, limit=limit, offset=offset)
    texts = calibration_texts(calib_data, rows=calib_rows, offset=calib_offset, exclude=rows)
    calibration = fit_or_load_calibration(
        sender_lm, receiver_lm, texts, path=calibration_path, ridge=ridge, span=span,
        variance_match=variance_match,
    )  # fmt: skip
    matched = dataclasses.replace(calibration, variance_match=True)
    dataset = dataset_name(data)
    direction = f"{sender_lm.name}->{receiver_lm.name}"
    tallies = {name: _Tally() for name in CONDITIONS}
    per_row = json_out.with_suffix(".rows.jsonl").open("w", encoding="utf-8") if json_out else None
    try:
        for row in tqdm(rows, desc=f"{dataset} {direction}", unit="row", file=sys.stderr):
            with torch.inference_mode():
                results = _score_row(
                    sender_lm, receiver_lm, calibration, matched, row, budget=budget,
                    translate_at=translate_at, max_new_tokens=max_new_tokens,
                )  # fmt: skip
            for name, record in results.items():
                t = tallies[name]
                t.n += 1
                t.f1 += record["f1"]
                t.em += record["em"]
                t.sent_bytes += record["sent_bytes"]
                t.ttft += record["ttft_s"]
            if per_row is not None:
                per_row.write(
                    json.dumps({"id": row.id, "answers": list(row.answers), "results": results}) + "\n"
                )
                per_row.flush()  # a long run can be watched row by row
    finally:
        if per_row is not None:
            per_row.close()
    table = _summarise(dataset, direction, tallies)
    summary = {
        "dataset": dataset,
        "direction": direction,
        "rows_scored": len(rows),
        "calibration_data": str(calib_data),
        "calibration_offset": calib_offset,
        "calibration_texts": len(texts),
        "calibration": calibration_summary(calibration),
        "card_budget": {key: v for key, v in budget.to_dict().items() if key != "facts"},
        "translate_at": translate_at,
        "results": table,
    }
    print(format_table(table, COLUMNS))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    if plot is not None:
        crossmodel_plot(summary, out=plot)
    return summary


def crossmodel_plot(summary: dict[str, Any], *, out: Path) -> Path:
    """Left: F1 per condition. Right: held-out R^2 per receiver layer, K and V."""
    from nodes.bench.plots import _pyplot

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    results = summary["results"]
    left.bar([r["condition"] for r in results], [r["f1"] for r in results], color="tab:blue")
    left.set_ylabel("F1")
    left.set_title(f"{summary['dataset']}: {summary['direction']} (n={summary['rows_scored']})", fontsize=9)
    left.tick_params(axis="x", rotation=30, labelsize=8)
    cal = summary["calibration"]
    layers = range(len(cal["r2_k"]))
    right.plot(layers, cal["r2_k"], marker="o", label="K held-out")
    right.plot(layers, cal["r2_v"], marker="o", label="V held-out")
    right.plot(layers, cal["train_r2_k"], ls="--", color="tab:blue", alpha=0.5, label="K train")
    right.plot(layers, cal["train_r2_v"], ls="--", color="tab:orange", alpha=0.5, label="V train")
    right.set_xlabel("receiver layer")
    right.set_ylabel("R^2")
    right.set_title(f"calibration {cal['id']}", fontsize=9)
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run_crossmodel_bench` with the options of :func:`add_pair_arguments` and the data options
    (``--sender --receiver --data --limit --offset --max-new-tokens --json --plot``)."""
    data = Path(args.data)
    return run_crossmodel_bench(
        args.sender,
        args.receiver,
        data,
        limit=args.limit,
        offset=args.offset,
        calib_data=Path(args.calib_data or data),
        calib_rows=args.calib_rows,
        calib_offset=args.calib_offset,
        calibration_path=args.calibration,
        ridge=args.ridge,
        span=args.span,
        variance_match=args.variance_match,
        budget=Budget(bits=args.bits),
        translate_at=args.translate_at,
        max_new_tokens=args.max_new_tokens,
        json_out=args.json,
        plot=args.plot,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sender", default="smollm2-135m-instruct")
    parser.add_argument("--receiver", default="gemma3-270m")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--offset", type=int, default=0, help="first scored row (to split a run)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    add_pair_arguments(parser)
    run_from_args(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
