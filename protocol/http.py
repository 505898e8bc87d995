"""The JSON bodies of the HTTP API, as msgspec Structs (the WebSocket's are in
``protocol.messages``).

The routes of ``sync_server.http_api`` and ``sync_server.dashboard`` answer with these,
the SDK decodes them typed, and ``sync_server.openapi`` generates the document's schemas
from them — one definition of each body. Fields marked ``UNSET`` are omitted from the
JSON when unset (a tenant admin's overview shows less than a global admin's).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from protocol.errors import ErrorCode
from protocol.messages import Event, Id, Mutation, MutationResult, WorkflowSnapshot

__all__ = [
    "AlertItem",
    "BreakerItem",
    "DeadLetter",
    "DlqList",
    "ErrorBody",
    "ErrorDetail",
    "Health",
    "Overview",
    "PullResponse",
    "PushRequest",
    "PushResponse",
    "Ready",
    "SloItem",
    "SloList",
    "UpgradeRequest",
    "VersionCount",
    "WorkflowPage",
]


class _Body(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """A JSON body; unknown fields are ignored (newer peers may add some)."""


# ------------------------------------------------------------- sync fallback


class PushRequest(_Body, frozen=True):
    """Body of ``POST /v1/push``."""

    client_id: Id
    mutations: Annotated[list[Mutation], msgspec.Meta(min_length=1)]


class PushResponse(_Body, frozen=True):
    """Answer of ``POST /v1/push``."""

    results: list[MutationResult]


class PullResponse(_Body, frozen=True):
    """Answer of ``GET /v1/pull``."""

    events: list[Event]
    cursor: int
    has_more: bool
    horizon: int = 0
    """As ``Welcome.horizon``: the HTTP fallback's reset signal."""


# ------------------------------------------------------------- workflows


class UpgradeRequest(_Body, frozen=True):
    """Body of ``POST /v1/workflows/{id}/upgrade`` (admin): the version to move to."""

    version: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class WorkflowPage(_Body, frozen=True):
    """Answer of ``GET /v1/workflows``: a page, newest first; ``next_cursor`` resumes
    after its last row (null: no more). The SDK's ``find_workflows`` returns it.

    Attributes:
        workflows: canonical snapshots (``workflow_version`` included).
        next_cursor: pass it as ``cursor`` for the next page; None when there is none.
    """

    workflows: list[WorkflowSnapshot]
    next_cursor: str | None = None


# ------------------------------------------------------------- errors, health


class ErrorDetail(_Body, frozen=True):
    """What went wrong: a machine code, a sentence, and whether retrying may help."""

    code: ErrorCode
    message: str
    retryable: bool


class ErrorBody(_Body, frozen=True):
    """The body of every error answer."""

    error: ErrorDetail


class Health(_Body, frozen=True):
    """Answer of ``GET /healthz``."""

    status: str


class Ready(_Body, frozen=True):
    """Answer of ``GET /readyz`` when ready."""

    status: str
    server_id: str


# ------------------------------------------------------------- operations


class DeadLetter(_Body, frozen=True):
    """A dead letter: a step (or outbox item) that exhausted its attempts."""

    id: int
    tenant: str
    workflow_id: str
    step: str | None
    reason: str
    attempts: int
    last_error: str | None
    created_at: float
    status: str = "open"
    """``open`` | ``requeued`` | ``resolved``."""
    resolved_at: float | None = None


class DlqList(_Body, frozen=True):
    """Answer of ``GET /v1/dlq``."""

    entries: list[DeadLetter]


class SloItem(_Body, frozen=True):
    """One SLO over one scope (``sync_server.slo``); ``value`` is null without samples."""

    name: str
    objective: float
    value: float | None
    budget_left: float
    window: str
    tenant: str
    workflow: str
    samples: int


class SloList(_Body, frozen=True):
    """Answer of ``GET /v1/slo``."""

    slos: list[SloItem]


class AlertItem(_Body, frozen=True):
    """A recent alert as the dashboard shows it."""

    kind: str
    message: str
    at: float


class VersionCount(_Body, frozen=True):
    """How many workflows of one definition version are in one status."""

    workflow: str
    version: str
    status: str
    count: int


class BreakerItem(_Body, frozen=True):
    """A circuit breaker; its failure count and opening time only for a global admin."""

    name: str
    state: str
    failures: int | msgspec.UnsetType = msgspec.UNSET
    opened_at: float | msgspec.UnsetType | None = msgspec.UNSET


class Overview(_Body, frozen=True):
    """Answer of ``GET /v1/admin/overview`` (admin): everything the dashboard shows.

    ``metrics`` holds ``dlq_depth`` and ``alerts`` for a tenant admin; a global admin
    also gets the instance's counters (``connected_clients``, ``workflows_started``, …).
    """

    server_id: str
    head: int
    counts: dict[str, int]
    total: int
    workflows: list[WorkflowSnapshot]
    dlq: list[DeadLetter]
    slos: list[SloItem]
    alerts: list[AlertItem]
    versions: list[VersionCount]
    breakers: list[BreakerItem]
    metrics: dict[str, float]
