"""Step progress: live at once (coalesced), durable at most every ``interval``.

Theory of operation
-------------------
``ctx.progress(fraction, message)`` may be called thousands of times a second. Per
running step this publisher keeps the latest value and

* delivers it live through ``on_progress(tenant, Progress)`` at most once per
  ``live_interval``; a value reported inside the window is delivered when the window
  ends, so the latest value always arrives (SPEC: always deliver the latest);
* queues a durable checkpoint (an ``Input`` of a ``ProgressReported``) at most once per
  ``durable_interval``, the trailing value again included, so the log grows by at most
  two events a second per step (SPEC: coalesce durable progress).

When the attempt ends, ``finish`` flushes the pending live value and drops the pending
durable one: the attempt's outcome checkpoint supersedes it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol import Progress
from sync_server.saga.checkpoint import Input
from sync_server.saga.definitions import ProgressReporter
from sync_server.saga.inputs import ProgressReported
from sync_server.saga.storable import storable_text

__all__ = ["ProgressPublisher"]

log = logging.getLogger("tether.saga")


@dataclass(slots=True)
class _Slot:
    tenant: str
    fence: int
    attempt: int
    last_live: float = -1e18
    last_durable: float = -1e18
    live: Progress | None = None
    durable: tuple[float, str | None] | None = None
    live_timer: asyncio.TimerHandle | None = None
    durable_timer: asyncio.TimerHandle | None = None


class ProgressPublisher:
    """Coalesces progress reports of running steps.

    Args:
        on_progress: live callback ``(tenant, Progress)``; may return an awaitable.
        queue_durable: hands a durable progress ``Input`` to the runner's writer.
        clock: wall clock for ``Progress.at``.
        durable_interval: seconds between durable writes per step.
        live_interval: seconds between live deliveries per step.
    """

    def __init__(
        self,
        on_progress: Callable[[str, Progress], Any] | None,
        queue_durable: Callable[[Input], None],
        clock: Callable[[], float],
        durable_interval: float = 0.5,
        live_interval: float = 0.05,
    ) -> None:
        self.on_progress = on_progress
        self.queue_durable = queue_durable
        self.clock = clock
        self.durable_interval = durable_interval
        self.live_interval = live_interval
        self._slots: dict[tuple[str, str, str], _Slot] = {}
        self._pending: set[asyncio.Task[Any]] = set()
        self.delivered = 0

    def reporter(
        self, tenant: str, workflow_id: str, fence: int, step: str, attempt: int
    ) -> ProgressReporter:
        """The ``StepContext.reporter`` of one attempt."""
        key = (tenant, workflow_id, step)
        self._drop(key)
        slot = _Slot(tenant, fence, attempt)
        self._slots[key] = slot

        def report(fraction: float, message: str | None) -> None:
            if self._slots.get(key) is slot:
                # A step's text must be storable on every backend (issue 11, finding 12).
                text = None if message is None else storable_text(message)
                self._report(key, slot, fraction, text)

        return report

    def _report(
        self, key: tuple[str, str, str], slot: _Slot, fraction: float, msg: str | None
    ) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot.live = Progress(
            workflow_id=key[1], step=key[2], fraction=fraction, message=msg, at=self.clock()
        )
        if now - slot.last_live >= self.live_interval:
            self._flush_live(key, slot)
        elif slot.live_timer is None:
            wait = self.live_interval - (now - slot.last_live)
            slot.live_timer = loop.call_later(wait, self._flush_live, key, slot)
        slot.durable = (fraction, msg)
        if now - slot.last_durable >= self.durable_interval:
            self._flush_durable(key, slot)
        elif slot.durable_timer is None:
            wait = self.durable_interval - (now - slot.last_durable)
            slot.durable_timer = loop.call_later(wait, self._flush_durable, key, slot)

    def _flush_live(self, key: tuple[str, str, str], slot: _Slot) -> None:
        slot.live_timer = None
        progress, slot.live = slot.live, None
        if progress is None or self.on_progress is None:
            return
        slot.last_live = asyncio.get_running_loop().time()
        self.delivered += 1
        try:
            outcome = self.on_progress(slot.tenant, progress)
            if inspect.isawaitable(outcome):
                task = asyncio.ensure_future(outcome)
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
        except Exception:
            log.exception("on_progress callback failed")

    def _flush_durable(self, key: tuple[str, str, str], slot: _Slot) -> None:
        slot.durable_timer = None
        pending, slot.durable = slot.durable, None
        if pending is None or self._slots.get(key) is not slot:
            return
        slot.last_durable = asyncio.get_running_loop().time()
        fraction, message = pending
        event = ProgressReported(key[2], slot.attempt, fraction, message)
        self.queue_durable(Input(event, key[1], slot.fence, tenant=key[0]))

    def finish(self, tenant: str, workflow_id: str, step: str) -> None:
        """The attempt ended: deliver its last live value, forget the durable one."""
        key = (tenant, workflow_id, step)
        slot = self._slots.get(key)
        if slot is None:
            return
        if slot.live is not None:
            self._flush_live(key, slot)
        self._drop(key)

    def _drop(self, key: tuple[str, str, str]) -> None:
        slot = self._slots.pop(key, None)
        if slot is None:
            return
        for timer in (slot.live_timer, slot.durable_timer):
            if timer is not None:
                timer.cancel()

    def close(self) -> None:
        """Forget every slot (runner stop)."""
        for key in list(self._slots):
            self._drop(key)
