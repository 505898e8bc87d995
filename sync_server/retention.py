"""Retention: a background pruner that keeps the server's disk bounded (SPEC promise 8).

Theory of operation
-------------------
Five windows (``ServerConfig.retention_*``, seconds, ``0`` keeps forever) decide what
goes:

* ``events`` — the events of workflows that *ended* more than the window ago. The
  pruner walks the ended workflows in the order they ended (index ``workflows_ended``)
  from a stored mark, a small batch of workflows per transaction;
* ``workflows`` — finished workflow rows (and, unless events are kept forever, what is
  left of their events);
* ``results`` — mutation results (each client's last applied id stays in ``clients``,
  so a resend of an old mutation is still answered ``duplicate``);
* ``outbox`` — delivered outbox items; ``dead_letters`` — resolved or requeued ones.

Every batch is one short transaction over rows found by an index, with a pause between
batches, so a writer waits for one batch at most (B10 measures push p99 while a
million rows are pruned). Whenever events go, the tenant's horizon (the highest pruned
``seq``) rises in the same transaction; a client whose cursor is below it gets a reset
from current snapshots instead of an error (``Welcome.horizon``).

Several instances may prune at once: PostgreSQL batches skip rows another pruner holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol import StorageError
from sync_server.service import PeriodicService
from sync_server.store.base import Store

__all__ = ["KINDS", "PruneReport", "Pruner", "RetentionPolicy", "policy_from_config"]

log = logging.getLogger(__name__)

KINDS = ("events", "workflows", "results", "outbox", "dead_letters")
"""What the pruner deletes, in the order of a round."""


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Retention windows in seconds; ``0`` keeps that kind forever."""

    events: float = 7 * 86_400.0
    workflows: float = 30 * 86_400.0
    results: float = 30 * 86_400.0
    outbox: float = 7 * 86_400.0
    dead_letters: float = 30 * 86_400.0

    def window(self, kind: str) -> float:
        """The window of one of ``KINDS``."""
        value: float = getattr(self, kind)
        return value

    @property
    def enabled(self) -> bool:
        """Whether anything is ever pruned."""
        return any(self.window(kind) > 0 for kind in KINDS)


@dataclass(slots=True)
class PruneReport:
    """Rows deleted in one round, by kind (``events`` counts events of both steps)."""

    deleted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    batches: int = 0
    more: bool = False
    """Some kind stopped at ``max_batches`` with rows left: start the next round soon."""

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


class Pruner(PeriodicService):
    """Deletes what the policy no longer keeps, in small batches, in the background.

    Args:
        store: the opened store.
        policy: the retention windows.
        interval: seconds between rounds once caught up.
        batch: rows per batch (results, outbox, dead letters).
        workflow_batch: ended workflows per batch (their events, or their rows with
            whatever events they have left).
        pause: seconds between two batches at least (lets writers in).
        duty: the largest share of time spent deleting: after a batch that took t
            seconds, the pruner rests ``max(pause, t * (1 - duty) / duty)``.
        max_batches: batches of one kind per round before moving on to the next kind.
        clock: wall clock (unix seconds).
        on_pruned: called with (kind, rows) after each batch that deleted rows.
        reclaim_every: seconds between two ``Store.reclaim`` calls (made only after
            rows were deleted): PostgreSQL reuses the space of deleted rows only after
            a VACUUM, and autovacuum may wait long on a table that stays small.
    """

    def __init__(
        self,
        store: Store,
        policy: RetentionPolicy,
        *,
        interval: float = 60.0,
        batch: int = 1000,
        workflow_batch: int = 100,
        pause: float = 0.002,
        duty: float = 0.1,
        max_batches: int = 1000,
        clock: Callable[[], float] = time.time,
        on_pruned: Callable[[str, int], None] | None = None,
        reclaim_every: float = 600.0,
    ) -> None:
        super().__init__(name="tether-pruner", interval=interval)
        self.store = store
        self.policy = policy
        self.batch = batch
        self.workflow_batch = workflow_batch
        self.pause = pause
        self.duty = duty
        self.max_batches = max_batches
        self.clock = clock
        self.on_pruned = on_pruned
        self.reclaim_every = reclaim_every
        self._deleted_since_reclaim = 0
        self._last_reclaim = time.monotonic()
        self.rounds = 0
        self.running = False
        """True while a round is deleting."""

    async def start(self) -> None:
        """Start pruning in the background (nothing runs if the policy keeps all)."""
        if self.policy.enabled:
            await super().start()

    async def tick(self) -> float | None:
        """One round; a round that stopped before catching up goes on after ``pause``."""
        report = await self.prune_once()
        if report.total:
            log.info("pruned %s", {k: v for k, v in report.deleted.items() if v})
            self._deleted_since_reclaim += report.total
        if (
            self._deleted_since_reclaim
            and time.monotonic() - self._last_reclaim >= self.reclaim_every
        ):
            await self.store.reclaim()
            self._deleted_since_reclaim = 0
            self._last_reclaim = time.monotonic()
        return self.pause if report.more else None

    def tick_failed(self, exc: Exception) -> None:
        """A failed round is logged (a store failure as a warning) and retried later."""
        if isinstance(exc, StorageError):
            log.warning("pruning failed (will retry): %s", exc)
        else:
            log.error("pruning round failed", exc_info=exc)

    async def prune_once(self) -> PruneReport:
        """One round: every kind until caught up (or ``max_batches`` batches each).

        Returns:
            What was deleted.

        Raises:
            StorageError: the store failed; what committed before stays deleted.
        """
        self.rounds += 1
        report = PruneReport()
        now = self.clock()
        self.running = True
        try:
            for kind in KINDS:
                window = self.policy.window(kind)
                if window > 0:
                    await self._prune_kind(kind, now - window, report)
        finally:
            self.running = False
        return report

    async def _prune_kind(self, kind: str, cutoff: float, report: PruneReport) -> None:
        for _ in range(self.max_batches):
            started = time.perf_counter()
            if kind == "events":
                found, deleted = await self.store.prune_events(cutoff, self.workflow_batch)
                limit = self.workflow_batch
                counts = {"events": deleted}
            elif kind == "workflows":
                # Small batches: a row may take its remaining events along.
                found, events = await self.store.prune_workflows(
                    cutoff, self.workflow_batch, with_events=self.policy.events > 0
                )
                limit = self.workflow_batch
                counts = {"workflows": found, "events": events}
            else:
                found = await self.store.prune_rows(kind, cutoff, self.batch)
                limit = self.batch
                counts = {kind: found}
            report.batches += 1
            for name, rows in counts.items():
                report.deleted[name] += rows
                if rows and self.on_pruned is not None:
                    self.on_pruned(name, rows)
            if found < limit:
                return
            took = time.perf_counter() - started
            await asyncio.sleep(max(self.pause, took * (1 - self.duty) / self.duty))
        report.more = True


def policy_from_config(config: object) -> RetentionPolicy:
    """The ``RetentionPolicy`` of a ``ServerConfig`` (its ``retention_*`` fields)."""
    values = {kind: float(getattr(config, f"retention_{kind}") or 0.0) for kind in KINDS}
    return RetentionPolicy(**values)
