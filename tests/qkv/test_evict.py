"""Token eviction with a shared kept set, original positions, and Orthogonal BackFill of values."""

from __future__ import annotations

import math

import pytest
import torch

from qkv._evict import evict, kept_count, orthogonal_backfill, select_tokens
from qkv._importance import head_importance, token_importance
from qkv._kv import KVSnapshot, ModelFingerprint

FINGERPRINT = ModelFingerprint(
    architecture="llama", num_layers=3, num_kv_heads=2, head_dim=16, rope_theta=1e5
)


def _snapshot(
    keys: list[torch.Tensor | None],
    values: list[torch.Tensor | None],
    positions: torch.Tensor,
    prefix: int = 0,
) -> KVSnapshot:
    return KVSnapshot(
        keys=tuple(keys),
        values=tuple(values),
        positions=positions,
        fingerprint=FINGERPRINT,
        template_prefix_tokens=prefix,
    )


def _random_snapshot(tokens: int = 80, seed: int = 0) -> KVSnapshot:
    generator = torch.Generator().manual_seed(seed)
    keys: list[torch.Tensor | None] = [torch.randn(2, tokens, 16, generator=generator) for _ in range(3)]
    values: list[torch.Tensor | None] = [torch.randn(2, tokens, 16, generator=generator) for _ in range(3)]
    keys[1] = values[1] = None  # a layer that was not sent
    positions = torch.arange(tokens, dtype=torch.int64) * 3 + 7  # already non-contiguous
    return _snapshot(keys, values, positions, prefix=6)


def _random_mass(tokens: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 2, 4, tokens, generator=generator) * 3.0
    return head_importance(torch.softmax(logits, dim=-1))


def test_positions_are_the_original_ones_and_increase() -> None:
    snapshot = _random_snapshot()
    mass = _random_mass(snapshot.num_tokens)
    out = evict(snapshot, mass, keep=0.4, sinks=4, window=8)
    positions = out.positions.tolist()
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)
    assert set(positions) <= set(snapshot.positions.tolist())
    assert out.next_position == snapshot.next_position  # the window is kept, so the tail is unchanged
    kept = [(p - 7) // 3 for p in positions]
    layer0 = snapshot.keys[0]
    assert layer0 is not None
    torch.testing.assert_close(out.keys[0], layer0[:, kept])


def test_sinks_window_and_keep_ratio_are_honoured() -> None:
    snapshot = _random_snapshot(tokens=100)
    mass = torch.zeros(100)
    mass[40:50] = 0.1  # attention elsewhere; sinks and window get none
    out = evict(snapshot, mass, keep=0.3, sinks=4, window=8)
    kept = ((out.positions - 7) // 3).tolist()
    assert out.num_tokens == round(0.3 * 100)
    assert set(range(4)) <= set(kept)
    assert set(range(92, 100)) <= set(kept)
    assert set(range(40, 50)) <= set(kept)
    assert out.keys[1] is None
    assert out.values[1] is None
    assert out.fingerprint == snapshot.fingerprint


def test_protected_tokens_win_over_a_small_keep_ratio() -> None:
    assert kept_count(100, keep=0.05, sinks=4, window=8) == 12
    assert kept_count(10, keep=0.5, sinks=4, window=8) == 10
    assert select_tokens(torch.zeros(10), keep=0.1, sinks=4, window=8).tolist() == list(range(10))


def test_template_prefix_counts_kept_prefix_tokens() -> None:
    snapshot = _random_snapshot(tokens=60)
    mass = torch.zeros(60)
    out = evict(snapshot, mass, keep=0.5, sinks=4, window=8)
    # Ties go to earlier tokens, so all 6 prefix tokens survive here; with sinks=2 and mass elsewhere not.
    assert out.template_prefix_tokens == 6
    mass[20:40] = 0.05
    out = evict(snapshot, mass, keep=0.5, sinks=2, window=8)
    assert out.template_prefix_tokens == 2


def test_obf_leaves_keys_untouched_and_changes_values() -> None:
    snapshot = _random_snapshot()
    mass = _random_mass(snapshot.num_tokens)
    plain = evict(snapshot, mass, keep=0.5, sinks=4, window=8)
    filled = evict(snapshot, mass, keep=0.5, sinks=4, window=8, obf=True, span_energy=0.5)
    for layer in (0, 2):
        torch.testing.assert_close(filled.keys[layer], plain.keys[layer], rtol=0, atol=0)
        plain_v, filled_v = plain.values[layer], filled.values[layer]
        assert plain_v is not None
        assert filled_v is not None
        assert not torch.equal(plain_v, filled_v)
        # The same shift is added to every kept token of a head.
        shift = filled_v - plain_v
        torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))
    torch.testing.assert_close(filled.positions, plain.positions)


