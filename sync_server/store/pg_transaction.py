"""The PostgreSQL unit of work: the ``Sql`` primitives on asyncpg, and what only
PostgreSQL does its way.

Theory of operation
-------------------
A ``PostgresTransaction`` wraps one pool connection inside an open transaction
(``PostgresStore.run`` owns BEGIN/COMMIT). The domain operations are ``Transaction``'s
(written once, rendered by the ``POSTGRES`` dialect: row reads with ``lock=True`` use
``SELECT … FOR UPDATE``, so a read-modify-write of a workflow, client, dead letter or
breaker is serialised across instances). This module adds the asyncpg primitives and the
batches that travel as arrays (``unnest``: one round trip for any batch size).

Appended events stay in ``pending_events`` until ``_write_events_and_notify``, which
``run`` calls as the very last statement before COMMIT. That single statement bumps the
one-row ``event_head`` (taking its row lock until COMMIT), inserts every event at
``head - n + ordinality`` from arrays (``unnest``: one round trip for any batch size)
and queues the notifications. This is the gapless-order mechanism of SPEC promise 4.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from protocol import StorageError
from sync_server.store import rows, statements
from sync_server.store.dialect import POSTGRES, Sql
from sync_server.store.records import RoundTrips, StoredEvent, WorkflowKey, WorkflowRecord
from sync_server.store.transaction import Transaction

__all__ = [
    "CLAIM_DUE_VERSIONED",
    "CLAIM_DUE_WORKFLOWS",
    "PG_ERRORS",
    "PgConnection",
    "PgSql",
    "PostgresTransaction",
]

PgConnection = asyncpg.Connection | PoolConnectionProxy
"""A connection, bare or lent by a pool."""
PG_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # A connection that broke mid-operation (a PostgreSQL restart) can fail its reset on
    # release with "cannot switch to state N; another operation is in progress"
    # (MagicStack/asyncpg#784, #1069); the pool then drops it. Seen by the chaos test.
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
"""What asyncpg raises when the database or the link fails."""

_WF = rows.WORKFLOW_COLUMNS

# Saga claim: due rows no live owner holds, locked with SKIP LOCKED, leased (fence + 1);
# and the same limited to the (name, version) pairs an instance runs.
CLAIM_DUE_WORKFLOWS = statements.PG_CLAIM_DUE_WORKFLOWS
CLAIM_DUE_VERSIONED = statements.PG_CLAIM_DUE_VERSIONED

# One statement for a batch of new workflows: the columns travel as arrays.
_INSERT_WORKFLOWS = (
    f"INSERT INTO workflows ({_WF}) SELECT * FROM unnest($1::text[], $2::text[], "
    "$3::text[], $4::text[], $5::text[], $6::text[], $7::float8[], $8::text[], $9::text[], "
    "$10::bigint[], $11::float8[], $12::float8[], $13::text[], $14::float8[], $15::text[], "
    "$16::float8[], $17::bigint[], $18::text[]) ON CONFLICT (id, tenant) DO NOTHING "
    "RETURNING id, tenant"
)
_APPEND_EVENTS = """
WITH head AS (
    UPDATE event_head SET seq = seq + $1 WHERE id = 1 RETURNING seq
), ins AS (
    INSERT INTO events (seq, tenant, workflow_id, wf_seq, type, data, at)
    SELECT head.seq - $1 + e.ord, e.tenant, e.workflow_id, e.wf_seq, e.type, e.data, e.at
    FROM head, unnest($2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                      $7::float8[]) WITH ORDINALITY AS e(tenant, workflow_id, wf_seq, type,
                                                         data, at, ord)
)
SELECT head.seq,
       (SELECT count(pg_notify($8, n)) FROM unnest($9::text[] || ('events:' || head.seq)) AS n)
