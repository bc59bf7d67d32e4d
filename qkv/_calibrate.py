"""Sensitivity calibration: how much the receiver's answer moves when one layer's K or V is quantized.

:func:`profile_sensitivity` measures, for every layer ``l``, tensor ``t`` in (k, v) and width ``w``, the mean
next-token KL divergence ``KL(reference || perturbed)`` along teacher-forced answer tokens, where
*reference* is the receiver's distribution given the lossless snapshot and *perturbed* the same with only
``(l, t)`` coded at width ``w`` and every other tensor lossless. The table feeds
:func:`qkv._allocate.allocate_bits`, which assumes these per-tensor distortions add up.

Contracts:

* The perturbation is exactly what a CacheCard does to that tensor: :func:`card_roundtrip` quantizes with
  :func:`qkv._quant.quantize` (keys grouped along tokens, values along channels, ``group_size``) and
  dequantizes into the snapshot's dtype with :func:`qkv._quant.dequantize_into`, as ``decode_card`` does;
  width 16 is an fp16 round trip; width 32 (raw) is the tensor itself, so its KL is 0 by construction.
* Each item ``(context, question, answer)`` is split with the model's prompt template and prefilled once;
  the reference is :func:`qkv._hf.answer_logprobs` on the lossless snapshot (the receiver path the quality
  benchmark uses: only the question's tokens on top of the snapshot, teacher-forced along the answer). The
  perturbed variants of one layer (both tensors, every width) run as the rows of one batched forward that
  computes what ``answer_logprobs`` computes per variant (agreement to 1e-4 in log-probability is tested; KL
  noise floor about 1e-8). A cell is the mean over items of the per-item mean over answer positions: the
  benchmark's ``kl`` averaged the same way. Cells below about 1e-8, including slightly negative ones, are
  that noise floor, recorded as measured.
* Deterministic for a given model, items, widths and group size (no sampling; CPU forwards are repeatable).
* The batched forward is the one place outside :mod:`qkv._hf` that touches transformers' cache API
  (``DynamicCache.update`` with a batch axis); it belongs next to ``answer_logprobs`` when that module moves.
* Calibration texts must not overlap the rows a benchmark scores; the caller chooses them.

:func:`default_profile` finds a stored profile for a loaded model: first in ``$EDGEBUS_HOME/profiles/``
(a local recalibration wins), then among the profiles shipped in ``qkv/profiles/``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from ._allocate import DEFAULT_WIDTHS, TENSORS, Allocation, SensitivityProfile
from ._hf import answer_logprobs, prefill
from ._kv import KVSnapshot
from ._modelstore import LoadedModel, models_dir
from ._quant import KEY_AXIS, MAX_QUANT_BITS, VALUE_AXIS, dequantize_into, quantize
from ._rope import RopeTable
from ._rotation import Rotation, check_rotation, from_code_space, rope_table_for, to_code_space

#: Profiles that ship with the package (one JSON file per model and group size).
SHIPPED_PROFILES = Path(__file__).resolve().parent / "profiles"

FP16_WIDTH = 16
RAW_WIDTH = 32
CALIBRATION_WIDTHS = frozenset({*range(1, MAX_QUANT_BITS + 1), FP16_WIDTH, RAW_WIDTH})
_AXES = {"k": KEY_AXIS, "v": VALUE_AXIS}

#: One calibration item: ``(context, question, answer)``.
CalibrationItem = tuple[str, str, str]


def profiles_dir(home: Path | str | None = None) -> Path:
    """``<home>/profiles``, home found as for the model store (``$EDGEBUS_HOME``, ``~/.cache/edgebus``)."""
    return models_dir(home).parent / "profiles"


def profile_filename(model_name: str, group_size: int, rotation: str = "none", fp16_sinks: int = 0) -> str:
    """Conventional profile file name: ``<model-name>-g<group_size>[-<rotation>][-s<sinks>].json``."""
    coding = ("" if rotation == "none" else f"-{rotation}") + (f"-s{fp16_sinks}" if fp16_sinks else "")
    return f"{model_name}-g{group_size}{coding}.json"


def card_roundtrip(
    tensor: torch.Tensor,
    width: int,
    *,
    kind: str,
    group_size: int,
    rotation: Rotation = "none",
    fp16_sinks: int = 0,
    positions: torch.Tensor | None = None,
    rope: RopeTable | None = None,
) -> torch.Tensor:
    """``tensor`` (``[heads, tokens, head_dim]``) as a card at ``width`` would give it back, same dtype.

    ``positions`` (ascending, default ``0..tokens-1``) place the tokens for ``fp16_sinks`` (tokens at
    positions below it are fp16, outside the groups) and for a pre-RoPE ``rotation`` (which needs ``rope``).
    """
    if kind not in _AXES:
        raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
    check_rotation(rotation)
    if width == RAW_WIDTH:
        return tensor
    if width == FP16_WIDTH:
        return tensor.to(torch.float16).to(tensor.dtype)
    tokens = tensor.shape[-2]
    if positions is None:
        positions = torch.arange(tokens, dtype=torch.int64)
    sinks = int((positions < fp16_sinks).sum())
    rest = tensor[..., sinks:, :]
    if rest.shape[-2] == 0:
        return tensor.to(torch.float16).to(tensor.dtype)
    axis = _AXES[kind]
    rest_positions = positions[sinks:]
    coded = to_code_space(rest, kind=kind, rotation=rotation, positions=rest_positions, rope=rope)
    batch = quantize([coded], bits=width, group_size=group_size, axis=axis)
    out = torch.empty_like(coded)
    dequantize_into(out, batch.codes[0], batch.scales[0], batch.zeros[0], group_size=group_size, axis=axis)
    out = from_code_space(out, kind=kind, rotation=rotation, positions=rest_positions, rope=rope)
    head = tensor[..., :sinks, :].to(torch.float16).to(tensor.dtype)
    return torch.cat([head, out.to(tensor.dtype)], dim=-2)


def _mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(reference || other); both are log-probabilities ``[positions, vocab]``."""
    return float((reference.exp() * (reference - other)).sum(dim=-1).mean())


