"""Group quantization: the error bound, the fp16 side information, partial groups, refused inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv._quant import KEY_AXIS, VALUE_AXIS, dequantize_into, quantize, stats_shape

EPS32 = 2.0**-23


def _expand(stats: torch.Tensor, axis: int, group_size: int, length: int) -> torch.Tensor:
    """Repeat per-group statistics ``[H, G, D]`` / ``[H, T, G]`` back to one value per element."""
    return stats.float().repeat_interleave(group_size, dim=axis).narrow(axis, 0, length)


def _sample(shape: tuple[int, int, int], seed: int, offset: float, spread: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * spread + offset


@settings(max_examples=150, deadline=None)
@given(
    heads=st.integers(1, 3),
    tokens=st.integers(1, 70),
    dim=st.integers(1, 40),
    group_size=st.integers(1, 80),
    bits=st.integers(1, 8),
    axis=st.sampled_from([KEY_AXIS, VALUE_AXIS]),
    layers=st.integers(1, 3),
    offset=st.sampled_from([0.0, 3.0, -250.0, 1000.0]),
    spread=st.sampled_from([0.0, 1e-6, 0.01, 1.0, 30.0]),
    seed=st.integers(0, 2**31),
)
def test_error_is_at_most_half_a_scale(
    heads: int,
    tokens: int,
    dim: int,
    group_size: int,
    bits: int,
    axis: int,
    layers: int,
    offset: float,
    spread: float,
    seed: int,
) -> None:
    shape = (heads, tokens, dim)
    xs = [_sample(shape, seed + i, offset, spread) for i in range(layers)]
    batch = quantize(xs, bits=bits, group_size=group_size, axis=axis)
    assert batch.codes.shape == (layers, *shape)
    assert batch.scales.shape == batch.zeros.shape == (layers, *stats_shape(shape, axis, group_size))
    assert batch.scales.dtype == batch.zeros.dtype == torch.float16
    assert int(batch.codes.max()) < 1 << bits
    for i, x in enumerate(xs):
        out = torch.empty(shape)
        dequantize_into(
            out, batch.codes[i], batch.scales[i], batch.zeros[i], group_size=group_size, axis=axis
        )
        length = shape[axis]
        scale = _expand(batch.scales[i], axis, group_size, length)
        zero = _expand(batch.zeros[i], axis, group_size, length)
        bound = scale / 2 + 4 * EPS32 * (x.abs() + zero.abs()) + 1e-30
        assert bool(((out - x).abs() <= bound).all())
        # The fp16 side information spans each group: zero <= min and zero + maxq * scale >= max.
        assert bool((zero <= x).all())
        assert bool((zero + ((1 << bits) - 1) * scale >= x - 4 * EPS32 * x.abs()).all())


@pytest.mark.parametrize("axis", [KEY_AXIS, VALUE_AXIS])
def test_constant_groups_come_back_close(axis: int) -> None:
    x = torch.full((2, 9, 5), 1234.567)
    batch = quantize([x], bits=2, group_size=4, axis=axis)
    out = torch.empty_like(x)
    dequantize_into(out, batch.codes[0], batch.scales[0], batch.zeros[0], group_size=4, axis=axis)
    assert torch.allclose(out, x, rtol=2e-3)


def test_keys_group_along_tokens_and_values_along_channels() -> None:
    assert stats_shape((3, 70, 64), KEY_AXIS, 32) == (3, 3, 64)
    assert stats_shape((3, 70, 64), VALUE_AXIS, 32) == (3, 70, 2)
    assert stats_shape((3, 70, 64), VALUE_AXIS, 48) == (3, 70, 2)  # 48 + a partial group of 16


def test_a_channel_outlier_does_not_spoil_other_channels_of_keys() -> None:
    x = torch.randn(1, 32, 8)
    x[:, :, 3] *= 100.0
    batch = quantize([x], bits=4, group_size=32, axis=KEY_AXIS)
    out = torch.empty_like(x)
    dequantize_into(out, batch.codes[0], batch.scales[0], batch.zeros[0], group_size=32, axis=KEY_AXIS)
    others = [c for c in range(8) if c != 3]
    assert float((out - x)[:, :, others].abs().max()) < 0.5


def test_fp16_and_bf16_inputs_and_views_are_accepted() -> None:
    base = torch.randn(2, 20, 16)
    for x in (base.half(), base.bfloat16(), base[:, 3:17, :]):
        batch = quantize([x], bits=8, group_size=8, axis=VALUE_AXIS)
        out = torch.empty(x.shape)
        dequantize_into(out, batch.codes[0], batch.scales[0], batch.zeros[0], group_size=8, axis=VALUE_AXIS)
        assert torch.allclose(out, x.float(), atol=0.05)


def test_batched_dequantize_equals_per_tensor() -> None:
    xs = [torch.randn(2, 13, 6) for _ in range(3)]
    batch = quantize(xs, bits=3, group_size=5, axis=KEY_AXIS)
    together = torch.empty(3, 2, 13, 6)
    dequantize_into(together, batch.codes, batch.scales, batch.zeros, group_size=5, axis=KEY_AXIS)
    for i in range(3):
        alone = torch.empty(2, 13, 6)
        dequantize_into(alone, batch.codes[i], batch.scales[i], batch.zeros[i], group_size=5, axis=KEY_AXIS)
        assert torch.equal(alone, together[i])


def test_dequantize_writes_into_a_view() -> None:
    x = torch.randn(2, 10, 4)
    batch = quantize([x], bits=8, group_size=4, axis=KEY_AXIS)
    big = torch.zeros(2, 30, 4)
    dequantize_into(
        big[:, 5:15, :], batch.codes[0], batch.scales[0], batch.zeros[0], group_size=4, axis=KEY_AXIS
    )
    assert torch.allclose(big[:, 5:15, :], x, atol=0.05)
    assert bool((big[:, :5] == 0).all())
    assert bool((big[:, 15:] == 0).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e6, -70000.0])
def test_values_that_do_not_fit_fp16_are_refused(bad: float) -> None:
    x = torch.randn(1, 8, 4)
    x[0, 5, 2] = bad
    with pytest.raises(ValueError, match="tensor 1 of this batch"):
        quantize([torch.randn(1, 8, 4), x], bits=4, group_size=4, axis=KEY_AXIS)


def test_bad_arguments_are_refused() -> None:
    x = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="width"):
        quantize([x], bits=9, group_size=4, axis=KEY_AXIS)
    with pytest.raises(ValueError, match="group_size"):
        quantize([x], bits=4, group_size=0, axis=KEY_AXIS)
    with pytest.raises(ValueError, match="one"):
        quantize([x, torch.randn(1, 9, 4)], bits=4, group_size=4, axis=KEY_AXIS)
    with pytest.raises(ValueError, match="nothing"):
        quantize([], bits=4, group_size=4, axis=KEY_AXIS)
    with pytest.raises(ValueError, match="axis"):
        stats_shape((1, 8, 4), 0, 4)
    batch = quantize([x], bits=4, group_size=4, axis=KEY_AXIS)
    with pytest.raises(ValueError, match="do not agree"):
        dequantize_into(
            torch.empty(1, 8, 4),
            batch.codes[0],
            batch.scales[0][:, :1],
            batch.zeros[0],
            group_size=4,
            axis=KEY_AXIS,
        )
