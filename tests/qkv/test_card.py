"""CacheCard v1: golden bytes, round trips, and every way received bytes can be wrong.

The golden card is rebuilt from integer arithmetic only (no RNG, no transcendental functions) so that its
bytes do not depend on the torch version. After a deliberate format change, regenerate it with
``python -m tests.qkv.test_card`` and explain the change in the commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv._card import (
    HEADER_SIZE,
    MAX_TOKENS,
    CardMeta,
    EncodingPlan,
    decode_card,
    encode_card,
    read_card_info,
)
from qkv._errors import CardCompatError, CardDigestError, CardError, CardFormatError
from qkv._kv import KVSnapshot, ModelFingerprint
from qkv._quant import quantize

GOLDEN = Path(__file__).parent / "golden" / "card_v1_0.bin"
EPS32 = 2.0**-23


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _fingerprint(layers: int, heads: int, dim: int) -> ModelFingerprint:
    return ModelFingerprint(
        architecture="LlamaForCausalLM", num_layers=layers, num_kv_heads=heads, head_dim=dim, rope_theta=1e5
    )


def _integer_tensor(shape: tuple[int, ...], salt: int) -> torch.Tensor:
    """Deterministic, irregular values from integer arithmetic and one IEEE division: the same on every
    platform. The constants keep every value at least 1e-3 codes away from a rounding tie (checked below),
    so that FMA or not in the quantizer's fp32 arithmetic cannot change the golden bytes."""
    index = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.int64)
    return (((index * 53 + salt * 101) % 211) - 105).to(torch.float32).div(6.1).view(shape)


def golden_snapshot() -> tuple[KVSnapshot, EncodingPlan, CardMeta]:
    """4 layers x 2 KV heads x 11 tokens x 8 dims, with every encoding the format has."""
    layers, heads, tokens, dim = 4, 2, 11, 8
    keys: list[torch.Tensor | None] = [_integer_tensor((heads, tokens, dim), salt) for salt in range(layers)]
    values: list[torch.Tensor | None] = [_integer_tensor((heads, tokens, dim), 10 + s) for s in range(layers)]
    keys[3] = None  # a layer whose keys were not sent
    positions = torch.tensor([0, 1, 2, 3, 7, 8, 9, 10, 11, 20, 21])  # evicted tokens leave gaps
    snapshot = KVSnapshot(
        keys=tuple(keys),
        values=tuple(values),
        positions=positions,
        fingerprint=_fingerprint(layers, heads, dim),
        template_prefix_tokens=2,
    )
    classes = torch.tensor([0, 2, 0, 0, 2, 0, 0, 0, 1, 1, 1], dtype=torch.uint8)  # scattered and recent
    plan = EncodingPlan.mixed(
        token_classes=classes,
        class_key_bits=[(4, 16, 8), (3, 16, 8), (32, 16, 32), (2, 2, 2)],
        class_value_bits=[(2, 16, 8), (5, 16, 8), (7, 32, 1), (0, 0, 0)],
        group_size=3,
    )
    meta = CardMeta(
        sender="golden-node",
        created=1_700_000_000.25,
        facts="Paris is the capital of France.",
        budget={"bits": 4.0, "keep": 1.0},
        extra={"note": "golden vector"},
    )
    return snapshot, plan, meta


def small_card(**meta_fields: Any) -> tuple[KVSnapshot, bytes]:
    snapshot, plan, meta = golden_snapshot()
    fields = {"created": meta.created, **meta_fields}
    return snapshot, encode_card(snapshot, plan, meta=CardMeta(**fields))


def split_card(data: bytes) -> tuple[tuple[Any, ...], dict[str, Any], bytes]:
    header = struct.unpack_from("<4sBBHIQ32s", data)
    header_len, meta_len = header[3], header[4]
    metadata = msgpack.unpackb(data[header_len : header_len + meta_len])
    return header, metadata, data[header_len + meta_len :]


def build_card(
    metadata: Any,
    payload: bytes,
    *,
    magic: bytes = b"QKVC",
    major: int = 1,
    minor: int = 0,
    extension: bytes = b"",
    raw_metadata: bytes | None = None,
) -> bytes:
    """A card with a *valid* digest over whatever it holds: what a hostile but careful sender can make."""
    meta_bytes = raw_metadata if raw_metadata is not None else msgpack.packb(metadata, use_bin_type=True)
    header_len = HEADER_SIZE + len(extension)
    prefix = struct.pack("<4sBBHIQ", magic, major, minor, header_len, len(meta_bytes), len(payload))
    digest = hashlib.sha256(prefix + extension + meta_bytes + payload).digest()
    return prefix + digest + extension + meta_bytes + payload


