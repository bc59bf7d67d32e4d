"""`edgebus bench policy`'s arithmetic: predicted transfers for the cap, and the per-cell summary."""

from __future__ import annotations

from typing import Any

import pytest

from edgebus import RateQualityPoint
from nodes import cli
from nodes.bench.policy import _cell, _median_run, predicted_wire_bytes, summarise


def _point(bits: float, bytes_per_token: float, quality: float) -> RateQualityPoint:
    return RateQualityPoint(
        representation="card", bits=bits, keep=1.0, layers=1.0, bytes_per_token=bytes_per_token,
        quality=quality, condition=f"kv-{bits:g}",
    )  # fmt: skip


POINTS = {"kv-4": _point(4, 7_000.0, 0.98), "kv-8": _point(8, 13_000.0, 0.999)}


def test_predicted_bytes_come_from_the_table() -> None:
    assert predicted_wire_bytes("card-4", 1000, 4000, POINTS) == 7_000_000
    assert predicted_wire_bytes("evicted-4-0.5", 1000, 4000, POINTS) == 3_500_000
    assert predicted_wire_bytes("text", 1000, 4000, POINTS) == 4000
    # Not in this table: scaled from the nearest plain width (one bit per value of scales on top).
    assert predicted_wire_bytes("card-2", 1000, 4000, POINTS) == pytest.approx(7_000_000 * 3 / 5)
    assert predicted_wire_bytes("card-2", 1000, 4000, {}) is None  # nothing to scale: never capped
    assert predicted_wire_bytes("split-4", 1000, 4000, POINTS) is None


def run(alternative: str, ttft: float | None, quality: float | None, **extra: Any) -> dict[str, Any]:
    return {"link_mbit": 10.0, "tokens": 1024, "alternative": alternative, "ttft_s": ttft,
            "quality": quality, "capped": ttft is None, **extra}  # fmt: skip


def test_summary_compares_the_policy_with_the_best_runs() -> None:
    decision = {"representation": "card", "bits": 3.0, "predicted_quality": 0.93, "bandwidth": "measured"}
    rows = [
        run("policy", 2.2, 0.93, decision=decision),
        run("text", 9.0, 1.0),
        run("card-4", 2.5, 0.98),
        run("card-2", 2.0, 0.54),  # fastest, but under the floor
        run("card-8", None, 0.9999, predicted_transfer_s=120.0),
    ]
    (cell,) = summarise(rows, floor=0.9)
    assert cell["policy_choice"] == "card-3"
    assert (cell["best"], cell["best_at_floor"]) == ("card-2", "card-4")
    assert cell["policy_vs_best"] == pytest.approx(1.1)
    assert cell["policy_vs_best_at_floor"] == pytest.approx(0.88)
    assert cell["policy_quality"] == 0.93
    assert _cell(rows[-1])["ttft_s"] == "> cap (120 s transfer)"


def test_unknown_alternative_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "policy", "--alternatives", "card-4,carrier-pigeon"]) == cli.EXIT_USER_ERROR
    assert "carrier-pigeon" in capsys.readouterr().err


def test_repeated_runs_report_the_median_run_whole() -> None:
    runs = [run("card-4", 0.5, 0.98, answer="a"), run("card-4", 0.3, 0.98, answer="b"),
            run("card-4", 0.4, 0.98, answer="c")]  # fmt: skip
    median = _median_run(runs)
    assert (median["ttft_s"], median["answer"]) == (0.4, "c")  # one run's fields, not a mix of runs
    assert median["ttft_runs_s"] == [0.5, 0.3, 0.4]
    assert _median_run(runs[:2])["ttft_s"] == 0.3  # an even count takes the lower middle
    capped = run("card-8", None, 0.9999, predicted_transfer_s=120.0)
    assert _median_run([capped]) is capped


def test_repeats_below_one_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "policy", "--repeats", "0"]) == cli.EXIT_USER_ERROR
    assert "--repeats" in capsys.readouterr().err
