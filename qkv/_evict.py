"""Token eviction with Orthogonal BackFill (OBF) over a :class:`~qkv._kv.KVSnapshot`.

Selection is shared: one kept token set for every layer and head, because one transformers ``DynamicLayer``
holds the same token count for all its heads and the snapshot has one ``positions`` vector. The first
``sinks`` tokens and the last ``window`` tokens (the observation window) are always kept; the rest of the
``round(keep * tokens)`` slots go to the highest-scoring tokens. Kept tokens keep their ORIGINAL positions
(a subset of ``snapshot.positions``, still increasing), so the receiver applies RoPE where the sender did.

``importance`` is the raw attention mass each token received from the observation window, either ``[tokens]``
or ``[layers, kv_heads, tokens]`` (:func:`qkv._importance.head_importance`). A 1-D importance ranks tokens as
it is. A 3-D one ranks by :func:`selection_scores`: each (layer, head) row's mass over the unprotected tokens,
renormalised to sum to 1, then averaged, so every head gets an equal vote. Without the renormalisation the
heads that park most of their mass on the sink tokens (always kept anyway) barely vote, and the ranking is
left to a few local heads (SmolLM2-135M, 16 HotpotQA rows, 4-bit, keep 0.5: KL vs text 1.61 -> 1.42; with
re-read attention, :func:`qkv._hf.prefill_reread`, 0.97). OBF treats importance as attention mass, so it must
not carry the protection bonus of :func:`qkv._importance.token_importance` (values above 1 are refused when
``obf`` is set).

OBF, per layer and per KV head (or per layer with the heads' features concatenated, ``per_head_obf=False``):
with masses ``A_K`` (kept) and ``A_D`` (discarded), the full readout is ``A_K m_K + A_D m_D`` over
``A_K + A_D`` while the renormalised kept-only readout is ``m_K`` (``m`` = attention-weighted mean value).
Adding one vector ``c`` to every kept value shifts the kept readout by exactly ``c``, so the ideal shift is
``A_D / (A_K + A_D) * (m_D - m_K)``. OBF keeps the part of it the kept values cannot express: the discarded
values' residual orthogonal to the kept values' principal subspace (the one holding ``span_energy`` of their
energy; ``span_energy=1`` is the exact span, which is all of R^head_dim once ``kept >= head_dim``), projected
on the residuals' top ``obf_rank`` attention-weighted principal directions. Keys are never changed.
"""

from __future__ import annotations

import torch

from ._kv import KVSnapshot


def _check_importance(importance: torch.Tensor, snapshot: KVSnapshot) -> torch.Tensor:
    tokens = snapshot.num_tokens
    if importance.dim() == 1:
        expected: tuple[int, ...] = (tokens,)
    elif importance.dim() == 3:
        expected = (snapshot.num_layers, int(importance.shape[1]), tokens)
    else:
        raise ValueError(
            f"importance must be [tokens] or [layers, kv_heads, tokens], got {tuple(importance.shape)}"
        )
    if tuple(importance.shape) != expected:
        raise ValueError(f"importance shape {tuple(importance.shape)} does not match the snapshot {expected}")
    scores = importance.detach().to(torch.float64)
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise ValueError("importance must be finite and non-negative")
    return scores


def kept_count(tokens: int, *, keep: float, sinks: int, window: int) -> int:
    """How many tokens :func:`select_tokens` keeps: ``round(keep * tokens)``, at least the protected ones."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if sinks < 0 or window < 0:
        raise ValueError("sinks and window must be >= 0")
    protected = min(tokens, sinks + window)
    return min(tokens, max(protected, round(keep * tokens)))


def protected_mask(tokens: int, *, sinks: int, window: int) -> torch.Tensor:
    """Boolean ``[tokens]``: the first ``sinks`` and last ``window`` tokens, which eviction always keeps."""
    protected = torch.zeros(tokens, dtype=torch.bool)
    protected[: min(sinks, tokens)] = True
    if window:
        protected[max(tokens - window, 0) :] = True
    return protected


def selection_scores(importance: torch.Tensor, *, sinks: int, window: int) -> torch.Tensor:
    """Ranking score per token (float64 ``[tokens]``) from ``[layers, kv_heads, tokens]`` attention mass.

    Each row is restricted to the unprotected tokens and renormalised to sum to 1 (a row with no mass there
    stays zero), then rows are averaged; protected tokens score 0 (they are kept regardless).
    """
    if importance.dim() != 3:
        raise ValueError(f"importance must be [layers, kv_heads, tokens], got {tuple(importance.shape)}")
    free = ~protected_mask(importance.shape[-1], sinks=sinks, window=window)
    mass = importance.to(torch.float64) * free
    totals = mass.sum(dim=-1, keepdim=True)
    shares = torch.where(totals > 0, mass / totals.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return shares.mean(dim=(0, 1))


def select_tokens(scores: torch.Tensor, *, keep: float, sinks: int = 4, window: int = 32) -> torch.Tensor:
    """Sorted int64 indices of the kept tokens; ``scores`` is 1-D, higher = more important.

    Ties go to the earlier token, so the choice is deterministic.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    tokens = scores.shape[0]
    count = kept_count(tokens, keep=keep, sinks=sinks, window=window)
    protected = protected_mask(tokens, sinks=sinks, window=window)
    free = count - int(protected.sum())
    candidates = torch.nonzero(~protected).flatten()
    order = torch.sort(-scores[candidates].to(torch.float64), stable=True).indices
    chosen = torch.cat([torch.nonzero(protected).flatten(), candidates[order[:free]]])
    return torch.sort(chosen).values