def rebuilt(data: bytes, **changes: Any) -> bytes:
    _, metadata, payload = split_card(data)
    metadata.update(changes)
    return build_card(metadata, payload)


def assert_same_snapshot(a: KVSnapshot, b: KVSnapshot) -> None:
    assert torch.equal(a.positions, b.positions)
    for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values), strict=True):
        assert (x is None) == (y is None)
        if x is not None and y is not None:
            assert torch.equal(x, y)


def group_bound(x: torch.Tensor, bits: int, group_size: int, axis: int) -> torch.Tensor:
    """Per element: half of the largest scale the codec may store for its group, plus fp32 slack."""
    length = x.shape[axis]
    bound = torch.empty_like(x)
    for start in range(0, length, group_size):
        group = x.narrow(axis, start, min(group_size, length - start))
        low = group.amin(dim=axis, keepdim=True)
        high = group.amax(dim=axis, keepdim=True)
        zero_slack = 2 * (low.abs() * 2.0**-10 + 2.0**-24)  # zero is rounded down to fp16
        scale = (high - low + zero_slack) / ((1 << bits) - 1) * (1 + 2.0**-9) + 2.0**-23
        slack = 4 * EPS32 * (group.abs() + low.abs() + zero_slack)
        bound.narrow(axis, start, group.shape[axis]).copy_(scale / 2 + slack)
    return bound


# ---------------------------------------------------------------------------------------------------------
# Golden vector


def test_golden_bytes_are_stable() -> None:
    snapshot, plan, meta = golden_snapshot()
    assert encode_card(snapshot, plan, meta=meta) == GOLDEN.read_bytes()


def test_golden_data_has_no_rounding_ties() -> None:
    snapshot, plan, _ = golden_snapshot()
    classes = plan.token_classes
    assert classes is not None
    for kind, tensors in (("k", snapshot.keys), ("v", snapshot.values)):
        axis = 1 if kind == "k" else 2
        for layer, tensor in enumerate(tensors):
            for cls, bits in enumerate(plan.widths(kind)[layer]):
                if tensor is None or not 1 <= bits <= 8:
                    continue
                x = tensor[:, classes == cls]
                batch = quantize([x], bits=bits, group_size=plan.group_size, axis=axis)
                scale = (
                    batch.scales[0]
                    .double()
                    .repeat_interleave(plan.group_size, axis)
                    .narrow(axis, 0, x.shape[axis])
                )
                zero = (
                    batch.zeros[0]
                    .double()
                    .repeat_interleave(plan.group_size, axis)
                    .narrow(axis, 0, x.shape[axis])
                )
                position = (x.double() - zero) / scale
                below_top = position < (1 << bits) - 0.5  # ties above the top code are clamped anyway
                distance = (position - position.floor() - 0.5).abs()[below_top]
                assert distance.numel() == 0 or float(distance.min()) > 1e-3


