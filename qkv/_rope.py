"""Rotary position embedding (RoPE) tables of a model, and rotation / de-rotation of cached keys.

Cached keys are stored *after* RoPE (``k_rot = k * cos + rotate_half(k) * sin``, the rotate-half convention
of transformers' Llama and Gemma 3 code). To compare keys of two models, or to move a key to another position,
the rotation is undone with the same table at the token's own position and applied again elsewhere.

Contracts:

* :func:`rope_tables_of` returns one :class:`RopeTable` per decoder layer: per-layer-type tables where
  the model has them (Gemma 3: ``sliding_attention`` layers use theta 1e4, ``full_attention`` layers 1e6),
  else the one table of the model. The inverse frequencies are read from the model's own rotary module, so
  RoPE variants that only change the frequencies (``linear``, ``llama3``, ``yarn``) are covered exactly;
  types whose frequencies depend on the sequence length (``dynamic``, ``longrope``) and partial rotary
  dimensions are refused with :class:`~qkv._errors.CalibrationError`.
* ``cos``/``sin`` are computed in float32 from ``positions * inv_freq`` as transformers does, then multiplied
  by the table's ``scaling`` (``attention_scaling``, 1.0 for default RoPE). :func:`unrotate` divides by
  ``cos**2 + sin**2`` so it inverts :func:`rotate` for any scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._errors import CalibrationError

__all__ = ["RopeTable", "rope_tables_of", "rotate", "unrotate"]

_LENGTH_DEPENDENT_TYPES = frozenset({"dynamic", "longrope"})


@dataclass(frozen=True, kw_only=True)
class RopeTable:
    """Inverse frequencies (float32, ``[head_dim // 2]``) and the cos/sin scaling of one layer's RoPE."""

    inv_freq: torch.Tensor
    scaling: float = 1.0

    @property
    def head_dim(self) -> int:
        return 2 * int(self.inv_freq.shape[0])

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` of shape ``[tokens, head_dim]`` (float32) at integer ``positions``."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(torch.float32)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scaling, emb.sin() * self.scaling

    def same_as(self, other: RopeTable) -> bool:
        return self.scaling == other.scaling and torch.equal(self.inv_freq, other.inv_freq)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _checked(x: torch.Tensor, table: RopeTable, positions: torch.Tensor) -> None:
    if x.shape[-1] != table.head_dim:
        raise ValueError(f"head_dim {x.shape[-1]} does not match the RoPE table ({table.head_dim})")
    if x.dim() < 2 or x.shape[-2] != positions.shape[0]:
        raise ValueError(f"keys {tuple(x.shape)} need one position per token, got {positions.shape[0]}")


def rotate(x: torch.Tensor, table: RopeTable, positions: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to ``x`` (``[..., tokens, head_dim]``) at ``positions``; float32 result."""
    _checked(x, table, positions)
    cos, sin = table.cos_sin(positions)
    x32 = x.to(torch.float32)
    return x32 * cos + _rotate_half(x32) * sin


def unrotate(x: torch.Tensor, table: RopeTable, positions: torch.Tensor) -> torch.Tensor:
    """Undo :func:`rotate` at the same ``positions``: the pre-RoPE keys, float32."""
    _checked(x, table, positions)
    cos, sin = table.cos_sin(positions)
    x32 = x.to(torch.float32)
    # Rotation by -theta is x*cos - rotate_half(x)*sin; the division removes any attention scaling twice.
    return (x32 * cos - _rotate_half(x32) * sin) / (cos * cos + sin * sin)


def _rotary_module(model: Any) -> Any:
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    raise CalibrationError(f"{type(model).__name__} has no rotary embedding module (…rotary_emb)")


def _rope_types(rotary: Any) -> set[str]:
    kind = getattr(rotary, "rope_type", "default")
    return {str(v) for v in kind.values()} if isinstance(kind, dict) else {str(kind)}


def rope_tables_of(model: Any) -> tuple[RopeTable, ...]:
    """One RoPE table per decoder layer of a transformers causal LM (see the module docstring)."""
    config = model.config.get_text_config(decoder=True)
    num_layers = int(config.num_hidden_layers)
    num_heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // num_heads)
    rotary = _rotary_module(model)
    dynamic = _rope_types(rotary) & _LENGTH_DEPENDENT_TYPES
    if dynamic:
        raise CalibrationError(f"RoPE type {sorted(dynamic)} depends on the sequence length: not supported")
    layer_types = getattr(config, "layer_types", None) or [None] * num_layers
    tables: list[RopeTable] = []
    for index in range(num_layers):
        kind = layer_types[index]
        if kind is not None and hasattr(rotary, f"{kind}_inv_freq"):
            inv_freq = getattr(rotary, f"{kind}_inv_freq")
            scaling = getattr(rotary, f"{kind}_attention_scaling", 1.0)
        elif hasattr(rotary, "inv_freq"):
            inv_freq = rotary.inv_freq
            scaling = getattr(rotary, "attention_scaling", 1.0)
        else:
            raise CalibrationError(f"layer {index}: no inverse RoPE frequencies for layer type {kind!r}")
        table = RopeTable(
            inv_freq=inv_freq.detach().to(device="cpu", dtype=torch.float32).clone(),
            scaling=float(1.0 if scaling is None else scaling),
        )
        if table.head_dim != head_dim:
            raise CalibrationError(
                f"layer {index}: RoPE rotates {table.head_dim} of {head_dim} dims; "
                "partial RoPE is not supported"
            )
        tables.append(table)
    return tuple(tables)
