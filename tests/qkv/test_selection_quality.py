"""What eviction and layer selection must get right for the receiver's answers, on the tiny model.

* Eviction is masking: a card without some context tokens must answer exactly as a full forward over the
  whole prompt in which the receiver's tokens cannot see those tokens (the sender's KV of the kept ones was
  computed with everything). That pins positions (the receiver continues after the ORIGINAL length, kept
  tokens keep theirs), the causal mask with a shorter cache, and the kept set.
* The ranking gives every (layer, head) an equal vote; re-read attention is what a plain forward computes.
* Layer selection prefers the deeper layers by default (measured on SmolLM2; see ``qkv._layers``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qkv._hf as hf
from qkv._evict import evict, select_tokens, selection_scores
from qkv._hf import answer_logprobs, generate_from_snapshot, prefill, prefill_observed, prefill_reread
from qkv._importance import head_importance
from qkv._layers import select_layers

CONTEXT = (
    "Super Bowl 50 was an American football game to determine the champion of the National Football "
    "League for the 2015 season. The Denver Broncos defeated the Carolina Panthers."
)
QUESTION = "Which team won Super Bowl 50?"
TARGET = [70, 71, 72, 73, 74, 75]


@pytest.fixture(scope="module")
def parts(tiny_lm):
    return tiny_lm.template.split(tiny_lm.tokenizer, CONTEXT, QUESTION)


@pytest.fixture(scope="module")
def observed(tiny_lm, parts):
    snapshot, attn = prefill_observed(
        tiny_lm, parts.prefix_ids, window=16, template_prefix_tokens=parts.template_prefix_tokens
    )
    return snapshot, head_importance(attn, num_kv_heads=tiny_lm.fingerprint.num_kv_heads)


def _masked_logprobs(lm, parts, kept: torch.Tensor, target: list[int]) -> torch.Tensor:
    """Full forward of prompt + target where the receiver's tokens see only the ``kept`` prefix tokens."""
    ids = [*parts.prefix_ids, *parts.suffix_ids, *target[:-1]]
    prefix = len(parts.prefix_ids)
    allowed = torch.tril(torch.ones(len(ids), len(ids), dtype=torch.bool))
    hidden = torch.ones(prefix, dtype=torch.bool)
    hidden[kept] = False
    allowed[prefix:, :prefix] &= ~hidden
    mask = torch.zeros(1, 1, len(ids), len(ids)).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids]), attention_mask=mask).logits[0, -len(target) :]
    return torch.log_softmax(logits, dim=-1)


# ---------------------------------------------------------------------------------- eviction is masking


def test_keep_all_through_the_eviction_path_changes_nothing(tiny_lm, parts, observed):
    snapshot, mass = observed
    out = evict(snapshot, mass, keep=1.0)
    assert torch.equal(out.positions, snapshot.positions)
    full = answer_logprobs(tiny_lm, snapshot, parts.suffix_ids, TARGET)
    assert torch.equal(answer_logprobs(tiny_lm, out, parts.suffix_ids, TARGET), full)


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.25])
def test_an_evicted_card_answers_as_if_the_evicted_tokens_were_masked(tiny_lm, parts, observed, keep):
    snapshot, mass = observed
    out = evict(snapshot, mass, keep=keep, sinks=4, window=16)
    assert out.num_tokens < snapshot.num_tokens
    assert out.next_position == snapshot.next_position  # the receiver continues after the original length
    ours = answer_logprobs(tiny_lm, out, parts.suffix_ids, TARGET)
    assert torch.allclose(ours, _masked_logprobs(tiny_lm, parts, out.positions, TARGET), atol=1e-4)


def test_the_masking_reference_catches_renumbered_positions(tiny_lm, parts, observed):
    """Positions 0..k-1 instead of the original ones (the transformers default) give other answers."""
    snapshot, mass = observed
    out = evict(snapshot, mass, keep=0.5, sinks=4, window=16)
    compact = dataclasses.replace(out, positions=torch.arange(out.num_tokens, dtype=torch.int64))
    wrong = answer_logprobs(tiny_lm, compact, parts.suffix_ids, TARGET)
    assert (wrong - _masked_logprobs(tiny_lm, parts, out.positions, TARGET)).abs().max() > 1e-3