def test_golden_card_decodes() -> None:
    data = GOLDEN.read_bytes()
    snapshot, plan, _ = golden_snapshot()
    card = decode_card(data, expect=snapshot.fingerprint)
    info = card.info
    assert info.card_id == hashlib.sha256(data[:20] + data[52:]).hexdigest()[:32] == info.digest[:32]
    assert info.version == (1, 0)
    assert info.digest_verified
    assert (info.num_tokens, info.next_position, info.template_prefix_tokens) == (11, 22, 2)
    assert info.key_bits == ((4, 16, 8), (3, 16, 8), (32, 16, 32), ())  # keys[3] is None
    assert info.value_bits == ((2, 16, 8), (5, 16, 8), (7, 32, 1), ())
    assert info.layers_present == (0, 1, 2)
    assert card.meta.facts == "Paris is the capital of France."
    assert card.meta.budget == {"bits": 4.0, "keep": 1.0}
    assert card.meta.sender == "golden-node"
    sent_fp16 = snapshot.fp16_bytes() - 2 * 2 * 11 * 8  # values[3] has width 0: not sent
    assert info.fp16_bytes == sent_fp16
    assert info.ratio == sent_fp16 / len(data)

    decoded = card.snapshot
    assert torch.equal(decoded.positions, snapshot.positions)
    assert decoded.template_prefix_tokens == 2
    assert decoded.keys[3] is None
    assert decoded.values[3] is None  # width 0: not sent although the snapshot had it
    classes = plan.token_classes
    assert classes is not None
    recent, scattered = classes == 1, classes == 2
    key2 = decoded.keys[2]
    assert key2 is not None
    original_key2 = snapshot.keys[2]
    assert original_key2 is not None
    assert torch.equal(key2[:, ~recent], original_key2[:, ~recent])  # raw classes: bit exact
    assert torch.equal(key2[:, recent], original_key2[:, recent].half().float())
    for layer in (0, 1):
        value, original = decoded.values[layer], snapshot.values[layer]
        assert value is not None
        assert original is not None
        assert torch.equal(value[:, recent], original[:, recent].half().float())  # recent tokens in fp16
        bound = group_bound(original[:, scattered], 8, 3, axis=2)
        assert bool(((value[:, scattered] - original[:, scattered]).abs() <= bound).all())


# ---------------------------------------------------------------------------------------------------------
# Round trips


@st.composite
def cases(draw: st.DrawFn) -> tuple[KVSnapshot, EncodingPlan, int]:
    layers = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 2))
    tokens = draw(st.integers(1, 40))
    dim = draw(st.integers(1, 24))
    group_size = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    generator = torch.Generator().manual_seed(seed)

    def tensor() -> torch.Tensor | None:
        if draw(st.integers(0, 5)) == 0:
            return None
        scale = draw(st.sampled_from([0.01, 1.0, 20.0]))
        offset = draw(st.sampled_from([0.0, 5.0, -300.0]))
        return (torch.randn(heads, tokens, dim, generator=generator) * scale + offset).to(dtype)

    keys = tuple(tensor() for _ in range(layers))
    values = tuple(tensor() for _ in range(layers))
    gaps = torch.randint(1, 4, (tokens,), generator=generator)
    positions = torch.cumsum(gaps, 0) - 1 + draw(st.integers(0, 100))
    snapshot = KVSnapshot(
        keys=keys,
        values=values,
        positions=positions,
        fingerprint=_fingerprint(layers, heads, dim),
        template_prefix_tokens=draw(st.integers(0, tokens)),
    )
    width = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 32])
    num_classes = draw(st.integers(1, 3))
    if num_classes == 1 and draw(st.booleans()):
        plan = EncodingPlan(
            key_bits=tuple(draw(width) for _ in range(layers)),
            value_bits=tuple(draw(width) for _ in range(layers)),
            group_size=group_size,
        )
        recent = draw(st.integers(0, tokens + 2))
        return snapshot, plan.with_recent_fp16(recent, tokens), seed

    def rows() -> list[tuple[int, ...]]:
        table = []
        for _ in range(layers):
            if draw(st.integers(0, 4)) == 0:
                table.append((0,) * num_classes)
            else:
                table.append(tuple(draw(width.filter(bool)) for _ in range(num_classes)))
        return table

    classes = torch.randint(0, num_classes, (tokens,), generator=generator).to(torch.uint8)
    plan = EncodingPlan.mixed(
        token_classes=classes, class_key_bits=rows(), class_value_bits=rows(), group_size=group_size
    )
    return snapshot, plan, seed


