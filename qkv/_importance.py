"""Token importance from the attention of an observation window (the QKVShare / SnapKV idea).

Input layout (``AttentionWindow``): the attention probabilities that the last ``window`` context queries gave
to every context token, either one tensor ``[layers, heads, window, tokens]`` or a sequence with one tensor
per layer, each ``[heads, window, tokens]`` or ``[1, heads, window, tokens]`` (what transformers returns with
``output_attentions=True`` after slicing the last ``window`` query rows). ``heads`` are query heads; under GQA
query head ``h`` reads KV head ``h // (heads // kv_heads)`` (transformers' ``repeat_kv`` order), so a KV
head's importance is the mean over its group of query heads.

Outputs:

* :func:`head_importance` -> ``[layers, kv_heads, tokens]``: raw attention mass each token received (mean over
  window queries and the query-head group). Rows sum to at most 1. This is what OBF weights with.
* :func:`token_importance` -> ``[tokens]``: that mass averaged over layers and heads, plus a bonus of
  :data:`PROTECTED_BONUS` for the first ``sinks`` tokens and the last ``recent`` tokens, so they outrank
  every other token while keeping their attention order among themselves. Use it for ranking only, never as
  attention mass.
* :func:`token_classes` -> ``uint8 [tokens]``: class 0 = most important, sizes given by ``shares``.
* :func:`class_bits_for_budget`: integer code widths per class whose token-weighted mean is the largest one
  not above a target.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

AttentionWindow = torch.Tensor | Sequence[torch.Tensor]

#: Added to protected tokens. Unprotected importance is a mean of probabilities, so at most 1 < 2.
PROTECTED_BONUS = 2.0
#: Most importance classes a card may use (class ids are uint8, widths are enumerated exhaustively).
MAX_CLASSES = 8
DEFAULT_CLASS_WIDTHS = (2, 3, 4, 5, 6, 7, 8)


def _stack_layers(attn: AttentionWindow) -> torch.Tensor:
    if isinstance(attn, torch.Tensor):
        if attn.dim() != 4:
            raise ValueError(f"attention must be [layers, heads, window, tokens], got {tuple(attn.shape)}")
        stacked = attn
    else:
        per_layer: list[torch.Tensor] = []
        for index, layer in enumerate(attn):
            if layer.dim() == 4 and layer.shape[0] == 1:
                layer = layer[0]
            if layer.dim() != 3:
                raise ValueError(
                    f"layer {index} attention must be [heads, window, tokens], got shape {tuple(layer.shape)}"
                )
            per_layer.append(layer)
        if not per_layer:
            raise ValueError("attention has no layers")
        shapes = {tuple(t.shape) for t in per_layer}
        if len(shapes) != 1:
            raise ValueError(f"every layer needs the same attention shape, got {sorted(shapes)}")
        stacked = torch.stack(per_layer)
    stacked = stacked.to(torch.float32)
    if stacked.shape[-1] == 0 or stacked.shape[-2] == 0:
        raise ValueError("attention window and token axes must be non-empty")
    if not bool(torch.isfinite(stacked).all()) or bool((stacked < 0).any()):
        raise ValueError("attention probabilities must be finite and non-negative")
    return stacked


def head_importance(attn: AttentionWindow, *, num_kv_heads: int | None = None) -> torch.Tensor:
    """Attention mass each token received, ``[layers, kv_heads, tokens]`` (float32).

    Mean over the window's queries, then over each KV head's group of query heads. ``num_kv_heads=None``
    keeps one row per query head.
    """
    stacked = _stack_layers(attn)
    received = stacked.mean(dim=2)  # [layers, heads, tokens]
    if num_kv_heads is None:
        return received
    layers, heads, tokens = received.shape
    if num_kv_heads < 1 or heads % num_kv_heads:
        raise ValueError(f"{heads} query heads cannot be grouped into {num_kv_heads} KV heads")
    return received.reshape(layers, num_kv_heads, heads // num_kv_heads, tokens).mean(dim=2)


def protect(scores: torch.Tensor, *, sinks: int, recent: int) -> torch.Tensor:
    """Copy of 1-D ``scores`` plus :data:`PROTECTED_BONUS` on the first ``sinks`` and last ``recent``."""
    if sinks < 0 or recent < 0:
        raise ValueError("sinks and recent must be >= 0")
    out = scores.clone()
    tokens = out.shape[0]
    protected = torch.zeros(tokens, dtype=torch.bool)
    protected[: min(sinks, tokens)] = True
    if recent:
        protected[max(tokens - recent, 0) :] = True
    out[protected] += PROTECTED_BONUS
    return out


def token_importance(attn: AttentionWindow, *, sinks: int = 4, recent: int | None = None) -> torch.Tensor:
    """Ranking score per token, ``[tokens]`` (float32); see the module docstring.

    ``recent`` defaults to the window length: the observation window's own tokens receive attention only
    from the queries after them, so their raw score understates them.
    """
    stacked = _stack_layers(attn)
    received = stacked.mean(dim=(0, 1, 2))
    window = stacked.shape[2]
    return protect(received, sinks=sinks, recent=window if recent is None else recent)


def _check_shares(shares: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(s) for s in shares)
    if not 1 <= len(values) <= MAX_CLASSES:
        raise ValueError(f"need 1..{MAX_CLASSES} class shares, got {len(values)}")
    if any(not math.isfinite(s) or s <= 0 for s in values):
        raise ValueError(f"class shares must be positive, got {values}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"class shares must sum to 1, got {sum(values)}")
    return values


def token_classes(importance: torch.Tensor, *, shares: Sequence[float] = (0.1, 0.3, 0.6)) -> torch.Tensor:
    """Importance class of every token, ``uint8 [tokens]``; class 0 holds the most important ``shares[0]``.

    Class sizes are ``round(cumsum(shares) * tokens)`` differences, so they add up to ``tokens`` exactly.
    Ties are broken by position (earlier token ranks higher), so the result is deterministic.
    """
    values = _check_shares(shares)
    if importance.dim() != 1:
        raise ValueError(f"importance must be 1-D [tokens], got shape {tuple(importance.shape)}")
    tokens = importance.shape[0]
    order = torch.sort(-importance.to(torch.float32), stable=True).indices
    classes = torch.empty(tokens, dtype=torch.uint8)
    start = 0
    cumulative = 0.0
    for index, share in enumerate(values):
        cumulative += share
        end = tokens if index == len(values) - 1 else min(tokens, round(cumulative * tokens))
        classes[order[start:end]] = index
        start = max(start, end)
    return classes


def attention_mass_by_class(
    received: torch.Tensor, classes: torch.Tensor, num_classes: int
) -> tuple[float, ...]:
    """Share of the attention mass ``received`` (1-D, raw, not protected) that falls in each class."""
    if received.shape != classes.shape or received.dim() != 1:
        raise ValueError("received and classes must both be 1-D of the same length")
    totals = torch.zeros(num_classes, dtype=torch.float64)
    totals.index_add_(0, classes.to(torch.int64), received.to(torch.float64))
    whole = float(totals.sum())
    if whole <= 0:
        return tuple(1.0 / num_classes for _ in range(num_classes))
    return tuple(float(t) / whole for t in totals)


def class_bits_for_budget(
    shares: Sequence[float],
    target_bits: float,
    *,
    class_mass: Sequence[float] | None = None,
    widths: Sequence[int] = DEFAULT_CLASS_WIDTHS,
) -> tuple[int, ...]:
    """Integer width per class, non-increasing from class 0, with the largest mean not above ``target_bits``.

    The mean is token-weighted (``sum(share * width)``); scale/zero overhead is the same for every class and
    is not counted here. Among mixes with that mean, pick the least predicted error
    ``sum(mass_c * 4 ** -width_c)`` (uniform quantization noise power falls 4x per bit; ``class_mass`` is
    each class's share of attention, default = its share of tokens, which makes equal widths win), then the
    one that gives more bits to the more important classes. Raises ``ValueError`` if even the narrowest
    width exceeds the target.
    """
    values = _check_shares(shares)
    mass = values if class_mass is None else tuple(float(m) for m in class_mass)
    if len(mass) != len(values) or any(not math.isfinite(m) or m < 0 for m in mass):
        raise ValueError("class_mass needs one non-negative finite value per class")
    candidates = sorted({int(w) for w in widths}, reverse=True)
    if not candidates or candidates[-1] < 1:
        raise ValueError(f"widths must be positive integers, got {tuple(widths)}")
    if not math.isfinite(target_bits):
        raise ValueError(f"target_bits must be finite, got {target_bits}")
    tolerance = 1e-9
    best: tuple[float, float, tuple[int, ...]] | None = None
    # combinations_with_replacement over descending widths yields exactly the non-increasing tuples.
    for mix in itertools.combinations_with_replacement(candidates, len(values)):
        mean = sum(s * w for s, w in zip(values, mix, strict=True))
        if mean > target_bits + tolerance:
            continue
        error = sum(m * 4.0 ** (-w) for m, w in zip(mass, mix, strict=True))
        key = (round(mean / tolerance) * tolerance, -error, mix)
        if best is None or key > best:
            best = key
    if best is None:
        raise ValueError(f"no mix of widths {candidates} fits {target_bits} bits per value")
    return best[2]
