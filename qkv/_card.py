"""CacheCard v1/v2: a self-describing binary holding one sequence's compressed KV cache.

Pure codec: bytes in, bytes out, no sockets, no files. :func:`encode_card` turns a :class:`KVSnapshot` and an
:class:`EncodingPlan` into bytes; :func:`decode_card` turns bytes back into a snapshot; :func:`read_card_info`
reads the id, fingerprint, sizes and text slots without decoding the payload and without torch. Bad input
of any kind raises a :class:`~qkv._errors.CardError` subclass with a clear message, never a raw ``struct``,
``msgpack`` or ``torch`` error; received bytes are never unpickled.

Byte layout (all integers little-endian)::

    offset  size  field
    0       4     magic  b"QKVC"
    4       1     major version (1; 2 when the quantized blocks are rotated, see below)
    5       1     minor version (0)
    6       2     header_len: bytes before the metadata (52 in v1.0; a later minor may append fields)
    8       4     meta_len: bytes of msgpack metadata
    12      8     payload_len: bytes of payload
    20      32    sha256 digest (see below)
    52      ...   header extension of later minors (header_len - 52 bytes; none in v1.0)
    header_len            metadata: one msgpack map (str keys), meta_len bytes
    header_len + meta_len payload: payload_len bytes of sections, each 8-byte aligned (relative to the
                          payload start), zero padding between them; nothing may follow the payload

The metadata map (v1.0 keys; unknown keys are ignored)::

    fingerprint             {architecture, num_layers, num_kv_heads, head_dim, rope_theta, rope_params,
                             tokenizer_hash}: the model the KV belongs to (see ModelFingerprint)
    tokens                  T, number of tokens (>= 1)
    positions               [[start, length], ...]: runs of consecutive RoPE positions, in token order
    template_prefix_tokens  int
    group_size              G, quantization group length (tokens for keys, channels for values)
    num_classes             C >= 1 token classes (token-level mixed precision)
    classes                 [offset, length] of a uint8 [T] section of class ids, or nil when C == 1
    blocks                  list of blocks, see below
    sender, created, facts  str, float (unix time), str
    budget, extra           maps with str keys: what budget was applied, and anything else
    rotation                v2 only (required): "hadamard" or "hadamard-prerope", the orthogonal transform
                            the quantized blocks were coded in (qkv._rotation); the reader undoes it

A *block* holds the tokens of one class, for one of K ("k") or V ("v"), for several layers coded with one
width: ``{kind, class, bits, layers: [ascending layer indices], ...sections}``. Its logical tensor is
``[len(layers), H, Tc, D]`` (H = num_kv_heads, D = head_dim, Tc = tokens of the class in token order):

* bits 1..8: ``codes`` (that tensor's codes flattened in C order, packed as in :mod:`qkv._bitpack`),
  ``scales`` and ``zeros`` (fp16, C order, ``[n, H, ceil(Tc/G), D]`` for keys grouped along tokens,
  ``[n, H, Tc, ceil(D/G)]`` for values grouped along channels; see :mod:`qkv._quant`);
* bits 16: ``data``, the values in fp16;
* bits 32: ``data`` in the snapshot's own dtype, named by ``dtype`` (float32, float16, bfloat16, float64):
  lossless.

Every section is ``[offset, length]`` relative to the payload start. A reader checks before it allocates
anything that each offset is aligned, every section lies inside the payload, no two sections overlap, every
length equals what the shapes imply, and every (kind, layer) is covered by one block per non-empty class or
not at all (a layer that was not sent decodes to ``None``).

Digest and card id: the digest is sha256 over header bytes 0..20, the header extension (bytes 52..header_len),
the metadata and the payload, i.e. every byte except the digest field itself, so any corruption or
truncation is detected. The card id is the first 32 hex characters of the digest: a content id that the
runtime and store read from the header without decoding. The digest is *not* authentication: anyone can
recompute it, so it does not tell who made a card (the bus signs frame headers for that), and it does not
say the KV fits the receiver's model (pass ``expect=`` to :func:`decode_card` for that check).

Versioning rule: a reader rejects a major version it does not know (``CardFormatError``). It reads every
minor version of its major as if it were the minor it knows: a later minor may only *add* things an older
reader can skip (metadata keys, header fields after byte 52 via header_len, payload sections referenced only
from new keys). Anything that changes the meaning of existing fields (a new width, packing or grouping)
needs a new major version: rotated codes are one, so a rotated card is 2.0 (v1 plus the ``rotation`` key);
every other card is written as 1.0.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from ._bitpack import pack_codes, packed_size, unpack_codes
from ._errors import CardDigestError, CardFormatError
from ._kv import KVSnapshot, ModelFingerprint
from ._quant import KEY_AXIS, VALUE_AXIS, dequantize_into, quantize, stats_shape
from ._rope import RopeTable
from ._rotation import (
    ROTATIONS,
    Rotation,
    check_rotation,
    from_code_space_into,
    rope_table_for,
    to_code_space,
)

if sys.byteorder != "little":  # raw tensor bytes are written in host order; every target we run on is LE
    raise ImportError("the CacheCard codec needs a little-endian host")

MAGIC = b"QKVC"
VERSION_MAJOR = 1  # cards without a rotation
ROTATED_VERSION_MAJOR = 2  # cards whose quantized blocks are coded in a rotated space (metadata "rotation")
READ_MAJORS = (VERSION_MAJOR, ROTATED_VERSION_MAJOR)
VERSION_MINOR = 0
_HEADER = struct.Struct("<4sBBHIQ32s")
HEADER_SIZE = 52
assert _HEADER.size == HEADER_SIZE, "the v1 header layout is fixed"
_DIGEST_START = 20  # the digest field: header bytes 20..52
_DIGEST_END = _DIGEST_START + 32
CARD_ID_CHARS = 32
SECTION_ALIGN = 8

# Sanity limits, checked before anything is allocated from a claimed size.
MAX_HEADER_SIZE = 4096
MAX_METADATA_BYTES = 16 << 20
MAX_TOKENS = 1 << 20
MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 1 << 14
MAX_GROUP_SIZE = 1 << 16
MAX_CLASSES = 256
_MAX_POSITION = 1 << 62

FP16_BITS = 16
RAW_BITS = 32
QUANT_BITS = frozenset(range(1, 9))
ALLOWED_BITS = QUANT_BITS | {FP16_BITS, RAW_BITS}  # widths a card block may have
PLAN_BITS = ALLOWED_BITS | {0}  # 0 in a plan: leave the layer out
_RAW_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _RAW_DTYPES.items()}
_KINDS = ("k", "v")
_AXES = {"k": KEY_AXIS, "v": VALUE_AXIS}


# ---------------------------------------------------------------------------------------------------------
# Plan


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _width_row(values: Sequence[int], what: str) -> tuple[int, ...]:
    row = tuple(values)
    for bits in row:
        if not _is_int(bits) or bits not in PLAN_BITS:
            raise ValueError(f"{what}: width {bits!r} is not one of 0 (not sent), 1..8, 16 (fp16), 32 (raw)")
    return row


def _segment_nbytes(
    bits: int, kind: str, heads: int, tokens: int, dim: int, group_size: int, itemsize: int
) -> int:
    """Payload bytes of one layer's tensor restricted to ``tokens`` tokens (no alignment padding)."""
    count = heads * tokens * dim
    if bits == 0:
        return 0
    if bits == FP16_BITS:
        return count * 2
    if bits == RAW_BITS:
        return count * itemsize
    stats = math.prod(stats_shape((heads, tokens, dim), _AXES[kind], group_size))
    return packed_size(count, bits) + 2 * 2 * stats


