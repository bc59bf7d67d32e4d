"""Adapter between transformers' KV cache and :class:`~qkv._kv.KVSnapshot`.

Every use of transformers' cache and attention API lives in this module (``DynamicCache``,
``cache.layers[i].keys`` / ``.values``, ``position_ids``, ``logits_to_keep``, ``AttentionInterface``), so a
transformers upgrade touches one file. Written against transformers 5.23.

Contracts:

* :func:`prefill` runs one forward over the sender's prefix and returns its KV per layer
  (``[kv_heads, tokens, head_dim]``, on the model's device) with positions ``0..T-1`` (int64, CPU).
* :func:`build_cache` injects a snapshot into a fresh ``DynamicCache``; the receiver then runs only its own
  suffix. Positions come from the snapshot, never from the cache length: transformers numbers new tokens
  ``cache length + arange`` by default, which is wrong once tokens were evicted, so every forward here passes
  explicit ``position_ids`` (suffix at ``snapshot.next_position + arange``). The attention mask stays in
  cache-index space (every cached token is visible), so a snapshot with non-contiguous positions means
  "these tokens, at these positions"; the evicted ones are simply absent.
* Generation is greedy and runs the same loop for the ``kv`` and ``text`` conditions, so an uncompressed
  snapshot gives the same tokens as prefilling the text.
* :func:`extend_snapshot` prefills more tokens on top of a snapshot at their true positions
  (``next_position + arange``) and returns the longer snapshot: ``extend(prefill(a), b)`` equals
  ``prefill(a + b)``. It needs every layer (a relay forwards the whole cache).

Layer selection (snapshots with ``None`` layers; :func:`generate_from_snapshot` and :func:`answer_logprobs`
accept them, :func:`build_cache` and :func:`extend_snapshot` refuse them with :class:`CardCompatError`):
in an unsent layer the receiver's tokens attend to the card's template tokens (its first
``template_prefix_tokens``, the prompt head) and to their own tokens, causally, exactly as if the context
were absent from that layer; sent layers see context and own tokens. The template tokens' KV there is the
receiver's own (:func:`_own_template_kv`: the head comes first and attention is causal, so it equals the
sender's): without it, an unsent layer had no attention-sink tokens at all, and half the layers sent was
worse than no context (SmolLM2-135M, 12 HotpotQA rows, KL vs text 4.9 with the old selection, 2.2 with this;
no context 2.8). transformers builds one mask from one layer's length for every layer, so every layer must
hold the same number of tokens: unsent layers hold zero placeholders for the rest of the context (receiver
memory is that of a full cache). For those calls the model runs :data:`RECEIVER_ONLY_ATTENTION`, an SDPA
wrapper registered with transformers' ``AttentionInterface`` (and the SDPA mask with
``AttentionMaskInterface``): in the layers named by a per-forward :class:`_ReceiverOnly` keyword it cuts
keys, values and mask to the template columns and the receiver's own columns, so the placeholders are never
read and the causal mask among own tokens is the one transformers built; every other layer gets SDPA
unchanged (also on a model loaded with eager attention). The switch is made only for snapshots with ``None``
layers, for the call, and restored after; with every layer sent nothing changes. A snapshot whose layers are
all ``None`` is accepted and answers as the bare prompt (template head, then the receiver's tokens) would.

:func:`prefill_observed` also returns the attention probabilities of the prefix's last ``window`` tokens
(for attention-based token statistics); :func:`prefill_reread` the attention paid while the model re-reads
the context (question-agnostic importance that does not favour the context's end). SDPA does not return
attention weights, so those forwards run with eager attention, switched on for them only. Both switches
change the model's configuration: do not run other forwards on the same model from another thread meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ._errors import CardCompatError
from ._kv import KVSnapshot, ModelFingerprint

if TYPE_CHECKING:
    from ._modelstore import LoadedModel

__all__ = [
    "RECEIVER_ONLY_ATTENTION",
    "Generation",
    "answer_logprobs",
    "build_cache",
    "extend_snapshot",
    "fingerprint_of",
    "generate_from_snapshot",
    "generate_from_text",
    "prefill",
    "prefill_observed",
    "prefill_reread",
]

DEFAULT_MAX_NEW_TOKENS = 24


@dataclass(frozen=True, kw_only=True)
class Generation:
    """One greedy answer. ``token_ids`` includes the token that stopped generation, if any."""

    token_ids: tuple[int, ...]
    text: str
    ttft_s: float  # wall time from the start of prefill (text) or injection (kv) to the first new token
    total_s: float  # wall time from the same start to the last new token

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


# ---------------------------------------------------------------------------------------------- fingerprint


def fingerprint_of(model: Any, tokenizer: Any) -> ModelFingerprint:
    """What a receiver must share with a sender: attention geometry, RoPE and the exact vocabulary."""
    config = model.config.get_text_config(decoder=True)
    num_heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // num_heads
    rope_theta, rope_params = _rope_of(config)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    vocab_blob = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode()
    return ModelFingerprint(
        architecture=str(config.model_type),
        num_layers=int(config.num_hidden_layers),
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or num_heads),
        head_dim=int(head_dim),
        rope_theta=rope_theta,
        rope_params=rope_params,
        tokenizer_hash=hashlib.sha256(vocab_blob).hexdigest(),
    )


def _rope_of(config: Any) -> tuple[float, str]:
    """(theta of the full-attention layers, canonical JSON of every other RoPE parameter or "")."""
    params = getattr(config, "rope_parameters", None)
    rest: dict[str, Any]
    if not isinstance(params, dict):
        return float(getattr(config, "rope_theta", 10000.0)), ""
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        # Per-layer-type RoPE (Gemma 3: local and global layers differ); theta of the global layers is the
        # headline number, everything else goes into the canonical JSON.
        rest = {kind: dict(value) for kind, value in params.items() if isinstance(value, dict)}
        theta = float(rest["full_attention"].pop("rope_theta", 10000.0))
    else:
        rest = dict(params)
        theta = float(rest.pop("rope_theta", getattr(config, "rope_theta", 10000.0)))
        if rest.get("rope_type") == "default":
            del rest["rope_type"]
    return theta, json.dumps(rest, sort_keys=True) if rest else ""


# ---------------------------------------------------------------------------------------- extract / inject


def prefill(lm: LoadedModel, prefix_ids: Sequence[int], *, template_prefix_tokens: int = 0) -> KVSnapshot:
    """One forward over ``prefix_ids``; the snapshot holds every layer's KV and positions ``0..T-1``."""
    if len(prefix_ids) == 0:
        raise ValueError("prefix_ids is empty: there is nothing to prefill")
    # A cache without a config makes every layer a full DynamicLayer, so sliding-window layers (Gemma 3) keep
    # all tokens too and the snapshot has one token axis for all layers; the sliding mask still applies.
    cache = DynamicCache()
    positions = torch.arange(len(prefix_ids), dtype=torch.int64)
    _forward(lm, prefix_ids, positions, cache, logits_to_keep=1)
    keys, values = _cache_tensors(lm, cache, expected_tokens=len(prefix_ids))
    return KVSnapshot(
        keys=keys,
        values=values,
        positions=positions,
        fingerprint=lm.fingerprint,
        template_prefix_tokens=template_prefix_tokens,
    )


