"""Cross-model KV translation: a card made by model A, read by model B, through a learned linear map.

Two agents rarely run the same model. :func:`calibrate_pair` fits, once per (sender, receiver) pair, a small
linear map from A's KV to B's KV; :func:`translate_snapshot` applies it to A's snapshot and returns a
:class:`~qkv._kv.KVSnapshot` in B's shape that B injects like its own cache.

What is fitted (per receiver layer ``r``):

* Inputs: the KV of the sender layers mapped to ``r`` (``layer_map``): for each, every KV head's **pre-RoPE**
  key (the cached key de-rotated with the sender's RoPE at the token's own position) and its value,
  concatenated into one feature vector per token. De-rotation removes the position from the keys, so the map
  does not have to learn A's rotary frequencies.
* Outputs: B's pre-RoPE keys and its values of layer ``r``, all KV heads concatenated. B's RoPE is applied
  after the map, at B's positions. For Gemma 3 the k-norm runs before RoPE, so its pre-RoPE keys are the
  normalised keys: the map predicts into that space, which is what B's attention reads. Gemma's query
  pre-attention scalar, q-norm and sliding window act on B's own queries and masks and need no translation.
* Ridge regression with a bias, closed form in float64 on CPU from streamed moments (summed in float64):
  ``(C + lam I) W = D`` with centred moments and ``lam = ridge * trace(C) / features`` (``ridge`` is
  relative to the mean feature variance, so one value suits both directions). Every ``holdout_every``-th
  text is held out; held-out R^2 (variance-weighted over the output dims) is reported per receiver layer
  for K and V.
* ``variance_match`` (off by default, a flag of the calibration that :func:`dataclasses.replace` can flip):
  ridge predictions are shrunk towards the mean, which lowers the translated keys' attention logits next
  to the receiver's native tokens; with the flag, predictions are scaled around the training mean by
  ``sqrt(target variance / prediction variance)`` per layer, for K and V apart (Q-KVComm's mean/std
  matching, on top of the learned map).
* Layer map: ``"depth"`` takes the ``span`` sender layers nearest to the receiver layer's relative depth;
  ``"similarity"`` takes the ``span`` sender layers with the highest linear CKA with the receiver layer,
  measured on the first training texts.

Token alignment (rule ``sender-token/last-char-v1``, the same at fit and at use): the translated cache has
**one slot per sender context token**, so a receiver needs no text and no tokenization of it. Slot ``i``
is fitted to B's KV at the receiver token whose character span contains the last character of sender token
``i`` (the receiver token being read when A's token ends). A sender token with an empty span takes the
previous slot's receiver token. Where B's tokens are longer than A's, several slots target the same B token.

Prompt layout at use: B's own template head (BOS, instruction) is prefilled natively by B
(:func:`attach_receiver_head`); translated slots follow at B positions ``head_B + (p - head_A)`` for a sender
position ``p`` (gaps left by eviction are kept); A's template tail is dropped and B prefills its own tail
with the question (:func:`receiver_suffix_ids`). The sender's template tail is identified by position: the
last ``tail_tokens`` positions before ``snapshot.next_position`` (so eviction must keep them). Template head
tokens are those below ``head_A``; eviction may have dropped some of them.

On cards (``qkv.encode_context(..., translate=)``, ``qkv.answer_from_card(..., calibrations=)``): a
:class:`CrossModelRecord` in the card's metadata names the calibration per receiver model, and whether the
KV was translated at the sender (the card is then in B's KV space, context only) or is to be translated at
the receiver (the card is an ordinary card of A). ``docs/cachecard.md`` specifies the record.

Artifact (``save``/``load``): a safetensors file (tensors ``layer.<r>.weight`` ``[features, 2*kv_heads*
head_dim]``, ``layer.<r>.bias``, ``layer.<r>.mean``, ``sender.rope.<l>``, ``receiver.rope.<r>``; float32)
whose metadata key ``edgebus-crossmodel`` holds the JSON header: format, version, id, both models (name,
fingerprint, digest, template, head/tail tokens, RoPE scaling), layer map, ridge, variance gains and flag,
alignment rule and fit quality. ``id`` is the
first 16 hex digits of the sha256 over the canonical header (without ``id``) and every tensor's name, dtype,
shape and bytes; ``load`` recomputes it, so it catches corruption and edits, not forgery (no signature).
Never pickle. Errors: :class:`CalibrationError` for a missing, malformed, corrupt or mismatched artifact;
:class:`CardCompatError` when a snapshot does not fit the calibration (other models, other template).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from ._card import MAX_TOKENS
from ._errors import CalibrationError, CardCompatError, CardFormatError
from ._hf import prefill
from ._kv import KVSnapshot, ModelFingerprint
from ._modelstore import LoadedModel
from ._rope import RopeTable, rope_tables_of, rotate, unrotate

__all__ = [
    "ALIGNMENT_RULE",
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "CROSSMODEL_KEY",
    "EXTRA_CALIBRATION_KEY",
    "MAX_TARGETS",
    "CrossModelCalibration",
    "CrossModelRecord",
    "FitQuality",
    "LayerFit",
    "LayerMapKind",
    "ModelSide",
    "TranslateAt",
    "align_tokens",
    "attach_receiver_head",
    "calibrate_pair",
    "crossmodel_record",
    "depth_layer_map",
    "join_receiver_head",
    "linear_cka",
    "receiver_suffix_ids",
    "require_calibration",
    "ridge_fit",
    "translate_snapshot",
]

ARTIFACT_FORMAT = "edgebus-crossmodel"
ARTIFACT_VERSION = 1
ALIGNMENT_RULE = "sender-token/last-char-v1"
#: Key of :attr:`KVSnapshot.extra` (and of a card's meta) that names the calibration a translation used.
EXTRA_CALIBRATION_KEY = "crossmodel_calibration"
_METADATA_KEY = "edgebus-crossmodel"
_PLACEHOLDER_QUESTION = "?"  # calibration prefills only the prefix; the question never reaches a forward

LayerMapKind = Literal["depth", "similarity"]


# ------------------------------------------------------------------------------------------------ values


@dataclass(frozen=True, kw_only=True)
class ModelSide:
    """One model's part in a calibration: identity, template geometry and per-layer RoPE."""

    name: str
    fingerprint: ModelFingerprint
    template: str
    head_tokens: int  # template tokens before the context
    tail_tokens: int  # template tokens after the context, inside the prefix
    rope: tuple[RopeTable, ...]  # one per layer

    @property
    def kv_width(self) -> int:
        """Features of one layer's K or V: kv_heads * head_dim."""
        return self.fingerprint.num_kv_heads * self.fingerprint.head_dim

    def describe(self) -> str:
        return f"{self.name} ({self.fingerprint.architecture}, {self.fingerprint.digest})"


