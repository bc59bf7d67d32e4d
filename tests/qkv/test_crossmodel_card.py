"""A card from one model read by another: the card names its calibration; the receiver translates or refuses.

Two tiny random models of different shapes, built in code (Llama: 3 layers, 2 KV heads, head_dim 16, RoPE
theta 1e4, byte-level tokenizer; Gemma 3: 4 layers, 1 KV head, head_dim 32, theta 1e4/1e6 per layer type,
metaspace BPE). Both directions, translated at the receiver and at the sender.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from qkv import (
    Budget,
    CalibrationError,
    CardCompatError,
    CardFormatError,
    CrossModelCalibration,
    CrossModelRecord,
    LoadedModel,
    answer_from_card,
    answer_logprobs,
    calibrate_pair,
    calibration_for_card,
    decode_card,
    encode_context,
    encode_observation,
    load_model,
    observe,
    prefill,
    read_card_info,
    receive_card,
    receiver_suffix_ids,
    translate_snapshot,
)
from qkv._crossmodel import CROSSMODEL_KEY
from tests.conftest import build_tiny_model_dir
from tests.qkv.test_crossmodel import QUESTION, SENTENCES, build_tiny_gemma_dir

CONTEXT = f"{SENTENCES[0]} {SENTENCES[6]}"
ANSWER = " Denver Broncos won"
# Measured on these models (bits=16, both directions, with and without eviction): max |log p| difference
# between translating at the sender and at the receiver 4.5e-4 .. 6.4e-4; at bits=32 it is exactly 0.
FP16_LOGPROB_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    return {
        "llama": load_model(build_tiny_model_dir(tmp_path_factory.mktemp("card-llama")), device="cpu"),
        "gemma": load_model(build_tiny_gemma_dir(tmp_path_factory.mktemp("card-gemma")), device="cpu"),
    }


@pytest.fixture(scope="module")
def calibrations(models: dict[str, LoadedModel]) -> dict[tuple[str, str], CrossModelCalibration]:
    llama, gemma = models["llama"], models["gemma"]
    return {
        ("llama", "gemma"): calibrate_pair(llama, gemma, SENTENCES, holdout_every=4),
        ("gemma", "llama"): calibrate_pair(gemma, llama, SENTENCES, holdout_every=4),
    }


DIRECTIONS = [("llama", "gemma"), ("gemma", "llama")]


def _pair(
    models: dict[str, LoadedModel],
    calibrations: dict[tuple[str, str], CrossModelCalibration],
    direction: tuple[str, str],
) -> tuple[LoadedModel, LoadedModel, CrossModelCalibration]:
    return models[direction[0]], models[direction[1]], calibrations[direction]


def _logprobs(receiver: LoadedModel, data: bytes, calibrations: list[CrossModelCalibration]) -> torch.Tensor:
    received = receive_card(receiver, data, calibrations=calibrations)
    target = receiver.tokenizer.encode(ANSWER, add_special_tokens=False)
    return answer_logprobs(receiver, received.snapshot, received.suffix_ids(receiver, QUESTION), target)


def _card_with_record(lm: LoadedModel, record: Any, budget: Budget | None = None) -> bytes:
    """A well-formed card of ``lm`` whose metadata holds ``record`` as its cross-model record."""
    obs = observe(lm, CONTEXT)
    return encode_observation(
        lm, obs, budget or Budget(bits=8), context=CONTEXT, extra={CROSSMODEL_KEY: record}
    ).data


# -------------------------------------------------------------------------------------------- both ways


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: "->".join(d))
def test_translated_at_receiver_answers_from_the_named_calibration(
    models: dict[str, LoadedModel],
    calibrations: dict[tuple[str, str], CrossModelCalibration],
    direction: tuple[str, str],
) -> None:
    sender, receiver, calibration = _pair(models, calibrations, direction)
    card = encode_context(sender, CONTEXT, Budget(bits=4), translate=calibration)
    info = read_card_info(card.data)
    assert info.fingerprint == sender.fingerprint  # still an ordinary card of the sender's model
    assert info.meta.extra[CROSSMODEL_KEY] == {
        "at": "receiver",
        "sender": sender.fingerprint.digest,
        "targets": [{"receiver": receiver.fingerprint.digest, "calibration": calibration.id}],
    }
    other = calibrations[(direction[1], direction[0])]  # the reverse pair: not the one named
    answer = answer_from_card(
        receiver, card.data, QUESTION, max_new_tokens=3, calibrations=[other, calibration]
    )
    assert answer.calibration_id == calibration.id
    assert 1 <= answer.generation.new_tokens <= 3
    assert answer.translate_s > 0
    assert answer.ttft_s >= answer.decode_s + answer.translate_s + answer.head_s


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: "->".join(d))
def test_lossless_card_translated_at_receiver_is_the_direct_translation(
    models: dict[str, LoadedModel],
    calibrations: dict[tuple[str, str], CrossModelCalibration],
    direction: tuple[str, str],
) -> None:
    """At bits=32 the card path computes what translating the sender's own snapshot computes."""
    sender, receiver, calibration = _pair(models, calibrations, direction)
    card = encode_context(sender, CONTEXT, Budget(bits=32), translate=calibration)
    parts = sender.template.split(sender.tokenizer, CONTEXT, "")
    snapshot = prefill(sender, parts.prefix_ids, template_prefix_tokens=parts.template_prefix_tokens)
    direct = translate_snapshot(snapshot, calibration, receiver)
    target = receiver.tokenizer.encode(ANSWER, add_special_tokens=False)
    expected = answer_logprobs(receiver, direct, receiver_suffix_ids(receiver, QUESTION), target)
    torch.testing.assert_close(_logprobs(receiver, card.data, [calibration]), expected, atol=0, rtol=0)


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: "->".join(d))
def test_translated_at_sender_is_a_card_of_the_receivers_model(
    models: dict[str, LoadedModel],
    calibrations: dict[tuple[str, str], CrossModelCalibration],
    direction: tuple[str, str],
) -> None:
    sender, receiver, calibration = _pair(models, calibrations, direction)
    card = encode_context(
        sender, CONTEXT, Budget(bits=8, facts=True), translate=calibration, translate_at="sender"
    )
    decoded = decode_card(card.data, expect=receiver.fingerprint)  # a card of B, not of A
    head = calibration.receiver.head_tokens
    assert decoded.info.template_prefix_tokens == 0
    assert int(decoded.snapshot.positions[0]) == head  # context only: B's template head is B's to prefill
    record = decoded.meta.extra[CROSSMODEL_KEY]
    assert record["at"] == "sender"
    assert record["sender"] == sender.fingerprint.digest
    assert record["targets"] == [{"receiver": receiver.fingerprint.digest, "calibration": calibration.id}]
    assert record["receiver_head_tokens"] == head
    assert card.layers_sent == receiver.fingerprint.num_layers
    # The receiver needs no calibration: the translation already happened.
    received = receive_card(receiver, card.data)
    assert received.calibration_id == calibration.id
    assert received.snapshot.template_prefix_tokens == head
    assert torch.equal(received.snapshot.positions[: head + 1], torch.arange(head + 1))
    answer = answer_from_card(receiver, card.data, QUESTION, max_new_tokens=3)
    assert 1 <= answer.generation.new_tokens <= 3
    assert answer.translate_s == 0.0
    assert answer.card.meta.facts  # the facts line travels in either mode


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: "->".join(d))
@pytest.mark.parametrize(("bits", "keep"), [(32, 1.0), (32, 0.5), (16, 1.0), (16, 0.5)])
def test_translating_at_sender_or_receiver_gives_the_same_logits(
    models: dict[str, LoadedModel],
    calibrations: dict[tuple[str, str], CrossModelCalibration],
    direction: tuple[str, str],
    bits: int,
    keep: float,
) -> None:
    """Eviction happens in the sender's space either way; only where the rounding to fp16 falls differs."""
    sender, receiver, calibration = _pair(models, calibrations, direction)
    budget = Budget(bits=bits, keep=keep, sinks=2, window=8)
    at_receiver = encode_context(sender, CONTEXT, budget, translate=calibration)
    at_sender = encode_context(sender, CONTEXT, budget, translate=calibration, translate_at="sender")
    if keep == 1.0:  # the sender drops its template tokens before translating
        template = calibration.sender.head_tokens + calibration.sender.tail_tokens
        assert at_sender.card_tokens == at_receiver.card_tokens - template
    a = _logprobs(receiver, at_receiver.data, [calibration])
    b = _logprobs(receiver, at_sender.data, [])
    tolerance = 0.0 if bits == 32 else FP16_LOGPROB_TOLERANCE
    assert float((a - b).abs().max()) <= tolerance
    # ... and the comparison can fail: another calibration of the same pair moves the logits.
    matched = dataclasses.replace(calibration, variance_match=True)
    c = _logprobs(receiver, encode_context(sender, CONTEXT, budget, translate=matched).data, [matched])
    assert float((a - c).abs().max()) > 10 * FP16_LOGPROB_TOLERANCE


