"""Watch the shared store for trouble a human must hear about, and keep the gauges fresh.

Theory of operation
-------------------
``AlertMachine`` is the pure core: the shell feeds it readings (``receive_dlq_depth``,
``receive_lag``) with ``now`` and drains ``alerts_to_send()``. Its rules:

* **DLQ growing** — the number of open dead letters rose since the previous reading
  (the first reading is the baseline, so a restart does not re-announce old letters);
* **event processing delayed** — a backlog (``saga``: the most overdue workflow no
  instance runs; ``outbox``: the oldest undelivered outbox item; ``hub``: the oldest
  committed event not yet fanned out) is older than ``delay_threshold`` (SPEC: a
  minute). It fires once when the lag crosses the threshold and re-arms only after the
  lag fell below it, so a stuck backlog is one alert, not one per reading.

``MonitorRunner`` is the shell: every ``interval`` seconds it reads the store (open dead
letters, breakers, outbox stats, due workflows, the hub's cursor), sets the gauges of
``Metrics`` and hands the machine's alerts to the sink.

``AlertLog`` wraps the instance's alert sink (log line + optional webhook, see
``sync_server.saga.alerts``): it counts ``tether_alerts_total{kind}`` and keeps the latest
alerts for the dashboard. Every alert of the instance goes through it: the saga runner's
(``step_failed`` — a dead letter was added, ``breaker_open``, ``compensation_failed``),
this monitor's (``dlq_growing``, ``processing_delayed``) and reconciliation's
(``reconciliation_failed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from protocol import StorageError
from sync_server.metrics import BREAKER_STATE_VALUES, Metrics
from sync_server.saga.alerts import Alerts
from sync_server.store.base import Store

__all__ = [
    "DELAY_THRESHOLD",
    "AlertLog",
    "AlertMachine",
    "MonitorRunner",
    "RaisedAlert",
]

log = logging.getLogger("tether.monitor")

DELAY_THRESHOLD = 60.0
"""Seconds of backlog after which processing counts as delayed (an alert)."""


@dataclass(frozen=True, slots=True)
class RaisedAlert:
    """One alert: what, a sentence for a human, machine-readable details, when."""

    kind: str
    message: str
    details: dict[str, Any]
    at: float


class AlertMachine:
    """Pure alert rules over periodic readings (no I/O, no clock).

    Args:
        delay_threshold: seconds of lag that count as delayed processing.
    """

    def __init__(self, delay_threshold: float = DELAY_THRESHOLD) -> None:
        self.delay_threshold = delay_threshold
        self._dlq: int | None = None
        self._delayed: set[str] = set()
        self._out: list[RaisedAlert] = []

    def receive_dlq_depth(self, depth: int, now: float) -> None:
        """The number of open dead letters now."""
        if self._dlq is not None and depth > self._dlq:
            self._out.append(
                RaisedAlert(
                    "dlq_growing",
                    f"dead-letter queue grew from {self._dlq} to {depth} open entries",
                    {"depth": depth, "previous": self._dlq, "added": depth - self._dlq},
                    now,
                )
            )
        self._dlq = depth

    def receive_lag(self, backlog: str, seconds: float, now: float) -> None:
        """How long the oldest item of ``backlog`` (saga, outbox, hub) has waited."""
        if seconds > self.delay_threshold:
            if backlog not in self._delayed:
                self._delayed.add(backlog)
                self._out.append(
                    RaisedAlert(
                        "processing_delayed",
                        f"{backlog} processing delayed: the oldest item has waited "
                        f"{seconds:.0f} s (threshold {self.delay_threshold:.0f} s)",
                        {"backlog": backlog, "lag_seconds": round(seconds, 3)},
                        now,
                    )
                )
        else:
            self._delayed.discard(backlog)

    def alerts_to_send(self) -> list[RaisedAlert]:
        """Drain the alerts decided since the last call."""
        out, self._out = self._out, []
        return out


class AlertLog:
    """The instance's alert sink: counts alerts, keeps the latest, forwards to ``sink``.

    Args:
        sink: where alerts go (log line, webhook): an ``Alerts``.
        metrics: the instance's metrics (``tether_alerts_total``).
        keep: how many recent alerts to remember for the dashboard.
        clock: wall clock.
    """

    def __init__(
        self,
        sink: Alerts,
        metrics: Metrics,
        *,
        keep: int = 50,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sink = sink
        self.metrics = metrics
        self.recent: deque[RaisedAlert] = deque(maxlen=keep)
        self._clock = clock

    def alert(self, kind: str, message: str, details: dict[str, Any]) -> None:
        """Raise one alert (never blocks; a failing sink is logged, not raised)."""
        self.metrics.alerts.labels(kind).inc()
        self.recent.append(RaisedAlert(kind, message, dict(details), self._clock()))
        try:
            self.sink.alert(kind, message, details)
        except Exception:
            log.exception("alert sink failed for %s", kind)

    async def aclose(self) -> None:
        """Wait for the sink's deliveries in flight (webhook POSTs), if it has any."""
        close = getattr(self.sink, "aclose", None)
        if close is not None:
            await close()


