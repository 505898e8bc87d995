"""The PostgreSQL unit of work, and the error-converting query helpers it shares.

Theory of operation
-------------------
A ``PostgresTransaction`` wraps one pool connection inside an open transaction
(``PostgresStore.run`` owns BEGIN/COMMIT). Row reads with ``lock=True`` use
``SELECT … FOR UPDATE`` so a read-modify-write of a workflow, client, dead letter or
breaker is serialised across instances.

Appended events stay in ``pending_events`` until ``_write_events_and_notify``, which
``run`` calls as the very last statement before COMMIT. That single statement bumps the
one-row ``event_head`` (taking its row lock until COMMIT), inserts every event at
``head - n + ordinality`` from arrays (``unnest``: one round trip for any batch size)
and queues the notifications. This is the gapless-order mechanism of SPEC promise 4.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from protocol import Forbidden, StorageError
from protocol.jsontypes import JSON
from sync_server.store import rows, statements
from sync_server.store.base import (
    BreakerRecord,
    DlqEntry,
    RoundTrips,
    StoredEvent,
    Transaction,
    WorkflowKey,
    WorkflowRecord,
)
from sync_server.store.limit_store import PgLimits

__all__ = [
    "CLAIM_DUE_WORKFLOWS",
    "PG_ERRORS",
    "PgConnection",
    "PgSql",
    "PostgresTransaction",
    "claim_due",
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
_DLQ = rows.DLQ_COLUMNS
_BR = rows.BREAKER_COLUMNS

_INSERT_WORKFLOW = (
    f"INSERT INTO workflows ({_WF}) VALUES "
    f"({', '.join(f'${i}' for i in range(1, rows.WORKFLOW_COLUMN_COUNT + 1))}) "
    "ON CONFLICT (id, tenant) DO NOTHING"
)
# One statement for a batch of new workflows: the columns travel as arrays.
_INSERT_WORKFLOWS = (
    f"INSERT INTO workflows ({_WF}) SELECT * FROM unnest($1::text[], $2::text[], "
    "$3::text[], $4::text[], $5::text[], $6::text[], $7::float8[], $8::text[], $9::text[], "
    "$10::bigint[], $11::float8[], $12::float8[], $13::text[], $14::float8[], $15::text[], "
    "$16::float8[], $17::bigint[], $18::text[]) ON CONFLICT (id, tenant) DO NOTHING "
    "RETURNING id, tenant"
)
_UPDATE_WORKFLOW = (
    "UPDATE workflows SET "
    + ", ".join(f"{col.strip()} = ${i}" for i, col in enumerate(_WF.split(",")[2:], start=3))
    + " WHERE id = $1 AND tenant = $2"
)
_WF_W = ", ".join(f"w.{col.strip()}" for col in _WF.split(","))

# The position assignment (see the module docstring). $1 = number of events,
# $2..$7 = event columns as arrays, $8 = the NOTIFY channel, $9 = queued payloads.
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

# Saga claim: due rows no live owner holds, locked with SKIP LOCKED, leased (fence + 1).
CLAIM_DUE_WORKFLOWS = statements.PG_CLAIM_DUE_WORKFLOWS

# The same claim limited to the (name, version) pairs this instance has (rolling
# deploys): one index range scan of ``workflows_claim_version`` per pair ($5, $6 arrays),
# so the due rows of versions this instance lacks are never even read.
CLAIM_DUE_VERSIONED = (
    "WITH due AS MATERIALIZED (SELECT c.id, c.tenant FROM unnest($5::text[], $6::text[]) "
    "AS k(name, version) CROSS JOIN LATERAL (SELECT w.id, w.tenant, w.due_at "
    "FROM workflows AS w "
    "WHERE w.name = k.name AND w.workflow_version = k.version AND w.due_at IS NOT NULL "
    # "due" as one row comparison: only the (name, workflow_version, due_at) index can
    # serve it as a range, so even a generic plan never walks workflows_due through the
    # due rows of versions nobody asked for.
    "AND (w.name, w.workflow_version, w.due_at) <= (k.name, k.version, $3) "
    "AND (w.lease_owner IS NULL OR w.lease_until IS NULL OR w.lease_until < $3) "
    "ORDER BY w.name, w.workflow_version, w.due_at LIMIT $4 FOR UPDATE SKIP LOCKED) AS c "
    "ORDER BY c.due_at LIMIT $4) "
    "UPDATE workflows AS w SET lease_owner = $1, lease_until = $2, fence = w.fence + 1 "
    "FROM due WHERE w.id = due.id AND w.tenant = due.tenant RETURNING "
    + ", ".join(f"w.{col.strip()}" for col in _WF.split(","))
)


async def claim_due(
    sql: PgSql,
    owner: str,
    now: float,
    lease_seconds: float,
    limit: int,
    versions: Sequence[tuple[str, str]] | None,
) -> list[WorkflowRecord]:
    """The claim statement of both the store and a transaction (see ``Store``)."""
    if versions is None:
        found = await sql._fetch(CLAIM_DUE_WORKFLOWS, owner, now + lease_seconds, now, limit)
    elif not versions:
        return []
    else:
        found = await sql._fetch(
            CLAIM_DUE_VERSIONED,
            owner,
            now + lease_seconds,
            now,
            limit,
            [name for name, _ in versions],
            [version for _, version in versions],
        )
    claimed = [rows.workflow_from_row(row) for row in found]
    claimed.sort(key=lambda wf: (wf.due_at or 0.0, wf.id))
    return claimed


_RECORD_MUTATIONS = """
WITH r AS (
    INSERT INTO mutation_results (client_id, tenant, mutation_id, status, error, at)
    SELECT $1, $7, u.id, u.status, u.error, $6
    FROM unnest($2::bigint[], $3::text[], $4::text[]) AS u(id, status, error)
    ON CONFLICT (client_id, tenant, mutation_id)
    DO UPDATE SET status = excluded.status, error = excluded.error, at = excluded.at
)
UPDATE clients SET last_mutation_id = $5, updated_at = $6 WHERE client_id = $1 AND tenant = $7
"""

# Several workflows by key: a join against the keys, so the plan is an index lookup
# per key whatever the table holds (LESSONS: generic plans). $3 adds FOR UPDATE.


class PgSql:
    """asyncpg calls that convert library errors where the library is called (STYLE).

    Subclasses name the connection or pool to use in ``_executor``; the original
    asyncpg error stays in ``__cause__`` so ``run`` can tell a deadlock from the rest.
    """

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


class PostgresTransaction(PgSql, PgLimits, Transaction):
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

    async def get_workflow(
        self, tenant: str, workflow_id: str, *, lock: bool = True
    ) -> WorkflowRecord | None:
        """Read a tenant's workflow; with ``lock`` its row stays locked (FOR UPDATE)."""
        suffix = " FOR UPDATE" if lock else ""
        row = await self._fetchrow(
            f"SELECT {_WF} FROM workflows WHERE id = $1 AND tenant = $2{suffix}",
            workflow_id,
            tenant,
        )
        return None if row is None else rows.workflow_from_row(row)

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

    async def claim_due_workflows(
        self,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        versions: Sequence[tuple[str, str]] | None = None,
    ) -> list[WorkflowRecord]:
        """Lease up to ``limit`` due workflows no live owner holds, in this transaction."""
        return await claim_due(self, owner, now, lease_seconds, limit, versions)

    async def insert_workflow(self, workflow: WorkflowRecord) -> bool:
        """Insert a new workflow; False (and nothing written) if the id exists."""
        status = await self._execute(_INSERT_WORKFLOW, *rows.workflow_params(workflow))
        return status == "INSERT 0 1"

    async def insert_workflows(self, workflows: list[WorkflowRecord]) -> set[WorkflowKey]:
        """Insert several new workflows in one statement; returns the keys inserted."""
        if len(workflows) <= 1:
            return {w.key for w in workflows if await self.insert_workflow(w)}
        columns = [list(c) for c in zip(*(rows.workflow_params(w) for w in workflows), strict=True)]
        found = await self._fetch(_INSERT_WORKFLOWS, *columns)
        return {WorkflowKey(row[1], row[0]) for row in found}

    async def update_workflow(self, workflow: WorkflowRecord) -> None:
        """Write every column of an existing workflow."""
        await self._execute(_UPDATE_WORKFLOW, *rows.workflow_params(workflow))

    async def update_workflows(self, workflows: list[WorkflowRecord]) -> None:
        """Write several workflows in one pipelined round trip (``executemany``)."""
        if len(workflows) == 1:
            await self.update_workflow(workflows[0])
        elif workflows:
            self.round_trips.count += 1
            try:
                await self._conn.executemany(
                    _UPDATE_WORKFLOW, [rows.workflow_params(w) for w in workflows]
                )
            except PG_ERRORS as exc:
                raise StorageError(f"PostgreSQL failed: {exc}") from exc

    async def lock_client(self, tenant: str, subject: str, client_id: str) -> int:
        """Create-or-lock the tenant's client row; returns its last applied mutation id.

        Raises:
            Forbidden: the client id belongs to another subject of the tenant.
        """
        # One statement: a new client's row is created; an existing one is locked by the
        # no-op update (as FOR UPDATE would) and its values returned.
        row = await self._fetchrow(
            "INSERT INTO clients (client_id, tenant, subject, last_mutation_id, updated_at) "
            "VALUES ($1, $2, $3, 0, $4) ON CONFLICT (client_id, tenant) "
            "DO UPDATE SET updated_at = clients.updated_at RETURNING subject, last_mutation_id",
            client_id,
            tenant,
            subject,
            time.time(),
        )
        assert row is not None
        if row[0] is None:  # recorded before subjects were: the first user binds it
            await self._execute(
                "UPDATE clients SET subject = $3 WHERE client_id = $1 AND tenant = $2",
                client_id,
                tenant,
                subject,
            )
        elif row[0] != subject:
            raise Forbidden(rows.client_owned_message(client_id))
        return int(row[1])

    async def mutation_results(
        self, tenant: str, client_id: str, ids: list[int]
    ) -> dict[int, tuple[str, str | None]]:
        """Recorded outcome (status, error) of the given mutation ids that exist."""
        if not ids:
            return {}
        found = await self._fetch(statements.PG_MUTATION_RESULTS, client_id, tenant, ids)
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
        await self._execute(
            _RECORD_MUTATIONS,
            client_id,
            [r[0] for r in results],
            [r[1] for r in results],
            [r[2] for r in results],
            last_id,
            at,
            tenant,
        )

    async def enqueue_outbox(
        self, destination: str, payload: JSON, *, event_seq: int | None, max_retries: int, at: float
    ) -> None:
        """Queue a message for an external consumer, due at once."""
        await self._execute(
            "INSERT INTO outbox (destination, payload, event_seq, status, retry_count, "
            "max_retries, next_retry_at, created_at) VALUES ($1, $2, $3, 'pending', 0, $4, $5, $5)",
            destination,
            rows.dumps(payload),
            event_seq,
            max_retries,
            at,
        )

    async def add_dlq(self, entry: DlqEntry) -> int:
        """Add a dead letter (``entry.id`` is ignored); returns its id."""
        return int(
            await self._fetchval(
                f"INSERT INTO dlq ({rows.NEW_DLQ_COLUMNS}) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                *rows.new_dlq_params(entry),
            )
        )

    async def get_dlq(self, entry_id: int, *, lock: bool = True) -> DlqEntry | None:
        """Read one dead letter; with ``lock`` its row stays locked until commit."""
        suffix = " FOR UPDATE" if lock else ""
        row = await self._fetchrow(f"SELECT {_DLQ} FROM dlq WHERE id = $1{suffix}", entry_id)
        return None if row is None else rows.dlq_from_row(row)

    async def update_dlq(self, entry: DlqEntry) -> None:
        """Write a dead letter's status fields (and its attempts and last error)."""
        await self._execute(
            "UPDATE dlq SET status = $2, resolved_at = $3, attempts = $4, last_error = $5 "
            "WHERE id = $1",
            entry.id,
            entry.status,
            entry.resolved_at,
            entry.attempts,
            entry.last_error,
        )

    async def get_breaker(self, name: str, *, lock: bool = True) -> BreakerRecord | None:
        """Read a circuit breaker's shared state; with ``lock`` its row stays locked."""
        suffix = " FOR UPDATE" if lock else ""
        row = await self._fetchrow(f"SELECT {_BR} FROM breakers WHERE name = $1{suffix}", name)
        return None if row is None else rows.breaker_from_row(row)

    async def put_breaker(self, breaker: BreakerRecord) -> None:
        """Insert or replace a circuit breaker's shared state."""
        await self._execute(
            f"INSERT INTO breakers ({_BR}) VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT (name) DO UPDATE SET state = excluded.state, "
            "failures = excluded.failures, opened_at = excluded.opened_at, "
            "updated_at = excluded.updated_at, probe_owner = excluded.probe_owner, "
            "probe_until = excluded.probe_until",
            breaker.name,
            breaker.state,
            breaker.failures,
            breaker.opened_at,
            breaker.updated_at,
            breaker.probe_owner,
            breaker.probe_until,
        )

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
