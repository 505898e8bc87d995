"""Column lists, the JSON codec and row <-> record conversion shared by both backends.

Both backends store JSON as text (``msgspec.json``) and timestamps as float epoch
seconds, so one set of converters serves SQLite rows (tuples) and asyncpg records
(indexable the same way), as long as the SELECT lists below are used.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from sync_server.store.records import (
    BreakerRecord,
    DlqEntry,
    OutboxItem,
    StoredEvent,
    WorkflowRecord,
)

__all__ = [
    "BREAKER_COLUMNS",
    "DLQ_COLUMNS",
    "EVENT_COLUMNS",
    "OUTBOX_COLUMNS",
    "WORKFLOW_COLUMNS",
    "WORKFLOW_COLUMN_COUNT",
    "Row",
    "breaker_from_row",
    "client_owned_message",
    "dlq_from_row",
    "dumps",
    "event_from_row",
    "loads",
    "outbox_from_row",
    "workflow_from_row",
    "workflow_params",
]


class Row(Protocol):
    """A result row indexable by position: a sqlite3 tuple or an asyncpg Record."""

    def __getitem__(self, index: int, /) -> Any: ...


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()

WORKFLOW_COLUMNS = (
    "id, tenant, name, status, input, state, progress, result, error, version, "
    "created_at, updated_at, created_by, due_at, lease_owner, lease_until, fence, "
    "workflow_version"
)
WORKFLOW_COLUMN_COUNT = len(WORKFLOW_COLUMNS.split(","))
EVENT_COLUMNS = "seq, tenant, workflow_id, wf_seq, type, data, at"
OUTBOX_COLUMNS = (
    "id, destination, payload, event_seq, status, retry_count, max_retries, "
    "next_retry_at, published_at, last_error, created_at"
)
DLQ_COLUMNS = (
    "id, tenant, workflow_id, step, reason, attempts, last_error, created_at, status, resolved_at"
)
BREAKER_COLUMNS = "name, state, failures, opened_at, updated_at, probe_owner, probe_until"


def client_owned_message(client_id: str) -> str:
    """The ``Forbidden`` message for a client id another subject of the tenant owns."""
    return (
        f"client id {client_id!r} belongs to another subject of this tenant; "
        "each device or user needs its own client id"
    )


def dumps(value: Any) -> str:
    """Encode user JSON as text (``None`` becomes ``"null"``)."""
    return _encoder.encode(value).decode()


def loads(text: str | bytes | None) -> Any:
    """Decode JSON text; a SQL NULL reads as ``None``."""
    if text is None:
        return None
    return _decoder.decode(text)


def _float(value: float | None) -> float | None:
    # SQLite hands back integral REALs as int in RETURNING rows; keep the record's types.
    return None if value is None else float(value)


NEW_DLQ_COLUMNS = (
    "tenant, workflow_id, step, reason, attempts, last_error, created_at, status, resolved_at"
)
"""The columns a new dead letter is inserted with (its id is assigned by the database)."""


def new_dlq_params(entry: DlqEntry) -> tuple[Any, ...]:
    """Values for ``NEW_DLQ_COLUMNS``, in order (one place for both backends)."""
    return (
        entry.tenant,
        entry.workflow_id,
        entry.step,
        entry.reason,
        entry.attempts,
        entry.last_error,
        entry.created_at,
        entry.status,
        entry.resolved_at,
    )


def workflow_params(wf: WorkflowRecord) -> tuple[Any, ...]:
    """Values for ``WORKFLOW_COLUMNS``, in order."""
    return (
        wf.id,
        wf.tenant,
        wf.name,
        wf.status,
        dumps(wf.input),
        dumps(wf.state),
        float(wf.progress),
        dumps(wf.result),
        wf.error,
        wf.version,
        float(wf.created_at),
        float(wf.updated_at),
        wf.created_by,
        None if wf.due_at is None else float(wf.due_at),
        wf.lease_owner,
        None if wf.lease_until is None else float(wf.lease_until),
        wf.fence,
        wf.workflow_version,
    )


def workflow_from_row(row: Row) -> WorkflowRecord:
    """A ``WorkflowRecord`` from a row selected with ``WORKFLOW_COLUMNS``."""
    return WorkflowRecord(
        id=row[0],
        tenant=row[1],
        name=row[2],
        status=row[3],
        input=loads(row[4]),
        state=loads(row[5]),
        progress=float(row[6]),
        result=loads(row[7]),
        error=row[8],
        version=row[9],
        created_at=float(row[10]),
        updated_at=float(row[11]),
        created_by=row[12],
        due_at=_float(row[13]),
        lease_owner=row[14],
        lease_until=_float(row[15]),
        fence=row[16],
        workflow_version=row[17],
    )


def event_from_row(row: Row) -> StoredEvent:
    """A ``StoredEvent`` from a row selected with ``EVENT_COLUMNS``."""
    return StoredEvent(row[0], row[1], row[2], row[3], row[4], loads(row[5]), float(row[6]))


def outbox_from_row(row: Row) -> OutboxItem:
    """An ``OutboxItem`` from a row selected with ``OUTBOX_COLUMNS``."""
    return OutboxItem(
        id=row[0],
        destination=row[1],
        payload=loads(row[2]),
        event_seq=row[3],
        status=row[4],
        retry_count=row[5],
        max_retries=row[6],
        next_retry_at=float(row[7]),
        published_at=_float(row[8]),
        last_error=row[9],
        created_at=float(row[10]),
    )


def dlq_from_row(row: Row) -> DlqEntry:
    """A ``DlqEntry`` from a row selected with ``DLQ_COLUMNS``."""
    return DlqEntry(
        id=row[0],
        tenant=row[1],
        workflow_id=row[2],
        step=row[3],
        reason=row[4],
        attempts=row[5],
        last_error=row[6],
        created_at=row[7],
        status=row[8],
        resolved_at=row[9],
    )


def breaker_from_row(row: Row) -> BreakerRecord:
    """A ``BreakerRecord`` from a row selected with ``BREAKER_COLUMNS``."""
    return BreakerRecord(
        name=row[0],
        state=row[1],
        failures=row[2],
        opened_at=row[3],
        updated_at=row[4],
        probe_owner=row[5],
        probe_until=row[6],
    )
