"""Shared fixtures.

* ``tiny_lm``: a randomly initialised 3-layer Llama (GQA: 4 query heads, 2 KV heads) with a byte-level
  tokenizer built in code, saved to a temporary directory and loaded back through ``qkv`` ``load_model``
  (the "any local Hugging Face directory" path). Needs no download; loads in about a second.
* ``real_lm``: SmolLM2-135M-Instruct from the local model store; skips (with the command to fix it) when the
  model has not been pulled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest
import torch

# Special tokens first so their ids are small and fixed; ChatML markers make the chatml template apply.
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2 style byte-level tokenizers use for raw bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_vocab() -> list[str]:
    return [*TINY_SPECIAL_TOKENS, *byte_level_alphabet()]


def _tiny_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(tiny_vocab())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )


def tiny_llama_config(**overrides: object):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    settings: dict[str, object] = {
        "vocab_size": len(tiny_vocab()),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        # A wide init gives peaked logits, so greedy choices are not near-ties decided by rounding.
        "initializer_range": 0.15,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_tiny_model_dir(directory: Path, *, seed: int = 0) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(directory)
    _tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from qkv._modelstore import load_model

    return load_model(tiny_model_dir, device="cpu")


def missing(reason: str) -> NoReturn:
    """Skip a test whose model or data is absent, unless this run promised them.

    ``scripts/test.sh`` pulls every model and sets ``EDGEBUS_REQUIRE_MODELS=1``, so in CI a missing model is a
    failure, never a silent skip.
    """
    if os.environ.get("EDGEBUS_REQUIRE_MODELS") == "1":
        pytest.fail(f"{reason} (EDGEBUS_REQUIRE_MODELS=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_lm():  # type: ignore[no-untyped-def]
    from qkv._errors import ModelNotPulledError
    from qkv._modelstore import DEFAULT_MODEL, load_model

    try:
        return load_model(DEFAULT_MODEL, device="cpu")
    except ModelNotPulledError as exc:
        missing(f"{exc} (tests marked `model` need it)")