@dataclass(frozen=True, kw_only=True, eq=False)
class EncodingPlan:
    """How each layer's K and V are coded.

    Widths: 0 leaves the layer's tensor out of the card (as if it were ``None``), 1..8 quantize, 16 stores
    fp16, 32 stores the tensor's own dtype losslessly. Without ``token_classes`` every token of layer ``l``
    uses ``key_bits[l]`` / ``value_bits[l]``. With ``token_classes`` (uint8 ``[tokens]``, one class id per
    token, shared by all layers) class ``c`` of layer ``l`` uses ``class_key_bits[l][c]`` /
    ``class_value_bits[l][c]``; ``key_bits``/``value_bits`` then only say whether a layer is sent (0 or
    not) and must agree with the class rows (a row is all zero exactly when the layer's width is 0).
    Quantization groups never mix classes: each class's tokens are grouped among themselves, in token
    order. ``rotation`` (see :mod:`qkv._rotation`) is the transform quantized blocks are coded in; fp16 and
    raw blocks are never transformed. Compares by identity (it may hold a tensor).
    """

    key_bits: tuple[int, ...]
    value_bits: tuple[int, ...]
    group_size: int = 32
    token_classes: torch.Tensor | None = None
    class_key_bits: tuple[tuple[int, ...], ...] | None = None
    class_value_bits: tuple[tuple[int, ...], ...] | None = None
    rotation: Rotation = "none"

    def __post_init__(self) -> None:
        check_rotation(self.rotation)
        key_bits = _width_row(self.key_bits, "key_bits")
        value_bits = _width_row(self.value_bits, "value_bits")
        object.__setattr__(self, "key_bits", key_bits)
        object.__setattr__(self, "value_bits", value_bits)
        if len(key_bits) != len(value_bits) or not key_bits:
            raise ValueError("key_bits and value_bits need one width per layer, at least one layer")
        if not _is_int(self.group_size) or not 1 <= self.group_size <= MAX_GROUP_SIZE:
            raise ValueError(f"group_size must be an int in 1..{MAX_GROUP_SIZE}, got {self.group_size!r}")
        if self.token_classes is None:
            if self.class_key_bits is not None or self.class_value_bits is not None:
                raise ValueError("class_key_bits/class_value_bits need token_classes")
            return
        classes = self.token_classes
        if not isinstance(classes, torch.Tensor) or classes.dtype != torch.uint8 or classes.dim() != 1:
            raise ValueError("token_classes must be a 1-D uint8 tensor, one class id per token")
        if self.class_key_bits is None or self.class_value_bits is None:
            raise ValueError("token_classes needs class_key_bits and class_value_bits ([layer][class])")
        tables: list[tuple[tuple[int, ...], ...]] = []
        for name, table, base in (
            ("class_key_bits", self.class_key_bits, key_bits),
            ("class_value_bits", self.class_value_bits, value_bits),
        ):
            rows = tuple(_width_row(row, f"{name}[{layer}]") for layer, row in enumerate(table))
            if len(rows) != len(base):
                raise ValueError(f"{name} has {len(rows)} layers, key_bits has {len(base)}")
            for layer, row in enumerate(rows):
                if len(row) != len(rows[0]) or not row:
                    raise ValueError(f"{name}: every layer needs the same number (>= 1) of class widths")
                if (base[layer] == 0) != all(bits == 0 for bits in row) or (0 in row and any(row)):
                    raise ValueError(
                        f"{name}[{layer}] is {row} but the layer's width is {base[layer]}: a layer is sent "
                        "(every class width non-zero) or not (all zero)"
                    )
            tables.append(rows)
        num_classes = len(tables[0][0])
        if num_classes != len(tables[1][0]) or num_classes > MAX_CLASSES:
            raise ValueError(
                f"class_key_bits and class_value_bits need the same number (<= {MAX_CLASSES}) of classes"
            )
        if classes.numel() and int(classes.max()) >= num_classes:
            raise ValueError(
                f"token_classes holds class {int(classes.max())}, only {num_classes} have widths"
            )
        object.__setattr__(self, "class_key_bits", tables[0])
        object.__setattr__(self, "class_value_bits", tables[1])

    @property
    def num_layers(self) -> int:
        return len(self.key_bits)

    @property
    def num_classes(self) -> int:
        return 1 if self.class_key_bits is None else len(self.class_key_bits[0])

    def widths(self, kind: str) -> tuple[tuple[int, ...], ...]:
        """``[layer][class]`` widths for ``kind`` "k" or "v" (one class when there are no token classes)."""
        if kind not in _KINDS:
            raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
        table = self.class_key_bits if kind == "k" else self.class_value_bits
        if table is not None:
            return table
        return tuple((bits,) for bits in (self.key_bits if kind == "k" else self.value_bits))

    @classmethod
    def uniform(
        cls,
        num_layers: int,
        bits: int,
        *,
        group_size: int = 32,
        recent_fp16: int = 0,
        num_tokens: int | None = None,
        rotation: Rotation = "none",
    ) -> EncodingPlan:
        """Every layer's K and V at ``bits``; with ``recent_fp16 = N`` the last N tokens stay fp16."""
        plan = cls(
            key_bits=(bits,) * num_layers,
            value_bits=(bits,) * num_layers,
            group_size=group_size,
            rotation=rotation,
        )
        if recent_fp16:
            if num_tokens is None:
                raise ValueError("recent_fp16 needs num_tokens")
            plan = plan.with_recent_fp16(recent_fp16, num_tokens)
        return plan

    @classmethod
    def mixed(
        cls,
        *,
        token_classes: torch.Tensor,
        class_key_bits: Sequence[Sequence[int]],
        class_value_bits: Sequence[Sequence[int]],
        group_size: int = 32,
        rotation: Rotation = "none",
    ) -> EncodingPlan:
        """A token-class plan; ``key_bits``/``value_bits`` are derived (a layer's largest class width)."""
        key_rows = tuple(tuple(row) for row in class_key_bits)
        value_rows = tuple(tuple(row) for row in class_value_bits)
        return cls(
            key_bits=tuple(max(row, default=0) for row in key_rows),
            value_bits=tuple(max(row, default=0) for row in value_rows),
            group_size=group_size,
            token_classes=token_classes,
            class_key_bits=key_rows,
            class_value_bits=value_rows,
            rotation=rotation,
        )

    def with_recent_fp16(self, recent: int, num_tokens: int) -> EncodingPlan:
        """This plan with the last ``recent`` tokens moved into a new class coded fp16 in every layer."""
        if not _is_int(recent) or recent < 0 or not _is_int(num_tokens) or num_tokens < 0:
            raise ValueError("recent and num_tokens must be non-negative ints")
        mask = torch.zeros(num_tokens, dtype=torch.bool)
        mask[max(0, num_tokens - recent) :] = True
        return self.with_fp16_tokens(mask)

    def with_fp16_tokens(self, mask: torch.Tensor) -> EncodingPlan:
        """This plan with the tokens where ``mask`` (bool ``[tokens]``) is true in a new fp16 class.

        Used for the last tokens (``with_recent_fp16``) and for attention sinks, whose outlying K and V would
        otherwise widen the range of every quantization group they fall in. A layer coded wider than fp16
        (raw) keeps its width for them too.
        """
        if mask.dtype != torch.bool or mask.dim() != 1:
            raise ValueError("mask must be a 1-D bool tensor, one entry per token")
        num_tokens = int(mask.numel())
        if not bool(mask.any()):
            return self
        if self.token_classes is not None and self.token_classes.numel() != num_tokens:
            raise ValueError(f"token_classes has {self.token_classes.numel()} tokens, not {num_tokens}")
        new_class = self.num_classes
        if self.token_classes is None:
            classes = torch.zeros(num_tokens, dtype=torch.uint8)
        else:
            classes = self.token_classes.detach().to("cpu", copy=True)
        classes[mask.detach().to("cpu")] = new_class
        return EncodingPlan.mixed(
            token_classes=classes,
            class_key_bits=[(*row, max(FP16_BITS, *row) if any(row) else 0) for row in self.widths("k")],
            class_value_bits=[(*row, max(FP16_BITS, *row) if any(row) else 0) for row in self.widths("v")],
            group_size=self.group_size,
            rotation=self.rotation,
        )

    def class_counts(self, num_tokens: int) -> tuple[int, ...]:
        """Tokens in each class for a sequence of ``num_tokens`` tokens."""
        if self.token_classes is None:
            return (num_tokens,)
        if self.token_classes.numel() != num_tokens:
            raise ValueError(f"token_classes has {self.token_classes.numel()} tokens, not {num_tokens}")
        counts = torch.bincount(
            self.token_classes.detach().to("cpu", torch.int64), minlength=self.num_classes
        )
        return tuple(int(n) for n in counts.tolist())

    def average_bits(self, *, num_tokens: int, kv_heads: int, head_dim: int, raw_itemsize: int = 4) -> float:
        """Real payload bits per sent K/V value for a snapshot of this shape (all layers present).

        Counts codes, fp16 scales and zeros, fp16 and raw (``raw_itemsize`` bytes per value) tensors over
        the tensors whose width is not 0; the header, metadata and alignment padding of a card come on top
        (``CardInfo.ratio`` is the all-in number).
        """
        counts = self.class_counts(num_tokens)
        total = 0
        sent = 0
        for kind in _KINDS:
            for row in self.widths(kind):
                if any(row):
                    sent += 1
                for bits, tokens in zip(row, counts, strict=True):
                    if tokens:
                        total += _segment_nbytes(
                            bits, kind, kv_heads, tokens, head_dim, self.group_size, raw_itemsize
                        )
        values = sent * kv_heads * num_tokens * head_dim
        return 8.0 * total / values if values else 0.0


