"""Rotated card coding (qkv._rotation): exact inverses, v2 cards, fp16 sinks, and that it lowers the error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv import (
    Budget,
    SensitivityProfile,
    answer_from_card,
    encode_context,
    encode_split,
    prefill_head,
    profile_sensitivity,
    split_head,
)
from qkv._calibrate import card_roundtrip, profile_filename
from qkv._card import CardMeta, EncodingPlan, decode_card, encode_card, read_card_info
from qkv._errors import CalibrationError, CardFormatError
from qkv._kv import KVSnapshot, ModelFingerprint
from qkv._rope import rotate
from qkv._rotation import check_rotation, from_code_space, hadamard, rope_table_for, to_code_space
from tests.qkv.test_card import build_card, split_card


def _fingerprint(layers: int, heads: int, dim: int) -> ModelFingerprint:
    return ModelFingerprint(
        architecture="LlamaForCausalLM", num_layers=layers, num_kv_heads=heads, head_dim=dim, rope_theta=1e4
    )


def _model_like_kv(
    layers: int, heads: int, tokens: int, dim: int, seed: int = 0, first: int = 0
) -> KVSnapshot:
    """Keys with steady outlier channels before RoPE (as trained models have); values with outliers too."""
    generator = torch.Generator().manual_seed(seed)
    fingerprint = _fingerprint(layers, heads, dim)
    positions = torch.arange(first, first + tokens)
    keys, values = [], []
    for _ in range(layers):
        pre = torch.randn(heads, tokens, dim, generator=generator)
        pre[..., 3] += 12.0
        pre[..., dim // 2 + 5] -= 9.0
        keys.append(rotate(pre, rope_table_for(fingerprint), positions))
        value = torch.randn(heads, tokens, dim, generator=generator)
        value[..., 7] *= 15.0
        values.append(value)
    return KVSnapshot(keys=tuple(keys), values=tuple(values), positions=positions, fingerprint=fingerprint)


def test_hadamard_is_orthonormal_symmetric_and_needs_a_power_of_two() -> None:
    for order in (1, 2, 8, 64, 256):
        matrix = hadamard(order)
        assert torch.allclose(matrix @ matrix, torch.eye(order), atol=1e-6)
        assert torch.equal(matrix, matrix.T)
    for order in (0, 3, 48, 96):
        with pytest.raises(ValueError, match="power-of-two"):
            hadamard(order)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        check_rotation("hadamard", head_dim=48)
    with pytest.raises(ValueError, match="rotation must be one of"):
        check_rotation("random")


@pytest.mark.parametrize("rotation", ["none", "hadamard", "hadamard-prerope"])
@pytest.mark.parametrize("kind", ["k", "v"])
def test_code_space_round_trip_is_exact(rotation: str, kind: str) -> None:
    snapshot = _model_like_kv(1, 3, 50, 64)
    x = snapshot.keys[0] if kind == "k" else snapshot.values[0]
    assert x is not None
    positions = torch.tensor([*range(10), *range(20, 60)])  # gaps, as after eviction
    rope = rope_table_for(snapshot.fingerprint)
    coded = to_code_space(x, kind=kind, rotation=check_rotation(rotation), positions=positions, rope=rope)
    back = from_code_space(
        coded, kind=kind, rotation=check_rotation(rotation), positions=positions, rope=rope
    )
    assert torch.allclose(back, x, atol=1e-4, rtol=1e-5)
    if rotation != "none":
        assert not torch.allclose(coded, x, atol=1e-2)  # it really is another space


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rotation_and_sinks_lower_the_error_of_outlier_kv(bits: int) -> None:
    """What the coding is for: on KV with outlier channels every step lowers the reconstruction error."""
    snapshot = _model_like_kv(2, 3, 96, 64, seed=bits)
    # A sink token: far larger than the rest, as position 0 is in trained models.
    keys = [k.clone() for k in snapshot.keys if k is not None]
    values = [v.clone() for v in snapshot.values if v is not None]
    for k, v in zip(keys, values, strict=True):
        k[:, 0] *= 20.0
        v[:, 0] *= 20.0
    snapshot = KVSnapshot(
        keys=tuple(keys), values=tuple(values), positions=snapshot.positions, fingerprint=snapshot.fingerprint
    )
    errors = {}
    for rotation in ("none", "hadamard", "hadamard-prerope"):
        for sinks in (0, 1):
            plan = EncodingPlan.uniform(2, bits, rotation=check_rotation(rotation))
            plan = plan.with_fp16_tokens(snapshot.positions < sinks)
            out = decode_card(encode_card(snapshot, plan)).snapshot
            errors[rotation, sinks] = (
                sum(_rms(a, b) for a, b in zip(out.keys, keys, strict=True) if a is not None),
                sum(_rms(a, b) for a, b in zip(out.values, values, strict=True) if a is not None),
            )
    for rotation in ("none", "hadamard", "hadamard-prerope"):  # a sink kept out of the groups helps all
        assert errors[rotation, 1][0] < 0.8 * errors[rotation, 0][0]
        assert errors[rotation, 1][1] < 0.8 * errors[rotation, 0][1]
    for sinks in (0, 1):  # Hadamard spreads the value outliers
        assert errors["hadamard", sinks][1] < 0.8 * errors["none", sinks][1]
    # keys: steady channels before RoPE are what key groups (along tokens) need
    assert errors["hadamard-prerope", 1][0] < 0.7 * errors["hadamard", 1][0]
    assert errors["hadamard-prerope", 1][0] < 0.7 * errors["none", 1][0]
    k_none, v_none = errors["none", 0]
    k_best, v_best = errors["hadamard-prerope", 1]
    assert k_best < 0.5 * k_none, errors
    assert v_best < 0.6 * v_none, errors


@settings(max_examples=40, deadline=None)
@given(
    layers=st.integers(1, 2),
    heads=st.integers(1, 3),
    tokens=st.integers(1, 70),
    log_dim=st.integers(1, 6),
    bits=st.sampled_from([1, 2, 3, 4, 8, 16, 32]),
    group_size=st.integers(1, 40),
    sinks=st.integers(0, 3),
    first=st.integers(0, 5),
    rotation=st.sampled_from(["hadamard", "hadamard-prerope"]),
    seed=st.integers(0, 2**31),
)
def test_rotated_round_trip_error_is_the_code_space_error(
    layers: int,
    heads: int,
    tokens: int,
    log_dim: int,
    bits: int,
    group_size: int,
    sinks: int,
    first: int,
    rotation: str,
    seed: int,
) -> None:
    """An orthogonal transform keeps each token's error norm: the decoded error per (head, token) row
    equals the code-space quantization error of that row, which min-max quantization bounds."""
    dim = 1 << log_dim
    snapshot = _model_like_kv(layers, heads, tokens, dim, seed=seed, first=first) if dim > 32 else None
    if snapshot is None:
        generator = torch.Generator().manual_seed(seed)
        snapshot = KVSnapshot(
            keys=tuple(torch.randn(heads, tokens, dim, generator=generator) for _ in range(layers)),
            values=tuple(torch.randn(heads, tokens, dim, generator=generator) * 3 for _ in range(layers)),
            positions=torch.arange(first, first + tokens),
            fingerprint=_fingerprint(layers, heads, dim),
        )
    plan = EncodingPlan.uniform(layers, bits, group_size=group_size, rotation=check_rotation(rotation))
    plan = plan.with_fp16_tokens(snapshot.positions < sinks)
    data = encode_card(snapshot, plan, meta=CardMeta(created=0.0))
    info = read_card_info(data)
    assert info.version == (2, 0)
    assert info.rotation == rotation
    out = decode_card(data, expect=snapshot.fingerprint).snapshot
    sink_rows = snapshot.positions < sinks
    for kind, originals, results in (("k", snapshot.keys, out.keys), ("v", snapshot.values, out.values)):
        for original, result in zip(originals, results, strict=True):
            assert original is not None
            assert result is not None
            if bits == 32:
                assert torch.allclose(result, original)  # raw blocks are never transformed
                continue
            if bits == 16 or bool(sink_rows.all()):
                assert torch.equal(result, original.half().float())
                continue
            # fp16 sinks are exact in fp16, outside the groups
            assert torch.equal(result[:, sink_rows], original[:, sink_rows].half().float())
            rest = ~sink_rows
            expected = card_roundtrip(
                original,
                bits,
                kind=kind,
                group_size=group_size,
                rotation=check_rotation(rotation),
                fp16_sinks=sinks,
                positions=snapshot.positions,
                rope=rope_table_for(snapshot.fingerprint),
            )
            # The calibration's round trip is the card's round trip.
            assert torch.allclose(result, expected, atol=1e-4, rtol=1e-4)
            coded = to_code_space(
                original[:, rest],
                kind=kind,
                rotation=check_rotation(rotation),
                positions=snapshot.positions[rest],
                rope=rope_table_for(snapshot.fingerprint),
            )
            span = (coded.amax() - coded.amin()).item()
            row_error = (result[:, rest] - original[:, rest]).norm(dim=-1)
            # per element at most half a step of the widest group: (span / (2**bits - 1)) / 2
            bound = dim**0.5 * (span / ((1 << bits) - 1) / 2 * 1.01 + 1e-4)
            assert bool((row_error <= bound).all())


def test_the_rotation_is_part_of_what_the_card_means() -> None:
    """Rewriting a v2 card's rotation (with a valid digest) changes what it decodes to: the key is read."""
    snapshot = _model_like_kv(1, 2, 40, 64)
    data = encode_card(snapshot, EncodingPlan.uniform(1, 4, rotation="hadamard-prerope"))
    _, metadata, payload = split_card(data)
    assert metadata["rotation"] == "hadamard-prerope"
    other = build_card({**metadata, "rotation": "hadamard"}, payload, major=2)
    right = decode_card(data).snapshot
    wrong = decode_card(other).snapshot
    assert right.keys[0] is not None
    assert wrong.keys[0] is not None
    assert _rms(right.keys[0], snapshot.keys[0]) * 5 < _rms(wrong.keys[0], snapshot.keys[0])
    assert right.values[0] is not None
    assert wrong.values[0] is not None
    assert torch.allclose(right.values[0], wrong.values[0])  # values are rotated the same in both