def orthogonal_backfill(
    values: torch.Tensor,
    weights: torch.Tensor,
    kept: torch.Tensor,
    *,
    rank: int = 4,
    span_energy: float = 0.95,
) -> torch.Tensor:
    """Kept rows of ``values`` (``[tokens, dim]``) plus the OBF compensation; see the module docstring.

    ``weights`` (``[tokens]``) is the attention mass per token; ``kept`` holds sorted indices. Computed in
    float64, returned in ``values.dtype``. Nothing discarded, or no mass on it: the kept rows unchanged.
    """
    if rank < 1:
        raise ValueError(f"obf rank must be >= 1, got {rank}")
    if not 0.0 < span_energy <= 1.0:
        raise ValueError(f"span_energy must be in (0, 1], got {span_energy}")
    tokens = values.shape[0]
    discarded_mask = torch.ones(tokens, dtype=torch.bool)
    discarded_mask[kept] = False
    kept_values = values[kept]
    w = weights.to(torch.float64)
    mass_kept = float(w[kept].sum())
    mass_discarded = float(w[discarded_mask].sum())
    if not bool(discarded_mask.any()) or mass_discarded <= 0.0 or kept.numel() == 0:
        return kept_values.clone()

    v_kept = kept_values.to(torch.float64)
    v_disc = values[discarded_mask].to(torch.float64)
    w_disc = w[discarded_mask]

    # Principal subspace of the kept values (uncentered: we want their span, not their spread).
    _, sing, vh = torch.linalg.svd(v_kept, full_matrices=False)
    energy = sing.square()
    total = float(energy.sum())
    if total <= 0.0:
        span_dims = 0
    elif span_energy >= 1.0:
        span_dims = int((sing > sing[0] * max(v_kept.shape) * torch.finfo(torch.float64).eps).sum())
    else:
        cumulative = torch.cumsum(energy, 0) / total
        span_dims = min(int((cumulative < span_energy - 1e-12).sum()) + 1, sing.shape[0])
    basis = vh[:span_dims].T  # [dim, span_dims]
    residual = v_disc - (v_disc @ basis) @ basis.T

    # Top attention-weighted principal directions of the residuals.
    weighted = residual * torch.sqrt(w_disc / mass_discarded).unsqueeze(1)
    _, res_sing, res_vh = torch.linalg.svd(weighted, full_matrices=False)
    significant = res_sing > res_sing[0] * max(weighted.shape) * torch.finfo(torch.float64).eps
    directions = res_vh[: min(rank, int(significant.sum()))].T  # [dim, p]
    if directions.shape[1] == 0:
        return kept_values.clone()
    mean_residual = (w_disc @ residual) / mass_discarded
    shift = (mass_discarded / (mass_kept + mass_discarded)) * (directions @ (directions.T @ mean_residual))
    compensated: torch.Tensor = (v_kept + shift).to(values.dtype)
    return compensated


def evict(
    snapshot: KVSnapshot,
    importance: torch.Tensor,
    *,
    keep: float,
    sinks: int = 4,
    window: int = 32,
    obf: bool = False,
    obf_rank: int = 4,
    per_head_obf: bool = True,
    span_energy: float = 0.95,
) -> KVSnapshot:
    """New snapshot of the kept tokens (with ``obf``, compensated values); see the module docstring.

    ``template_prefix_tokens`` becomes the number of kept tokens that were in the template prefix.
    """
    scores = _check_importance(importance, snapshot)
    if obf and scores.numel() and float(scores.max()) > 1.0 + 1e-6:
        raise ValueError("OBF needs raw attention mass (<= 1), not protected ranking scores")
    ranking = scores if scores.dim() == 1 else selection_scores(scores, sinks=sinks, window=window)
    kept = select_tokens(ranking, keep=keep, sinks=sinks, window=window)

    new_keys: list[torch.Tensor | None] = []
    new_values: list[torch.Tensor | None] = []
    for layer, (k, v) in enumerate(zip(snapshot.keys, snapshot.values, strict=True)):
        if k is None or v is None:
            new_keys.append(None if k is None else k[:, kept].clone())
            new_values.append(None if v is None else v[:, kept].clone())
            continue
        new_keys.append(k[:, kept].clone())
        if not obf or kept.numel() == snapshot.num_tokens:
            new_values.append(v[:, kept].clone())
            continue
        heads = v.shape[0]
        if scores.dim() == 3 and scores.shape[1] != heads:
            raise ValueError(f"importance has {scores.shape[1]} heads, layer {layer} has {heads} KV heads")
        layer_weights = scores.expand(heads, -1) if scores.dim() == 1 else scores[layer]
        if per_head_obf:
            filled = [
                orthogonal_backfill(v[h], layer_weights[h], kept, rank=obf_rank, span_energy=span_energy)
                for h in range(heads)
            ]
            new_values.append(torch.stack(filled))
        else:
            tokens, dim = v.shape[1], v.shape[2]
            joint = v.permute(1, 0, 2).reshape(tokens, heads * dim)
            joint_filled = orthogonal_backfill(
                joint, layer_weights.mean(dim=0), kept, rank=obf_rank, span_energy=span_energy
            )
            new_values.append(joint_filled.reshape(-1, heads, dim).permute(1, 0, 2).contiguous())

    prefix_kept = int((kept < snapshot.template_prefix_tokens).sum())
    return KVSnapshot(
        keys=tuple(new_keys),
        values=tuple(new_values),
        positions=snapshot.positions[kept].clone(),
        fingerprint=snapshot.fingerprint,
        template_prefix_tokens=prefix_kept,
        extra=dict(snapshot.extra),
    )
