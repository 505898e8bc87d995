"""The saga runner's claimer: wake-ups and the claim loop.

Theory of operation
-------------------
The claimer sleeps until something may be due: a ``work`` notification from any
instance (``_on_work``; a ``due:`` one only arms a timer for that time), the timer for
the earliest known ``due_at`` (``_arm`` keeps only the earliest), a reconnect of the
store, a held workflow being let go while the runner was full, or the poll fallback.
Awake, it claims due workflows under a lease in batches of at most ``claim_batch``
while there is room under ``max_concurrency`` (``Checkpointer.claim``: in the same
transaction the machine takes interrupted attempts over, applies client requests and
starts the ready steps), then hands each claimed row to ``_after_commit``. A
``revoke``/``cancel`` notification stops the attempts of a lease taken from this
instance at once. Storage errors and bugs back off and retry: the loop never dies of
them; ``CancelledError`` is never caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from protocol import StorageError
from sync_server.saga.definitions import STOP_CANCELLED, STOP_INTERRUPTED
from sync_server.saga.intake import parse_revoke
from sync_server.saga.state import RunnerState

__all__ = ["Claimer"]

log = logging.getLogger("tether.saga")


class Claimer(RunnerState):
    """The runner's claim loop and wake-ups (a part of ``SagaRunner``)."""

    def _on_work(self, payload: str) -> None:
        revoked = parse_revoke(payload)
        if revoked is not None:
            kind, key = revoked
            held = self._held.pop(key, None)
            if held is not None:
                log.info("lease of %s revoked; stopping its attempts", held.id)
                held.cancel(STOP_CANCELLED if kind == "cancel" else STOP_INTERRUPTED)
        elif payload.startswith("due:"):
            with contextlib.suppress(ValueError):
                self._arm(float(payload[4:]))
                return
        self._wake.set()

    def _arm(self, at: float) -> None:
        """Wake the claimer at ``at`` (keeps only the earliest timer)."""
        delay = at - self.clock()
        if delay <= 0:
            self._wake.set()
            return
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at

        def fire() -> None:
            self._timer = None
            self._timer_at = float("inf")
            self._wake.set()

        self._timer = asyncio.get_running_loop().call_later(delay, fire)

    async def _claimer(self) -> None:
        failures = 0
        while self._running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()
            try:
                while self._running:
                    capacity = self.max_concurrency - len(self._held)
                    if capacity <= 0:
                        self._full = True
                        break
                    limit = min(self.claim_batch, capacity)
                    if await self._claim_once(limit) < limit:
                        break
                    self._full = limit == capacity
                failures = 0
            except StorageError as exc:
                failures += 1
                log.warning("claim failed (%s); retrying", exc)
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))
            except Exception:
                # A shell never dies of a bug: log it and keep claiming (STYLE, errors).
                failures += 1
                log.exception("claim failed unexpectedly; retrying")
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))

    async def _claim_once(self, limit: int) -> int:
        now = self.clock()
        started = time.perf_counter()
        applied = await self.store.run(lambda tx: self.checkpointer.claim(tx, now, limit))
        if applied and self.metrics is not None:
            self.metrics.observe_append("saga", time.perf_counter() - started)
        # A claim that found nothing wrote nothing; count only the ones that did.
        self.stats["claim_txns" if applied else "empty_claims"] += 1
        self.stats["claimed"] += len(applied)
        for item in applied:
            stale = self._held.pop(item.key, None)
            if stale is not None:
                stale.cancel()  # our own older lease on it expired; its attempts are void
            self._after_commit(item, fence_hint=item.record.fence if item.record else 0)
        return len(applied)
