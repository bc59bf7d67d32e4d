"""Layer selection (KVComm's idea): send only the layers whose KV matters most to the receiver.

A layer's score mixes two terms:

* how much attention the observation-window queries put on the *context* tokens (not the template or the
  sink tokens) in that layer, min-max normalised over layers: layers that read the context carry it;
* a Gaussian prior over relative depth (``mu``, ``sigma``).

``score = weight * attention + (1 - weight) * prior``; the top ``ceil(fraction * layers)`` layers are sent.

Defaults are measured, not assumed (SmolLM2-135M, 12 HotpotQA rows, fp16 KV, the receiver's own template KV
in unsent layers, mean KL vs the text condition; no context: 2.78): sending the deeper half of the layers
(layers 15-29) gave 0.64, every other layer 0.71, layers 10-24 0.84, the first half 2.74 (as bad as no
context), and the old default (``weight=0.5, mu=0.5``, which picked layers 0-2 and 6-22) 2.22; the attention
term alone picked 2.45. So the default is the depth prior alone, centred deep (``weight=0, mu=0.75``): the
receiver's question tokens read the context in the later layers, while its first layers' KV only matters
through what later layers computed from it on the sender.
"""

from __future__ import annotations

import math

import torch


def depth_prior(num_layers: int, *, mu: float = 0.75, sigma: float = 0.3) -> torch.Tensor:
    """Gaussian over relative depth ``i / (layers - 1)``, peak 1."""
    if num_layers < 1:
        raise ValueError("num_layers must be >= 1")
    depth = torch.arange(num_layers, dtype=torch.float64) / max(num_layers - 1, 1)
    return torch.exp(-((depth - mu) ** 2) / (2 * sigma**2))


def layer_scores(
    per_head: torch.Tensor,
    *,
    context_span: tuple[int, int],
    weight: float = 0.0,
    mu: float = 0.75,
    sigma: float = 0.3,
) -> torch.Tensor:
    """Score per layer from attention mass ``[layers, kv_heads, tokens]`` (see the module docstring)."""
    if per_head.dim() != 3:
        raise ValueError("per_head must be [layers, kv_heads, tokens]")
    if not 0.0 <= weight <= 1.0:
        raise ValueError("weight must be in [0, 1]")
    start, end = context_span
    tokens = per_head.shape[-1]
    start, end = max(0, min(start, tokens)), max(0, min(end, tokens))
    mass = per_head.to(torch.float64).sum(dim=1)  # [layers, tokens]
    total = mass.sum(dim=-1).clamp_min(1e-12)
    on_context = mass[:, start:end].sum(dim=-1) / total
    spread = on_context.max() - on_context.min()
    attention = (on_context - on_context.min()) / spread if spread > 0 else torch.ones_like(on_context)
    prior = depth_prior(per_head.shape[0], mu=mu, sigma=sigma)
    return weight * attention + (1.0 - weight) * prior


def select_layers(
    per_head: torch.Tensor,
    *,
    fraction: float,
    context_span: tuple[int, int],
    weight: float = 0.0,
    mu: float = 0.75,
    sigma: float = 0.3,
) -> tuple[int, ...]:
    """Indices (ascending) of the ``ceil(fraction * layers)`` best-scoring layers."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    num_layers = per_head.shape[0]
    count = max(1, math.ceil(fraction * num_layers))
    if count >= num_layers:
        return tuple(range(num_layers))
    scores = layer_scores(per_head, context_span=context_span, weight=weight, mu=mu, sigma=sigma)
    chosen = torch.topk(scores, count).indices
    return tuple(sorted(int(i) for i in chosen))