# ---------------------------------------------------------------------------------------------------------
# Metadata value objects


def _check_str_keys(mapping: object, what: str) -> dict[str, Any]:
    if not isinstance(mapping, dict) or not all(isinstance(key, str) for key in mapping):
        raise TypeError(f"{what} must be a dict with str keys")
    return mapping


@dataclass(frozen=True, kw_only=True)
class CardMeta:
    """The card's descriptive slots: who made it, when, the text facts and what budget was applied."""

    sender: str = ""
    created: float = field(default_factory=time.time)
    facts: str = ""
    budget: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.sender, str) or not isinstance(self.facts, str):
            raise TypeError("sender and facts must be str")
        if not isinstance(self.created, int | float) or isinstance(self.created, bool):
            raise TypeError("created must be a float (unix time)")
        if not math.isfinite(self.created):
            raise ValueError("created must be finite")
        _check_str_keys(self.budget, "budget")
        _check_str_keys(self.extra, "extra")


@dataclass(frozen=True, kw_only=True)
class CardInfo:
    """What a card says about itself, read from header and metadata without decoding the payload."""

    card_id: str  # first 32 hex chars of the digest
    digest: str  # full sha256 hex
    digest_verified: bool  # False from read_card_info(verify=False): structure checked, digest not
    version: tuple[int, int]
    fingerprint: ModelFingerprint
    num_tokens: int
    next_position: int  # positions[-1] + 1: where the receiver's own tokens continue
    template_prefix_tokens: int
    group_size: int
    num_classes: int
    key_bits: tuple[tuple[int, ...], ...]  # [layer][class]; () for a layer not in the card
    value_bits: tuple[tuple[int, ...], ...]
    card_bytes: int
    metadata_bytes: int
    payload_bytes: int
    fp16_bytes: int  # what the K/V in this card take in fp16
    meta: CardMeta
    rotation: Rotation = "none"  # transform of the quantized blocks (v2 cards); "none" in v1

    @property
    def ratio(self) -> float:
        """fp16 bytes / card bytes, header, metadata, scales and padding included."""
        return self.fp16_bytes / self.card_bytes

    @property
    def facts(self) -> str:
        return self.meta.facts

    @property
    def sender(self) -> str:
        return self.meta.sender

    @property
    def created(self) -> float:
        return self.meta.created

    @property
    def layers_present(self) -> tuple[int, ...]:
        """Layers whose K or V is in the card."""
        return tuple(
            layer for layer, (k, v) in enumerate(zip(self.key_bits, self.value_bits, strict=True)) if k or v
        )