@dataclass(frozen=True, kw_only=True)
class LayerFit:
    """The map into one receiver layer: ``[K | V] = features @ weight + bias``.

    ``mean`` is the receiver's mean ``[K | V]`` on the training texts; ``k_gain``/``v_gain`` are
    ``sqrt(target variance / prediction variance)`` there (>= 1: ridge predictions are shrunk towards the
    mean), used when the calibration's ``variance_match`` is on.
    """

    sender_layers: tuple[int, ...]
    weight: torch.Tensor  # float32 [len(sender_layers) * 2 * sender kv_width, 2 * receiver kv_width]
    bias: torch.Tensor  # float32 [2 * receiver kv_width]
    mean: torch.Tensor  # float32 [2 * receiver kv_width]
    k_gain: float = 1.0
    v_gain: float = 1.0

    def predict(self, features: torch.Tensor, *, variance_match: bool) -> torch.Tensor:
        """``[tokens, 2 * receiver kv_width]`` for ``[tokens, features]``."""
        y = torch.addmm(self.bias, features, self.weight)
        if not variance_match:
            return y
        half = y.shape[1] // 2
        gain = torch.full((y.shape[1],), self.k_gain, dtype=y.dtype)
        gain[half:] = self.v_gain
        return self.mean + (y - self.mean) * gain


@dataclass(frozen=True, kw_only=True)
class FitQuality:
    """R^2 per receiver layer on the held-out texts (and on the training texts, for over-fit diagnosis)."""

    train_texts: int
    heldout_texts: int
    train_tokens: int
    heldout_tokens: int
    r2_k: tuple[float, ...]
    r2_v: tuple[float, ...]
    train_r2_k: tuple[float, ...]
    train_r2_v: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "train_texts": self.train_texts,
            "heldout_texts": self.heldout_texts,
            "train_tokens": self.train_tokens,
            "heldout_tokens": self.heldout_tokens,
            "r2_k": list(self.r2_k),
            "r2_v": list(self.r2_v),
            "train_r2_k": list(self.train_r2_k),
            "train_r2_v": list(self.train_r2_v),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], layers: int) -> FitQuality:
        def floats(key: str) -> tuple[float, ...]:
            values = tuple(float(v) for v in data[key])
            if len(values) != layers:
                raise CalibrationError(f"fit.{key} has {len(values)} entries for {layers} receiver layers")
            return values

        return cls(
            train_texts=int(data["train_texts"]),
            heldout_texts=int(data["heldout_texts"]),
            train_tokens=int(data["train_tokens"]),
            heldout_tokens=int(data["heldout_tokens"]),
            r2_k=floats("r2_k"),
            r2_v=floats("r2_v"),
            train_r2_k=floats("train_r2_k"),
            train_r2_v=floats("train_r2_v"),
        )


