"""The SQLite unit of work: the ``Sql`` primitives on sqlite3, and what only SQLite
does its way.

Theory of operation
-------------------
A ``SqliteTransaction`` wraps the store's single writer connection inside
``BEGIN IMMEDIATE`` (``SqliteStore.run`` owns BEGIN/COMMIT), so the whole database is
write-locked for the unit of work and ``lock=True`` reads need nothing extra (the
``SQLITE`` dialect drops row locks). The domain operations are ``Transaction``'s; this
module adds the sqlite3 primitives and the batches that travel as JSON arrays or
``executemany``.

Appended events stay in ``pending_events`` until ``_write_events``, which ``run`` calls
as the last statements before COMMIT: positions are ``MAX(seq) + 1 …`` read under the
write lock, hence assigned in commit order (SPEC promise 4, gapless order).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from protocol import StorageError
from sync_server.store import rows, statements
from sync_server.store.dialect import SQLITE, Sql
from sync_server.store.records import RoundTrips, StoredEvent, WorkflowKey, WorkflowRecord
from sync_server.store.transaction import Transaction

__all__ = ["SqliteSql", "SqliteTransaction"]

_WF = rows.WORKFLOW_COLUMNS
_EV = rows.EVENT_COLUMNS


class SqliteSql(Sql):
    """The ``Sql`` primitives on sqlite3 (and the synchronous helpers they are made of),
    converting library errors where the library is called (STYLE). Statements run on
    the calling thread: in-process, microseconds each."""

    dialect = SQLITE
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

    async def _fetch_all(self, sql: str, *args: Any) -> list[Any]:
        return self._all(sql, args)

    async def _fetch_one(self, sql: str, *args: Any) -> Any:
        return self._one(sql, args)

    async def _exec(self, sql: str, *args: Any) -> int:
        return self._execute(sql, args).rowcount

    async def _exec_many(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        self._executemany(sql, args)


class SqliteTransaction(SqliteSql, Transaction):
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
