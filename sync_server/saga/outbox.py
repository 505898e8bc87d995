"""The outbox relay: deliver messages for external consumers (webhooks), at least once.

Theory of operation
-------------------
A message is written to the ``outbox`` table in the same transaction as the change it
announces (for example the runner's completion notice, ``completion_webhook``), so it can
neither be lost nor sent for a change that rolled back. ``OutboxRelay`` claims due items
(``Store.claim_outbox`` pushes each one ``lease_seconds`` ahead, so two relays never
send it at once), POSTs each ``payload`` as JSON to its ``destination`` with the header
``Idempotency-Key: outbox-<id>`` (the consumer dedupes redeliveries), and records the
outcome with ``finish_outbox``:

* 2xx: ``published``;
* otherwise: ``retry_count + 1`` and ``next_retry_at`` after exponential backoff with
  full jitter; after ``max_retries`` the item is ``dead`` (its own dead letter, with
  ``last_error``) and an alert is raised.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import httpx

from protocol import StorageError
from sync_server import tracing
from sync_server.saga.alerts import Alerts, AlertSink
from sync_server.saga.backoff import exponential_delay
from sync_server.saga.definitions import RetryPolicy
from sync_server.saga.storable import storable_text
from sync_server.service import PeriodicService
from sync_server.store.base import OutboxItem, Store

__all__ = ["OutboxRelay"]

log = logging.getLogger("tether.outbox")


class OutboxRelay(PeriodicService):
    """Relays outbox items to their webhook destinations.

    Args:
        store: the opened store.
        http: the HTTP client (one is created if None).
        alerts: where dead items are reported.
        clock: wall clock.
        rng: jitter source.
        backoff: delays between deliveries of one item (``max_attempts`` is unused:
            each item carries its own ``max_retries``).
        batch: most items claimed at once.
        lease_seconds: how long a claimed item is hidden from other relays.
        poll_interval: seconds between claims when idle.
        timeout: seconds per POST.
    """

    def __init__(
        self,
        store: Store,
        *,
        http: httpx.AsyncClient | None = None,
        alerts: Alerts | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        backoff: RetryPolicy | None = None,
        batch: int = 50,
        lease_seconds: float = 30.0,
        poll_interval: float = 0.5,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(name="outbox-relay", interval=poll_interval)
        self.store = store
        self._http = http
        self._own_http = http is None
        self.alerts: Alerts = alerts or AlertSink()
        self.clock = clock
        self.rng = rng or random.Random()
        self.backoff = backoff or RetryPolicy(base_delay=1.0, max_delay=300.0)
        self.batch = batch
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.published = 0
        self.dead = 0

    async def start(self) -> None:
        """Start relaying in the background."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.timeout)
        await super().start()

    async def stop(self) -> None:
        """Stop relaying (an item in flight is retried later by any relay).

        Raises:
            asyncio.CancelledError: the caller itself is being cancelled.
        """
        try:
            await super().stop()
        finally:
            if self._own_http and self._http is not None:
                await self._http.aclose()
                self._http = None

    async def tick(self) -> float | None:
        """One claim; a full batch means more are due: claim again at once."""
        sent = await self.relay_once()
        return 0 if sent >= self.batch else None

    def tick_failed(self, exc: Exception) -> None:
        """A failed claim is logged (a store failure as a warning) and retried later."""
        if isinstance(exc, StorageError):
            log.warning("outbox claim failed: %s", exc)
        else:
            log.error("outbox relay failed", exc_info=exc)

    async def relay_once(self) -> int:
        """Claim due items and deliver them concurrently; returns how many were claimed."""
        items = await self.store.claim_outbox(self.clock(), self.batch, self.lease_seconds)
        if items:
            await asyncio.gather(*(self._deliver(item) for item in items))
        return len(items)

    async def _deliver(self, item: OutboxItem) -> None:
        assert self._http is not None
        headers = {"Idempotency-Key": f"outbox-{item.id}"}
        span = None
        if tracing.enabled() and isinstance(item.payload, dict):
            # A completion notice carries its workflow's trace (see checkpoint.py).
            span = tracing.start_span(
                "tether.outbox deliver",
                item.payload.get("traceparent"),
                {"tether.outbox.id": item.id, "tether.outbox.attempt": item.retry_count + 1},
                kind="client",
            )
            if span is not None:
                headers["traceparent"] = tracing.traceparent(span)
        try:
            response = await self._http.post(item.destination, json=item.payload, headers=headers)
            error = None if response.is_success else f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            # A consumer's bytes can reach the message: keep it storable (issue 11).
            error = storable_text(f"{type(exc).__name__}: {exc}")[:2000]
        tracing.end_span(span, error=error)
        now = self.clock()
        if error is None:
            item.status = "published"
            item.published_at = now
            item.last_error = None
        else:
            item.retry_count += 1
            item.last_error = error
            if item.retry_count > item.max_retries:
                item.status = "dead"
            else:
                delay = exponential_delay(self.backoff, item.retry_count, self.rng)
                item.next_retry_at = now + delay
        await self.store.finish_outbox(item)
        # Counted and alerted only once the outcome is recorded: a reader that sees the
        # counter move then finds the item settled in the store (no race).
        if item.status == "published":
            self.published += 1
        elif item.status == "dead":
            self.dead += 1
            self.alerts.alert(
                "outbox_dead",
                f"outbox item {item.id} to {item.destination} is dead: {error}",
                {"outbox_id": item.id, "destination": item.destination},
            )
