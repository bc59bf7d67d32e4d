"""Layer selection on the receiver: unsent layers run over the receiver's own tokens only, causally, plus
the receiver's own KV of the card's template tokens (the prompt head, identical on both sides).

The reference (:func:`_reference_logits`) is a from-scratch forward of the tiny Llama written here: its own
RoPE, explicit per-layer key sets and an explicit causal mask, using the model's modules only for the
projections, norms and MLPs. It shares no masking, cache or attention-dispatch code with ``qkv._hf``, and
it is itself checked against the stock model when every layer is sent.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from qkv._errors import CardCompatError
from qkv._hf import (
    RECEIVER_ONLY_ATTENTION,
    _attention_implementation,
    _forward,
    _injected_cache,
    _own_template_kv,
    answer_logprobs,
    build_cache,
    generate_from_snapshot,
    prefill,
)
from qkv._kv import KVSnapshot
from qkv._modelstore import load_model

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
def snapshot(tiny_lm, parts):
    return prefill(tiny_lm, parts.prefix_ids)


@pytest.fixture(scope="module")
def templated(tiny_lm, parts):
    """The same prefill, knowing which leading tokens are the prompt template's head."""
    return prefill(tiny_lm, parts.prefix_ids, template_prefix_tokens=parts.template_prefix_tokens)


def _without(snapshot: KVSnapshot, unsent: set[int]) -> KVSnapshot:
    return dataclasses.replace(
        snapshot,
        keys=tuple(None if i in unsent else k for i, k in enumerate(snapshot.keys)),
        values=tuple(None if i in unsent else v for i, v in enumerate(snapshot.values)),
    )


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's default RoPE (rotate-half layout) at ``positions``, written out."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def _reference_logits(
    lm, snapshot: KVSnapshot, own_ids: list[int], unsent_sees: KVSnapshot | None = None
) -> torch.Tensor:
    """Logits ``[len(own_ids), vocab]`` of the receiver's tokens.

    A ``None`` layer sees no context at all, or, with ``unsent_sees``, that snapshot's KV of its first
    ``snapshot.template_prefix_tokens`` tokens.
    """
    model = lm.model
    config = model.config
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    theta = float(config.rope_parameters["rope_theta"])
    count = len(own_ids)
    positions = snapshot.next_position + torch.arange(count)
    with torch.no_grad():
        hidden = model.model.embed_tokens(torch.tensor([own_ids]))[0]  # [count, hidden]
        for index, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = _rotate(attn.q_proj(x).view(count, heads, dim).transpose(0, 1), positions, theta)
            k = _rotate(attn.k_proj(x).view(count, kv_heads, dim).transpose(0, 1), positions, theta)
            v = attn.v_proj(x).view(count, kv_heads, dim).transpose(0, 1)
            context_k, context_v = snapshot.keys[index], snapshot.values[index]
            if context_k is None and unsent_sees is not None:
                shared = snapshot.template_prefix_tokens
                context_k = unsent_sees.keys[index][:, :shared]
                context_v = unsent_sees.values[index][:, :shared]
            if context_k is not None and context_v is not None:
                k = torch.cat([context_k, k], dim=1)
                v = torch.cat([context_v, v], dim=1)
            context = k.shape[1] - count
            # Query i (own token i) sees every context key and own keys 0..i.
            visible = torch.arange(k.shape[1])[None, :] <= (context + torch.arange(count))[:, None]
            k = k.repeat_interleave(heads // kv_heads, dim=0)
            v = v.repeat_interleave(heads // kv_heads, dim=0)
            scores = (q @ k.transpose(1, 2)) / math.sqrt(dim)
            weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            out = (weights @ v).transpose(0, 1).reshape(count, heads * dim)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits: torch.Tensor = model.lm_head(model.model.norm(hidden))
    return logits


def _reference_logprobs(lm, snapshot, suffix, target, unsent_sees=None) -> torch.Tensor:
    logits = _reference_logits(lm, snapshot, [*suffix, *target[:-1]], unsent_sees)[len(suffix) - 1 :]
    return torch.log_softmax(logits, dim=-1)


# ------------------------------------------------------------------------------------------ the reference


def test_reference_equals_the_model_when_every_layer_is_sent(tiny_lm, parts, snapshot):
    reference = _reference_logprobs(tiny_lm, snapshot, parts.suffix_ids, TARGET)
    full = [*parts.full_ids, *TARGET[:-1]]
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=torch.tensor([full])).logits[0, len(parts.full_ids) - 1 :]
    assert torch.allclose(reference, torch.log_softmax(logits, dim=-1), atol=1e-4)


def test_zero_placeholders_alone_are_not_neutral(tiny_lm, parts, snapshot):
    """Why unsent layers need their own attention: zero keys still take softmax mass under plain SDPA."""
    zeros = dataclasses.replace(
        snapshot,
        keys=(snapshot.keys[0], torch.zeros_like(snapshot.keys[1]), snapshot.keys[2]),
        values=(snapshot.values[0], torch.zeros_like(snapshot.values[1]), snapshot.values[2]),
    )
    plain = answer_logprobs(tiny_lm, zeros, parts.suffix_ids, TARGET)
    reference = _reference_logprobs(tiny_lm, _without(snapshot, {1}), parts.suffix_ids, TARGET)
    assert (plain - reference).abs().max() > 1e-2


# ------------------------------------------------------------------------------ (b) context-free layers


@pytest.mark.parametrize("unsent", [{0}, {1}, {2}, {0, 2}, {1, 2}])
def test_unsent_layers_behave_as_if_the_context_were_absent_there(tiny_lm, parts, snapshot, unsent):
    partial = _without(snapshot, unsent)
    ours = answer_logprobs(tiny_lm, partial, parts.suffix_ids, TARGET)
    reference = _reference_logprobs(tiny_lm, partial, parts.suffix_ids, TARGET)
    full = _reference_logprobs(tiny_lm, snapshot, parts.suffix_ids, TARGET)
    assert torch.allclose(ours, reference, atol=1e-4)
    assert (reference - full).abs().max() > 1e-2  # the layers really lost their context
    assert tiny_lm.model.config._attn_implementation == "sdpa"  # restored after the call


def test_every_layer_unsent_equals_a_forward_without_context(tiny_lm, parts, snapshot):
    ours = answer_logprobs(tiny_lm, _without(snapshot, {0, 1, 2}), parts.suffix_ids, TARGET)
    own = [*parts.suffix_ids, *TARGET[:-1]]
    positions = snapshot.next_position + torch.arange(len(own))
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=torch.tensor([own]), position_ids=positions.unsqueeze(0)).logits[0]
    reference = torch.log_softmax(logits[len(parts.suffix_ids) - 1 :], dim=-1)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_unsent_layers_with_evicted_tokens_keep_true_positions(tiny_lm, parts, snapshot):
    keep = torch.tensor([i for i in range(snapshot.num_tokens) if not 20 <= i < 60])
    evicted = dataclasses.replace(
        snapshot,
        keys=tuple(k[:, keep] for k in snapshot.keys if k is not None),
        values=tuple(v[:, keep] for v in snapshot.values if v is not None),
        positions=snapshot.positions[keep],
    )
    partial = _without(evicted, {1})
    ours = answer_logprobs(tiny_lm, partial, parts.suffix_ids, TARGET)
    assert torch.allclose(ours, _reference_logprobs(tiny_lm, partial, parts.suffix_ids, TARGET), atol=1e-4)