@settings(max_examples=120, deadline=None)
@given(case=cases())
def test_round_trip_within_the_quantization_bound(case: tuple[KVSnapshot, EncodingPlan, int]) -> None:
    snapshot, plan, _ = case
    data = encode_card(snapshot, plan, meta=CardMeta(created=0.0))
    info = read_card_info(data)
    raw_dtypes = {t.dtype for t in (*snapshot.keys, *snapshot.values) if t is not None}
    out_dtype = raw_dtypes.pop() if len(raw_dtypes) == 1 else torch.float32
    card = decode_card(data, expect=snapshot.fingerprint, dtype=out_dtype)
    decoded = card.snapshot
    assert torch.equal(decoded.positions, snapshot.positions.to(torch.int64))
    assert decoded.template_prefix_tokens == snapshot.template_prefix_tokens
    assert card.info == dataclasses.replace(info, digest_verified=True)
    tokens = snapshot.num_tokens
    classes = plan.token_classes if plan.token_classes is not None else torch.zeros(tokens, dtype=torch.uint8)
    sent_fp16 = 0
    for kind, originals, results in (
        ("k", snapshot.keys, decoded.keys),
        ("v", snapshot.values, decoded.values),
    ):
        widths = plan.widths(kind)
        axis = 1 if kind == "k" else 2
        for layer, (original, result) in enumerate(zip(originals, results, strict=True)):
            if original is None or not any(widths[layer]):
                assert result is None
                continue
            assert result is not None
            assert result.dtype == out_dtype
            sent_fp16 += original.numel() * 2
            for cls, bits in enumerate(widths[layer]):
                picked = classes == cls
                if not bool(picked.any()):
                    continue
                x = original[:, picked]
                y = result[:, picked]
                if bits == 32:
                    assert torch.equal(y, x.to(out_dtype))  # raw: bit exact in its own dtype
                elif bits == 16:
                    assert torch.equal(y, x.half().to(out_dtype))
                else:
                    bound = group_bound(x.float(), bits, plan.group_size, axis)
                    if out_dtype != torch.float32:  # the result itself is rounded to out_dtype
                        bound = bound + y.float().abs() * 2.0 ** (-7 if out_dtype == torch.bfloat16 else -10)
                    assert bool(((y.float() - x.float()).abs() <= bound).all()), (kind, layer, cls, bits)
    assert info.fp16_bytes == sent_fp16
    assert info.ratio == sent_fp16 / len(data)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_average_bits_matches_the_payload(width: int) -> None:
    snapshot, _, _ = golden_snapshot()
    snapshot = KVSnapshot(
        keys=tuple(_integer_tensor((2, 11, 8), s) for s in range(4)),
        values=snapshot.values,
        positions=snapshot.positions,
        fingerprint=snapshot.fingerprint,
    )
    plan = EncodingPlan.uniform(4, width, group_size=4)
    info = read_card_info(encode_card(snapshot, plan))
    expected = plan.average_bits(num_tokens=11, kv_heads=2, head_dim=8) * 2 * 4 * 2 * 11 * 8 / 8
    assert expected <= info.payload_bytes <= expected + 8 * 16  # at most 7 padding bytes per section


def test_recent_fp16_plan_puts_the_last_tokens_in_an_fp16_class() -> None:
    plan = EncodingPlan.uniform(3, 4, recent_fp16=5, num_tokens=12)
    assert plan.token_classes is not None
    assert plan.token_classes.tolist() == [0] * 7 + [1] * 5
    assert plan.widths("k") == ((4, 16),) * 3
    assert plan.key_bits == (16, 16, 16)  # the derived nominal width; only 0 / not 0 matters with classes
    with pytest.raises(ValueError, match="num_tokens"):
        EncodingPlan.uniform(3, 4, recent_fp16=5)
    more = plan.with_recent_fp16(2, 12)
    assert more.token_classes is not None
    assert more.token_classes.tolist() == [0] * 7 + [1] * 3 + [2] * 2
    assert more.widths("v") == ((4, 16, 16),) * 3


def test_recent_fp16_tokens_are_exact_in_fp16() -> None:
    snapshot, _, _ = golden_snapshot()
    plan = EncodingPlan.uniform(4, 2, recent_fp16=4, num_tokens=11)
    decoded = decode_card(encode_card(snapshot, plan)).snapshot
    for original, result in zip(snapshot.values, decoded.values, strict=True):
        assert original is not None
        assert result is not None
        assert torch.equal(result[:, -4:], original[:, -4:].half().float())


