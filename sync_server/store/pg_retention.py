"""Retention on PostgreSQL: the units of work behind ``PostgresStore.prune_*``.

Each function runs inside one short transaction (``PostgresStore.run``) and touches at
most one batch of rows, found through an index (``workflows_ended``,
``mutation_results_at``, ``outbox_published``, ``dlq_resolved``): writers never wait
behind a long delete. Rows another transaction holds are skipped (SKIP LOCKED), and the
event pruner's mark row is taken with SKIP LOCKED, so of several instances one prunes a
given batch and the others move on.

Whenever events are deleted, each tenant's horizon (``tenant_horizons``: the highest
pruned seq) is raised in the same transaction — the server compares a client's cursor
with it to decide on a reset (SPEC promise 8).
"""

from __future__ import annotations

from protocol import UsageError
from sync_server.store import statements
from sync_server.store.base import WorkflowKey
from sync_server.store.pg_transaction import PostgresTransaction

__all__ = [
    "PRUNED_TABLES",
    "PRUNE_KINDS",
    "delete_events_of",
    "prune_events",
    "prune_rows",
    "prune_workflows",
]

PRUNE_KINDS = {
    "results": statements.PG_DELETE_RESULTS,
    "outbox": statements.PG_DELETE_OUTBOX,
    "dead_letters": statements.PG_DELETE_DEAD_LETTERS,
}
_MARK = "events"
PRUNED_TABLES = ("events", "workflows", "mutation_results", "outbox", "dlq")


async def delete_events_of(tx: PostgresTransaction, keys: list[WorkflowKey]) -> int:
    """Delete every event of the workflows ``keys``, raising the tenants' horizons;
    returns the events deleted."""
    found = await tx._fetch(
        statements.PG_DELETE_EVENTS_OF, [k.id for k in keys], [k.tenant for k in keys]
    )
    if found:
        await tx._execute(
            statements.PG_RAISE_HORIZONS, [r[0] for r in found], [int(r[1]) for r in found]
        )
    return sum(int(r[2]) for r in found)


async def prune_events(tx: PostgresTransaction, cutoff: float, limit: int) -> tuple[int, int]:
    """One batch of ``Store.prune_events``."""
    await tx._execute(
        "INSERT INTO retention_marks (name, at, id) VALUES ($1, 0, '') "
        "ON CONFLICT (name) DO NOTHING",
        _MARK,
    )
    mark = await tx._fetchrow(statements.PG_PRUNE_MARK, _MARK)
    if mark is None:  # another instance is pruning this very moment
        return 0, 0
    ended = await tx._fetch(statements.PG_ENDED_AFTER, cutoff, mark[0], mark[1], limit)
    if not ended:
        return 0, 0
    deleted = await delete_events_of(tx, [WorkflowKey(r[2], r[0]) for r in ended])
    last = ended[-1]
    await tx._execute(statements.PG_SET_MARK, _MARK, float(last[1]), last[0])
    return len(ended), deleted


async def prune_workflows(
    tx: PostgresTransaction, cutoff: float, limit: int, with_events: bool
) -> tuple[int, int]:
    """One batch of ``Store.prune_workflows``."""
    found = await tx._fetch(statements.PG_DELETE_ENDED_WORKFLOWS, cutoff, limit)
    keys = [WorkflowKey(r[1], r[0]) for r in found]
    events = await delete_events_of(tx, keys) if with_events and keys else 0
    return len(keys), events


async def prune_rows(tx: PostgresTransaction, kind: str, cutoff: float, limit: int) -> int:
    """One batch of ``Store.prune_rows``."""
    sql = PRUNE_KINDS.get(kind)
    if sql is None:
        raise UsageError(f"unknown prune kind {kind!r} (one of {', '.join(PRUNE_KINDS)})")
    status = await tx._execute(sql, cutoff, limit)
    return int(status.rsplit(" ", 1)[-1])
