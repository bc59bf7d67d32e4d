"""qkv: KV caches of Hugging Face causal LMs as compressed, self-contained CacheCards.

Sender: ``encode_context(lm, context, Budget(...))`` prefills a context and writes a card. Receiver:
``answer_from_card(lm, card_bytes, question)`` verifies the card against its own model and answers with only
the question's tokens. Split hand-off: ``encode_split(..., head_tokens=h)`` writes a card holding the KV of
the tokens after the first ``h`` and the ids of those ``h``; the receiver prefills that head itself
(``prefill_head``, possibly while the card is in flight) and answers with ``answer_from_card(..., head=)``.
Another model: ``encode_context(..., translate=calibration, translate_at="receiver"|"sender")`` names the
``CrossModelCalibration`` in the card; ``answer_from_card(..., calibrations=[...])`` translates it or
refuses with a ``CardCompatError`` naming the calibration it lacks.
Lower-level pieces (quantization plan, card codec, eviction, allocation, facts) are exported for benchmarks
and tools. Imports torch and transformers; never zmq or asyncio.
"""

from ._allocate import Allocation, SensitivityProfile, allocate_bits, width_cost
from ._budget import Budget
from ._calibrate import (
    CalibrationItem,
    card_roundtrip,
    default_profile,
    predicted_distortion,
    profile_filename,
    profile_sensitivity,
    profiles_dir,
)
from ._card import CardInfo, CardMeta, DecodedCard, EncodingPlan, decode_card, encode_card, read_card_info
from ._crossmodel import (
    CrossModelCalibration,
    CrossModelRecord,
    ModelSide,
    TranslateAt,
    calibrate_pair,
    crossmodel_record,
    join_receiver_head,
    receiver_suffix_ids,
    require_calibration,
    translate_snapshot,
)
from ._errors import (
    CalibrationError,
    CardCompatError,
    CardDigestError,
    CardError,
    CardFormatError,
    ModelCorruptError,
    ModelNotPulledError,
    ModelStoreError,
    QkvError,
    StoreSpaceError,
    UnknownModelError,
)
from ._evict import evict, orthogonal_backfill, select_tokens
from ._facts import Fact, Facts, extract_facts
from ._hf import (
    RECEIVER_ONLY_ATTENTION,
    Generation,
    answer_logprobs,
    build_cache,
    extend_snapshot,
    fingerprint_of,
    generate_from_snapshot,
    generate_from_text,
    prefill,
    prefill_observed,
    prefill_reread,
)
from ._importance import (
    attention_mass_by_class,
    class_bits_for_budget,
    head_importance,
    token_classes,
    token_importance,
)
from ._kv import KVSnapshot, ModelFingerprint
from ._layers import layer_scores, select_layers
from ._modelstore import (
    CATALOGUE,
    DEFAULT_MODEL,
    CatalogueEntry,
    LoadedModel,
    StoredModel,
    list_models,
    load_model,
    model_dir,
    models_dir,
    pull_model,
)
from ._pipeline import (
    CardAnswer,
    EncodedContext,
    Observation,
    ReceivedCard,
    answer_from_card,
    answer_from_text,
    calibration_for_card,
    encode_context,
    encode_observation,
    encode_split,
    encode_split_observation,
    needs_attention,
    observe,
    receive_card,
)
from ._prompt import PromptParts, PromptTemplate
from ._rotation import ROTATIONS, Rotation
from ._split import SplitHead, attach_head, prefill_head, split_head, tail_observation

__all__ = [
    "CATALOGUE",
    "DEFAULT_MODEL",
    "RECEIVER_ONLY_ATTENTION",
    "ROTATIONS",
    "Allocation",
    "Budget",
    "CalibrationError",
    "CalibrationItem",
    "CardAnswer",
    "CardCompatError",
    "CardDigestError",
    "CardError",
    "CardFormatError",
    "CardInfo",
    "CardMeta",
    "CatalogueEntry",
    "CrossModelCalibration",
    "CrossModelRecord",
    "DecodedCard",
    "EncodedContext",
    "EncodingPlan",
    "Fact",
    "Facts",
    "Generation",
    "KVSnapshot",
    "LoadedModel",
    "ModelCorruptError",
    "ModelFingerprint",
    "ModelNotPulledError",
    "ModelSide",
    "ModelStoreError",
    "Observation",
    "PromptParts",
    "PromptTemplate",
    "QkvError",
    "ReceivedCard",
    "Rotation",
    "SensitivityProfile",
    "SplitHead",
    "StoreSpaceError",
    "StoredModel",
    "TranslateAt",
    "UnknownModelError",
    "allocate_bits",
    "answer_from_card",
    "answer_from_text",
    "answer_logprobs",
    "attach_head",
    "attention_mass_by_class",
    "build_cache",
    "calibrate_pair",
    "calibration_for_card",
    "card_roundtrip",
    "class_bits_for_budget",
    "crossmodel_record",
    "decode_card",
    "default_profile",
    "encode_card",
    "encode_context",
    "encode_observation",
    "encode_split",
    "encode_split_observation",
    "evict",
    "extend_snapshot",
    "extract_facts",
    "fingerprint_of",
    "generate_from_snapshot",
    "generate_from_text",
    "head_importance",
    "join_receiver_head",
    "layer_scores",
    "list_models",
    "load_model",
    "model_dir",
    "models_dir",
    "needs_attention",
    "observe",
    "orthogonal_backfill",
    "predicted_distortion",
    "prefill",
    "prefill_head",
    "prefill_observed",
    "prefill_reread",
    "profile_filename",
    "profile_sensitivity",
    "profiles_dir",
    "pull_model",
    "read_card_info",
    "receive_card",
    "receiver_suffix_ids",
    "require_calibration",
    "select_layers",
    "select_tokens",
    "split_head",
    "tail_observation",
    "token_classes",
    "token_importance",
    "translate_snapshot",
    "width_cost",
]
