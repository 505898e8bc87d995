"""Background services: one start/stop/loop, cancelled correctly.

Theory of operation
-------------------
A ``PeriodicService`` runs ``tick()`` in one task: after each tick it waits for the
interval the tick asked for (``None``: the service's ``interval``; ``0``: at once, there
is more to do) or until ``wake()`` is called. A tick that raises an ``Exception`` is
reported to ``tick_failed`` (logged; a subclass may alert) and the next tick waits
longer, doubling up to ``max_backoff`` while the failures last: a shell never dies of a
failing store or a bug, and it does not spin on one either.

Cancellation is never swallowed (STYLE, Errors). ``CancelledError`` is not an
``Exception``, so it always ends the loop. ``stop()`` — like ``cancel_and_wait`` for any
task — cancels the task and waits for it to end; the task's ``CancelledError`` is the
expected outcome and is absorbed, *unless the caller itself is being cancelled*
(``asyncio.current_task().cancelling()``), in which case it propagates: the shutdown of
whoever called ``stop()`` goes on.

Used by the monitor, the outbox relay, the reconciliation sweep and the retention pruner.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from typing import Any

__all__ = ["PeriodicService", "cancel_and_wait"]

log = logging.getLogger("tether.service")


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has ended.

    The task's own ``CancelledError`` is absorbed; any other exception it ended with is
    logged (it was a background task: nobody else will see it).

    Args:
        task: the task (None: nothing to do).

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
    except Exception:
        log.exception("background task %s failed", task.get_name())


class PeriodicService(abc.ABC):
    """A background loop: ``start()``, ``stop()``, ``wake()`` around ``tick()``.

    Args:
        name: the task's name (shows in task dumps).
        interval: seconds between ticks by default.
        tick_first: tick at once on start (else wait one interval first).
        max_backoff: the longest wait after consecutive failed ticks (at least
            ``interval``).
    """

    def __init__(
        self,
        *,
        name: str,
        interval: float,
        tick_first: bool = True,
        max_backoff: float = 5.0,
    ) -> None:
        self.service_name = name
        self.interval = interval
        self.tick_first = tick_first
        self.max_backoff = max_backoff
        self.failures = 0
        """Consecutive failed ticks (0 after a good one)."""
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()

    @abc.abstractmethod
    async def tick(self) -> float | None:
        """One round of work.

        Returns:
            Seconds until the next round; None for ``interval``, 0 for at once.
        """

    def tick_failed(self, exc: Exception) -> None:
        """A tick raised ``exc``: log it (override to alert, or to log less loudly)."""
        log.error("%s: tick failed", self.service_name, exc_info=exc)

    async def start(self) -> None:
        """Start the loop in the background; idempotent."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self.service_name)

    async def stop(self) -> None:
        """Cancel the loop (a tick in flight is cancelled) and wait for it; idempotent.

        Raises:
            asyncio.CancelledError: the caller itself is being cancelled.
        """
        task, self._task = self._task, None
        await cancel_and_wait(task)

    def wake(self) -> None:
        """Run the next tick now instead of at the end of the current wait."""
        self._wakeup.set()

    async def _loop(self) -> None:
        if not self.tick_first:
            await self._wait(self.interval)
        while True:
            try:
                delay = await self.tick()
            except Exception as exc:  # CancelledError is no Exception: it ends the loop
                self.failures += 1
                self.tick_failed(exc)
                backoff = self.interval * 2 ** min(self.failures - 1, 16)
                delay = min(backoff, max(self.interval, self.max_backoff))
            else:
                self.failures = 0
            await self._wait(self.interval if delay is None else delay)

    async def _wait(self, seconds: float) -> None:
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), seconds)
        else:
            await asyncio.sleep(0)  # more to do: still let the other tasks run
        self._wakeup.clear()
