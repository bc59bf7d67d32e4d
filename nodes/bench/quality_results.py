"""Results of ``edgebus bench quality``: per-row records -> summary rows, and runs merged into one table.

A long run is often split: shards of rows (``--offset``) on several processes, or a second run that adds
conditions on the same rows. Merging keeps the two things the table's ratios depend on: every condition is
summarised over the same rows as ``text`` (``f1_vs_text`` divides one mean by the other), and a condition
present in two inputs must have given the same answers there (same rows, same code), or the merge refuses.
Loads neither torch nor the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodes._errors import BenchInputError

COLUMNS = (
    "dataset", "condition", "n", "f1", "em", "f1_vs_text", "same_as_text", "kl_vs_text",
    "card_bytes", "fp16_bytes", "ratio", "ttft_s",
)  # fmt: skip

# Summaries are means over a few hundred rows: anything closer than this is the same run's number.
_SAME_VALUE = 1e-9
_COMPARED = ("f1", "em", "kl_vs_text", "card_bytes")


@dataclass
class Tally:
    n: int = 0
    f1: float = 0.0
    em: float = 0.0
    same: int = 0
    kl: float = 0.0
    kl_n: int = 0
    card_bytes: int = 0
    fp16_bytes: int = 0
    ttft: float = 0.0


def tally(tallies: dict[str, Tally], results: Mapping[str, Mapping[str, Any]]) -> None:
    """Add one row's per-condition records (as the bench writes them) to the running tallies."""
    for name, rec in results.items():
        t = tallies.setdefault(name, Tally())
        t.n += 1
        t.f1 += rec["f1"]
        t.em += rec["em"]
        t.same += int(rec["same"])
        t.card_bytes += int(rec.get("card_bytes", 0))
        t.fp16_bytes += int(rec.get("fp16_bytes", 0))
        t.ttft += rec["ttft_s"]
        if "kl" in rec:
            t.kl += rec["kl"]
            t.kl_n += 1


def summarise(dataset: str, names: Sequence[str], tallies: Mapping[str, Tally]) -> list[dict[str, Any]]:
    """One summary row per condition in ``names`` order; ratios are of totals, never means of ratios."""
    text = tallies.get("text")
    text_f1 = text.f1 / text.n if text and text.n else None
    rows: list[dict[str, Any]] = []
    for name in names:
        t = tallies.get(name)
        if t is None or t.n == 0:
            continue
        f1 = t.f1 / t.n
        rows.append(
            {
                "dataset": dataset,
                "condition": name,
                "n": t.n,
                "f1": f1,
                "em": t.em / t.n,
                "f1_vs_text": f1 / text_f1 if text_f1 else None,
                "same_as_text": t.same / t.n,
                "kl_vs_text": t.kl / t.kl_n if t.kl_n else None,
                "card_bytes": t.card_bytes / t.n,
                "fp16_bytes": t.fp16_bytes / t.n if t.fp16_bytes else None,
                "ratio": t.fp16_bytes / t.card_bytes if t.card_bytes and t.fp16_bytes else None,
                "size_vs_fp16": t.card_bytes / t.fp16_bytes if t.card_bytes and t.fp16_bytes else None,
                "ttft_s": t.ttft / t.n,
            }
        )
    return rows


