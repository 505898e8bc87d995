"""Live fan-out of committed events (and ephemeral progress) to connected sessions.

The hub follows the log itself and hands each tenant's events, in order and without
gaps, to that tenant's subscribers; one pass serves every connection.

* Events this process commits arrive at once through ``Store.on_commit`` and wait in a
  small buffer; while the buffer holds the very next positions (``cursor + 1, …``) the
  hub delivers from it without touching the store.
* Everything else — another instance's events, a gap left by a transaction that has
  not reported yet, a lost notification link — is read from the store: an ``events``
  notification (payload: the new head) that is ahead of the hub's cursor triggers a
  paged read from the cursor. Notifications are only hints: after the notification link
  reconnects the hub re-reads, so nothing sent meanwhile is missed.

Ephemeral progress is not in the log. It reaches this instance's subscribers at once;
when other instances share the store it is also sent to them as a notification, at
most every ``progress_interval`` seconds per (workflow, step) with the latest value
winning, so a step that reports thousands of times a second cannot flood the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Protocol

import msgspec

from protocol import Event, Events, Progress, encode
from sync_server.service import cancel_and_wait
from sync_server.store.base import Store, StoredEvent

__all__ = ["Hub", "Subscriber"]

log = logging.getLogger("tether.hub")


class _RemoteProgress(msgspec.Struct, frozen=True, array_like=True):
    origin: str
    tenant: str
    progress: Progress


_progress_codec = msgspec.json.Encoder()
_progress_decoder = msgspec.json.Decoder(_RemoteProgress)


class Subscriber(Protocol):
    """A connection's interest in one tenant's live events (``ws.WsConnection`` is one;
    hashed by identity)."""

    tenant: str

    def on_events(self, events: list[Event]) -> None:
        """A gapless, ordered batch of the tenant's newly committed events."""

    def on_progress(self, progress: Progress) -> None:
        """Ephemeral live progress of one of the tenant's workflows."""


