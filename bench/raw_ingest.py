"""B2's raw limits, like for like: what Tether writes per submitted mutation, directly.

A ``submit_workflow`` that Tether applies writes three rows — the workflow, its
``workflow.submitted`` event (with the snapshot) and the mutation's recorded outcome —
and their index entries. The raw limit inserts the very same rows (built by Tether's own
intake code) into Tether's own schema (made by its migrations, so every index is there)
in transactions of 100 mutations, without any of Tether's logic:

* PostgreSQL: the best of three ways to send them — ``executemany``, ``INSERT … SELECT
  FROM unnest(arrays)`` and ``COPY`` (``copy_records_to_table``), each method named;
* SQLite: ``executemany`` per table on the same disk, WAL + ``synchronous=FULL``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from typing import Any

from bench.core import Context, Stat

__all__ = ["PG_METHODS", "pg_mutation_rows", "sqlite_mutation_rows"]

PG_METHODS = ("executemany", "unnest", "copy")
BATCH = 100

_WF_COLUMNS = (
    "id",
    "tenant",
    "name",
    "status",
    "input",
    "state",
    "progress",
    "result",
    "error",
    "version",
    "created_at",
    "updated_at",
    "created_by",
    "due_at",
    "lease_owner",
    "lease_until",
    "fence",
    "workflow_version",
)
_EV_COLUMNS = ("seq", "tenant", "workflow_id", "wf_seq", "type", "data", "at")
_MR_COLUMNS = ("client_id", "tenant", "mutation_id", "status", "error", "at")
_PG_TYPES = {
    "workflows": (
        "text[]",
        "text[]",
        "text[]",
        "text[]",
        "text[]",
        "text[]",
        "float8[]",
        "text[]",
        "text[]",
        "bigint[]",
        "float8[]",
        "float8[]",
        "text[]",
        "float8[]",
        "text[]",
        "float8[]",
        "bigint[]",
        "text[]",
    ),
    "events": ("bigint[]", "text[]", "text[]", "bigint[]", "text[]", "text[]", "float8[]"),
    "mutation_results": ("text[]", "text[]", "bigint[]", "text[]", "text[]", "float8[]"),
}
_COLUMNS = {"workflows": _WF_COLUMNS, "events": _EV_COLUMNS, "mutation_results": _MR_COLUMNS}


def _rows(count: int) -> dict[str, list[tuple[Any, ...]]]:
    """The rows Tether writes for ``count`` submits of the ``noop`` workflow."""
    from bench.workflows import NOOP
    from sync_server.saga import intake
    from sync_server.saga.fastpath import MemoryTransaction
    from sync_server.store import rows
    from sync_server.store.base import WorkflowRecord

    tenant, client = f"t{uuid.uuid4().hex[:8]}", f"raw-{uuid.uuid4().hex[:8]}"
    out: dict[str, list[tuple[Any, ...]]] = {t: [] for t in _COLUMNS}
    now = time.time()
    for i in range(count):
        record = WorkflowRecord(
            id=str(uuid.uuid4()),
            tenant=tenant,
            name="noop",
            status="running",
            input={},
            created_at=now,
            updated_at=now,
            created_by=client,
        )
        tx = MemoryTransaction()
        intake.start_workflow(tx, record, NOOP, now, client)
        out["workflows"].append(rows.workflow_params(record))
        for event in tx.pending_events:
            out["events"].append(
                (
                    i + 1,
                    event.tenant,
                    event.workflow_id,
                    event.wf_seq,
                    event.type,
                    rows.dumps(event.data),
                    event.at,
                )
            )
        out["mutation_results"].append((client, tenant, i + 1, "applied", None, now))
    return out


def _insert(table: str) -> tuple[str, str]:
    """(INSERT … VALUES for executemany, INSERT … SELECT FROM unnest) of ``table``."""
    columns = _COLUMNS[table]
    values = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    arrays = ", ".join(f"${i}::{t}" for i, t in enumerate(_PG_TYPES[table], start=1))
    names = ", ".join(columns)
    return (
        f"INSERT INTO {table} ({names}) VALUES ({values})",
        f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays})",
    )


async def _pg_once(dsn: str, schema: str, method: str, count: int) -> float:
    import asyncpg

    data = _rows(count)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        start = time.perf_counter()
        for i in range(0, count, BATCH):
            async with conn.transaction():
                for table in ("workflows", "events", "mutation_results"):
                    chunk = data[table][i : i + BATCH]
                    many, unnest = _insert(table)
                    if method == "executemany":
                        await conn.executemany(many, chunk)
                    elif method == "unnest":
                        await conn.execute(unnest, *(list(c) for c in zip(*chunk, strict=True)))
                    else:
                        await conn.copy_records_to_table(
                            table, records=chunk, columns=list(_COLUMNS[table])
                        )
        return count / (time.perf_counter() - start)
    finally:
        await conn.close()


async def pg_mutation_rows(ctx: Context) -> dict[str, Stat]:
    """Mutations/s for each method (``PG_METHODS``), in Tether's own schema."""
    from sync_server.store import open_store

    count = ctx.size(20_000, 2_000)
    results: dict[str, list[float]] = {m: [] for m in PG_METHODS}
    dsn = await ctx.pg.ensure()
    for _ in range(ctx.repeats):
        for method in PG_METHODS:
            schema = f"raw_b2_{uuid.uuid4().hex[:8]}"
            store = open_store(f"{dsn}?schema={schema}")
            await store.open()  # Tether's migrations: the same tables and indexes
            await store.close()
            results[method].append(await _pg_once(dsn, schema, method, count))
    return {m: Stat.of(v, "mut/s") for m, v in results.items()}


def _sqlite_once(path: str, count: int) -> float:
    data = _rows(count)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        inserts = {
            table: f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            for table, cols in _COLUMNS.items()
        }
        start = time.perf_counter()
        for i in range(0, count, BATCH):
            conn.execute("BEGIN IMMEDIATE")
            for table in ("workflows", "events", "mutation_results"):
                conn.executemany(inserts[table], data[table][i : i + BATCH])
            conn.execute("COMMIT")
        return count / (time.perf_counter() - start)
    finally:
        conn.close()


async def sqlite_mutation_rows(ctx: Context) -> Stat:
    """Mutations/s: the same rows in Tether's SQLite schema, transactions of 100."""
    from sync_server.store import open_store

    count = ctx.size(20_000, 2_000)
    rates = []
    for _ in range(ctx.repeats):
        path = ctx.path("raw-b2.db")
        store = open_store(f"sqlite:///{path}")
        await store.open()
        await store.close()
        rates.append(await asyncio.to_thread(_sqlite_once, str(path), count))
    return Stat.of(rates, "mut/s")