def test_a_card_for_this_model_behaves_as_today(
    models: dict[str, LoadedModel], calibrations: dict[tuple[str, str], CrossModelCalibration]
) -> None:
    llama = models["llama"]
    plain = encode_context(llama, CONTEXT, Budget(bits=4))
    named = encode_context(llama, CONTEXT, Budget(bits=4), translate=calibrations[("llama", "gemma")])
    expected = answer_from_card(llama, plain.data, QUESTION, max_new_tokens=4)
    answer = answer_from_card(llama, named.data, QUESTION, max_new_tokens=4)  # no calibration needed
    assert answer.generation.token_ids == expected.generation.token_ids
    assert answer.calibration_id is None
    assert answer.translate_s == 0.0


def test_one_card_for_several_receiver_models(
    tmp_path: Path, models: dict[str, LoadedModel], calibrations: dict[tuple[str, str], CrossModelCalibration]
) -> None:
    """A reader publishing to a topic names one calibration per receiver model; each picks its own."""
    from transformers import LlamaForCausalLM

    from tests.conftest import _tiny_tokenizer, tiny_llama_config

    torch.manual_seed(3)
    LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    small = load_model(tmp_path, device="cpu")
    gemma, llama = models["gemma"], models["llama"]
    to_llama = calibrations[("gemma", "llama")]
    to_small = calibrate_pair(gemma, small, SENTENCES, holdout_every=4)
    card = encode_context(gemma, CONTEXT, Budget(bits=8), translate=[to_llama, to_small])
    both = [to_llama, to_small]
    assert answer_from_card(llama, card.data, QUESTION, calibrations=both).calibration_id == to_llama.id
    assert answer_from_card(small, card.data, QUESTION, calibrations=both).calibration_id == to_small.id
    # A model the card does not name is refused, with what the card does name.
    only_small = encode_context(gemma, CONTEXT, Budget(bits=8), translate=to_small)
    with pytest.raises(CardCompatError, match=small.fingerprint.digest) as info:
        answer_from_card(llama, only_small.data, QUESTION, calibrations=both)
    assert llama.fingerprint.digest in str(info.value)


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: "->".join(d))
def test_receiver_without_the_calibration_refuses_naming_it_and_both_models(
    models: dict[str, LoadedModel],
    calibrations: dict[tuple[str, str], CrossModelCalibration],
    direction: tuple[str, str],
) -> None:
    sender, receiver, calibration = _pair(models, calibrations, direction)
    card = encode_context(sender, CONTEXT, Budget(bits=4), translate=calibration)
    same_pair_other_fit = dataclasses.replace(calibration, ridge=calibration.ridge * 2)
    assert same_pair_other_fit.id != calibration.id
    for have in ([], [same_pair_other_fit], [calibrations[(direction[1], direction[0])]]):
        with pytest.raises(CardCompatError) as info:
            answer_from_card(receiver, card.data, QUESTION, calibrations=have)
        message = str(info.value)
        assert calibration.id in message
        assert sender.fingerprint.digest in message
        assert receiver.fingerprint.digest in message


