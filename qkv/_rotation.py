"""Orthogonal transforms of K and V before quantization ("code space"), undone after dequantization.

Min-max quantization spends its range on the largest value of a group, so a few outlier channels (values)
or channels whose sign flips with position (keys after RoPE) waste most of the codes of the others. Both
transforms below are orthogonal and exactly invertible, so they change nothing but the quantization error:

* ``"hadamard"``: ``x @ H`` with ``H`` the orthonormal Sylvester-Hadamard matrix of order ``head_dim`` (a
  power of two). Every coded channel is then an even mix of all channels: outliers are spread over the whole
  head and groups along channels (values) or tokens (keys) see a narrower range. ``H`` is symmetric and its
  own inverse.
* ``"hadamard-prerope"``: keys are first taken back to before RoPE at their own positions (the rotation
  table is the default RoPE of the card's ``rope_theta`` and ``head_dim``), then multiplied by ``H``; values
  as ``"hadamard"``. Pre-RoPE keys keep a steady per-channel scale along tokens, which is what key groups
  (along tokens) need. The table only has to be the same at both ends for the round trip to be exact; it
  matching the model's own RoPE (true for default RoPE) is what makes it help.

An exploratory run on SmolLM2-135M (40 SQuAD rows, mean answer KL against the text condition at 2/3/4
bits): no transform 0.555 / 0.050 / 0.013; ``hadamard`` 0.251 / 0.038 / 0.011; ``hadamard-prerope``
0.190 / 0.033 / 0.0064; with one fp16 sink token as well 0.159 / 0.016 / 0.0053. The 200-row tables are in
the README ("Rotated coding").

``"none"`` leaves tensors as they are. Results are float32.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from ._kv import ModelFingerprint
from ._rope import RopeTable, unrotate

Rotation = Literal["none", "hadamard", "hadamard-prerope"]
ROTATIONS: tuple[Rotation, ...] = ("none", "hadamard", "hadamard-prerope")


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check_rotation(value: object, *, head_dim: int | None = None) -> Rotation:
    """``value`` as a :data:`Rotation`; ``ValueError`` for another value or a head_dim H cannot have."""
    if value not in ROTATIONS:
        raise ValueError(f"rotation must be one of {', '.join(ROTATIONS)}; got {value!r}")
    if value != "none" and head_dim is not None and not is_power_of_two(head_dim):
        raise ValueError(f"rotation {value!r} needs a power-of-two head_dim, the model has {head_dim}")
    if value == "hadamard-prerope" and head_dim == 1:
        raise ValueError("rotation 'hadamard-prerope' needs RoPE pairs: head_dim 1 has none")
    return value


@functools.lru_cache(maxsize=8)
def _hadamard_cpu(order: int) -> torch.Tensor:
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < order:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    scaled: torch.Tensor = matrix / order**0.5
    return scaled


def hadamard(order: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal, symmetric Sylvester-Hadamard matrix of ``order`` (a power of two), float32."""
    if not is_power_of_two(order):
        raise ValueError(f"a Hadamard matrix needs a power-of-two order, got {order}")
    return _hadamard_cpu(order).to(device)


def rope_table_for(fingerprint: ModelFingerprint) -> RopeTable:
    """Default RoPE of the fingerprint's ``rope_theta`` and ``head_dim`` (transformers' formula)."""
    dim = fingerprint.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return RopeTable(inv_freq=1.0 / (fingerprint.rope_theta**exponents))


def to_code_space(
    x: torch.Tensor, *, kind: str, rotation: Rotation, positions: torch.Tensor, rope: RopeTable | None
) -> torch.Tensor:
    """``x`` (``[..., tokens, head_dim]``) as it is quantized under ``rotation``; float32."""
    if rotation == "none":
        return x.float()
    if kind == "k" and rotation == "hadamard-prerope":
        if rope is None:
            raise ValueError("hadamard-prerope needs the RoPE table of the keys")
        x = unrotate(x, rope, positions.to(x.device))
    return torch.matmul(x.float(), hadamard(x.shape[-1], x.device))


def from_code_space(
    x: torch.Tensor, *, kind: str, rotation: Rotation, positions: torch.Tensor, rope: RopeTable | None
) -> torch.Tensor:
    """Inverse of :func:`to_code_space`; float32 (:func:`from_code_space_into` into a new tensor)."""
    cos_sin = None
    if kind == "k" and rotation == "hadamard-prerope":
        if rope is None:
            raise ValueError("hadamard-prerope needs the RoPE table of the keys")
        cos_sin = rope.cos_sin(positions.to(x.device))
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    # The decoder's in-place inverse uses its input as scratch: hand it one float32 copy of x.
    scratch = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    from_code_space_into(out, scratch, kind=kind, rotation=rotation, cos_sin=cos_sin)
    return out


def from_code_space_into(
    dest: torch.Tensor,
    coded: torch.Tensor,
    *,
    kind: str,
    rotation: Rotation,
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
    scratch: torch.Tensor | None = None,
) -> None:
    """Write :func:`from_code_space` of ``coded`` into ``dest`` (any float dtype, views are fine).

    The decoder's path: ``coded`` is a contiguous float32 tensor that this overwrites; ``scratch``, if
    given, a second one of the same shape (the decoder reuses both layer after layer: fresh buffers of a
    whole block cost more in page faults than the arithmetic). ``cos_sin`` (``[tokens, head_dim]`` each,
    from ``rope.cos_sin(positions)``) is needed for pre-RoPE keys. One matrix product and, for those keys,
    three in-place passes.
    """
    if rotation == "none":
        dest.copy_(coded)
        return
    dim = coded.shape[-1]
    mixed = torch.empty_like(coded) if scratch is None else scratch
    torch.mm(coded.view(-1, dim), hadamard(dim, coded.device), out=mixed.view(-1, dim))
    if kind != "k" or rotation != "hadamard-prerope":
        dest.copy_(mixed)
        return
    if cos_sin is None:
        raise ValueError("hadamard-prerope keys need the RoPE cos/sin of their positions")
    cos, sin = cos_sin
    half = dim // 2
    # RoPE: x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x[half:], x[:half]).
    torch.mul(mixed, cos, out=coded)
    coded[..., :half].addcmul_(mixed[..., half:], sin[..., :half], value=-1.0)
    coded[..., half:].addcmul_(mixed[..., :half], sin[..., half:])
    dest.copy_(coded)
