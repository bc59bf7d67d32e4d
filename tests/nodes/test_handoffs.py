"""Receiver-side hand-off bookkeeping: start times, bounded split heads, the reply's accounting."""

from __future__ import annotations

import asyncio

import pytest

from nodes.handoffs import HandoffBook, HeadResult, Timing, handoff_times, sent_at


async def test_the_first_piece_starts_the_clock_and_heads_are_bounded() -> None:
    book = HandoffBook(max_heads=2)
    book.begin("tail", 10.0, 1000.0)  # the head message's pull started it
    book.begin("tail", 12.0, None)  # the tail card's own pull does not restart it
    assert book.timing("tail") == Timing(started=10.0, sent_at=1000.0)
    loop = asyncio.get_running_loop()
    jobs = {name: loop.create_future() for name in ("a", "b", "c")}
    for name, job in jobs.items():
        book.add_head(name, job)
    assert book.head("a") is None  # the oldest of three, beyond max_heads
    assert jobs["a"].cancelled()  # and cancelled: a prefill not yet started never runs
    assert not jobs["b"].cancelled()
    assert book.head("c") is jobs["c"]
    book.forget("c")
    assert book.head("c") is None
    for job in jobs.values():
        job.cancel()


def test_ready_is_the_later_of_card_and_head() -> None:
    timing = Timing(started=100.0, sent_at=5000.0)
    head = HeadResult(snapshot=None, prefill_s=3.0, tokens=900, done=104.0)
    # Card stored at 102 s, head done at 104 s; the reply is made at 110 s (wall clock 5010.5).
    times = handoff_times(timing, 102.0, head, now_wall=5010.5, now=110.0)
    assert times["handoff_s"] == pytest.approx(4.0)
    assert times["sent_to_ready_s"] == pytest.approx(4.5)  # ready at wall 5004.5
    assert handoff_times(timing, 102.0, None, now_wall=5010.5, now=110.0)["handoff_s"] == pytest.approx(2.0)
    assert handoff_times(None, 102.0, None, now_wall=0.0, now=110.0) == {
        "handoff_s": None,
        "sent_to_ready_s": None,
    }


@pytest.mark.parametrize(
    ("meta", "expected"), [({"sent_at": 5.5}, 5.5), ({"sent_at": "x"}, None), ({}, None)]
)
def test_sent_at_is_read_only_when_sane(meta: dict[str, object], expected: float | None) -> None:
    assert sent_at(meta) == expected