def test_unrotated_cards_stay_version_1() -> None:
    snapshot = _model_like_kv(1, 1, 8, 16)
    data = encode_card(snapshot, EncodingPlan.uniform(1, 4).with_fp16_tokens(snapshot.positions < 1))
    info = read_card_info(data)
    assert info.version == (1, 0)
    assert info.rotation == "none"
    assert "rotation" not in split_card(data)[1]


def test_encode_refuses_a_rotation_the_head_dim_cannot_take() -> None:
    snapshot = KVSnapshot(
        keys=(torch.randn(1, 4, 12),),
        values=(torch.randn(1, 4, 12),),
        positions=torch.arange(4),
        fingerprint=_fingerprint(1, 1, 12),
    )
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        encode_card(snapshot, EncodingPlan.uniform(1, 4, rotation="hadamard"))


def test_budget_records_the_coding_only_when_used() -> None:
    assert "rotation" not in Budget().to_dict()
    assert "fp16_sinks" not in Budget().to_dict()
    budget = Budget(bits=3.5, adaptive=True, rotation="hadamard-prerope", fp16_sinks=1)
    data = budget.to_dict()
    assert data["rotation"] == "hadamard-prerope"
    assert data["fp16_sinks"] == 1
    assert Budget.from_dict(data) == budget
    with pytest.raises(ValueError, match="rotation must be one of"):
        Budget(rotation="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fp16_sinks"):
        Budget(fp16_sinks=-1)


