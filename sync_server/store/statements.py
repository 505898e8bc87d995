"""The SQL of every hot statement, by name, for both backends (SPEC promise 8).

Theory of operation
-------------------
A statement on a hot path (push, claim, checkpoint, fan-out read, catch-up page,
reconciliation sweep, monitor backlogs, dashboard overview, DLQ list, workflow listing,
pruning) must find its rows through an index whatever the table size — and, on
PostgreSQL, whatever plan asyncpg's statement cache holds: after five executions the
server may switch a prepared statement to a *generic* plan, made without the parameter
values (LESSONS "prepared statements and generic plans"). So:

* a list of ids is joined against ``unnest($1::text[])`` (a nested loop over the
  primary key), never matched with ``= ANY($1)``, whose generic plan can become a
  sequential scan;
* a filter combination gets its own statement (no ``$1 IS NULL OR …``);
* a newest-first listing filtered by several statuses reads each status's index range
  in order (``LATERAL`` / ``UNION ALL``) and merges at most ``limit`` rows of each;
* the plan test also names the index each critical statement must use: a generic plan
  knows only ``1 / n_distinct`` of a parameter, so on statistics where one value covers
  every row (one status, one tenant) it may walk another ordered index and filter —
  across the whole table for a rare value. Real stores hold several statuses and
  tenants; ``bench.fill`` loads a realistic mix.

Most statements are written once, in PostgreSQL's spelling; ``sqlite_text`` renders
them for SQLite (``Dialect.sql`` at run time). Those a backend writes its own way (a
different plan, not just a different spelling: ``unnest`` joins, ``SKIP LOCKED``,
``ctid``/``rowid`` batches) are ``PG_*`` / ``SQLITE_*``, and ``POSTGRES_OWN`` /
``SQLITE_OWN`` hand them to the dialect by name. ``POSTGRES_HOT`` / ``SQLITE_HOT`` name
every hot statement, so ``tests/test_store_plans.py`` checks exactly what the code runs: it
bulk-loads both backends and asserts with ``EXPLAIN`` (PostgreSQL: ``EXPLAIN EXECUTE``
of the statement asyncpg prepared, under ``plan_cache_mode = force_generic_plan``) that
none of them scans ``workflows`` or ``events`` sequentially.
"""

from __future__ import annotations

import re

from sync_server.store import rows

_WF = rows.WORKFLOW_COLUMNS
_EV = rows.EVENT_COLUMNS
_DLQ = rows.DLQ_COLUMNS

_ANY = re.compile(r"= ANY\(\$(\d+)(?:::\w+\[\])?\)")
_LOCKS = re.compile(r" FOR UPDATE(?: OF \w+)?(?: SKIP LOCKED)?")
_PARAM = re.compile(r"\$(\d+)")


def sqlite_text(sql: str) -> str:
    """A shared statement in SQLite's spelling: ``?n`` parameters, a list parameter
    (``= ANY($n)``) as a JSON array read with ``json_each``, no row locks (a SQLite
    writer holds the whole database's write lock)."""
    sql = _ANY.sub(r"IN (SELECT value FROM json_each($\1))", sql)
    return _PARAM.sub(r"?\1", _LOCKS.sub("", sql))


def _qualified(columns: str, alias: str) -> str:
    return ", ".join(f"{alias}.{col.strip()}" for col in columns.split(","))


ENDED_STATUSES = ("completed", "compensated", "failed", "cancelled")
_ENDED = "status IN ('completed', 'compensated', 'failed', 'cancelled')"
"""Matches the predicate of the partial index ``workflows_ended`` (migration 7)."""

