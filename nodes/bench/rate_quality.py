"""The budget policy's rate-quality table, generated from ``edgebus bench quality`` results.

One point per card condition of the results: its size per token and its quality relative to text. Quality
metric: ``exp(-kl_vs_text)``, the exponential of the mean teacher-forced KL divergence of the receiver's
next-token distributions (along the reference answer) from the text condition's. 1.0 means the receiver's
distributions are the text reader's; no context at all scores about 0.15 on SQuAD. Why not F1: a 135M model
answers SQuAD with F1 0.137 from the text itself, so F1 relative to text moves in noisy steps (kv-3 0.97
above kv-4 0.96); ``same_as_text`` (token-identical answers) counts every harmless difference in a 16-token
answer as a failure. KL averages over every answer token of every row and is monotone in the code width.

Size: ``bytes_per_token = kv_bytes_per_token * card_bytes / fp16_bytes`` (the rows' mean card and mean
whole-context fp16 KV bytes, headers and scales counted), so the ratio is the benchmark's own.

Points are rounded (quality to 4 decimals) and Pareto-pruned: a point no better in quality than another
that is no bigger and no slower to decode (rotated codings decode slower) is dropped (kv-raw, at fp16's
quality and twice its bytes), and of equal points the first is kept. Conditions a node cannot make
(``+reread``: a benchmark-only token ranking) are left out. When several result files hold one condition,
the row with the most examples wins. Regenerate with one command::

    edgebus policy table --from docs/results/quality_squad_issue2.json [--from MORE.json]
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from edgebus import KL_QUALITY_METRIC, RateQualityPoint, RateQualityTable
from nodes.bench.conditions import parse_condition

#: Decimals kept of a point's quality: KL below 1e-4 is numerical noise of the codec round trip.
QUALITY_DECIMALS: Final = 4
TABLE_SUFFIX: Final = "-rq.json"


def table_filename(model: str) -> str:
    """Where a model's table is looked up: ``<model>-rq.json`` in the profiles directories."""
    return f"{model}{TABLE_SUFFIX}"


def _number(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def point_from_row(row: Mapping[str, Any], *, kv_bytes_per_token: int) -> RateQualityPoint | None:
    """The point of one summary row, or None for a row that is not a measured card (text, no-context)."""
    name = row.get("condition")
    kl, card, fp16 = (_number(row, k) for k in ("kl_vs_text", "card_bytes", "fp16_bytes"))
    if not isinstance(name, str) or kl is None or not card or not fp16:
        return None
    condition = parse_condition(name)
    if condition.budget is None or condition.importance != "window" or condition.head_fraction is not None:
        # +reread ranks tokens by a second prefill only the benchmark does: a node cannot make that card.
        # +head-F is a split at one head fraction: the policy derives splits from the card points.
        return None
    budget = condition.budget
    return RateQualityPoint(
        representation="card",
        bits=float(budget.bits),
        keep=float(budget.keep),
        layers=float(budget.layers),
        bytes_per_token=round(kv_bytes_per_token * card / fp16, 1),
        quality=round(math.exp(-max(kl, 0.0)), QUALITY_DECIMALS),
        facts=budget.facts,
        condition=name,
        rotated=budget.rotation != "none",
    )


def pareto(points: Iterable[RateQualityPoint]) -> list[RateQualityPoint]:
    """Points no other point beats: none at least as good in quality and no bigger (and better in one),
    and no slower to decode (a rotated card never beats an unrotated one: on a fast link its decode is the
    larger part of the time)."""
    pool = list(points)
    kept: list[RateQualityPoint] = []
    for p in pool:
        same = (p.bytes_per_token, p.quality, p.rotated)
        if any((k.bytes_per_token, k.quality, k.rotated) == same for k in kept):
            continue  # one condition under two names (kv-4 and uniform-4): keep the first
        dominated = any(
            q is not p
            and q.quality >= p.quality
            and q.bytes_per_token <= p.bytes_per_token
            and (q.quality > p.quality or q.bytes_per_token < p.bytes_per_token)
            and (p.rotated or not q.rotated)
            for q in pool
        )
        if not dominated:
            kept.append(p)
    return sorted(kept, key=lambda p: -p.bytes_per_token)


def build_table(
    results: Sequence[Path], *, model: str, kv_bytes_per_token: int
) -> tuple[RateQualityTable, list[RateQualityPoint]]:
    """(the table, the points pruned from it) from quality-benchmark summary files."""
    best: dict[str, tuple[int, Mapping[str, Any]]] = {}
    for path in results:
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected the list of summary rows `edgebus bench quality` writes")
        for row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("condition"), str):
                continue
            n = int(row.get("n") or 0)
            if row["condition"] not in best or n > best[row["condition"]][0]:
                best[row["condition"]] = (n, row)
    points = [
        p
        for _, row in best.values()
        if (p := point_from_row(row, kv_bytes_per_token=kv_bytes_per_token)) is not None
    ]
    if not points:
        raise ValueError("no card condition with kl_vs_text in the results (run the bench with --kl)")
    kept = pareto(points)
    text = RateQualityPoint(
        representation="text", bits=16.0, keep=1.0, layers=1.0, bytes_per_token=0.0, quality=1.0
    )
    source = ", ".join(
        f"{path.name} ({', '.join(sorted({str(r.get('dataset', '?')) for r in _rows(path)}))})"
        for path in results
    )
    pruned = [p for p in points if p not in kept]
    table = RateQualityTable(
        points=(*kept, text), model=model, metric=KL_QUALITY_METRIC, source=source, dominated=tuple(pruned)
    )
    return table, pruned


def _rows(path: Path) -> list[Mapping[str, Any]]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [r for r in rows if isinstance(r, dict)]


def model_kv_bytes_per_token(model: str) -> int:
    """fp16 K and V bytes per token of a stored model, from its config (no weights loaded)."""
    from qkv import model_dir

    config = json.loads((model_dir(model) / "config.json").read_text(encoding="utf-8"))
    layers = int(config["num_hidden_layers"])
    kv_heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    return 2 * layers * kv_heads * head_dim * 2


def shipped_table_path(model: str) -> Path:
    """Where the table for ``model`` ships: next to the sensitivity profile in ``qkv/profiles``."""
    import qkv

    return Path(qkv.__file__).resolve().parent / "profiles" / table_filename(model)