@dataclass(frozen=True, eq=False)
class DecodedCard:
    snapshot: KVSnapshot
    meta: CardMeta
    info: CardInfo


# ---------------------------------------------------------------------------------------------------------
# Encoding


@dataclass(frozen=True)
class _TokenSelection:
    """The tokens of one class: a contiguous range (views, no copies) or an index tensor.

    Methods work on ``[..., heads, tokens, head_dim]`` tensors (the token axis is the second to last).
    """

    start: int
    count: int
    index: torch.Tensor | None  # on the tensors' device; None for the range start..start+count

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return tensor.narrow(-2, self.start, self.count)
        return tensor.index_select(tensor.dim() - 2, self.index)

    def region(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A writable view of this class's tokens in ``tensor``, or None when they are scattered."""
        return tensor.narrow(-2, self.start, self.count) if self.index is None else None

    def put(self, tensor: torch.Tensor, values: torch.Tensor) -> None:
        if self.index is None:
            tensor.narrow(-2, self.start, self.count).copy_(values)
        else:
            tensor.index_copy_(tensor.dim() - 2, self.index, values.to(tensor.dtype))


def _selections(
    classes: torch.Tensor | None, num_classes: int, tokens: int, device: torch.device
) -> list[_TokenSelection | None]:
    """One selection per class (None for a class without tokens)."""
    if classes is None:
        return [_TokenSelection(0, tokens, None)]
    selections: list[_TokenSelection | None] = []
    for cls in range(num_classes):
        index = (classes == cls).nonzero().flatten()
        count = int(index.numel())
        if count == 0:
            selections.append(None)
            continue
        first, last = int(index[0]), int(index[-1])
        if last - first + 1 == count:
            selections.append(_TokenSelection(first, count, None))
        else:
            selections.append(_TokenSelection(first, count, index.to(device)))
    return selections


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (one copy from another device or a non-contiguous view)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return flat.numpy().data


class _PayloadWriter:
    """Collects aligned sections as memoryviews so that the card is assembled with one copy."""

    def __init__(self) -> None:
        self.pieces: list[bytes | memoryview] = []
        self.size = 0

    def add(self, *chunks: torch.Tensor) -> list[int]:
        """Append ``chunks`` as one section; returns its ``[offset, length]``."""
        pad = -self.size % SECTION_ALIGN
        if pad:
            self.pieces.append(bytes(pad))
            self.size += pad
        start = self.size
        for chunk in chunks:
            view = _tensor_bytes(chunk)
            self.pieces.append(view)
            self.size += view.nbytes
        return [start, self.size - start]


def _position_runs(positions: torch.Tensor) -> list[list[int]]:
    """``[[start, length], ...]`` runs of consecutive positions (vectorised)."""
    pos = positions.detach().to("cpu", torch.int64).reshape(-1)
    if pos.numel() == 0:
        return []
    breaks = ((pos[1:] - pos[:-1]) != 1).nonzero().flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), breaks])
    ends = torch.cat([breaks, torch.tensor([pos.numel()], dtype=torch.int64)])
    return [[s, n] for s, n in zip(pos[starts].tolist(), (ends - starts).tolist(), strict=True)]


def _check_snapshot(snapshot: KVSnapshot, plan: EncodingPlan) -> tuple[int, int, int, torch.device]:
    fingerprint = snapshot.fingerprint
    tokens = snapshot.num_tokens
    heads, dim = fingerprint.num_kv_heads, fingerprint.head_dim
    if snapshot.num_layers != fingerprint.num_layers or plan.num_layers != snapshot.num_layers:
        raise ValueError(
            f"layer counts disagree: snapshot {snapshot.num_layers}, fingerprint {fingerprint.num_layers}, "
            f"plan {plan.num_layers}"
        )
    if not 1 <= tokens <= MAX_TOKENS:
        raise ValueError(f"a card holds 1..{MAX_TOKENS} tokens, the snapshot has {tokens}")
    if snapshot.positions.dim() != 1 or snapshot.positions.is_floating_point():
        raise ValueError("positions must be a 1-D integer tensor")
    if not 0 <= snapshot.template_prefix_tokens <= tokens:
        raise ValueError(f"template_prefix_tokens {snapshot.template_prefix_tokens} is outside 0..{tokens}")
    if plan.token_classes is not None and plan.token_classes.numel() != tokens:
        raise ValueError(f"plan.token_classes has {plan.token_classes.numel()} tokens, the snapshot {tokens}")
    device: torch.device | None = None
    for kind, tensors in (("keys", snapshot.keys), ("values", snapshot.values)):
        for layer, tensor in enumerate(tensors):
            if tensor is None:
                continue
            if tuple(tensor.shape) != (heads, tokens, dim):
                raise ValueError(
                    f"{kind}[{layer}] has shape {tuple(tensor.shape)}, expected {(heads, tokens, dim)}"
                )
            if tensor.dtype not in _DTYPE_NAMES:
                raise ValueError(
                    f"{kind}[{layer}] has dtype {tensor.dtype}; cards carry float16/32/64, bfloat16"
                )
            if device is None:
                device = tensor.device
            elif tensor.device != device:
                raise ValueError(f"{kind}[{layer}] is on {tensor.device}, other layers on {device}")
    return tokens, heads, dim, device if device is not None else torch.device("cpu")


def _encode_block(
    writer: _PayloadWriter,
    *,
    kind: str,
    cls: int,
    bits: int,
    layers: list[int],
    parts: list[torch.Tensor],
    group_size: int,
    rotation: Rotation,
    positions: torch.Tensor,
    rope: RopeTable | None,
) -> dict[str, Any]:
    block: dict[str, Any] = {"kind": kind, "class": cls, "bits": bits, "layers": layers}
    where = f"{'keys' if kind == 'k' else 'values'} of layers {layers} (class {cls}, {bits} bits)"
    if bits in QUANT_BITS:
        if rotation != "none":
            parts = [
                to_code_space(part, kind=kind, rotation=rotation, positions=positions, rope=rope)
                for part in parts
            ]
        try:
            batch = quantize(parts, bits=bits, group_size=group_size, axis=_AXES[kind])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        block["codes"] = writer.add(pack_codes(batch.codes, bits))
        block["scales"] = writer.add(batch.scales)
        block["zeros"] = writer.add(batch.zeros)
    elif bits == FP16_BITS:
        if all(part.dtype == torch.float16 for part in parts):
            block["data"] = writer.add(*parts)  # already fp16: nothing is lost, nothing to check
        else:
            data = torch.empty((len(parts), *parts[0].shape), dtype=torch.float16, device=parts[0].device)
            for index, part in enumerate(parts):
                data[index].copy_(part)
            # One pass: NaN/inf (including fp16 overflow) poisons the sum; fp32 cannot overflow on fp16 input.
            if not bool(torch.isfinite(data.sum(dtype=torch.float32))):
                raise ValueError(f"{where}: values are not finite in fp16 (use width 32 to keep them raw)")
            block["data"] = writer.add(data)
    else:
        block["dtype"] = _DTYPE_NAMES[parts[0].dtype]
        block["data"] = writer.add(*parts)
    return block


