"""``edgebus bench bus`` end to end on a small card: every row is measured and printed (not timed here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.bench.bus import run_bus_bench

ROWS = ("card", "card-curve", "card-floor", "control", "control-busy", "control-busy-1gbit")


def test_every_row_is_measured_against_its_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = run_bus_bench(json_out=tmp_path / "bus.json", card_mib=4, repeats=2)
    assert tuple(r["row"] for r in rows) == ROWS
    by_row = {r["row"]: r for r in rows}
    for name in ("card", "card-curve", "card-floor"):
        assert by_row[name]["bus_gbps"] > 0
        assert by_row[name]["raw_gbps"] > 0
    for name in ("control-busy", "control-busy-1gbit"):
        busy = by_row[name]
        assert busy["count"] >= 4  # at least one request per fetch, 2 * repeats fetches
        assert 0 < busy["idle_p50_us"] <= busy["idle_p99_us"]
        assert 0 < busy["busy_p50_us"] <= busy["busy_p99_us"]
        assert busy["card_gbps"] > 0
    out = capsys.readouterr().out
    assert all(name in out for name in ROWS)
    assert (tmp_path / "bus.json").read_text().count('"row"') == len(ROWS)