def test_plan_validation() -> None:
    with pytest.raises(ValueError, match="width"):
        EncodingPlan(key_bits=(9,), value_bits=(4,))
    with pytest.raises(ValueError, match="one width per layer"):
        EncodingPlan(key_bits=(4, 4), value_bits=(4,))
    with pytest.raises(ValueError, match="group_size"):
        EncodingPlan(key_bits=(4,), value_bits=(4,), group_size=0)
    classes = torch.tensor([0, 1, 1], dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs class_key_bits"):
        EncodingPlan(key_bits=(4,), value_bits=(4,), token_classes=classes)
    with pytest.raises(ValueError, match="uint8"):
        EncodingPlan.mixed(token_classes=classes.long(), class_key_bits=[(4, 8)], class_value_bits=[(4, 8)])
    with pytest.raises(ValueError, match="holds class 1"):
        EncodingPlan.mixed(token_classes=classes, class_key_bits=[(4,)], class_value_bits=[(4,)])
    with pytest.raises(ValueError, match="sent"):
        EncodingPlan.mixed(token_classes=classes, class_key_bits=[(4, 0)], class_value_bits=[(4, 8)])
    with pytest.raises(ValueError, match="sent"):
        EncodingPlan(
            key_bits=(0,),
            value_bits=(4,),
            token_classes=classes,
            class_key_bits=((4, 4),),
            class_value_bits=((4, 4),),
        )
    with pytest.raises(ValueError, match="need token_classes"):
        EncodingPlan(key_bits=(4,), value_bits=(4,), class_key_bits=((4,),))


def test_encode_refuses_what_the_plan_or_format_cannot_hold() -> None:
    snapshot, _, _ = golden_snapshot()
    with pytest.raises(ValueError, match="layer counts"):
        encode_card(snapshot, EncodingPlan.uniform(3, 4))
    with pytest.raises(ValueError, match="token_classes has"):
        encode_card(snapshot, EncodingPlan.uniform(4, 4, recent_fp16=2, num_tokens=12))
    bad_shape = KVSnapshot(
        keys=(torch.zeros(2, 11, 9),),
        values=(None,),
        positions=torch.arange(11),
        fingerprint=_fingerprint(1, 2, 8),
    )
    with pytest.raises(ValueError, match="shape"):
        encode_card(bad_shape, EncodingPlan.uniform(1, 4))
    empty = KVSnapshot(
        keys=(torch.zeros(2, 0, 8),),
        values=(None,),
        positions=torch.arange(0),
        fingerprint=_fingerprint(1, 2, 8),
    )
    with pytest.raises(ValueError, match=r"1\.\."):
        encode_card(empty, EncodingPlan.uniform(1, 4))
    negative = KVSnapshot(
        keys=(torch.zeros(2, 3, 8),),
        values=(None,),
        positions=torch.tensor([5, -1, 0]),
        fingerprint=_fingerprint(1, 2, 8),
    )
    with pytest.raises(ValueError, match="positions"):
        encode_card(negative, EncodingPlan.uniform(1, 4))
    nan = torch.zeros(2, 11, 8)
    nan[1, 3, 2] = float("nan")
    with_nan = KVSnapshot(
        keys=(nan,), values=(None,), positions=torch.arange(11), fingerprint=_fingerprint(1, 2, 8)
    )
    with pytest.raises(ValueError, match="not finite"):
        encode_card(with_nan, EncodingPlan.uniform(1, 4))
    with pytest.raises(ValueError, match="not finite in fp16"):
        encode_card(
            KVSnapshot(
                keys=(torch.full((2, 11, 8), 1e6),),
                values=(None,),
                positions=torch.arange(11),
                fingerprint=_fingerprint(1, 2, 8),
            ),
            EncodingPlan.uniform(1, 16),
        )
    decoded = decode_card(encode_card(with_nan, EncodingPlan.uniform(1, 32))).snapshot.keys[0]
    assert decoded is not None
    assert torch.equal(decoded.isnan(), nan.isnan())  # raw is lossless, NaN included
    with pytest.raises(ValueError, match="msgpack"):
        encode_card(snapshot, EncodingPlan.uniform(4, 4), meta=CardMeta(extra={"x": object()}))
    with pytest.raises(TypeError, match="str keys"):
        CardMeta(budget={1: 2})  # type: ignore[dict-item]


def test_decode_accepts_bytes_bytearray_and_memoryview_and_other_dtypes() -> None:
    _, data = small_card()
    reference = decode_card(data).snapshot
    assert_same_snapshot(decode_card(bytearray(data)).snapshot, reference)
    assert_same_snapshot(decode_card(memoryview(data)).snapshot, reference)
    half = decode_card(data, dtype=torch.float16).snapshot.values[0]
    assert half is not None
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="floating"):
        decode_card(data, dtype=torch.int32)


