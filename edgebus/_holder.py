"""Cards this node publishes and must keep serving: in memory, bounded in bytes, oldest evicted first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import StoreFull
from ._transfer import CardManifest


@dataclass(slots=True)
class HeldCard:
    manifest: CardManifest
    data: memoryview
    digests: list[bytes]
    topic: str
    meta: Mapping[str, Any]
    acked_by: set[str] = field(default_factory=set)


class CardHolder:
    """Held cards within ``budget_bytes``; adding evicts the oldest cards that do not fit."""

    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes
        self._cards: OrderedDict[str, HeldCard] = OrderedDict()
        self._bytes = 0

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def add(self, card: HeldCard) -> list[str]:
        """Hold ``card`` (replacing one with the same id). Returns the ids evicted to make room."""
        size = card.manifest.size
        if size > self._budget:
            raise StoreFull(f"card of {size} bytes exceeds the held-cards budget of {self._budget}")
        self.remove(card.manifest.card_id)
        evicted: list[str] = []
        while self._bytes + size > self._budget:
            old_id, old = self._cards.popitem(last=False)
            self._bytes -= old.manifest.size
            evicted.append(old_id)
        self._cards[card.manifest.card_id] = card
        self._bytes += size
        return evicted

    def remove(self, card_id: str) -> bool:
        card = self._cards.pop(card_id, None)
        if card is None:
            return False
        self._bytes -= card.manifest.size
        return True

    def get(self, card_id: str) -> HeldCard | None:
        return self._cards.get(card_id)

    def cards(self) -> list[HeldCard]:
        return list(self._cards.values())