def _json_lines(path: Path) -> Iterable[tuple[int, Any]]:
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, json.loads(line)
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchInputError(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise BenchInputError(f"{path}: not JSON lines: {exc}") from exc


def _same_record(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two runs of one condition on one row agree (timings differ between runs and are not compared)."""
    return (
        a.get("answer") == b.get("answer")
        and a.get("card_bytes", 0) == b.get("card_bytes", 0)
        and math.isclose(float(a.get("kl", 0.0)), float(b.get("kl", 0.0)), rel_tol=1e-6, abs_tol=1e-9)
    )


def _is_record(rec: Any) -> bool:
    numbers = ("f1", "em", "ttft_s")
    return (
        isinstance(rec, dict)
        and "same" in rec
        and all(isinstance(rec.get(k), int | float) for k in numbers)
        and all(isinstance(rec.get(k, 0), int | float) for k in ("kl", "card_bytes", "fp16_bytes"))
    )


def read_row_files(paths: Sequence[Path]) -> tuple[list[str], dict[str, dict[str, dict[str, Any]]]]:
    """(condition names in order of appearance, row id -> condition -> record) pooled over per-row files.

    Shards add rows, runs with other conditions add conditions to the same rows; a condition found twice
    for one row must agree, and every condition must cover every pooled row.
    """
    names: list[str] = []
    pooled: dict[str, dict[str, dict[str, Any]]] = {}
    for path in paths:
        for number, line in _json_lines(path):
            where = f"{path}:{number}"
            if not isinstance(line, dict) or not isinstance(line.get("results"), dict):
                raise BenchInputError(f"{where}: expected a row written by `edgebus bench quality`")
            row_id = str(line.get("id"))
            results = pooled.setdefault(row_id, {})
            for name, rec in line["results"].items():
                if not _is_record(rec):
                    raise BenchInputError(f"{where}: condition {name!r} is not a bench record")
                if name not in names:
                    names.append(name)
                if name in results and not _same_record(results[name], rec):
                    raise BenchInputError(
                        f"{where}: row {row_id} condition {name!r} differs from an earlier file's "
                        "(other code or another model?)"
                    )
                results.setdefault(name, rec)
    if not pooled:
        raise BenchInputError("no rows in " + ", ".join(map(str, paths)))
    for name in names:
        missing = sum(name not in results for results in pooled.values())
        if missing:
            raise BenchInputError(
                f"condition {name!r} is missing from {missing} of {len(pooled)} rows: "
                "its mean would be over other rows than text's"
            )
    return names, pooled


def summarise_row_files(paths: Sequence[Path], *, dataset: str) -> list[dict[str, Any]]:
    """The summary a single run over all the pooled rows would have printed."""
    names, pooled = read_row_files(paths)
    tallies: dict[str, Tally] = {}
    for results in pooled.values():
        tally(tallies, results)
    return summarise(dataset, names, tallies)


def _read_summary(path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchInputError(f"{path}: cannot read a summary: {exc}") from exc
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and isinstance(r.get("condition"), str) and isinstance(r.get("n"), int)
        for r in rows
    ):
        raise BenchInputError(f"{path}: expected the list of summary rows `edgebus bench quality` writes")
    return rows


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(float(a), float(b), rel_tol=_SAME_VALUE, abs_tol=_SAME_VALUE)


def merge_summaries(tables: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> list[dict[str, Any]]:
    """Summaries of runs on the same rows (each with its ``text`` row) as one table, text first.

    ``tables`` are (where it came from, its rows). Runs count as the same rows when their ``text`` rows
    agree on n, F1 and EM: then every ``f1_vs_text`` already has the same denominator.
    """
    merged: dict[str, dict[str, Any]] = {}
    reference: tuple[str, Mapping[str, Any]] | None = None
    datasets: set[str] = set()
    for source, rows in tables:
        text = next((r for r in rows if r["condition"] == "text"), None)
        if text is None:
            raise BenchInputError(f"{source}: no text condition, so nothing to compare its rows with")
        datasets.add(str(text.get("dataset")))
        if reference is None:
            reference = (source, text)
        elif not all(_close(text.get(k), reference[1].get(k)) for k in ("n", "f1", "em")):
            raise BenchInputError(
                f"{source}: its text condition (n={text.get('n')}, F1 {text.get('f1')}) is not "
                f"{reference[0]}'s (n={reference[1].get('n')}, F1 {reference[1].get('f1')}): other rows"
            )
        for row in rows:
            if row["n"] != text["n"]:
                raise BenchInputError(
                    f"{source}: condition {row['condition']!r} has {row['n']} rows, text {text['n']}"
                )
            earlier = merged.get(row["condition"])
            if earlier is None:
                merged[row["condition"]] = dict(row)
            elif not all(_close(row.get(k), earlier.get(k)) for k in _COMPARED):
                raise BenchInputError(
                    f"{source}: condition {row['condition']!r} differs from an earlier input's"
                )
    if len(datasets) > 1:
        raise BenchInputError("inputs of different datasets: " + ", ".join(sorted(datasets)))
    text_row = merged.pop("text")
    return [text_row, *merged.values()]


def merge_results(inputs: Sequence[Path], *, dataset: str | None = None) -> list[dict[str, Any]]:
    """One table from summary files (``*.json``) and per-row files (``*.jsonl``, pooled into one run)."""
    if not inputs:
        raise BenchInputError("nothing to merge")
    row_files = [p for p in inputs if p.suffix == ".jsonl"]
    tables = [(str(p), _read_summary(p)) for p in inputs if p.suffix != ".jsonl"]
    if row_files:
        names = {str(rows[0].get("dataset")) for _, rows in tables if rows}
        if dataset is None and len(names) != 1:
            raise BenchInputError("per-row files do not name their dataset: pass --dataset")
        pooled = summarise_row_files(row_files, dataset=dataset or names.pop())
        # In the order given: the table lists conditions in the order the inputs first name them.
        at = sum(1 for p in inputs[: inputs.index(row_files[0])] if p.suffix != ".jsonl")
        tables.insert(at, (", ".join(map(str, row_files)), pooled))
    merged = merge_summaries(tables)
    if dataset is not None and merged[0].get("dataset") != dataset:
        raise BenchInputError(f"the inputs are of {merged[0].get('dataset')!r}, not {dataset!r}")
    return merged
