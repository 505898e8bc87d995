"""The store's operations outside a caller's unit of work, written once.

Theory of operation
-------------------
``StoreOps`` is the part of ``Store`` that is the same on every backend: reads (workflows,
listings, clients, dead letters, breakers, counts), lease upkeep, the outbox, backlogs
and retention. It is written on the ``Sql`` primitives of the store itself — reads run
outside any transaction (PostgreSQL: a pool connection; SQLite: the reader connection)
— and on two more:

* ``_one_shot(work)``: a write that is a single statement. PostgreSQL runs it as its
  own implicit transaction on a pool connection (one round trip, no BEGIN/COMMIT);
  SQLite runs it in a unit of work on the single writer (``run``).
* ``run(fn)``: a unit of work of several statements (retention batches).

Statements are shared and rendered by the backend's ``Dialect``; those a backend writes
its own way come from ``Dialect.own``. Backends override only what truly differs in
technique (lease upkeep: arrays vs ``executemany``; PostgreSQL's VACUUM).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from sync_server.store import pruning, rows, statements
from sync_server.store.dialect import Sql
from sync_server.store.records import (
    BreakerRecord,
    DlqEntry,
    OutboxItem,
    StoredEvent,
    WorkflowKey,
    WorkflowRecord,
)
from sync_server.store.transaction import Transaction, claim_due

__all__ = ["StoreOps"]

T = TypeVar("T")
_WF = rows.WORKFLOW_COLUMNS
_BR = rows.BREAKER_COLUMNS
_ENDED = ", ".join(f"'{status}'" for status in statements.ENDED_STATUSES)

WORKFLOW_TENANTS = "SELECT tenant FROM workflows WHERE id = $1 ORDER BY tenant LIMIT $2"
LIST_BREAKERS = f"SELECT {_BR} FROM breakers ORDER BY name"
FINISH_OUTBOX = (
    "UPDATE outbox SET status = $2, retry_count = $3, next_retry_at = $4, "
    "published_at = $5, last_error = $6 WHERE id = $1"
)


def _version_counts(tenant: bool) -> str:
    only = "AND tenant = $1 " if tenant else ""
    return (
        "SELECT name, workflow_version, status, count(*) FROM workflows "
        f"WHERE status IN ('running', 'compensating', 'parked') {only}"
        "GROUP BY name, workflow_version, status ORDER BY name, workflow_version, status"
    )


def _filters(*conditions: tuple[str, object]) -> tuple[str, list[object]]:
    """A ``WHERE`` clause of the conditions whose value is not None, and their values."""
    parts: list[str] = []
    args: list[object] = []
    for template, value in conditions:
        if value is not None:
            args.append(value)
            parts.append(template % len(args))
    return (" WHERE " + " AND ".join(parts) if parts else ""), args


class StoreOps(Sql):
    """The shared operations of ``Store`` (see the module docstring)."""

    @abc.abstractmethod
    async def run(self, fn: Callable[[Transaction], Awaitable[T]], *, attempts: int = 5) -> T:
        """Run ``fn`` in a transaction and commit (see ``Store.run``)."""

    @abc.abstractmethod
    async def _one_shot(self, work: Callable[[Sql], Awaitable[T]]) -> T:
        """Run a single-statement write ``work`` in its own short transaction."""

    # -- reads --------------------------------------------------------------
    async def read_workflow_events(self, tenant: str, workflow_id: str) -> list[StoredEvent]:
        """Every event of one of the tenant's workflows, in order."""
        sql = self.dialect.sql(statements.WORKFLOW_EVENTS)
        return [rows.event_from_row(row) for row in await self._fetch_all(sql, workflow_id, tenant)]

    async def get_workflow(self, tenant: str, workflow_id: str) -> WorkflowRecord | None:
        """Read one of the tenant's workflows without locking."""
        sql = self.dialect.sql(statements.GET_WORKFLOW)
        row = await self._fetch_one(sql, workflow_id, tenant)
        return None if row is None else rows.workflow_from_row(row)

    async def workflow_tenants(self, workflow_id: str, limit: int = 10) -> list[str]:
        """The tenants (at most ``limit``, sorted) holding a workflow with this id — for a
        global admin, who names a workflow by id alone."""
        found = await self._fetch_all(self.dialect.sql(WORKFLOW_TENANTS), workflow_id, limit)
        return [row[0] for row in found]

    async def list_workflows(
        self,
        *,
        tenant: str | None = None,
        statuses: list[str] | None = None,
        limit: int = 1000,
        name: str | None = None,
        version: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        before: tuple[float, str] | None = None,
        ended_after: float | None = None,
        ended_before: float | None = None,
    ) -> list[WorkflowRecord]:
        """Workflows, newest first (``created_at`` then ``id``, descending), filtered.

        Args:
            tenant: only this tenant's (the leading column of every listing index).
            statuses: only these statuses.
            limit: most rows.
            name: only this workflow name.
            version: only this definition version (``workflow_version``).
            created_after: only created at or after this time.
            created_before: only created before this time.
            before: keyset cursor: only rows after (``created_at``, ``id``) in this
                order — stable while new workflows are inserted.
            ended_after: only ended workflows (terminal status) whose last change —
                their end — is at or after this time.
            ended_before: only ended workflows whose end is before this time.
        """
        if statuses is not None and not statuses:
            return []
        filters = (name, version, created_after, created_before, before)
        if any(f is not None for f in (*filters, ended_after, ended_before)):
            # The listing's filters (issue 18): one statement per combination (each gets
            # a plan that walks the matching tenant-led index), keyset page. One status
            # is an equality, so (tenant, status, created_at, id) serves the page in
            # order; several fall back to the tenant's (created_at, id) index.
            one = statuses[0] if statuses is not None and len(statuses) == 1 else None
            many = None if one is not None or statuses is None else self.dialect.array(statuses)
            where, args = _filters(
                ("tenant = $%d", tenant),
                ("status = $%d", one),
                ("status = ANY($%d::text[])", many),
                ("name = $%d", name),
                ("workflow_version = $%d", version),
                ("created_at >= $%d", created_after),
                ("created_at < $%d", created_before),
                ("updated_at >= $%d", ended_after),
                ("updated_at < $%d", ended_before),
            )
            if ended_after is not None or ended_before is not None:
                where += f"{' AND' if where else ' WHERE'} status IN ({_ENDED})"
            if before is not None:
                args.extend(before)
                n = len(args)
                where += f"{' AND' if where else ' WHERE'} (created_at, id) < (${n - 1}, ${n})"
            sql = (
                f"SELECT {_WF} FROM workflows{where} ORDER BY created_at DESC, id DESC "
                f"LIMIT ${len(args) + 1}"
            )
            found = await self._fetch_all(self.dialect.sql(sql), *args, limit)
        elif self.dialect.one_round_trip:
            # One statement per filter combination (not "$1 IS NULL OR …"), so each
            # prepared statement gets a plan that walks an index newest first.
            sql = statements.pg_list_workflows(tenant=tenant is not None, statuses=bool(statuses))
            args = [a for a in (tenant, statuses) if a is not None]
            found = await self._fetch_all(sql, *args, limit)
        else:
            # Each status's index range is read newest first, at most ``limit`` rows each.
            unique = list(dict.fromkeys(statuses or ()))
            params: list[Any] = []
            for status in unique:
                params.extend([status, limit] if tenant is None else [tenant, status, limit])
            if not unique and tenant is not None:
                params.append(tenant)
            sql = statements.sqlite_list_workflows(tenant=tenant is not None, statuses=len(unique))
            found = await self._fetch_all(sql, *params, limit)
        return [rows.workflow_from_row(row) for row in found]

    async def status_counts(self, *, tenant: str | None = None, limit: int) -> dict[str, int]:
        """Workflows by status among the newest ``limit`` (of one tenant, or all) —
        bounded work whatever the table size, answered from an index (no JSON read)."""
        sql = self.dialect.sql(statements.status_counts(tenant=tenant is not None))
        args = [tenant] if tenant is not None else []
        return {row[0]: int(row[1]) for row in await self._fetch_all(sql, *args, limit)}

    async def version_counts(self, *, tenant: str | None = None) -> list[tuple[str, str, str, int]]:
        """(name, version, status, count) of the workflows still running, compensating
        or parked — what each definition version still has in flight (of one tenant,
        or all; a partial index)."""
        sql = self.dialect.sql(_version_counts(tenant is not None))
        found = await self._fetch_all(sql, *([tenant] if tenant is not None else []))
        return [(row[0], row[1], row[2], int(row[3])) for row in found]

    async def get_client(self, tenant: str, client_id: str) -> tuple[str | None, int] | None:
        """(subject, last applied mutation id) of the tenant's client, or None; the
        subject is None for a row recorded before subjects were."""
        row = await self._fetch_one(self.dialect.sql(statements.GET_CLIENT), client_id, tenant)
        return None if row is None else (row[0], row[1])

    async def list_dlq(
        self, *, tenant: str | None = None, status: str | None = "open", limit: int = 1000
    ) -> list[DlqEntry]:
        """Dead letters, oldest first."""
        sql = statements.list_dlq(tenant=tenant is not None, status=status is not None)
        args = [a for a in (tenant, status) if a is not None]
        found = await self._fetch_all(self.dialect.sql(sql), *args, limit)
        return [rows.dlq_from_row(row) for row in found]

    async def list_breakers(self) -> list[BreakerRecord]:
        """Every circuit breaker's shared state."""
        found = await self._fetch_all(self.dialect.sql(LIST_BREAKERS))
        return [rows.breaker_from_row(row) for row in found]

    # -- leases (saga scheduling) ---------------------------------------------
    async def claim_due_workflows(
        self,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        versions: Sequence[tuple[str, str]] | None = None,
    ) -> list[WorkflowRecord]:
        """Lease up to ``limit`` workflows that are due and not leased by a live owner.

        With ``versions``, only workflows whose (name, ``workflow_version``) is one of
        those pairs are claimed (an instance runs only the definitions it has; rolling
        deploys); the others stay due for instances that have them.

        A workflow is due when ``due_at <= now``; it is free when it has no owner or its
        ``lease_until < now``. Each claimed row gets ``lease_owner=owner``,
        ``lease_until=now+lease_seconds`` and ``fence+1``; several instances claiming at
        once never get the same row (PostgreSQL: FOR UPDATE SKIP LOCKED). One statement.
        """
        if versions is not None and not versions:
            return []
        return await self._one_shot(
            lambda sql: claim_due(sql, owner, now, lease_seconds, limit, versions)
        )

    @abc.abstractmethod
    async def renew_leases(
        self, owner: str, leases: dict[WorkflowKey, int], until: float
    ) -> set[WorkflowKey]:
        """Extend leases (workflow key -> fence) still held; returns the keys renewed."""

    @abc.abstractmethod
    async def release_leases(self, owner: str, leases: dict[WorkflowKey, int]) -> None:
        """Give up leases (workflow key -> fence) so any instance may claim them."""

    # -- outbox ---------------------------------------------------------------
    async def claim_outbox(self, now: float, limit: int, lease_seconds: float) -> list[OutboxItem]:
        """Pending outbox items due now; each is pushed ``lease_seconds`` into the future
        so that concurrent relays do not send it twice at once."""

        async def work(sql: Sql) -> list[Any]:
            return await sql._fetch_all(
                sql.dialect.own["outbox.claim"], now, limit, now + lease_seconds
            )

        found = await self._one_shot(work)
        return sorted((rows.outbox_from_row(row) for row in found), key=lambda i: i.id)

    async def finish_outbox(self, item: OutboxItem) -> None:
        """Write an outbox item's status, retry_count, next_retry_at, published_at, error."""
        args = (item.id, item.status, item.retry_count, item.next_retry_at)
        await self._one_shot(
            lambda sql: sql._exec(
                sql.dialect.sql(FINISH_OUTBOX), *args, item.published_at, item.last_error
            )
        )

    async def outbox_stats(self, now: float) -> tuple[int, float]:
        """(pending items, age in seconds of the oldest pending item)."""
        row = await self._fetch_one(self.dialect.sql(statements.OUTBOX_STATS))
        assert row is not None
        oldest = row[1]
        return int(row[0]), 0.0 if oldest is None else max(0.0, now - oldest)

    # -- backlogs (monitoring) ------------------------------------------------
    async def backlog_stats(self, now: float) -> tuple[int, float]:
        """(open dead letters, seconds the most overdue unleased running or compensating
        workflow has waited past its ``due_at``) — one cheap statement."""
        row = await self._fetch_one(self.dialect.sql(statements.BACKLOG), now)
        assert row is not None
        due = row[1]
        return int(row[0]), 0.0 if due is None else max(0.0, now - due)

    # -- retention (``sync_server.retention``) ----------------------------------
    async def horizon(self, tenant: str) -> int:
        """The tenant's retention horizon: the highest ``seq`` of its pruned events (0
        when nothing was pruned). A client whose cursor is below it may have missed
        events and must reset from current snapshots (SPEC promise 8)."""
        row = await self._fetch_one(self.dialect.sql(statements.TENANT_HORIZON), tenant)
        assert row is not None
        return int(row[0])

    async def prune_events(self, cutoff: float, limit: int) -> tuple[int, int]:
        """Delete the events of the next ``limit`` workflows that ended before ``cutoff``
        (walking ``workflows_ended`` from a stored mark), in one short transaction.

        Returns:
            (workflows examined, events deleted); fewer than ``limit`` examined means
            the pruner has caught up.
        """
        return await self.run(lambda tx: pruning.prune_events(tx, cutoff, limit))

    async def prune_workflows(
        self, cutoff: float, limit: int, *, with_events: bool
    ) -> tuple[int, int]:
        """Delete up to ``limit`` workflow rows that ended before ``cutoff`` (and, with
        ``with_events``, whatever events of theirs are left).

        Returns:
            (workflows deleted, events deleted).
        """
        return await self.run(lambda tx: pruning.prune_workflows(tx, cutoff, limit, with_events))

    async def prune_rows(self, kind: str, cutoff: float, limit: int) -> int:
        """Delete up to ``limit`` rows of ``kind`` older than ``cutoff``: ``results``
        (mutation results; each client's last applied id stays in ``clients``),
        ``outbox`` (delivered items) or ``dead_letters`` (resolved or requeued).

        Returns:
            The rows deleted.

        Raises:
            UsageError: an unknown kind.
        """
        pruning.check_kind(kind)
        return await self.run(lambda tx: pruning.prune_rows(tx, kind, cutoff, limit))
