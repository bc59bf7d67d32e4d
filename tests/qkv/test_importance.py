"""Token importance from observation-window attention, importance classes and per-class widths."""

from __future__ import annotations

import itertools

import pytest
import torch

from qkv._importance import (
    PROTECTED_BONUS,
    attention_mass_by_class,
    class_bits_for_budget,
    head_importance,
    token_classes,
    token_importance,
)


def _softmax_attention(layers: int, heads: int, window: int, tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, heads, window, tokens, generator=generator) * 2.0
    return torch.softmax(logits, dim=-1)


def test_gqa_grouping_is_the_mean_over_consecutive_query_heads() -> None:
    attn = _softmax_attention(2, 9, 4, 10)
    grouped = head_importance(attn, num_kv_heads=3)
    assert grouped.shape == (2, 3, 10)
    received = attn.mean(dim=2)
    for kv_head in range(3):
        # transformers' repeat_kv: query head h reads KV head h // 3
        expected = received[:, 3 * kv_head : 3 * kv_head + 3].mean(dim=1)
        torch.testing.assert_close(grouped[:, kv_head], expected)
    # Each query row is a distribution over tokens, so the mass a head hands out sums to 1.
    torch.testing.assert_close(grouped.sum(dim=-1), torch.ones(2, 3))


def test_per_layer_list_with_batch_axis_equals_the_stacked_tensor() -> None:
    attn = _softmax_attention(3, 9, 5, 12, seed=1)
    as_list = [attn[i].unsqueeze(0) for i in range(3)]
    torch.testing.assert_close(
        head_importance(as_list, num_kv_heads=3), head_importance(attn, num_kv_heads=3)
    )
    torch.testing.assert_close(token_importance(as_list), token_importance(attn))


def test_bad_attention_is_refused() -> None:
    attn = _softmax_attention(1, 9, 2, 6)
    with pytest.raises(ValueError, match="grouped"):
        head_importance(attn, num_kv_heads=4)
    with pytest.raises(ValueError, match="non-negative"):
        head_importance(attn - 1.0)
    with pytest.raises(ValueError, match="same attention shape"):
        head_importance([attn[0], attn[0, :, :, :5]])
    with pytest.raises(ValueError):
        head_importance(attn[0])


def test_sinks_and_recent_tokens_outrank_everything_else() -> None:
    tokens = 40
    attn = torch.zeros(1, 1, 4, tokens)
    attn[..., 20] = 1.0  # every query looks only at token 20
    scores = token_importance(attn, sinks=2, recent=5)
    protected = [0, 1, *range(35, 40)]
    top = torch.topk(scores, len(protected)).indices.tolist()
    assert sorted(top) == protected
    # Among the rest, attention decides: token 20 comes first.
    rest = scores.clone()
    rest[protected] = -1.0
    assert int(rest.argmax()) == 20
    assert float(scores[20]) == pytest.approx(1.0)
    assert float(scores[0]) == pytest.approx(PROTECTED_BONUS)  # a sink nobody attends to


def test_recent_defaults_to_the_window_length() -> None:
    attn = torch.full((1, 1, 6, 30), 1.0 / 30)
    scores = token_importance(attn, sinks=0)
    assert (scores[-6:] > PROTECTED_BONUS).all()
    assert (scores[:-6] < 1.0).all()


def test_class_sizes_follow_shares_and_class_zero_is_most_important() -> None:
    importance = torch.randperm(100, generator=torch.Generator().manual_seed(3)).to(torch.float32)
    classes = token_classes(importance, shares=(0.1, 0.3, 0.6))
    assert classes.dtype == torch.uint8
    assert torch.bincount(classes.to(torch.int64)).tolist() == [10, 30, 60]
    assert set(torch.nonzero(classes == 0).flatten().tolist()) == set(
        torch.topk(importance, 10).indices.tolist()
    )
    assert float(importance[classes == 1].min()) > float(importance[classes == 2].max())


def test_classes_are_deterministic_on_ties_and_sum_to_the_token_count() -> None:
    importance = torch.ones(7)
    classes = token_classes(importance, shares=(0.3, 0.3, 0.4))
    assert classes.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert token_classes(torch.ones(0)).numel() == 0


@pytest.mark.parametrize("shares", [(0.5, 0.6), (1.0, 0.0), (), tuple([0.1] * 10)])
def test_bad_shares_are_refused(shares: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        token_classes(torch.ones(5), shares=shares)


def test_concentrated_attention_buys_a_spread_mix_at_exactly_the_target() -> None:
    widths = class_bits_for_budget((0.1, 0.3, 0.6), 3.0, class_mass=(0.6, 0.3, 0.1))
    assert widths == (6, 4, 2)
    assert sum(s * w for s, w in zip((0.1, 0.3, 0.6), widths, strict=True)) == pytest.approx(3.0)


def test_uniform_attention_gives_equal_widths() -> None:
    assert class_bits_for_budget((0.1, 0.3, 0.6), 3.0) == (3, 3, 3)


def test_mix_is_the_closest_mean_not_above_the_target() -> None:
    shares = (0.1, 0.3, 0.6)
    widths = (2, 3, 4, 5, 6, 7, 8)
    for target in [2.0, 2.05, 2.5, 2.9, 3.0, 3.25, 3.33, 4.7, 7.99, 8.0, 12.0]:
        chosen = class_bits_for_budget(shares, target, class_mass=(0.5, 0.3, 0.2))
        mean = sum(s * w for s, w in zip(shares, chosen, strict=True))
        assert mean <= target + 1e-9
        assert list(chosen) == sorted(chosen, reverse=True)
        best = max(
            sum(s * w for s, w in zip(shares, mix, strict=True))
            for mix in itertools.product(widths, repeat=3)
            if list(mix) == sorted(mix, reverse=True)
            and sum(s * w for s, w in zip(shares, mix, strict=True)) <= target + 1e-9
        )
        assert mean == pytest.approx(best)


def test_target_below_the_narrowest_width_is_refused() -> None:
    with pytest.raises(ValueError, match="fits"):
        class_bits_for_budget((0.5, 0.5), 1.5)


def test_attention_mass_by_class_uses_raw_mass() -> None:
    received = torch.tensor([0.5, 0.2, 0.2, 0.1])
    classes = token_classes(received, shares=(0.25, 0.75))
    assert attention_mass_by_class(received, classes, 2) == pytest.approx((0.5, 0.5))
