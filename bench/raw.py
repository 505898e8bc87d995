"""Raw limits of the storage building blocks, measured in the same run as Tether.

Each function measures one building block used directly — plain ``sqlite3`` and plain
``asyncpg`` — on the same disk / the same PostgreSQL server, with rows shaped like
Tether's event rows (a JSON payload of ~150 bytes). They are called through
``Context.raw(name, fn)`` so that each is measured once per run.

The network raw limits live with the figures that share their harness: the plain
``websockets`` broadcast in ``bench.fanout``, the idle ``websockets`` server in
``bench.connections``, the direct job-service call in ``bench.resilience``; the
``{INSERT; NOTIFY}`` → listener latency is here.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from bench.core import Context, Stat, percentile

__all__ = [
    "pg_executemany",
    "pg_five_commits",
    "pg_notify_latency",
    "pg_single_8conn",
    "sqlite_batch",
    "sqlite_five_commits",
    "sqlite_single",
]

_SQLITE_TABLE = """CREATE TABLE IF NOT EXISTS raw_events (
    seq INTEGER PRIMARY KEY, tenant TEXT NOT NULL, workflow_id TEXT NOT NULL,
    wf_seq INTEGER NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL, at REAL NOT NULL)"""
_SQLITE_INSERT = (
    "INSERT INTO raw_events (tenant, workflow_id, wf_seq, type, data, at) VALUES (?, ?, ?, ?, ?, ?)"
)
_PG_TABLE = """CREATE TABLE IF NOT EXISTS raw_events (
    seq BIGSERIAL PRIMARY KEY, tenant TEXT NOT NULL, workflow_id TEXT NOT NULL,
    wf_seq INTEGER NOT NULL, type TEXT NOT NULL, data JSONB NOT NULL,
    at DOUBLE PRECISION NOT NULL)"""
_PG_INSERT = (
    "INSERT INTO raw_events (tenant, workflow_id, wf_seq, type, data, at) "
    "VALUES ($1, $2, $3, $4, $5::jsonb, $6)"
)


def event_row(i: int) -> tuple[str, str, int, str, str, float]:
    """One row shaped like a Tether event of a submitted workflow."""
    workflow_id = str(uuid.uuid4())
    data = json.dumps(
        {
            "client_id": "bench-client",
            "input": {"n": i},
            "workflow": {"id": workflow_id, "name": "noop", "status": "running", "version": 1},
        }
    )
    return ("bench", workflow_id, 1, "workflow.submitted", data, time.time())


def _sqlite(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(_SQLITE_TABLE)
    return conn


def _sqlite_single_once(path: Path, count: int) -> dict[str, float]:
    conn = _sqlite(path)
    rows = [event_row(i) for i in range(count)]
    latencies: list[float] = []
    try:
        start = time.perf_counter()
        for row in rows:
            began = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_SQLITE_INSERT, row)
            conn.execute("COMMIT")
            latencies.append(time.perf_counter() - began)
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    return {
        "rate": count / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "five_ms": percentile([sum(latencies[i : i + 5]) for i in range(0, count - 4, 5)], 50)
        * 1000,
    }


async def sqlite_single(ctx: Context) -> dict[str, Stat]:
    """sqlite3 single-row commits, WAL + synchronous=FULL, on the run's disk.

    Returns:
        ``rate`` (commits/s), ``p50``/``p99`` (ms per commit), ``five`` (ms for 5 commits).
    """
    count = ctx.size(3000, 300)
    runs = [
        await asyncio.to_thread(_sqlite_single_once, ctx.path("raw-single.db"), count)
        for _ in range(ctx.repeats)
    ]
    return {
        "rate": Stat.of([r["rate"] for r in runs], "/s"),
        "p50": Stat.of([r["p50_ms"] for r in runs], "ms"),
        "p99": Stat.of([r["p99_ms"] for r in runs], "ms"),
        "five": Stat.of([r["five_ms"] for r in runs], "ms"),
    }


async def sqlite_five_commits(ctx: Context) -> Stat:
    """5 sequential sqlite3 single-row commits (ms), the raw limit of B5l on SQLite."""
    single: dict[str, Stat] = await ctx.raw("sqlite_single", sqlite_single)
    return single["five"]


def _sqlite_batch_once(path: Path, total: int, batch: int) -> float:
    conn = _sqlite(path)
    rows = [event_row(i) for i in range(total)]
    try:
        start = time.perf_counter()
        for i in range(0, total, batch):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_SQLITE_INSERT, rows[i : i + batch])
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    return total / elapsed


async def sqlite_batch(ctx: Context, batch: int = 100) -> Stat:
    """sqlite3 inserts in transactions of ``batch`` rows, WAL + FULL (rows/s)."""
    total = ctx.size(50_000, 5_000)
    rates = [
        await asyncio.to_thread(_sqlite_batch_once, ctx.path("raw-batch.db"), total, batch)
        for _ in range(ctx.repeats)
    ]
    return Stat.of(rates, "rows/s")


async def _pg_setup(ctx: Context, schema: str) -> tuple[str, str]:
    import asyncpg

    dsn = await ctx.pg.ensure()
    name = f"{schema}_{uuid.uuid4().hex[:6]}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
        await conn.execute(f"SET search_path TO {name}")
        await conn.execute(_PG_TABLE)
    finally:
        await conn.close()
    return dsn, name


async def _pg_drop(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


async def pg_executemany(ctx: Context, batch: int = 100) -> Stat:
    """asyncpg ``executemany`` of ``batch`` rows per transaction (rows/s)."""
    import asyncpg

    dsn, schema = await _pg_setup(ctx, "raw_many")
    total = ctx.size(30_000, 3_000)
    rates = []
    try:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            for _ in range(ctx.repeats):
                rows = [event_row(i) for i in range(total)]
                start = time.perf_counter()
                for i in range(0, total, batch):
                    async with conn.transaction():
                        await conn.executemany(_PG_INSERT, rows[i : i + batch])
                rates.append(total / (time.perf_counter() - start))
        finally:
            await conn.close()
    finally:
        await _pg_drop(dsn, schema)
    return Stat.of(rates, "rows/s")


async def pg_single_8conn(ctx: Context, connections: int = 8) -> Stat:
    """Single-row transactions on ``connections`` asyncpg connections at once (txns/s)."""
    import asyncpg

    dsn, schema = await _pg_setup(ctx, "raw_single8")
    per_conn = ctx.size(1500, 150)
    rates = []
    try:
        conns = [
            await asyncpg.connect(dsn, server_settings={"search_path": schema})
            for _ in range(connections)
        ]
        try:

            async def worker(conn: Any) -> None:
                for i in range(per_conn):
                    await conn.execute(_PG_INSERT, *event_row(i))

            for _ in range(ctx.repeats):
                start = time.perf_counter()
                await asyncio.gather(*(worker(c) for c in conns))
                rates.append(per_conn * connections / (time.perf_counter() - start))
        finally:
            for conn in conns:
                await conn.close()
    finally:
        await _pg_drop(dsn, schema)
    return Stat.of(rates, "txn/s")


async def pg_five_commits(ctx: Context) -> Stat:
    """5 sequential single-row asyncpg commits (ms): the raw limit of B5l."""
    import asyncpg

    dsn, schema = await _pg_setup(ctx, "raw_five")
    samples = ctx.size(200, 30)
    values = []
    try:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            for _ in range(ctx.repeats):
                times = []
                for i in range(samples):
                    start = time.perf_counter()
                    for _ in range(5):
                        await conn.execute(_PG_INSERT, *event_row(i))
                    times.append((time.perf_counter() - start) * 1000)
                values.append(percentile(times, 50))
        finally:
            await conn.close()
    finally:
        await _pg_drop(dsn, schema)
    return Stat.of(values, "ms")


async def pg_notify_latency(ctx: Context) -> dict[str, Stat]:
    """A plain asyncpg transaction {INSERT; NOTIFY} → a LISTEN callback on another
    connection: latency from before BEGIN to the callback (ms), p50 and p99."""
    import asyncpg

    dsn, schema = await _pg_setup(ctx, "raw_notify")
    samples = ctx.size(300, 40)
    p50s, p99s = [], []
    try:
        writer = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        listener = await asyncpg.connect(dsn)
        arrived: asyncio.Queue[float] = asyncio.Queue()

        def on_notify(*_args: Any) -> None:
            arrived.put_nowait(time.perf_counter())

        await listener.add_listener("raw_bench", on_notify)
        try:
            for _ in range(ctx.repeats):
                latencies = []
                for i in range(samples):
                    start = time.perf_counter()
                    async with writer.transaction():
                        await writer.execute(_PG_INSERT, *event_row(i))
                        await writer.execute("SELECT pg_notify('raw_bench', $1)", str(i))
                    async with asyncio.timeout(5):
                        got = await arrived.get()
                    latencies.append((got - start) * 1000)
                    await asyncio.sleep(0.002)
                p50s.append(percentile(latencies, 50))
                p99s.append(percentile(latencies, 99))
        finally:
            await listener.close()
            await writer.close()
    finally:
        await _pg_drop(dsn, schema)
    return {"p50": Stat.of(p50s, "ms"), "p99": Stat.of(p99s, "ms")}