def test_a_card_naming_a_calibration_of_the_wrong_pair_is_refused(
    models: dict[str, LoadedModel], calibrations: dict[tuple[str, str], CrossModelCalibration]
) -> None:
    llama, gemma = models["llama"], models["gemma"]
    reverse = calibrations[("gemma", "llama")]  # gemma -> llama, named for a llama -> gemma hand-off
    forged = {
        "at": "receiver",
        "sender": llama.fingerprint.digest,
        "targets": [{"receiver": gemma.fingerprint.digest, "calibration": reverse.id}],
    }
    with pytest.raises(CardCompatError, match=reverse.id):
        answer_from_card(gemma, _card_with_record(llama, forged), QUESTION, calibrations=[reverse])


def test_a_card_translated_at_sender_for_another_model_is_refused(
    models: dict[str, LoadedModel], calibrations: dict[tuple[str, str], CrossModelCalibration]
) -> None:
    llama, gemma = models["llama"], models["gemma"]
    card = encode_context(llama, CONTEXT, translate=calibrations[("llama", "gemma")], translate_at="sender")
    with pytest.raises(CardCompatError, match="another model"):
        answer_from_card(llama, card.data, QUESTION, calibrations=list(calibrations.values()))
    plain = encode_context(llama, CONTEXT)  # no record at all: as today
    with pytest.raises(CardCompatError, match="another model"):
        answer_from_card(gemma, plain.data, QUESTION, calibrations=list(calibrations.values()))


