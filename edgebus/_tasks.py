"""Owning asyncio tasks: cancel one and wait for it to finish."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and await it, swallowing the cancellation we asked for.

    A cancellation aimed at the *caller* while it waits is re-raised, so closing inside a task that is itself
    being cancelled stays cancellable (pyzmq's authenticator ``stop()`` cancels and never awaits: the
    counter-example).
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