@dataclass(frozen=True, kw_only=True)
class CrossModelCalibration:
    """A fitted sender -> receiver KV map. Build with :func:`calibrate_pair` or :meth:`load`."""

    sender: ModelSide
    receiver: ModelSide
    layer_map_kind: str
    ridge: float
    layers: tuple[LayerFit, ...]  # one per receiver layer
    quality: FitQuality
    alignment: str = ALIGNMENT_RULE
    similarity: tuple[tuple[float, ...], ...] | None = None  # CKA [receiver layer][sender layer]
    # Rescale predictions around the training mean to the receiver's variance (per layer, K and V apart).
    variance_match: bool = False
    _id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once; dataclasses.replace() builds a new object, so a changed copy gets its own id.
        object.__setattr__(self, "_id", _content_id(self._header(), self._tensors()))

    @property
    def id(self) -> str:
        """Content hash (16 hex digits) of the header and every tensor."""
        return self._id

    @property
    def layer_map(self) -> tuple[tuple[int, ...], ...]:
        return tuple(fit.sender_layers for fit in self.layers)

    def describe(self) -> str:
        return f"calibration {self.id}: {self.sender.describe()} -> {self.receiver.describe()}"

    # --------------------------------------------------------------------------------------- artifact

    def _header(self) -> dict[str, Any]:
        return {
            "format": ARTIFACT_FORMAT,
            "version": ARTIFACT_VERSION,
            "alignment": self.alignment,
            "ridge": self.ridge,
            "variance_match": self.variance_match,
            "gains": [[fit.k_gain, fit.v_gain] for fit in self.layers],
            "layer_map": {
                "kind": self.layer_map_kind,
                "sender_layers": [list(layers) for layers in self.layer_map],
                "similarity": None if self.similarity is None else [list(row) for row in self.similarity],
            },
            "sender": _side_header(self.sender),
            "receiver": _side_header(self.receiver),
            "fit": self.quality.to_dict(),
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for index, fit in enumerate(self.layers):
            tensors[f"layer.{index}.weight"] = fit.weight.to(torch.float32).contiguous()
            tensors[f"layer.{index}.bias"] = fit.bias.to(torch.float32).contiguous()
            tensors[f"layer.{index}.mean"] = fit.mean.to(torch.float32).contiguous()
        for role, side in (("sender", self.sender), ("receiver", self.receiver)):
            for index, table in enumerate(side.rope):
                tensors[f"{role}.rope.{index}"] = table.inv_freq.to(torch.float32).contiguous()
        return tensors

    def save(self, path: Path | str) -> Path:
        """Write the artifact atomically; returns the path."""
        from safetensors.torch import save_file

        target = Path(path)
        header = self._header()
        tensors = self._tensors()
        header["id"] = _content_id(header, tensors)
        tmp = target.with_name(target.name + ".tmp")
        save_file(tensors, str(tmp), metadata={_METADATA_KEY: json.dumps(header, sort_keys=True)})
        os.replace(tmp, target)
        return target

    @classmethod
    def load(
        cls,
        path: Path | str,
        *,
        sender: ModelFingerprint | None = None,
        receiver: ModelFingerprint | None = None,
    ) -> CrossModelCalibration:
        """Read and validate an artifact; with ``sender``/``receiver``, also require those fingerprints.

        Raises :class:`CalibrationError` on a missing, malformed or corrupt file, or a fingerprint mismatch.
        """
        header, tensors = _read_artifact(Path(path))
        try:
            calibration = _from_parts(header, tensors)
        except (KeyError, TypeError, ValueError, IndexError, CardCompatError) as exc:
            raise CalibrationError(f"{path}: malformed cross-model calibration: {exc!r}") from exc
        stored_id = str(header.get("id", ""))
        actual = calibration.id
        if stored_id != actual:
            raise CalibrationError(
                f"{path}: content hash {actual} does not match the recorded id {stored_id!r} "
                "(corrupt or edited)"
            )
        for role, expected, side in (
            ("sender", sender, calibration.sender),
            ("receiver", receiver, calibration.receiver),
        ):
            if expected is not None and expected.digest != side.fingerprint.digest:
                raise CalibrationError(
                    f"{path}: calibration {actual} was fitted for {role} {side.describe()}, "
                    f"not for {expected.architecture} ({expected.digest})"
                )
        return calibration


def _side_header(side: ModelSide) -> dict[str, Any]:
    return {
        "name": side.name,
        "fingerprint": side.fingerprint.to_dict(),
        "digest": side.fingerprint.digest,
        "template": side.template,
        "head_tokens": side.head_tokens,
        "tail_tokens": side.tail_tokens,
        "rope_scaling": [table.scaling for table in side.rope],
    }


def _content_id(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    body = {key: value for key, value in header.items() if key != "id"}
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\n{name}:{tensor.dtype}:{list(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def _read_artifact(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CalibrationError(f"no cross-model calibration at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        header = json.loads(metadata[_METADATA_KEY])
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as exc:
        raise CalibrationError(f"{path} is not a readable cross-model calibration: {exc}") from exc
    if not isinstance(header, dict):
        raise CalibrationError(f"{path}: header is not a JSON object")
    if header.get("format") != ARTIFACT_FORMAT:
        raise CalibrationError(f"{path}: format {header.get('format')!r} is not {ARTIFACT_FORMAT!r}")
    if header.get("version") != ARTIFACT_VERSION:
        raise CalibrationError(
            f"{path}: version {header.get('version')!r}, this reader knows {ARTIFACT_VERSION}"
        )
    return header, tensors


def _tensor(tensors: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = tensors[name]
    if tensor.dtype != torch.float32 or tuple(tensor.shape) != shape:
        raise ValueError(f"{name}: {tensor.dtype} {tuple(tensor.shape)}, expected float32 {shape}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} holds non-finite values")
    return tensor


def _side_from(data: Mapping[str, Any], role: str, tensors: Mapping[str, torch.Tensor]) -> ModelSide:
    fingerprint = ModelFingerprint.from_dict(data["fingerprint"])
    if data["digest"] != fingerprint.digest:
        raise ValueError(f"{role} digest {data['digest']!r} does not match its fingerprint")
    scalings = [float(s) for s in data["rope_scaling"]]
    if len(scalings) != fingerprint.num_layers:
        raise ValueError(f"{role}: {len(scalings)} RoPE scalings for {fingerprint.num_layers} layers")
    rope = tuple(
        RopeTable(inv_freq=_tensor(tensors, f"{role}.rope.{i}", (fingerprint.head_dim // 2,)), scaling=s)
        for i, s in enumerate(scalings)
    )
    head, tail = int(data["head_tokens"]), int(data["tail_tokens"])
    if head < 0 or tail < 0:
        raise ValueError(f"{role}: negative template token counts")
    return ModelSide(
        name=str(data["name"]),
        fingerprint=fingerprint,
        template=str(data["template"]),
        head_tokens=head,
        tail_tokens=tail,
        rope=rope,
    )


def _from_parts(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> CrossModelCalibration:
    sender = _side_from(header["sender"], "sender", tensors)
    receiver = _side_from(header["receiver"], "receiver", tensors)
    layer_map = header["layer_map"]
    sender_layers = [tuple(int(i) for i in layers) for layers in layer_map["sender_layers"]]
    if len(sender_layers) != receiver.fingerprint.num_layers:
        raise ValueError(f"layer map has {len(sender_layers)} entries for {receiver.fingerprint.num_layers}")
    out = 2 * receiver.kv_width
    gains = [(float(k), float(v)) for k, v in header["gains"]]
    if len(gains) != len(sender_layers) or not all(
        math.isfinite(g) and g > 0 for pair in gains for g in pair
    ):
        raise ValueError("gains must be one positive (k, v) pair per receiver layer")
    fits = []
    for index, layers in enumerate(sender_layers):
        if not layers or any(not 0 <= i < sender.fingerprint.num_layers for i in layers):
            raise ValueError(f"layer map entry {index} {layers} is not a set of sender layers")
        features = len(layers) * 2 * sender.kv_width
        fits.append(
            LayerFit(
                sender_layers=layers,
                weight=_tensor(tensors, f"layer.{index}.weight", (features, out)),
                bias=_tensor(tensors, f"layer.{index}.bias", (out,)),
                mean=_tensor(tensors, f"layer.{index}.mean", (out,)),
                k_gain=gains[index][0],
                v_gain=gains[index][1],
            )
        )
    expected = 3 * len(fits) + sender.fingerprint.num_layers + receiver.fingerprint.num_layers
    if len(tensors) != expected:
        raise ValueError(f"artifact holds {len(tensors)} tensors, expected {expected}")
    similarity = layer_map.get("similarity")
    ridge = float(header["ridge"])
    if not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge {ridge} is not a non-negative number")
    return CrossModelCalibration(
        sender=sender,
        receiver=receiver,
        layer_map_kind=str(layer_map["kind"]),
        ridge=ridge,
        layers=tuple(fits),
        quality=FitQuality.from_dict(header["fit"], len(fits)),
        alignment=str(header["alignment"]),
        variance_match=bool(header["variance_match"]),
        similarity=None if similarity is None else tuple(tuple(float(v) for v in row) for row in similarity),
    )


# -------------------------------------------------------------------------------------- alignment, maps


def align_tokens(
    sender_offsets: Sequence[tuple[int, int]], receiver_offsets: Sequence[tuple[int, int]]
) -> list[int]:
    """For each sender token, the index of the receiver token whose span holds its last character.

    Offsets are ``(start, end)`` character spans into the same text (fast tokenizers'
    ``offset_mapping``). Characters no receiver token covers take the nearest covering token before them
    (the first token if none is before). A sender token with an empty span takes the previous token's match.
    """
    if not receiver_offsets:
        raise ValueError("the receiver tokenized the text into no tokens")
    length = max([end for _, end in receiver_offsets] + [end for _, end in sender_offsets] + [1])
    owner = [-1] * length
    for index, (start, end) in enumerate(receiver_offsets):
        for char in range(start, end):
            owner[char] = index  # byte-fallback pieces share one span: the last piece owns it
    last = 0
    for char in range(length):
        if owner[char] < 0:
            owner[char] = last
        last = owner[char]
    matches: list[int] = []
    for start, end in sender_offsets:
        if end > start:
            matches.append(owner[end - 1])
        else:
            matches.append(matches[-1] if matches else 0)
    return matches


def depth_layer_map(sender_layers: int, receiver_layers: int, span: int = 1) -> tuple[tuple[int, ...], ...]:
    """For each receiver layer, the ``span`` sender layers nearest to its relative depth (ascending)."""
    if sender_layers < 1 or receiver_layers < 1 or span < 1:
        raise ValueError("layer counts and span must be positive")
    span = min(span, sender_layers)
    mapping = []
    for r in range(receiver_layers):
        depth = r / (receiver_layers - 1) if receiver_layers > 1 else 0.0
        centre = depth * (sender_layers - 1)
        nearest = sorted(range(sender_layers), key=lambda s: (abs(s - centre), s))[:span]
        mapping.append(tuple(sorted(nearest)))
    return tuple(mapping)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment of two feature matrices with the same rows (tokens)."""
    x = x.to(torch.float64) - x.to(torch.float64).mean(dim=0, keepdim=True)
    y = y.to(torch.float64) - y.to(torch.float64).mean(dim=0, keepdim=True)
    cross = torch.linalg.matrix_norm(x.T @ y) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if float(norm) > 0 else 0.0


def _similarity_layer_map(similarity: torch.Tensor, span: int) -> tuple[tuple[int, ...], ...]:
    span = min(span, similarity.shape[1])
    return tuple(tuple(sorted(int(i) for i in row.topk(span).indices)) for row in similarity)


# ------------------------------------------------------------------------------------------------ ridge


class _Moments:
    """Streaming moments for the ridge fits: grams per sender-layer set, cross terms per receiver layer."""

    def __init__(self, layer_map: Sequence[tuple[int, ...]]) -> None:
        self.layer_map = list(layer_map)
        self.xtx: dict[tuple[int, ...], torch.Tensor] = {}
        self.sx: dict[tuple[int, ...], torch.Tensor] = {}
        self.xty: list[torch.Tensor | None] = [None] * len(layer_map)
        self.sy: list[torch.Tensor | None] = [None] * len(layer_map)
        self.syy: list[torch.Tensor | None] = [None] * len(layer_map)
        self.tokens = 0
        self.texts = 0

    def add(self, sender: Sequence[torch.Tensor], receiver: Sequence[torch.Tensor]) -> None:
        """``sender[l]``/``receiver[r]``: float32 ``[tokens, features]`` of one text.

        One text's products are formed in float32 (a few hundred terms each) and summed across texts in
        float64: float64 BLAS is half the speed, and calibration is CPU-bound.
        """
        features: dict[tuple[int, ...], torch.Tensor] = {}
        for key in dict.fromkeys(self.layer_map):
            x = torch.cat([sender[i] for i in key], dim=1)
            features[key] = x
            self.xtx[key] = _plus(self.xtx.get(key), x.T @ x)
            self.sx[key] = _plus(self.sx.get(key), x.sum(dim=0))
        for r, key in enumerate(self.layer_map):
            y = receiver[r]
            self.xty[r] = _plus(self.xty[r], features[key].T @ y)
            self.sy[r] = _plus(self.sy[r], y.sum(dim=0))
            self.syy[r] = _plus(self.syy[r], (y * y).sum(dim=0))
        self.tokens += int(receiver[0].shape[0])
        self.texts += 1


def _plus(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    value = value.to(torch.float64)
    return value if total is None else total + value


def ridge_fit(
    xtx: torch.Tensor, sx: torch.Tensor, xty: torch.Tensor, sy: torch.Tensor, n: int, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge with an unpenalised bias from raw moments; float64 ``(weight, bias)``.

    Solves ``(C + lam I) W = D`` with the centred moments ``C = X'X - n mx mx'`` and ``D = X'Y - n mx my'``
    and ``lam = ridge * trace(C) / features``; ``bias = my - mx W``.
    """
    if n < 2:
        raise CalibrationError(f"a ridge fit needs at least 2 tokens, got {n}")
    mx, my = sx / n, sy / n
    c = xtx - n * torch.outer(mx, mx)
    d = xty - n * torch.outer(mx, my)
    lam = ridge * float(torch.trace(c)) / c.shape[0]
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    # A tiny absolute floor keeps the solve defined when a feature is constant (zero variance).
    weight = torch.linalg.solve(c + (lam + 1e-12) * eye, d)
    bias = my - mx @ weight
    return weight, bias


def _r2(
    moments: _Moments, r: int, weight: torch.Tensor, bias: torch.Tensor, split: int
) -> tuple[float, float]:
    """R^2 of ``x @ weight + bias`` on the texts of ``moments``, outputs ``[:split]`` (K) and the rest (V)."""
    key = moments.layer_map[r]
    n = moments.tokens
    xty, sy, syy = moments.xty[r], moments.sy[r], moments.syy[r]
    if n < 2 or xty is None or sy is None or syy is None:
        return float("nan"), float("nan")
    xtx, sx = moments.xtx[key], moments.sx[key]
    # Sum over tokens of (y - x W - b)^2, per output dim, from the moments.
    cross = (weight * xty).sum(dim=0) + bias * sy
    quad = (weight * (xtx @ weight)).sum(dim=0) + 2 * bias * (sx @ weight) + n * bias * bias
    residual = syy - 2 * cross + quad
    total = syy - sy * sy / n
    return (
        1.0 - float(residual[:split].sum() / total[:split].sum()),
        1.0 - float(residual[split:].sum() / total[split:].sum()),
    )


# -------------------------------------------------------------------------------------------- features


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """``[heads, tokens, dim]`` -> ``[tokens, heads * dim]``."""
    return tensor.permute(1, 0, 2).reshape(tensor.shape[1], -1)


def _layer_features(
    snapshot: KVSnapshot, tables: Sequence[RopeTable], layers: Iterable[int], keep: torch.Tensor
) -> dict[int, torch.Tensor]:
    """Per sender layer, float32 ``[tokens, 2 * kv_width]``: de-rotated keys then values, tokens ``keep``."""
    positions = snapshot.positions[keep]
    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        k, v = snapshot.keys[layer], snapshot.values[layer]
        if k is None or v is None:
            raise CardCompatError(f"sender snapshot lacks layer {layer}, which the calibration maps from")
        k = unrotate(k[:, keep].to("cpu"), tables[layer], positions)
        out[layer] = torch.cat([_flat(k), _flat(v[:, keep].to("cpu", torch.float32))], dim=1)
    return out


@dataclass(frozen=True)
class _Prefilled:
    snapshot: KVSnapshot
    context: tuple[int, int]  # [start, end) of the context tokens in the prefix
    offsets: list[tuple[int, int]]
    tail_tokens: int


def _prefill_context(lm: LoadedModel, text: str) -> _Prefilled:
    tokenizer = lm.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise CalibrationError(f"{lm.name}: calibration needs a fast tokenizer (character offsets)")
    parts = lm.template.split(tokenizer, text, _PLACEHOLDER_QUESTION)
    start, end = parts.context_token_span
    encoded = tokenizer(text.strip(), add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(parts.prefix_ids[start:end]):
        raise CalibrationError(f"{lm.name}: offsets tokenization differs from the template's context tokens")
    snapshot = prefill(lm, parts.prefix_ids, template_prefix_tokens=start)
    offsets = [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
    return _Prefilled(snapshot, (start, end), offsets, len(parts.prefix_ids) - end)


@dataclass(frozen=True)
class _Pair:
    sender: list[torch.Tensor]  # per sender layer, float32 [tokens, 2 * kv_width_A]
    receiver: list[torch.Tensor]  # per receiver layer, float32 [tokens, 2 * kv_width_B]
    head: tuple[int, int]  # template head tokens (sender, receiver)
    tail: tuple[int, int]


def _pair(sender_lm: LoadedModel, receiver_lm: LoadedModel, text: str, rope: tuple[Any, Any]) -> _Pair | None:
    a = _prefill_context(sender_lm, text)
    b = _prefill_context(receiver_lm, text)
    if not a.offsets or not b.offsets:
        return None
    matches = torch.tensor(align_tokens(a.offsets, b.offsets), dtype=torch.int64) + b.context[0]
    keep_a = torch.arange(a.context[0], a.context[1])
    sender = _layer_features(a.snapshot, rope[0], range(a.snapshot.num_layers), keep_a)
    receiver = _layer_features(b.snapshot, rope[1], range(b.snapshot.num_layers), matches)
    return _Pair(
        sender=[sender[i] for i in range(a.snapshot.num_layers)],
        receiver=[receiver[i] for i in range(b.snapshot.num_layers)],
        head=(a.context[0], b.context[0]),
        tail=(a.tail_tokens, b.tail_tokens),
    )


# ------------------------------------------------------------------------------------------- calibrate


def calibrate_pair(
    sender_lm: LoadedModel,
    receiver_lm: LoadedModel,
    texts: Sequence[str],
    *,
    ridge: float = 0.05,
    layer_map: LayerMapKind = "depth",
    span: int = 2,
    holdout_every: int = 5,
    similarity_texts: int = 16,
    variance_match: bool = False,
    progress: Callable[[Iterator[str]], Iterator[str]] | None = None,
) -> CrossModelCalibration:
    """Fit a sender -> receiver KV map on ``texts`` (see the module docstring).

    Every ``holdout_every``-th text (indices ``holdout_every - 1``, ``2 * holdout_every - 1``, ...) is held
    out of the fit and scored. ``progress`` may wrap the text iterator (e.g. ``tqdm``).
    """
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be a non-negative number, got {ridge}")
    if holdout_every < 2:
        raise ValueError("holdout_every must be at least 2")
    texts = [t for t in texts if t.strip()]
    train = [t for i, t in enumerate(texts) if (i + 1) % holdout_every]
    heldout = [t for i, t in enumerate(texts) if not (i + 1) % holdout_every]
    if not train or not heldout:
        raise CalibrationError(
            f"need at least {holdout_every} non-empty texts (training and held-out), got {len(texts)}"
        )
    rope = (rope_tables_of(sender_lm.model), rope_tables_of(receiver_lm.model))
    sender_layers = sender_lm.fingerprint.num_layers
    receiver_layers = receiver_lm.fingerprint.num_layers
    similarity: torch.Tensor | None = None
    if layer_map == "depth":
        mapping = depth_layer_map(sender_layers, receiver_layers, span)
    elif layer_map == "similarity":
        similarity = _cka_matrix(sender_lm, receiver_lm, train[:similarity_texts], rope)
        mapping = _similarity_layer_map(similarity, span)
    else:
        raise ValueError(f"layer_map must be 'depth' or 'similarity', got {layer_map!r}")

    moments = {"train": _Moments(mapping), "heldout": _Moments(mapping)}
    geometry: set[tuple[tuple[int, int], tuple[int, int]]] = set()
    labelled = (
        (text, "heldout" if (i + 1) % holdout_every == 0 else "train") for i, text in enumerate(texts)
    )
    items = list(labelled)
    iterator: Iterator[str] = iter([text for text, _ in items])
    if progress is not None:
        iterator = progress(iterator)
    for (_, split), text in zip(items, iterator, strict=True):
        pair = _pair(sender_lm, receiver_lm, text, rope)
        if pair is None:
            continue
        geometry.add((pair.head, pair.tail))
        moments[split].add(pair.sender, pair.receiver)
    if len(geometry) != 1:
        raise CalibrationError(f"template head/tail token counts vary between texts: {sorted(geometry)}")
    (head, tail) = next(iter(geometry))
    return _solve(
        sender_lm, receiver_lm, moments, mapping, rope, head=head, tail=tail, ridge=ridge,
        layer_map=layer_map, similarity=similarity, variance_match=variance_match,
    )  # fmt: skip


def _cka_matrix(
    sender_lm: LoadedModel, receiver_lm: LoadedModel, texts: Sequence[str], rope: tuple[Any, Any]
) -> torch.Tensor:
    pairs = [p for p in (_pair(sender_lm, receiver_lm, t, rope) for t in texts) if p is not None]
    if not pairs:
        raise CalibrationError("no usable text to measure layer similarity on")
    sender = [torch.cat([p.sender[i] for p in pairs]) for i in range(len(pairs[0].sender))]
    receiver = [torch.cat([p.receiver[r] for p in pairs]) for r in range(len(pairs[0].receiver))]
    return torch.tensor([[linear_cka(s, r) for s in sender] for r in receiver], dtype=torch.float64)


def _solve(
    sender_lm: LoadedModel,
    receiver_lm: LoadedModel,
    moments: Mapping[str, _Moments],
    mapping: Sequence[tuple[int, ...]],
    rope: tuple[Any, Any],
    *,
    head: tuple[int, int],
    tail: tuple[int, int],
    ridge: float,
    layer_map: str,
    similarity: torch.Tensor | None,
    variance_match: bool,
) -> CrossModelCalibration:
    train, heldout = moments["train"], moments["heldout"]
    if train.tokens < 2 or heldout.tokens < 1:
        raise CalibrationError(f"too few tokens: {train.tokens} to fit on, {heldout.tokens} held out")
    split = receiver_lm.fingerprint.num_kv_heads * receiver_lm.fingerprint.head_dim
    fits: list[LayerFit] = []
    r2: list[tuple[float, float]] = []
    train_r2: list[tuple[float, float]] = []
    for r, key in enumerate(mapping):
        xty, sy = train.xty[r], train.sy[r]
        if xty is None or sy is None:  # unreachable: every text adds every receiver layer
            raise CalibrationError(f"receiver layer {r} received no training tokens")
        weight, bias = ridge_fit(train.xtx[key], train.sx[key], xty, sy, train.tokens, ridge)
        k_gain, v_gain = _gains(train, r, weight, split)
        fits.append(
            LayerFit(
                sender_layers=key,
                weight=weight.to(torch.float32),
                bias=bias.to(torch.float32),
                mean=(sy / train.tokens).to(torch.float32),
                k_gain=k_gain,
                v_gain=v_gain,
            )
        )
        r2.append(_r2(heldout, r, weight, bias, split))
        train_r2.append(_r2(train, r, weight, bias, split))
    quality = FitQuality(
        train_texts=train.texts,
        heldout_texts=heldout.texts,
        train_tokens=train.tokens,
        heldout_tokens=heldout.tokens,
        r2_k=tuple(k for k, _ in r2),
        r2_v=tuple(v for _, v in r2),
        train_r2_k=tuple(k for k, _ in train_r2),
        train_r2_v=tuple(v for _, v in train_r2),
    )
    sides = [
        ModelSide(
            name=lm.name,
            fingerprint=lm.fingerprint,
            template=lm.template.kind,
            head_tokens=head[i],
            tail_tokens=tail[i],
            rope=rope[i],
        )
        for i, lm in enumerate((sender_lm, receiver_lm))
    ]
    calibration = CrossModelCalibration(
        sender=sides[0],
        receiver=sides[1],
        layer_map_kind=layer_map,
        ridge=ridge,
        layers=tuple(fits),
        quality=quality,
        similarity=None if similarity is None else tuple(tuple(float(v) for v in row) for row in similarity),
        variance_match=variance_match,
    )
    return calibration


def _gains(moments: _Moments, r: int, weight: torch.Tensor, split: int) -> tuple[float, float]:
    """sqrt(target variance / prediction variance) on the training texts, for K and for V."""
    key, n = moments.layer_map[r], moments.tokens
    sx, sy, syy = moments.sx[key], moments.sy[r], moments.syy[r]
    if sy is None or syy is None:
        raise CalibrationError(f"receiver layer {r} received no training tokens")
    centred = moments.xtx[key] - torch.outer(sx, sx) / n
    predicted = (weight * (centred @ weight)).sum(dim=0)
    target = syy - sy * sy / n
    gains = []
    for part in (slice(0, split), slice(split, None)):
        ratio = float(target[part].sum()) / max(float(predicted[part].sum()), 1e-30)
        gains.append(math.sqrt(max(ratio, 1e-12)))
    return gains[0], gains[1]


# ------------------------------------------------------------------------------------------- translate


def require_calibration(
    available: Iterable[CrossModelCalibration],
    *,
    sender: ModelFingerprint,
    receiver: ModelFingerprint,
    calibration_id: str | None = None,
) -> CrossModelCalibration:
    """The calibration for this pair (and this id, when the card names one), else :class:`CardCompatError`."""
    candidates = list(available)
    for calibration in candidates:
        if (
            calibration.sender.fingerprint.digest == sender.digest
            and calibration.receiver.fingerprint.digest == receiver.digest
            and (calibration_id is None or calibration.id == calibration_id)
        ):
            return calibration
    have = ", ".join(c.describe() for c in candidates) or "none"
    wanted = f"calibration {calibration_id}" if calibration_id else "a cross-model calibration"
    raise CardCompatError(
        f"card needs {wanted} from sender {sender.architecture} ({sender.digest}) to receiver "
        f"{receiver.architecture} ({receiver.digest}); this receiver has: {have}"
    )


def translate_snapshot(
    snapshot: KVSnapshot,
    calibration: CrossModelCalibration,
    receiver: LoadedModel | ModelFingerprint,
    *,
    receiver_positions: torch.Tensor | None = None,
) -> KVSnapshot:
    """The sender's context KV mapped into the receiver's KV space, one slot per sender context token.

    With a :class:`LoadedModel` the result is ready to inject: the receiver's template head is prefilled in
    front (:func:`attach_receiver_head`). With a bare fingerprint it holds only the translated context at
    positions from ``receiver_positions`` (default ``head_B + p - head_A``), ``template_prefix_tokens=0``.
    Raises :class:`CardCompatError` when the snapshot or receiver does not match the calibration.
    """
    fingerprint = receiver.fingerprint if isinstance(receiver, LoadedModel) else receiver
    _require_pair(calibration, snapshot.fingerprint, fingerprint)
    sender = calibration.sender
    positions = snapshot.positions.to("cpu", torch.int64)
    if not _template_head_matches(positions, snapshot.template_prefix_tokens, sender.head_tokens):
        raise CardCompatError(
            f"{calibration.describe()}: the card's template prefix has {snapshot.template_prefix_tokens} "
            f"tokens, the calibration was fitted with {sender.head_tokens} ({sender.template} template)"
        )
    context_end = snapshot.next_position - sender.tail_tokens
    keep = torch.nonzero((positions >= sender.head_tokens) & (positions < context_end)).flatten()
    if keep.numel() == 0:
        raise CardCompatError(f"{calibration.describe()}: the card holds no context tokens to translate")
    if receiver_positions is None:
        target_positions = positions[keep] - sender.head_tokens + calibration.receiver.head_tokens
    else:
        target_positions = _checked_positions(receiver_positions, int(keep.numel()))
    needed = sorted({layer for fit in calibration.layers for layer in fit.sender_layers})
    features = _layer_features(snapshot, sender.rope, needed, keep)
    width = calibration.receiver.kv_width
    heads, head_dim = fingerprint.num_kv_heads, fingerprint.head_dim
    keys: list[torch.Tensor | None] = []
    values: list[torch.Tensor | None] = []
    for r, fit in enumerate(calibration.layers):
        x = torch.cat([features[layer] for layer in fit.sender_layers], dim=1)
        y = fit.predict(x, variance_match=calibration.variance_match)
        k = y[:, :width].reshape(-1, heads, head_dim).permute(1, 0, 2)
        v = y[:, width:].reshape(-1, heads, head_dim).permute(1, 0, 2).contiguous()
        keys.append(rotate(k, calibration.receiver.rope[r], target_positions).contiguous())
        values.append(v)
    translated = KVSnapshot(
        keys=tuple(keys),
        values=tuple(values),
        positions=target_positions,
        fingerprint=fingerprint,
        template_prefix_tokens=0,
        extra={**snapshot.extra, EXTRA_CALIBRATION_KEY: calibration.id},
    )
    if isinstance(receiver, LoadedModel):
        return attach_receiver_head(receiver, translated, calibration)
    return translated


def _template_head_matches(positions: torch.Tensor, template_tokens: int, head_tokens: int) -> bool:
    """Whether the snapshot's template tokens are exactly those at positions below ``head_tokens``.

    Without eviction that is ``template_tokens == head_tokens``; after eviction (which may drop template
    tokens, and counts only the kept ones) the kept template tokens must sit below ``head_tokens`` and the
    first context token at or above it, so a card made with another template is still refused.
    """
    count = int(positions.shape[0])
    if not 0 <= template_tokens <= count:
        return False
    if template_tokens and int(positions[template_tokens - 1]) >= head_tokens:
        return False
    return template_tokens == count or int(positions[template_tokens]) >= head_tokens


def _require_pair(
    calibration: CrossModelCalibration, sender: ModelFingerprint, receiver: ModelFingerprint
) -> None:
    if sender.digest != calibration.sender.fingerprint.digest:
        raise CardCompatError(
            f"{calibration.describe()} does not apply: the card was made by {sender.architecture} "
            f"({sender.digest})"
        )
    if receiver.digest != calibration.receiver.fingerprint.digest:
        raise CardCompatError(
            f"{calibration.describe()} does not apply: this receiver is {receiver.architecture} "
            f"({receiver.digest})"
        )


def _checked_positions(positions: torch.Tensor, count: int) -> torch.Tensor:
    positions = positions.to(torch.int64).flatten()
    if positions.numel() != count:
        raise ValueError(f"receiver_positions has {positions.numel()} entries for {count} translated tokens")
    if count and (positions[0] < 0 or bool((positions[1:] <= positions[:-1]).any())):
        raise ValueError("receiver_positions must be non-negative and strictly increasing")
    return positions


def _receiver_head_ids(lm: LoadedModel) -> tuple[int, ...]:
    parts = lm.template.split(lm.tokenizer, "", _PLACEHOLDER_QUESTION)
    return parts.prefix_ids[: parts.context_token_span[0]]


def attach_receiver_head(
    lm: LoadedModel, translated: KVSnapshot, calibration: CrossModelCalibration
) -> KVSnapshot:
    """Prepend the receiver's own template head (prefilled natively) to a translated context snapshot."""
    return join_receiver_head(
        lm, translated, head_tokens=calibration.receiver.head_tokens, what=calibration.describe()
    )


def join_receiver_head(
    lm: LoadedModel, translated: KVSnapshot, *, head_tokens: int, what: str = "translated card"
) -> KVSnapshot:
    """This receiver's template head, prefilled here, followed by translated context KV (no template).

    ``head_tokens`` is the head length the translation assumed (the calibration's, or the card's record
    for a card translated at its sender); a receiver whose template head has another length, or translated
    KV that starts inside the head, is a :class:`CardCompatError` naming ``what``. ``extra`` is the
    translated snapshot's.
    """
    head_ids = _receiver_head_ids(lm)
    if len(head_ids) != head_tokens:
        raise CardCompatError(
            f"{what}: this receiver's template head has {len(head_ids)} tokens, the translation assumed "
            f"{head_tokens} (another prompt template)"
        )
    if translated.template_prefix_tokens:
        raise CardCompatError(f"{what}: translated KV must hold context tokens only, not template tokens")
    if translated.num_tokens and int(translated.positions[0]) < len(head_ids):
        raise CardCompatError(
            f"{what}: translated KV starts at position {int(translated.positions[0])}, inside the receiver's "
            f"{len(head_ids)}-token template head"
        )
    if not head_ids:
        return translated
    joined = prefill(lm, head_ids, template_prefix_tokens=len(head_ids)).followed_by(translated)
    return replace(joined, extra=dict(translated.extra))


def receiver_suffix_ids(lm: LoadedModel, question: str, *, facts: str | None = None) -> tuple[int, ...]:
    """What the receiver prefills after a translated snapshot: its own template tail, then the question."""
    parts = lm.template.split(lm.tokenizer, "", question, facts=facts)
    return parts.prefix_ids[parts.context_token_span[1] :] + parts.suffix_ids


# ------------------------------------------------------------------------------------------ card record

#: Key of the cross-model record in ``CardMeta.extra`` (see :class:`CrossModelRecord`).
CROSSMODEL_KEY = "crossmodel"
#: Receivers one card may name (a reader publishing to a topic read by several kinds of model).
MAX_TARGETS = 64
#: Where a card's KV is translated: ``"receiver"`` (the card holds the sender's KV) or ``"sender"``.
TranslateAt = Literal["receiver", "sender"]
_TRANSLATE_AT: tuple[TranslateAt, ...] = ("receiver", "sender")
_ID_CHARS = 16  # fingerprint digests and calibration ids: 16 lowercase hex digits
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, kw_only=True)
class CrossModelRecord:
    """What a card says about cross-model translation: ``CardMeta.extra["crossmodel"]``, digest-covered.

    * ``at="receiver"``: the card is an ordinary card of the sender's model (``sender``, a fingerprint
      digest; a receiver of that model reads it as usual). ``targets`` maps each receiver model's
      fingerprint digest to the id of the :class:`CrossModelCalibration` it must translate the card with.
    * ``at="sender"``: the card's KV was translated before encoding; its fingerprint is the one target's
      receiver. It holds the context only, from position ``receiver_head_tokens`` on: the receiver prefills
      its own template head of that many tokens (:func:`join_receiver_head`) and its own template tail with
      the question (:func:`receiver_suffix_ids`). ``sender`` and the calibration id say where it came from;
      the receiver needs no calibration.

    :meth:`from_meta` parses untrusted input (:class:`~qkv._errors.CardFormatError` on anything malformed).
    """

    at: TranslateAt
    sender: str
    targets: tuple[tuple[str, str], ...]  # (receiver fingerprint digest, calibration id), receivers distinct
    receiver_head_tokens: int = 0

    def __post_init__(self) -> None:
        if self.at not in _TRANSLATE_AT:
            raise ValueError(f"at must be 'receiver' or 'sender', got {self.at!r}")
        names = [self.sender, *(part for target in self.targets for part in target)]
        if not all(_is_id(name) for name in names):
            raise ValueError(f"digests and calibration ids are {_ID_CHARS} lowercase hex digits")
        if not 1 <= len(self.targets) <= MAX_TARGETS or any(len(t) != 2 for t in self.targets):
            raise ValueError(f"a record names 1..{MAX_TARGETS} (receiver, calibration) targets")
        if len({receiver for receiver, _ in self.targets}) != len(self.targets):
            raise ValueError("a record names each receiver model once")
        head = self.receiver_head_tokens
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head <= MAX_TOKENS:
            raise ValueError(f"receiver_head_tokens must be an int in 0..{MAX_TOKENS}, got {head!r}")
        if self.at == "sender" and len(self.targets) != 1:
            raise ValueError("a card translated at its sender is for exactly one receiver model")
        if self.at == "receiver" and head:
            raise ValueError("receiver_head_tokens belongs to cards translated at the sender")

    @classmethod
    def for_calibrations(
        cls, calibrations: Sequence[CrossModelCalibration], *, at: TranslateAt
    ) -> CrossModelRecord:
        """The record a sender writes for ``calibrations`` (all from one sender model)."""
        if not calibrations:
            raise ValueError("no calibration to name")
        senders = {c.sender.fingerprint.digest for c in calibrations}
        if len(senders) != 1:
            raise ValueError(f"calibrations from several sender models: {sorted(senders)}")
        return cls(
            at=at,
            sender=senders.pop(),
            targets=tuple((c.receiver.fingerprint.digest, c.id) for c in calibrations),
            receiver_head_tokens=calibrations[0].receiver.head_tokens if at == "sender" else 0,
        )

    def calibration_for(self, receiver: ModelFingerprint) -> str | None:
        """The calibration id the card names for ``receiver``, or ``None``."""
        return next((cal for digest, cal in self.targets if digest == receiver.digest), None)

    def to_meta(self) -> dict[str, Any]:
        """msgpack-safe form, as stored in the card's metadata."""
        meta: dict[str, Any] = {
            "at": self.at,
            "sender": self.sender,
            "targets": [{"receiver": receiver, "calibration": cal} for receiver, cal in self.targets],
        }
        if self.at == "sender":
            meta["receiver_head_tokens"] = self.receiver_head_tokens
        return meta

    @classmethod
    def from_meta(cls, value: object) -> CrossModelRecord:
        """Parse :meth:`to_meta`'s form from untrusted input; unknown keys are ignored (later minors)."""
        where = f"card metadata: extra.{CROSSMODEL_KEY}"
        if not isinstance(value, Mapping):
            raise CardFormatError(f"{where} must be a map")
        targets = value.get("targets")
        if not isinstance(targets, list | tuple) or not 1 <= len(targets) <= MAX_TARGETS:
            raise CardFormatError(f"{where}.targets must be a list of 1..{MAX_TARGETS} maps")
        if not all(isinstance(t, Mapping) for t in targets):
            raise CardFormatError(f"{where}.targets must hold maps {{receiver, calibration}}")
        try:
            return cls(
                at=value.get("at"),  # type: ignore[arg-type]  # checked in __post_init__
                sender=value.get("sender"),  # type: ignore[arg-type]
                targets=tuple((t.get("receiver"), t.get("calibration")) for t in targets),
                receiver_head_tokens=value.get("receiver_head_tokens", 0),
            )
        except ValueError as exc:
            raise CardFormatError(f"{where}: {exc}") from exc

    def check_card(self, fingerprint: ModelFingerprint, *, template_prefix_tokens: int) -> None:
        """Raise :class:`CardFormatError` when the record contradicts the card that carries it."""
        where = f"card metadata: extra.{CROSSMODEL_KEY}"
        if self.at == "receiver" and self.sender != fingerprint.digest:
            raise CardFormatError(
                f"{where} names sender {self.sender}, but the card's KV is of {fingerprint.architecture} "
                f"({fingerprint.digest})"
            )
        if self.at == "sender":
            receiver = self.targets[0][0]
            if receiver != fingerprint.digest:
                raise CardFormatError(
                    f"{where} says the KV was translated for {receiver}, but the card's fingerprint is "
                    f"{fingerprint.architecture} ({fingerprint.digest})"
                )
            if template_prefix_tokens:
                raise CardFormatError(f"{where}: a card translated at its sender holds no template tokens")


def _is_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == _ID_CHARS and set(value) <= _HEX


def crossmodel_record(meta_extra: Mapping[str, Any]) -> CrossModelRecord | None:
    """The cross-model record of a card's ``CardMeta.extra``, or ``None`` for an ordinary card."""
    value = meta_extra.get(CROSSMODEL_KEY)
    return None if value is None else CrossModelRecord.from_meta(value)