def _valid_record(llama: LoadedModel, gemma: LoadedModel) -> dict[str, Any]:
    return {
        "at": "receiver",
        "sender": llama.fingerprint.digest,
        "targets": [{"receiver": gemma.fingerprint.digest, "calibration": "0123456789abcdef"}],
    }


MALFORMED: list[tuple[str, Any]] = [
    ("not a map", ["receiver"]),
    ("at", {"at": "both"}),
    ("at", {"at": None}),
    ("sender", {"sender": "XYZ"}),
    ("sender", {"sender": 12}),
    ("targets", {"targets": []}),
    ("targets", {"targets": "0123456789abcdef"}),
    ("targets", {"targets": [["a", "b"]]}),
    ("targets", {"targets": [{"receiver": "0123456789abcdef"}] * 65}),
    ("calibration id", {"targets": [{"receiver": "0123456789abcdef", "calibration": "0123456789ABCDEF"}]}),
    ("calibration id", {"targets": [{"receiver": "0123456789abcdef", "calibration": "0123456789abcde"}]}),
    ("calibration id", {"targets": [{"receiver": "0123456789abcdef", "calibration": ["x"]}]}),
    (
        "receiver twice",
        {"targets": [{"receiver": "0123456789abcdef", "calibration": "0123456789abcdef"}] * 2},
    ),
    ("head tokens", {"receiver_head_tokens": 3}),  # only a card translated at its sender has one
    ("head tokens", {"at": "sender", "receiver_head_tokens": True}),
    ("head tokens", {"at": "sender", "receiver_head_tokens": -1}),
]


@pytest.mark.parametrize(
    ("what", "change"), MALFORMED, ids=[f"{w}-{i}" for i, (w, _) in enumerate(MALFORMED)]
)
def test_malformed_records_are_format_errors(
    models: dict[str, LoadedModel],
    calibrations: dict[tuple[str, str], CrossModelCalibration],
    what: str,
    change: Any,
) -> None:
    llama, gemma = models["llama"], models["gemma"]
    record = change if isinstance(change, list) else {**_valid_record(llama, gemma), **change}
    with pytest.raises(CardFormatError):
        CrossModelRecord.from_meta(record)
    card = _card_with_record(llama, record)
    for receiver in (llama, gemma):  # refused by this model's receivers too: the card is malformed
        with pytest.raises(CardFormatError):
            receive_card(receiver, card, calibrations=list(calibrations.values()))


def test_records_that_contradict_their_card_are_format_errors(
    models: dict[str, LoadedModel], calibrations: dict[tuple[str, str], CrossModelCalibration]
) -> None:
    llama, gemma = models["llama"], models["gemma"]
    valid = _valid_record(llama, gemma)
    CrossModelRecord.from_meta(valid)  # well-formed on its own
    wrong_sender = {**valid, "sender": gemma.fingerprint.digest}
    with pytest.raises(CardFormatError, match="names sender"):
        receive_card(gemma, _card_with_record(llama, wrong_sender), calibrations=list(calibrations.values()))
    # "translated at the sender for gemma", on a card whose KV is llama's
    claims_gemma = {**valid, "at": "sender", "receiver_head_tokens": 4}
    with pytest.raises(CardFormatError, match="translated for"):
        receive_card(llama, _card_with_record(llama, claims_gemma))
    # translated at the sender, yet holding template tokens
    claims_llama = {
        "at": "sender",
        "sender": gemma.fingerprint.digest,
        "targets": [{"receiver": llama.fingerprint.digest, "calibration": "0123456789abcdef"}],
        "receiver_head_tokens": 4,
    }
    with pytest.raises(CardFormatError, match="no template tokens"):
        receive_card(llama, _card_with_record(llama, claims_llama))


