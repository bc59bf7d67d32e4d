"""Asymmetric min-max integer quantization of KV tensors in groups (KIVI style).

A tensor ``x`` of shape ``[heads, tokens, head_dim]`` is cut into groups of ``group_size`` elements along one
axis: keys along the token axis (:data:`KEY_AXIS`, one scale per channel and token group), values along the
channel axis (:data:`VALUE_AXIS`, one scale per token and channel group), as KIVI found best. When the axis
length is not a multiple of ``group_size`` the last group is shorter. For a group with minimum ``lo`` and
maximum ``hi`` and ``maxq = 2**bits - 1``:

* ``zero`` is an fp16 value at most ``lo`` (``lo`` moved down by at most about two fp16 ulps) and ``scale`` an
  fp16 value above ``(hi - zero) / maxq`` (by at most about two fp16 ulps, and never below ``2**-24``), so
  the fp16 side information spans the whole group and its rounding never pushes a code out of range;
* ``code = clamp(round((x - zero) / scale), 0, maxq)``;
* ``x' = zero + code * scale``, so ``|x' - x| <= scale / 2`` up to fp32 arithmetic (about ``eps * |x|``),
  with ``scale`` the stored fp16 value.

Scales and zeros are stored in fp16 with shape :func:`stats_shape`: ``[heads, groups, head_dim]`` for keys and
``[heads, tokens, groups]`` for values. A group whose min or max is not finite or does not fit fp16 is
refused with ``ValueError`` (use a 16-bit or raw width for such a layer).

Everything runs on the device of the input tensors. The functions take several same-shaped layers at once:
the statistics and scales are computed for the whole batch in a handful of ops, and only the element-wise
passes run per layer, writing straight into one batched code tensor that the bit packer then takes whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

KEY_AXIS = 1  # keys: groups run along tokens, one scale per (head, token group, channel)
VALUE_AXIS = 2  # values: groups run along head_dim, one scale per (head, token, channel group)
MAX_QUANT_BITS = 8


def group_count(length: int, group_size: int) -> int:
    """Number of groups (the last one possibly partial) along an axis of ``length`` elements."""
    return (length + group_size - 1) // group_size


def stats_shape(shape: Sequence[int], axis: int, group_size: int) -> tuple[int, int, int]:
    """Shape of the scale (and zero) tensor of one ``[heads, tokens, head_dim]`` tensor."""
    heads, tokens, dim = shape
    if axis == KEY_AXIS:
        return (heads, group_count(tokens, group_size), dim)
    if axis == VALUE_AXIS:
        return (heads, tokens, group_count(dim, group_size))
    raise ValueError(f"axis must be KEY_AXIS or VALUE_AXIS, got {axis}")


@dataclass(frozen=True)
class QuantizedBatch:
    """Codes and fp16 side information of ``n`` same-shaped tensors quantized together."""

    codes: torch.Tensor  # uint8 [n, heads, tokens, head_dim], every code < 2**bits
    scales: torch.Tensor  # fp16 [n, *stats_shape]
    zeros: torch.Tensor  # fp16 [n, *stats_shape]


def _group_views(x: torch.Tensor, axis: int, group_size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(first_group, groups, view)`` where ``view`` splits ``axis`` into ``(groups, group_len)``.

    At most two views: the full groups, then the partial last group. Views only, no copies.
    """
    shape = tuple(x.shape)
    length = shape[axis]
    full = length // group_size
    if full:
        split = (*shape[:axis], full, group_size, *shape[axis + 1 :])
        yield 0, full, x.narrow(axis, 0, full * group_size).view(split)
    rest = length - full * group_size
    if rest:
        split = (*shape[:axis], 1, rest, *shape[axis + 1 :])
        yield full, 1, x.narrow(axis, full * group_size, rest).view(split)


# Directed rounding to fp16 without nextafter (fp16 ops are slow on CPU): moving a value by one relative fp16
# ulp (2**-10) plus the smallest subnormal (2**-24) before round-to-nearest guarantees the rounded value lies
# on the wanted side.
_FP16_RELATIVE_ULP = 2.0**-10
_FP16_TINY = 2.0**-24


def _fp16_at_or_below(x: torch.Tensor) -> torch.Tensor:
    return (x - x.abs() * _FP16_RELATIVE_ULP - _FP16_TINY).to(torch.float16)


def _fp16_above(x: torch.Tensor) -> torch.Tensor:
    """For ``x >= 0``: an fp16 value ``> x`` and ``>= 2**-24``, so never zero."""
    return (x * (1.0 + _FP16_RELATIVE_ULP) + _FP16_TINY).to(torch.float16)


# Adding 2**23 to a float in [0, 2**23) leaves the integer nearest to it in the low mantissa bits, so the
# low byte of the float's bit pattern is the code: an int32 -> uint8 copy is 6x faster than float -> uint8.
_ROUNDING_BIAS = float(2**23)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_QUANT_BITS:
        raise ValueError(f"quantization width must be an int in 1..{MAX_QUANT_BITS}, got {bits!r}")


def _check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")


