"""Watch the shared store for trouble a human must hear about, and keep the gauges fresh.

Theory of operation
-------------------
``AlertMachine`` is the pure core: the shell feeds it readings (``receive_dlq_depth``,
``receive_lag``) with ``now`` and drains ``alerts_to_send()``. Its rules:

* **DLQ growing** — the number of open dead letters rose since the previous reading
  (the first reading is the baseline, so a restart does not re-announce old letters);
* **SLO burn** (``slo_burn``) — over the last 1/24 of the SLO window, an objective's
  error budget is spent faster than the window allows (``sync_server.slo``);
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

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from protocol import StorageError
from sync_server.metrics import BREAKER_STATE_VALUES, Metrics
from sync_server.saga.alerts import Alerts
from sync_server.service import PeriodicService
from sync_server.slo import ALL, SloValue, burning, compute_slos, format_window
from sync_server.slo_reader import read_window
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
SLO_WINDOW = 86_400.0
"""The SLOs' window (24 h); ``slo_burn`` looks at the last 1/24 of it (1 h)."""
SLO_INTERVAL = 60.0
"""Seconds between SLO computations (each reads the window's events)."""
MAX_SLO_SCOPES = 200
"""Most (tenant, workflow) scopes exported as gauges (bounded series)."""


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
        self._burning: set[tuple[str, str, str]] = set()
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

    def receive_slos(self, values: list[SloValue], now: float) -> None:
        """SLO values over the short burn window; ``slo_burn`` fires once per objective
        and scope when its budget burns faster than the window allows, and re-arms
        when it no longer does (``sync_server.slo.burning``). A scope absent from
        ``values`` (no samples in the window) no longer burns: forgotten, so the set
        holds only the scopes of the last reading."""
        self._burning &= {(v.name, v.tenant, v.workflow) for v in values}
        for value in values:
            key = (value.name, value.tenant, value.workflow)
            if not burning(value):
                self._burning.discard(key)
                continue
            if key in self._burning:
                continue
            self._burning.add(key)
            scope = "all tenants" if value.tenant == ALL else f"tenant {value.tenant}"
            if value.workflow != ALL:
                scope += f", workflow {value.workflow}"
            self._out.append(
                RaisedAlert(
                    "slo_burn",
                    f"SLO {value.name} ({scope}) burns its error budget too fast: value "
                    f"{value.value:.4g} against objective {value.objective:g} over the "
                    f"last {format_window(value.window)}",
                    {**value.as_json(), "burn_rate": round(1.0 - value.budget_left, 3)},
                    now,
                )
            )

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


class MonitorRunner(PeriodicService):
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
        slo_window: float = SLO_WINDOW,
        slo_interval: float = SLO_INTERVAL,
    ) -> None:
        super().__init__(name="tether-monitor", interval=interval, max_backoff=interval)
        self.store = store
        self.slo_window = slo_window
        self.slo_interval = slo_interval
        self.slos: list[SloValue] = []
        """The latest SLO values over ``slo_window`` (for the dashboard)."""
        self._slo_at = -math.inf
        self.metrics = metrics
        self.alerts = alerts
        self.hub = hub
        self.machine = AlertMachine(delay_threshold)
        self.clock = clock
        self.readings = 0

    async def tick(self) -> None:
        """One reading (``check``); the service base runs it every ``interval``."""
        await self.check()

    def tick_failed(self, exc: Exception) -> None:
        """A failed reading is logged; the next one comes an ``interval`` later."""
        if isinstance(exc, StorageError):
            log.warning("monitor could not read the store: %s", exc)
        else:  # a shell never dies of a bug: log it and read again next time
            log.error("monitor check failed", exc_info=exc)

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
        self.metrics.set_version_counts(await self.store.version_counts())
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
        if now - self._slo_at >= self.slo_interval:
            await self.refresh_slos(now)
        for raised in self.machine.alerts_to_send():
            self.alerts.alert(raised.kind, raised.message, raised.details)
        self.readings += 1

    async def refresh_slos(self, now: float) -> None:
        """Recompute the SLOs over ``slo_window``, set their gauges (the first
        ``MAX_SLO_SCOPES`` scopes: overall, per workflow name, per tenant, per tenant and
        workflow), and feed the short burn window (1/24 of it) to the alert rules.

        Raises:
            StorageError: the store failed.
        """
        rows = await read_window(self.store, now - self.slo_window)
        self._slo_at = now
        self.slos = compute_slos(rows, now, self.slo_window)
        for gauge in (self.metrics.slo_value, self.metrics.slo_budget_left):
            gauge.clear()
        scopes: set[tuple[str, str]] = set()
        for value in self.slos:
            scope = (value.tenant, value.workflow)
            if scope not in scopes and len(scopes) >= MAX_SLO_SCOPES:
                continue
            scopes.add(scope)
            self.metrics.slo_objective.labels(value.name).set(value.objective)
            labels = (value.name, value.tenant, value.workflow)
            if value.value is not None:
                self.metrics.slo_value.labels(*labels).set(value.value)
            self.metrics.slo_budget_left.labels(*labels).set(value.budget_left)
        self.machine.receive_slos(compute_slos(rows, now, self.slo_window / 24), now)

    async def _hub_lag(self, now: float) -> float:
        """Age of the oldest committed event the hub has not fanned out yet."""
        assert self.hub is not None
        rows = await self.store.read_events(self.hub.cursor, 1)
        return max(0.0, now - rows[0].at) if rows else 0.0