def test_decoded_layers_are_independent_tensors() -> None:
    _, data = small_card()
    decoded = decode_card(data).snapshot
    first, second = decoded.values[0], decoded.values[1]
    assert first is not None
    assert second is not None
    before = second.clone()
    first.fill_(0.0)
    assert torch.equal(second, before)


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_every_byte_flip_is_detected() -> None:
    _, data = small_card()
    for position in range(len(data)):
        corrupted = bytearray(data)
        corrupted[position] ^= 0x5A
        with pytest.raises(CardError):
            decode_card(bytes(corrupted))


def test_single_bit_flips_raise_typed_errors() -> None:
    _, data = small_card()
    generator = torch.Generator().manual_seed(7)
    positions = torch.randint(0, len(data) * 8, (400,), generator=generator).tolist()
    for bit in positions:
        corrupted = bytearray(data)
        corrupted[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CardFormatError):
            decode_card(bytes(corrupted))


def test_payload_corruption_is_a_digest_error() -> None:
    _, data = small_card()
    corrupted = bytearray(data)
    corrupted[-1] ^= 1
    with pytest.raises(CardDigestError, match="digest"):
        decode_card(bytes(corrupted))
    # read_card_info only hashes when asked to.
    assert read_card_info(bytes(corrupted)).card_id == read_card_info(data).card_id
    with pytest.raises(CardDigestError):
        read_card_info(bytes(corrupted), verify=True)


def test_every_truncation_is_detected() -> None:
    _, data = small_card()
    for length in range(len(data)):
        with pytest.raises(CardFormatError, match="truncated"):
            read_card_info(data[:length])
        with pytest.raises(CardFormatError, match="truncated"):
            decode_card(data[:length])


def test_trailing_bytes_are_refused() -> None:
    _, data = small_card()
    with pytest.raises(CardFormatError, match="after its payload"):
        decode_card(data + b"\0")


def test_wrong_magic_and_versions() -> None:
    _, data = small_card()
    _, metadata, payload = split_card(data)
    with pytest.raises(CardFormatError, match="not a CacheCard"):
        decode_card(build_card(metadata, payload, magic=b"PK\x03\x04"))
    with pytest.raises(CardFormatError, match=r"version 3\.0"):
        decode_card(build_card(metadata, payload, major=3))
    # Major 2 is the rotated coding: its metadata must say which rotation.
    with pytest.raises(CardFormatError, match="lacks 'rotation'"):
        decode_card(build_card(metadata, payload, major=2))
    for bad in ("none", "random", 7, ["hadamard"]):
        with pytest.raises(CardFormatError, match="rotation of a v2 card"):
            read_card_info(build_card({**metadata, "rotation": bad}, payload, major=2))
    with pytest.raises(CardFormatError, match=r"version 0\.9"):
        read_card_info(build_card(metadata, payload, major=0, minor=9))


def test_a_newer_minor_version_is_read_ignoring_what_it_adds() -> None:
    snapshot, data = small_card()
    _, metadata, payload = split_card(data)
    metadata["future_key"] = {"something": [1, 2, 3]}
    newer = build_card(metadata, payload + bytes(40), minor=3, extension=b"\x01" * 12)
    card = decode_card(newer, expect=snapshot.fingerprint)
    assert card.info.version == (1, 3)
    assert_same_snapshot(card.snapshot, decode_card(data).snapshot)


def test_another_model_is_a_compat_error() -> None:
    snapshot, data = small_card()
    other = ModelFingerprint(**{**snapshot.fingerprint.to_dict(), "rope_theta": 10000.0})
    with pytest.raises(CardCompatError, match="rope_theta"):
        decode_card(data, expect=other)


def test_card_id_is_readable_cheaply_and_stable() -> None:
    _, data = small_card()
    info = read_card_info(data)
    assert not info.digest_verified
    assert len(info.card_id) == 32
    assert info.card_id == decode_card(data).info.card_id
    _, other = small_card(facts="different facts")
    assert read_card_info(other).card_id != info.card_id


