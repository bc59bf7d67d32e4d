"""Merging quality-bench runs (shards of rows, added conditions) and the refusals that keep ratios honest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nodes import BenchInputError, cli
from nodes.bench.quality_results import merge_results, merge_summaries, summarise_row_files


def _rec(
    f1: float, *, answer: str = "a", card: int = 0, fp16: int = 0, kl: float | None = None
) -> dict[str, Any]:
    rec: dict[str, Any] = {"answer": answer, "f1": f1, "em": float(f1 == 1.0), "same": answer == "a",
                           "ttft_s": 0.1}  # fmt: skip
    if card:
        rec.update(card_bytes=card, fp16_bytes=fp16)
    if kl is not None:
        rec["kl"] = kl
    return rec


def _rows_file(path: Path, rows: dict[str, dict[str, dict[str, Any]]]) -> Path:
    lines = (json.dumps({"id": i, "answers": ["a"], "results": r}) + "\n" for i, r in rows.items())
    path.write_text("".join(lines))
    return path


SHARD_A = {
    "r0": {"text": _rec(1.0), "uniform-4": _rec(0.5, answer="b", card=100, fp16=400, kl=0.2)},
    "r1": {"text": _rec(0.0), "uniform-4": _rec(0.0, card=300, fp16=600, kl=0.4)},
}
SHARD_B = {"r2": {"text": _rec(0.5), "uniform-4": _rec(1.0, card=100, fp16=1000, kl=0.0)}}


def _by_condition(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["condition"]: r for r in rows}


def test_shards_pool_into_the_summary_of_one_run_over_all_rows(tmp_path: Path) -> None:
    a = _rows_file(tmp_path / "a.rows.jsonl", SHARD_A)
    b = _rows_file(tmp_path / "b.rows.jsonl", SHARD_B)
    summary = _by_condition(summarise_row_files([a, b], dataset="squad"))
    text, card = summary["text"], summary["uniform-4"]
    assert text["n"] == card["n"] == 3
    assert text["f1"] == pytest.approx(0.5)
    assert card["f1"] == pytest.approx(0.5)
    assert card["f1_vs_text"] == pytest.approx(1.0)
    assert card["kl_vs_text"] == pytest.approx(0.2)
    # The ratio of totals (2000 / 500), not the mean of the per-row ratios (4, 2, 10).
    assert card["ratio"] == pytest.approx(4.0)
    assert card["same_as_text"] == pytest.approx(2 / 3)


def test_a_run_adding_conditions_on_the_same_rows_joins_them(tmp_path: Path) -> None:
    first = _rows_file(tmp_path / "first.rows.jsonl", SHARD_A)
    more = {
        "r0": {"text": _rec(1.0), "uniform-2": _rec(0.0, answer="c", card=50, fp16=400, kl=1.0)},
        "r1": {"text": _rec(0.0), "uniform-2": _rec(1.0, card=50, fp16=600, kl=0.5)},
    }
    second = _rows_file(tmp_path / "second.rows.jsonl", more)
    summary = summarise_row_files([first, second], dataset="squad")
    assert [r["condition"] for r in summary] == ["text", "uniform-4", "uniform-2"]
    assert _by_condition(summary)["uniform-2"]["ratio"] == pytest.approx(10.0)


def test_a_condition_not_run_on_every_row_is_refused(tmp_path: Path) -> None:
    first = _rows_file(tmp_path / "first.rows.jsonl", SHARD_A)
    text_only = _rows_file(tmp_path / "b.rows.jsonl", {"r2": {"text": _rec(0.5)}})
    with pytest.raises(BenchInputError, match=r"'uniform-4' is missing from 1 of 3 rows"):
        summarise_row_files([first, text_only], dataset="squad")


def test_two_runs_that_answered_one_row_differently_are_refused(tmp_path: Path) -> None:
    first = _rows_file(tmp_path / "first.rows.jsonl", SHARD_A)
    other = {"r0": {"text": _rec(0.0, answer="something else")}}
    second = _rows_file(tmp_path / "second.rows.jsonl", other)
    with pytest.raises(BenchInputError, match="row r0 condition 'text' differs"):
        summarise_row_files([first, second], dataset="squad")


def test_bad_row_files_are_refused_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.rows.jsonl"
    bad.write_text('{"id": 1, "results": {"text": {"f1": 1}}}\n')
    with pytest.raises(BenchInputError, match=r"bad.rows.jsonl:1: condition 'text' is not a bench record"):
        summarise_row_files([bad], dataset="squad")
    bad.write_text('{"id": 1, "results": {"text": {"f1": "1", "em": 0, "same": true, "ttft_s": 0}}}\n')
    with pytest.raises(BenchInputError, match="is not a bench record"):
        summarise_row_files([bad], dataset="squad")
    bad.write_text("{not json\n")
    with pytest.raises(BenchInputError, match="not JSON lines"):
        summarise_row_files([bad], dataset="squad")


def _summary(tmp_path: Path, name: str, rows: dict[str, dict[str, dict[str, Any]]], dataset: str) -> Path:
    out = tmp_path / f"{name}.json"
    out.write_text(json.dumps(summarise_row_files([_rows_file(tmp_path / f"{name}.rows.jsonl", rows)],
                                                  dataset=dataset)))  # fmt: skip
    return out


def test_summaries_of_the_same_rows_merge_and_other_rows_are_refused(tmp_path: Path) -> None:
    base = _summary(tmp_path, "base", SHARD_A, "squad")
    more = {
        "r0": {"text": _rec(1.0), "facts-only": _rec(0.0, answer="c")},
        "r1": {"text": _rec(0.0), "facts-only": _rec(0.0, answer="c")},
    }
    added = _summary(tmp_path, "added", more, "squad")
    merged = merge_results([base, added])
    assert [r["condition"] for r in merged] == ["text", "uniform-4", "facts-only"]
    assert merged[2]["f1_vs_text"] == 0.0
    other_rows = _summary(tmp_path, "other", SHARD_B, "squad")
    with pytest.raises(BenchInputError, match="other rows"):
        merge_results([base, other_rows])
    other_set = _summary(tmp_path, "hotpot", SHARD_A, "hotpot")
    with pytest.raises(BenchInputError, match="different datasets"):
        merge_results([base, other_set])


def test_a_partial_summary_is_refused() -> None:
    text = {"dataset": "squad", "condition": "text", "n": 200, "f1": 0.1, "em": 0.0}
    partial = {"dataset": "squad", "condition": "uniform-2", "n": 150, "f1": 0.1, "em": 0.0}
    with pytest.raises(BenchInputError, match="'uniform-2' has 150 rows, text 200"):
        merge_summaries([("run", [text, partial])])


def test_the_cli_merges_summaries_and_row_files_into_a_table_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _summary(tmp_path, "base", SHARD_A, "squad")
    more = {
        "r0": {"text": _rec(1.0), "no-context": _rec(0.0)},
        "r1": {"text": _rec(0.0), "no-context": _rec(0.0)},
    }
    rows = _rows_file(tmp_path / "more.rows.jsonl", more)
    out, png = tmp_path / "merged.json", tmp_path / "merged.png"
    argv = ["bench", "quality-merge", str(base), str(rows), "--json", str(out), "--plot", str(png)]
    assert cli.main(argv) == 0
    assert [r["condition"] for r in json.loads(out.read_text())] == ["text", "uniform-4", "no-context"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "uniform-4" in capsys.readouterr().out
    assert cli.main(["bench", "quality-merge", str(rows)]) == 2
    assert "pass --dataset" in capsys.readouterr().err
