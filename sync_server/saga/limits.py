"""Named limits per downstream: the pure admission rule and its per-transaction shell.

Theory of operation
-------------------
A ``Limit(concurrency, per_second)`` caps the attempts of every step that names it,
across all instances sharing the database. The shared state lives in four tables
(migration 8): a row per limit (locked for the decision, so two instances never both
take the last slot), the *slots* held by running attempts, the *starts* of the last
second, and the *waiters*.

* **Slots are tied to leases.** A slot records the holder's lease owner and fence and
  counts only while the workflow's row still has that owner, that fence and an
  unexpired lease. An instance killed with SIGKILL therefore frees its slots when its
  leases expire — nothing to clean up — and a takeover re-admits the attempt it re-runs.
  A slot is deleted when its step stops running (outcome, cancel, deadline).
* **Waiters are served fairly.** A ready step whose limit is full is deferred without
  using an attempt (``SagaMachine.receive_limit_wait``) and queued as a waiter. Waiters
  are ordered round-robin across tenants — each tenant's waiters in submit order
  (``created_at``), then the first of every tenant, the second of every tenant, … — so
  one tenant's burst cannot starve another. A step is admitted only if its place in that
  order is below the free capacity; when a slot frees, the checkpoint that freed it wakes
  the next waiters (their ``due_at`` becomes now). A waiter that is not looked at for
  ``WAITER_TTL`` seconds (its workflow vanished) stops counting.
* **Rate.** ``per_second`` admits at most that many starts in any one-second window
  (a sliding log of start times, looked at over ``RATE_WINDOW`` = 1.1 s: the 100 ms
  guard keeps the promise true as the downstream measures it, since an attempt starts
  slightly after its admission commits).

``decide`` is the pure rule; ``LimitGate`` is the shell the checkpointer drives inside
its transaction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from sync_server.saga.definitions import Limit
from sync_server.store.base import Transaction, WorkflowKey, WorkflowRecord
from sync_server.store.limit_sql import RATE_WINDOW

__all__ = ["WAITER_TTL", "Admission", "LimitGate", "decide"]

WAITER_TTL = 120.0
"""Seconds after which a waiter nobody re-examined no longer holds its place."""
MAX_POLL = 30.0
"""Longest a waiter sleeps before it looks again (it is normally woken earlier)."""


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of ``decide``: admitted now, or look again at ``retry_at``;
    ``room``: the limit had room, only not for this waiter (others come first)."""

    admitted: bool
    retry_at: float
    room: bool = False


def decide(
    limit: Limit,
    running: int,
    starts: int,
    oldest_start: float | None,
    position: int,
    now: float,
) -> Admission:
    """May the waiter at ``position`` (0 = first in fair order) start now?

    Args:
        limit: the limit's configuration.
        running: attempts holding a valid slot now.
        starts: starts in the last second.
        oldest_start: the oldest of those starts (None if none).
        position: the waiter's place in fair order among the limit's waiters.
        now: the current time.

    Returns:
        ``Admission(True, now)``, or when to look again: a concurrency-bound waiter
        polls slowly (it is woken when a slot frees), a rate-bound one returns when the
        window will have room for everyone ahead of it.
    """
    free_slots = math.inf if limit.concurrency is None else limit.concurrency - running
    free_rate = math.inf if limit.per_second is None else limit.per_second - starts
    free = min(free_slots, free_rate)
    if position < free:
        return Admission(True, now)
    room = free >= 1
    if limit.per_second is not None and position >= free_rate:
        full = oldest_start is not None and starts >= limit.per_second
        opens = oldest_start + RATE_WINDOW if full and oldest_start is not None else now
        return Admission(False, max(now, opens) + position / limit.per_second, room)
    # A safety net only (a freed slot wakes the next waiters): the further back, the
    # rarer the look, so thousands of waiters do not keep the database busy.
    return Admission(False, now + min(MAX_POLL, 1.0 + position * 0.2), room)


