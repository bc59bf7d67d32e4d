"""Bit allocation over a distortion table: budget, optimality against brute force, monotonicity, profiles."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from qkv._allocate import (
    DEFAULT_WIDTHS,
    PROFILE_VERSION,
    SensitivityProfile,
    allocate_bits,
    width_cost,
)
from qkv._errors import CalibrationError

Table = list[dict[str, dict[int, float]]]


def _random_table(layers: int, widths: tuple[int, ...], rng: np.random.Generator, *, messy: bool) -> Table:
    """Distortion falling roughly 4x per bit, with per-tensor sensitivity; ``messy`` adds non-convex noise."""
    table: Table = []
    for _ in range(layers):
        row: dict[str, dict[int, float]] = {}
        for tensor in ("k", "v"):
            scale = float(rng.lognormal(0.0, 1.5))
            cells = {w: scale * 4.0 ** (-min(w, 10)) for w in widths}
            if messy:
                cells = {w: d * float(rng.uniform(0.3, 3.0)) for w, d in cells.items()}
            row[tensor] = cells
        table.append(row)
    return table


def _brute_force(table: Table, budget: float, widths: tuple[int, ...], group_size: int) -> float:
    items = [(layer, tensor) for layer in range(len(table)) for tensor in ("k", "v")]
    best = float("inf")
    for choice in itertools.product(widths, repeat=len(items)):
        units = sum(w * group_size + (32 if w <= 8 else 0) for w in choice)
        if units > budget * len(items) * group_size + 1e-6:
            continue
        distortion = sum(table[layer][tensor][w] for (layer, tensor), w in zip(items, choice, strict=True))
        best = min(best, distortion)
    return best


def test_width_cost_counts_scale_and_zero_per_group() -> None:
    assert width_cost(2, 32) == 3.0
    assert width_cost(2, 64) == 2.5
    assert width_cost(4, 128) == 4.25
    assert width_cost(16, 32) == 16.0
    assert width_cost(32, 32) == 32.0
    with pytest.raises(ValueError):
        width_cost(9, 32)


@pytest.mark.parametrize("messy", [False, True])
def test_matches_brute_force_within_the_reported_gap(messy: bool) -> None:
    rng = np.random.default_rng(7 if messy else 3)
    widths = (2, 3, 4, 6, 8, 16)
    exact = 0
    trials = 60
    for _ in range(trials):
        group_size = int(rng.choice([16, 32, 64]))
        table = _random_table(2, widths, rng, messy=messy)
        cheapest, dearest = width_cost(2, group_size), 16.0
        budget = float(rng.uniform(cheapest, dearest))
        allocation = allocate_bits(table, budget, group_size=group_size, widths=widths)
        optimum = _brute_force(table, budget, widths, group_size)
        assert allocation.bits_per_value <= budget + 1e-12
        assert allocation.distortion >= optimum - 1e-12
        assert allocation.distortion - optimum <= allocation.gap_bound + 1e-12 * max(1.0, optimum)
        exact += allocation.distortion <= optimum * (1 + 1e-12) + 1e-15
    # Measured: 54/60 (smooth) and 57/60 (messy) exact; the greedy prefix alone gets 51 and 53.
    assert exact >= 0.8 * trials


def test_bigger_budget_never_increases_distortion() -> None:
    rng = np.random.default_rng(11)
    for messy in (False, True):
        table = _random_table(30, DEFAULT_WIDTHS, rng, messy=messy)
        previous = float("inf")
        for budget in np.arange(3.0, 16.01, 0.05):
            allocation = allocate_bits(table, float(budget), group_size=32)
            assert allocation.bits_per_value <= budget + 1e-12
            assert allocation.distortion <= previous + 1e-15
            previous = allocation.distortion


def test_a_real_valued_budget_is_met_with_overhead_counted() -> None:
    rng = np.random.default_rng(5)
    table = _random_table(30, DEFAULT_WIDTHS, rng, messy=False)
    allocation = allocate_bits(table, 3.25, group_size=32)
    assert 3.2 <= allocation.bits_per_value <= 3.25
    chosen = [w for w in allocation.key_bits + allocation.value_bits if w is not None]
    assert len(chosen) == 60
    assert allocation.bits_per_value == pytest.approx(sum(width_cost(w, 32) for w in chosen) / 60)
    # Sensitive tensors get more bits: the most sensitive key beats the least sensitive one.
    sensitivity = [row["k"][2] for row in table]
    most, least = (
        allocation.key_bits[int(np.argmax(sensitivity))],
        allocation.key_bits[int(np.argmin(sensitivity))],
    )
    assert most is not None
    assert least is not None
    assert most > least


def test_unlimited_budget_picks_every_tensors_least_distortion() -> None:
    rng = np.random.default_rng(2)
    table = _random_table(4, DEFAULT_WIDTHS, rng, messy=True)
    allocation = allocate_bits(table, 16.0, group_size=32)
    for layer, row in enumerate(table):
        assert allocation.key_bits[layer] == min(row["k"], key=row["k"].__getitem__)
        assert allocation.value_bits[layer] == min(row["v"], key=row["v"].__getitem__)
    assert allocation.gap_bound == 0.0


def test_layer_subset_leaves_other_layers_unallocated() -> None:
    rng = np.random.default_rng(4)
    table = _random_table(6, DEFAULT_WIDTHS, rng, messy=False)
    allocation = allocate_bits(table, 4.0, layers=[1, 4])
    assert [w is None for w in allocation.key_bits] == [True, False, True, True, False, True]
    assert allocation.value_bits[4] is not None


def test_infeasible_budget_and_bad_tables_are_refused() -> None:
    rng = np.random.default_rng(6)
    table = _random_table(2, DEFAULT_WIDTHS, rng, messy=False)
    with pytest.raises(ValueError, match="cheapest"):
        allocate_bits(table, 2.9, group_size=32)
    del table[0]["v"][16]
    with pytest.raises(ValueError, match="no width 16"):
        allocate_bits(table, 4.0)
    with pytest.raises(ValueError, match="layers"):
        allocate_bits(table, 4.0, layers=[5])


def _profile(rng: np.random.Generator) -> SensitivityProfile:
    return SensitivityProfile(
        fingerprint_digest="0123456789abcdef",
        model_name="SmolLM2-135M-Instruct",
        group_size=32,
        widths=DEFAULT_WIDTHS,
        table=tuple(_random_table(3, DEFAULT_WIDTHS, rng, messy=False)),
    )


def test_profile_round_trips_through_a_file(tmp_path: Path) -> None:
    profile = _profile(np.random.default_rng(1))
    path = tmp_path / "profiles" / "smol.json"
    profile.save(path)
    loaded = SensitivityProfile.load(path, fingerprint_digest="0123456789abcdef", group_size=32)
    assert loaded == profile
    assert loaded.version == PROFILE_VERSION
    assert loaded.allocate(4.0) == profile.allocate(4.0)
    assert [p.name for p in path.parent.iterdir()] == ["smol.json"]  # no temporary file left behind


def test_profile_for_another_model_or_group_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    _profile(np.random.default_rng(1)).save(path)
    with pytest.raises(CalibrationError, match="not ffff"):
        SensitivityProfile.load(path, fingerprint_digest="ffff")
    with pytest.raises(CalibrationError, match="group size"):
        SensitivityProfile.load(path, group_size=64)


def _mutated(data: dict[str, object], path: tuple[str | int, ...], value: object) -> dict[str, object]:
    copy = json.loads(json.dumps(data))
    target = copy
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return copy  # type: ignore[no-any-return]


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("version",), 2, "version"),
        (("version",), True, "version"),
        (("version",), _DELETE, "version"),
        (("group_size",), "32", "group_size"),
        (("widths",), [2, 3, 9], "widths"),
        (("widths",), [], "widths"),
        (("model_name",), None, "strings"),
        (("table",), [], "table"),
        (("table", 0, "k", "4"), "0.1", "finite"),
        (("table", 1, "v", "16"), _DELETE, "widths"),
        (("table", 2, "q"), {}, "k and v"),
    ],
)
def test_malformed_profiles_raise_calibration_error(
    path: tuple[str | int, ...], value: object, message: str
) -> None:
    data = _profile(np.random.default_rng(1)).to_dict()
    with pytest.raises(CalibrationError, match=message):
        SensitivityProfile.from_dict(_mutated(data, path, value))


def test_non_finite_and_unreadable_profiles_raise_calibration_error(tmp_path: Path) -> None:
    text = _profile(np.random.default_rng(1)).to_json().replace('"2": ', '"2": NaN, "x": ', 1)
    with pytest.raises(CalibrationError):
        SensitivityProfile.from_json(text)
    with pytest.raises(CalibrationError, match="not JSON"):
        SensitivityProfile.from_json("{")
    with pytest.raises(CalibrationError, match="not an object"):
        SensitivityProfile.from_json("[1]")
    with pytest.raises(CalibrationError, match="cannot read"):
        SensitivityProfile.load(tmp_path / "missing.json")
