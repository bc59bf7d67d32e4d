"""Short text of the facts in a context, sent beside the compressed KV (the Q-KVComm "hybrid" idea).

Quantized or evicted KV loses exact strings first: numbers, dates, names. :func:`extract_facts` pulls out

* YAKE keyphrases (statistical, language-independent; ``yake`` 0.7.x), and
* regex facts, by kind: ``url``, ``money``, ``percent``, ``date``, ``version``, ``quantity`` (a number with
  a unit or a scale word), ``identifier`` (CamelCase, ALLCAPS, snake_case, dotted.names, `backticked`).

Contract: output is deterministic for a given text (keyphrases in YAKE rank order, facts in order of first
appearance), deduplicated, and :meth:`Facts.to_text` never returns more than ``max_chars`` characters (whole
items only, never a cut item). Regex kinds are matched in the order above and a later match that overlaps an
earlier one is dropped, so ``$5 million`` is one money fact and not also a quantity.

YAKE catches its own exceptions, logs a warning and returns no keyphrases. We do not let that pass silently:
its warnings are captured, an empty answer for a text that has content words counts as a failure too, and
either lands in :attr:`Facts.keyphrase_error` and is logged as a warning by this module's logger.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import yake

logger = logging.getLogger(__name__)

#: Fixed order of fact kinds, used both for overlap priority and in :meth:`Facts.to_text`.
FACT_KINDS = ("url", "money", "percent", "date", "version", "quantity", "identifier")

_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
    r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?"
)
_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_SCALE = r"(?:thousand|million|billion|trillion|[kKMB]n?)\b"
_UNIT = (
    r"(?:°[CF]|K\b|kPa|Pa\b|atm\b|mg\b|kg\b|g\b|tonnes?\b|tons?\b|km\b|cm\b|mm\b|m\b|mi\b|miles?\b|"
    r"mL\b|ml\b|L\b|litres?\b|liters?\b|ms\b|µs\b|us\b|ns\b|s\b|sec(?:onds?)?\b|min(?:utes?)?\b|"
    r"h\b|hours?\b|days?\b|years?\b|Hz\b|kHz\b|MHz\b|GHz\b|W\b|kW\b|MW\b|GW\b|kWh\b|V\b|mAh\b|"
    r"[KMGT]i?B\b|B\b|bytes?\b|bits?\b|tokens?\b|px\b|dB\b|mph\b|km/h\b|feet\b|ft\b|inch(?:es)?\b|"
    r"acres?\b|hectares?\b|people\b|members\b)"
)

_PATTERNS: dict[str, re.Pattern[str]] = {
    "url": re.compile(r"\bhttps?://[^\s<>\"'`]+|\bwww\.[^\s<>\"'`]+"),
    "money": re.compile(
        rf"(?:(?<![\w$])(?:US|A|C|NZ|HK|S)?\$|[€£¥])\s?(?:{_NUMBER})(?:\s?{_SCALE})?"
        rf"|\b(?:{_NUMBER})(?:\s{_SCALE})?\s(?:dollars|euros|pounds|yen|USD|EUR|GBP)\b"
    ),
    "percent": re.compile(rf"(?<![\w.])(?:{_NUMBER})\s?(?:%|percent\b|per cent\b)"),
    "date": re.compile(
        r"\b\d{4}-\d{2}-\d{2}\b"  # ISO 8601
        r"|\b\d{1,2}/\d{1,2}/\d{2,4}\b"  # 07/02/2016
        rf"|\b{_MONTH}\s\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s\d{{4}})?\b"  # February 7, 2016 / January 30
        rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s{_MONTH}(?:,?\s\d{{4}})?\b"  # 7 February 2016
        rf"|\b{_MONTH}\s\d{{4}}\b"  # July 1888
        r"|\b1\d{3}[–-](?:\d{2}|1\d{3})\b|\b20\d{2}[–-](?:\d{2}|20\d{2})\b"  # 2003–04, 1914-1918
        rf"|\b(?:1[0-9]|20)\d{{2}}s?\b(?!\s?(?:{_SCALE}|{_UNIT}))"  # bare years, decades: 1985, 1990s
    ),
    "version": re.compile(
        r"\b[vV]\d+(?:\.\d+){1,3}(?:[-+][0-9A-Za-z.]+)?\b"
        r"|\b\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.]+)?\b"
        r"|(?<=[Vv]ersion\s)\d+(?:\.\d+)+\b"
    ),
    "quantity": re.compile(
        rf"(?<![\w.])(?:{_NUMBER})(?:\s?{_SCALE})?\s?{_UNIT}|(?<![\w.])(?:{_NUMBER})\s{_SCALE}"
    ),
    "identifier": re.compile(
        r"`[^`\s]{2,60}`"  # code in backticks
        r"|\b[A-Za-z_]\w+(?:\.[A-Za-z_]\w+)+(?:\(\))?"  # dotted.names, calls() (not U.S., e.g.)
        r"|\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b"  # snake_case
        r"|\b[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+\b"  # CamelCase
        r"|\b[a-z]+(?:[A-Z][a-z0-9]*)+\b"  # camelCase
        r"|\b[A-Z][A-Z0-9]{1,}(?:[-_][A-Z0-9]+)*\b"  # ALLCAPS, NFL, HTTP-2
    ),
}

# YAKE keeps its own stopwords; we ask for more candidates than we keep and drop near-repeats ourselves.
_YAKE_NGRAM = 3
_YAKE_OVERSAMPLE = 3


@dataclass(frozen=True)
class Fact:
    kind: str
    text: str


@dataclass(frozen=True)
class Facts:
    """Keyphrases (YAKE rank order) and regex facts (order of first appearance) of one text."""

    keyphrases: tuple[str, ...]
    items: tuple[Fact, ...]
    keyphrase_error: str | None = field(default=None)
    max_chars: int = 400  # default bound of to_text

    def by_kind(self, kind: str) -> tuple[str, ...]:
        return tuple(item.text for item in self.items if item.kind == kind)

    def to_text(self, max_chars: int | None = None) -> str:
        """One line per kind (``keyphrases: a; b``), at most ``max_chars`` (default: the stored bound).

        Items are taken round-robin over the kinds (keyphrases first, then :data:`FACT_KINDS`), so a tight
        budget still shows a little of every kind; an item that does not fit is skipped whole.
        """
        limit = self.max_chars if max_chars is None else max_chars
        if limit < 0:
            raise ValueError(f"max_chars must be >= 0, got {limit}")
        queues: list[tuple[str, list[str]]] = [("keyphrases", list(self.keyphrases))]
        queues += [(kind, list(self.by_kind(kind))) for kind in FACT_KINDS]
        chosen: dict[str, list[str]] = {name: [] for name, _ in queues}
        progress = True
        while progress:
            progress = False
            for name, queue in queues:
                while queue:
                    candidate = queue.pop(0)
                    chosen[name].append(candidate)
                    if len(_render(chosen)) <= limit:
                        progress = True
                        break
                    chosen[name].pop()
        return _render(chosen)


def _render(chosen: dict[str, list[str]]) -> str:
    return "\n".join(f"{name}: {'; '.join(texts)}" for name, texts in chosen.items() if texts)


def _trim(value: str) -> str:
    """Drop sentence punctuation and closing brackets that the match swallowed but does not open."""
    openers = {")": "(", "]": "[", "}": "{"}
    while value:
        last = value[-1]
        unbalanced = last in openers and value.count(openers[last]) < value.count(last)
        if last not in ".,;:!?'\"" and not unbalanced:
            break
        value = value[:-1]
    return value


def _find_regex_facts(text: str) -> tuple[Fact, ...]:
    claimed: list[tuple[int, int]] = []
    found: list[tuple[int, Fact]] = []
    seen: set[tuple[str, str]] = set()
    for kind in FACT_KINDS:
        for match in _PATTERNS[kind].finditer(text):
            start, end = match.span()
            value = _trim(match.group(0))
            end = start + len(value)
            if not value or any(start < c_end and c_start < end for c_start, c_end in claimed):
                continue
            claimed.append((start, end))
            key = (kind, value)
            if key in seen:
                continue
            seen.add(key)
            found.append((start, Fact(kind, value)))
    found.sort(key=lambda pair: pair[0])
    return tuple(fact for _, fact in found)


class _RecordCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _collect_yake_warnings() -> Iterator[_RecordCollector]:
    collector = _RecordCollector()
    yake_logger = logging.getLogger("yake")
    yake_logger.addHandler(collector)
    try:
        yield collector
    finally:
        yake_logger.removeHandler(collector)


def _has_content_words(text: str, stopwords: set[str]) -> bool:
    return any(word.lower() not in stopwords for word in re.findall(r"[^\W\d_]{3,}", text))


def _phrase_words(phrase: str) -> frozenset[str]:
    """Lower-cased words with a plural ``s`` dropped: the unit of keyphrase deduplication."""
    return frozenset(w[:-1] if len(w) > 3 and w.endswith("s") else w for w in phrase.lower().split())


def _keyphrases(text: str, limit: int) -> tuple[tuple[str, ...], str | None]:
    if limit == 0 or not text.strip():
        return (), None
    try:
        extractor = yake.KeywordExtractor(lan="en", n=_YAKE_NGRAM, top=limit * _YAKE_OVERSAMPLE)
        with _collect_yake_warnings() as collector:
            ranked = extractor.extract_keywords(text)
    except Exception as exc:  # a third-party boundary: record any YAKE failure, never crash the encoder
        return (), f"YAKE raised {type(exc).__name__}: {exc}"
    if collector.messages:
        return (), "YAKE failed: " + " | ".join(collector.messages)
    if not ranked and _has_content_words(text, extractor.stopword_set):
        return (), "YAKE returned no keyphrases for a text with content words"
    kept: list[str] = []
    kept_words: list[frozenset[str]] = []
    for phrase, _score in ranked:
        words = _phrase_words(str(phrase))
        # A phrase whose words all appear in a kept one ("National Football" after "National Football
        # Conference", "entry temperature" after "entry temperatures") adds nothing to a short card text.
        if not words or any(words <= other for other in kept_words):
            continue
        kept.append(str(phrase))
        kept_words.append(words)
        if len(kept) == limit:
            break
    return tuple(kept), None


def extract_facts(text: str, *, max_keyphrases: int = 8, max_chars: int = 400) -> Facts:
    """Keyphrases and regex facts of ``text``; see the module docstring.

    ``max_chars`` becomes the default bound of :meth:`Facts.to_text`; a fact longer than it is dropped.
    """
    if max_keyphrases < 0:
        raise ValueError(f"max_keyphrases must be >= 0, got {max_keyphrases}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    keyphrases, error = _keyphrases(text, max_keyphrases)
    if error is not None:
        logger.warning("keyphrase extraction failed, facts carry regex items only: %s", error)
    items = tuple(item for item in _find_regex_facts(text) if len(item.text) <= max_chars)
    return Facts(keyphrases=keyphrases, items=items, keyphrase_error=error, max_chars=max_chars)
