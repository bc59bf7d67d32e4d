"""The compression budget: one frozen value object that drives the card encoder.

A :class:`Budget` says how hard to compress and which techniques to use; the encoder applies it and the card
records ``budget.to_dict()`` so every receiver (and every benchmark table) can see what was done.

Meaning of the fields:

* ``bits``: when ``adaptive`` is false, the uniform code width of keys and values (1..8, 16 = fp16,
  32 = raw fp32). When ``adaptive`` is true, the average stored bits per value *including* the fp16 scale and
  zero of every quantization group (``32 / group_size`` bits per value); :mod:`qkv._allocate` spends it across
  layers and tensors and never exceeds it. With ``token_mixed`` the code width is a token-weighted average
  over importance classes (see :func:`qkv._importance.class_bits_for_budget`).
* ``keep``: fraction of context tokens kept by eviction (1.0 = no eviction); ``sinks`` first tokens and the
  last ``window`` tokens are always kept, and ``obf`` adds Orthogonal BackFill to the kept values.
* ``layers``: fraction of layers sent (1.0 = all).
* ``facts``: attach a short text of keyphrases and regex facts to the card.
* ``rotation``: the orthogonal transform quantized K and V are coded in (:mod:`qkv._rotation`; not ``"none"``
  makes a v2 card). ``fp16_sinks``: the first that many tokens (by position: attention sinks) are stored in
  fp16 outside the quantization groups. An adaptive budget's ``bits`` then pays for them: the rest of the
  tokens get what remains.

``to_dict`` leaves out ``rotation`` and ``fp16_sinks`` at their defaults, so a card made without them records
the same budget keys as before they existed (older readers refuse unknown budget keys).

``from_dict`` reads what came inside a card, so it raises :class:`~qkv._errors.CardFormatError` (a
``ValueError``) naming the offending key; the constructor raises plain ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ._errors import CardFormatError
from ._rotation import Rotation, check_rotation

#: Code widths a uniform (non-adaptive) budget may name.
UNIFORM_WIDTHS = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 16, 32})


@dataclass(frozen=True, kw_only=True)
class Budget:
    """How to compress one snapshot into a card; see the module docstring for each field."""

    bits: float = 4.0
    keep: float = 1.0
    layers: float = 1.0
    facts: bool = False
    token_mixed: bool = False
    obf: bool = False
    group_size: int = 32
    adaptive: bool = False
    sinks: int = 4
    window: int = 32
    obf_rank: int = 4
    rotation: Rotation = "none"
    fp16_sinks: int = 0

    def __post_init__(self) -> None:
        check_rotation(self.rotation)
        for name in ("facts", "token_mixed", "obf", "adaptive"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"budget {name} must be a bool, got {getattr(self, name)!r}")
        for name in ("bits", "keep", "layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"budget {name} must be a finite number, got {value!r}")
        for name in ("group_size", "sinks", "window", "obf_rank", "fp16_sinks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"budget {name} must be an int, got {value!r}")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"budget keep must be in (0, 1], got {self.keep}")
        if not 0.0 < self.layers <= 1.0:
            raise ValueError(f"budget layers must be in (0, 1], got {self.layers}")
        if not 1 <= self.group_size <= 4096:
            raise ValueError(f"budget group_size must be in 1..4096, got {self.group_size}")
        if self.sinks < 0 or self.window < 0 or self.fp16_sinks < 0:
            raise ValueError("budget sinks, window and fp16_sinks must be >= 0")
        if self.obf_rank < 1:
            raise ValueError(f"budget obf_rank must be >= 1, got {self.obf_rank}")
        if self.adaptive or self.token_mixed:
            # An average: any real value in the range a mix of widths can reach.
            if not 1.0 <= self.bits <= 32.0:
                raise ValueError(f"budget bits must be in [1, 32] bits per value, got {self.bits}")
        elif self.bits not in UNIFORM_WIDTHS:
            raise ValueError(
                f"a uniform budget needs bits in {sorted(UNIFORM_WIDTHS)}, got {self.bits} "
                "(set adaptive=True for a real-valued average)"
            )

    @property
    def evicts(self) -> bool:
        return self.keep < 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/msgpack-safe dict of every field."""
        data = asdict(self)
        data["bits"] = float(self.bits)
        data["keep"] = float(self.keep)
        data["layers"] = float(self.layers)
        for name, default in (("rotation", "none"), ("fp16_sinks", 0)):
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: object) -> Budget:
        """Inverse of :meth:`to_dict`; unknown, missing-typed or out-of-range keys raise CardFormatError."""
        if not isinstance(data, dict):
            raise CardFormatError(f"budget must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise CardFormatError(f"unknown budget key(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise CardFormatError(f"invalid budget: {exc}") from exc