def test_non_buffers_and_odd_buffers() -> None:
    with pytest.raises(CardFormatError, match="byte buffer"):
        decode_card("not bytes")  # type: ignore[arg-type]
    _, data = small_card()
    words = memoryview(bytearray(data[: len(data) // 4 * 4])).cast("I")
    with pytest.raises(CardFormatError):
        decode_card(words)


def _sections(metadata: dict[str, Any]) -> list[tuple[int, str]]:
    return [
        (i, name)
        for i, block in enumerate(metadata["blocks"])
        for name in ("codes", "scales", "zeros", "data")
        if name in block
    ]


BAD_METADATA: list[tuple[str, Any, str]] = [
    ("tokens", "11", "tokens"),
    ("tokens", -1, "tokens"),
    ("tokens", True, "tokens"),
    ("tokens", 2**40, "tokens"),
    ("tokens", 12, "positions|cover"),
    ("tokens", MAX_TOKENS, "cover|classes"),
    ("positions", [[0, 5]], "cover"),
    ("positions", [[-3, 11]], "positions"),
    ("positions", [[0, 11, 4]], "positions"),
    ("positions", "0-10", "positions"),
    ("positions", [[2**62, 11]], "positions"),
    ("template_prefix_tokens", 12, "template_prefix_tokens"),
    ("group_size", 0, "group_size"),
    ("group_size", 4, "bytes"),
    ("num_classes", 2, "class id|classes section"),
    ("num_classes", 0, "num_classes"),
    ("num_classes", 300, "num_classes"),
    ("classes", None, "no classes section"),
    ("classes", [4, 11], "aligned"),
    ("classes", [0, 10**9], "length"),
    ("classes", [0, 3], "classes section"),
    ("blocks", {"a": 1}, "blocks"),
    ("blocks", [[1, 2]], "blocks"),
    ("sender", 5, "sender"),
    ("created", "yesterday", "created"),
    ("created", float("nan"), "created"),
    ("facts", b"bytes", "facts"),
    ("budget", [1], "budget"),
    ("extra", None, "extra"),
    ("fingerprint", {"architecture": "x"}, "fingerprint"),
    ("fingerprint", "llama", "fingerprint"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_METADATA)
def test_malformed_metadata_fields(key: str, value: Any, message: str) -> None:
    _, data = small_card()
    with pytest.raises(CardFormatError, match=message):
        decode_card(rebuilt(data, **{key: value}))
    with pytest.raises(CardFormatError, match=message):
        read_card_info(rebuilt(data, **{key: value}))


def test_missing_metadata_fields() -> None:
    _, data = small_card()
    _, metadata, payload = split_card(data)
    for key in list(metadata):
        broken = {k: v for k, v in metadata.items() if k != key}
        with pytest.raises(CardFormatError, match=key):
            decode_card(build_card(broken, payload))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kind", "q", "kind"),
        ("class", 3, "class"),
        ("class", -1, "class"),
        ("bits", 9, "bits"),
        ("bits", 0, "bits"),
        ("bits", "4", "bits"),
        ("layers", [], "layers"),
        ("layers", [1, 0], "increasing"),
        ("layers", [0, 0], "increasing"),
        ("layers", [0, 7], "layers"),
        ("layers", "0", "layers"),
        ("codes", [0, 1], "bytes|overlap"),
        ("codes", [1 << 40, 1], "offset"),
        ("codes", [8, -1], "length"),
        ("scales", [0, 1 << 50], "length"),
        ("zeros", [3, 2], "aligned"),
        ("codes", None, "codes"),
    ],
)
def test_malformed_blocks(field: str, value: Any, message: str) -> None:
    _, data = small_card()
    _, metadata, payload = split_card(data)
    block = next(b for b in metadata["blocks"] if b["bits"] <= 8)
    block[field] = value
    with pytest.raises(CardFormatError, match=message):
        decode_card(build_card(metadata, payload))


def test_structural_block_errors() -> None:
    _, data = small_card()
    _, metadata, payload = split_card(data)
    blocks = metadata["blocks"]
    raw_index = next(i for i, b in enumerate(blocks) if b["bits"] == 32)
    raw = blocks[raw_index]

    def with_raw(changed: dict[str, Any]) -> list[dict[str, Any]]:
        return [changed if i == raw_index else b for i, b in enumerate(blocks)]

    overlapping = {**raw, "data": [blocks[0]["codes"][0], raw["data"][1]]}
    cases = [
        ("dtype", with_raw({**raw, "dtype": "int64"})),
        ("two blocks", [*blocks, blocks[0]]),
        ("covers classes", blocks[1:]),
        ("overlap", with_raw(overlapping)),
        ("more than", blocks * 20),
    ]
    for message, broken in cases:
        with pytest.raises(CardFormatError, match=message):
            decode_card(build_card({**metadata, "blocks": broken}, payload))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x91\x01",  # a list, not a map
        b"\x81\xa1a",  # map with a missing value
        b"\x81\x01\x02",  # int key
        b"\x81\xa1a\xd4\x05\x00",  # extension type
        b"\x81\xa2\xff\xfe\x01",  # invalid UTF-8 key
        b"\x80\x80",  # trailing data
        b"\xdf\xff\xff\xff\xff",  # a map claiming 4 billion entries
        b"\x91" * 2000 + b"\x80",  # deep nesting
    ],
)
def test_malformed_msgpack(raw: bytes) -> None:
    _, data = small_card()
    _, _, payload = split_card(data)
    with pytest.raises(CardFormatError):
        decode_card(build_card(None, payload, raw_metadata=raw))


