"""Alerts: tell a human that something needs attention.

The runner raises an alert when a dead letter is added, a circuit breaker opens, or a
compensation fails for good. ``AlertSink`` writes one structured log line per alert and,
when a webhook URL is configured, POSTs the alert as JSON in the background (best
effort: an unreachable webhook is logged, never retried forever, never blocks the
engine). Anything with an ``alert(kind, message, details)`` method will do (``Alerts``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import httpx

__all__ = ["AlertSink", "Alerts", "RecordingAlerts"]

log = logging.getLogger("tether.alerts")


class Alerts(Protocol):
    """Where alerts go."""

    def alert(self, kind: str, message: str, details: dict[str, Any]) -> None:
        """Raise one alert (must not block)."""


class AlertSink:
    """Log every alert; optionally POST it to a webhook.

    Args:
        webhook_url: where to POST ``{"kind", "message", "details", "at"}``, or None.
        http: the client used for the webhook (one is created on demand if None).
        clock: the wall clock (seconds).
        timeout: seconds per webhook POST.
    """

    def __init__(
        self,
        webhook_url: str | None = None,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float = 5.0,
    ) -> None:
        self.webhook_url = webhook_url
        self._http = http
        self._own_http = http is None
        self._clock = clock
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0

    def alert(self, kind: str, message: str, details: dict[str, Any]) -> None:
        """Log the alert and, with a webhook, schedule its POST."""
        log.warning("ALERT %s: %s %s", kind, message, details)
        if self.webhook_url is None:
            return
        body = {"kind": kind, "message": message, "details": details, "at": self._clock()}
        try:
            task = asyncio.get_running_loop().create_task(self._post(body))
        except RuntimeError:
            log.error("alert webhook skipped: no running event loop")
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, body: dict[str, Any]) -> None:
        assert self.webhook_url is not None
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._timeout)
        try:
            response = await self._http.post(self.webhook_url, json=body)
            response.raise_for_status()
            self.sent += 1
        except httpx.HTTPError as exc:
            log.error("alert webhook %s failed: %s", self.webhook_url, exc)

    async def aclose(self) -> None:
        """Wait for webhook POSTs in flight (bounded by their timeout), then close the
        HTTP client if this sink created it."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._own_http and self._http is not None:
            await self._http.aclose()
            self._http = None


class RecordingAlerts:
    """An ``Alerts`` that keeps every alert in memory (tests, the demo's report)."""

    def __init__(self) -> None:
        self.alerts: list[tuple[str, str, dict[str, Any]]] = []

    def alert(self, kind: str, message: str, details: dict[str, Any]) -> None:
        """Remember the alert and log it."""
        log.warning("ALERT %s: %s %s", kind, message, details)
        self.alerts.append((kind, message, details))

    def kinds(self) -> list[str]:
        """The kinds raised so far, in order."""
        return [kind for kind, _, _ in self.alerts]
