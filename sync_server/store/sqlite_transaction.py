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
from protocol.jsontypes import JSON
from sync_server.store import rows, statements
from sync_server.store.base import (
    BreakerRecord,
    DlqEntry,
    FencedWrite,
    RoundTrips,
    StoredEvent,
    Transaction,
    WorkflowKey,
    WorkflowRecord,
)
from sync_server.store.limit_store import SqliteLimits
from sync_server.store.rows import client_owned_message

__all__ = ["SqliteSql", "SqliteTransaction"]


_WF = rows.WORKFLOW_COLUMNS
_EV = rows.EVENT_COLUMNS
_DLQ = rows.DLQ_COLUMNS
_BR = rows.BREAKER_COLUMNS


class SqliteSql:
    """sqlite3 calls that convert library errors where the library is called (STYLE)."""

    round_trips: RoundTrips

    def _sql_conn(self) -> sqlite3.Connection:
        raise NotImplementedError

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        self.round_trips.count += 1
        try:
            return self._sql_conn().execute(sql, params)
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite failed: {exc}") from exc

    def _executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        self.round_trips.count += 1
        try:
            self._sql_conn().executemany(sql, params)
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite failed: {exc}") from exc

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        self.round_trips.count += 1
        try:
            return self._sql_conn().execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite failed: {exc}") from exc

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        self.round_trips.count += 1
        try:
            return self._sql_conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite failed: {exc}") from exc


