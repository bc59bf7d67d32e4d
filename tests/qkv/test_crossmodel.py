"""Cross-model KV translation on two tiny random architectures (Llama and Gemma 3) with different tokenizers.

Fast: the models are built from configs and the Gemma-side tokenizer is trained in code; no download.
The ``model``-marked test checks RoPE de-rotation against the real SmolLM2 and Gemma-3-270M.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from qkv._crossmodel import (
    ALIGNMENT_RULE,
    EXTRA_CALIBRATION_KEY,
    CrossModelCalibration,
    TranslateAt,
    align_tokens,
    calibrate_pair,
    depth_layer_map,
    linear_cka,
    receiver_suffix_ids,
    require_calibration,
    ridge_fit,
    translate_snapshot,
)
from qkv._errors import CalibrationError, CardCompatError
from qkv._hf import generate_from_snapshot, prefill
from qkv._modelstore import LoadedModel, load_model
from qkv._rope import RopeTable, rope_tables_of, rotate, unrotate
from tests.conftest import build_tiny_model_dir, missing

SENTENCES = (
    "The Denver Broncos defeated the Carolina Panthers to win Super Bowl 50 in February 2016.",
    "Normans were the people who in the 10th and 11th centuries gave their name to Normandy.",
    "The Amazon rainforest covers most of the Amazon basin of South America, about 5.5 million km2.",
    "Warsaw is the capital and largest city of Poland, standing on the Vistula River.",
    "Oxygen is a chemical element with symbol O and atomic number 8, a member of the chalcogen group.",
    "The university was founded in 1890 by John D. Rockefeller and sits in Hyde Park, Chicago.",
    "Genghis Khan founded the Mongol Empire, which became the largest contiguous empire in history.",
    "Steam engines powered the industrial revolution in Britain during the 18th and 19th centuries.",
    "Victoria is a state in the south-east of Australia; its capital Melbourne is the second city.",
    "The Rhine rises in the Swiss Alps and flows through Germany into the North Sea near Rotterdam.",
    "Huguenots were French Protestants who followed the teachings of John Calvin in the 16th century.",
    "Jacksonville is the most populous city in Florida and the largest city by area in the US.",
)
QUESTION = "Who won Super Bowl 50?"


# -------------------------------------------------------------------------------------------- fixtures


def _gemma_tokenizer():  # type: ignore[no-untyped-def]
    """A SentencePiece-style (metaspace) BPE trained on SENTENCES: segments text unlike the byte-level one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    alphabet = [chr(c) for c in range(32, 127)]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(
        [*SENTENCES, "Answer with a short phrase from the context. Question:"], trainer
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_gemma_dir(directory: Path) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = _gemma_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=64,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        query_pre_attn_scalar=32,
        max_position_embeddings=1024,
        initializer_range=0.15,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(1)
    Gemma3ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(build_tiny_model_dir(tmp_path_factory.mktemp("xm-llama")), device="cpu")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(build_tiny_gemma_dir(tmp_path_factory.mktemp("xm-gemma")), device="cpu")


@pytest.fixture(scope="module")
def calibration(llama: LoadedModel, gemma: LoadedModel) -> CrossModelCalibration:
    return calibrate_pair(llama, gemma, SENTENCES, ridge=0.05, holdout_every=4)


def _sender_snapshot(lm: LoadedModel, context: str = SENTENCES[0]):  # type: ignore[no-untyped-def]
    parts = lm.template.split(lm.tokenizer, context, QUESTION)
    return parts, prefill(lm, parts.prefix_ids, template_prefix_tokens=parts.template_prefix_tokens)


# ------------------------------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("scaling", [1.0, 1.3])
def test_unrotate_inverts_rotate(scaling: float) -> None:
    torch.manual_seed(0)
    table = RopeTable(inv_freq=1.0 / (10000.0 ** (torch.arange(0, 32, 2) / 32)), scaling=scaling)
    x = torch.randn(3, 50, 32)
    positions = torch.arange(7, 57)
    rotated = rotate(x, table, positions)
    assert not torch.allclose(rotated, x, atol=1e-3)
    torch.testing.assert_close(unrotate(rotated, table, positions), x, atol=1e-5, rtol=1e-5)
    # Moving a key: de-rotate at one position, rotate at another == rotating at the other directly.
    moved = rotate(unrotate(rotated, table, positions), table, positions + 100)
    torch.testing.assert_close(moved, rotate(x, table, positions + 100), atol=1e-4, rtol=1e-4)


def _pre_rope_keys(lm: LoadedModel, ids: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Keys right before RoPE, per layer, ``[kv_heads, tokens, head_dim]``, captured by forward hooks."""
    captured: dict[int, torch.Tensor] = {}
    fp = lm.fingerprint
    hooks = []
    for index, layer in enumerate(lm.model.model.layers):
        attention = layer.self_attn
        # Gemma 3 normalises keys (k_norm, [b, heads, T, d]) before RoPE; Llama rotates k_proj's output.
        module = getattr(attention, "k_norm", None) or attention.k_proj

        def hook(_m, _inp, out, index=index, normed=module is not attention.k_proj):  # type: ignore[no-untyped-def]
            keys = out[0] if normed else out[0].view(-1, fp.num_kv_heads, fp.head_dim).transpose(0, 1)
            captured[index] = keys.detach().clone()

        hooks.append(module.register_forward_hook(hook))
    try:
        snapshot = prefill(lm, ids)
    finally:
        for handle in hooks:
            handle.remove()
    tables = rope_tables_of(lm.model)
    for index, keys in captured.items():
        cached = snapshot.keys[index]
        assert cached is not None
        torch.testing.assert_close(
            unrotate(cached, tables[index], snapshot.positions), keys, atol=2e-4, rtol=1e-4
        )
    return captured


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_rope_tables_undo_the_models_own_rotation(which: str, request: pytest.FixtureRequest) -> None:
    lm: LoadedModel = request.getfixturevalue(which)
    parts, _ = _sender_snapshot(lm)
    assert len(_pre_rope_keys(lm, parts.prefix_ids)) == lm.fingerprint.num_layers


def test_gemma_layers_get_their_own_rope_theta(gemma: LoadedModel) -> None:
    tables = rope_tables_of(gemma.model)
    assert tables[0].same_as(tables[1])
    assert not tables[0].same_as(tables[3])  # sliding (1e4) vs full attention (1e6)


# ------------------------------------------------------------------------------------ fit building blocks


def test_ridge_fit_recovers_a_known_linear_map() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 24, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 5, 24)
    weight = torch.randn(24, 10, generator=generator, dtype=torch.float64)
    bias = torch.randn(10, generator=generator, dtype=torch.float64) * 3
    y = x @ weight + bias + 0.01 * torch.randn(3000, 10, generator=generator, dtype=torch.float64)
    w, b = ridge_fit(x.T @ x, x.sum(0), x.T @ y, y.sum(0), x.shape[0], ridge=1e-6)
    torch.testing.assert_close(w, weight, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(b, bias, atol=1e-2, rtol=1e-2)
    residual = y - (x @ w + b)
    r2 = 1 - float((residual**2).sum() / ((y - y.mean(0)) ** 2).sum())
    assert r2 > 0.99


def test_align_tokens_picks_the_receiver_token_holding_the_last_character() -> None:
    # "Denver's Broncos": sender "Den" "ver" "'s" " Bron" "cos"; receiver "Denver" "'" "s" " Broncos"
    sender = [(0, 3), (3, 6), (6, 8), (8, 13), (13, 16), (16, 16)]
    receiver = [(0, 6), (6, 7), (7, 8), (8, 16)]
    assert align_tokens(sender, receiver) == [0, 0, 2, 3, 3, 3]
    # A gap the receiver does not cover (dropped whitespace) falls back to the token before it.
    assert align_tokens([(0, 2), (2, 4)], [(0, 2), (3, 4)]) == [0, 1]
    assert align_tokens([(0, 3)], [(1, 3)]) == [0]


def test_depth_layer_map_spans_both_stacks() -> None:
    mapping = depth_layer_map(30, 18, span=2)
    assert len(mapping) == 18
    assert mapping[0] == (0, 1)
    assert mapping[-1] == (28, 29)
    assert all(len(m) == 2 for m in mapping)
    assert depth_layer_map(18, 30, span=1)[15] == (9,)


def test_linear_cka_is_one_for_a_linear_copy_and_low_for_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=generator)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))
    assert linear_cka(x, x @ q * 3) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x, torch.randn(500, 16, generator=generator)) < 0.2


# ---------------------------------------------------------------------------------- calibrate, translate


def test_self_calibration_reproduces_the_models_own_cache(llama: LoadedModel) -> None:
    """Same model on both sides: the fit is the identity, so translation must give back the native KV."""
    cal = calibrate_pair(llama, llama, SENTENCES, ridge=1e-8, span=1, holdout_every=4)
    assert min(cal.quality.r2_k) > 0.999
    assert min(cal.quality.r2_v) > 0.999
    parts, snapshot = _sender_snapshot(llama, SENTENCES[5])
    translated = translate_snapshot(snapshot, cal, llama)
    end = parts.context_token_span[1]
    assert translated.num_tokens == end
    torch.testing.assert_close(translated.positions, snapshot.positions[:end])
    for mine, native in zip(translated.keys, snapshot.keys, strict=True):
        assert mine is not None
        assert native is not None
        torch.testing.assert_close(mine, native[:, :end], atol=2e-3, rtol=1e-3)


def test_translation_has_the_receivers_shapes(
    llama: LoadedModel, gemma: LoadedModel, calibration: CrossModelCalibration
) -> None:
    parts, snapshot = _sender_snapshot(llama)
    translated = translate_snapshot(snapshot, calibration, gemma)
    head = calibration.receiver.head_tokens
    context = parts.context_token_span[1] - parts.context_token_span[0]
    fp = gemma.fingerprint
    assert translated.fingerprint == fp
    assert translated.num_layers == fp.num_layers
    assert translated.template_prefix_tokens == head
    assert translated.num_tokens == head + context
    assert torch.equal(translated.positions, torch.arange(head + context))
    for k, v in zip(translated.keys, translated.values, strict=True):
        assert k is not None
        assert v is not None
        assert tuple(k.shape) == tuple(v.shape) == (fp.num_kv_heads, head + context, fp.head_dim)
        assert bool(torch.isfinite(k).all())
    assert translated.extra[EXTRA_CALIBRATION_KEY] == calibration.id
    answer = generate_from_snapshot(gemma, translated, receiver_suffix_ids(gemma, QUESTION), max_new_tokens=3)
    assert 1 <= answer.new_tokens <= 3


def test_reverse_direction_and_similarity_map(llama: LoadedModel, gemma: LoadedModel) -> None:
    cal = calibrate_pair(gemma, llama, SENTENCES, layer_map="similarity", span=2, holdout_every=4)
    assert cal.similarity is not None
    assert len(cal.similarity) == llama.fingerprint.num_layers
    assert all(len(row) == gemma.fingerprint.num_layers for row in cal.similarity)
    assert all(len(m) == 2 for m in cal.layer_map)
    _, snapshot = _sender_snapshot(gemma)
    translated = translate_snapshot(snapshot, cal, llama.fingerprint)  # fingerprint only: no head
    assert translated.template_prefix_tokens == 0
    assert int(translated.positions[0]) == cal.receiver.head_tokens
    k = translated.keys[0]
    assert k is not None
    assert k.shape[0] == llama.fingerprint.num_kv_heads
    assert k.shape[2] == llama.fingerprint.head_dim


def test_fit_quality_is_reported_per_receiver_layer(calibration: CrossModelCalibration) -> None:
    q = calibration.quality
    layers = calibration.receiver.fingerprint.num_layers
    assert len(q.r2_k) == len(q.r2_v) == len(q.train_r2_k) == layers
    assert q.heldout_texts == 3
    assert q.train_texts == 9
    assert q.heldout_tokens > 0
    # The training fit is at least as good as the held-out one (it is what was minimised).
    assert all(t >= h - 1e-9 for t, h in zip(q.train_r2_v, q.r2_v, strict=True))


def test_refuses_a_card_from_another_sender(
    llama: LoadedModel, gemma: LoadedModel, calibration: CrossModelCalibration
) -> None:
    _, snapshot = _sender_snapshot(gemma)
    with pytest.raises(CardCompatError, match=calibration.id):
        translate_snapshot(snapshot, calibration, gemma)
    _, snapshot = _sender_snapshot(llama)
    with pytest.raises(CardCompatError, match="this receiver is"):
        translate_snapshot(snapshot, calibration, llama)
    shifted = dataclasses.replace(snapshot, template_prefix_tokens=snapshot.template_prefix_tokens + 1)
    with pytest.raises(CardCompatError, match="template prefix"):
        translate_snapshot(shifted, calibration, gemma)


def test_require_calibration_names_both_models_and_the_id(
    llama: LoadedModel, gemma: LoadedModel, calibration: CrossModelCalibration
) -> None:
    found = require_calibration(
        [calibration], sender=llama.fingerprint, receiver=gemma.fingerprint, calibration_id=calibration.id
    )
    assert found is calibration
    with pytest.raises(CardCompatError) as info:
        require_calibration(
            [calibration], sender=gemma.fingerprint, receiver=llama.fingerprint, calibration_id="feedbeef"
        )
    message = str(info.value)
    assert "feedbeef" in message
    assert gemma.fingerprint.digest in message
    assert llama.fingerprint.digest in message


# ------------------------------------------------------------------------------------------- artifact


def test_artifact_round_trip(
    tmp_path: Path, llama: LoadedModel, gemma: LoadedModel, calibration: CrossModelCalibration
) -> None:
    path = calibration.save(tmp_path / "cal.safetensors")
    loaded = CrossModelCalibration.load(path, sender=llama.fingerprint, receiver=gemma.fingerprint)
    assert loaded.id == calibration.id
    assert loaded.alignment == ALIGNMENT_RULE
    assert loaded.layer_map == calibration.layer_map
    assert loaded.quality == calibration.quality
    _, snapshot = _sender_snapshot(llama)
    a = translate_snapshot(snapshot, calibration, gemma.fingerprint)
    b = translate_snapshot(snapshot, loaded, gemma.fingerprint)
    for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True):
        assert x is not None
        assert y is not None
        assert torch.equal(x, y)
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle


def test_artifact_load_rejects_the_wrong_fingerprint(
    tmp_path: Path, llama: LoadedModel, gemma: LoadedModel, calibration: CrossModelCalibration
) -> None:
    path = calibration.save(tmp_path / "cal.safetensors")
    with pytest.raises(CalibrationError, match="sender"):
        CrossModelCalibration.load(path, sender=gemma.fingerprint)
    with pytest.raises(CalibrationError, match="receiver"):
        CrossModelCalibration.load(path, receiver=llama.fingerprint)


def test_artifact_load_rejects_corrupt_files(tmp_path: Path, calibration: CrossModelCalibration) -> None:
    path = calibration.save(tmp_path / "cal.safetensors")
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.safetensors"
    data[-5] ^= 0x40  # inside the last tensor's bytes
    flipped.write_bytes(bytes(data))
    with pytest.raises(CalibrationError, match="does not match the recorded id"):
        CrossModelCalibration.load(flipped)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CalibrationError):
        CrossModelCalibration.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CalibrationError):
        CrossModelCalibration.load(garbage)
    with pytest.raises(CalibrationError, match="no cross-model calibration"):
        CrossModelCalibration.load(tmp_path / "missing.safetensors")


def test_artifact_load_rejects_an_edited_header(tmp_path: Path, calibration: CrossModelCalibration) -> None:
    from safetensors.torch import load_file, save_file

    path = calibration.save(tmp_path / "cal.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    edited = tmp_path / "edited.safetensors"
    save_file(
        load_file(str(path)),
        str(edited),
        metadata={k: v.replace('"ridge": 0.05', '"ridge": 0.5') for k, v in metadata.items()},
    )
    with pytest.raises(CalibrationError, match="does not match the recorded id"):
        CrossModelCalibration.load(edited)
    other = tmp_path / "other.safetensors"
    save_file(
        load_file(str(path)),
        str(other),
        metadata={k: v.replace('"version": 1', '"version": 99') for k, v in metadata.items()},
    )
    with pytest.raises(CalibrationError, match="version"):
        CrossModelCalibration.load(other)


def test_calibration_needs_held_out_texts(llama: LoadedModel, gemma: LoadedModel) -> None:
    with pytest.raises(CalibrationError, match="held-out"):
        calibrate_pair(llama, gemma, SENTENCES[:3], holdout_every=5)


# ------------------------------------------------------------------------------------------- real models


@pytest.mark.model
def test_real_models_rope_de_rotation_matches_their_pre_rope_keys() -> None:
    from qkv._errors import ModelNotPulledError

    for name in ("smollm2-135m-instruct", "gemma3-270m"):
        try:
            lm = load_model(name, device="cpu")
        except ModelNotPulledError as exc:
            missing(f"{exc} (tests marked `model` need it)")
        parts, _ = _sender_snapshot(lm)
        assert len(_pre_rope_keys(lm, parts.prefix_ids)) == lm.fingerprint.num_layers


# ------------------------------------------------------------------------------------------- benchmark


def _write_rows(path: Path, contexts: list[str]) -> Path:
    import json

    lines = [
        json.dumps({"id": str(i), "context": c, "question": QUESTION, "answers": ["Denver Broncos"]})
        for i, c in enumerate(contexts)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_calibration_texts_skip_scored_contexts(tmp_path: Path) -> None:
    from nodes.bench.crossmodel import calibration_texts
    from nodes.bench.datasets import load_rows

    data = _write_rows(tmp_path / "rows.jsonl", [*SENTENCES, SENTENCES[0]])
    scored = load_rows(data, limit=2)
    texts = calibration_texts(data, rows=100, offset=1, exclude=scored)
    assert texts == list(SENTENCES[2:])


@pytest.mark.parametrize("translate_at", ["receiver", "sender"])
def test_crossmodel_bench_runs_end_to_end(
    tmp_path: Path, llama: LoadedModel, gemma: LoadedModel, translate_at: TranslateAt
) -> None:
    from nodes.bench.crossmodel import CONDITIONS, run_crossmodel_bench
    from qkv import Budget, encode_context

    scored = _write_rows(tmp_path / "scored.jsonl", list(SENTENCES[:2]))
    calib = _write_rows(tmp_path / "calib.jsonl", list(SENTENCES))
    summary = run_crossmodel_bench(
        llama, gemma, scored, limit=2, calib_data=calib, calib_rows=10, calib_offset=0,
        calibration_path=tmp_path / "cal.safetensors", max_new_tokens=2, json_out=tmp_path / "out.json",
        budget=Budget(bits=3), translate_at=translate_at,
    )  # fmt: skip
    assert [r["condition"] for r in summary["results"]] == list(CONDITIONS)
    assert summary["calibration_texts"] == 10  # the two scored contexts were left out
    assert summary["translate_at"] == translate_at
    assert summary["card_budget"]["bits"] == 3
    assert (tmp_path / "cal.safetensors").is_file()
    assert (tmp_path / "out.rows.jsonl").read_text().count("\n") == 2
    assert len(summary["calibration"]["r2_k"]) == gemma.fingerprint.num_layers
    # translated-kv is a real card at the budget: what was sent is that card's size.
    calibration = CrossModelCalibration.load(tmp_path / "cal.safetensors")
    cards = [
        encode_context(llama, text, Budget(bits=3), translate=calibration, translate_at=translate_at)
        for text in SENTENCES[:2]
    ]
    sent = {r["condition"]: r["sent_bytes"] for r in summary["results"]}
    assert sent["translated-kv"] == sum(card.card_bytes for card in cards) / 2
    assert sent["translated-kv+facts"] > sent["translated-kv"]  # the facts line travels in the card
