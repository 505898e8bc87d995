"""Retention on SQLite: the units of work behind ``SqliteStore.prune_*``.

Each function runs in one short write transaction (the store's write lock) and deletes
at most one batch of rows found through an index, so a push waits for one small batch
at most. The newest event is never deleted: SQLite positions continue from
``MAX(seq)``. Deleting events raises each tenant's horizon in the same transaction.
"""

from __future__ import annotations

from protocol import UsageError
from sync_server.store import rows, statements
from sync_server.store.base import WorkflowKey
from sync_server.store.sqlite_transaction import SqliteTransaction

__all__ = ["PRUNE_KINDS", "delete_events_of", "prune_events", "prune_rows", "prune_workflows"]

PRUNE_KINDS = {
    "results": statements.SQLITE_DELETE_RESULTS,
    "outbox": statements.SQLITE_DELETE_OUTBOX,
    "dead_letters": statements.SQLITE_DELETE_DEAD_LETTERS,
}
_MARK = "events"


def delete_events_of(tx: SqliteTransaction, keys: list[WorkflowKey]) -> int:
    """Delete the events of the workflows ``keys`` (but the newest event of the log),
    raising the tenants' horizons; returns the events deleted."""
    pairs = rows.dumps([[k.id, k.tenant] for k in keys])
    found = tx._all(statements.SQLITE_DELETE_EVENTS_OF, (pairs,))
    highest: dict[str, int] = {}
    for tenant, seq in found:
        highest[tenant] = max(highest.get(tenant, 0), int(seq))
    if highest:
        tx._executemany(statements.SQLITE_RAISE_HORIZON, list(highest.items()))
    return len(found)


def prune_events(tx: SqliteTransaction, cutoff: float, limit: int) -> tuple[int, int]:
    """One batch of ``Store.prune_events``."""
    mark = tx._one("SELECT at, id FROM retention_marks WHERE name = ?", (_MARK,))
    at, after = (float(mark[0]), str(mark[1])) if mark else (0.0, "")
    ended = tx._all(statements.SQLITE_ENDED_AFTER, (cutoff, at, after, limit))
    if not ended:
        return 0, 0
    deleted = delete_events_of(tx, [WorkflowKey(r[2], r[0]) for r in ended])
    last = ended[-1]
    tx._execute(statements.SQLITE_SET_MARK, (_MARK, float(last[1]), last[0]))
    return len(ended), deleted


def prune_workflows(
    tx: SqliteTransaction, cutoff: float, limit: int, with_events: bool
) -> tuple[int, int]:
    """One batch of ``Store.prune_workflows``."""
    found = tx._all(statements.SQLITE_DELETE_ENDED_WORKFLOWS, (cutoff, limit))
    keys = [WorkflowKey(r[1], r[0]) for r in found]
    events = delete_events_of(tx, keys) if with_events and keys else 0
    return len(keys), events


def prune_rows(tx: SqliteTransaction, kind: str, cutoff: float, limit: int) -> int:
    """One batch of ``Store.prune_rows``."""
    sql = PRUNE_KINDS.get(kind)
    if sql is None:
        raise UsageError(f"unknown prune kind {kind!r} (one of {', '.join(PRUNE_KINDS)})")
    return tx._execute(sql, (cutoff, limit)).rowcount