def _profile(**coding: object) -> SensitivityProfile:
    table = tuple({"k": {2: 1.0, 4: 0.1}, "v": {2: 1.0, 4: 0.1}} for _ in range(2))
    return SensitivityProfile(
        fingerprint_digest="ab" * 8,
        model_name="m",
        group_size=32,
        widths=(2, 4),
        table=table,
        **coding,  # type: ignore[arg-type]
    )


def test_profiles_name_and_check_the_coding_they_were_measured_with() -> None:
    plain = _profile()
    assert "rotation" not in plain.to_dict()  # files of the old coding keep their exact keys
    coded = _profile(rotation="hadamard-prerope", fp16_sinks=1)
    again = SensitivityProfile.from_json(coded.to_json())
    assert (again.rotation, again.fp16_sinks) == ("hadamard-prerope", 1)
    coded.require(group_size=32, rotation="hadamard-prerope", fp16_sinks=1)
    with pytest.raises(CalibrationError, match="rotation"):
        plain.require(rotation="hadamard-prerope")
    with pytest.raises(CalibrationError, match="fp16 sink"):
        coded.require(fp16_sinks=0)
    assert profile_filename("m", 32) == "m-g32.json"
    assert profile_filename("m", 32, "hadamard-prerope", 1) == "m-g32-hadamard-prerope-s1.json"
    with pytest.raises(CalibrationError, match="rotation"):
        SensitivityProfile.from_dict({**coded.to_dict(), "rotation": "spin"})