def encode_card(snapshot: KVSnapshot, plan: EncodingPlan, *, meta: CardMeta | None = None) -> bytes:
    """Encode ``snapshot`` as CacheCard v1 bytes. Raises ``ValueError`` when snapshot and plan disagree.

    Tensors that are ``None`` or whose plan width is 0 are left out of the card. ``meta`` defaults to
    ``CardMeta()`` (created now); pass a fixed ``created`` for reproducible bytes. ``snapshot.extra`` is not
    carried (put what the receiver needs in ``CardMeta.extra``).
    """
    meta = CardMeta() if meta is None else meta
    tokens, _heads, _dim, device = _check_snapshot(snapshot, plan)
    runs = _position_runs(snapshot.positions)
    if min(start for start, _ in runs) < 0 or max(start + length for start, length in runs) > _MAX_POSITION:
        raise ValueError("positions must lie in 0..2**62")
    classes_cpu = None if plan.token_classes is None else plan.token_classes.detach().to("cpu")
    selections = _selections(classes_cpu, plan.num_classes, tokens, device)
    check_rotation(plan.rotation, head_dim=snapshot.fingerprint.head_dim)
    rope = rope_table_for(snapshot.fingerprint) if plan.rotation == "hadamard-prerope" else None
    token_positions = snapshot.positions.detach().to(device, torch.int64).view(-1, 1)

    writer = _PayloadWriter()
    classes_section = None if classes_cpu is None else writer.add(classes_cpu)
    blocks: list[dict[str, Any]] = []
    for kind, tensors in (("k", snapshot.keys), ("v", snapshot.values)):
        widths = plan.widths(kind)
        for cls, selection in enumerate(selections):
            if selection is None:
                continue
            # Batch the layers that share a width (and, for raw, a dtype) into one block.
            members: dict[tuple[int, torch.dtype | None], list[tuple[int, torch.Tensor]]] = {}
            for layer, tensor in enumerate(tensors):
                bits = widths[layer][cls]
                if tensor is not None and bits:
                    key = (bits, tensor.dtype if bits == RAW_BITS else None)
                    members.setdefault(key, []).append((layer, tensor))
            for (bits, _), layer_tensors in members.items():
                blocks.append(
                    _encode_block(
                        writer,
                        kind=kind,
                        cls=cls,
                        bits=bits,
                        layers=[layer for layer, _ in layer_tensors],
                        parts=[selection.take(tensor) for _, tensor in layer_tensors],
                        group_size=plan.group_size,
                        rotation=plan.rotation,
                        positions=selection.take(token_positions).view(-1),
                        rope=rope,
                    )
                )
    metadata: dict[str, Any] = {
        "fingerprint": snapshot.fingerprint.to_dict(),
        "tokens": tokens,
        "positions": runs,
        "template_prefix_tokens": snapshot.template_prefix_tokens,
        "group_size": plan.group_size,
        "num_classes": plan.num_classes,
        "classes": classes_section,
        "blocks": blocks,
        "sender": meta.sender,
        "created": float(meta.created),
        "facts": meta.facts,
        "budget": meta.budget,
        "extra": meta.extra,
    }
    major = VERSION_MAJOR
    if plan.rotation != "none":
        metadata["rotation"] = plan.rotation
        major = ROTATED_VERSION_MAJOR  # a v1 reader would decode these codes without undoing the rotation
    try:
        meta_bytes = msgpack.packb(metadata, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"card metadata (budget/extra) is not msgpack-serialisable: {exc}") from exc
    if len(meta_bytes) > MAX_METADATA_BYTES:
        raise ValueError(f"card metadata is {len(meta_bytes)} bytes, the limit is {MAX_METADATA_BYTES}")
    prefix = _HEADER.pack(MAGIC, major, VERSION_MINOR, HEADER_SIZE, len(meta_bytes), writer.size, b"")
    digest = hashlib.sha256(prefix[:_DIGEST_START])
    digest.update(meta_bytes)
    for piece in writer.pieces:
        digest.update(piece)
    header = _HEADER.pack(
        MAGIC, major, VERSION_MINOR, HEADER_SIZE, len(meta_bytes), writer.size, digest.digest()
    )
    return b"".join([header, meta_bytes, *writer.pieces])


# ---------------------------------------------------------------------------------------------------------
# Parsing and validation (pure Python: read_card_info never touches torch)


@dataclass(frozen=True)
class _Block:
    kind: str
    cls: int
    bits: int
    layers: tuple[int, ...]
    dtype: torch.dtype | None  # raw blocks only
    sections: dict[str, tuple[int, int]]  # name -> (offset, length) in the payload


@dataclass(frozen=True)
class _ParsedCard:
    info: CardInfo
    blocks: tuple[_Block, ...]
    runs: tuple[tuple[int, int], ...]
    classes: tuple[int, int] | None
    payload: memoryview


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CardFormatError(f"card metadata: {what} must be an int in {low}..{high}, got {_short(value)}")
    return value


def _as_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise CardFormatError(f"card metadata: {what} must be a string, got {_short(value)}")
    return value


def _as_float(value: object, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise CardFormatError(f"card metadata: {what} must be a finite number, got {_short(value)}")
    return float(value)


def _as_list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise CardFormatError(f"card metadata: {what} must be a list, got {_short(value)}")
    return value


def _as_map(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise CardFormatError(f"card metadata: {what} must be a map with string keys, got {_short(value)}")
    return value


def _field(mapping: Mapping[str, Any], key: str, where: str = "") -> Any:
    if key not in mapping:
        raise CardFormatError(f"card metadata lacks {where}{key!r}")
    return mapping[key]


def _as_section(value: object, what: str, payload_len: int) -> tuple[int, int]:
    pair = _as_list(value, what)
    if len(pair) != 2:
        raise CardFormatError(f"card metadata: {what} must be [offset, length], got {_short(value)}")
    offset = _as_int(pair[0], f"{what} offset", 0, payload_len)
    length = _as_int(pair[1], f"{what} length", 0, payload_len - offset)
    if offset % SECTION_ALIGN:
        raise CardFormatError(f"card metadata: {what} offset {offset} is not {SECTION_ALIGN}-byte aligned")
    return offset, length


def _reject_ext(code: int, data: bytes) -> object:
    raise CardFormatError(f"card metadata holds a msgpack extension type ({code}); v1 uses none")


def _unpack_metadata(raw: memoryview) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext)
    except CardFormatError:
        raise
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError) as exc:
        raise CardFormatError(f"card metadata is not valid msgpack: {exc}") from exc
    return _as_map(value, "the top level")