def test_a_card_translated_at_sender_with_a_head_the_receiver_lacks_is_refused(
    models: dict[str, LoadedModel], calibrations: dict[tuple[str, str], CrossModelCalibration]
) -> None:
    llama, gemma = models["llama"], models["gemma"]
    calibration = calibrations[("llama", "gemma")]
    # As if gemma's template head were one token longer when the calibration was fitted.
    longer = dataclasses.replace(
        calibration,
        receiver=dataclasses.replace(calibration.receiver, head_tokens=calibration.receiver.head_tokens + 1),
    )
    card = encode_context(llama, CONTEXT, translate=longer, translate_at="sender")
    with pytest.raises(CardCompatError, match="template head"):
        answer_from_card(gemma, card.data, QUESTION)


def test_sender_refuses_what_a_receiver_could_not_translate(
    models: dict[str, LoadedModel], calibrations: dict[tuple[str, str], CrossModelCalibration]
) -> None:
    llama = models["llama"]
    to_gemma, from_gemma = calibrations[("llama", "gemma")], calibrations[("gemma", "llama")]
    with pytest.raises(CalibrationError, match="not for this sender"):
        encode_context(llama, CONTEXT, translate=from_gemma)
    with pytest.raises(ValueError, match="layer selection"):
        encode_context(llama, CONTEXT, Budget(layers=0.5), translate=to_gemma)
    gemma, gemma_to_llama = models["gemma"], calibrations[("gemma", "llama")]
    assert gemma_to_llama.sender.tail_tokens == 3  # "\n\n" in the tiny Gemma's tokenizer
    with pytest.raises(ValueError, match="template tail"):
        encode_context(gemma, CONTEXT, Budget(keep=0.5, window=2), translate=gemma_to_llama)
    with pytest.raises(ValueError, match="uniform width"):
        encode_context(
            llama, CONTEXT, Budget(bits=4, token_mixed=True), translate=to_gemma, translate_at="sender"
        )
    with pytest.raises(ValueError, match="one receiver"):
        encode_context(llama, CONTEXT, translate=[to_gemma, to_gemma], translate_at="sender")
    with pytest.raises(ValueError, match="once"):
        encode_context(llama, CONTEXT, translate=[to_gemma, to_gemma])
    with pytest.raises(ValueError, match="translate_at"):
        encode_context(llama, CONTEXT, translate=to_gemma, translate_at="middle")  # type: ignore[arg-type]


def test_a_head_is_refused_for_a_crossmodel_card(
    models: dict[str, LoadedModel], calibrations: dict[tuple[str, str], CrossModelCalibration]
) -> None:
    llama, gemma = models["llama"], models["gemma"]
    calibration = calibrations[("llama", "gemma")]
    card = encode_context(llama, CONTEXT, translate=calibration)
    head = prefill(gemma, [2, 5])
    with pytest.raises(CardCompatError, match="split card"):
        answer_from_card(gemma, card.data, QUESTION, calibrations=[calibration], head=head)


def test_a_store_can_check_a_card_from_its_header(
    models: dict[str, LoadedModel], calibrations: dict[tuple[str, str], CrossModelCalibration]
) -> None:
    """calibration_for_card answers what receive_card would, without hashing or decoding the payload."""
    llama, gemma = models["llama"], models["gemma"]
    calibration = calibrations[("llama", "gemma")]
    named = read_card_info(encode_context(llama, CONTEXT, Budget(bits=4), translate=calibration).data)
    translated = read_card_info(
        encode_context(llama, CONTEXT, Budget(bits=4), translate=calibration, translate_at="sender").data
    )
    plain = read_card_info(encode_context(llama, CONTEXT, Budget(bits=4)).data)
    assert calibration_for_card(named, gemma.fingerprint, [calibration]) is calibration
    assert calibration_for_card(named, llama.fingerprint) is None  # an ordinary llama card
    assert calibration_for_card(translated, gemma.fingerprint) is None  # already in gemma's space
    assert calibration_for_card(plain, llama.fingerprint) is None
    with pytest.raises(CardCompatError, match=calibration.id):
        calibration_for_card(named, gemma.fingerprint)
    for info in (translated, plain):
        with pytest.raises(CardCompatError, match="another model"):
            calibration_for_card(info, (gemma if info is plain else llama).fingerprint, [calibration])
