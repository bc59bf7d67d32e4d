"""QA rows from the shared JSONL files (schema in ../shared/data/SOURCES.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class QARow:
    id: str
    context: str
    question: str
    answers: tuple[str, ...]
    source: str


def load_rows(path: Path, *, limit: int | None = None, offset: int = 0) -> list[QARow]:
    """Rows in file order; rows without an answer (SQuAD v2 impossible questions) are skipped."""
    rows: list[QARow] = []
    with path.open(encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index < offset or not line.strip():
                continue
            raw = json.loads(line)
            answers = tuple(str(a) for a in raw.get("answers") or ())
            if not answers:
                continue
            rows.append(
                QARow(
                    id=str(raw["id"]),
                    context=str(raw["context"]),
                    question=str(raw["question"]),
                    answers=answers,
                    source=str(raw.get("source", path.stem)),
                )
            )
            if limit is not None and len(rows) >= limit:
                break
    return rows


def dataset_name(path: Path) -> str:
    return path.stem.removesuffix(".jsonl")