def extend_snapshot(lm: LoadedModel, snapshot: KVSnapshot, new_ids: Sequence[int]) -> KVSnapshot:
    """``snapshot`` followed by ``new_ids``, prefilled on top of it at positions ``next_position + arange``.

    The result holds the snapshot's tokens (KV cast to the model's dtype and device) and then the new ones;
    its positions are the snapshot's followed by the new tokens'. ``template_prefix_tokens`` and ``extra``
    are kept. Empty ``new_ids`` returns the snapshot itself. Raises :class:`CardCompatError` for a snapshot
    from another model, with malformed shapes, or with ``None`` layers: the new tokens' KV in the sent layers
    would depend on layers that never saw the context, so a relay forwards only complete caches.
    """
    layers = _require_every_layer(
        _checked_layers(lm, snapshot), "extending it needs every layer (a relay forwards the whole cache)"
    )
    if len(new_ids) == 0:
        return snapshot
    # Full layers (no config), as in prefill, so sliding-window layers keep every token of the extension.
    cache = _filled_cache(lm, layers, DynamicCache())
    positions = snapshot.next_position + torch.arange(len(new_ids), dtype=torch.int64)
    _forward(lm, new_ids, positions, cache, logits_to_keep=1)
    keys, values = _cache_tensors(lm, cache, expected_tokens=snapshot.num_tokens + len(new_ids))
    return KVSnapshot(
        keys=keys,
        values=values,
        positions=torch.cat([snapshot.positions, positions]),
        fingerprint=snapshot.fingerprint,
        template_prefix_tokens=snapshot.template_prefix_tokens,
        extra=dict(snapshot.extra),
    )