# ---------------------------------------------------------------- (b') the template's own KV in unsent layers


def test_the_receivers_template_kv_is_the_senders(tiny_lm, templated):
    shared = templated.template_prefix_tokens
    own = _own_template_kv(tiny_lm, templated.positions[:shared])
    for (k, v), sender_k, sender_v in zip(own, templated.keys, templated.values, strict=True):
        torch.testing.assert_close(k, sender_k[:, :shared], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, sender_v[:, :shared], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("unsent", [{0}, {1}, {0, 2}, {0, 1, 2}])
def test_unsent_layers_see_the_template_tokens(tiny_lm, parts, templated, unsent):
    """The bug this catches: without the template, unsent layers had no attention sink at all."""
    partial = _without(templated, unsent)
    ours = answer_logprobs(tiny_lm, partial, parts.suffix_ids, TARGET)
    reference = _reference_logprobs(tiny_lm, partial, parts.suffix_ids, TARGET, unsent_sees=templated)
    bare = _reference_logprobs(tiny_lm, partial, parts.suffix_ids, TARGET)  # no template in those layers
    assert torch.allclose(ours, reference, atol=1e-4)
    assert (reference - bare).abs().max() > 1e-2


def test_every_layer_unsent_equals_the_bare_prompt_at_the_cards_positions(tiny_lm, parts, templated):
    """Independent of the reference: a plain model forward over template head + own tokens."""
    shared = templated.template_prefix_tokens
    ours = answer_logprobs(tiny_lm, _without(templated, {0, 1, 2}), parts.suffix_ids, TARGET)
    own = [*parts.suffix_ids, *TARGET[:-1]]
    ids = [*parts.prefix_ids[:shared], *own]
    positions = torch.cat([torch.arange(shared), templated.next_position + torch.arange(len(own))])
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=torch.tensor([ids]), position_ids=positions.unsqueeze(0)).logits[0]
    reference = torch.log_softmax(logits[shared + len(parts.suffix_ids) - 1 :], dim=-1)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_unsent_layers_use_only_the_template_tokens_the_card_kept(tiny_lm, parts, templated):
    shared = templated.template_prefix_tokens
    keep = torch.tensor([i for i in range(templated.num_tokens) if not (4 <= i < shared - 2 or 30 <= i < 50)])
    evicted = dataclasses.replace(
        templated,
        keys=tuple(k[:, keep] for k in templated.keys if k is not None),
        values=tuple(v[:, keep] for v in templated.values if v is not None),
        positions=templated.positions[keep],
        template_prefix_tokens=int((keep < shared).sum()),
    )
    partial = _without(evicted, {1})
    ours = answer_logprobs(tiny_lm, partial, parts.suffix_ids, TARGET)
    reference = _reference_logprobs(tiny_lm, partial, parts.suffix_ids, TARGET, unsent_sees=evicted)
    assert torch.allclose(ours, reference, atol=1e-4)