class LimitGate:
    """The limits of one transaction: admits steps, releases slots, wakes waiters.

    Args:
        tx: the transaction.
        limits: configuration by name.
        owner: this instance's lease owner id (slots carry it).
    """

    def __init__(self, tx: Transaction, limits: Mapping[str, Limit], owner: str) -> None:
        self.tx = tx
        self.limits = limits
        self.owner = owner
        self._usage: dict[str, tuple[int, int, float | None]] = {}
        self._released: set[str] = set()
        self._freed: set[str] = set()
        self._releases: list[tuple[str, str, str]] = []
        self.chosen: set[WorkflowKey] = set()
        """Workflows a hand-off picked as the next in fair order (their place is known)."""
        """Limits whose next waiters should be woken at the end (a slot was freed, or
        there was room for someone else)."""

    async def admit(self, name: str, record: WorkflowRecord, step: str, now: float) -> Admission:
        """Take a slot for ``step`` of ``record`` now, or queue it as a waiter.

        Most looks end in "not yet" (a waiter polled or woken out of turn): those are
        decided on an unlocked reading, so they never hold the limit's row lock — which
        would make the transaction that frees a slot wait for them. Only a step that
        may go in takes the lock, and is decided again on the locked counts (its place
        in line is not read again: a stale place can only bend fairness, never the cap).
        """
        limit = self.limits[name]
        rate = limit.per_second is not None
        await self._write_releases()
        if record.key in self.chosen:
            position = 0  # picked as next in fair order by the hand-off; capacity decides
        else:
            position = await self.tx.limit_position(
                name, record.tenant, record.id, step, record.created_at, now, now - WAITER_TTL
            )
        usage = self._usage.get(name)
        if usage is None:
            hint = await self.tx.lock_limit(name, now, rate=rate, lock=False)
            outcome = decide(limit, *hint, position, now)
            if not outcome.admitted:
                if outcome.room:
                    # Room, but others come first: wake them (a wake may have missed
                    # them while another transaction held their rows).
                    self._released.add(name)
                return outcome
            usage = await self.tx.lock_limit(name, now, rate=rate)
        running, starts, oldest = usage
        outcome = decide(limit, running, starts, oldest, position, now)
        if outcome.admitted:
            await self.tx.take_limit_slot(
                name, record.tenant, record.id, step, self.owner, record.fence, now
            )
            running += 1
            if rate:
                starts += 1
                oldest = now if oldest is None else oldest
        self._usage[name] = (running, starts, oldest)
        return outcome

    def release(self, record: WorkflowRecord, steps: list[str]) -> None:
        """Free the slots of ``steps`` (no longer running) of ``record`` — queued, and
        written in one statement before the next admission or at the end."""
        self._releases.extend((record.tenant, record.id, step) for step in steps)

    async def _write_releases(self) -> None:
        if not self._releases:
            return
        released = await self.tx.release_limit_slots(self._releases)
        self._releases = []
        for name in released:
            if name in self._usage:
                running, starts, oldest = self._usage[name]
                self._usage[name] = (max(0, running - 1), starts, oldest)
        self._released.update(released)
        self._freed.update(released)

    async def drop_waiters(self, record: WorkflowRecord, steps: list[str]) -> None:
        """``steps`` of ``record`` no longer wait for any limit."""
        await self.tx.drop_limit_waiters(record.tenant, record.id, steps)

    async def take_freed(self, now: float) -> list[tuple[str, int]]:
        """(limit, free slots) of the limits this transaction freed slots of, and
        forgets them (a hand-off claims the next waiters into the transaction)."""
        await self._write_releases()
        out: list[tuple[str, int]] = []
        for name in sorted(self._freed):
            free = await self._free(name, now)
            if free >= 1:
                out.append((name, min(free, 1000)))
        self._freed.clear()
        return out

    async def _free(self, name: str, now: float) -> int:
        limit = self.limits.get(name)
        if limit is None:
            return 0
        usage = self._usage.get(name)
        if usage is None:  # a reading is enough: the admission decides under the lock
            usage = await self.tx.lock_limit(
                name, now, rate=limit.per_second is not None, lock=False
            )
        running, starts, _ = usage
        free = math.inf if limit.concurrency is None else limit.concurrency - running
        if limit.per_second is not None:
            free = min(free, limit.per_second - starts)
        return 1000 if free == math.inf else int(free)

    async def wake(self, now: float) -> bool:
        """Make the next waiters of every limit that freed slots due now (fair order).

        Returns:
            True if some limit had room to offer (runners should look for due work).
        """
        await self._write_releases()
        woke = False
        for name in sorted(self._released):
            free = await self._free(name, now)
            if free >= 1:
                await self.tx.wake_limit_waiters(name, free, now, now - WAITER_TTL)
                woke = True
        self._released.clear()
        return woke
