"""Retention's units of work behind ``Store.prune_*``, written once for both backends.

Theory of operation
-------------------
Each function runs inside one short transaction (``Store.run``) and touches at most one
batch of rows, found through an index (``workflows_ended``, ``mutation_results_at``,
``outbox_published``, ``dlq_resolved``): writers never wait behind a long delete.

* PostgreSQL skips rows another transaction holds (SKIP LOCKED), and the event pruner's
  mark row is taken with SKIP LOCKED, so of several instances one prunes a given batch
  and the others move on.
* SQLite holds the database write lock for the batch, and never deletes the newest
  event: its positions continue from ``MAX(seq)``.

Whenever events are deleted, each tenant's horizon (``tenant_horizons``: the highest
pruned seq) is raised in the same transaction — the server compares a client's cursor
with it to decide on a reset (SPEC promise 8).
"""

from __future__ import annotations

from protocol import UsageError
from sync_server.store import statements
from sync_server.store.records import WorkflowKey
from sync_server.store.transaction import Transaction

__all__ = [
    "PRUNED_TABLES",
    "PRUNE_KINDS",
    "delete_events_of",
    "prune_events",
    "prune_rows",
    "prune_workflows",
]

PRUNE_KINDS = {
    "results": "prune.results",
    "outbox": "prune.outbox",
    "dead_letters": "prune.dead_letters",
}
"""Row kinds ``prune_rows`` deletes, and the name of each one's statement."""
PRUNED_TABLES = ("events", "workflows", "mutation_results", "outbox", "dlq")
_MARK = "events"
_NEW_MARK = (
    "INSERT INTO retention_marks (name, at, id) VALUES ($1, 0, '') ON CONFLICT (name) DO NOTHING"
)


async def delete_events_of(tx: Transaction, keys: list[WorkflowKey]) -> int:
    """Delete every event of the workflows ``keys`` (on SQLite: but the newest event of
    the log), raising the tenants' horizons; returns the events deleted."""
    own = tx.dialect.own
    ids, tenants = [k.id for k in keys], [k.tenant for k in keys]
    if tx.dialect.one_round_trip:  # deleted and counted per tenant in one statement
        found = await tx._fetch_all(own["prune.events_of"], ids, tenants)
        if found:
            highest = [r[0] for r in found], [int(r[1]) for r in found]
            await tx._exec(own["prune.raise_horizons"], *highest)
        return sum(int(r[2]) for r in found)
    found = await tx._fetch_all(
        own["prune.events_of"],
        tx.dialect.array([list(pair) for pair in zip(ids, tenants, strict=True)]),
    )
    per_tenant: dict[str, int] = {}
    for row in found:
        per_tenant[row[0]] = max(per_tenant.get(row[0], 0), int(row[1]))
    if per_tenant:
        await tx._exec_many(own["prune.raise_horizons"], list(per_tenant.items()))
    return len(found)


async def prune_events(tx: Transaction, cutoff: float, limit: int) -> tuple[int, int]:
    """One batch of ``Store.prune_events``."""
    sql = tx.dialect.sql
    await tx._exec(sql(_NEW_MARK), _MARK)
    mark = await tx._fetch_one(sql(statements.PRUNE_MARK), _MARK)
    if mark is None:  # another instance is pruning this very moment
        return 0, 0
    ended = await tx._fetch_all(
        sql(statements.ENDED_AFTER), cutoff, float(mark[0]), str(mark[1]), limit
    )
    if not ended:
        return 0, 0
    deleted = await delete_events_of(tx, [WorkflowKey(r[2], r[0]) for r in ended])
    last = ended[-1]
    await tx._exec(sql(statements.SET_MARK), _MARK, float(last[1]), last[0])
    return len(ended), deleted


async def prune_workflows(
    tx: Transaction, cutoff: float, limit: int, with_events: bool
) -> tuple[int, int]:
    """One batch of ``Store.prune_workflows``."""
    found = await tx._fetch_all(tx.dialect.own["prune.workflows"], cutoff, limit)
    keys = [WorkflowKey(r[1], r[0]) for r in found]
    events = await delete_events_of(tx, keys) if with_events and keys else 0
    return len(keys), events


def check_kind(kind: str) -> str:
    """The statement name of a prune kind.

    Raises:
        UsageError: an unknown kind.
    """
    name = PRUNE_KINDS.get(kind)
    if name is None:
        raise UsageError(f"unknown prune kind {kind!r} (one of {', '.join(PRUNE_KINDS)})")
    return name


async def prune_rows(tx: Transaction, kind: str, cutoff: float, limit: int) -> int:
    """One batch of ``Store.prune_rows``."""
    return await tx._exec(tx.dialect.own[check_kind(kind)], cutoff, limit)
