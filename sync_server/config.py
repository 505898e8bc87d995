"""Server settings, with defaults that are safe to deploy (LESSONS: unsafe defaults)."""

from __future__ import annotations

import os
import re
import socket
import uuid
from dataclasses import dataclass, field

from protocol import MAX_FRAME_BYTES, UsageError
from protocol.limits import MAX_PAGE_BYTES, SEND_QUEUE_BYTES

__all__ = ["DEFAULT_DATABASE_URL", "RETENTION_DEFAULTS", "ServerConfig", "parse_duration"]

DEFAULT_DATABASE_URL = "sqlite:///./sync.db"
_DAY = 86_400.0
RETENTION_DEFAULTS = {
    "retention_events": 7 * _DAY,
    "retention_workflows": 30 * _DAY,
    "retention_results": 30 * _DAY,
    "retention_outbox": 7 * _DAY,
    "retention_dead_letters": 30 * _DAY,
}
"""Retention windows in seconds (``0`` keeps forever); env ``SYNC_RETENTION_*``."""
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": _DAY}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")


def parse_duration(text: str, *, name: str = "duration") -> float:
    """Seconds in ``90s``, ``15m``, ``12h``, ``7d`` or a plain number of seconds.

    Args:
        text: the duration.
        name: what it configures, for the error message.

    Returns:
        The duration in seconds (``0`` for ``"0"``).

    Raises:
        UsageError: not a non-negative duration in one of those forms.
    """
    match = _DURATION.fullmatch(text)
    if match is None:
        raise UsageError(
            f"{name}: {text!r} is not a duration; use e.g. 90s, 15m, 12h, 7d (0 keeps forever)"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def _env_bytes(name: str, default: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{name} must be a number of bytes, got {text!r}") from None


def _default_server_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(slots=True)
class ServerConfig:
    """Everything an instance can be tuned by.

    Attributes:
        database_url: ``sqlite:///path`` or ``postgresql://…`` (env ``SYNC_DATABASE_URL``).
        auth_secret: HS256 secret for tokens (env ``SYNC_AUTH_SECRET``); required.
        server_id: this instance's name (lease owner, Welcome).
        max_frame_bytes: largest accepted WebSocket frame / HTTP body (4413 / 413 above).
        page_size: events per catch-up page.
        send_queue_limit: frames queued per connection before it is cut off (1013).
        max_connections: WebSocket connections per instance (1013 when full).
        hello_timeout: seconds a new connection may take to say Hello (4400 after).
        allowed_origins: browser Origins allowed on the WebSocket; None allows any.
        push_rate: pushes per second per client (token bucket refill).
        push_burst: pushes a client may make in a burst.
        lease_seconds: saga lease timeout (another instance resumes after it).
        alert_webhook: URL that receives alerts as JSON, if set.
        completion_webhook: URL notified (through the outbox, with retries) when a
            workflow ends, if set.
        source_priority: reconciliation sources, strongest first (env
            ``SYNC_SOURCE_PRIORITY``, e.g. ``job-queue,open-api,mini-app``).
        reconcile_interval: seconds between reconciliation sweeps.
        reconcile_grace: seconds a job may be unknown at its source before it is resubmitted.
        reconcile_horizon: seconds a job may run at its source before its step is re-run.
        run_sagas: run workflows on this instance (False: a sync-only instance that
            accepts and serves workflows while other instances execute them).
        retention_events: seconds after a workflow ended that its events are pruned
            (env ``SYNC_RETENTION_EVENTS``; default 7 d; ``0`` keeps them forever).
        retention_workflows: seconds after it ended that a workflow row is deleted (env
            ``SYNC_RETENTION_WORKFLOWS``; default 30 d).
        retention_results: seconds a mutation's result is kept for answering resends
            (env ``SYNC_RETENTION_RESULTS``; default 30 d); each client's last applied
            id is kept forever, so exactly-once holds regardless.
        retention_outbox: seconds a delivered outbox item is kept (env
            ``SYNC_RETENTION_OUTBOX``; default 7 d).
        retention_dead_letters: seconds a resolved or requeued dead letter is kept (env
            ``SYNC_RETENTION_DEAD_LETTERS``; default 30 d).
        retention_interval: seconds between pruning rounds once caught up.
        page_bytes: byte budget of a catch-up or pull page (one larger event still
            travels alone; env ``SYNC_PAGE_BYTES``).
        send_queue_bytes: encoded bytes queued per connection before it is cut off
            (1013), besides ``send_queue_limit`` frames (env ``SYNC_SEND_QUEUE_BYTES``).
    """

    database_url: str = DEFAULT_DATABASE_URL
    auth_secret: str = ""
    server_id: str = field(default_factory=_default_server_id)
    max_frame_bytes: int = MAX_FRAME_BYTES
    page_size: int = 500
    send_queue_limit: int = 1000
    max_connections: int = 10_000
    hello_timeout: float = 10.0
    allowed_origins: frozenset[str] | None = None
    push_rate: float = 200.0
    push_burst: float = 400.0
    lease_seconds: float = 10.0
    alert_webhook: str | None = None
    completion_webhook: str | None = None
    source_priority: tuple[str, ...] | None = None
    reconcile_interval: float = 5.0
    reconcile_grace: float = 2.0
    reconcile_horizon: float = 900.0
    run_sagas: bool = True
    retention_events: float | None = None
    retention_workflows: float | None = None
    retention_results: float | None = None
    retention_outbox: float | None = None
    retention_dead_letters: float | None = None
    retention_interval: float = 60.0
    page_bytes: int = field(default_factory=lambda: _env_bytes("SYNC_PAGE_BYTES", MAX_PAGE_BYTES))
    send_queue_bytes: int = field(
        default_factory=lambda: _env_bytes("SYNC_SEND_QUEUE_BYTES", SEND_QUEUE_BYTES)
    )

    def __post_init__(self) -> None:
        if not self.auth_secret:
            self.auth_secret = os.environ.get("SYNC_AUTH_SECRET", "")
        if not self.auth_secret:
            raise UsageError(
                "no auth secret: set SYNC_AUTH_SECRET (or pass auth_secret=) so tokens can "
                "be verified"
            )
        if self.source_priority is None:
            from sync_server.reconcile.rules import DEFAULT_PRIORITY, ReconcileRules

            text = os.environ.get("SYNC_SOURCE_PRIORITY")
            self.source_priority = ReconcileRules.parse_priority(text) if text else DEFAULT_PRIORITY
        for name, default in RETENTION_DEFAULTS.items():
            value = getattr(self, name)
            if value is None:
                text = os.environ.get(f"SYNC_{name.upper()}")
                value = default if text is None else parse_duration(text, name=name)
            if not value >= 0 or value == float("inf"):  # NaN fails ">= 0"
                raise UsageError(f"{name} must be a finite number of seconds >= 0, got {value}")
            setattr(self, name, float(value))
        if len(self.auth_secret.encode()) < 32:
            raise UsageError("the auth secret must be at least 32 bytes (RFC 7518 for HS256)")

    def retention(self, name: str) -> float:
        """A retention window in seconds (0 keeps forever), e.g. ``retention("events")``."""
        value = getattr(self, f"retention_{name}")
        assert isinstance(value, float)
        return value

    def origin_allowed(self, origin: str) -> bool:
        """Whether a browser ``Origin`` may open a WebSocket."""
        return self.allowed_origins is None or origin in self.allowed_origins
