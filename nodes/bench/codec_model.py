"""``edgebus bench codec``: the card codec on real SmolLM2 caches of real text, beside a plain fp16 copy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nodes.bench.codec import run_codec_bench
from nodes.bench.handoff import SHARED_DATA, build_contexts
from qkv import KVSnapshot, load_model, prefill


def run_model_codec_bench(
    *,
    model: str,
    tokens: Sequence[int] = (1024, 4096),
    json_out: Path | None = None,
    data: Path = SHARED_DATA,
) -> list[dict[str, Any]]:
    lm = load_model(model)
    snapshots: dict[int, KVSnapshot] = {}
    for ctx in build_contexts(lm.tokenizer, tokens, data):
        ids = lm.tokenizer.encode(ctx.text, add_special_tokens=False)[: ctx.tokens]
        snapshots[ctx.tokens] = prefill(lm, ids)
    return run_codec_bench(snapshots, json_out=json_out)
