"""Stopping a background task without swallowing the caller's own cancellation.

``task.cancel(); with suppress(CancelledError): await task`` also swallows a
cancellation aimed at the *caller* while it waits, so the caller's shutdown silently
goes on running. ``cancel_and_wait`` absorbs the stopped task's ``CancelledError`` only
when the current task is not itself being cancelled (``Task.cancelling()``); the server
has the same helper in ``sync_server.service`` (the SDK does not import the server).
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(
    task: asyncio.Task[Any] | None, *, expected: tuple[type[Exception], ...] = ()
) -> None:
    """Cancel ``task`` and wait until it has ended.

    Args:
        task: the task (None: nothing to do).
        expected: exceptions the task may end with that are absorbed too; any other
            exception it ended with propagates.

    Raises:
        asyncio.CancelledError: the caller itself is being cancelled meanwhile.
    """
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we are being cancelled, not only the task we stopped
    except expected:
        pass
