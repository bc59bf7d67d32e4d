"""Sensitivity calibration, tiny model: card-exact perturbation, batching, shape, sensitivity, lookup."""

from __future__ import annotations

import copy
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nodes.bench.calibrate_cli import calibration_items, run_calibrate
from qkv._allocate import SensitivityProfile, width_cost
from qkv._calibrate import (
    SHIPPED_PROFILES,
    _variant_logprobs,
    _with_tensor,
    allocation_distortion,
    card_roundtrip,
    default_profile,
    predicted_distortion,
    profile_filename,
    profile_sensitivity,
    profiles_dir,
)
from qkv._card import EncodingPlan, decode_card, encode_card
from qkv._errors import CalibrationError
from qkv._hf import answer_logprobs, prefill
from qkv._rotation import rope_table_for

ITEMS = (
    ("The Broncos beat the Panthers 24-10 in Santa Clara.", "Who won?", "The Broncos"),
    ("Ada Lovelace wrote the first program for the Analytical Engine.", "Who wrote it?", "Ada Lovelace"),
    ("The river Rhine flows from the Alps to the North Sea.", "Where does it end?", "the North Sea"),
)
WIDTHS = (2, 4, 8, 16, 32)


@pytest.fixture(scope="module")
def profile(tiny_lm):
    return profile_sensitivity(tiny_lm, ITEMS, widths=WIDTHS, group_size=8, progress=False)


def _snapshot(lm):
    parts = lm.template.split(lm.tokenizer, ITEMS[0][0], ITEMS[0][1])
    return parts, prefill(lm, parts.prefix_ids)


def _tensor_pairs(snapshot, decoded):
    """``(kind, original, decoded)`` for every layer's K and V (all present)."""
    for layer in range(snapshot.num_layers):
        for kind, ours, theirs in (
            ("k", snapshot.keys[layer], decoded.keys[layer]),
            ("v", snapshot.values[layer], decoded.values[layer]),
        ):
            assert ours is not None
            assert theirs is not None
            yield kind, ours, theirs


@pytest.mark.parametrize("width", [2, 3, 5, 8, 16, 32])
def test_card_roundtrip_is_what_a_card_gives_back(tiny_lm, width):
    _, snapshot = _snapshot(tiny_lm)
    layers = snapshot.num_layers
    plan = EncodingPlan(key_bits=(width,) * layers, value_bits=(width,) * layers, group_size=8)
    decoded = decode_card(encode_card(snapshot, plan)).snapshot
    for kind, ours, theirs in _tensor_pairs(snapshot, decoded):
        assert torch.equal(card_roundtrip(ours, width, kind=kind, group_size=8), theirs)


@pytest.mark.parametrize("width", [2, 4])
def test_card_roundtrip_of_a_rotated_coding_is_what_such_a_card_gives_back(tiny_lm, width):
    _, snapshot = _snapshot(tiny_lm)
    layers = snapshot.num_layers
    plan = EncodingPlan.uniform(layers, width, group_size=8, rotation="hadamard-prerope")
    plan = plan.with_fp16_tokens(snapshot.positions < 1)
    decoded = decode_card(encode_card(snapshot, plan)).snapshot
    rope = rope_table_for(snapshot.fingerprint)
    for kind, ours, theirs in _tensor_pairs(snapshot, decoded):
        mine = card_roundtrip(
            ours, width, kind=kind, group_size=8, rotation="hadamard-prerope", fp16_sinks=1, rope=rope
        )
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(mine, card_roundtrip(ours, width, kind=kind, group_size=8))


def test_a_profile_measures_the_coding_it_names(tiny_lm, profile):
    coded = profile_sensitivity(
        tiny_lm, ITEMS, widths=WIDTHS, group_size=8, progress=False, rotation="hadamard-prerope", fp16_sinks=1
    )
    assert (coded.rotation, coded.fp16_sinks) == ("hadamard-prerope", 1)
    assert SensitivityProfile.from_json(coded.to_json()) == coded
    assert coded.table != profile.table  # the cells are measured on the rotated coding, not copied
    for row in coded.table:
        assert row["k"][32] == 0.0
        assert row["k"][2] > row["k"][8]


def test_batched_variants_agree_with_one_forward_each(tiny_lm):
    parts, snapshot = _snapshot(tiny_lm)
    target = tiny_lm.tokenizer.encode(ITEMS[0][2], add_special_tokens=False)
    variants = []
    for layer, kind, width in ((0, "k", 2), (1, "v", 3), (2, "k", 16), (1, "v", 2)):
        source = (snapshot.keys if kind == "k" else snapshot.values)[layer]
        variants.append((layer, kind, card_roundtrip(source, width, kind=kind, group_size=8)))
    batched = _variant_logprobs(tiny_lm, snapshot, variants, parts.suffix_ids, target)
    assert batched.shape == (len(variants), len(target), len(tiny_lm.tokenizer))
    for row, (layer, kind, tensor) in enumerate(variants):
        single = answer_logprobs(
            tiny_lm, _with_tensor(snapshot, layer, kind, tensor), parts.suffix_ids, target
        )
        torch.testing.assert_close(batched[row], single, atol=1e-4, rtol=0)
    # The perturbations are real: a 2-bit variant moves the distribution.
    lossless = answer_logprobs(tiny_lm, snapshot, parts.suffix_ids, target)
    assert (batched[0] - lossless).abs().max() > 1e-3