def _cache_tensors(
    lm: LoadedModel, cache: DynamicCache, *, expected_tokens: int
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Every layer's (keys, values) without the batch axis; each layer must hold ``expected_tokens``."""
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for index, layer in enumerate(cache.layers):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise RuntimeError(f"cache layer {type(layer).__name__} holds no key/value tensors")
        if k.shape[-2] != expected_tokens:
            raise RuntimeError(f"cache layer {index} holds {k.shape[-2]} tokens, expected {expected_tokens}")
        keys.append(k[0])
        values.append(v[0])
    if len(keys) != lm.fingerprint.num_layers:
        raise RuntimeError(f"cache has {len(keys)} layers, model has {lm.fingerprint.num_layers}")
    return tuple(keys), tuple(values)


def prefill_observed(
    lm: LoadedModel, prefix_ids: Sequence[int], *, window: int, template_prefix_tokens: int = 0
) -> tuple[KVSnapshot, torch.Tensor]:
    """:func:`prefill`, plus the attention the last ``window`` prefix tokens paid to every prefix token.

    The attention is float32 ``[layers, query_heads, window, T]`` on CPU (probabilities; each row sums to 1;
    ``window`` is capped at ``T``). The snapshot is exactly :func:`prefill`'s: the window is re-run on top of
    the KV of the tokens before it, with eager attention, only to read its attention rows.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    snapshot = prefill(lm, prefix_ids, template_prefix_tokens=template_prefix_tokens)
    start = max(snapshot.num_tokens - window, 0)
    # Full layers for every layer type (as in prefill), so each layer's rows cover all T tokens.
    cache = DynamicCache()
    for index, (k, v) in enumerate(zip(snapshot.keys, snapshot.values, strict=True)):
        if k is None or v is None:  # prefill fills every layer
            raise RuntimeError(f"prefill left layer {index} empty")
        cache.update(k[:, :start].unsqueeze(0), v[:, :start].unsqueeze(0), index)
    ids = torch.tensor([list(prefix_ids[start:])], dtype=torch.int64, device=lm.device)
    with _attention_implementation(lm.model, "eager"), torch.no_grad():
        out = lm.model(
            input_ids=ids,
            position_ids=snapshot.positions[start:].to(device=lm.device).unsqueeze(0),
            past_key_values=cache,
            use_cache=True,
            output_attentions=True,
            logits_to_keep=1,
        )
    attentions = torch.stack([layer[0].float() for layer in out.attentions]).cpu()
    return snapshot, attentions


#: The receiver-side question a sender asks its own model to make it re-read the context
#: (:func:`prefill_reread`); the prompt template wraps it like any question.
REREAD_INSTRUCTION = "Repeat the context word for word."
#: Re-read context tokens per forward in :func:`prefill_reread`: bounds the eager attention tensors to
#: ``layers * heads * chunk * (2 T)`` floats.
REREAD_CHUNK = 64


def prefill_reread(
    lm: LoadedModel,
    prefix_ids: Sequence[int],
    *,
    context_span: tuple[int, int],
    template_prefix_tokens: int = 0,
) -> tuple[KVSnapshot, torch.Tensor]:
    """:func:`prefill`, plus how much attention each prefix token gets while the model re-reads the context.

    Question-agnostic token importance (KVzip's idea): after the prefix, the template's question turn asks to
    repeat the context (:data:`REREAD_INSTRUCTION`) and the context tokens ``prefix_ids[start:end]`` follow as
    the answer, teacher-forced. Every context token is then a query, and a prefix token that the model needs
    in order to reproduce the context receives attention from it; the last-tokens window of
    :func:`prefill_observed` sees mostly nearby tokens and the attention sinks. Returns the snapshot (exactly
    :func:`prefill`'s) and float32 ``[layers, query_heads, 1, T]`` on CPU: the mean over the re-read queries
    of the attention they paid to the ``T`` prefix tokens (a row sums to at most 1; the rest went to the
    instruction and the re-read tokens). Costs about one more prefill of the context.
    """
    start, end = context_span
    if not 0 <= start < end <= len(prefix_ids):
        raise ValueError(
            f"context span {context_span} is empty or outside the {len(prefix_ids)} prefix tokens"
        )
    snapshot = prefill(lm, prefix_ids, template_prefix_tokens=template_prefix_tokens)
    tokens = snapshot.num_tokens
    cache = DynamicCache()  # full layers, as in prefill: every layer's rows cover all T tokens
    for index, (k, v) in enumerate(zip(snapshot.keys, snapshot.values, strict=True)):
        if k is None or v is None:  # prefill fills every layer
            raise RuntimeError(f"prefill left layer {index} empty")
        cache.update(k.unsqueeze(0), v.unsqueeze(0), index)
    instruction = list(lm.template.split(lm.tokenizer, "", REREAD_INSTRUCTION).suffix_ids)
    position = tokens
    _forward(lm, instruction, torch.arange(position, position + len(instruction)), cache, logits_to_keep=1)
    position += len(instruction)
    reread = list(prefix_ids[start:end])
    sums: list[torch.Tensor] = []
    with _attention_implementation(lm.model, "eager"), torch.no_grad():
        for first in range(0, len(reread), REREAD_CHUNK):
            chunk = reread[first : first + REREAD_CHUNK]
            out = lm.model(
                input_ids=torch.tensor([chunk], dtype=torch.int64, device=lm.device),
                position_ids=torch.arange(position, position + len(chunk), device=lm.device).unsqueeze(0),
                past_key_values=cache,
                use_cache=True,
                output_attentions=True,
                logits_to_keep=1,
            )
            position += len(chunk)
            # [layers, heads, tokens]: this chunk's attention to the prefix, summed over its queries
            sums.append(torch.stack([layer[0, :, :, :tokens].float().sum(dim=1) for layer in out.attentions]))
    mean = torch.stack(sums).sum(dim=0) / len(reread)
    return snapshot, mean.unsqueeze(2).cpu()


@contextlib.contextmanager
def _attention_implementation(model: Any, name: str) -> Iterator[None]:
    """Run the model with attention implementation ``name`` for the duration of the block, then restore it."""
    # `config._attn_implementation` is how transformers itself reads the current implementation.
    previous = model.config._attn_implementation
    if previous == name:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def build_cache(lm: LoadedModel, snapshot: KVSnapshot) -> DynamicCache:
    """A ``DynamicCache`` holding the snapshot's KV on the model's device and dtype.

    Raises :class:`CardCompatError` if the snapshot was made by another model, lacks layers, or its shapes
    do not match this model. A snapshot with ``None`` layers is refused here: a plain cache cannot express
    "no context in this layer" (:func:`generate_from_snapshot` and :func:`answer_logprobs` can).
    """
    layers = _require_every_layer(
        _checked_layers(lm, snapshot),
        "a plain cache needs every layer (generate_from_snapshot and answer_logprobs accept layer selection)",
    )
    return _filled_cache(lm, layers, DynamicCache(config=lm.model.config))


def _filled_cache(
    lm: LoadedModel, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], cache: DynamicCache
) -> DynamicCache:
    dtype = _model_dtype(lm)
    for index, (k, v) in enumerate(layers):
        cache.update(
            k.to(device=lm.device, dtype=dtype).unsqueeze(0),
            v.to(device=lm.device, dtype=dtype).unsqueeze(0),
            index,
        )
    return cache


def _injected_cache(lm: LoadedModel, snapshot: KVSnapshot) -> tuple[DynamicCache, _Receiver]:
    """The snapshot in a ``DynamicCache`` and what the receiver's forwards must know about it.

    Unsent layers hold the receiver's own KV of the card's template tokens (the first
    ``template_prefix_tokens``; see :func:`_own_template_kv`) and zero placeholders for the rest.
    """
    layers = _checked_layers(lm, snapshot)
    unsent = frozenset(index for index, layer in enumerate(layers) if layer is None)
    shared = snapshot.template_prefix_tokens if unsent else 0
    if unsent:
        fp = lm.fingerprint
        dtype = _model_dtype(lm)
        own_template = _own_template_kv(lm, snapshot.positions[:shared])
        filled: list[tuple[torch.Tensor, torch.Tensor]] = []
        for index, layer in enumerate(layers):
            if layer is not None:
                filled.append(layer)
                continue
            # The placeholders are never read (receiver-only attention cuts them off); they only give every
            # layer the same length.
            shape = (fp.num_kv_heads, snapshot.num_tokens, fp.head_dim)
            k = torch.zeros(shape, dtype=dtype, device=lm.device)
            v = torch.zeros(shape, dtype=dtype, device=lm.device)
            if shared:
                k[:, :shared] = own_template[index][0]
                v[:, :shared] = own_template[index][1]
            filled.append((k, v))
    else:
        filled = [layer for layer in layers if layer is not None]
    receiver = _Receiver(unsent=unsent, context_tokens=snapshot.num_tokens, shared_prefix=shared)
    return _filled_cache(lm, filled, DynamicCache(config=lm.model.config)), receiver


def _own_template_kv(lm: LoadedModel, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The receiver's own KV, per layer, of its prompt template's head tokens at ``positions``.

    Attention is causal and the template head comes first, so these tokens' KV does not depend on the
    context: a prefill of the head alone gives, in every layer, exactly what the sender computed for them.
    In a layer the card did not send, they are the attention sinks (models park much of their attention on
    the first tokens) and the instructions the receiver's tokens would otherwise lose there.
    """
    if positions.numel() == 0:
        return [(torch.empty(0), torch.empty(0)) for _ in range(lm.fingerprint.num_layers)]
    bare = lm.template.split(lm.tokenizer, "", "")
    head_tokens = bare.template_prefix_tokens
    last = int(positions[-1].item())
    if last >= head_tokens:
        raise CardCompatError(
            f"the card's template tokens reach position {last}, this receiver's template head has "
            f"{head_tokens} tokens: the card was made with another prompt template"
        )
    head = prefill(lm, bare.prefix_ids[:head_tokens])
    index = positions.to(device=lm.device, dtype=torch.int64)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for k, v in zip(head.keys, head.values, strict=True):
        if k is None or v is None:  # prefill fills every layer
            raise RuntimeError("prefill left a layer empty")
        out.append((k[:, index], v[:, index]))
    return out


def _checked_layers(lm: LoadedModel, snapshot: KVSnapshot) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """The snapshot's (keys, values) per layer (``None`` for an unsent layer), after checking it fits."""
    fp = lm.fingerprint
    fp.require_same(snapshot.fingerprint)
    if snapshot.num_layers != fp.num_layers:
        raise CardCompatError(f"snapshot has {snapshot.num_layers} layers, this model has {fp.num_layers}")
    positions = snapshot.positions
    if positions.dtype != torch.int64 or positions.dim() != 1:
        raise CardCompatError(
            f"positions must be a 1-D int64 tensor, got {positions.dtype} {tuple(positions.shape)}"
        )
    if positions.numel() and (positions[0] < 0 or bool((positions[1:] <= positions[:-1]).any())):
        raise CardCompatError("positions must be non-negative and strictly increasing")
    expected = (fp.num_kv_heads, snapshot.num_tokens, fp.head_dim)
    layers: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for index, (k, v) in enumerate(zip(snapshot.keys, snapshot.values, strict=True)):
        if k is None and v is None:
            layers.append(None)
            continue
        if k is None or v is None:
            raise CardCompatError(f"layer {index} has {'values' if k is None else 'keys'} but no partner")
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise CardCompatError(
                f"layer {index}: KV shapes {tuple(k.shape)}/{tuple(v.shape)} do not match {expected} "
                "[kv_heads, tokens, head_dim]"
            )
        layers.append((k, v))
    return layers


def _require_every_layer(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor] | None], why: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    missing = [index for index, layer in enumerate(layers) if layer is None]
    if missing:
        raise CardCompatError(f"snapshot has no KV for {len(missing)} layer(s) ({missing[:8]}): {why}")
    return [layer for layer in layers if layer is not None]


# ------------------------------------------------------------------------------------ receiver-only layers

#: Attention implementation that runs the layers a snapshot did not send over the receiver's tokens only.
RECEIVER_ONLY_ATTENTION = "edgebus_receiver_only_sdpa"
# Keyword through which each forward tells the attention function which layers are receiver-only:
# transformers hands a model forward's extra keywords down to the attention function of every layer.
_RECEIVER_ONLY_KWARG = "edgebus_receiver_only"


@dataclass(frozen=True, kw_only=True)
class _ReceiverOnly:
    """One forward's instruction to :func:`_receiver_only_sdpa`."""

    layers: frozenset[int]  # layer indices that attend to the receiver's own tokens only
    own_tokens: int  # receiver tokens in the cache once this forward's tokens are appended
    shared_prefix: int = 0  # leading cache columns that hold the receiver's own template KV there too
    total_tokens: int = 0  # cache columns of a layer that keeps every token, once this forward's are appended


def _receiver_only_sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' SDPA attention, except in the layers a :class:`_ReceiverOnly` keyword names.

    There keys, values and mask keep only their last ``own_tokens`` columns: the cache holds the context
    (placeholders) first and the receiver's tokens last, and the mask transformers built is causal in
    cache-index space, bottom-right aligned, so its last columns are the causal mask among the receiver's
    own tokens. In decode steps the mask is ``None`` (one query sees every key it is given), which stays
    right after the cut. Without the keyword this is SDPA with the same arguments.
    """
    receiver_only = kwargs.pop(_RECEIVER_ONLY_KWARG, None)
    layer = getattr(module, "layer_idx", None)
    if isinstance(receiver_only, _ReceiverOnly) and layer in receiver_only.layers:
        columns = key.shape[-2]
        keep = min(receiver_only.own_tokens, columns)
        # A layer that dropped old tokens (sliding window) no longer holds the template at its head.
        shared = receiver_only.shared_prefix if columns == receiver_only.total_tokens else 0
        shared = min(shared, columns - keep)
        if attention_mask is None and query.shape[-2] > 1:
            # SDPA's causal flag aligns top-left: right only when the own tokens are all the keys.
            attention_mask = _causal_tail_mask(query.shape[-2], columns, query.device)
        key = _first_and_last(key, shared, keep, dim=-2)
        value = _first_and_last(value, shared, keep, dim=-2)
        if attention_mask is not None:
            attention_mask = _first_and_last(attention_mask, shared, keep, dim=-1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _first_and_last(x: torch.Tensor, first: int, last: int, *, dim: int) -> torch.Tensor:
    """The first ``first`` and the last ``last`` entries of ``x`` along ``dim`` (they must not overlap)."""
    tail = x.narrow(dim, x.shape[dim] - last, last)
    return torch.cat([x.narrow(dim, 0, first), tail], dim=dim) if first else tail


def _causal_tail_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[1, 1, queries, keys]``: the queries are the last keys; each sees the keys up to itself."""
    rows = torch.arange(queries, device=device)[:, None] + (keys - queries)
    return (torch.arange(keys, device=device)[None, :] <= rows)[None, None]


# Registered under our own name (never replacing "sdpa"); a model uses it only inside
# `_attention_implementation(model, RECEIVER_ONLY_ATTENTION)`. The mask is SDPA's (boolean, or None where
# SDPA's causal flag suffices): without a registered mask, transformers would build no mask at all.
AttentionInterface.register(RECEIVER_ONLY_ATTENTION, _receiver_only_sdpa)
AttentionMaskInterface.register(RECEIVER_ONLY_ATTENTION, sdpa_mask)


def _receiver_only_scope(lm: LoadedModel, unsent: frozenset[int]) -> contextlib.AbstractContextManager[None]:
    """Receiver-only attention while ``unsent`` layers exist; otherwise the model as it is."""
    if not unsent:
        return contextlib.nullcontext()
    return _attention_implementation(lm.model, RECEIVER_ONLY_ATTENTION)


# ---------------------------------------------------------------------------------------------- generation


def generate_from_snapshot(
    lm: LoadedModel,
    snapshot: KVSnapshot,
    suffix_ids: Sequence[int],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> Generation:
    """Greedy answer continuing from an injected snapshot, prefilling only ``suffix_ids``.

    ``None`` layers in the snapshot run over the receiver's own tokens only (module docstring).
    ``ttft_s`` covers the cache build (device copy and dtype cast) and the suffix forward.
    """
    _require_suffix(suffix_ids)
    start = time.perf_counter()
    cache, receiver = _injected_cache(lm, snapshot)
    positions = snapshot.next_position + torch.arange(len(suffix_ids), dtype=torch.int64)
    with _receiver_only_scope(lm, receiver.unsent):
        return _greedy(
            lm, cache, suffix_ids, positions, max_new_tokens=max_new_tokens, start=start, receiver=receiver
        )


def generate_from_text(
    lm: LoadedModel,
    prefix_ids: Sequence[int],
    suffix_ids: Sequence[int],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> Generation:
    """The re-prefill baseline: one forward over prefix and suffix, then the same greedy loop."""
    _require_suffix(suffix_ids)
    start = time.perf_counter()
    ids = [*prefix_ids, *suffix_ids]
    cache = DynamicCache(config=lm.model.config)
    positions = torch.arange(len(ids), dtype=torch.int64)
    return _greedy(lm, cache, ids, positions, max_new_tokens=max_new_tokens, start=start)


def answer_logprobs(
    lm: LoadedModel,
    snapshot: KVSnapshot | None,
    suffix_ids: Sequence[int],
    target_ids: Sequence[int],
    prefix_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """Teacher-forced log-probabilities along ``target_ids``: float32 ``[len(target), vocab]`` on CPU.

    Row ``i`` is the distribution that predicts ``target_ids[i]``. With a snapshot the receiver prefills only
    ``suffix_ids + target_ids[:-1]`` on top of it (``None`` layers as in :func:`generate_from_snapshot`);
    with ``snapshot=None`` the whole text (``prefix_ids + suffix_ids + target_ids[:-1]``) is prefilled, for
    the text-condition reference.
    """
    _require_suffix(suffix_ids)
    if len(target_ids) == 0:
        raise ValueError("target_ids is empty")
    teacher = [*suffix_ids, *target_ids[:-1]]
    receiver: _Receiver | None = None
    if snapshot is not None:
        if prefix_ids is not None:
            raise ValueError("pass either a snapshot or prefix_ids, not both")
        cache, receiver = _injected_cache(lm, snapshot)
        positions = snapshot.next_position + torch.arange(len(teacher), dtype=torch.int64)
    else:
        if prefix_ids is None:
            raise ValueError("without a snapshot, prefix_ids is required")
        teacher = [*prefix_ids, *teacher]
        cache = DynamicCache(config=lm.model.config)
        positions = torch.arange(len(teacher), dtype=torch.int64)
    with _receiver_only_scope(lm, receiver.unsent if receiver is not None else frozenset()):
        logits = _forward(lm, teacher, positions, cache, logits_to_keep=len(target_ids), receiver=receiver)
    return torch.log_softmax(logits.float(), dim=-1).cpu()


@dataclass(frozen=True, kw_only=True)
class _Receiver:
    """What the forwards on top of an injected snapshot must know about it."""

    unsent: frozenset[int]  # layers whose KV the snapshot lacks (receiver-only attention there)
    context_tokens: int  # tokens of the snapshot at the head of the cache
    shared_prefix: int = 0  # leading tokens whose KV the receiver computed itself in the unsent layers


def _greedy(
    lm: LoadedModel,
    cache: DynamicCache,
    input_ids: Sequence[int],
    positions: torch.Tensor,
    *,
    max_new_tokens: int,
    start: float,
    receiver: _Receiver | None = None,
) -> Generation:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    tokenizer = lm.tokenizer
    stop_at_newline = lm.template.stop_at_newline
    logits = _forward(lm, input_ids, positions, cache, logits_to_keep=1, receiver=receiver)
    next_position = int(positions[-1].item()) + 1
    tokens: list[int] = []
    ttft = 0.0
    seen_text = False
    while True:
        token = int(logits[-1].argmax().item())
        if not tokens:
            ttft = time.perf_counter() - start
        tokens.append(token)
        if token in lm.stop_token_ids or len(tokens) >= max_new_tokens:
            break
        if next_position >= max_positions(lm):  # the answer ends where the model's positions do
            break
        piece = tokenizer.decode([token])
        # An answer is one line, but a leading newline before any text is not the end of it.
        if stop_at_newline and "\n" in piece and (seen_text or piece.split("\n", 1)[0].strip()):
            break
        seen_text = seen_text or bool(piece.strip())
        logits = _forward(
            lm, [token], torch.tensor([next_position]), cache, logits_to_keep=1, receiver=receiver
        )
        next_position += 1
    total = time.perf_counter() - start
    return Generation(token_ids=tuple(tokens), text=_answer_text(lm, tokens), ttft_s=ttft, total_s=total)


def _answer_text(lm: LoadedModel, tokens: Sequence[int]) -> str:
    kept = [t for t in tokens if t not in lm.stop_token_ids]
    text = str(lm.tokenizer.decode(kept, skip_special_tokens=True)).strip()
    if lm.template.stop_at_newline:
        text = text.split("\n", 1)[0].strip()
    return text


def _forward(
    lm: LoadedModel,
    input_ids: Sequence[int],
    positions: torch.Tensor,
    cache: DynamicCache,
    *,
    logits_to_keep: int,
    receiver: _Receiver | None = None,
) -> torch.Tensor:
    """Logits ``[logits_to_keep, vocab]`` of a forward that appends ``input_ids`` at ``positions``.

    Raises ``ValueError`` for a position the model has no embedding for: contexts come from peers, and a
    quarter-million-token prefill would hold the model thread for minutes to produce noise.
    """
    limit = max_positions(lm)
    if len(positions) and int(positions.max()) >= limit:
        raise ValueError(f"position {int(positions.max())} is beyond this model's {limit} positions")
    ids = torch.tensor([list(input_ids)], dtype=torch.int64, device=lm.device)
    extra: dict[str, Any] = {}
    if receiver is not None and receiver.unsent:
        if lm.model.config._attn_implementation != RECEIVER_ONLY_ATTENTION:
            # Any other implementation ignores the keyword and would attend to the zero placeholders.
            raise RuntimeError("a snapshot with unsent layers needs receiver-only attention switched on")
        # The cache length counts every token seen, in full and in sliding-window layers alike.
        total = cache.get_seq_length() + len(input_ids)
        extra[_RECEIVER_ONLY_KWARG] = _ReceiverOnly(
            layers=receiver.unsent,
            own_tokens=total - receiver.context_tokens,
            shared_prefix=receiver.shared_prefix,
            total_tokens=total,
        )
    with torch.no_grad():
        out = lm.model(
            input_ids=ids,
            position_ids=positions.to(device=lm.device).unsqueeze(0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **extra,
        )
    logits: torch.Tensor = out.logits[0]
    return logits


def max_positions(lm: LoadedModel) -> int:
    """Positions the model was trained for (``max_position_embeddings``; unbounded if it names none)."""
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else 1 << 62


def _model_dtype(lm: LoadedModel) -> torch.dtype:
    dtype: torch.dtype = lm.model.dtype
    return dtype


def _require_suffix(suffix_ids: Sequence[int]) -> None:
    if len(suffix_ids) == 0:
        raise ValueError("suffix_ids is empty: the receiver needs at least one token of its own")
