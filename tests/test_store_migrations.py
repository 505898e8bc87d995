"""Migration 2 (issue 11): a version-1 database with data upgrades in place, both backends.

Version 1 keyed workflows and clients by their id alone. The test builds a version-1
schema by hand (the statements of migration 1), writes rows the way version 1 did, opens
the store (which applies migration 2) and checks that every row survived under its
``(tenant, id)`` key, that legacy clients are bound to the first subject that uses them,
that mutation results found their tenant, that another tenant can now use the same ids,
and that the hot lookups still use indexes.
"""

from __future__ import annotations

import sqlite3

import asyncpg
import pytest

from sync_server.store import Transaction, WorkflowKey, WorkflowRecord, open_store
from sync_server.store.migrations import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from sync_server.store.postgres import parse_postgres_url
from sync_server.store.sqlite import sqlite_path

pytestmark = pytest.mark.timeout(60)

V1_ROWS = [
    "INSERT INTO workflows (id, tenant, name, status, input, state, created_at, updated_at, "
    "version) VALUES ('w1', 'acme', 'noop', 'completed', '{}', '{}', 1, 1, 2)",
    "INSERT INTO events (seq, tenant, workflow_id, wf_seq, type, data, at) VALUES "
    "(1, 'acme', 'w1', 1, 'workflow.submitted', '{}', 1), "
    "(2, 'acme', 'w1', 2, 'workflow.completed', '{}', 2)",
    "INSERT INTO clients (client_id, tenant, last_mutation_id, updated_at) "
    "VALUES ('c1', 'acme', 1, 1)",
    "INSERT INTO mutation_results (client_id, mutation_id, status, error, at) "
    "VALUES ('c1', 1, 'applied', NULL, 1)",
]


def _v1_statements(pg: bool) -> tuple[str, ...]:
    migrations = POSTGRES_MIGRATIONS if pg else SQLITE_MIGRATIONS
    [(_version, statements)] = [m for m in migrations if m[0] == 1]
    assert all(isinstance(s, str) for s in statements)
    return tuple(str(s) for s in statements)


async def build_v1(url: str) -> None:
    versions = "CREATE TABLE schema_migrations (version integer PRIMARY KEY, applied_at float8)"
    mark = "INSERT INTO schema_migrations (version, applied_at) VALUES (1, 0)"
    if url.startswith("postgres"):
        dsn, options, _ = parse_postgres_url(url)
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute(f'CREATE SCHEMA "{options["schema"]}"')
                await conn.execute(f'SET LOCAL search_path TO "{options["schema"]}"')
                head = "UPDATE event_head SET seq = 2"
                for sql in (*_v1_statements(True), versions, mark, *V1_ROWS, head):
                    await conn.execute(sql)
        finally:
            await conn.close()
        return
    conn = sqlite3.connect(sqlite_path(url), isolation_level=None)
    try:
        for sql in (*_v1_statements(False), versions.replace("float8", "REAL"), mark, *V1_ROWS):
            conn.execute(sql)
    finally:
        conn.close()


async def test_version_1_data_upgrades_to_tenant_keys(database_url):
    await build_v1(database_url)
    store = open_store(database_url)
    async with store:
        record = await store.get_workflow("acme", "w1")
        assert record is not None and (record.status, record.version) == ("completed", 2)
        assert [e.wf_seq for e in await store.read_workflow_events("acme", "w1")] == [1, 2]
        assert await store.head() == 2
        # A legacy client row has no subject yet: its first user binds it.
        assert await store.get_client("acme", "c1") == (None, 1)

        async def first_use(tx: Transaction) -> tuple[int, dict[int, tuple[str, str | None]]]:
            last = await tx.lock_client("acme", "alice", "c1")
            return last, await tx.mutation_results("acme", "c1", [1])

        assert await store.run(first_use) == (1, {1: ("applied", None)})
        assert await store.get_client("acme", "c1") == ("alice", 1)

        # Another tenant may now use the same workflow id and client id.
        async def other_tenant(tx: Transaction) -> int:
            theirs = WorkflowRecord("w1", "globex", "noop", "running")
            assert await tx.insert_workflow(theirs)
            tx.append(theirs, "workflow.submitted", {}, 5.0)
            await tx.update_workflow(theirs)
            return await tx.lock_client("globex", "bob", "c1")

        assert await store.run(other_tenant) == 0
        assert [e.wf_seq for e in await store.read_workflow_events("globex", "w1")] == [1]
        assert [e.wf_seq for e in await store.read_workflow_events("acme", "w1")] == [1, 2]
        found = await store.run(
            lambda tx: tx.get_workflows([WorkflowKey("acme", "w1"), WorkflowKey("globex", "w1")])
        )
        assert {k: r.status for k, r in found.items()} == {
            ("acme", "w1"): "completed",
            ("globex", "w1"): "running",
        }
    # Reopening applies nothing more.
    async with open_store(database_url) as again:
        assert await again.get_client("acme", "c1") == ("alice", 1)