def test_profile_shape_and_metadata(tiny_lm, profile):
    assert profile.model_name == tiny_lm.name
    assert profile.fingerprint_digest == tiny_lm.fingerprint.digest
    assert profile.group_size == 8
    assert profile.widths == WIDTHS
    assert len(profile.table) == tiny_lm.fingerprint.num_layers
    for row in profile.table:
        assert set(row) == {"k", "v"}
        for kind in ("k", "v"):
            assert set(row[kind]) == set(WIDTHS)
            assert row[kind][32] == 0.0  # raw is the snapshot itself
            assert row[kind][2] > row[kind][8] >= -1e-6
    # It survives its own JSON round trip.
    assert SensitivityProfile.from_json(profile.to_json()).table == profile.table


def test_profile_is_deterministic(tiny_lm, profile):
    again = profile_sensitivity(tiny_lm, ITEMS, widths=WIDTHS, group_size=8, progress=False)
    assert again.table == profile.table


def test_sparse_widths_are_means_over_their_items(tiny_lm, profile):
    sparse = profile_sensitivity(
        tiny_lm, ITEMS, widths=WIDTHS, group_size=8, progress=False, sparse_widths=(16,), sparse_items=1
    )
    first = profile_sensitivity(tiny_lm, ITEMS[:1], widths=(16,), group_size=8, progress=False)
    for layer, row in enumerate(sparse.table):
        assert row["k"][2] == pytest.approx(profile.table[layer]["k"][2], rel=1e-6)
        assert row["v"][16] == pytest.approx(first.table[layer]["v"][16], rel=1e-6, abs=1e-12)


def _with_value_outlier(lm, layer: int, factor: float):  # type: ignore[no-untyped-def]
    """The same function, but channel 0 of KV head 0's values is ``factor`` times larger in the cache.

    o_proj's matching input columns shrink by ``factor``, so the lossless model computes the same thing;
    per-token value groups now span the outlier, so quantization crushes the other channels.
    """
    model = copy.deepcopy(lm.model)
    attention = model.model.layers[layer].self_attn
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    head_dim = model.config.head_dim
    with torch.no_grad():
        attention.v_proj.weight[0] *= factor
        for query_head in range(group):  # the query heads that read KV head 0
            attention.o_proj.weight[:, query_head * head_dim] /= factor
    return replace(lm, model=model)


def test_a_tensor_that_quantizes_worse_gets_a_larger_distortion(tiny_lm, profile):
    outlier_lm = _with_value_outlier(tiny_lm, layer=1, factor=30.0)
    parts, snapshot = _snapshot(tiny_lm)
    target = tiny_lm.tokenizer.encode(ITEMS[0][2], add_special_tokens=False)
    torch.testing.assert_close(
        answer_logprobs(outlier_lm, prefill(outlier_lm, parts.prefix_ids), parts.suffix_ids, target),
        answer_logprobs(tiny_lm, snapshot, parts.suffix_ids, target),
        atol=1e-4,
        rtol=0,
    )
    outlier = profile_sensitivity(outlier_lm, ITEMS, widths=WIDTHS, group_size=8, progress=False)
    assert outlier.table[1]["v"][2] > 10 * profile.table[1]["v"][2]
    assert outlier.table[1]["v"][4] > 10 * profile.table[1]["v"][4]
    # Untouched tensors measure (nearly) the same: the change is where the outlier is.
    assert outlier.table[0]["v"][2] == pytest.approx(profile.table[0]["v"][2], rel=1e-2)
    assert outlier.table[2]["k"][2] == pytest.approx(profile.table[2]["k"][2], rel=1e-2)


@pytest.mark.parametrize("code_bits", [2.0, 2.25, 3.0, 4.0, 5.5])
def test_allocation_from_a_profile_stays_within_budget(profile, code_bits):
    budget = code_bits + 32 / profile.group_size
    allocation = profile.allocate(budget)
    assert allocation.bits_per_value <= budget + 1e-9
    assert allocation_distortion(profile, allocation) == pytest.approx(allocation.distortion)
    uniform = int(code_bits)
    if code_bits == uniform and uniform in profile.widths:
        # Uniform widths are one feasible choice, so the allocation can only do better (within its bound).
        layers = len(profile.table)
        uniform_distortion = predicted_distortion(profile, (uniform,) * layers, (uniform,) * layers)
        assert allocation.distortion <= uniform_distortion + allocation.gap_bound + 1e-12