def quantize(tensors: Sequence[torch.Tensor], *, bits: int, group_size: int, axis: int) -> QuantizedBatch:
    """Quantize same-shaped ``[heads, tokens, head_dim]`` float tensors (views are fine) in one batch."""
    _check_bits(bits)
    _check_group_size(group_size)
    if not tensors:
        raise ValueError("nothing to quantize")
    shape = tuple(tensors[0].shape)
    if len(shape) != 3 or any(tuple(t.shape) != shape or t.dtype != tensors[0].dtype for t in tensors):
        raise ValueError(
            f"tensors must share one [heads, tokens, head_dim] shape and dtype, first is {shape}"
        )
    if not tensors[0].is_floating_point():
        raise ValueError(f"only floating-point tensors are quantized, got {tensors[0].dtype}")
    device = tensors[0].device
    count = len(tensors)
    stats = stats_shape(shape, axis, group_size)
    # Statistics keep the group axis as a length-1 dim so that they broadcast against the group views.
    keep_shape = (count, *stats[:axis], stats[axis], 1, *stats[axis + 1 :])
    # amin/amax with out= need the input's dtype; fp16/bf16 statistics are exact in fp32 afterwards.
    lows = torch.empty(keep_shape, dtype=tensors[0].dtype, device=device)
    highs = torch.empty(keep_shape, dtype=tensors[0].dtype, device=device)
    for index, tensor in enumerate(tensors):
        for first, groups, view in _group_views(tensor, axis, group_size):
            # amin + amax beat torch.aminmax by 4x on CPU (aminmax takes a non-vectorised path here).
            torch.amin(view, dim=axis + 1, keepdim=True, out=lows[index].narrow(axis, first, groups))
            torch.amax(view, dim=axis + 1, keepdim=True, out=highs[index].narrow(axis, first, groups))

    lows, highs = lows.float(), highs.float()
    maxq = (1 << bits) - 1
    zeros = _fp16_at_or_below(lows)
    zero32 = zeros.float()
    scales = _fp16_above((highs - zero32) * (1.0 / maxq))
    scale32 = scales.float()
    # One host sync: NaN or inf anywhere (including an fp16 overflow of a zero or scale) poisons the sum.
    if not bool(torch.isfinite(zero32.sum() + scale32.sum())):
        bad = ~(torch.isfinite(zero32) & torch.isfinite(scale32))
        layer = int(bad.flatten(1).any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"tensor {layer} of this batch has a group that is not finite or exceeds the fp16 range; "
            "quantized widths need fp16-representable values (use width 32 to keep such a tensor raw)"
        )
    inverse = scale32.reciprocal()
    # (x - zero) / scale as x * inverse - zero * inverse: its cancellation error is about eps * (|x| + |zero|)
    # in value terms, the order of fp32's own resolution of x. The bias is added only afterwards: folded
    # into the offset it would round the offset to an integer.
    offset = -zero32 * inverse
    top = _ROUNDING_BIAS + maxq

    codes = torch.empty((count, *shape), dtype=torch.uint8, device=device)
    scratch: dict[tuple[int, ...], torch.Tensor] = {}
    for index, tensor in enumerate(tensors):
        for (first, groups, view), (_, _, code_view) in zip(
            _group_views(tensor, axis, group_size),
            _group_views(codes[index], axis, group_size),
            strict=True,
        ):
            work = scratch.get(tuple(view.shape))
            if work is None:
                work = torch.empty(view.shape, dtype=torch.float32, device=device)
                scratch[tuple(view.shape)] = work
            group_inverse = inverse[index].narrow(axis, first, groups)
            group_offset = offset[index].narrow(axis, first, groups)
            if axis == VALUE_AXIS:  # addcmul is slow when the broadcast dim is the innermost: mul + add
                torch.mul(view, group_inverse, out=work)
                work.add_(group_offset)
            else:
                torch.addcmul(group_offset, view, group_inverse, out=work)
            work.add_(_ROUNDING_BIAS)  # rounds to the nearest integer
            work.clamp_(_ROUNDING_BIAS, top)
            code_view.copy_(work.view(torch.int32))  # int32 -> uint8 keeps the low byte: the code
    return QuantizedBatch(
        codes=codes,
        scales=scales.reshape(count, *stats),
        zeros=zeros.reshape(count, *stats),
    )


def dequantize_into(
    out: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    group_size: int,
    axis: int,
) -> None:
    """Write ``zero + code * scale`` into ``out`` (``[..., heads, tokens, head_dim]``; views are fine).

    ``codes`` is uint8 of ``out``'s shape; ``scales``/``zeros`` have the same leading dims followed by
    :func:`stats_shape`, any float dtype. Leading dims let one call cover a whole block of layers.
    """
    _check_group_size(group_size)
    shape = tuple(out.shape)
    if len(shape) < 3:
        raise ValueError(f"dequantize: out must be [..., heads, tokens, head_dim], got {shape}")
    stats = (*shape[:-3], *stats_shape(shape[-3:], axis, group_size))
    if tuple(codes.shape) != shape or tuple(scales.shape) != stats or tuple(zeros.shape) != stats:
        raise ValueError(
            f"dequantize: out {shape}, codes {tuple(codes.shape)}, scales {tuple(scales.shape)}, "
            f"zeros {tuple(zeros.shape)} do not agree (expected stats {stats})"
        )
    dim = len(shape) - 3 + axis
    scale32 = scales.float().unsqueeze(dim + 1)
    zero32 = zeros.float().unsqueeze(dim + 1)
    for (first, groups, out_view), (_, _, code_view) in zip(
        _group_views(out, dim, group_size), _group_views(codes, dim, group_size), strict=True
    ):
        # A uint8 -> float copy first: mixed-dtype arithmetic is 2-3x slower. Then one in-place addcmul, or
        # mul + add where the broadcast dim is the innermost (values), where addcmul is slow.
        work = out_view if out.dtype == torch.float32 else torch.empty(out_view.shape, device=out.device)
        work.copy_(code_view)
        group_scale = scale32.narrow(dim, first, groups)
        group_zero = zero32.narrow(dim, first, groups)
        if axis == VALUE_AXIS:
            work.mul_(group_scale)
            work.add_(group_zero)
        else:
            torch.addcmul(group_zero, work, group_scale, out=work)
        if work is not out_view:
            out_view.copy_(work)
