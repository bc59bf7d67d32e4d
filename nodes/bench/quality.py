"""``edgebus bench quality``: answer quality of each hand-off condition on a QA dev set.

For each row the sender's prefill is done once (and once more with window attention when a condition needs
attention statistics); every card condition is encoded from it, decoded by the receiver against its own
fingerprint and answered with only the question tokens. ``text`` (the receiver reads the context itself) is
the reference: ``same_as_text`` is the share of answers token-identical to it, ``kl_vs_text`` the mean KL
divergence KL(text || condition) of the teacher-forced next-token distributions along the reference answer.

``ratio`` = total fp16 bytes of the full-context KV / total card bytes (header, metadata, scales included),
over all rows: never a mean of per-row ratios.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgebus import HEAD_ID_BYTES
from nodes.bench.conditions import ISSUE2_CONDITIONS, Condition, parse_condition
from nodes.bench.datasets import QARow, dataset_name, load_rows
from nodes.bench.metrics import best_em, best_f1
from nodes.bench.plots import rate_quality_plot
from nodes.bench.quality_results import COLUMNS, Tally, summarise, tally
from nodes.bench.table import format_table, write_json
from qkv import (
    LoadedModel,
    Observation,
    SensitivityProfile,
    answer_from_card,
    answer_logprobs,
    encode_observation,
    encode_split_observation,
    extract_facts,
    generate_from_text,
    load_model,
    needs_attention,
    observe,
    prefill_head,
    prefill_reread,
)


@dataclass(frozen=True, kw_only=True)
class QualityBenchConfig:
    data: Path
    limit: int = 200
    offset: int = 0
    model: str = "smollm2-135m-instruct"
    conditions: Sequence[str] | None = None
    max_new_tokens: int = 24
    kl: bool = False
    json_out: Path | None = None
    plot: Path | None = None
    profile: Path | None = None
    group_size: int = 32


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over answer positions of KL(reference || other); both are log-probabilities ``[len, vocab]``."""
    return float((reference.exp() * (reference - other)).sum(dim=-1).mean())


def _target_ids(lm: LoadedModel, row: QARow) -> list[int]:
    return [int(i) for i in lm.tokenizer.encode(row.answers[0], add_special_tokens=False)]


def _observe_reread(lm: LoadedModel, context: str) -> Observation:
    """The sender's prefill with attention statistics from re-reading the context (``+reread``)."""
    parts = lm.template.split(lm.tokenizer, context, "")
    start = time.perf_counter()
    snapshot, attn = prefill_reread(
        lm,
        parts.prefix_ids,
        context_span=parts.context_token_span,
        template_prefix_tokens=parts.template_prefix_tokens,
    )
    return Observation(
        snapshot=snapshot,
        attn=attn,
        context_span=parts.context_token_span,
        prefill_s=time.perf_counter() - start,
    )


