"""The SQL of named limits (``sync_server.saga.limits``), for both backends.

Written once with ``$n`` placeholders; the backend's ``Dialect`` renders them (SQLite:
``?n``, lists as JSON arrays, no row locks). PostgreSQL combines a few steps into one
statement each (``PG_*``: one round trip). The statements run inside a
transaction that has locked the limit's row (PostgreSQL) or holds the database write
lock (SQLite), so counting and taking a slot cannot race another instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sync_server.store.rows import WORKFLOW_COLUMNS

if TYPE_CHECKING:
    from sync_server.store.dialect import Dialect

__all__ = [
    "DROP_WAITERS",
    "FAIR_WINDOW",
    "HANDOFF",
    "LIMIT_STARTS",
    "LOCK_LIMIT",
    "LOG_START",
    "PG_HANDOFF",
    "PG_POSITION",
    "PG_TAKE",
    "PG_USAGE",
    "PG_WAKE",
    "PRUNE_STARTS",
    "RATE_WINDOW",
    "RELEASE_SLOTS",
    "RUNNING_SLOTS",
    "SQLITE_RELEASE_SLOTS",
    "TAKE_SLOT",
    "TAKE_WAITER",
    "UPSERT_WAITER",
    "WAITER_COUNTS",
    "WAITER_RANK",
    "WAKE_WAITERS",
    "fair_position",
    "handoff",
]

RATE_WINDOW = 1.1
"""Seconds of start history a ``per_second`` limit looks at: one second, plus a guard of
100 ms so that the limit also holds as the downstream sees it (an attempt starts a
little after the transaction that admitted it commits, and not always equally late)."""

LOCK_LIMIT = (
    "INSERT INTO limits (name, updated_at) VALUES ($1, $2) "
    "ON CONFLICT (name) DO UPDATE SET updated_at = excluded.updated_at"
)
# A slot counts only while its holder still holds the workflow's lease with the same
# fence: a killed instance's slots lapse with its leases (nothing to clean up).
RUNNING_SLOTS = (
    "SELECT count(*) FROM limit_slots AS s JOIN workflows AS w "
    "ON w.id = s.workflow_id AND w.tenant = s.tenant "
    "WHERE s.name = $1 AND w.lease_owner = s.owner AND w.fence = s.fence "
    "AND w.lease_until >= $2"
)
LIMIT_STARTS = "SELECT count(*), min(at) FROM limit_starts WHERE name = $1 AND at > $2"
UPSERT_WAITER = (
    "INSERT INTO limit_waiters (name, tenant, workflow_id, step, created_at, seen_at) "
    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name, tenant, workflow_id, step) "
    "DO UPDATE SET seen_at = excluded.seen_at"
)
# Fair order (round-robin across tenants): a waiter's turn is ``served + k`` — the
# starts its tenant had in the last FAIR_WINDOW seconds plus its rank k (1, 2, …) among
# its tenant's waiters in submit order — and the queue is ordered by (turn, tenant,
# submit time). The tenant served least goes next, so turns alternate and one tenant's
# burst cannot hold the head of the queue. ``fair_position`` computes a waiter's place
# from per-tenant counts (an index range per query, no sort of every waiter).
FAIR_WINDOW = 10.0
"""Seconds of start history that count as a tenant's recent service (fair order)."""
WAITER_COUNTS = (
    "SELECT c.tenant, c.n, coalesce(s.n, 0) FROM (SELECT tenant, count(*) AS n "
    "FROM limit_waiters WHERE name = $1 AND seen_at >= $2 GROUP BY tenant) AS c "
    "LEFT JOIN (SELECT tenant, count(*) AS n FROM limit_starts WHERE name = $1 AND at > $3 "
    "GROUP BY tenant) AS s ON s.tenant = c.tenant"
)
WAITER_RANK = (
    "SELECT count(*) FROM limit_waiters WHERE name = $1 AND tenant = $2 AND seen_at >= $3 "
    "AND (created_at, workflow_id, step) < ($4, $5, $6)"
)
_FAIR = (
    "SELECT w.tenant, w.workflow_id, w.step, w.created_at, row_number() OVER "
    "(PARTITION BY w.tenant ORDER BY w.created_at, w.workflow_id, w.step) "
    "+ coalesce(s.n, 0) AS rn "
    "FROM limit_waiters AS w LEFT JOIN (SELECT tenant, count(*) AS n FROM limit_starts "
    "WHERE name = $1 AND at > $SERVED GROUP BY tenant) AS s ON s.tenant = w.tenant "
    "WHERE w.name = $1 AND w.seen_at >= $2"
)