class SqliteTransaction(SqliteSql, SqliteLimits, Transaction):
    """A unit of work on the writer connection inside ``BEGIN IMMEDIATE``.

    Args:
        conn: the writer connection, already in a transaction.
    """

    def __init__(self, conn: sqlite3.Connection, round_trips: RoundTrips | None = None) -> None:
        super().__init__()
        self._conn = conn
        self.round_trips = round_trips or RoundTrips()

    def _sql_conn(self) -> sqlite3.Connection:
        return self._conn

    async def get_workflow(
        self, tenant: str, workflow_id: str, *, lock: bool = True
    ) -> WorkflowRecord | None:
        """Read a tenant's workflow (the whole database is already write-locked)."""
        row = self._one(
            f"SELECT {_WF} FROM workflows WHERE id = ? AND tenant = ?", (workflow_id, tenant)
        )
        return None if row is None else rows.workflow_from_row(row)

    async def get_workflows(
        self, keys: list[WorkflowKey], *, lock: bool = True
    ) -> dict[WorkflowKey, WorkflowRecord]:
        """Read several workflows, one query per 500 keys (a join on the primary key)."""
        return {record.key: record for record in self._find_workflows(keys)}

    def _find_workflows(self, keys: list[WorkflowKey]) -> list[WorkflowRecord]:
        found: list[WorkflowRecord] = []
        for start in range(0, len(keys), 500):
            chunk = [[k.id, k.tenant] for k in keys[start : start + 500]]
            found.extend(
                rows.workflow_from_row(row)
                for row in self._all(statements.SQLITE_GET_WORKFLOWS, (rows.dumps(chunk),))
            )
        return found

    async def insert_workflow(self, workflow: WorkflowRecord) -> bool:
        """Insert a new workflow; False (and nothing written) if the key exists."""
        cur = self._execute(
            f"INSERT INTO workflows ({_WF}) VALUES ({_marks(rows.WORKFLOW_COLUMN_COUNT)}) "
            "ON CONFLICT (id, tenant) DO NOTHING",
            rows.workflow_params(workflow),
        )
        return cur.rowcount == 1

    async def insert_workflows(self, workflows: list[WorkflowRecord]) -> set[WorkflowKey]:
        """Insert several new workflows with one ``executemany``; existing keys are
        skipped (the write lock is held, so the existence check cannot race)."""
        if not workflows:
            return set()
        existing = {r.key for r in self._find_workflows([w.key for w in workflows])}
        fresh = [w for w in workflows if w.key not in existing]
        self._executemany(
            f"INSERT INTO workflows ({_WF}) VALUES ({_marks(rows.WORKFLOW_COLUMN_COUNT)})",
            [rows.workflow_params(w) for w in fresh],
        )
        return {w.key for w in fresh}

    async def update_workflow(self, workflow: WorkflowRecord) -> None:
        """Write every column of an existing workflow."""
        params = rows.workflow_params(workflow)
        self._execute(_UPDATE_WORKFLOW, (*params[2:], params[0], params[1]))

    async def update_fenced(self, owner: str, writes: list[FencedWrite]) -> set[WorkflowKey]:
        """Write each row still leased to ``owner`` at its fence and expected version
        (the check is the UPDATE's WHERE clause) and append its events."""
        written: set[WorkflowKey] = set()
        for write in sorted(writes, key=lambda w: w.record.key):
            params = rows.workflow_params(write.record)
            cur = self._execute(
                _UPDATE_WORKFLOW + " AND lease_owner = ? AND fence = ? AND version = ?",
                (*params[2:], params[0], params[1], owner, write.fence, write.expected_version),
            )
            if cur.rowcount == 1:
                self.pending_events.extend(write.events)
                written.add(write.record.key)
        return written

    async def claim_due_workflows(
        self,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        versions: Sequence[tuple[str, str]] | None = None,
    ) -> list[WorkflowRecord]:
        """Lease up to ``limit`` due workflows that no live owner holds (fence + 1), of
        the given (name, version) pairs only (None: any)."""
        if versions is not None and not versions:
            return []
        only = (
            ""
            if versions is None
            else "AND (name, workflow_version) IN (SELECT json_extract(value, '$[0]'), "
            "json_extract(value, '$[1]') FROM json_each(?)) "
        )
        params: tuple[Any, ...] = () if versions is None else (rows.dumps(list(versions)),)
        found = self._all(
            statements.SQLITE_CLAIM_DUE_WORKFLOWS
            if versions is None
            else "UPDATE workflows SET lease_owner = ?, lease_until = ?, fence = fence + 1 "
            "WHERE rowid IN (SELECT rowid FROM workflows WHERE due_at <= ? AND "
            f"(lease_owner IS NULL OR lease_until IS NULL OR lease_until < ?) {only}"
            f"ORDER BY due_at LIMIT ?) RETURNING {_WF}",
            (owner, now + lease_seconds, now, now, *params, limit),
        )
        claimed = [rows.workflow_from_row(row) for row in found]
        claimed.sort(key=lambda wf: (wf.due_at or 0.0, wf.id))
        return claimed

    async def lock_client(self, tenant: str, subject: str, client_id: str) -> int:
        """Create-or-read the tenant's client row; returns its last applied mutation id.

        Raises:
            Forbidden: the client id belongs to another subject of the tenant.
        """
        self._execute(
            "INSERT INTO clients (client_id, tenant, subject, last_mutation_id, updated_at) "
            "VALUES (?, ?, ?, 0, ?) ON CONFLICT (client_id, tenant) DO NOTHING",
            (client_id, tenant, subject, time.time()),
        )
        owner, last_id = self._one(
            "SELECT subject, last_mutation_id FROM clients WHERE client_id = ? AND tenant = ?",
            (client_id, tenant),
        )
        if owner is None:  # recorded before subjects were: the first user binds it
            self._execute(
                "UPDATE clients SET subject = ? WHERE client_id = ? AND tenant = ?",
                (subject, client_id, tenant),
            )
        elif owner != subject:
            raise Forbidden(client_owned_message(client_id))
        return int(last_id)

    async def mutation_results(
        self, tenant: str, client_id: str, ids: list[int]
    ) -> dict[int, tuple[str, str | None]]:
        """Recorded outcome (status, error) of the given mutation ids that exist."""
        if not ids:
            return {}
        found = self._all(statements.SQLITE_MUTATION_RESULTS, (client_id, tenant, rows.dumps(ids)))
        return {row[0]: (row[1], row[2]) for row in found}

    async def record_mutations(
        self,
        tenant: str,
        client_id: str,
        results: list[tuple[int, str, str | None]],
        last_id: int,
        at: float,
    ) -> None:
        """Record outcomes (id, status, error) and set the client's last applied id."""
        if results:
            self._executemany(
                "INSERT INTO mutation_results (client_id, tenant, mutation_id, status, error, "
                "at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (client_id, tenant, mutation_id) "
                "DO UPDATE SET status = excluded.status, error = excluded.error, at = excluded.at",
                [(client_id, tenant, mid, status, error, at) for mid, status, error in results],
            )
        self._execute(
            "UPDATE clients SET last_mutation_id = ?, updated_at = ? "
            "WHERE client_id = ? AND tenant = ?",
            (last_id, at, client_id, tenant),
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
    + ", ".join(f"{col.strip()} = ?" for col in _WF.split(",")[2:])
    + " WHERE id = ? AND tenant = ?"
)
_WF_W = ", ".join(f"w.{col.strip()}" for col in _WF.split(","))