# ------------------------------------------- shared, and PostgreSQL's own (PG_*)
READ_EVENTS = f"SELECT {_EV} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2"
READ_TENANT_EVENTS = (
    f"SELECT {_EV} FROM events WHERE tenant = $1 AND seq > $2 ORDER BY seq LIMIT $3"
)
WORKFLOW_EVENTS = f"SELECT {_EV} FROM events WHERE workflow_id = $1 AND tenant = $2 ORDER BY wf_seq"
# A tenant's head never goes back when its newest events are pruned (tenant_horizons).
PG_TENANT_HEAD = (
    "SELECT greatest((SELECT coalesce(max(seq), 0) FROM events WHERE tenant = $1), "
    "(SELECT coalesce(max(seq), 0) FROM tenant_horizons WHERE tenant = $1))"
)
TENANT_HORIZON = "SELECT coalesce(max(seq), 0) FROM tenant_horizons WHERE tenant = $1"
GET_WORKFLOW = f"SELECT {_WF} FROM workflows WHERE id = $1 AND tenant = $2"
PG_GET_WORKFLOWS = (
    f"SELECT {_qualified(_WF, 'w')} FROM unnest($1::text[], $2::text[]) AS k(id, tenant) "
    "JOIN workflows AS w ON w.id = k.id AND w.tenant = k.tenant"
)
PG_GET_WORKFLOWS_FOR_UPDATE = PG_GET_WORKFLOWS + " ORDER BY w.id, w.tenant FOR UPDATE OF w"
PG_MUTATION_RESULTS = (
    "SELECT m.mutation_id, m.status, m.error FROM unnest($3::bigint[]) AS u(id) "
    "JOIN mutation_results AS m ON m.client_id = $1 AND m.tenant = $2 "
    "AND m.mutation_id = u.id"
)
# A push's outcomes travel as arrays, with the client's last applied id: one statement.
PG_RECORD_MUTATIONS = """
WITH r AS (
    INSERT INTO mutation_results (client_id, tenant, mutation_id, status, error, at)
    SELECT $1, $7, u.id, u.status, u.error, $6
    FROM unnest($2::bigint[], $3::text[], $4::text[]) AS u(id, status, error)
    ON CONFLICT (client_id, tenant, mutation_id)
    DO UPDATE SET status = excluded.status, error = excluded.error, at = excluded.at
)
UPDATE clients SET last_mutation_id = $5, updated_at = $6 WHERE client_id = $1 AND tenant = $7
"""
GET_CLIENT = "SELECT subject, last_mutation_id FROM clients WHERE client_id = $1 AND tenant = $2"
# A batch picked by a subquery is matched with "= ANY(ARRAY(subquery))" — by ctid where
# the key has two columns: one TID lookup per picked row. Joining the subquery instead
# lets a generic plan (which guesses that "LIMIT $n" keeps 10 % of the table) hash-join
# it against a sequential scan. (A row locked by the subquery cannot move within the
# statement, so its ctid stays valid.)
PG_CLAIM_DUE_WORKFLOWS = (
    "UPDATE workflows AS w SET lease_owner = $1, lease_until = $2, fence = w.fence + 1 "
    "WHERE w.ctid = ANY(ARRAY(SELECT ctid FROM workflows WHERE due_at <= $3 "
    "AND (lease_owner IS NULL OR lease_until IS NULL OR lease_until < $3) "
    "ORDER BY due_at LIMIT $4 FOR UPDATE SKIP LOCKED)) "
    f"RETURNING {_qualified(_WF, 'w')}"
)
# The same claim limited to the (name, version) pairs this instance has (rolling
# deploys): one index range scan of ``workflows_claim_version`` per pair ($5, $6 arrays),
# so the due rows of versions this instance lacks are never even read.
PG_CLAIM_DUE_VERSIONED = (
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
    "FROM due WHERE w.id = due.id AND w.tenant = due.tenant RETURNING " + _qualified(_WF, "w")
)
PG_RENEW_LEASES = (
    "UPDATE workflows AS w SET lease_until = $5 "
    "FROM unnest($2::text[], $3::text[], $4::bigint[]) AS l(id, tenant, fence) "
    "WHERE w.id = l.id AND w.tenant = l.tenant AND w.fence = l.fence "
    "AND w.lease_owner = $1 RETURNING w.tenant, w.id"
)
PG_RELEASE_LEASES = (
    "UPDATE workflows AS w SET lease_owner = NULL, lease_until = NULL "
    "FROM unnest($2::text[], $3::text[], $4::bigint[]) AS l(id, tenant, fence) "
    "WHERE w.id = l.id AND w.tenant = l.tenant AND w.fence = l.fence "
    "AND w.lease_owner = $1"
)
BACKLOG = (
    "SELECT (SELECT count(*) FROM dlq WHERE status = 'open'), "
    "(SELECT min(due_at) FROM workflows WHERE status IN ('running', 'compensating') "
    "AND due_at IS NOT NULL AND (lease_owner IS NULL OR lease_until IS NULL "
    "OR lease_until < $1))"
)
PG_CLAIM_OUTBOX = (
    "UPDATE outbox SET next_retry_at = $3 WHERE id = ANY(ARRAY(SELECT id FROM outbox "
    "WHERE status = 'pending' AND next_retry_at <= $1 ORDER BY next_retry_at, id LIMIT $2 "
    f"FOR UPDATE SKIP LOCKED)) RETURNING {rows.OUTBOX_COLUMNS}"
)
OUTBOX_STATS = "SELECT count(*), min(created_at) FROM outbox WHERE status = 'pending'"

