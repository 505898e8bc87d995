"""The SQLite unit of work, and the error-converting query helpers it shares.

Theory of operation
-------------------
A ``SqliteTransaction`` wraps the store's single writer connection inside
``BEGIN IMMEDIATE`` (``SqliteStore.run`` owns BEGIN/COMMIT), so the whole database is
write-locked for the unit of work and ``lock=True`` reads need nothing extra.

Appended events stay in ``pending_events`` until ``_write_events``, which ``run`` calls
as the last statements before COMMIT: positions are ``MAX(seq) + 1 …`` read under the
write lock, hence assigned in commit order (SPEC promise 4, gapless order).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any

from protocol import Forbidden, StorageError
from sync_server.store import rows
from sync_server.store.base import (
    BreakerRecord,
    DlqEntry,
    StoredEvent,
    Transaction,
    WorkflowRecord,
)

__all__ = ["SqliteSql", "SqliteTransaction"]

JSON = Any

_WF = rows.WORKFLOW_COLUMNS
_EV = rows.EVENT_COLUMNS
_DLQ = rows.DLQ_COLUMNS
_BR = rows.BREAKER_COLUMNS


class SqliteSql:
    """sqlite3 calls that convert library errors where the library is called (STYLE)."""

    def _sql_conn(self) -> sqlite3.Connection:
        raise NotImplementedError

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._sql_conn().execute(sql, params)
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite failed: {exc}") from exc

    def _executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        try:
            self._sql_conn().executemany(sql, params)
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite failed: {exc}") from exc

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        try:
            return self._sql_conn().execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite failed: {exc}") from exc

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._sql_conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite failed: {exc}") from exc


class SqliteTransaction(SqliteSql, Transaction):
    """A unit of work on the writer connection inside ``BEGIN IMMEDIATE``.

    Args:
        conn: the writer connection, already in a transaction.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__()
        self._conn = conn

    def _sql_conn(self) -> sqlite3.Connection:
        return self._conn

    async def get_workflow(self, workflow_id: str, *, lock: bool = True) -> WorkflowRecord | None:
        """Read a workflow (the whole database is already write-locked)."""
        row = self._one(f"SELECT {_WF} FROM workflows WHERE id = ?", (workflow_id,))
        return None if row is None else rows.workflow_from_row(row)

    async def get_workflows(
        self, workflow_ids: list[str], *, lock: bool = True
    ) -> dict[str, WorkflowRecord]:
        """Read several workflows with one ``IN`` query per 500 ids."""
        found: dict[str, WorkflowRecord] = {}
        for start in range(0, len(workflow_ids), 500):
            chunk = workflow_ids[start : start + 500]
            for row in self._all(
                f"SELECT {_WF} FROM workflows WHERE id IN ({_marks(len(chunk))})", chunk
            ):
                record = rows.workflow_from_row(row)
                found[record.id] = record
        return found

    async def insert_workflow(self, workflow: WorkflowRecord) -> bool:
        """Insert a new workflow; False (and nothing written) if the id exists."""
        cur = self._execute(
            f"INSERT INTO workflows ({_WF}) VALUES ({_marks(17)}) ON CONFLICT (id) DO NOTHING",
            rows.workflow_params(workflow),
        )
        return cur.rowcount == 1

    async def insert_workflows(self, workflows: list[WorkflowRecord]) -> set[str]:
        """Insert several new workflows with one ``executemany``; existing ids are skipped
        (the write lock is held, so the existence check cannot race)."""
        if not workflows:
            return set()
        ids = [w.id for w in workflows]
        existing: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            found = self._all(f"SELECT id FROM workflows WHERE id IN ({_marks(len(chunk))})", chunk)
            existing.update(row[0] for row in found)
        fresh = [w for w in workflows if w.id not in existing]
        self._executemany(
            f"INSERT INTO workflows ({_WF}) VALUES ({_marks(17)})",
            [rows.workflow_params(w) for w in fresh],
        )
        return {w.id for w in fresh}

    async def update_workflow(self, workflow: WorkflowRecord) -> None:
        """Write every column of an existing workflow."""
        params = rows.workflow_params(workflow)
        self._execute(_UPDATE_WORKFLOW, (*params[1:], params[0]))

    async def claim_due_workflows(
        self, owner: str, now: float, lease_seconds: float, limit: int
    ) -> list[WorkflowRecord]:
        """Lease up to ``limit`` due workflows that no live owner holds (fence + 1)."""
        found = self._all(
            "UPDATE workflows SET lease_owner = ?, lease_until = ?, fence = fence + 1 "
            "WHERE id IN (SELECT id FROM workflows WHERE due_at <= ? AND "
            "(lease_owner IS NULL OR lease_until IS NULL OR lease_until < ?) "
            f"ORDER BY due_at LIMIT ?) RETURNING {_WF}",
            (owner, now + lease_seconds, now, now, limit),
        )
        claimed = [rows.workflow_from_row(row) for row in found]
        claimed.sort(key=lambda wf: (wf.due_at or 0.0, wf.id))
        return claimed

    async def lock_client(self, tenant: str, client_id: str) -> int:
        """Create-or-read the client's row; returns its last applied mutation id.

        Raises:
            Forbidden: the client id is registered under another tenant.
        """
        self._execute(
            "INSERT INTO clients (client_id, tenant, last_mutation_id, updated_at) "
            "VALUES (?, ?, 0, ?) ON CONFLICT (client_id) DO NOTHING",
            (client_id, tenant, time.time()),
        )
        stored_tenant, last_id = self._one(
            "SELECT tenant, last_mutation_id FROM clients WHERE client_id = ?", (client_id,)
        )
        if stored_tenant != tenant:
            raise Forbidden(f"client id {client_id!r} is registered under another tenant")
        return int(last_id)

    async def mutation_results(
        self, client_id: str, ids: list[int]
    ) -> dict[int, tuple[str, str | None]]:
        """Recorded outcome (status, error) of the given mutation ids that exist."""
        if not ids:
            return {}
        found = self._all(
            "SELECT mutation_id, status, error FROM mutation_results WHERE client_id = ? "
            "AND mutation_id IN (SELECT value FROM json_each(?))",
            (client_id, rows.dumps(ids)),
        )
        return {row[0]: (row[1], row[2]) for row in found}

    async def record_mutations(
        self, client_id: str, results: list[tuple[int, str, str | None]], last_id: int, at: float
    ) -> None:
        """Record outcomes (id, status, error) and set the client's last applied id."""
        if results:
            self._executemany(
                "INSERT INTO mutation_results (client_id, mutation_id, status, error, at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (client_id, mutation_id) DO UPDATE "
                "SET status = excluded.status, error = excluded.error, at = excluded.at",
                [(client_id, mid, status, error, at) for mid, status, error in results],
            )
        self._execute(
            "UPDATE clients SET last_mutation_id = ?, updated_at = ? WHERE client_id = ?",
            (last_id, at, client_id),
        )

    async def enqueue_outbox(
        self, destination: str, payload: JSON, *, event_seq: int | None, max_retries: int, at: float
    ) -> None:
        """Queue a message for an external consumer, due at once."""
        self._execute(
            "INSERT INTO outbox (destination, payload, event_seq, status, retry_count, "
            "max_retries, next_retry_at, created_at) VALUES (?, ?, ?, 'pending', 0, ?, ?, ?)",
            (destination, rows.dumps(payload), event_seq, max_retries, at, at),
        )

    async def add_dlq(self, entry: DlqEntry) -> int:
        """Add a dead letter (``entry.id`` is ignored); returns its id."""
        cur = self._execute(
            f"INSERT INTO dlq ({rows.NEW_DLQ_COLUMNS}) VALUES ({_marks(9)})",
            rows.new_dlq_params(entry),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def get_dlq(self, entry_id: int, *, lock: bool = True) -> DlqEntry | None:
        """Read one dead letter."""
        row = self._one(f"SELECT {_DLQ} FROM dlq WHERE id = ?", (entry_id,))
        return None if row is None else rows.dlq_from_row(row)

    async def update_dlq(self, entry: DlqEntry) -> None:
        """Write a dead letter's status fields (and its attempts and last error)."""
        self._execute(
            "UPDATE dlq SET status = ?, resolved_at = ?, attempts = ?, last_error = ? WHERE id = ?",
            (entry.status, entry.resolved_at, entry.attempts, entry.last_error, entry.id),
        )

    async def get_breaker(self, name: str, *, lock: bool = True) -> BreakerRecord | None:
        """Read a circuit breaker's shared state."""
        row = self._one(f"SELECT {_BR} FROM breakers WHERE name = ?", (name,))
        return None if row is None else rows.breaker_from_row(row)

    async def put_breaker(self, breaker: BreakerRecord) -> None:
        """Insert or replace a circuit breaker's shared state."""
        self._execute(
            f"INSERT OR REPLACE INTO breakers ({_BR}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                breaker.name,
                breaker.state,
                breaker.failures,
                breaker.opened_at,
                breaker.updated_at,
                breaker.probe_owner,
                breaker.probe_until,
            ),
        )

    def _write_events(self) -> tuple[int, list[StoredEvent]]:
        """Position and insert the buffered events; the last writes before COMMIT."""
        (head,) = self._one("SELECT COALESCE(MAX(seq), 0) FROM events")
        stored = [
            StoredEvent(head + i, e.tenant, e.workflow_id, e.wf_seq, e.type, e.data, e.at)
            for i, e in enumerate(self.pending_events, start=1)
        ]
        self._executemany(
            f"INSERT INTO events ({_EV}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (e.seq, e.tenant, e.workflow_id, e.wf_seq, e.type, rows.dumps(e.data), e.at)
                for e in stored
            ],
        )
        return head + len(stored), stored


def _marks(n: int) -> str:
    return ", ".join("?" * n)


_UPDATE_WORKFLOW = (
    "UPDATE workflows SET "
    + ", ".join(f"{col.strip()} = ?" for col in _WF.split(",")[1:])
    + " WHERE id = ?"
)
