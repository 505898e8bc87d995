"""The unit of work: every domain operation of a transaction, written once.

Theory of operation
-------------------
A ``Transaction`` is a ``Sql`` (four query primitives a backend implements) plus the
buffered events and notifications of one unit of work. The operations the rest of the
server calls — read/insert/update workflows, claim due workflows, lock a client, record
mutation outcomes, outbox, dead letters, breakers, limits — are written here (and in
``limit_store``) on those primitives, over shared SQL that ``Dialect.sql`` renders for
the backend; the domain rules live here once:

* **tenancy**: every workflow and client is keyed by (tenant, id); a client id is bound
  to the first subject that uses it, and another subject of the tenant is refused;
* **claim order**: claimed workflows are handed out by (``due_at``, id), whatever order
  the database returned them in;
* **fencing**: a fenced write changes a row only while it is still leased to the writer
  at the fence and version the writer computed from.

A backend overrides only what genuinely differs: how a batch travels (arrays and
``unnest`` on PostgreSQL, JSON arrays and ``executemany`` on SQLite) and how buffered
events get their positions at commit (``run``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from protocol import Forbidden
from protocol.jsontypes import JSON
from sync_server.store import rows
from sync_server.store.dialect import Sql
from sync_server.store.limit_store import LimitOps
from sync_server.store.records import (
    BreakerRecord,
    DlqEntry,
    FencedWrite,
    NewEvent,
    StoredEvent,
    WorkflowKey,
    WorkflowRecord,
)

__all__ = ["Transaction", "claim_due"]

_WF = rows.WORKFLOW_COLUMNS
_DLQ = rows.DLQ_COLUMNS
_BR = rows.BREAKER_COLUMNS

GET_WORKFLOW = f"SELECT {_WF} FROM workflows WHERE id = $1 AND tenant = $2"
INSERT_WORKFLOW = (
    f"INSERT INTO workflows ({_WF}) VALUES "
    f"({', '.join(f'${i}' for i in range(1, rows.WORKFLOW_COLUMN_COUNT + 1))}) "
    "ON CONFLICT (id, tenant) DO NOTHING"
)
# Parameters in ``rows.workflow_params`` order: $1 id, $2 tenant, then the columns.
UPDATE_WORKFLOW = (
    "UPDATE workflows SET "
    + ", ".join(f"{col.strip()} = ${i}" for i, col in enumerate(_WF.split(",")[2:], start=3))
    + " WHERE id = $1 AND tenant = $2"
)
_N = rows.WORKFLOW_COLUMN_COUNT
UPDATE_FENCED = (
    UPDATE_WORKFLOW
    + f" AND lease_owner = ${_N + 1} AND fence = ${_N + 2} "
    + (f"AND version = ${_N + 3}")
)
# One statement: a new client's row is created; an existing one is locked by the no-op
# update (as FOR UPDATE would) and its values returned.
LOCK_CLIENT = (
    "INSERT INTO clients (client_id, tenant, subject, last_mutation_id, updated_at) "
    "VALUES ($1, $2, $3, 0, $4) ON CONFLICT (client_id, tenant) "
    "DO UPDATE SET updated_at = clients.updated_at RETURNING subject, last_mutation_id"
)
SET_LAST_MUTATION = (
    "UPDATE clients SET last_mutation_id = $1, updated_at = $2 WHERE client_id = $3 AND tenant = $4"
)
BIND_CLIENT = "UPDATE clients SET subject = $3 WHERE client_id = $1 AND tenant = $2"
ENQUEUE_OUTBOX = (
    "INSERT INTO outbox (destination, payload, event_seq, status, retry_count, "
    "max_retries, next_retry_at, created_at) VALUES ($1, $2, $3, 'pending', 0, $4, $5, $5)"
)
ADD_DLQ = (
    f"INSERT INTO dlq ({rows.NEW_DLQ_COLUMNS}) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id"
)
GET_DLQ = f"SELECT {_DLQ} FROM dlq WHERE id = $1"
UPDATE_DLQ = (
    "UPDATE dlq SET status = $2, resolved_at = $3, attempts = $4, last_error = $5 WHERE id = $1"
)
GET_BREAKER = f"SELECT {_BR} FROM breakers WHERE name = $1"
PUT_BREAKER = (
    f"INSERT INTO breakers ({_BR}) VALUES ($1, $2, $3, $4, $5, $6, $7) "
    "ON CONFLICT (name) DO UPDATE SET state = excluded.state, "
    "failures = excluded.failures, opened_at = excluded.opened_at, "
    "updated_at = excluded.updated_at, probe_owner = excluded.probe_owner, "
    "probe_until = excluded.probe_until"
)


async def claim_due(
    sql: Sql,
    owner: str,
    now: float,
    lease_seconds: float,
    limit: int,
    versions: Sequence[tuple[str, str]] | None,
) -> list[WorkflowRecord]:
    """Lease up to ``limit`` due workflows no live owner holds (fence + 1), of the given
    (name, version) pairs only (None: any), in claim order (``due_at``, then id).

    One statement on either backend: PostgreSQL skips rows another transaction holds
    (SKIP LOCKED), SQLite holds the database write lock."""
    if versions is None:
        statement = sql.dialect.own["workflows.claim_due"]
        found = await sql._fetch_all(statement, owner, now + lease_seconds, now, limit)
    elif not versions:
        return []
    else:
        found = await sql._fetch_all(
            sql.dialect.own["workflows.claim_due_versioned"],
            owner,
            now + lease_seconds,
            now,
            limit,
            sql.dialect.array([name for name, _ in versions]),
            sql.dialect.array([version for _, version in versions]),
        )
    claimed = [rows.workflow_from_row(row) for row in found]
    claimed.sort(key=lambda wf: (wf.due_at or 0.0, wf.id))
    return claimed


class Transaction(LimitOps, Sql):
    """A unit of work; everything in it commits together.

    Events added with ``append`` are positioned at commit; after a successful commit
    ``committed_events`` holds them with their ``seq``. A backend provides the ``Sql``
    primitives on its open transaction, and the two batch operations ``get_workflows``
    and ``insert_workflows`` in its own technique.
    """

    def __init__(self) -> None:
        self.pending_events: list[NewEvent] = []
        self.committed_events: list[StoredEvent] = []
        self.notifications: list[tuple[str, str]] = []

    # -- events -------------------------------------------------------------
    def append(self, workflow: WorkflowRecord, type: str, data: JSON, at: float) -> NewEvent:
        """Buffer an event of ``workflow``; bumps ``workflow.version`` (its ``wf_seq``).

        The caller must also write ``workflow`` in this transaction so the version sticks.
        """
        workflow.version += 1
        event = NewEvent(workflow.tenant, workflow.id, workflow.version, type, data, at)
        self.pending_events.append(event)
        return event

    def notify(self, channel: str, payload: str = "") -> None:
        """Send a notification to every instance's listeners after commit."""
        self.notifications.append((channel, payload))

    # -- workflows ----------------------------------------------------------
    async def get_workflow(
        self, tenant: str, workflow_id: str, *, lock: bool = True
    ) -> WorkflowRecord | None:
        """Read a tenant's workflow; with ``lock`` its row is locked until commit
        (PostgreSQL: FOR UPDATE; SQLite: the whole database is write-locked already)."""
        suffix = self.dialect.lock if lock else ""
        row = await self._fetch_one(self.dialect.sql(GET_WORKFLOW + suffix), workflow_id, tenant)
        return None if row is None else rows.workflow_from_row(row)

    async def get_workflows(
        self, keys: list[WorkflowKey], *, lock: bool = True
    ) -> dict[WorkflowKey, WorkflowRecord]:
        """Read several workflows (key -> record; missing keys are absent), locked like
        ``get_workflow``. Backends read them in one round trip (saga group commit)."""
        found: dict[WorkflowKey, WorkflowRecord] = {}
        for key in keys:
            record = await self.get_workflow(key.tenant, key.id, lock=lock)
            if record is not None:
                found[key] = record
        return found

    async def insert_workflow(self, workflow: WorkflowRecord) -> bool:
        """Insert a new workflow; False (and nothing written) if the tenant already has
        that id."""
        params = rows.workflow_params(workflow)
        return await self._exec(self.dialect.sql(INSERT_WORKFLOW), *params) == 1

    async def insert_workflows(self, workflows: list[WorkflowRecord]) -> set[WorkflowKey]:
        """Insert several new workflows; returns the keys inserted (an existing key is
        skipped and left unchanged). Backends do it in one round trip (batch ingest)."""
        return {w.key for w in workflows if await self.insert_workflow(w)}

    async def update_workflow(self, workflow: WorkflowRecord) -> None:
        """Write every column of an existing workflow."""
        await self._exec(self.dialect.sql(UPDATE_WORKFLOW), *rows.workflow_params(workflow))

    async def update_workflows(self, workflows: list[WorkflowRecord]) -> None:
        """``update_workflow`` for several rows, as one pipelined ``executemany``."""
        if len(workflows) == 1:
            await self.update_workflow(workflows[0])
        elif workflows:
            await self._exec_many(
                self.dialect.sql(UPDATE_WORKFLOW), [rows.workflow_params(w) for w in workflows]
            )

    async def update_fenced(self, owner: str, writes: list[FencedWrite]) -> set[WorkflowKey]:
        """Write each row still leased to ``owner`` with its fence and expected version
        (the check is the UPDATE's WHERE clause) and append its events; returns the keys
        written (the others are left alone). Rows are written in key order."""
        written: set[WorkflowKey] = set()
        sql = self.dialect.sql(UPDATE_FENCED)
        for write in sorted(writes, key=lambda w: w.record.key):
            params = rows.workflow_params(write.record)
            if await self._exec(sql, *params, owner, write.fence, write.expected_version):
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
        """``Store.claim_due_workflows`` inside this transaction, so that the claim and
        the start of the claimed workflows' first steps commit together (saga engine:
        fewer write transactions per workflow)."""
        return await claim_due(self, owner, now, lease_seconds, limit, versions)

    # -- clients ------------------------------------------------------------
    async def lock_client(self, tenant: str, subject: str, client_id: str) -> int:
        """Create-or-lock the tenant's client row and return its last applied mutation id.

        A new row is bound to ``subject`` (a row from before subjects were recorded is
        bound to the first subject that uses it).

        Raises:
            Forbidden: the client id belongs to another subject of the tenant.
        """
        row = await self._fetch_one(
            self.dialect.sql(LOCK_CLIENT), client_id, tenant, subject, time.time()
        )
        assert row is not None
        if row[0] is None:  # recorded before subjects were: the first user binds it
            await self._exec(self.dialect.sql(BIND_CLIENT), client_id, tenant, subject)
        elif row[0] != subject:
            raise Forbidden(rows.client_owned_message(client_id))
        return int(row[1])

    async def mutation_results(
        self, tenant: str, client_id: str, ids: list[int]
    ) -> dict[int, tuple[str, str | None]]:
        """Recorded outcome (status, error) of the given mutation ids that exist."""
        if not ids:
            return {}
        found = await self._fetch_all(
            self.dialect.own["mutations.results"], client_id, tenant, self.dialect.array(ids)
        )
        return {row[0]: (row[1], row[2]) for row in found}

    async def record_mutations(
        self,
        tenant: str,
        client_id: str,
        results: list[tuple[int, str, str | None]],
        last_id: int,
        at: float,
    ) -> None:
        """Record outcomes (id, status, error) and set the client's last applied id.

        PostgreSQL: one statement (the outcomes as arrays); SQLite: an ``executemany``
        of the outcomes, then the client's row."""
        record = self.dialect.own["mutations.record"]
        if self.dialect.one_round_trip:
            ids, statuses, errors = ([r[i] for r in results] for i in range(3))
            await self._exec(record, client_id, ids, statuses, errors, last_id, at, tenant)
            return
        if results:
            await self._exec_many(
                record,
                [(client_id, tenant, mid, status, error, at) for mid, status, error in results],
            )
        await self._exec(self.dialect.sql(SET_LAST_MUTATION), last_id, at, client_id, tenant)

    # -- outbox, dlq, breakers -------------------------------------------
    async def enqueue_outbox(
        self, destination: str, payload: JSON, *, event_seq: int | None, max_retries: int, at: float
    ) -> None:
        """Queue a message for an external consumer, due at once."""
        await self._exec(
            self.dialect.sql(ENQUEUE_OUTBOX),
            destination,
            rows.dumps(payload),
            event_seq,
            max_retries,
            at,
        )

    async def add_dlq(self, entry: DlqEntry) -> int:
        """Add a dead letter (``entry.id`` is ignored); returns its id."""
        row = await self._fetch_one(self.dialect.sql(ADD_DLQ), *rows.new_dlq_params(entry))
        assert row is not None
        return int(row[0])

    async def get_dlq(self, entry_id: int, *, lock: bool = True) -> DlqEntry | None:
        """Read one dead letter; with ``lock`` its row stays locked until commit."""
        suffix = self.dialect.lock if lock else ""
        row = await self._fetch_one(self.dialect.sql(GET_DLQ + suffix), entry_id)
        return None if row is None else rows.dlq_from_row(row)

    async def update_dlq(self, entry: DlqEntry) -> None:
        """Write a dead letter's status fields (and its attempts and last error)."""
        await self._exec(
            self.dialect.sql(UPDATE_DLQ),
            entry.id,
            entry.status,
            entry.resolved_at,
            entry.attempts,
            entry.last_error,
        )

    async def get_breaker(self, name: str, *, lock: bool = True) -> BreakerRecord | None:
        """Read a circuit breaker's shared state; with ``lock`` its row stays locked."""
        suffix = self.dialect.lock if lock else ""
        row = await self._fetch_one(self.dialect.sql(GET_BREAKER + suffix), name)
        return None if row is None else rows.breaker_from_row(row)

    async def put_breaker(self, breaker: BreakerRecord) -> None:
        """Insert or replace a circuit breaker's shared state."""
        await self._exec(
            self.dialect.sql(PUT_BREAKER),
            breaker.name,
            breaker.state,
            breaker.failures,
            breaker.opened_at,
            breaker.updated_at,
            breaker.probe_owner,
            breaker.probe_until,
        )
