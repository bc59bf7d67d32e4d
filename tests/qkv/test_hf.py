"""The transformers adapter and the prompt template, on the tiny random Llama (fast, no download)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaForCausalLM

from qkv._errors import CardCompatError
from qkv._hf import (
    answer_logprobs,
    build_cache,
    extend_snapshot,
    fingerprint_of,
    generate_from_snapshot,
    generate_from_text,
    prefill,
    prefill_observed,
)
from qkv._kv import KVSnapshot
from qkv._modelstore import load_model
from qkv._prompt import PromptTemplate
from tests.conftest import tiny_llama_config

CONTEXT = (
    "Super Bowl 50 was an American football game to determine the champion of the National Football "
    "League for the 2015 season. The Denver Broncos defeated the Carolina Panthers."
)
QUESTION = "Which team won Super Bowl 50?"


@pytest.fixture(scope="module")
def parts(tiny_lm):
    return tiny_lm.template.split(tiny_lm.tokenizer, CONTEXT, QUESTION)


def _evict(snapshot: KVSnapshot, keep: torch.Tensor, positions: torch.Tensor | None = None) -> KVSnapshot:
    """Keep only the token indices ``keep`` (what a later eviction policy will do), optionally renumbered."""
    return dataclasses.replace(
        snapshot,
        keys=tuple(k[:, keep] for k in snapshot.keys if k is not None),
        values=tuple(v[:, keep] for v in snapshot.values if v is not None),
        positions=snapshot.positions[keep] if positions is None else positions,
    )


# ------------------------------------------------------------------------------------------------ prompt


def test_split_concatenates_to_the_whole_prompt(tiny_lm):
    template = PromptTemplate.chatml()
    parts = template.split(tiny_lm.tokenizer, f"  {CONTEXT} ", QUESTION)
    text = tiny_lm.tokenizer.decode(list(parts.full_ids))
    assert text.startswith("<|im_start|>system\nAnswer with a short phrase from the context.<|im_end|>\n")
    assert text.endswith(f"Question: {QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    start, end = parts.context_token_span
    assert tiny_lm.tokenizer.decode(list(parts.prefix_ids[start:end])) == CONTEXT
    assert parts.template_prefix_tokens == start > 0
    assert QUESTION not in tiny_lm.tokenizer.decode(list(parts.prefix_ids))


def test_facts_go_to_the_receiver_suffix_only(tiny_lm):
    template = PromptTemplate.chatml()
    plain = template.split(tiny_lm.tokenizer, CONTEXT, QUESTION)
    with_facts = template.split(tiny_lm.tokenizer, CONTEXT, QUESTION, facts="Denver; 24-10")
    assert with_facts.prefix_ids == plain.prefix_ids
    assert tiny_lm.tokenizer.decode(list(with_facts.suffix_ids)).startswith("Facts: Denver; 24-10\nQuestion:")


def test_plain_template_starts_with_bos_and_asks_for_an_answer(tiny_lm):
    parts = PromptTemplate.plain().split(tiny_lm.tokenizer, CONTEXT, QUESTION)
    assert parts.prefix_ids[0] == tiny_lm.tokenizer.bos_token_id
    assert tiny_lm.tokenizer.decode(list(parts.suffix_ids)) == f"Question: {QUESTION}\nAnswer:"
    assert parts.template_prefix_tokens == 1 + len(
        tiny_lm.tokenizer.encode(PromptTemplate.plain().head, add_special_tokens=False)
    )


def test_template_is_chosen_from_the_vocabulary(tiny_lm):
    assert tiny_lm.template.kind == "chatml"
    assert tiny_lm.stop_token_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    with pytest.raises(ValueError, match="unknown prompt template"):
        PromptTemplate.named("alpaca")


# -------------------------------------------------------------------------------------------- extraction


def test_prefill_snapshot_layout(tiny_lm, parts):
    snapshot = prefill(tiny_lm, parts.prefix_ids, template_prefix_tokens=parts.template_prefix_tokens)
    tokens = len(parts.prefix_ids)
    assert snapshot.num_layers == 3
    for k, v in zip(snapshot.keys, snapshot.values, strict=True):
        assert k is not None
        assert v is not None
        assert tuple(k.shape) == tuple(v.shape) == (2, tokens, 16)
    assert torch.equal(snapshot.positions, torch.arange(tokens))
    assert snapshot.next_position == tokens
    assert snapshot.fingerprint == tiny_lm.fingerprint
    assert snapshot.template_prefix_tokens == parts.template_prefix_tokens


def test_kv_path_generates_the_same_tokens_as_text(tiny_lm, parts):
    snapshot = prefill(tiny_lm, parts.prefix_ids)
    kv = generate_from_snapshot(tiny_lm, snapshot, parts.suffix_ids, max_new_tokens=16)
    text = generate_from_text(tiny_lm, parts.prefix_ids, parts.suffix_ids, max_new_tokens=16)
    assert kv.new_tokens >= 4  # a meaningful comparison, not two empty answers
    assert kv.token_ids == text.token_ids
    assert kv.text == text.text
    assert 0 < kv.ttft_s <= kv.total_s
    assert 0 < text.ttft_s <= text.total_s


def test_greedy_loop_agrees_with_transformers_generate(tiny_lm, parts):
    ours = generate_from_text(tiny_lm, parts.prefix_ids, parts.suffix_ids, max_new_tokens=16)
    reference = tiny_lm.model.generate(
        torch.tensor([parts.full_ids]),
        attention_mask=torch.ones(1, len(parts.full_ids), dtype=torch.int64),
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=sorted(tiny_lm.stop_token_ids),
        pad_token_id=0,
    )[0, len(parts.full_ids) :].tolist()
    # Ours may stop earlier (at a newline); up to there both must agree.
    assert reference[: ours.new_tokens] == list(ours.token_ids)


def test_injected_cache_holds_the_snapshot_in_the_model_dtype(tiny_lm, parts):
    snapshot = prefill(tiny_lm, parts.prefix_ids)
    half = dataclasses.replace(
        snapshot,
        keys=tuple(k.half() for k in snapshot.keys if k is not None),
        values=tuple(v.half() for v in snapshot.values if v is not None),
    )
    cache = build_cache(tiny_lm, half)
    assert cache.get_seq_length() == len(parts.prefix_ids)
    layer = cache.layers[1]
    assert layer.keys.dtype == torch.float32
    assert torch.allclose(layer.keys[0], snapshot.keys[1], atol=1e-2)
    generation = generate_from_snapshot(tiny_lm, half, parts.suffix_ids, max_new_tokens=4)
    assert generation.new_tokens >= 1


def test_prefill_observed_returns_the_window_attention_of_a_full_eager_forward(
    tiny_lm, tiny_model_dir, parts
):
    window = 8
    snapshot, attn = prefill_observed(tiny_lm, parts.prefix_ids, window=window, template_prefix_tokens=3)
    plain = prefill(tiny_lm, parts.prefix_ids, template_prefix_tokens=3)
    for observed_k, plain_k in zip(snapshot.keys + snapshot.values, plain.keys + plain.values, strict=True):
        assert torch.equal(observed_k, plain_k)
    assert snapshot.template_prefix_tokens == 3
    assert tiny_lm.model.config._attn_implementation == "sdpa"  # switched back after the window

    tokens = len(parts.prefix_ids)
    assert attn.shape == (3, 4, window, tokens)
    assert attn.dtype == torch.float32
    assert torch.allclose(attn.sum(-1), torch.ones(3, 4, window), atol=1e-5)
    eager = load_model(tiny_model_dir, device="cpu", attn_implementation="eager")
    with torch.no_grad():
        out = eager.model(input_ids=torch.tensor([parts.prefix_ids]), output_attentions=True)
    reference = torch.stack([layer[0, :, -window:] for layer in out.attentions])
    assert torch.allclose(attn, reference, atol=1e-5)
    assert attn[:, :, 0, tokens - window + 1 :].abs().max() == 0  # causal: no look-ahead


def test_prefill_observed_caps_the_window_at_the_prefix(tiny_lm):
    ids = tiny_lm.tokenizer.encode("short", add_special_tokens=False)
    _, attn = prefill_observed(tiny_lm, ids, window=64)
    assert attn.shape == (3, 4, len(ids), len(ids))
    with pytest.raises(ValueError, match="window must be at least 1"):
        prefill_observed(tiny_lm, ids, window=0)


# ----------------------------------------------------------------------------------- positions / eviction


def test_evicted_snapshot_with_true_positions_equals_a_masked_full_forward(tiny_lm, parts):
    snapshot = prefill(tiny_lm, parts.prefix_ids)
    tokens = snapshot.num_tokens
    evicted_idx = torch.arange(20, 60)
    keep = torch.tensor([i for i in range(tokens) if i not in set(evicted_idx.tolist())])
    evicted = _evict(snapshot, keep)
    assert evicted.next_position == tokens  # true positions: the suffix still starts after the whole prefix

    generation = generate_from_snapshot(tiny_lm, evicted, parts.suffix_ids, max_new_tokens=8)
    ours = answer_logprobs(tiny_lm, evicted, parts.suffix_ids, generation.token_ids)

    # Reference without snapshot, eviction or cache injection: the full prefix KV from a plain forward, then
    # the suffix (and the answer, teacher-forced) at their true positions behind a mask hiding the evicted.
    model = tiny_lm.model
    teacher = [*parts.suffix_ids, *generation.token_ids[:-1]]
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([parts.prefix_ids]), use_cache=True).past_key_values
        mask = torch.ones(1, tokens + len(teacher), dtype=torch.int64)
        mask[0, evicted_idx] = 0
        logits = model(
            input_ids=torch.tensor([teacher]),
            attention_mask=mask,
            position_ids=torch.arange(tokens, tokens + len(teacher)).unsqueeze(0),
            past_key_values=cache,
            use_cache=True,
        ).logits[0, len(parts.suffix_ids) - 1 :]
    reference = torch.log_softmax(logits.float(), dim=-1)

    assert torch.allclose(ours, reference, atol=1e-4)
    assert reference.argmax(-1).tolist() == list(generation.token_ids)


def test_evicted_snapshot_renumbered_contiguously_gives_other_logits(tiny_lm, parts):
    snapshot = prefill(tiny_lm, parts.prefix_ids)
    keep = torch.tensor([i for i in range(snapshot.num_tokens) if not 20 <= i < 60])
    true_positions = _evict(snapshot, keep)
    renumbered = _evict(snapshot, keep, positions=torch.arange(keep.numel()))
    target = generate_from_snapshot(tiny_lm, true_positions, parts.suffix_ids, max_new_tokens=8).token_ids
    right = answer_logprobs(tiny_lm, true_positions, parts.suffix_ids, target)
    wrong = answer_logprobs(tiny_lm, renumbered, parts.suffix_ids, target)
    assert (right - wrong).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------- extend


def _assert_same_kv(ours: KVSnapshot, reference_keys, reference_values) -> None:
    for mine, theirs in zip(ours.keys + ours.values, [*reference_keys, *reference_values], strict=True):
        assert mine is not None
        assert mine.shape == theirs.shape
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=0)


def test_extend_of_a_prefill_equals_the_prefill_of_both(tiny_lm, parts):
    a, b = list(parts.prefix_ids[:60]), list(parts.prefix_ids[60:])
    whole = prefill(tiny_lm, parts.prefix_ids, template_prefix_tokens=3)
    extended = extend_snapshot(tiny_lm, prefill(tiny_lm, a, template_prefix_tokens=3), b)
    _assert_same_kv(extended, whole.keys, whole.values)
    assert torch.equal(extended.positions, whole.positions)
    assert extended.template_prefix_tokens == 3
    assert extended.fingerprint == whole.fingerprint
    # Two hops, and the extended snapshot answers like the text.
    c = list(parts.suffix_ids[:4])
    twice = extend_snapshot(tiny_lm, extended, c)
    both = prefill(tiny_lm, [*parts.prefix_ids, *c])
    _assert_same_kv(twice, both.keys, both.values)
    kv = generate_from_snapshot(tiny_lm, extended, parts.suffix_ids, max_new_tokens=8)
    text = generate_from_text(tiny_lm, parts.prefix_ids, parts.suffix_ids, max_new_tokens=8)
    assert kv.token_ids == text.token_ids


def test_extend_after_eviction_equals_a_masked_forward_at_true_positions(tiny_lm, parts):
    a = list(parts.prefix_ids)
    b = list(parts.suffix_ids)
    snapshot = prefill(tiny_lm, a)
    keep = torch.tensor([i for i in range(len(a)) if not 20 <= i < 60])
    evicted = _evict(snapshot, keep)
    extended = extend_snapshot(tiny_lm, evicted, b)
    new_positions = len(a) + torch.arange(len(b))
    assert torch.equal(extended.positions, torch.cat([keep, new_positions]))

    # Reference without snapshots or injection: the prefix KV from a plain forward, then b at its true
    # positions behind a mask that hides the evicted tokens; then drop the evicted tokens from the cache.
    model = tiny_lm.model
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([a]), use_cache=True).past_key_values
        mask = torch.ones(1, len(a) + len(b), dtype=torch.int64)
        mask[0, 20:60] = 0
        model(
            input_ids=torch.tensor([b]),
            attention_mask=mask,
            position_ids=new_positions.unsqueeze(0),
            past_key_values=cache,
            use_cache=True,
        )
    kept = torch.cat([keep, new_positions])
    _assert_same_kv(
        extended,
        [layer.keys[0][:, kept] for layer in cache.layers],
        [layer.values[0][:, kept] for layer in cache.layers],
    )


def test_extend_keeps_the_model_dtype_and_returns_an_empty_extension_as_is(tiny_lm, parts):
    snapshot = prefill(tiny_lm, parts.prefix_ids)
    assert extend_snapshot(tiny_lm, snapshot, []) is snapshot
    half = dataclasses.replace(
        snapshot,
        keys=tuple(k.half() for k in snapshot.keys if k is not None),
        values=tuple(v.half() for v in snapshot.values if v is not None),
        extra={"calibration": "x"},
    )
    extended = extend_snapshot(tiny_lm, half, [40, 41])
    assert all(k is not None and k.dtype == torch.float32 for k in extended.keys)
    assert extended.num_tokens == snapshot.num_tokens + 2
    assert extended.extra == {"calibration": "x"}
    with pytest.raises(CardCompatError, match="rope_theta"):
        extend_snapshot(
            tiny_lm,
            dataclasses.replace(
                snapshot, fingerprint=dataclasses.replace(snapshot.fingerprint, rope_theta=1.0)
            ),
            [40],
        )


# ---------------------------------------------------------------------------------------- answer_logprobs


def test_answer_logprobs_from_snapshot_equal_text_and_a_plain_forward(tiny_lm, parts):
    target = [40, 41, 42, 43, 44]
    snapshot = prefill(tiny_lm, parts.prefix_ids)
    from_kv = answer_logprobs(tiny_lm, snapshot, parts.suffix_ids, target)
    from_text = answer_logprobs(tiny_lm, None, parts.suffix_ids, target, prefix_ids=parts.prefix_ids)
    full = [*parts.full_ids, *target[:-1]]
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=torch.tensor([full])).logits[0, len(parts.full_ids) - 1 :]
    reference = torch.log_softmax(logits, dim=-1)
    assert from_kv.shape == (len(target), len(tiny_lm.tokenizer))
    assert from_kv.dtype == torch.float32
    assert from_kv.device.type == "cpu"
    assert torch.allclose(from_kv.exp().sum(-1), torch.ones(len(target)), atol=1e-5)
    assert torch.allclose(from_kv, from_text, atol=1e-5)
    assert torch.allclose(from_text, reference, atol=1e-5)


def test_answer_logprobs_argument_errors(tiny_lm, parts):
    snapshot = prefill(tiny_lm, parts.prefix_ids)
    with pytest.raises(ValueError, match="not both"):
        answer_logprobs(tiny_lm, snapshot, parts.suffix_ids, [5], prefix_ids=parts.prefix_ids)
    with pytest.raises(ValueError, match="prefix_ids is required"):
        answer_logprobs(tiny_lm, None, parts.suffix_ids, [5])
    with pytest.raises(ValueError, match="target_ids is empty"):
        answer_logprobs(tiny_lm, snapshot, parts.suffix_ids, [])


# ----------------------------------------------------------------------------------------- refusals


def test_snapshot_with_missing_layers_is_refused_where_every_layer_is_needed(tiny_lm, parts):
    snapshot = prefill(tiny_lm, parts.prefix_ids)
    partial = dataclasses.replace(
        snapshot,
        keys=(snapshot.keys[0], None, snapshot.keys[2]),
        values=(snapshot.values[0], None, snapshot.values[2]),
    )
    with pytest.raises(CardCompatError, match=r"no KV for 1 layer\(s\) \(\[1\]\).*accept layer selection"):
        build_cache(tiny_lm, partial)
    with pytest.raises(CardCompatError, match=r"no KV for 1 layer\(s\) \(\[1\]\).*relay"):
        extend_snapshot(tiny_lm, partial, [5, 6])


def test_snapshot_from_another_model_is_refused(tiny_lm, parts):
    snapshot = prefill(tiny_lm, parts.prefix_ids)
    foreign = dataclasses.replace(
        snapshot, fingerprint=dataclasses.replace(snapshot.fingerprint, rope_theta=500000.0)
    )
    with pytest.raises(CardCompatError, match="rope_theta"):
        build_cache(tiny_lm, foreign)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: dataclasses.replace(s, keys=tuple(k[:1] for k in s.keys)), "do not match"),
        (lambda s: dataclasses.replace(s, keys=s.keys[:2], values=s.values[:2]), "2 layers"),
        (lambda s: dataclasses.replace(s, positions=s.positions.flip(0)), "strictly increasing"),
        (lambda s: dataclasses.replace(s, positions=s.positions.int()), "int64"),
    ],
)
def test_malformed_snapshot_is_refused(tiny_lm, parts, mutate, message):
    snapshot = prefill(tiny_lm, parts.prefix_ids)
    with pytest.raises(CardCompatError, match=message):
        build_cache(tiny_lm, mutate(snapshot))


def test_empty_inputs_are_refused(tiny_lm, parts):
    snapshot = prefill(tiny_lm, parts.prefix_ids)
    with pytest.raises(ValueError, match="prefix_ids is empty"):
        prefill(tiny_lm, [])
    with pytest.raises(ValueError, match="suffix_ids is empty"):
        generate_from_snapshot(tiny_lm, snapshot, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_from_text(tiny_lm, parts.prefix_ids, parts.suffix_ids, max_new_tokens=0)


def test_max_new_tokens_bounds_the_answer(tiny_lm, parts):
    generation = generate_from_text(tiny_lm, parts.prefix_ids, parts.suffix_ids, max_new_tokens=3)
    assert 1 <= generation.new_tokens <= 3


# -------------------------------------------------------------------------------------------- fingerprint


def _fingerprint(tokenizer, **config):
    torch.manual_seed(0)
    return fingerprint_of(LlamaForCausalLM(tiny_llama_config(**config)), tokenizer)


def test_fingerprint_is_stable_and_tracks_what_the_kv_depends_on(tiny_lm):
    tokenizer = tiny_lm.tokenizer
    base = _fingerprint(tokenizer)
    assert base == tiny_lm.fingerprint
    assert base.tokenizer_hash == _fingerprint(tokenizer).tokenizer_hash
    assert _fingerprint(tokenizer, num_hidden_layers=2).num_layers == 2
    changed = [
        _fingerprint(tokenizer, num_key_value_heads=4),
        _fingerprint(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        _fingerprint(
            tokenizer, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
        ),
        _fingerprint(tokenizer, head_dim=8),
    ]
    for other in changed:
        assert other != base
        assert other.digest != base.digest
    assert changed[2].rope_params == '{"factor": 2.0, "rope_type": "linear"}'


def test_fingerprint_tracks_the_vocabulary(tiny_lm):
    tokenizer = tiny_lm.tokenizer
    base = _fingerprint(tokenizer)
    grown = type(tokenizer).from_pretrained(tiny_lm.path)
    grown.add_tokens(["<extra>"])
    assert _fingerprint(grown).tokenizer_hash != base.tokenizer_hash


def test_positions_beyond_the_model_are_refused_and_answers_end_at_the_last(tiny_lm):
    limit = tiny_lm.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"beyond this model's {limit} positions"):
        prefill(tiny_lm, [5] * (limit + 1))
    # A prompt that leaves 3 positions: 3 more forwards, 4 tokens at most, instead of failing half-way.
    gen = generate_from_text(tiny_lm, [5] * (limit - 4), [6], max_new_tokens=50)
    assert 1 <= len(gen.token_ids) <= 4