def test_obf_with_nothing_discarded_is_a_no_op() -> None:
    snapshot = _random_snapshot()
    mass = _random_mass(snapshot.num_tokens)
    out = evict(snapshot, mass, keep=1.0, obf=True)
    for layer in (0, 2):
        torch.testing.assert_close(out.values[layer], snapshot.values[layer], rtol=0, atol=0)
    values = torch.randn(20, 8)
    everything = torch.arange(20)
    torch.testing.assert_close(
        orthogonal_backfill(values, torch.rand(20), everything), values, rtol=0, atol=0
    )


def test_exact_span_of_full_rank_kept_values_leaves_nothing_to_fill() -> None:
    generator = torch.Generator().manual_seed(5)
    values = torch.randn(64, 8, generator=generator)
    kept = torch.arange(0, 64, 2)  # 32 kept tokens span all of R^8
    out = orthogonal_backfill(values, torch.rand(64, generator=generator), kept, span_energy=1.0)
    torch.testing.assert_close(out, values[kept], atol=1e-5, rtol=0)


def test_obf_refuses_protected_ranking_scores() -> None:
    snapshot = _random_snapshot()
    scores = token_importance(torch.softmax(torch.randn(3, 2, 4, snapshot.num_tokens), dim=-1))
    evict(snapshot, scores, keep=0.5)  # fine for selection alone
    with pytest.raises(ValueError, match="raw attention mass"):
        evict(snapshot, scores, keep=0.5, obf=True)


def test_mismatched_importance_is_refused() -> None:
    snapshot = _random_snapshot()
    with pytest.raises(ValueError, match="does not match"):
        evict(snapshot, torch.zeros(snapshot.num_tokens + 1), keep=0.5)
    with pytest.raises(ValueError, match="keep"):
        evict(snapshot, torch.zeros(snapshot.num_tokens), keep=0.0)


def _readout(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    weights = torch.softmax(queries @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1]), dim=-1)
    return weights @ values


@pytest.mark.parametrize("per_head_obf", [True, False])
def test_obf_brings_the_kept_readout_closer_to_the_full_one(per_head_obf: bool) -> None:
    """Discarded values share a strong direction the kept values lack: OBF must recover most of it."""
    generator = torch.Generator().manual_seed(11)
    heads, tokens, dim, window = 2, 96, 16, 8
    keys = torch.randn(heads, tokens, dim, generator=generator)
    queries = torch.randn(heads, window, dim, generator=generator) * 0.8
    probabilities = torch.softmax(queries @ keys.transpose(-1, -2) / math.sqrt(dim), dim=-1)
    mass = probabilities.mean(dim=1)  # [heads, tokens]
    kept = select_tokens(mass.mean(dim=0), keep=0.5, sinks=4, window=window)
    discarded = torch.ones(tokens, dtype=torch.bool)
    discarded[kept] = False

    # Kept values live in a 3-dimensional subspace; discarded ones add 4.0 along e7 and noise everywhere.
    values = torch.zeros(heads, tokens, dim)
    values[:, :, :3] = torch.randn(heads, tokens, 3, generator=generator)
    values += 0.02 * torch.randn(heads, tokens, dim, generator=generator)
    values[:, discarded, 7] += 4.0 + 0.3 * torch.randn(heads, int(discarded.sum()), generator=generator)

    layer_keys: list[torch.Tensor | None] = [keys]
    layer_values: list[torch.Tensor | None] = [values]
    snapshot = _snapshot(layer_keys, layer_values, torch.arange(tokens, dtype=torch.int64))
    importance = mass.unsqueeze(0)  # [layers=1, kv_heads, tokens]
    plain = evict(snapshot, importance, keep=0.5, sinks=4, window=window)
    filled = evict(
        snapshot,
        importance,
        keep=0.5,
        sinks=4,
        window=window,
        obf=True,
        obf_rank=2,
        per_head_obf=per_head_obf,
    )
    assert torch.equal(plain.positions, kept)

    full = _readout(queries, keys, values)
    plain_k, plain_v, filled_v = plain.keys[0], plain.values[0], filled.values[0]
    assert plain_k is not None
    assert plain_v is not None
    assert filled_v is not None
    plain_error = float((_readout(queries, plain_k, plain_v) - full).norm())
    filled_error = float((_readout(queries, plain_k, filled_v) - full).norm())
    assert plain_error > 1.0  # the construction really loses something
    assert filled_error < 0.5 * plain_error