def test_predicted_distortion_skips_unsent_layers_and_checks_widths(profile):
    layers = len(profile.table)
    full = predicted_distortion(profile, (2,) * layers, (4,) * layers)
    without_first = predicted_distortion(profile, (None, *(2,) * (layers - 1)), (0, *(4,) * (layers - 1)))
    assert full - without_first == pytest.approx(profile.table[0]["k"][2] + profile.table[0]["v"][4])
    with pytest.raises(ValueError, match="no width 3"):
        predicted_distortion(profile, (3,) * layers, (4,) * layers)
    with pytest.raises(ValueError, match="key and value widths"):
        predicted_distortion(profile, (2,), (2,))


def test_bad_calibration_input_is_refused(tiny_lm):
    with pytest.raises(ValueError, match="no calibration items"):
        profile_sensitivity(tiny_lm, [], progress=False)
    with pytest.raises(ValueError, match="width 9"):
        profile_sensitivity(tiny_lm, ITEMS, widths=(2, 9), progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        profile_sensitivity(tiny_lm, [("context", "question", "")], widths=(2,), progress=False)


def test_default_profile_finds_the_one_for_this_model(tiny_lm, profile, tmp_path):
    assert default_profile(tiny_lm, 8, home=tmp_path) is None
    directory = profiles_dir(tmp_path)
    # Another model's profile with the conventional name pattern is passed over.
    replace(profile, fingerprint_digest="0" * 16, model_name="other").save(directory / "other-g8.json")
    assert default_profile(tiny_lm, 8, home=tmp_path) is None
    profile.save(directory / profile_filename(tiny_lm.name, 8))
    found = default_profile(tiny_lm, 8, home=tmp_path)
    assert found is not None
    assert found.table == profile.table
    assert default_profile(tiny_lm, 32, home=tmp_path) is None  # measured at another group size
    # A broken file on the way to a match is an error that names it, not something to step over.
    # A profile of another card coding (rotation, fp16 sinks) is found only for that coding.
    coded = replace(profile, rotation="hadamard-prerope", fp16_sinks=1)
    coded.save(directory / profile_filename(tiny_lm.name, 8, "hadamard-prerope", 1))
    assert default_profile(tiny_lm, 8, home=tmp_path) == found
    assert default_profile(tiny_lm, 8, home=tmp_path, rotation="hadamard-prerope", fp16_sinks=1) == coded
    assert default_profile(tiny_lm, 8, home=tmp_path, rotation="hadamard") is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "broken-g8.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="not JSON"):
        default_profile(tiny_lm, 8, search=[broken, directory])


def test_shipped_profiles_are_valid():
    # Rate-quality tables (``*-rq.json``) ship beside the sensitivity profiles (``*-g<group>.json``).
    shipped = sorted(SHIPPED_PROFILES.glob("*-g[0-9]*.json"))
    assert shipped, f"no profile ships in {SHIPPED_PROFILES}"
    for path in shipped:
        profile = SensitivityProfile.load(path)
        assert path.name == profile_filename(
            profile.model_name, profile.group_size, profile.rotation, profile.fp16_sinks
        )
        for budget_bits in (3.0, 4.0):
            allocation = profile.allocate(budget_bits + 32 / profile.group_size)
            assert allocation.bits_per_value <= budget_bits + 32 / profile.group_size + 1e-9


def _write_rows(path: Path, rows: int) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for index in range(rows):
            context, question, answer = ITEMS[(index // 2) % len(ITEMS)]
            # Two questions per paragraph, as in SQuAD; the paragraph changes every two rows.
            row = {"id": str(index), "context": f"{context} ({index // 2})", "question": question}
            handle.write(json.dumps({**row, "answers": [answer], "source": "test"}) + "\n")
    return path


def test_calibration_items_skip_benchmark_rows_and_repeated_contexts(tmp_path):
    data = _write_rows(tmp_path / "qa.jsonl", 220)
    with pytest.raises(ValueError, match="overlaps the benchmark rows"):
        calibration_items(data, rows=2, offset=0)
    items = calibration_items(data, rows=3, offset=200)
    assert [item[0].rsplit("(", 1)[1] for item in items] == ["100)", "101)", "102)"]
    with pytest.raises(ValueError, match="distinct contexts"):
        calibration_items(data, rows=50, offset=200)


def test_run_calibrate_writes_a_profile_that_default_profile_finds(tiny_lm, tiny_model_dir, tmp_path):
    data = _write_rows(tmp_path / "qa.jsonl", 206)
    out = tmp_path / "profiles" / profile_filename(tiny_lm.name, 8)
    report = io.StringIO()
    written = run_calibrate(
        str(tiny_model_dir), data, rows=2, offset=200, out=out, group_size=8, progress=False, stream=report
    )
    assert written == out
    saved = SensitivityProfile.load(out, fingerprint_digest=tiny_lm.fingerprint.digest, group_size=8)
    assert len(saved.table) == tiny_lm.fingerprint.num_layers
    assert "= uniform-3" in report.getvalue()
    assert "= uniform-4" in report.getvalue()
    assert default_profile(tiny_lm, 8, search=[out.parent]) == saved
    assert width_cost(3, 8) == 7.0  # the summary's budgets: code bits plus 32/G of fp16 scale and zero