def test_a_v1_reader_could_not_mistake_a_rotated_card() -> None:
    """The major version is what keeps a reader that predates rotation from decoding rotated codes."""
    snapshot = _model_like_kv(1, 1, 8, 16)
    data = encode_card(snapshot, EncodingPlan.uniform(1, 4, rotation="hadamard"))
    assert data[4] == 2
    _, metadata, payload = split_card(data)
    with pytest.raises(CardFormatError, match="rotation of a v2 card"):
        read_card_info(build_card({**metadata, "rotation": "none"}, payload, major=2))


# ---------------------------------------------------------------------------------------------- pipeline

CONTEXT = (
    "Super Bowl 50 was an American football game to determine the champion of the National Football "
    "League for the 2015 season. The Denver Broncos defeated the Carolina Panthers."
)
QUESTION = "Which team won Super Bowl 50?"
CODED = {"rotation": "hadamard-prerope", "fp16_sinks": 1}


def test_a_budget_with_the_coding_makes_a_v2_card_with_an_fp16_sink_that_answers(tiny_lm) -> None:  # type: ignore[no-untyped-def]
    card = encode_context(tiny_lm, CONTEXT, Budget(bits=32, **CODED))  # type: ignore[arg-type]
    raw = encode_context(tiny_lm, CONTEXT, Budget(bits=32))
    # raw widths are never transformed, and the sink keeps its raw width: the same answer as raw
    coded_answer = answer_from_card(tiny_lm, card.data, QUESTION, max_new_tokens=6).generation
    raw_answer = answer_from_card(tiny_lm, raw.data, QUESTION, max_new_tokens=6).generation
    assert coded_answer.token_ids == raw_answer.token_ids
    four = encode_context(tiny_lm, CONTEXT, Budget(bits=4, **CODED))  # type: ignore[arg-type]
    info = read_card_info(four.data)
    assert info.version == (2, 0)
    assert info.rotation == "hadamard-prerope"
    assert info.num_classes == 2
    assert all(row == (4, 16) for row in info.key_bits)
    assert info.meta.budget["fp16_sinks"] == 1
    answer_from_card(tiny_lm, four.data, QUESTION, max_new_tokens=4)
    # A split card's tail starts after the head: no sink in it, still rotated.
    split = encode_split(tiny_lm, CONTEXT, Budget(bits=4, **CODED), head_tokens=100)  # type: ignore[arg-type]
    tail = read_card_info(split.data)
    assert tail.num_classes == 1
    assert tail.rotation == "hadamard-prerope"
    head = prefill_head(tiny_lm, split_head(decode_card(split.data)))  # type: ignore[arg-type]
    answer_from_card(tiny_lm, split.data, QUESTION, head=head, max_new_tokens=4)


def test_an_adaptive_coded_budget_needs_a_profile_of_its_coding_and_pays_for_the_sink(tiny_lm) -> None:  # type: ignore[no-untyped-def]
    budget = Budget(bits=3.0 + 32 / 8, adaptive=True, group_size=8, **CODED)  # type: ignore[arg-type]
    with pytest.raises(CalibrationError, match="--rotation hadamard-prerope --fp16-sinks 1"):
        encode_context(tiny_lm, CONTEXT, budget)
    items = [(CONTEXT, QUESTION, "The Denver Broncos")]
    plain = profile_sensitivity(tiny_lm, items, widths=(2, 3, 4, 8), group_size=8, progress=False)
    with pytest.raises(CalibrationError, match="rotation"):
        encode_context(tiny_lm, CONTEXT, budget, profile=plain)
    coded = profile_sensitivity(
        tiny_lm,
        items,
        widths=(2, 3, 4, 8),
        group_size=8,
        progress=False,
        **CODED,  # type: ignore[arg-type]
    )
    card = encode_context(tiny_lm, CONTEXT, budget, profile=coded)
    uniform = encode_context(tiny_lm, CONTEXT, Budget(bits=3, group_size=8))
    # The fp16 sink is paid out of the same bytes: no larger than uniform-3 (metadata aside).
    assert card.card_bytes <= uniform.card_bytes + 256
    info = read_card_info(card.data)
    assert info.num_classes == 2
    assert {row[1] for row in info.key_bits} == {16}
