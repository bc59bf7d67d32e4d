"""``edgebus calibrate``: measure a model's per-layer K/V sensitivity profile and save it as JSON.

Calibration items are QA rows of a JSONL file (schema in ../shared/data/SOURCES.md) from ``offset`` on, one
row per distinct context (consecutive SQuAD rows share a paragraph; distinct paragraphs give more varied
caches for the same cost). The quality benchmark scores rows ``0..BENCHMARK_ROWS-1`` of its files, so an
offset below that is refused: a profile tuned on the rows it is scored on would flatter adaptive widths.

After saving, it prints the allocation the profile gives at a few budgets and its predicted distortion next
to the uniform width of the same stored bits.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from nodes.bench.datasets import load_rows
from qkv import (
    CalibrationItem,
    Rotation,
    SensitivityProfile,
    load_model,
    predicted_distortion,
    profile_filename,
    profile_sensitivity,
    profiles_dir,
    width_cost,
)

#: Rows ``0..BENCHMARK_ROWS-1`` of every QA file are benchmark rows; calibration must start after them.
BENCHMARK_ROWS = 200
DEFAULT_OFFSET = 600
DEFAULT_ROWS = 16
#: fp16 costs as much to measure as any width, its KL is at the noise floor (about 1e-8) and a 4-5 bit
#: budget never buys it: a few items pin it down.
SPARSE_WIDTHS = (16,)
SPARSE_ITEMS = 4
#: Uniform code widths whose stored-bit budget (scales counted) the summary compares against.
REPORT_WIDTHS = (3, 4)


def calibration_items(data: Path, *, rows: int, offset: int) -> list[CalibrationItem]:
    """``rows`` items from ``data`` starting at row ``offset``, the first question of each new context."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if offset < BENCHMARK_ROWS:
        raise ValueError(
            f"offset {offset} overlaps the benchmark rows 0..{BENCHMARK_ROWS - 1}: calibrate on later rows"
        )
    items: list[CalibrationItem] = []
    seen: set[str] = set()
    for row in load_rows(data, offset=offset):
        if row.context in seen:
            continue
        seen.add(row.context)
        items.append((row.context, row.question, row.answers[0]))
        if len(items) == rows:
            break
    if len(items) < rows:
        raise ValueError(f"{data} has only {len(items)} distinct contexts from row {offset}, wanted {rows}")
    return items


def allocation_summary(profile: SensitivityProfile, widths: Sequence[int] = REPORT_WIDTHS) -> str:
    """Per-layer K/V widths at the stored bits of each uniform width, and distortion vs that uniform plan."""
    layers = len(profile.table)
    lines: list[str] = []
    for width in widths:
        budget = width_cost(width, profile.group_size)
        allocation = profile.allocate(budget)
        uniform = predicted_distortion(profile, (width,) * layers, (width,) * layers)
        lines.append(
            f"budget {budget:g} bits/value (= uniform-{width}): spent {allocation.bits_per_value:.4f}, "
            f"predicted distortion {allocation.distortion:.5g} vs uniform {uniform:.5g} "
            f"(gap bound {allocation.gap_bound:.2g})"
        )
        lines.append("  K: " + " ".join(str(w) for w in allocation.key_bits))
        lines.append("  V: " + " ".join(str(w) for w in allocation.value_bits))
    return "\n".join(lines)


def run_calibrate(
    model: str,
    data: Path,
    *,
    rows: int = DEFAULT_ROWS,
    offset: int = DEFAULT_OFFSET,
    out: Path | None = None,
    group_size: int = 32,
    progress: bool = True,
    stream: TextIO | None = None,
    rotation: Rotation = "none",
    fp16_sinks: int = 0,
) -> Path:
    """Calibrate ``model`` on ``rows`` items of ``data`` and save the profile; returns the file written.

    ``out`` defaults to ``$EDGEBUS_HOME/profiles/`` under :func:`qkv._calibrate.profile_filename` (model,
    group size and card coding), where :func:`qkv._calibrate.default_profile` finds it.
    """
    stream = sys.stdout if stream is None else stream
    items = calibration_items(data, rows=rows, offset=offset)
    lm = load_model(model)
    start = time.perf_counter()
    profile = profile_sensitivity(
        lm,
        items,
        group_size=group_size,
        progress=progress,
        sparse_widths=SPARSE_WIDTHS,
        sparse_items=SPARSE_ITEMS,
        rotation=rotation,
        fp16_sinks=fp16_sinks,
    )
    elapsed = time.perf_counter() - start
    target = (
        out
        if out is not None
        else profiles_dir() / profile_filename(lm.name, group_size, rotation, fp16_sinks)
    )
    profile.save(target)
    print(
        f"calibrated {lm.name} ({profile.fingerprint_digest}) on {len(items)} items of {data.name} "
        f"from row {offset}, group size {group_size}, rotation {rotation}, {fp16_sinks} fp16 sinks, "
        f"in {elapsed:.0f} s -> {target}",
        file=stream,
    )
    print(allocation_summary(profile), file=stream)
    return target