def test_generation_and_chunks_with_template_tokens_follow_the_reference(tiny_lm, parts, templated):
    partial = _without(templated, {0, 2})
    tokens = list(generate_from_snapshot(tiny_lm, partial, parts.suffix_ids, max_new_tokens=12).token_ids)
    assert len(tokens) >= 4
    reference = _reference_logits(tiny_lm, partial, [*parts.suffix_ids, *tokens[:-1]], templated)
    assert reference[len(parts.suffix_ids) - 1 :].argmax(-1).tolist() == tokens
    suffix = list(parts.suffix_ids)
    positions = partial.next_position + torch.arange(len(suffix))
    with _attention_implementation(tiny_lm.model, RECEIVER_ONLY_ATTENTION):
        cache, receiver = _injected_cache(tiny_lm, partial)
        _forward(tiny_lm, suffix[:5], positions[:5], cache, logits_to_keep=1, receiver=receiver)
        rest = _forward(
            tiny_lm, suffix[5:], positions[5:], cache, logits_to_keep=len(suffix) - 5, receiver=receiver
        )
    expected = _reference_logits(tiny_lm, partial, suffix, templated)[5:]
    assert torch.allclose(rest, expected, atol=1e-4)


def test_a_card_with_a_longer_template_than_the_receivers_is_refused(tiny_lm, parts, templated):
    too_long = dataclasses.replace(
        _without(templated, {1}), template_prefix_tokens=templated.template_prefix_tokens + 1
    )
    with pytest.raises(CardCompatError, match="another prompt template"):
        answer_logprobs(tiny_lm, too_long, parts.suffix_ids, TARGET)


# ------------------------------------------------------------------------------------------ (a) causality


@pytest.mark.parametrize("unsent", [{0}, {1}, {0, 2}, {0, 1, 2}])
def test_a_later_receiver_token_never_changes_earlier_logits(tiny_lm, parts, snapshot, unsent):
    partial = _without(snapshot, unsent)
    changed_at = 3  # TARGET[3] is an input of rows 4 and 5 only
    other = [*TARGET[:changed_at], 99, *TARGET[changed_at + 1 :]]
    before = answer_logprobs(tiny_lm, partial, parts.suffix_ids, TARGET)
    after = answer_logprobs(tiny_lm, partial, parts.suffix_ids, other)
    assert torch.allclose(before[: changed_at + 1], after[: changed_at + 1], atol=1e-6, rtol=0)
    assert (before[changed_at + 1 :] - after[changed_at + 1 :]).abs().max() > 1e-3


def test_a_later_suffix_token_never_changes_the_first_suffix_logits(tiny_lm, parts, snapshot):
    """The same inside the suffix prefill (one multi-token forward, where the mask matters most)."""
    partial = _without(snapshot, {0, 2})
    suffix = list(parts.suffix_ids)
    edited = [*suffix[:-1], 99]
    positions = snapshot.next_position + torch.arange(len(suffix))
    rows = []
    for ids in (suffix, edited):
        cache, receiver = _injected_cache(tiny_lm, partial)
        with _attention_implementation(tiny_lm.model, RECEIVER_ONLY_ATTENTION):
            rows.append(_forward(tiny_lm, ids, positions, cache, logits_to_keep=len(ids), receiver=receiver))
    assert torch.allclose(rows[0][:-1], rows[1][:-1], atol=1e-6, rtol=0)
    assert (rows[0][-1] - rows[1][-1]).abs().max() > 1e-3