class Hub:
    """Follows the store's log and fans new events out to subscribers.

    Args:
        store: the event store (its notifications drive the hub).
        batch: events read per store round trip.
    """

    def __init__(
        self,
        store: Store,
        *,
        batch: int = 1000,
        origin: str = "",
        progress_interval: float = 0.1,
    ) -> None:
        self.store = store
        self.batch = batch
        self.origin = origin
        self.progress_interval = progress_interval
        self._remote: dict[tuple[str, str, str], tuple[str, Progress]] = {}
        self._local: dict[int, StoredEvent] = {}
        self._known_head = 0
        self._force_read = False
        self._draining = False
        self._flusher: asyncio.Task[None] | None = None
        self.cursor = 0
        self._subscribers: dict[str, set[Subscriber]] = defaultdict(set)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0
        self._frame: tuple[list[Event], int, bytes] | None = None

    @property
    def connections(self) -> int:
        """Subscribers currently attached."""
        return sum(len(subs) for subs in self._subscribers.values())

    async def start(self) -> None:
        """Start following the log from its current head."""
        self.cursor = self._known_head = await self.store.head()
        self.store.on_commit(self._on_commit)
        self.store.listen("events", self._on_notify)
        self.store.listen("progress", self._on_remote_progress)
        self.store.on_reconnect(self._on_reconnect)
        self._task = asyncio.create_task(self._follow(), name="tether-hub")

    async def stop(self) -> None:
        """Stop following; idempotent.

        Raises:
            asyncio.CancelledError: the caller itself is being cancelled.
        """
        self.store.unlisten("events", self._on_notify)
        self.store.unlisten("progress", self._on_remote_progress)
        flusher, self._flusher = self._flusher, None
        task, self._task = self._task, None
        try:
            await cancel_and_wait(flusher)
        finally:  # even when we are cancelled meanwhile, the follower is told to stop
            if task is not None:
                task.cancel()
        await cancel_and_wait(task)

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
        """Hand ephemeral progress to the tenant's subscribers, here and elsewhere."""
        self._deliver_progress(tenant, progress)
        if self.store.multi_instance:
            self._remote[(tenant, progress.workflow_id, progress.step)] = (tenant, progress)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(
                    self._flush_remote(), name="tether-hub-progress"
                )

    def _deliver_progress(self, tenant: str, progress: Progress) -> None:
        for subscriber in list(self._subscribers.get(tenant, ())):
            try:
                subscriber.on_progress(progress)
            except Exception:
                log.exception("hub: a subscriber failed")

    async def _flush_remote(self) -> None:
        while self._remote:
            pending, self._remote = self._remote, {}
            for tenant, progress in pending.values():
                payload = _progress_codec.encode(
                    _RemoteProgress(self.origin, tenant, progress)
                ).decode()
                try:
                    await self.store.notify("progress", payload)
                except Exception as exc:  # progress is best effort; the log is the truth
                    log.warning("hub: could not forward progress: %s", exc)
            await asyncio.sleep(self.progress_interval)

    def _on_remote_progress(self, payload: str) -> None:
        try:
            remote = _progress_decoder.decode(payload)
        except msgspec.DecodeError:
            log.warning("hub: ignoring a malformed progress notification")
            return
        if remote.origin != self.origin:
            self._deliver_progress(remote.tenant, remote.progress)

    def wake(self) -> None:
        """Make the reader look at the store now."""
        self._force_read = True
        self._wake.set()

    def _on_reconnect(self) -> None:
        self.wake()

    def _on_notify(self, payload: str) -> None:
        try:
            self._known_head = max(self._known_head, int(payload))
        except ValueError:
            self._force_read = True
        self._wake.set()

    def _on_commit(self, events: list[StoredEvent]) -> None:
        if len(self._local) > 10 * self.batch:
            self._local.clear()  # the reader fell behind: the store has them all
            self._force_read = True
        for event in events:
            if event.seq > self.cursor:
                self._local[event.seq] = event
        self._known_head = max(self._known_head, events[-1].seq)
        if not self._draining and not self._force_read:
            # The next positions are here and the reader is idle: hand them over now,
            # in the committing task, saving a task switch on the hot path.
            rows = self._next_local()
            if rows:
                self._dispatch_rows(rows)
        if self._local or self._known_head > self.cursor:
            self._wake.set()

    async def _follow(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._draining = True
            try:
                await self._drain()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("hub: reading the log failed; will retry on the next notification")
                await asyncio.sleep(0.5)
                self._wake.set()
            finally:
                self._draining = False

    def _next_local(self) -> list[StoredEvent]:
        rows: list[StoredEvent] = []
        seq = self.cursor + 1
        while seq in self._local and len(rows) < self.batch:
            rows.append(self._local.pop(seq))
            seq += 1
        return rows

    async def _drain(self) -> None:
        while True:
            rows = self._next_local()
            if not rows:
                if not self._force_read and self._known_head <= self.cursor:
                    return
                self._force_read = False
                rows = await self.store.read_events(self.cursor, self.batch)
                if not rows:
                    self._known_head = self.cursor
                    return
                if len(rows) == self.batch:
                    self._force_read = True  # there may be more
                for seq in [seq for seq in self._local if seq <= rows[-1].seq]:
                    del self._local[seq]
            self._dispatch_rows(rows)

    def _dispatch_rows(self, rows: list[StoredEvent]) -> None:
        self.cursor = rows[-1].seq
        by_tenant: dict[str, list[Event]] = defaultdict(list)
        for row in rows:
            by_tenant[row.tenant].append(row.to_wire())
        for tenant, events in by_tenant.items():
            subscribers = list(self._subscribers.get(tenant, ()))
            if not subscribers:
                continue
            self.on_batch(events, len(subscribers))
            for subscriber in subscribers:
                try:
                    subscriber.on_events(events)
                except Exception:
                    log.exception("hub: a subscriber failed")
            self.delivered += len(events) * len(subscribers)

    def frame_for(self, message: Events) -> bytes:
        """``message`` encoded; a live batch forwarded whole by several connections is
        encoded once and they all queue the same bytes (issue 11: no per-connection copy).
        """
        cached = self._frame
        if cached is not None and cached[0] is message.events and cached[1] == message.cursor:
            return cached[2]
        frame = encode(message)
        self._frame = (message.events, message.cursor, frame)
        return frame

    def on_batch(self, events: list[Event], subscribers: int) -> None:
        """Hook called once per tenant batch before it is handed to ``subscribers``
        connections (metrics); does nothing here."""