# Retention (``sync_server.retention``): small batches, each found by an index.
PRUNE_MARK = "SELECT at, id FROM retention_marks WHERE name = $1 FOR UPDATE SKIP LOCKED"
ENDED_AFTER = (
    f"SELECT id, updated_at, tenant FROM workflows WHERE {_ENDED} AND updated_at < $1 "
    "AND (updated_at, id) > ($2, $3) ORDER BY updated_at, id LIMIT $4"
)
PG_DELETE_EVENTS_OF = (
    "WITH gone AS (DELETE FROM events AS e USING unnest($1::text[], $2::text[]) "
    "AS k(id, tenant) WHERE e.workflow_id = k.id AND e.tenant = k.tenant "
    "RETURNING e.tenant, e.seq) "
    "SELECT tenant, max(seq), count(*) FROM gone GROUP BY tenant"
)
PG_DELETE_ENDED_WORKFLOWS = (
    f"DELETE FROM workflows WHERE ctid = ANY(ARRAY(SELECT ctid FROM workflows WHERE "
    f"{_ENDED} AND updated_at < $1 ORDER BY updated_at, id LIMIT $2 FOR UPDATE SKIP LOCKED)) "
    "RETURNING id, tenant"
)
PG_DELETE_RESULTS = (
    "DELETE FROM mutation_results WHERE ctid = ANY(ARRAY(SELECT ctid FROM mutation_results "
    "WHERE at < $1 ORDER BY at LIMIT $2 FOR UPDATE SKIP LOCKED))"
)
PG_DELETE_OUTBOX = (
    "DELETE FROM outbox WHERE id = ANY(ARRAY(SELECT id FROM outbox WHERE status = "
    "'published' AND published_at < $1 ORDER BY published_at LIMIT $2 "
    "FOR UPDATE SKIP LOCKED))"
)
PG_DELETE_DEAD_LETTERS = (
    "DELETE FROM dlq WHERE id = ANY(ARRAY(SELECT id FROM dlq WHERE status <> 'open' "
    "AND resolved_at < $1 ORDER BY resolved_at LIMIT $2 FOR UPDATE SKIP LOCKED))"
)
PG_RAISE_HORIZONS = (
    "INSERT INTO tenant_horizons (tenant, seq) SELECT * FROM unnest($1::text[], $2::bigint[]) "
    "ON CONFLICT (tenant) DO UPDATE SET seq = greatest(tenant_horizons.seq, excluded.seq)"
)
SET_MARK = (
    "INSERT INTO retention_marks (name, at, id) VALUES ($1, $2, $3) "
    "ON CONFLICT (name) DO UPDATE SET at = excluded.at, id = excluded.id"
)


_ORDER = "ORDER BY created_at DESC, id DESC"


def pg_list_workflows(*, tenant: bool, statuses: bool) -> str:
    """The listing statement for one filter combination.

    Parameters, in order: ``tenant`` (if filtered), ``statuses`` as ``text[]`` (if
    filtered), ``limit``. With statuses, each status's index range is read newest first
    and stops after ``limit`` rows (``LATERAL``), so the cost does not grow with the
    number of finished workflows.
    """
    n = 1
    where = []
    if tenant:
        where.append(f"tenant = ${n}")
        n += 1
    if not statuses:
        clause = f" WHERE {where[0]}" if where else ""
        return f"SELECT {_WF} FROM workflows{clause} {_ORDER} LIMIT ${n}"
    statuses_at, limit_at = n, n + 1
    inner = " AND ".join([*where, "status = s.status"])
    return (
        f"SELECT {_qualified(_WF, 'w')} FROM unnest(${statuses_at}::text[]) AS s(status) "
        f"CROSS JOIN LATERAL (SELECT {_WF} FROM workflows WHERE {inner} {_ORDER} "
        f"LIMIT ${limit_at}) AS w ORDER BY w.created_at DESC, w.id DESC LIMIT ${limit_at}"
    )