def test_a_suffix_fed_in_chunks_equals_one_forward(tiny_lm, parts, snapshot):
    """A multi-token forward on top of own tokens already cached (the mask is then not plain causal)."""
    partial = _without(snapshot, {0, 2})
    suffix = list(parts.suffix_ids)
    positions = snapshot.next_position + torch.arange(len(suffix))
    split = 5
    with _attention_implementation(tiny_lm.model, RECEIVER_ONLY_ATTENTION):
        cache, receiver = _injected_cache(tiny_lm, partial)
        whole = _forward(tiny_lm, suffix, positions, cache, logits_to_keep=len(suffix), receiver=receiver)
        cache, receiver = _injected_cache(tiny_lm, partial)
        _forward(tiny_lm, suffix[:split], positions[:split], cache, logits_to_keep=1, receiver=receiver)
        rest = _forward(
            tiny_lm,
            suffix[split:],
            positions[split:],
            cache,
            logits_to_keep=len(suffix) - split,
            receiver=receiver,
        )
    assert torch.allclose(whole[split:], rest, atol=1e-5)


# ----------------------------------------------------------------------- (c) transparent with every layer


def test_receiver_only_attention_is_plain_sdpa_when_every_layer_is_sent(tiny_lm, parts, snapshot):
    plain = answer_logprobs(tiny_lm, snapshot, parts.suffix_ids, TARGET)
    plain_tokens = generate_from_snapshot(tiny_lm, snapshot, parts.suffix_ids, max_new_tokens=12).token_ids
    with _attention_implementation(tiny_lm.model, RECEIVER_ONLY_ATTENTION):
        wrapped = answer_logprobs(tiny_lm, snapshot, parts.suffix_ids, TARGET)
        wrapped_tokens = generate_from_snapshot(
            tiny_lm, snapshot, parts.suffix_ids, max_new_tokens=12
        ).token_ids
    assert torch.equal(plain, wrapped)
    assert plain_tokens == wrapped_tokens
    assert len(plain_tokens) >= 4


def test_an_eager_model_gives_the_same_layer_selected_answer(tiny_lm, tiny_model_dir, parts, snapshot):
    eager = load_model(tiny_model_dir, device="cpu", attn_implementation="eager")
    partial = _without(snapshot, {1})
    sdpa_rows = answer_logprobs(tiny_lm, partial, parts.suffix_ids, TARGET)
    eager_rows = answer_logprobs(eager, partial, parts.suffix_ids, TARGET)
    assert torch.allclose(sdpa_rows, eager_rows, atol=1e-5)
    assert eager.model.config._attn_implementation == "eager"  # restored after the call


# ------------------------------------------------------------------------------------- (d) generation


@pytest.mark.parametrize("unsent", [{1}, {0, 2}])
def test_generation_with_unsent_layers_follows_the_reference(tiny_lm, parts, snapshot, unsent):
    partial = _without(snapshot, unsent)
    generation = generate_from_snapshot(tiny_lm, partial, parts.suffix_ids, max_new_tokens=12)
    assert generation.new_tokens >= 4
    tokens = list(generation.token_ids)
    # Decode steps (one query, no mask) against the from-scratch reference, teacher-forced on the answer.
    reference = _reference_logits(tiny_lm, partial, [*parts.suffix_ids, *tokens[:-1]])
    assert reference[len(parts.suffix_ids) - 1 :].argmax(-1).tolist() == tokens
    full = generate_from_snapshot(tiny_lm, snapshot, parts.suffix_ids, max_new_tokens=12)
    assert full.token_ids != generation.token_ids
    assert tiny_lm.model.config._attn_implementation == "sdpa"


def test_attention_is_restored_when_generation_fails(tiny_lm, parts, snapshot):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_from_snapshot(tiny_lm, _without(snapshot, {1}), parts.suffix_ids, max_new_tokens=0)
    assert tiny_lm.model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------- refusals


def test_unsent_layers_without_receiver_only_attention_are_an_error(tiny_lm, parts, snapshot):
    cache, receiver = _injected_cache(tiny_lm, _without(snapshot, {1}))
    positions = snapshot.next_position + torch.arange(len(parts.suffix_ids))
    with pytest.raises(RuntimeError, match="receiver-only attention"):
        _forward(tiny_lm, parts.suffix_ids, positions, cache, logits_to_keep=1, receiver=receiver)


def test_a_plain_cache_refuses_unsent_layers(tiny_lm, snapshot):
    with pytest.raises(CardCompatError, match=r"no KV for 2 layer\(s\) \(\[0, 2\]\).*every layer"):
        build_cache(tiny_lm, _without(snapshot, {0, 2}))


def test_a_layer_with_keys_but_no_values_is_refused(tiny_lm, parts, snapshot):
    broken = dataclasses.replace(snapshot, values=(snapshot.values[0], None, snapshot.values[2]))
    with pytest.raises(CardCompatError, match="layer 1 has keys but no partner"):
        generate_from_snapshot(tiny_lm, broken, parts.suffix_ids)