def test_huge_claimed_sizes_are_refused_before_allocating() -> None:
    _, data = small_card()
    _, metadata, payload = split_card(data)
    metadata["fingerprint"]["num_layers"] = 10**9
    with pytest.raises(CardFormatError, match="num_layers"):
        decode_card(build_card(metadata, payload))
    metadata["fingerprint"]["num_layers"] = 4
    metadata["fingerprint"]["head_dim"] = 1 << 14
    with pytest.raises(CardFormatError, match="bytes"):
        decode_card(build_card(metadata, payload))
    header = bytearray(data[:HEADER_SIZE])
    struct.pack_into("<I", header, 8, 1 << 31)  # metadata length
    with pytest.raises(CardFormatError, match="metadata claims"):
        decode_card(bytes(header) + data[HEADER_SIZE:])
    struct.pack_into("<IQ", header, 8, 100, 1 << 60)  # payload length
    with pytest.raises(CardFormatError, match="truncated"):
        decode_card(bytes(header) + data[HEADER_SIZE:])
    struct.pack_into("<H", header, 6, 60000)  # header length
    with pytest.raises(CardFormatError, match="header_len"):
        decode_card(bytes(header) + data[HEADER_SIZE:])


def test_unknown_metadata_keys_are_ignored() -> None:
    _, data = small_card()
    assert_same_snapshot(
        decode_card(rebuilt(data, later_feature=[1, 2])).snapshot, decode_card(data).snapshot
    )


# Values of every msgpack type: a field that expects another type must refuse each with a CardError.
HOSTILE_VALUES: tuple[Any, ...] = (
    [],
    [[]],
    {},
    {"": None},
    None,
    True,
    -1,
    2**63 - 1,
    1.5,
    float("inf"),
    "x",
    b"x",
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a decoded metadata tree (containers and leaves)."""
    found: list[tuple[Any, ...]] = [prefix] if prefix else []
    children = (
        value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    )
    for key, child in children:
        found += _paths(child, (*prefix, key))
    return found


def _replaced(metadata: Any, path: tuple[Any, ...], value: Any) -> Any:
    copy = msgpack.unpackb(msgpack.packb(metadata, use_bin_type=True))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


@pytest.mark.parametrize("rotation", ["none", "hadamard-prerope"])
def test_every_metadata_field_of_any_type_is_a_card_error_or_accepted(rotation: str) -> None:
    # A card's digest is not a key: a hostile sender recomputes it, so every field's type is untrusted.
    snapshot, plan, meta = golden_snapshot()
    if rotation != "none":
        snapshot = dataclasses.replace(snapshot, keys=(*snapshot.keys[:3], snapshot.values[3]))
        plan = EncodingPlan.uniform(4, 4, group_size=3, rotation="hadamard-prerope")
    data = encode_card(snapshot, plan, meta=meta)
    header, metadata, payload = split_card(data)
    major = header[1]
    checked = 0
    for path in _paths(metadata):
        for value in HOSTILE_VALUES:
            card = build_card(_replaced(metadata, path, value), payload, major=major)
            for reader in (read_card_info, decode_card):
                with contextlib.suppress(CardError):
                    reader(card)
                checked += 1
    assert checked > 1000  # every field was tried (guards against an empty walk)


if __name__ == "__main__":  # regenerate the golden vector after a deliberate format change
    golden, golden_plan, golden_meta = golden_snapshot()
    GOLDEN.write_bytes(encode_card(golden, golden_plan, meta=golden_meta))
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
