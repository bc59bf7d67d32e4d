"""In-memory KV cache of one sequence, independent of transformers' cache classes.

This is the hand-off type between the model adapter (`qkv._hf`) and the card codec (`qkv._card`):
the adapter extracts a :class:`KVSnapshot` after a prefill and injects one before `generate()`;
the codec turns one into bytes and back. Batch size is always 1, so tensors drop the batch axis.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ._errors import CardCompatError


@dataclass(frozen=True, kw_only=True)
class ModelFingerprint:
    """What a receiver must share with the sender for a card's KV to mean the same thing."""

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_params: str = ""  # canonical JSON of any other RoPE parameters ("" when none)
    tokenizer_hash: str = ""  # sha256 hex of the sorted vocabulary

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFingerprint:
        try:
            return cls(
                architecture=str(data["architecture"]),
                num_layers=int(data["num_layers"]),
                num_kv_heads=int(data["num_kv_heads"]),
                head_dim=int(data["head_dim"]),
                rope_theta=float(data["rope_theta"]),
                rope_params=str(data.get("rope_params", "")),
                tokenizer_hash=str(data.get("tokenizer_hash", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CardCompatError(f"malformed model fingerprint: {exc!r}") from exc

    @property
    def digest(self) -> str:
        """Short stable id, used to name calibration profiles and artifacts."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def require_same(self, other: ModelFingerprint) -> None:
        """Raise :class:`CardCompatError` naming the first field on which the two models differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        for key, value in mine.items():
            if theirs[key] != value:
                raise CardCompatError(
                    f"card was made by another model: {key} is {theirs[key]!r} in the card, "
                    f"{value!r} in this receiver ({other.architecture} -> {self.architecture})"
                )


@dataclass(frozen=True, kw_only=True)
class KVSnapshot:
    """Keys and values of one sequence for every layer.

    ``keys[i]`` and ``values[i]`` have shape ``[kv_heads, tokens, head_dim]`` (the GQA layout of the cache,
    before any head repetition), or are ``None`` for a layer that was not sent (layer selection).
    ``positions`` (int64, ``[tokens]``) holds each kept token's original RoPE position: after token eviction
    it is increasing but not contiguous, and the receiver's own tokens continue from ``positions[-1] + 1``.
    """

    keys: tuple[torch.Tensor | None, ...]
    values: tuple[torch.Tensor | None, ...]
    positions: torch.Tensor
    fingerprint: ModelFingerprint
    # Number of leading tokens that belong to the prompt template before the context starts.
    template_prefix_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values):
            raise ValueError("keys and values must have one entry per layer")

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def next_position(self) -> int:
        """Position the receiver's first own token takes."""
        return int(self.positions[-1].item()) + 1 if self.num_tokens else 0

    def fp16_bytes(self) -> int:
        """Bytes these K/V tensors take in fp16: the denominator of every compression ratio we report."""
        total = 0
        for k, v in zip(self.keys, self.values, strict=True):
            if k is not None:
                total += k.numel() * 2
            if v is not None:
                total += v.numel() * 2
        return total

    def followed_by(self, tail: KVSnapshot) -> KVSnapshot:
        """This snapshot's tokens, then ``tail``'s: one sequence whose head and tail were computed apart.

        Exact when ``tail`` is the KV the same model computed for the later tokens with this head before them
        (attention is causal: a token's KV depends only on the tokens before it). Both must come from one
        model, send the same layers, and every tail position must come after this snapshot's last; the tail's
        tensors are moved to this snapshot's device and dtype. ``template_prefix_tokens`` adds up (the
        template may reach into the tail), ``extra`` is this snapshot's. Raises :class:`CardCompatError`.
        """
        self.fingerprint.require_same(tail.fingerprint)
        if tail.num_layers != self.num_layers:
            raise CardCompatError(f"head has {self.num_layers} layers, tail has {tail.num_layers}")
        if tail.num_tokens and self.num_tokens and int(tail.positions[0]) < self.next_position:
            raise CardCompatError(
                f"tail starts at position {int(tail.positions[0])}, inside the head (positions up to "
                f"{self.next_position - 1})"
            )
        keys: list[torch.Tensor | None] = []
        values: list[torch.Tensor | None] = []
        pairs = zip(self.keys, self.values, tail.keys, tail.values, strict=True)
        for layer, (k, v, tail_k, tail_v) in enumerate(pairs):
            joined: list[torch.Tensor | None] = []
            for mine, theirs in ((k, tail_k), (v, tail_v)):
                if mine is None and theirs is None:
                    joined.append(None)
                    continue
                if mine is None or theirs is None:
                    raise CardCompatError(
                        f"layer {layer} is in one of head and tail only: they cannot be joined"
                    )
                if mine.dim() != 3 or theirs.dim() != 3 or mine.shape[::2] != theirs.shape[::2]:
                    raise CardCompatError(
                        f"layer {layer}: head {tuple(mine.shape)} and tail {tuple(theirs.shape)} are not "
                        "[kv_heads, tokens, head_dim] of one geometry"
                    )
                joined.append(torch.cat([mine, theirs.to(device=mine.device, dtype=mine.dtype)], dim=1))
            keys.append(joined[0])
            values.append(joined[1])
        return KVSnapshot(
            keys=tuple(keys),
            values=tuple(values),
            positions=torch.cat([self.positions, tail.positions.to(self.positions.device)]),
            fingerprint=self.fingerprint,
            template_prefix_tokens=self.template_prefix_tokens + tail.template_prefix_tokens,
            extra=dict(self.extra),
        )
