"""Planar bit packing: exact round trips for every width, the documented byte layout, bad arguments."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv._bitpack import pack_codes, packed_size, unpack_codes


def _random_codes(count: int, bits: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (count,), generator=generator, dtype=torch.uint8)


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(min_value=0, max_value=3000),
    bits=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_round_trip_is_exact(count: int, bits: int, seed: int) -> None:
    codes = _random_codes(count, bits, seed)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(count, bits) == (count + 7) // 8 * bits
    assert torch.equal(unpack_codes(packed, bits, count), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_extreme_codes_survive(bits: int) -> None:
    top = (1 << bits) - 1
    codes = torch.tensor([0, top] * 13 + [top] * 7, dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, codes.numel()), codes)


def test_multidimensional_codes_are_packed_in_c_order() -> None:
    codes = _random_codes(6 * 10, 5, seed=1).view(6, 10)
    assert torch.equal(pack_codes(codes, 5), pack_codes(codes.flatten(), 5))


def test_layout_matches_the_documented_formula() -> None:
    # 3 bits = a 2-bit part at offset 0 (4 planes of 2 codes) then a 1-bit part at offset 2 (8 planes of 1).
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    low = [c & 3 for c in codes.tolist()]
    high = [(c >> 2) & 1 for c in codes.tolist()]
    part_2bit = [sum(low[r * 2 + j] << (2 * r) for r in range(4)) for j in range(2)]
    part_1bit = [sum(high[r] << r for r in range(8))]
    assert pack_codes(codes, 3).tolist() == part_2bit + part_1bit == [221, 34, 120]


def test_eight_bit_codes_are_stored_as_they_are() -> None:
    codes = _random_codes(24, 8, seed=2)
    assert torch.equal(pack_codes(codes, 8), codes)


def test_padding_codes_are_zero() -> None:
    packed = pack_codes(torch.ones(3, dtype=torch.uint8), 1)
    assert packed.tolist() == [0b00000111]


@pytest.mark.parametrize("bits", [0, 9, 16, -1])
def test_widths_outside_one_to_eight_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="width"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="width"):
        packed_size(8, bits)


def test_non_uint8_codes_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(torch.zeros(8, dtype=torch.int32), 4)


def test_unpack_checks_the_packed_length() -> None:
    packed = pack_codes(_random_codes(16, 4, seed=3), 4)
    with pytest.raises(ValueError, match="8 bytes"):
        unpack_codes(packed[:-1], 4, 16)
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(packed, 4, 17)