def fair_position(tenant: str, rank: int, tenants: list[tuple[str, int, int]]) -> int:
    """A waiter's 0-based place in fair order.

    Args:
        tenant: the waiter's tenant.
        rank: how many of its tenant's waiters come before it (submit order).
        tenants: (tenant, waiters, recent starts) of every tenant with waiters.

    Returns:
        How many waiters come before it: of each tenant, those whose turn
        (``starts + k``) is earlier than its own, and on an equal turn those of tenants
        that sort before its own.
    """
    served = {name: starts for name, _, starts in tenants}
    turn = served.get(tenant, 0) + rank + 1
    ahead = 0
    for name, waiting, starts in tenants:
        if name == tenant:
            ahead += rank
            continue
        earlier = min(waiting, max(0, turn - starts - 1))
        tie = 1 if name < tenant and 1 <= turn - starts <= waiting else 0
        ahead += earlier + tie
    return ahead


TAKE_WAITER = (
    "DELETE FROM limit_waiters WHERE name = $1 AND tenant = $2 AND workflow_id = $3 AND step = $4"
)
TAKE_SLOT = (
    "INSERT INTO limit_slots (name, tenant, workflow_id, step, owner, fence, acquired_at) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name, tenant, workflow_id, step) "
    "DO UPDATE SET owner = excluded.owner, fence = excluded.fence, "
    "acquired_at = excluded.acquired_at"
)
LOG_START = "INSERT INTO limit_starts (name, tenant, at) VALUES ($1, $2, $3)"
PRUNE_STARTS = "DELETE FROM limit_starts WHERE name = $1 AND at <= $2"
RELEASE_SLOTS = (
    "DELETE FROM limit_slots AS s USING unnest($1::text[], $2::text[], $3::text[]) "
    "AS r(tenant, workflow_id, step) WHERE s.tenant = r.tenant "
    "AND s.workflow_id = r.workflow_id AND s.step = r.step RETURNING s.name"
)
SQLITE_RELEASE_SLOTS = (
    "DELETE FROM limit_slots WHERE (tenant, workflow_id, step) IN (SELECT "
    "json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]') "
    "FROM json_each(?1)) RETURNING name"
)
DROP_WAITERS = "DELETE FROM limit_waiters WHERE tenant = $1 AND workflow_id = $2 AND step = ANY($3)"
# The first $3 waiters in fair order become due now, unless a live lease holds their
# workflow. A row another transaction holds (a claim is working on it) is skipped, never
# waited for, and the next waiter in fair order is woken in its place — so a freed slot
# is never left idle until the waiters' next poll.
WAKE_WAITERS = (
    f"WITH f AS ({_FAIR.replace('$SERVED', '$5')}), top AS (SELECT tenant, workflow_id, rn, "
    "created_at, step FROM f ORDER BY rn, tenant, created_at, workflow_id, step "
    "LIMIT 2 * $3 + 8), "
    "pick AS (SELECT w.id, w.tenant FROM workflows AS w JOIN top "
    "ON w.id = top.workflow_id AND w.tenant = top.tenant "
    "WHERE w.due_at > $4 AND (w.lease_owner IS NULL OR w.lease_until IS NULL "
    "OR w.lease_until < $4) "
    "ORDER BY top.rn, top.tenant, top.created_at, top.workflow_id, top.step "
    "LIMIT $3 FOR UPDATE OF w SKIP LOCKED) "
    "UPDATE workflows SET due_at = $4 FROM pick "
    "WHERE workflows.id = pick.id AND workflows.tenant = pick.tenant"
)


# Hand-off: the transaction that freed slots claims the next waiters itself (of the
# versions it runs), so a freed slot is refilled in the same commit instead of a wake,
# a notification and another claim later. $3 waiters at most; $6/$7 the names and
# versions of the (name, version) pairs (``pairs``: the dialect's zip of two lists);
# the lease as in the claim ($8 owner, $9 lease end, fence + 1).
def _handoff(pairs: str) -> str:
    return (
        f"WITH f AS ({_FAIR.replace('$SERVED', '$5')}), top AS (SELECT tenant, workflow_id, "
        "rn, created_at, step FROM f ORDER BY rn, tenant, created_at, workflow_id, step "
        "LIMIT 2 * $3 + 8), "
        "pick AS (SELECT w.id, w.tenant FROM workflows AS w JOIN top "
        "ON w.id = top.workflow_id AND w.tenant = top.tenant "
        "WHERE (w.lease_owner IS NULL OR w.lease_until IS NULL OR w.lease_until < $4) "
        "AND w.due_at IS NOT NULL "
        f"AND (w.name, w.workflow_version) IN ({pairs}) "
        "ORDER BY top.rn, top.tenant, top.created_at, top.workflow_id, top.step "
        "LIMIT $3 FOR UPDATE OF w SKIP LOCKED) "
        "UPDATE workflows AS w SET lease_owner = $8, lease_until = $9, fence = w.fence + 1 "
        "FROM pick WHERE w.id = pick.id AND w.tenant = pick.tenant RETURNING "
    )