def _with_tensor(snapshot: KVSnapshot, layer: int, kind: str, tensor: torch.Tensor) -> KVSnapshot:
    if kind == "k":
        keys = list(snapshot.keys)
        keys[layer] = tensor
        return replace(snapshot, keys=tuple(keys))
    values = list(snapshot.values)
    values[layer] = tensor
    return replace(snapshot, values=tuple(values))


def _check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    chosen = tuple(sorted(set(widths)))
    if not chosen:
        raise ValueError("no widths to measure")
    for width in chosen:
        if isinstance(width, bool) or width not in CALIBRATION_WIDTHS:
            raise ValueError(f"width {width!r} is not one of 1..8, 16 (fp16), 32 (raw)")
    return chosen


def _variant_logprobs(
    lm: LoadedModel,
    snapshot: KVSnapshot,
    variants: Sequence[tuple[int, str, torch.Tensor]],
    suffix_ids: Sequence[int],
    target_ids: Sequence[int],
) -> torch.Tensor:
    """:func:`qkv._hf.answer_logprobs` for several variants of one snapshot at once: ``[B, len(target), V]``.

    Variant ``b`` is ``snapshot`` with the ``kind`` tensor of ``layer`` replaced; it becomes row ``b`` of one
    batched forward. Each row computes what ``answer_logprobs(lm, variant, suffix_ids, target_ids)`` computes
    (same tokens, explicit positions ``next_position + arange``, every cached token visible, no mask); batched
    kernels may round differently in the last bits (tests pin agreement to 1e-4). Batching matters on a CPU:
    a forward's fixed cost is about half the cost of a question-sized one. Needs every layer present.
    """
    count = len(variants)
    dtype = lm.model.dtype
    replaced: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for row, (layer, kind, tensor) in enumerate(variants):
        replaced.setdefault((layer, kind), {})[row] = tensor
    cache = DynamicCache(config=lm.model.config)
    for layer in range(snapshot.num_layers):
        pair: list[torch.Tensor] = []
        for kind, source in (("k", snapshot.keys[layer]), ("v", snapshot.values[layer])):
            if source is None:
                raise ValueError(f"snapshot has no {kind} for layer {layer}: calibration needs every layer")
            rows = replaced.get((layer, kind))
            base = source.to(device=lm.device, dtype=dtype)
            if rows is None:
                # The forward concatenates the new tokens onto it, so a broadcast view is never written to.
                pair.append(base.unsqueeze(0).expand(count, *base.shape))
            else:
                pair.append(torch.stack([rows.get(row, base).to(lm.device, dtype) for row in range(count)]))
        cache.update(pair[0], pair[1], layer)
    teacher = [*suffix_ids, *target_ids[:-1]]
    ids = torch.tensor([teacher], dtype=torch.int64, device=lm.device).expand(count, -1)
    positions = snapshot.next_position + torch.arange(len(teacher), dtype=torch.int64)
    with torch.no_grad():
        out = lm.model(
            input_ids=ids,
            position_ids=positions.to(lm.device).unsqueeze(0).expand(count, -1),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=len(target_ids),
        )
    logits: torch.Tensor = out.logits
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def profile_sensitivity(
    lm: LoadedModel,
    texts: Sequence[CalibrationItem],
    *,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    group_size: int = 32,
    progress: bool = True,
    sparse_widths: Collection[int] = (),
    sparse_items: int = 4,
    rotation: Rotation = "none",
    fp16_sinks: int = 0,
) -> SensitivityProfile:
    """Measure the distortion table of ``lm`` on ``texts`` (see the module docstring for the metric).

    Widths in ``sparse_widths`` are measured on the first ``sparse_items`` items only (for wide codes whose
    KL is orders of magnitude below the narrow ones': the allocator rarely buys them, and they cost as much
    to measure); their cells are means over those items. Cost: one prefill and one reference forward per
    item, then one batched forward per layer holding ``2 * widths`` variants (width 32 needs none). Raises
    ``ValueError`` for no items, an answer without tokens, a width outside 1..8, 16, 32, or bad counts.
    ``rotation`` and ``fp16_sinks`` code each variant as a card with those settings does (the profile
    records them; an adaptive budget uses only a profile of its own coding).
    """
    check_rotation(rotation, head_dim=lm.fingerprint.head_dim)
    if isinstance(fp16_sinks, bool) or not isinstance(fp16_sinks, int) or fp16_sinks < 0:
        raise ValueError(f"fp16_sinks must be an int >= 0, got {fp16_sinks!r}")
    rope = rope_table_for(lm.fingerprint) if rotation == "hadamard-prerope" else None
    chosen = _check_widths(widths)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not texts:
        raise ValueError("no calibration items")
    sparse = set(sparse_widths) & set(chosen)
    if sparse and sparse_items < 1:
        raise ValueError(f"sparse_items must be >= 1, got {sparse_items}")
    num_layers = lm.fingerprint.num_layers
    sums = [{kind: dict.fromkeys(chosen, 0.0) for kind in TENSORS} for _ in range(num_layers)]
    counts = {
        w: 0 if w == RAW_WIDTH else len(texts) if w not in sparse else min(sparse_items, len(texts))
        for w in chosen
    }
    total = num_layers * len(TENSORS) * sum(counts.values())
    with tqdm(total=total, disable=not progress, desc="calibrate", unit="variant") as bar:
        for item, (context, question, answer) in enumerate(texts):
            parts = lm.template.split(lm.tokenizer, context, question)
            target = [int(i) for i in lm.tokenizer.encode(answer, add_special_tokens=False)]
            if not target:
                raise ValueError(f"calibration answer {answer!r} has no tokens")
            snapshot = prefill(lm, parts.prefix_ids, template_prefix_tokens=parts.template_prefix_tokens)
            reference = answer_logprobs(lm, snapshot, parts.suffix_ids, target)
            measured = [w for w in chosen if item < counts[w]]
            for layer in range(num_layers):
                cells: list[tuple[str, int]] = []
                variants: list[tuple[int, str, torch.Tensor]] = []
                for kind in TENSORS:
                    source = (snapshot.keys if kind == "k" else snapshot.values)[layer]
                    if source is None:  # prefill fills every layer; a None here is a bug upstream
                        raise RuntimeError(f"prefill returned no {kind} for layer {layer}")
                    for width in measured:
                        cells.append((kind, width))
                        coded = card_roundtrip(
                            source,
                            width,
                            kind=kind,
                            group_size=group_size,
                            rotation=rotation,
                            fp16_sinks=fp16_sinks,
                            positions=snapshot.positions,
                            rope=rope,
                        )
                        variants.append((layer, kind, coded))
                if not variants:
                    continue
                scored = _variant_logprobs(lm, snapshot, variants, parts.suffix_ids, target)
                for (kind, width), row in zip(cells, scored, strict=True):
                    sums[layer][kind][width] += _mean_kl(reference, row)
                bar.update(len(variants))
    table = tuple(
        {
            kind: {w: sums[layer][kind][w] / counts[w] if counts[w] else 0.0 for w in chosen}
            for kind in TENSORS
        }
        for layer in range(num_layers)
    )
    return SensitivityProfile(
        fingerprint_digest=lm.fingerprint.digest,
        model_name=lm.name,
        group_size=group_size,
        widths=chosen,
        table=table,
        rotation=rotation,
        fp16_sinks=fp16_sinks,
    )