def status_counts(*, tenant: bool) -> str:
    """Counts by status over the newest ``limit`` workflows (of a tenant, or all):
    parameters tenant (if filtered) and limit."""
    where = " WHERE tenant = $1" if tenant else ""
    limit = f"${2 if tenant else 1}"
    return (
        f"SELECT status, count(*) FROM (SELECT status FROM workflows{where} {_ORDER} "
        f"LIMIT {limit}) AS recent GROUP BY status"
    )


def list_dlq(*, tenant: bool, status: bool) -> str:
    """The DLQ listing for one filter combination (tenant, status, limit — as given)."""
    where: list[str] = []
    if tenant:
        where.append(f"tenant = ${len(where) + 1}")
    if status:
        where.append(f"status = ${len(where) + 1}")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT {_DLQ} FROM dlq{clause} ORDER BY id LIMIT ${len(where) + 1}"


POSTGRES_HOT: dict[str, str] = {
    "events.read": READ_EVENTS,
    "events.read_tenant": READ_TENANT_EVENTS,
    "events.of_workflow": WORKFLOW_EVENTS,
    "events.tenant_head": PG_TENANT_HEAD,
    "events.tenant_horizon": TENANT_HORIZON,
    "workflows.get": GET_WORKFLOW,
    "workflows.get_many": PG_GET_WORKFLOWS,
    "workflows.get_many_for_update": PG_GET_WORKFLOWS_FOR_UPDATE,
    "workflows.claim_due": PG_CLAIM_DUE_WORKFLOWS,
    "workflows.renew_leases": PG_RENEW_LEASES,
    "workflows.release_leases": PG_RELEASE_LEASES,
    "workflows.list": pg_list_workflows(tenant=False, statuses=False),
    "workflows.list_tenant": pg_list_workflows(tenant=True, statuses=False),
    "workflows.list_status": pg_list_workflows(tenant=False, statuses=True),
    "workflows.list_tenant_status": pg_list_workflows(tenant=True, statuses=True),
    "workflows.status_counts": status_counts(tenant=False),
    "workflows.status_counts_tenant": status_counts(tenant=True),
    "mutations.results": PG_MUTATION_RESULTS,
    "clients.get": GET_CLIENT,
    "monitor.backlog": BACKLOG,
    "monitor.outbox": OUTBOX_STATS,
    "outbox.claim": PG_CLAIM_OUTBOX,
    "dlq.list_status": list_dlq(tenant=False, status=True),
    "dlq.list_tenant_status": list_dlq(tenant=True, status=True),
    "prune.ended_after": ENDED_AFTER,
    "prune.events_of": PG_DELETE_EVENTS_OF,
    "prune.workflows": PG_DELETE_ENDED_WORKFLOWS,
    "prune.results": PG_DELETE_RESULTS,
    "prune.outbox": PG_DELETE_OUTBOX,
    "prune.dead_letters": PG_DELETE_DEAD_LETTERS,
}
"""Every hot PostgreSQL statement that reads ``workflows``, ``events`` or a table that
grows with them, by name (the plan test covers exactly these)."""

