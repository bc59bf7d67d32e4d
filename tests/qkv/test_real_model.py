"""SmolLM2-135M-Instruct from the store: an uncompressed KV hand-off is the text baseline, token for token.

Needs ``edgebus models pull smollm2-135m-instruct`` once (the ``real_lm`` fixture skips otherwise); the
contexts are the repository's bundled sample.
"""

from __future__ import annotations

import json

import pytest
import torch

from nodes.demo import sample_rows
from qkv._hf import answer_logprobs, generate_from_snapshot, generate_from_text, prefill
from qkv._modelstore import MANIFEST_NAME

# Loading the real model and generating takes ~25 s alone, minutes on a loaded 2-core box.
pytestmark = [pytest.mark.model, pytest.mark.timeout(1200)]


def test_kv_raw_generates_exactly_the_text_tokens(real_lm):
    # The repository's bundled sample (nodes/sample/SOURCES.md): two SQuAD rows and a NarrativeQA one.
    for row in sample_rows(3):
        parts = real_lm.template.split(real_lm.tokenizer, row.context, row.question)
        snapshot = prefill(real_lm, parts.prefix_ids, template_prefix_tokens=parts.template_prefix_tokens)
        kv = generate_from_snapshot(real_lm, snapshot, parts.suffix_ids)
        text = generate_from_text(real_lm, parts.prefix_ids, parts.suffix_ids)
        assert kv.token_ids == text.token_ids, row.id
        assert kv.text == text.text
        assert kv.text, f"empty answer for {row.id}"

        # Teacher-forced along the answer: the two conditions give the same distributions.
        from_kv = answer_logprobs(real_lm, snapshot, parts.suffix_ids, kv.token_ids)
        from_text = answer_logprobs(
            real_lm, None, parts.suffix_ids, kv.token_ids, prefix_ids=parts.prefix_ids
        )
        kl = torch.nn.functional.kl_div(from_kv, from_text, log_target=True, reduction="batchmean")
        assert float(kl) < 1e-4


def test_snapshot_matches_the_published_geometry(real_lm):
    snapshot = prefill(real_lm, real_lm.tokenizer.encode("Hello there", add_special_tokens=False))
    assert snapshot.num_layers == 30
    key = snapshot.keys[0]
    assert key is not None
    assert tuple(key.shape) == (3, snapshot.num_tokens, 64)
    assert snapshot.fingerprint.rope_theta == 100000.0
    assert snapshot.fp16_bytes() == 23_040 * snapshot.num_tokens


def test_store_copy_was_checked_against_the_gguf(real_lm):
    manifest = json.loads((real_lm.path / MANIFEST_NAME).read_text(encoding="utf-8"))
    check = manifest["conversion_check"]
    assert manifest["source"]["gguf_sha256"].startswith("b179c952")
    assert check["top1_agreement"] == 1.0
    assert check["max_abs_logit_diff"] < 0.01 * check["logit_scale"]