class _HubLike(Protocol):
    cursor: int


class MonitorRunner:
    """Periodically reads the store, refreshes the backlog gauges, raises alerts.

    Args:
        store: the opened store.
        metrics: gauges to set.
        alerts: where alerts go.
        hub: this instance's hub (its cursor tells the fan-out lag), or None.
        interval: seconds between readings.
        delay_threshold: seconds of backlog that raise ``processing_delayed``.
        clock: wall clock.
    """

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        alerts: Alerts,
        *,
        hub: _HubLike | None = None,
        interval: float = 5.0,
        delay_threshold: float = DELAY_THRESHOLD,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.alerts = alerts
        self.hub = hub
        self.interval = interval
        self.machine = AlertMachine(delay_threshold)
        self.clock = clock
        self.readings = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start reading in the background."""
        self._task = asyncio.create_task(self._loop(), name="tether-monitor")

    async def stop(self) -> None:
        """Stop; idempotent."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.check()
            except StorageError as exc:
                log.warning("monitor could not read the store: %s", exc)
            except Exception:
                # A shell never dies of a bug: log it and read again next time.
                log.exception("monitor check failed")
            await asyncio.sleep(self.interval)

    async def check(self) -> None:
        """Take one reading of every backlog and raise what the rules decide.

        Raises:
            StorageError: the store failed.
        """
        now = self.clock()
        depth, saga_lag = await self.store.backlog_stats(now)
        self.metrics.dlq_depth.set(depth)
        self.machine.receive_dlq_depth(depth, now)
        for breaker in await self.store.list_breakers():
            self.metrics.breaker_state.labels(breaker.name).set(
                BREAKER_STATE_VALUES.get(breaker.state, 0.0)
            )
        pending, oldest = await self.store.outbox_stats(now)
        self.metrics.outbox_pending.set(pending)
        self.metrics.outbox_lag.set(oldest)
        self.machine.receive_lag("outbox", oldest, now)
        self.metrics.saga_lag.set(saga_lag)
        self.machine.receive_lag("saga", saga_lag, now)
        if self.hub is not None:
            hub_lag = await self._hub_lag(now)
            self.metrics.hub_lag.set(hub_lag)
            self.machine.receive_lag("hub", hub_lag, now)
        for raised in self.machine.alerts_to_send():
            self.alerts.alert(raised.kind, raised.message, raised.details)
        self.readings += 1

    async def _hub_lag(self, now: float) -> float:
        """Age of the oldest committed event the hub has not fanned out yet."""
        assert self.hub is not None
        rows = await self.store.read_events(self.hub.cursor, 1)
        return max(0.0, now - rows[0].at) if rows else 0.0
