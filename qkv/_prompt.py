"""The one prompt every condition uses, split where the sender's part ends and the receiver's begins.

Layout (token ids)::

    prefix_ids = [bos?] + tok(head) + tok(context) + tok(context_tail)     # the sender prefills this
    suffix_ids = tok(facts line? + question + assistant turn start)         # the receiver prefills this

Every piece is tokenized on its own, without special tokens added by the tokenizer, and the ids are
concatenated. The ``text`` condition (the receiver prefills ``prefix_ids + suffix_ids`` itself) and the ``kv``
condition (the sender prefills ``prefix_ids``, the receiver only ``suffix_ids``) therefore run on exactly the
same ids: an uncompressed KV hand-off is the same computation as the text baseline.

Two formats: ``chatml`` for instruction-tuned models with ``<|im_start|>``/``<|im_end|>`` turns
(SmolLM2-Instruct), and ``plain`` ("Context: ... Question: ... Answer:") for base models without a chat
template (Gemma-3-270M). Both ask for a short extractive answer (SQuAD style) on one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

TemplateKind = Literal["chatml", "plain"]

SYSTEM_INSTRUCTION = "Answer with a short phrase from the context."

_CHATML_START = "<|im_start|>"
_CHATML_END = "<|im_end|>"


# A transformers tokenizer (fast or slow); only encode, get_vocab and bos_token_id are used.
Tokenizer = Any


@dataclass(frozen=True, kw_only=True)
class PromptParts:
    """Token ids of one prompt, split between sender and receiver."""

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    # [start, end) of the context tokens inside prefix_ids
    context_token_span: tuple[int, int]

    @property
    def template_prefix_tokens(self) -> int:
        """Number of template tokens before the context starts."""
        return self.context_token_span[0]

    @property
    def full_ids(self) -> tuple[int, ...]:
        return self.prefix_ids + self.suffix_ids


@dataclass(frozen=True, kw_only=True)
class PromptTemplate:
    """One prompt format. Build with :meth:`chatml`, :meth:`plain` or :meth:`for_tokenizer`."""

    kind: TemplateKind
    head: str
    context_tail: str
    suffix_format: str  # str.format fields: facts_line, question
    facts_format: str  # str.format field: facts
    add_bos: bool
    # Token strings that end an answer (besides the model's eos ids), when the vocabulary has them.
    stop_tokens: tuple[str, ...]
    # Answers are one line: generation stops at the first newline after some text.
    stop_at_newline: bool = True

    @classmethod
    def chatml(cls, system: str = SYSTEM_INSTRUCTION) -> PromptTemplate:
        return cls(
            kind="chatml",
            head=f"{_CHATML_START}system\n{system}{_CHATML_END}\n{_CHATML_START}user\nContext:\n",
            context_tail="\n",
            suffix_format=f"{{facts_line}}Question: {{question}}{_CHATML_END}\n{_CHATML_START}assistant\n",
            facts_format="Facts: {facts}\n",
            add_bos=False,
            stop_tokens=(_CHATML_END, "<|endoftext|>"),
        )

    @classmethod
    def plain(cls, system: str = SYSTEM_INSTRUCTION) -> PromptTemplate:
        return cls(
            kind="plain",
            head=f"{system}\n\nContext:\n",
            context_tail="\n\n",
            suffix_format="{facts_line}Question: {question}\nAnswer:",
            facts_format="Facts: {facts}\n",
            add_bos=True,
            stop_tokens=("<end_of_turn>", "<eos>"),
        )

    @classmethod
    def named(cls, kind: str) -> PromptTemplate:
        if kind == "chatml":
            return cls.chatml()
        if kind == "plain":
            return cls.plain()
        raise ValueError(f"unknown prompt template {kind!r} (known: chatml, plain)")

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> PromptTemplate:
        """``chatml`` when the vocabulary has both ChatML turn markers, else ``plain``."""
        vocab = tokenizer.get_vocab()
        if _CHATML_START in vocab and _CHATML_END in vocab:
            return cls.chatml()
        return cls.plain()

    def split(
        self, tokenizer: Tokenizer, context: str, question: str, facts: str | None = None
    ) -> PromptParts:
        """Token ids of the sender's prefix and the receiver's suffix (see the module docstring)."""
        head_ids = self._encode(tokenizer, self.head)
        if self.add_bos and tokenizer.bos_token_id is not None:
            head_ids = [tokenizer.bos_token_id, *head_ids]
        context_ids = self._encode(tokenizer, context.strip())
        tail_ids = self._encode(tokenizer, self.context_tail)
        facts_line = self.facts_format.format(facts=facts.strip()) if facts else ""
        suffix_ids = self._encode(
            tokenizer, self.suffix_format.format(facts_line=facts_line, question=question.strip())
        )
        start = len(head_ids)
        return PromptParts(
            prefix_ids=tuple(head_ids + context_ids + tail_ids),
            suffix_ids=tuple(suffix_ids),
            context_token_span=(start, start + len(context_ids)),
        )

    def stop_token_ids(self, tokenizer: Tokenizer, eos_ids: Sequence[int] = ()) -> frozenset[int]:
        """The model's eos ids plus this template's stop tokens that the vocabulary has."""
        vocab = tokenizer.get_vocab()
        ids = {int(i) for i in eos_ids}
        ids.update(vocab[token] for token in self.stop_tokens if token in vocab)
        return frozenset(ids)

    @staticmethod
    def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
        return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)] if text else []
