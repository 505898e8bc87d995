"""The rows of the store as Python values: workflows, events, outbox items, dead
letters, breakers — what every layer above the store reads and writes.

``WorkflowKey`` is a workflow's identity: workflow ids are chosen by clients, so they are
unique only within a tenant (SPEC promise 6), and every lookup names both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from protocol import Event
from protocol.jsontypes import JSON

__all__ = [
    "BreakerRecord",
    "DlqEntry",
    "FencedWrite",
    "NewEvent",
    "OutboxItem",
    "RoundTrips",
    "StoredEvent",
    "WorkflowKey",
    "WorkflowRecord",
]


class WorkflowKey(NamedTuple):
    """What identifies a workflow: its tenant and its (client-chosen) id."""

    tenant: str
    id: str


@dataclass(slots=True)
class WorkflowRecord:
    """One row of the workflow projection.

    ``state`` is the saga machine's JSON state (steps and their attempts); ``version``
    is the last ``wf_seq`` used for this workflow; ``fence`` increases on every lease
    acquisition and fences a stale owner's writes; ``workflow_version`` is the version of
    the definition the workflow started with (only instances that have it run it).
    """

    id: str
    tenant: str
    name: str
    status: str
    input: JSON = field(default_factory=dict)
    state: JSON = field(default_factory=dict)
    progress: float = 0.0
    result: JSON = None
    error: str | None = None
    version: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    created_by: str | None = None
    due_at: float | None = None
    lease_owner: str | None = None
    lease_until: float | None = None
    fence: int = 0
    workflow_version: str = ""

    @property
    def key(self) -> WorkflowKey:
        """``(tenant, id)``: the workflow's identity in the store."""
        return WorkflowKey(self.tenant, self.id)


@dataclass(slots=True, frozen=True)
class NewEvent:
    """An event waiting in a transaction for its position."""

    tenant: str
    workflow_id: str
    wf_seq: int
    type: str
    data: JSON
    at: float


@dataclass(slots=True, frozen=True)
class StoredEvent:
    """An event of the log with its global position."""

    seq: int
    tenant: str
    workflow_id: str
    wf_seq: int
    type: str
    data: JSON
    at: float

    def to_wire(self) -> Event:
        """The protocol ``Event`` for this row (without tenant and wf_seq)."""
        return Event(
            seq=self.seq, workflow_id=self.workflow_id, type=self.type, data=self.data, at=self.at
        )


@dataclass(slots=True)
class OutboxItem:
    """A message for an external consumer (e.g. a completion webhook)."""

    id: int
    destination: str
    payload: JSON
    event_seq: int | None = None
    status: str = "pending"  # pending | published | dead
    retry_count: int = 0
    max_retries: int = 8
    next_retry_at: float = 0.0
    published_at: float | None = None
    last_error: str | None = None
    created_at: float = 0.0


@dataclass(slots=True)
class DlqEntry:
    """A dead letter: a step (or outbox item) that exhausted its attempts."""

    id: int
    tenant: str
    workflow_id: str
    step: str | None
    reason: str
    attempts: int
    last_error: str | None
    created_at: float
    status: str = "open"  # open | requeued | resolved
    resolved_at: float | None = None


@dataclass(slots=True)
class BreakerRecord:
    """Shared state of one circuit breaker (see ``sync_server.saga.breaker``)."""

    name: str
    state: str = "closed"  # closed | open | half_open
    failures: int = 0
    opened_at: float | None = None
    updated_at: float = 0.0
    probe_owner: str | None = None
    probe_until: float | None = None


@dataclass(slots=True)
class FencedWrite:
    """A workflow row computed from this instance's own copy, to be written only if the
    stored row is still that copy: leased to the writer with ``fence`` and at
    ``expected_version`` (every other change of a row appends an event, which bumps its
    version). ``events`` are written with it, or not at all."""

    record: WorkflowRecord
    fence: int
    expected_version: int
    events: list[NewEvent]


class RoundTrips:
    """How many times a store has waited on its database: one per statement sent
    (a pipelined ``executemany`` counts once), BEGIN and COMMIT included. On SQLite,
    which runs in-process, it counts statements the same way (``python -m bench``: the
    round trips per workflow)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0