def predicted_distortion(
    profile: SensitivityProfile, key_bits: Sequence[int | None], value_bits: Sequence[int | None]
) -> float:
    """Total predicted distortion of per-layer widths (``None`` or 0: layer not sent, not counted).

    Gives any plan the number :attr:`Allocation.distortion` gives an allocation, e.g. a uniform one to
    compare with. Raises ``ValueError`` for a row length other than the profile's layer count or a width
    the profile has not measured.
    """
    layers = len(profile.table)
    if len(key_bits) != layers or len(value_bits) != layers:
        raise ValueError(f"need {layers} key and value widths, got {len(key_bits)} and {len(value_bits)}")
    total = 0.0
    for layer, row in enumerate(profile.table):
        for kind, width in (("k", key_bits[layer]), ("v", value_bits[layer])):
            if width is None or width == 0:
                continue
            if width not in row[kind]:
                raise ValueError(f"the profile has no width {width} (measured: {list(profile.widths)})")
            total += row[kind][width]
    return total


def allocation_distortion(profile: SensitivityProfile, allocation: Allocation) -> float:
    """:func:`predicted_distortion` of an allocation (equals ``allocation.distortion`` for its profile)."""
    return predicted_distortion(profile, allocation.key_bits, allocation.value_bits)


def _candidates(directory: Path, group_size: int) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted({*directory.glob(f"*-g{group_size}.json"), *directory.glob(f"*-g{group_size}-*.json")})