def test_greedy_generation_from_an_evicted_card_follows_the_masked_forward(tiny_lm, parts, observed):
    snapshot, mass = observed
    out = evict(snapshot, mass, keep=0.5, sinks=4, window=16)
    tokens = list(generate_from_snapshot(tiny_lm, out, parts.suffix_ids, max_new_tokens=8).token_ids)
    assert len(tokens) >= 4
    reference = _masked_logprobs(tiny_lm, parts, out.positions, tokens)
    assert reference.argmax(-1).tolist() == tokens


# ----------------------------------------------------------------------------------------------- ranking


def test_every_head_gets_an_equal_vote_whatever_its_sink_mass() -> None:
    tokens = 40
    mass = torch.zeros(1, 2, tokens)
    mass[0, 0, 0] = 0.98  # a sink-parking head: its little remaining mass all goes to token 10
    mass[0, 0, 10] = 0.02
    mass[0, 1, 20] = 0.3  # a local head: spread out, token 20 its favourite
    mass[0, 1, 5:35] += 0.7 / 30
    scores = selection_scores(mass, sinks=4, window=4)
    assert scores[:4].sum() == 0
    assert scores[-4:].sum() == 0
    assert scores[10] > scores[20] > scores[11]
    assert mass.mean(dim=(0, 1))[20] > mass.mean(dim=(0, 1))[10]  # a plain mean would rank them the other way
    kept = select_tokens(scores, keep=9 / tokens, sinks=4, window=4)
    assert 10 in kept.tolist()


def test_a_head_with_no_mass_outside_the_protected_tokens_does_not_vote() -> None:
    mass = torch.zeros(1, 2, 20)
    mass[0, 0, 0] = 1.0
    mass[0, 1, 7] = 1.0
    scores = selection_scores(mass, sinks=2, window=2)
    assert torch.isfinite(scores).all()
    assert scores[7] == pytest.approx(0.5)


# -------------------------------------------------------------------------------------- re-read attention


def test_reread_attention_is_what_one_plain_forward_computes(tiny_lm, parts, monkeypatch):
    monkeypatch.setattr(hf, "REREAD_CHUNK", 7)  # several chunks, the last one partial
    span = parts.context_token_span
    snapshot, attn = prefill_reread(
        tiny_lm, parts.prefix_ids, context_span=span, template_prefix_tokens=parts.template_prefix_tokens
    )
    plain = prefill(tiny_lm, parts.prefix_ids, template_prefix_tokens=parts.template_prefix_tokens)
    for ours, theirs in zip(snapshot.keys, plain.keys, strict=True):
        assert ours is not None
        assert theirs is not None
        assert torch.equal(ours, theirs)
    instruction = tiny_lm.template.split(tiny_lm.tokenizer, "", hf.REREAD_INSTRUCTION).suffix_ids
    reread = list(parts.prefix_ids[span[0] : span[1]])
    ids = [*parts.prefix_ids, *instruction, *reread]
    tokens = len(parts.prefix_ids)
    with hf._attention_implementation(tiny_lm.model, "eager"), torch.no_grad():
        out = tiny_lm.model(input_ids=torch.tensor([ids]), output_attentions=True)
    expected = torch.stack([layer[0, :, -len(reread) :, :tokens].mean(dim=1) for layer in out.attentions])
    assert attn.shape == (len(out.attentions), expected.shape[1], 1, tokens)
    assert torch.allclose(attn[:, :, 0], expected, atol=1e-5)
    assert bool((attn.sum(dim=-1) <= 1 + 1e-5).all())


def test_reread_refuses_an_empty_context_span(tiny_lm, parts):
    with pytest.raises(ValueError, match="context span"):
        prefill_reread(tiny_lm, parts.prefix_ids, context_span=(5, 5))


# -------------------------------------------------------------------------------------- layer selection


def test_layer_selection_sends_the_deeper_layers_by_default() -> None:
    attention = torch.rand(30, 3, 50, generator=torch.Generator().manual_seed(0))
    assert select_layers(attention, fraction=0.5, context_span=(5, 40)) == tuple(range(15, 30))
    quarter = select_layers(attention, fraction=0.25, context_span=(5, 40))
    assert len(quarter) == 8
    assert min(quarter) >= 15