def _parse_fingerprint(value: object) -> ModelFingerprint:
    data = _as_map(value, "fingerprint")
    return ModelFingerprint(
        architecture=_as_str(_field(data, "architecture", "fingerprint."), "fingerprint.architecture"),
        num_layers=_as_int(
            _field(data, "num_layers", "fingerprint."), "fingerprint.num_layers", 1, MAX_LAYERS
        ),
        num_kv_heads=_as_int(
            _field(data, "num_kv_heads", "fingerprint."), "fingerprint.num_kv_heads", 1, MAX_KV_HEADS
        ),
        head_dim=_as_int(_field(data, "head_dim", "fingerprint."), "fingerprint.head_dim", 1, MAX_HEAD_DIM),
        rope_theta=_as_float(_field(data, "rope_theta", "fingerprint."), "fingerprint.rope_theta"),
        rope_params=_as_str(data.get("rope_params", ""), "fingerprint.rope_params"),
        tokenizer_hash=_as_str(data.get("tokenizer_hash", ""), "fingerprint.tokenizer_hash"),
    )


def _parse_runs(value: object, tokens: int) -> tuple[tuple[int, int], ...]:
    items = _as_list(value, "positions")
    if not 1 <= len(items) <= tokens:
        raise CardFormatError(f"card metadata: positions has {len(items)} runs for {tokens} tokens")
    runs: list[tuple[int, int]] = []
    total = 0
    for index, item in enumerate(items):
        pair = _as_list(item, f"positions[{index}]")
        if len(pair) != 2:
            raise CardFormatError(f"card metadata: positions[{index}] must be [start, length]")
        start = _as_int(pair[0], f"positions[{index}] start", 0, _MAX_POSITION)
        length = _as_int(pair[1], f"positions[{index}] length", 1, min(tokens, _MAX_POSITION - start))
        runs.append((start, length))
        total += length
    if total != tokens:
        raise CardFormatError(f"card metadata: position runs cover {total} tokens, the card has {tokens}")
    return tuple(runs)


def _class_counts(
    payload: memoryview, section: tuple[int, int] | None, num_classes: int, tokens: int
) -> tuple[int, ...]:
    if section is None:
        if num_classes != 1:
            raise CardFormatError(f"card metadata: {num_classes} token classes but no classes section")
        return (tokens,)
    offset, length = section
    if length != tokens:
        raise CardFormatError(f"card metadata: classes section is {length} bytes for {tokens} tokens")
    ids = bytes(payload[offset : offset + length])
    counts = tuple(ids.count(cls) for cls in range(num_classes))
    if sum(counts) != tokens:
        raise CardFormatError(f"card: a token class id is >= num_classes ({num_classes})")
    return counts


def _parse_block(
    value: object,
    index: int,
    *,
    num_layers: int,
    num_classes: int,
    payload_len: int,
) -> _Block:
    where = f"blocks[{index}]"
    data = _as_map(value, where)
    kind = _field(data, "kind", f"{where}.")
    if kind not in _KINDS:
        raise CardFormatError(f"card metadata: {where}.kind must be 'k' or 'v', got {_short(kind)}")
    cls = _as_int(_field(data, "class", f"{where}."), f"{where}.class", 0, num_classes - 1)
    bits = _field(data, "bits", f"{where}.")
    if not _is_int(bits) or bits not in ALLOWED_BITS:
        raise CardFormatError(f"card metadata: {where}.bits must be 1..8, 16 or 32, got {_short(bits)}")
    layer_list = _as_list(_field(data, "layers", f"{where}."), f"{where}.layers")
    if not 1 <= len(layer_list) <= num_layers:
        raise CardFormatError(f"card metadata: {where}.layers must list 1..{num_layers} layers")
    layers = tuple(_as_int(layer, f"{where}.layers[]", 0, num_layers - 1) for layer in layer_list)
    if any(b <= a for a, b in itertools.pairwise(layers)):
        raise CardFormatError(f"card metadata: {where}.layers must be strictly increasing")
    dtype = None
    names: tuple[str, ...] = ("codes", "scales", "zeros") if bits in QUANT_BITS else ("data",)
    if bits == RAW_BITS:
        dtype_name = _field(data, "dtype", f"{where}.")
        if not isinstance(dtype_name, str) or dtype_name not in _RAW_DTYPES:
            raise CardFormatError(
                f"card metadata: {where}.dtype {_short(dtype_name)} is not a known raw dtype"
            )
        dtype = _RAW_DTYPES[dtype_name]
    sections = {
        name: _as_section(_field(data, name, f"{where}."), f"{where}.{name}", payload_len) for name in names
    }
    return _Block(kind=kind, cls=cls, bits=bits, layers=layers, dtype=dtype, sections=sections)


def _expected_lengths(block: _Block, heads: int, tokens: int, dim: int, group_size: int) -> dict[str, int]:
    count = len(block.layers) * heads * tokens * dim
    if block.bits in QUANT_BITS:
        stats = len(block.layers) * math.prod(
            stats_shape((heads, tokens, dim), _AXES[block.kind], group_size)
        )
        return {"codes": packed_size(count, block.bits), "scales": 2 * stats, "zeros": 2 * stats}
    itemsize = 2 if block.dtype is None else torch.empty(0, dtype=block.dtype).element_size()
    return {"data": count * itemsize}


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    try:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
    except TypeError as exc:
        raise CardFormatError(f"a card must be a contiguous byte buffer: {exc}") from exc
    return view


