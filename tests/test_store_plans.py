"""Every hot statement uses an index on a filled store, on both backends (SPEC promise 8).

The store's hot SQL is registered by name in ``sync_server.store.statements``; this
test bulk-loads 60,000 finished workflows and 300,000 events (COPY / executemany, not
the API — enough rows that a sequential scan beats any index a planner cannot use),
runs ANALYZE, and checks each registered statement's plan:

* PostgreSQL: through the path asyncpg takes (``Connection.prepare``, a named server
  statement), under ``plan_cache_mode = force_generic_plan`` — the plan asyncpg's cache
  may run after five executions (LESSONS "prepared statements and generic plans") —
  with ``EXPLAIN EXECUTE``;
* SQLite: ``EXPLAIN QUERY PLAN`` with the same parameters the code binds.

A plan may not contain a sequential scan of ``workflows``, ``events`` or
``mutation_results``.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from typing import Any

import asyncpg
import pytest
from conftest import PG_DSN

from bench.fill import Shape, fill_postgres, fill_sqlite
from sync_server.store import open_store
from sync_server.store.postgres import parse_postgres_url
from sync_server.store.sqlite import sqlite_path
from sync_server.store.statements import POSTGRES_HOT, SQLITE_HOT

pytestmark = pytest.mark.timeout(300)

SHAPE = Shape(workflows=60_000, events_per_workflow=5, tenants=100, start=1.7e9)
BIG = ("workflows", "events", "mutation_results")
NOW = 1.8e9
T = "t00001"
IDS = [f"{i:032x}" for i in (1, 101, 201)]
RUNNING = "UPDATE workflows SET status = 'running', due_at = created_at WHERE id IN ({})"


def pg_samples() -> dict[str, tuple[Any, ...]]:
    """Parameters for each registered PostgreSQL statement (values as the code binds)."""
    return {
        "events.read": (1000, 500),
        "events.read_tenant": (T, 1000, 500),
        "events.of_workflow": (IDS[0], T),
        "events.tenant_head": (T,),
        "events.tenant_horizon": (T,),
        "workflows.get": (IDS[0], T),
        "workflows.get_many": (IDS, [T] * 3),
        "workflows.get_many_for_update": (IDS, [T] * 3),
        "workflows.claim_due": ("owner", NOW + 10, NOW, 100),
        "workflows.renew_leases": ("owner", IDS, [T] * 3, [1, 1, 1], NOW),
        "workflows.release_leases": ("owner", IDS, [T] * 3, [1, 1, 1]),
        "workflows.list": (50,),
        "workflows.list_tenant": (T, 50),
        "workflows.list_status": (["running"], 50),
        "workflows.list_tenant_status": (T, ["running", "compensating", "parked"], 50),
        "workflows.status_counts": (10_000,),
        "workflows.status_counts_tenant": (T, 10_000),
        "mutations.results": ("client-" + T, T, [1, 2, 3]),
        "clients.get": ("client-" + T, T),
        "monitor.backlog": (NOW,),
        "monitor.outbox": (),
        "outbox.claim": (NOW, 50, NOW + 30),
        "dlq.list_status": ("open", 200),
        "dlq.list_tenant_status": (T, "open", 200),
        "prune.ended_after": (NOW, 0.0, "", 100),
        "prune.events_of": (IDS, [T] * 3),
        "prune.workflows": (NOW, 100),
        "prune.results": (NOW, 500),
        "prune.outbox": (NOW, 500),
        "prune.dead_letters": (NOW, 500),
    }


def sqlite_samples() -> dict[str, tuple[Any, ...]]:
    """Parameters for each registered SQLite statement (values as the code binds)."""
    return {
        "events.read": (1000, 500),
        "events.read_tenant": (T, 1000, 500),
        "events.of_workflow": (IDS[0], T),
        "events.tenant_head": (T,),
        "events.tenant_horizon": (T,),
        "workflows.get": (IDS[0], T),
        "workflows.get_many": (json.dumps([[i, T] for i in IDS]),),
        "workflows.claim_due": ("owner", NOW + 10, NOW, 100),
        "workflows.list": (50,),
        "workflows.list_tenant": (T, 50),
        "workflows.list_status": ("running", 50, 50),
        "workflows.list_tenant_status": (
            *(T, "running", 50),
            *(T, "compensating", 50),
            *(T, "parked", 50),
            50,
        ),
        "workflows.status_counts": (10_000,),
        "workflows.status_counts_tenant": (T, 10_000),
        "mutations.results": ("client-" + T, T, json.dumps([1, 2, 3])),
        "monitor.backlog": (NOW,),
        "dlq.list_status": ("open", 200),
        "dlq.list_tenant_status": (T, "open", 200),
        "prune.ended_after": (NOW, 0.0, "", 100),
        "prune.events_of": (json.dumps([[i, T] for i in IDS]),),
        "prune.workflows": (NOW, 100),
        "prune.results": (NOW, 500),
        "prune.outbox": (NOW, 500),
        "prune.dead_letters": (NOW, 500),
    }


# Statements whose plan must use one particular index: the generic plan could otherwise
# walk another ordered index and filter (across the whole table for a rare value).
PG_EXPECTED = {
    "events.read_tenant": "events_tenant_seq",
    "events.of_workflow": "events_workflow",
    "workflows.get_many_for_update": "workflows_pkey",
    "workflows.claim_due": "workflows_due",
    "workflows.list": "workflows_created",
    "workflows.list_tenant": "workflows_tenant_created",
    "workflows.list_status": "workflows_status_created",
    "workflows.list_tenant_status": "workflows_tenant_status_created",
    "mutations.results": "mutation_results_pkey",
    "prune.ended_after": "workflows_ended",
    "prune.workflows": "workflows_ended",
    "prune.results": "mutation_results_at",
}
SQLITE_EXPECTED = {
    "events.read_tenant": "events_tenant_seq",
    "events.of_workflow": "events_workflow",
    "workflows.get_many": "sqlite_autoindex_workflows_1",
    "workflows.claim_due": "workflows_due",
    "workflows.list": "workflows_created",
    "workflows.list_tenant": "workflows_tenant_created",
    "workflows.list_status": "workflows_status_created",
    "workflows.list_tenant_status": "workflows_tenant_status_created",
    "prune.ended_after": "workflows_ended",
    "prune.workflows": "workflows_ended",
    "prune.results": "mutation_results_at",
}


def test_every_registered_statement_has_sample_parameters():
    assert set(pg_samples()) == set(POSTGRES_HOT)
    assert set(sqlite_samples()) == set(SQLITE_HOT)


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        inner = ",".join('"' + str(v).replace('"', '\\"') + '"' for v in value)
        return "'{" + inner + "}'"
    return "'" + str(value).replace("'", "''") + "'"


def _pg_seq_scans(plan: str) -> list[str]:
    return [t for t in BIG if re.search(rf"Seq Scan on {t}\b", plan)]


async def test_postgres_generic_plans_use_indexes(pg_url):
    store = open_store(pg_url, max_size=2)
    await store.open()
    await store.close()
    dsn, options, _ = parse_postgres_url(pg_url)
    schema = options["schema"]
    started = time.perf_counter()
    await fill_postgres(PG_DSN, schema, SHAPE)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        running = ", ".join(f"'{i:032x}'" for i in range(0, SHAPE.workflows, 97))
        await conn.execute(RUNNING.format(running))
        await conn.execute("ANALYZE workflows")
        assert await conn.fetchval("SELECT count(*) FROM events") == SHAPE.events
        load = time.perf_counter() - started
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        bad: dict[str, str] = {}
        samples = pg_samples()
        for name, sql in POSTGRES_HOT.items():
            # conn.fetch(sql) prepares exactly this way (a named, cached statement).
            stmt = await conn.prepare(sql)
            args = ", ".join(_literal(v) for v in samples[name])
            call = f"EXPLAIN EXECUTE {stmt.get_name()}({args})" if args else ""
            call = call or f"EXPLAIN EXECUTE {stmt.get_name()}"
            plan = "\n".join(r[0] for r in await conn.fetch(call))
            expected = PG_EXPECTED.get(name)
            if _pg_seq_scans(plan) or (expected and f" {expected} " not in plan + " "):
                bad[name] = plan
        assert not bad, "sequential scans or unexpected indexes in generic plans:\n" + "\n\n".join(
            f"{name}:\n{plan}" for name, plan in bad.items()
        )
        # The check can fail: the same statement without its index scans the table.
        await conn.execute("DROP INDEX events_tenant_seq")
        stmt = await conn.prepare(POSTGRES_HOT["events.read_tenant"])
        plan = "\n".join(
            r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE {stmt.get_name()}('{T}', 1000, 500)")
        )
        assert "events" in _pg_seq_scans(plan) or "Index Scan using events_pkey" in plan
    finally:
        await conn.close()
    assert load < 200, f"bulk load took {load:.0f} s"


async def test_sqlite_plans_use_indexes(sqlite_url):
    store = open_store(sqlite_url)
    await store.open()
    await store.close()
    path = sqlite_path(sqlite_url)
    fill_sqlite(path, SHAPE)
    conn = sqlite3.connect(path)
    try:
        running = ", ".join(f"'{i:032x}'" for i in range(0, SHAPE.workflows, 97))
        conn.execute(RUNNING.format(running))
        conn.commit()
        conn.execute("ANALYZE")
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == SHAPE.events
        samples = sqlite_samples()
        bad: dict[str, list[str]] = {}
        for name, sql in SQLITE_HOT.items():
            details = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, samples[name])]
            scans = [d for d in details if re.fullmatch(rf"SCAN ({'|'.join(BIG)})", d)]
            expected = SQLITE_EXPECTED.get(name)
            if scans or (expected and not any(f" {expected} " in d + " " for d in details)):
                bad[name] = details
        assert not bad, f"full table scans: {bad}"
        # The check can fail: without its index, a catch-up page scans the events.
        conn.execute("DROP INDEX events_tenant_seq")
        details = [
            r[3]
            for r in conn.execute(
                # (new text: the sqlite3 statement cache would hand back the old plan)
                "EXPLAIN QUERY PLAN " + SQLITE_HOT["events.read_tenant"] + " ",
                (T, 1000, 500),
            )
        ]
        assert not any("events_tenant_seq" in d for d in details), details
    finally:
        conn.close()
