"""The shipped rate-quality table is what `edgebus policy table` makes from the quality results."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from edgebus import RateQualityTable
from nodes import cli
from nodes.bench.rate_quality import build_table, pareto, point_from_row, shipped_table_path

REPO = Path(__file__).resolve().parents[2]
SQUAD = REPO / "docs" / "results" / "quality_squad_issue2.json"
KV = 23_040


def result_files(table: RateQualityTable) -> list[Path]:
    """The result files a table names as its source (``name.json (dataset)``, comma-separated)."""
    return [REPO / "docs" / "results" / name for name in re.findall(r"([\w.-]+\.json) \(", table.source)]


def test_the_shipped_table_is_generated_from_the_squad_results_not_typed() -> None:
    shipped = RateQualityTable.load(shipped_table_path("smollm2-135m-instruct"))
    # The table names the result files it was made from; made again from them, it is the same table.
    sources = result_files(shipped)
    assert SQUAD in sources
    table, pruned = build_table(sources, model="smollm2-135m-instruct", kv_bytes_per_token=KV)
    assert shipped == table
    assert table.dominated == tuple(pruned)
    assert "kv-raw" in [p.condition for p in pruned]  # fp16's quality at twice its bytes


def test_points_follow_the_quality_rows() -> None:
    rows = {r["condition"]: r for r in json.loads(SQUAD.read_text())}
    p4 = point_from_row(rows["kv-4"], kv_bytes_per_token=KV)
    assert p4 is not None
    assert p4.quality == round(math.exp(-rows["kv-4"]["kl_vs_text"]), 4)
    assert p4.bytes_per_token == pytest.approx(KV / rows["kv-4"]["ratio"], rel=1e-4)
    assert (p4.bits, p4.keep, p4.condition) == (4.0, 1.0, "kv-4")
    assert point_from_row(rows["text"], kv_bytes_per_token=KV) is None
    assert point_from_row(rows["no-context"], kv_bytes_per_token=KV) is None
    points = [point_from_row(rows[c], kv_bytes_per_token=KV) for c in ("kv-8", "kv-4", "kv-3", "kv-2")]
    qualities = [p.quality for p in points if p is not None]
    assert qualities == sorted(qualities, reverse=True)  # the metric orders the widths
    assert len(qualities) == 4


def test_more_results_add_rows_and_the_larger_run_of_a_condition_wins(tmp_path: Path) -> None:
    extra = [
        {"dataset": "hotpot", "condition": "uniform-4+evict-0.5", "n": 32, "kl_vs_text": 0.2,
         "card_bytes": 1.0, "fp16_bytes": 6.0},
        {"dataset": "hotpot", "condition": "kv-4", "n": 20, "kl_vs_text": 9.0, "card_bytes": 1.0,
         "fp16_bytes": 3.0},
    ]  # fmt: skip
    path = tmp_path / "more.json"
    path.write_text(json.dumps(extra))
    table, _ = build_table([SQUAD, path], model="m", kv_bytes_per_token=KV)
    by_condition = {p.condition: p for p in table.points}
    assert by_condition["uniform-4+evict-0.5"].keep == 0.5
    assert by_condition["kv-4"].quality > 0.9  # the 200-row SQuAD run, not the 20-row one
    assert "more.json" in table.source


def test_conditions_a_node_cannot_make_and_second_names_stay_out(tmp_path: Path) -> None:
    rows = [
        {"condition": "kv-4", "n": 200, "kl_vs_text": 0.016, "card_bytes": 1.0, "fp16_bytes": 3.0},
        {"condition": "uniform-4", "n": 200, "kl_vs_text": 0.016, "card_bytes": 1.0, "fp16_bytes": 3.0},
        {"condition": "uniform-4+evict-0.25+reread", "n": 200, "kl_vs_text": 1.2, "card_bytes": 0.3,
         "fp16_bytes": 3.0},
        {"condition": "uniform-4+evict-0.25", "n": 200, "kl_vs_text": 1.3, "card_bytes": 0.3,
         "fp16_bytes": 3.0},
    ]  # fmt: skip
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    table, pruned = build_table([path], model="m", kv_bytes_per_token=KV)
    cards = [p.condition for p in table.points if p.representation == "card"]
    # +reread needs a second prefill only the benchmark does; uniform-4 is kv-4 under another name.
    assert cards == ["kv-4", "uniform-4+evict-0.25"]
    assert [p.condition for p in pruned] == ["uniform-4"]


def test_pareto_drops_only_dominated_points() -> None:
    table, _ = build_table([SQUAD], model="m", kv_bytes_per_token=KV)
    cards = [p for p in table.points if p.representation == "card"]
    assert pareto(cards) == cards


def test_a_rotated_point_never_prunes_an_unrotated_one(tmp_path: Path) -> None:
    rows = [
        {"condition": "kv-3", "n": 200, "kl_vs_text": 0.07, "card_bytes": 1.0, "fp16_bytes": 4.0},
        {"condition": "uniform-3+rot+s1", "n": 200, "kl_vs_text": 0.03, "card_bytes": 0.99,
         "fp16_bytes": 4.0},
        {"condition": "uniform-4+rot+s1", "n": 200, "kl_vs_text": 0.01, "card_bytes": 1.2, "fp16_bytes": 4.0},
        {"condition": "kv-4", "n": 200, "kl_vs_text": 0.02, "card_bytes": 1.3, "fp16_bytes": 4.0},
        {"condition": "uniform-4+hrot", "n": 200, "kl_vs_text": 0.012, "card_bytes": 1.25, "fp16_bytes": 4.0},
    ]  # fmt: skip
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    table, pruned = build_table([path], model="m", kv_bytes_per_token=KV)
    rotated = {p.condition: p.rotated for p in table.points if p.representation == "card"}
    # kv-3 is bigger and worse than the rotated 3-bit card, but decodes faster: both stay. kv-4 loses to
    # nothing unrotated; the rotated uniform-4+hrot loses to the smaller, better rotated uniform-4+rot+s1.
    assert rotated == {"kv-4": False, "uniform-4+rot+s1": True, "kv-3": False, "uniform-3+rot+s1": True}
    assert [(p.condition, p.rotated) for p in pruned] == [("uniform-4+hrot", True)]
    assert RateQualityTable.from_json(table.to_json()) == table


def test_one_command_regenerates_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rq.json"
    shipped = RateQualityTable.load(shipped_table_path("smollm2-135m-instruct"))
    sources = result_files(shipped)
    argv = ["policy", "table", "--kv-bytes-per-token", str(KV), "--out", str(out)]
    for path in sources:
        argv += ["--from", str(path)]
    assert cli.main(argv) == 0
    assert RateQualityTable.load(out) == shipped
    printed = capsys.readouterr().out
    assert "kv-raw" in printed
    assert "exp(-kl_vs_text)" in printed


def test_results_without_kl_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "f1only.json"
    path.write_text(json.dumps([{"condition": "kv-4", "n": 5, "f1": 0.1, "card_bytes": 1, "fp16_bytes": 3}]))
    with pytest.raises(ValueError, match="--kl"):
        build_table([path], model="m", kv_bytes_per_token=KV)