def _parse(data: bytes | bytearray | memoryview, *, verify: bool) -> _ParsedCard:
    view = _byte_view(data)
    size = view.nbytes
    if size < HEADER_SIZE:
        raise CardFormatError(f"truncated card: {size} bytes, the header alone takes {HEADER_SIZE}")
    magic, major, minor, header_len, meta_len, payload_len, digest = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CardFormatError(f"not a CacheCard: magic {magic!r}, expected {MAGIC!r}")
    if major not in READ_MAJORS:
        raise CardFormatError(
            f"unsupported CacheCard version {major}.{minor}: this reader reads "
            + " and ".join(f"{known}.x" for known in READ_MAJORS)
        )
    if not HEADER_SIZE <= header_len <= MAX_HEADER_SIZE:
        raise CardFormatError(f"card header_len {header_len} is outside {HEADER_SIZE}..{MAX_HEADER_SIZE}")
    if meta_len > MAX_METADATA_BYTES:
        raise CardFormatError(f"card metadata claims {meta_len} bytes, the limit is {MAX_METADATA_BYTES}")
    total = header_len + meta_len + payload_len
    if size < total:
        raise CardFormatError(f"truncated card: {size} bytes, its header announces {total}")
    if size > total:
        raise CardFormatError(f"card has {size - total} unexpected bytes after its payload")
    if verify:
        actual = hashlib.sha256(view[:_DIGEST_START])
        actual.update(view[_DIGEST_END:total])
        if not hmac.compare_digest(actual.digest(), digest):
            raise CardDigestError("card digest does not match its contents: the card is corrupted or altered")
    metadata = _unpack_metadata(view[header_len : header_len + meta_len])
    payload = view[header_len + meta_len : total]

    fingerprint = _parse_fingerprint(_field(metadata, "fingerprint"))
    heads, dim, num_layers = fingerprint.num_kv_heads, fingerprint.head_dim, fingerprint.num_layers
    rotation: Rotation = "none"
    if major == ROTATED_VERSION_MAJOR:
        value = _field(metadata, "rotation")
        if value == "none" or value not in ROTATIONS:
            raise CardFormatError(
                f"card metadata: rotation of a v{major} card must be one of "
                f"{', '.join(r for r in ROTATIONS if r != 'none')}, got {_short(value)}"
            )
        try:
            rotation = check_rotation(value, head_dim=dim)
        except ValueError as exc:
            raise CardFormatError(f"card metadata: {exc}") from exc
    tokens = _as_int(_field(metadata, "tokens"), "tokens", 1, MAX_TOKENS)
    runs = _parse_runs(_field(metadata, "positions"), tokens)
    template_prefix = _as_int(_field(metadata, "template_prefix_tokens"), "template_prefix_tokens", 0, tokens)
    group_size = _as_int(_field(metadata, "group_size"), "group_size", 1, MAX_GROUP_SIZE)
    num_classes = _as_int(_field(metadata, "num_classes"), "num_classes", 1, MAX_CLASSES)
    classes_value = _field(metadata, "classes")
    classes = None if classes_value is None else _as_section(classes_value, "classes", payload_len)
    meta = CardMeta(
        sender=_as_str(_field(metadata, "sender"), "sender"),
        created=_as_float(_field(metadata, "created"), "created"),
        facts=_as_str(_field(metadata, "facts"), "facts"),
        budget=_as_map(_field(metadata, "budget"), "budget"),
        extra=_as_map(_field(metadata, "extra"), "extra"),
    )
    counts = _class_counts(payload, classes, num_classes, tokens)

    block_values = _as_list(_field(metadata, "blocks"), "blocks")
    if len(block_values) > 2 * num_layers * num_classes:
        raise CardFormatError(
            f"card metadata: {len(block_values)} blocks is more than layers x classes allow"
        )
    blocks = tuple(
        _parse_block(value, index, num_layers=num_layers, num_classes=num_classes, payload_len=payload_len)
        for index, value in enumerate(block_values)
    )
    widths: dict[str, list[dict[int, int]]] = {kind: [{} for _ in range(num_layers)] for kind in _KINDS}
    spans: list[tuple[int, int, str]] = [] if classes is None else [(*classes, "classes")]
    fp16_bytes = 0
    for index, block in enumerate(blocks):
        class_tokens = counts[block.cls]
        if class_tokens == 0:
            raise CardFormatError(f"card: blocks[{index}] codes class {block.cls}, which has no tokens")
        for layer in block.layers:
            if block.cls in widths[block.kind][layer]:
                raise CardFormatError(
                    f"card: {block.kind} of layer {layer}, class {block.cls} appears in two blocks"
                )
            widths[block.kind][layer][block.cls] = block.bits
        for name, expected in _expected_lengths(block, heads, class_tokens, dim, group_size).items():
            offset, length = block.sections[name]
            if length != expected:
                raise CardFormatError(
                    f"card: blocks[{index}].{name} is {length} bytes, but its shape [{len(block.layers)}, "
                    f"{heads}, {class_tokens}, {dim}] at {block.bits} bits needs {expected}"
                )
            spans.append((offset, length, f"blocks[{index}].{name}"))
        fp16_bytes += 2 * len(block.layers) * heads * class_tokens * dim
    spans.sort()
    for (offset_a, length_a, name_a), (offset_b, _, name_b) in itertools.pairwise(spans):
        if offset_a + length_a > offset_b:
            raise CardFormatError(f"card: payload sections {name_a} and {name_b} overlap")
    present = {cls for cls, n in enumerate(counts) if n}
    tables: dict[str, tuple[tuple[int, ...], ...]] = {}
    for kind in _KINDS:
        rows: list[tuple[int, ...]] = []
        for layer, covered in enumerate(widths[kind]):
            if covered and set(covered) != present:
                raise CardFormatError(
                    f"card: {kind} of layer {layer} covers classes {sorted(covered)}, the tokens have "
                    f"classes {sorted(present)}"
                )
            rows.append(tuple(covered.get(cls, 0) for cls in range(num_classes)) if covered else ())
        tables[kind] = tuple(rows)

    digest_hex = bytes(digest).hex()
    last_start, last_length = runs[-1]
    info = CardInfo(
        card_id=digest_hex[:CARD_ID_CHARS],
        digest=digest_hex,
        digest_verified=verify,
        version=(major, minor),
        fingerprint=fingerprint,
        num_tokens=tokens,
        next_position=last_start + last_length,
        template_prefix_tokens=template_prefix,
        group_size=group_size,
        num_classes=num_classes,
        key_bits=tables["k"],
        value_bits=tables["v"],
        card_bytes=size,
        metadata_bytes=meta_len,
        payload_bytes=payload_len,
        fp16_bytes=fp16_bytes,
        meta=meta,
        rotation=rotation,
    )
    return _ParsedCard(info=info, blocks=blocks, runs=runs, classes=classes, payload=payload)


