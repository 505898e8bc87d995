"""Live fan-out of committed events (and ephemeral progress) to connected sessions.

The hub follows the log itself: on every ``events`` notification (same process on
SQLite, any instance through LISTEN/NOTIFY on PostgreSQL) one reader task pages the
store from the hub's cursor and hands each tenant's events, in order and without gaps,
to that tenant's subscribers. One store read serves every connection. Notifications
are only hints: after the notification link reconnects, the hub re-reads from its
cursor, so nothing sent meanwhile is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol import Event, Progress
from sync_server.store.base import Store

__all__ = ["Hub", "Subscriber"]

log = logging.getLogger("tether.hub")


@dataclass(eq=False)
class Subscriber:
    """A connection's interest in one tenant's live events."""

    tenant: str
    on_events: Callable[[list[Event]], None]
    on_progress: Callable[[Progress], None] = field(default=lambda progress: None)


class Hub:
    """Follows the store's log and fans new events out to subscribers.

    Args:
        store: the event store (its notifications drive the hub).
        batch: events read per store round trip.
    """

    def __init__(self, store: Store, *, batch: int = 1000) -> None:
        self.store = store
        self.batch = batch
        self.cursor = 0
        self._subscribers: dict[str, set[Subscriber]] = defaultdict(set)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0

    @property
    def connections(self) -> int:
        """Subscribers currently attached."""
        return sum(len(subs) for subs in self._subscribers.values())

    async def start(self) -> None:
        """Start following the log from its current head."""
        self.cursor = await self.store.head()
        self.store.listen("events", self._on_notify)
        self.store.on_reconnect(self.wake)
        self._task = asyncio.create_task(self._follow(), name="tether-hub")

    async def stop(self) -> None:
        """Stop following; idempotent."""
        self.store.unlisten("events", self._on_notify)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def subscribe(self, subscriber: Subscriber) -> None:
        """Start delivering the subscriber's tenant events to it."""
        self._subscribers[subscriber.tenant].add(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop delivering to it; idempotent."""
        subs = self._subscribers.get(subscriber.tenant)
        if subs is not None:
            subs.discard(subscriber)
            if not subs:
                del self._subscribers[subscriber.tenant]

    def publish_progress(self, tenant: str, progress: Progress) -> None:
        """Hand ephemeral progress to the tenant's local subscribers."""
        for subscriber in list(self._subscribers.get(tenant, ())):
            subscriber.on_progress(progress)

    def wake(self) -> None:
        """Make the reader look at the store now."""
        self._wake.set()

    def _on_notify(self, payload: str) -> None:
        self._wake.set()

    async def _follow(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._drain()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("hub: reading the log failed; will retry on the next notification")
                await asyncio.sleep(0.5)
                self._wake.set()

    async def _drain(self) -> None:
        while True:
            rows = await self.store.read_events(self.cursor, self.batch)
            if not rows:
                return
            self.cursor = rows[-1].seq
            by_tenant: dict[str, list[Event]] = defaultdict(list)
            for row in rows:
                by_tenant[row.tenant].append(row.to_wire())
            for tenant, events in by_tenant.items():
                for subscriber in list(self._subscribers.get(tenant, ())):
                    try:
                        subscriber.on_events(events)
                    except Exception:
                        log.exception("hub: a subscriber failed")
                    self.delivered += len(events)
            if len(rows) < self.batch:
                return