# ------------------------------------------------------------ SQLite's own
SQLITE_TENANT_HEAD = (
    "SELECT max((SELECT COALESCE(MAX(seq), 0) FROM events WHERE tenant = ?1), "
    "(SELECT COALESCE(MAX(seq), 0) FROM tenant_horizons WHERE tenant = ?1))"
)
SQLITE_GET_WORKFLOWS = (
    f"SELECT {_qualified(_WF, 'w')} FROM json_each(?1) AS k CROSS JOIN workflows AS w "
    "ON w.id = k.value ->> 0 AND w.tenant = k.value ->> 1"
)
# Parameters as in PG_CLAIM_DUE_WORKFLOWS / PG_CLAIM_DUE_VERSIONED (lists as JSON).
_SQLITE_CLAIM = (
    "UPDATE workflows SET lease_owner = ?1, lease_until = ?2, fence = fence + 1 "
    "WHERE rowid IN (SELECT rowid FROM workflows WHERE due_at <= ?3 AND "
    "(lease_owner IS NULL OR lease_until IS NULL OR lease_until < ?3) {}"
    f"ORDER BY due_at LIMIT ?4) RETURNING {_WF}"
)
SQLITE_CLAIM_DUE_WORKFLOWS = _SQLITE_CLAIM.format("")
SQLITE_CLAIM_DUE_VERSIONED = _SQLITE_CLAIM.format(
    "AND (name, workflow_version) IN (SELECT a.value, b.value FROM json_each(?5) AS a "
    "JOIN json_each(?6) AS b ON b.key = a.key) "
)
SQLITE_MUTATION_RESULTS = (
    "SELECT mutation_id, status, error FROM mutation_results WHERE client_id = ?1 "
    "AND tenant = ?2 AND mutation_id IN (SELECT value FROM json_each(?3))"
)
# A push's outcomes (executemany), then the client's last applied id (SET_LAST_MUTATION).
SQLITE_RECORD_MUTATIONS = (
    "INSERT INTO mutation_results (client_id, tenant, mutation_id, status, error, at) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (client_id, tenant, mutation_id) "
    "DO UPDATE SET status = excluded.status, error = excluded.error, at = excluded.at"
)
SQLITE_CLAIM_OUTBOX = (
    "UPDATE outbox SET next_retry_at = ?3 WHERE id IN (SELECT id FROM outbox "
    "WHERE status = 'pending' AND next_retry_at <= ?1 ORDER BY next_retry_at, id "
    f"LIMIT ?2) RETURNING {rows.OUTBOX_COLUMNS}"
)
# The newest event is never pruned: SQLite positions continue from MAX(seq).
SQLITE_DELETE_EVENTS_OF = (
    "DELETE FROM events WHERE (workflow_id, tenant) IN (SELECT value ->> 0, value ->> 1 "
    "FROM json_each(?)) AND seq < (SELECT MAX(seq) FROM events) RETURNING tenant, seq"
)
SQLITE_DELETE_ENDED_WORKFLOWS = (
    f"DELETE FROM workflows WHERE rowid IN (SELECT rowid FROM workflows WHERE {_ENDED} "
    "AND updated_at < ? ORDER BY updated_at, id LIMIT ?) RETURNING id, tenant"
)
SQLITE_DELETE_RESULTS = (
    "DELETE FROM mutation_results WHERE (client_id, mutation_id) IN (SELECT client_id, "
    "mutation_id FROM mutation_results WHERE at < ? ORDER BY at LIMIT ?)"
)
SQLITE_DELETE_OUTBOX = (
    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE status = 'published' "
    "AND published_at < ? ORDER BY published_at LIMIT ?)"
)
SQLITE_DELETE_DEAD_LETTERS = (
    "DELETE FROM dlq WHERE id IN (SELECT id FROM dlq WHERE status <> 'open' "
    "AND resolved_at < ? ORDER BY resolved_at LIMIT ?)"
)
SQLITE_RAISE_HORIZON = (
    "INSERT INTO tenant_horizons (tenant, seq) VALUES (?, ?) "
    "ON CONFLICT (tenant) DO UPDATE SET seq = max(seq, excluded.seq)"
)


def sqlite_list_workflows(*, tenant: bool, statuses: int) -> str:
    """The listing statement for a filter combination with ``statuses`` status values.

    Parameters: per status branch (tenant if filtered, the status, the limit), then the
    outer limit; without statuses: tenant (if filtered), limit. Each status branch reads
    its index range newest first and stops after ``limit`` rows.
    """
    if not statuses:
        clause = " WHERE tenant = ?" if tenant else ""
        return f"SELECT {_WF} FROM workflows{clause} {_ORDER} LIMIT ?"
    where = "tenant = ? AND status = ?" if tenant else "status = ?"
    branch = f"SELECT * FROM (SELECT {_WF} FROM workflows WHERE {where} {_ORDER} LIMIT ?)"
    return f"SELECT * FROM ({' UNION ALL '.join([branch] * statuses)}) {_ORDER} LIMIT ?"