def read_card_info(data: bytes | bytearray | memoryview, *, verify: bool = False) -> CardInfo:
    """Id, version, fingerprint, sizes and text slots of a card, without decoding its tensors.

    Checks the header and validates the whole metadata against the payload size; hashes the payload only
    when ``verify`` is true (``decode_card`` always does). Raises :class:`CardFormatError` on bad input.
    """
    return _parse(data, verify=verify).info


# ---------------------------------------------------------------------------------------------------------
# Decoding


def _positions_tensor(runs: Sequence[tuple[int, int]], tokens: int) -> torch.Tensor:
    starts = torch.tensor([start for start, _ in runs], dtype=torch.int64)
    lengths = torch.tensor([length for _, length in runs], dtype=torch.int64)
    run_first_token = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(starts - run_first_token, lengths) + torch.arange(
        tokens, dtype=torch.int64
    )


def _decode_payload(parsed: _ParsedCard, device: torch.device, dtype: torch.dtype) -> KVSnapshot:
    info = parsed.info
    fingerprint = info.fingerprint
    heads, dim, tokens = fingerprint.num_kv_heads, fingerprint.head_dim, info.num_tokens
    # One copy of the payload into memory torch owns (frombuffer on read-only bytes would warn).
    if parsed.payload.nbytes:
        buffer = torch.frombuffer(bytearray(parsed.payload), dtype=torch.uint8)
    else:
        buffer = torch.empty(0, dtype=torch.uint8)
    classes = None
    if parsed.classes is not None:
        offset, length = parsed.classes
        classes = buffer[offset : offset + length]
    if device.type != "cpu":
        buffer = buffer.to(device)
    selections = _selections(classes, info.num_classes, tokens, device)
    positions = _positions_tensor(parsed.runs, tokens).to(device)
    rope = rope_table_for(fingerprint) if info.rotation == "hadamard-prerope" else None
    cos_sin: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per class, for pre-RoPE keys

    # One allocation per kind, handed out as per-layer views: many separately kept allocations of this size
    # each fault their pages in anew (measured 5x slower than writing into one block).
    stacked: dict[str, torch.Tensor] = {}
    slot: dict[str, dict[int, int]] = {}
    for kind in _KINDS:
        present = sorted({layer for block in parsed.blocks if block.kind == kind for layer in block.layers})
        stacked[kind] = torch.empty((len(present), heads, tokens, dim), dtype=dtype, device=device)
        slot[kind] = {layer: index for index, layer in enumerate(present)}
    for block in parsed.blocks:
        selection = selections[block.cls]
        if selection is None:  # _parse refuses blocks of empty classes
            raise CardFormatError(f"card block codes class {block.cls}, which has no tokens")
        shape = (len(block.layers), heads, selection.count, dim)
        slots = [slot[block.kind][layer] for layer in block.layers]
        # A block whose layers sit next to each other in the output is decoded with one call for all.
        if slots == list(range(slots[0], slots[0] + len(slots))):
            targets = [stacked[block.kind][slots[0] : slots[0] + len(slots)]]
        else:
            targets = [stacked[block.kind][index : index + 1] for index in slots]
        per_target = shape[0] // len(targets)

        def section(name: str, block: _Block = block) -> torch.Tensor:
            offset, length = block.sections[name]
            return buffer[offset : offset + length]

        if block.bits in QUANT_BITS:
            axis = _AXES[block.kind]
            stats = stats_shape(shape[1:], axis, info.group_size)
            codes = unpack_codes(section("codes"), block.bits, math.prod(shape)).view(shape)
            scales = section("scales").view(torch.float16).view(shape[0], *stats).float()
            zeros = section("zeros").view(torch.float16).view(shape[0], *stats).float()
            for number, out in enumerate(targets):
                part = slice(number * per_target, (number + 1) * per_target)
                region = selection.region(out)
                work = (
                    region
                    if region is not None
                    else torch.empty((*out.shape[:-2], selection.count, dim), dtype=dtype, device=device)
                )
                if info.rotation == "none":
                    dequantize_into(
                        work, codes[part], scales[part], zeros[part], group_size=info.group_size, axis=axis
                    )
                else:
                    if rope is not None and block.kind == "k" and block.cls not in cos_sin:
                        cos_sin[block.cls] = rope.cos_sin(selection.take(positions.view(-1, 1)).view(-1))
                    # Layer by layer through two reused float32 buffers (see from_code_space_into).
                    coded = torch.empty((1, *work.shape[1:]), dtype=torch.float32, device=device)
                    mixed = torch.empty_like(coded)
                    first = number * per_target
                    for layer in range(work.shape[0]):
                        at = slice(first + layer, first + layer + 1)
                        dequantize_into(
                            coded, codes[at], scales[at], zeros[at], group_size=info.group_size, axis=axis
                        )
                        from_code_space_into(
                            work[layer : layer + 1],
                            coded,
                            kind=block.kind,
                            rotation=info.rotation,
                            cos_sin=cos_sin.get(block.cls),
                            scratch=mixed,
                        )
                if region is None:
                    selection.put(out, work)
        else:
            stored = torch.float16 if block.dtype is None else block.dtype
            data = section("data").view(stored).view(shape)
            for number, out in enumerate(targets):
                selection.put(out, data[number * per_target : (number + 1) * per_target])

    layers = range(fingerprint.num_layers)
    return KVSnapshot(
        keys=tuple(stacked["k"][slot["k"][layer]] if layer in slot["k"] else None for layer in layers),
        values=tuple(stacked["v"][slot["v"][layer]] if layer in slot["v"] else None for layer in layers),
        positions=positions,
        fingerprint=fingerprint,
        template_prefix_tokens=info.template_prefix_tokens,
    )


def decode_card(
    data: bytes | bytearray | memoryview,
    *,
    expect: ModelFingerprint | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DecodedCard:
    """Verify and decode a card into a :class:`KVSnapshot` of ``dtype`` tensors on ``device``.

    Raises :class:`CardFormatError` (or its :class:`CardDigestError`) for malformed, truncated or corrupted
    bytes, and :class:`CardCompatError` when ``expect`` is given and the card was made by another model.
    Layers that were not sent come back as ``None``.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    target = torch.device(device)
    parsed = _parse(data, verify=True)
    if expect is not None:
        expect.require_same(parsed.info.fingerprint)
    try:
        snapshot = _decode_payload(parsed, target, dtype)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        if isinstance(exc, CardFormatError):
            raise
        # _parse validated every size; this is the boundary's guarantee that no raw torch error escapes.
        raise CardFormatError(f"card payload could not be decoded: {exc}") from exc
    return DecodedCard(snapshot=snapshot, meta=parsed.info.meta, info=parsed.info)