FROM head
"""
_NOTIFY = "SELECT count(pg_notify($1, n)) FROM unnest($2::text[]) AS n"


class PgSql(Sql):
    """The ``Sql`` primitives on asyncpg (and the helpers they are made of), converting
    library errors where the library is called (STYLE).

    Subclasses name the connection or pool to use in ``_executor``; the original
    asyncpg error stays in ``__cause__`` so ``run`` can tell a deadlock from the rest.
    """

    dialect = POSTGRES
    round_trips: RoundTrips

    def _executor(self) -> PgConnection | asyncpg.Pool:
        raise NotImplementedError

    async def _execute(self, sql: str, *args: Any) -> str:
        self.round_trips.count += 1
        try:
            return str(await self._executor().execute(sql, *args))
        except PG_ERRORS as exc:
            raise StorageError(f"PostgreSQL failed: {exc}") from exc

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        self.round_trips.count += 1
        try:
            return list(await self._executor().fetch(sql, *args))
        except PG_ERRORS as exc:
            raise StorageError(f"PostgreSQL failed: {exc}") from exc

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        self.round_trips.count += 1
        try:
            return await self._executor().fetchrow(sql, *args)
        except PG_ERRORS as exc:
            raise StorageError(f"PostgreSQL failed: {exc}") from exc

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        self.round_trips.count += 1
        try:
            return await self._executor().fetchval(sql, *args)
        except PG_ERRORS as exc:
            raise StorageError(f"PostgreSQL failed: {exc}") from exc

    async def _fetch_all(self, sql: str, *args: Any) -> list[Any]:
        return await self._fetch(sql, *args)

    async def _fetch_one(self, sql: str, *args: Any) -> Any:
        return await self._fetchrow(sql, *args)

    async def _exec(self, sql: str, *args: Any) -> int:
        status = (await self._execute(sql, *args)).rsplit(" ", 1)[-1]
        return int(status) if status.isdigit() else 0

    async def _exec_many(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        self.round_trips.count += 1  # pipelined: one round trip
        try:
            await self._executor().executemany(sql, args)
        except PG_ERRORS as exc:
            raise StorageError(f"PostgreSQL failed: {exc}") from exc


class PostgresTransaction(PgSql, Transaction):
    """A unit of work on one pool connection inside an open transaction.

    Args:
        conn: the connection; ``PostgresStore.run`` begins and commits.
        round_trips: the store's counter of round trips.
    """

    def __init__(self, conn: PgConnection, round_trips: RoundTrips | None = None) -> None:
        super().__init__()
        self._conn = conn
        self.round_trips = round_trips or RoundTrips()

    def _executor(self) -> PgConnection:
        return self._conn

    async def get_workflows(
        self, keys: list[WorkflowKey], *, lock: bool = True
    ) -> dict[WorkflowKey, WorkflowRecord]:
        """Read several workflows in one round trip, locked in key order (no deadlock)."""
        # A join against unnest (not "= ANY($1)"): its generic plan stays an index
        # lookup per key (LESSONS "prepared statements and generic plans").
        sql = statements.PG_GET_WORKFLOWS_FOR_UPDATE if lock else statements.PG_GET_WORKFLOWS
        found = await self._fetch(sql, [k.id for k in keys], [k.tenant for k in keys])
        records = [rows.workflow_from_row(row) for row in found]
        return {record.key: record for record in records}

    async def insert_workflows(self, workflows: list[WorkflowRecord]) -> set[WorkflowKey]:
        """Insert several new workflows in one statement; returns the keys inserted."""
        if len(workflows) <= 1:
            return {w.key for w in workflows if await self.insert_workflow(w)}
        columns = [list(c) for c in zip(*(rows.workflow_params(w) for w in workflows), strict=True)]
        found = await self._fetch(_INSERT_WORKFLOWS, *columns)
        return {WorkflowKey(row[1], row[0]) for row in found}

    async def _write_events_and_notify(self, channel: str) -> list[StoredEvent]:
        """Position the buffered events and queue notifications: the last statement.

        Args:
            channel: the schema's NOTIFY channel; payloads are ``"<channel>:<payload>"``.

        Returns:
            The events with their positions (valid once the transaction commits).
        """
        payloads = [f"{name}:{payload}" for name, payload in self.notifications]
        events = self.pending_events
        if not events:
            if payloads:
                await self._fetchval(_NOTIFY, channel, payloads)
            return []
        n = len(events)
        row = await self._fetchrow(
            _APPEND_EVENTS,
            n,
            [e.tenant for e in events],
            [e.workflow_id for e in events],
            [e.wf_seq for e in events],
            [e.type for e in events],
            [rows.dumps(e.data) for e in events],
            [float(e.at) for e in events],
            channel,
            payloads,
        )
        if row is None:
            raise StorageError("event_head row is missing; the schema is damaged")
        first = int(row[0]) - n
        return [
            StoredEvent(first + i, e.tenant, e.workflow_id, e.wf_seq, e.type, e.data, e.at)
            for i, e in enumerate(events, start=1)
        ]