HANDOFF = _handoff("SELECT * FROM unnest($6::text[], $7::text[])")

# PostgreSQL: the first waiters in fair order without ranking every waiter — the
# tenants by a loose index scan (a recursive min), then each tenant's first few in
# submit order through the (name, tenant, created_at, workflow_id) index. Thousands of
# waiters cost what a handful do. It replaces ``f`` and ``top`` in WAKE and HANDOFF.
_PG_TOP = (
    "WITH RECURSIVE t(tenant) AS (SELECT min(tenant) FROM limit_waiters WHERE name = $1 "
    "UNION ALL SELECT (SELECT min(w.tenant) FROM limit_waiters AS w WHERE w.name = $1 "
    "AND w.tenant > t.tenant) FROM t WHERE t.tenant IS NOT NULL), "
    "served AS (SELECT tenant, count(*) AS n FROM limit_starts WHERE name = $1 AND at > $5 "
    "GROUP BY tenant), "
    "top AS (SELECT x.tenant, x.workflow_id, x.step, x.created_at, x.k + coalesce(s.n, 0) "
    "AS rn FROM t CROSS JOIN LATERAL (SELECT w.tenant, w.workflow_id, w.step, w.created_at, "
    "row_number() OVER (ORDER BY w.created_at, w.workflow_id, w.step) AS k "
    "FROM limit_waiters AS w WHERE w.name = $1 AND w.tenant = t.tenant AND w.seen_at >= $2 "
    "ORDER BY w.created_at, w.workflow_id, w.step LIMIT 2 * $3 + 8) AS x "
    "LEFT JOIN served AS s ON s.tenant = x.tenant "
    "ORDER BY rn, x.tenant, x.created_at, x.workflow_id, x.step LIMIT 2 * $3 + 8), "
)


def _pg_top(statement: str) -> str:
    head = statement[: statement.index("pick AS")]
    return _PG_TOP + statement[len(head) :]


PG_WAKE = _pg_top(WAKE_WAITERS)
PG_HANDOFF = _pg_top(HANDOFF)

# PostgreSQL does in one round trip what SQLite (no round trips: in-process) does in a
# few statements. The counts of PG_POSITION come from the statement's snapshot, which
# lacks the waiter it inserts — harmless: only the waiter's own rank (the rows before
# it) and the other tenants' counts are used.
PG_USAGE = (
    f"SELECT ({RUNNING_SLOTS}), s.n, s.oldest FROM (SELECT count(*) AS n, min(at) AS oldest "
    "FROM limit_starts WHERE name = $1 AND at > $3) AS s"
)
PG_POSITION = (
    "WITH up AS (INSERT INTO limit_waiters (name, tenant, workflow_id, step, created_at, "
    "seen_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name, tenant, workflow_id, step) "
    "DO UPDATE SET seen_at = excluded.seen_at), "
    "c AS (SELECT tenant, count(*) AS n FROM limit_waiters WHERE name = $1 AND seen_at >= $7 "
    "GROUP BY tenant), "
    "s AS (SELECT tenant, count(*) AS n FROM limit_starts WHERE name = $1 AND at > $8 "
    "GROUP BY tenant), "
    "r AS (SELECT count(*) AS n FROM limit_waiters WHERE name = $1 AND tenant = $2 "
    "AND seen_at >= $7 AND (created_at, workflow_id, step) < ($5, $3, $4)) "
    "SELECT c.tenant, c.n, coalesce(s.n, 0), (SELECT n FROM r) "
    "FROM c LEFT JOIN s ON s.tenant = c.tenant"
)
PG_TAKE = (
    "WITH w AS (DELETE FROM limit_waiters WHERE name = $1 AND tenant = $2 "
    "AND workflow_id = $3 AND step = $4), "
    "old AS (DELETE FROM limit_starts WHERE name = $1 AND at <= $8), "
    "slot AS (INSERT INTO limit_slots (name, tenant, workflow_id, step, owner, fence, "
    "acquired_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name, tenant, workflow_id, "
    "step) DO UPDATE SET owner = excluded.owner, fence = excluded.fence, "
    "acquired_at = excluded.acquired_at) "
    "INSERT INTO limit_starts (name, tenant, at) VALUES ($1, $2, $7)"
)

_HANDOFFS: dict[str, str] = {}


def handoff(dialect: Dialect) -> str:
    """The hand-off statement in ``dialect`` (PostgreSQL: ``PG_HANDOFF``), returning the
    claimed workflows' columns."""
    statement = _HANDOFFS.get(dialect.name)
    if statement is None:
        own = PG_HANDOFF if dialect.one_round_trip else None
        body = own or dialect.sql(_handoff(dialect.pairs(6, 7)))
        statement = _HANDOFFS[dialect.name] = body + dialect.returning(WORKFLOW_COLUMNS, "w")
    return statement