def default_profile(
    lm: LoadedModel,
    group_size: int,
    *,
    home: Path | str | None = None,
    search: Sequence[Path] | None = None,
    rotation: str = "none",
    fp16_sinks: int = 0,
) -> SensitivityProfile | None:
    """The stored profile for ``lm``'s fingerprint at ``group_size``, or ``None`` when there is none.

    Looks in ``search`` (default: ``profiles_dir(home)``, then :data:`SHIPPED_PROFILES`) at files named
    ``*-g<group_size>.json``, the conventional name first; the first whose fingerprint digest and group size
    match wins. A file there that is not a valid profile raises :class:`~qkv._errors.CalibrationError`
    naming it: a broken profile should be fixed or removed, not silently bypassed.
    """
    directories = [profiles_dir(home), SHIPPED_PROFILES] if search is None else list(search)
    conventional = profile_filename(lm.name, group_size, rotation, fp16_sinks)
    digest = lm.fingerprint.digest
    for directory in directories:
        paths = _candidates(directory, group_size)
        paths.sort(key=lambda path: path.name != conventional)  # stable: the conventional name first
        for path in paths:
            profile = SensitivityProfile.load(path)
            if (
                profile.fingerprint_digest == digest
                and profile.group_size == group_size
                and profile.rotation == rotation
                and profile.fp16_sinks == fp16_sinks
            ):
                return profile
    return None