async def test_lookups_by_key_use_the_primary_key_on_sqlite(sqlite_url):
    async with open_store(sqlite_url):
        pass
    conn = sqlite3.connect(sqlite_path(sqlite_url))
    try:
        plans = {
            "get": "SELECT * FROM workflows WHERE id = ? AND tenant = ?",
            "by id": "SELECT tenant FROM workflows WHERE id = ? ORDER BY tenant LIMIT 10",
            "batch": "SELECT w.id FROM json_each(?) AS k CROSS JOIN workflows AS w "
            "ON w.id = k.value ->> 0 AND w.tenant = k.value ->> 1",
            "events": "SELECT * FROM events WHERE workflow_id = ? AND tenant = ? ORDER BY wf_seq",
            "client": "SELECT * FROM clients WHERE client_id = ? AND tenant = ?",
            "results": "SELECT * FROM mutation_results WHERE client_id = ? AND tenant = ? "
            "AND mutation_id IN (SELECT value FROM json_each(?))",
        }
        for name, sql in plans.items():
            args = ("x",) * sql.count("?")
            detail = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))
            assert "SCAN workflows" not in detail and "SCAN events" not in detail, (name, detail)
            assert "SCAN clients" not in detail and "SCAN mutation_results" not in detail, (
                name,
                detail,
            )
    finally:
        conn.close()


async def test_hot_lookups_keep_index_plans_under_generic_plans_on_postgres(pg_url):
    """LESSONS (generic plans): on a filled table with ``force_generic_plan``, the
    by-key statements stay index scans."""
    store = open_store(pg_url)
    async with store:

        async def fill(tx: Transaction) -> None:
            records = [WorkflowRecord(f"w{i}", f"t{i % 7}", "noop", "running") for i in range(3000)]
            for record in records:
                tx.append(record, "workflow.submitted", {}, 1.0)
            await tx.insert_workflows(records)
            for c in range(30):
                await tx.lock_client("t", "s", f"c{c}")
                results = [(m, "applied", None) for m in range(1, 101)]
                await tx.record_mutations("t", f"c{c}", results, 100, 1.0)

        await store.run(fill)
    dsn, options, _ = parse_postgres_url(pg_url)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
    try:
        await conn.execute("ANALYZE")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        statements = {
            "get": ("SELECT * FROM workflows WHERE id = $1 AND tenant = $2", "'w1', 't1'"),
            "batch": (
                "SELECT w.id FROM unnest($1::text[], $2::text[]) AS k(id, tenant) "
                "JOIN workflows AS w ON w.id = k.id AND w.tenant = k.tenant",
                "ARRAY['w1','w2'], ARRAY['t1','t2']",
            ),
            "events": (
                "SELECT seq FROM events WHERE workflow_id = $1 AND tenant = $2 ORDER BY wf_seq",
                "'w1', 't1'",
            ),
            "renew": (
                "UPDATE workflows AS w SET lease_until = $5 "
                "FROM unnest($2::text[], $3::text[], $4::bigint[]) AS l(id, tenant, fence) "
                "WHERE w.id = l.id AND w.tenant = l.tenant AND w.fence = l.fence "
                "AND w.lease_owner = $1 RETURNING w.id",
                "'o', ARRAY['w1'], ARRAY['t1'], ARRAY[0]::bigint[], 1.0",
            ),
            "results": (
                "SELECT m.mutation_id FROM unnest($3::bigint[]) AS u(id) "
                "JOIN mutation_results AS m ON m.client_id = $1 AND m.tenant = $2 "
                "AND m.mutation_id = u.id",
                "'c', 't', ARRAY[1,2]::bigint[]",
            ),
        }
        for name, (sql, args) in statements.items():
            await conn.execute(f"PREPARE p_{name} AS {sql}")
            plan = "\n".join(
                row[0] for row in await conn.fetch(f"EXPLAIN EXECUTE p_{name}({args})")
            )
            assert "Seq Scan on workflows" not in plan, (name, plan)
            assert "Seq Scan on events" not in plan, (name, plan)
            assert "Seq Scan on mutation_results" not in plan, (name, plan)
    finally:
        await conn.close()


async def test_sqlite_rebuild_keeps_columns_and_indexes_other_migrations_added(sqlite_url):
    """Another engineer's later migration may have been applied before this one on an
    existing file: the rebuild keeps its columns and indexes, whatever they are."""
    await build_v1(sqlite_url)
    conn = sqlite3.connect(sqlite_path(sqlite_url), isolation_level=None)
    try:
        conn.execute("ALTER TABLE workflows ADD COLUMN extra TEXT NOT NULL DEFAULT 'x'")
        conn.execute("CREATE INDEX workflows_extra ON workflows (extra)")
        conn.execute("ALTER TABLE events ADD COLUMN size INTEGER")
    finally:
        conn.close()
    async with open_store(sqlite_url) as store:
        assert (await store.get_workflow("acme", "w1")) is not None
    conn = sqlite3.connect(sqlite_path(sqlite_url))
    try:
        assert conn.execute("SELECT extra FROM workflows").fetchall() == [("x",)]
        assert conn.execute("SELECT count(size) FROM events").fetchone() == (0,)
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert {"workflows_extra", "workflows_due", "events_tenant_seq"} <= names
        # seq is still the rowid (INTEGER PRIMARY KEY), not a separate column.
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()[0]
        assert "seq INTEGER PRIMARY KEY" in sql
    finally:
        conn.close()