def _sqlite_hot() -> dict[str, str]:
    shared = {name: sqlite_text(sql) for name, sql in POSTGRES_HOT.items()}
    return {
        **{name: shared[name] for name in _SQLITE_SHARED},
        "events.tenant_head": SQLITE_TENANT_HEAD,
        "workflows.get_many": SQLITE_GET_WORKFLOWS,
        "workflows.claim_due": SQLITE_CLAIM_DUE_WORKFLOWS,
        "workflows.list": sqlite_list_workflows(tenant=False, statuses=0),
        "workflows.list_tenant": sqlite_list_workflows(tenant=True, statuses=0),
        "workflows.list_status": sqlite_list_workflows(tenant=False, statuses=1),
        "workflows.list_tenant_status": sqlite_list_workflows(tenant=True, statuses=3),
        "mutations.results": SQLITE_MUTATION_RESULTS,
        "prune.events_of": SQLITE_DELETE_EVENTS_OF,
        "prune.workflows": SQLITE_DELETE_ENDED_WORKFLOWS,
        "prune.results": SQLITE_DELETE_RESULTS,
        "prune.outbox": SQLITE_DELETE_OUTBOX,
        "prune.dead_letters": SQLITE_DELETE_DEAD_LETTERS,
    }


_SQLITE_SHARED = (
    "events.read",
    "events.read_tenant",
    "events.of_workflow",
    "events.tenant_horizon",
    "workflows.get",
    "workflows.status_counts",
    "workflows.status_counts_tenant",
    "monitor.backlog",
    "dlq.list_status",
    "dlq.list_tenant_status",
    "prune.ended_after",
)
SQLITE_HOT: dict[str, str] = _sqlite_hot()
"""Every hot SQLite statement that reads ``workflows``, ``events`` or a table that grows
with them, by name: the shared ones in SQLite's spelling, and SQLite's own."""

POSTGRES_OWN: dict[str, str] = {
    "workflows.claim_due": PG_CLAIM_DUE_WORKFLOWS,
    "workflows.claim_due_versioned": PG_CLAIM_DUE_VERSIONED,
    "workflows.get_many": PG_GET_WORKFLOWS,
    "workflows.get_many_for_update": PG_GET_WORKFLOWS_FOR_UPDATE,
    "mutations.results": PG_MUTATION_RESULTS,
    "mutations.record": PG_RECORD_MUTATIONS,
    "outbox.claim": PG_CLAIM_OUTBOX,
    "events.tenant_head": PG_TENANT_HEAD,
    "prune.events_of": PG_DELETE_EVENTS_OF,
    "prune.workflows": PG_DELETE_ENDED_WORKFLOWS,
    "prune.results": PG_DELETE_RESULTS,
    "prune.outbox": PG_DELETE_OUTBOX,
    "prune.dead_letters": PG_DELETE_DEAD_LETTERS,
    "prune.raise_horizons": PG_RAISE_HORIZONS,
}
"""PostgreSQL's own statements, by name (``Dialect.own``)."""
SQLITE_OWN: dict[str, str] = {
    "workflows.claim_due": SQLITE_CLAIM_DUE_WORKFLOWS,
    "workflows.claim_due_versioned": SQLITE_CLAIM_DUE_VERSIONED,
    "workflows.get_many": SQLITE_GET_WORKFLOWS,
    "workflows.get_many_for_update": SQLITE_GET_WORKFLOWS,
    "mutations.results": SQLITE_MUTATION_RESULTS,
    "mutations.record": SQLITE_RECORD_MUTATIONS,
    "outbox.claim": SQLITE_CLAIM_OUTBOX,
    "events.tenant_head": SQLITE_TENANT_HEAD,
    "prune.events_of": SQLITE_DELETE_EVENTS_OF,
    "prune.workflows": SQLITE_DELETE_ENDED_WORKFLOWS,
    "prune.results": SQLITE_DELETE_RESULTS,
    "prune.outbox": SQLITE_DELETE_OUTBOX,
    "prune.dead_letters": SQLITE_DELETE_DEAD_LETTERS,
    "prune.raise_horizons": SQLITE_RAISE_HORIZON,
}
"""SQLite's own statements, by name (``Dialect.own``)."""