def _run_row(
    lm: LoadedModel,
    row: QARow,
    conditions: Sequence[Condition],
    *,
    profile: SensitivityProfile | None,
    max_new_tokens: int,
    kl: bool,
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    parts = lm.template.split(lm.tokenizer, row.context, row.question)
    text = generate_from_text(lm, parts.prefix_ids, parts.suffix_ids, max_new_tokens=max_new_tokens)
    target = _target_ids(lm, row) if kl else []
    reference = (
        answer_logprobs(lm, None, parts.suffix_ids, target, prefix_ids=parts.prefix_ids) if target else None
    )
    window = max(
        (c.budget.window for c in conditions if c.budget and needs_attention(c.budget)), default=None
    )
    plain_obs = observe(lm, row.context) if any(c.kind == "card" for c in conditions) else None
    attn_obs = observe(lm, row.context, window=window) if window is not None else None
    reread_obs = (
        _observe_reread(lm, row.context) if any(c.importance == "reread" for c in conditions) else None
    )
    for cond in conditions:
        record: dict[str, Any] = {}
        if cond.kind == "text":
            gen, lp = text, reference
        elif cond.kind in ("no-context", "facts-only"):
            facts = extract_facts(row.context).to_text() if cond.kind == "facts-only" else None
            bare = lm.template.split(lm.tokenizer, "", row.question, facts=facts)
            gen = generate_from_text(lm, bare.prefix_ids, bare.suffix_ids, max_new_tokens=max_new_tokens)
            lp = (
                answer_logprobs(lm, None, bare.suffix_ids, target, prefix_ids=bare.prefix_ids)
                if target
                else None
            )
            record["card_bytes"] = len(facts.encode()) if facts else 0
        else:
            assert cond.budget is not None
            if not needs_attention(cond.budget):
                obs = plain_obs
            else:
                obs = reread_obs if cond.importance == "reread" else attn_obs
            assert obs is not None
            if cond.head_fraction is None:
                enc = encode_observation(lm, obs, cond.budget, context=row.context, profile=profile)
                ans = answer_from_card(lm, enc.data, row.question, max_new_tokens=max_new_tokens)
                wire = enc.card_bytes
            else:
                # A split hand-off as a receiver gets it: the head prefilled exactly, the tail card joined.
                head_tokens = round(cond.head_fraction * len(parts.prefix_ids))
                enc = encode_split_observation(
                    lm, obs, cond.budget, head_tokens=head_tokens, context=row.context, profile=profile
                )
                head = None if enc.head is None else prefill_head(lm, enc.head)
                ans = answer_from_card(lm, enc.data, row.question, max_new_tokens=max_new_tokens, head=head)
                wire = enc.card_bytes + HEAD_ID_BYTES * head_tokens
            gen = ans.generation
            record.update(card_bytes=wire, fp16_bytes=enc.fp16_bytes, ttft_s=ans.ttft_s)
            lp = None
            if target:
                facts = ans.card.meta.facts or None
                suffix = lm.template.split(lm.tokenizer, "", row.question, facts=facts).suffix_ids
                lp = answer_logprobs(lm, ans.card.snapshot, suffix, target)
        record.update(
            answer=gen.text,
            f1=best_f1(gen.text, row.answers),
            em=best_em(gen.text, row.answers),
            same=gen.token_ids == text.token_ids,
            ttft_s=record.get("ttft_s", gen.ttft_s),
        )
        if reference is not None and lp is not None:
            record["kl"] = _kl(reference, lp)
        out[cond.name] = record
    return out


def run_quality_bench(config: QualityBenchConfig) -> list[dict[str, Any]]:
    from tqdm import tqdm

    names = tuple(config.conditions or ISSUE2_CONDITIONS)
    if "text" not in names:
        names = ("text", *names)
    conditions = [parse_condition(n, group_size=config.group_size) for n in names]
    profile = SensitivityProfile.load(config.profile) if config.profile else None
    lm = load_model(config.model)
    rows = load_rows(config.data, limit=config.limit, offset=config.offset)
    dataset = dataset_name(config.data)
    tallies = {n: Tally() for n in names}
    per_row_path = config.json_out.with_suffix(".rows.jsonl") if config.json_out else None
    per_row = per_row_path.open("w", encoding="utf-8") if per_row_path else None
    try:
        for row in tqdm(rows, desc=f"{dataset}", unit="row", file=sys.stderr):
            results = _run_row(
                lm, row, conditions, profile=profile, max_new_tokens=config.max_new_tokens, kl=config.kl
            )
            tally(tallies, results)
            if per_row is not None:
                per_row.write(
                    json.dumps({"id": row.id, "answers": list(row.answers), "results": results}) + "\n"
                )
    finally:
        if per_row is not None:
            per_row.close()
    summary = summarise(dataset, names, tallies)
    print(format_table(summary, COLUMNS))
    write_json(summary, config.json_out)
    if config.plot is not None:
        rate_quality_plot(summary, title=f"{dataset}: quality vs size ({config.model})", out=config.plot)
    return summary
