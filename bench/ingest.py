"""B2 — server ingest: mutations applied per second through ``/v1/sync``.

One Tether instance (a child process, sagas off: a sync-only instance, so that only
ingest is measured) on SQLite and on PostgreSQL. ``clients`` raw protocol clients each
push batches of 100 ``submit_workflow`` mutations, one push in flight per client, and the
rate is applied mutations over wall time. Raw limit: the same number of event-shaped rows
inserted in batches of 100 (sqlite3 on the same disk; asyncpg ``executemany`` on the same
server), plus asyncpg single-row transactions on 8 connections for orientation.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from bench import raw
from bench.core import Context, Row, Stat, figure, ratio, verdict
from bench.procs import child
from bench.wire import WireClient

__all__ = ["ingest_rate"]

BATCH = 100
TARGET = "≥ 0.25× raw and ≥ 10 k/s"


async def ingest_rate(url: str, total: int, clients: int) -> float:
    """Push ``total`` submit mutations through ``clients`` sessions; returns mutations/s.

    Raises:
        RuntimeError: a mutation was not applied.
    """
    sessions = await asyncio.gather(
        *(WireClient.open(url, client_id=f"ingest-{uuid.uuid4().hex[:12]}") for _ in range(clients))
    )
    per_client = total // clients
    batches = [
        [s.mutations(BATCH) for _ in range(per_client // BATCH)] for s in sessions
    ]  # encoded ahead: the clock measures the server

    async def pusher(session: WireClient, work: list[list]) -> int:  # type: ignore[type-arg]
        applied = 0
        for mutations in work:
            result = await session.push(mutations)
            applied += sum(1 for r in result.results if r.status == "applied")
        return applied

    try:
        start = time.perf_counter()
        counts = await asyncio.gather(*(pusher(s, w) for s, w in zip(sessions, batches, strict=True)))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    expected = sum(len(w) * BATCH for w in batches)
    if sum(counts) != expected:
        raise RuntimeError(f"only {sum(counts)} of {expected} mutations applied")
    return expected / elapsed


async def _backend(ctx: Context, backend: str) -> Row:
    if backend == "sqlite":
        url = f"sqlite:///{ctx.path('b2.db')}"
        raw_stat: Stat = await ctx.raw("sqlite_batch", raw.sqlite_batch)
        raw_label = "sqlite3 batches of 100"
    else:
        url = await ctx.pg_url("b2")
        raw_stat = await ctx.raw("pg_executemany", raw.pg_executemany)
        raw_label = "asyncpg executemany of 100"
    total = ctx.size(40_000, 2_000)
    clients = 4
    rates = []
    ctx.say(f"B2 {backend}: starting a server")
    async with child("tether", ["--database", url], logdir=ctx.workdir) as server:
        await ingest_rate(server.ws_url, 4 * BATCH * clients, clients)  # warm-up
        for i in range(ctx.repeats):
            ctx.say(f"B2 {backend}: repeat {i + 1}/{ctx.repeats}")
            rates.append(await ingest_rate(server.ws_url, total, clients))
    tether = Stat.of(rates, "mut/s")
    r = ratio(tether, raw_stat)
    row = Row(
        "B2",
        f"ingest via /v1/sync, {backend}, batches of {BATCH}, {clients} clients",
        tether=tether,
        raw=raw_stat,
        raw_label=raw_label,
        ratio=r,
        target=TARGET,
        passed=verdict(ctx, r is not None and r >= 0.25 and tether.median >= 10_000),
        details={"mutations_per_repeat": total, "clients": clients},
    )
    if backend == "postgres":
        single8: Stat = await ctx.raw("pg_single_8conn", raw.pg_single_8conn)
        row.details["raw_single_row_8_connections_txn_s"] = single8.to_json()
    return row


@figure("B2")
async def b2(ctx: Context) -> list[Row]:
    """B2 on SQLite and on PostgreSQL."""
    rows = []
    for backend in ("sqlite", "postgres"):
        try:
            rows.append(await _backend(ctx, backend))
        except Exception as exc:
            rows.append(Row.error("B2", f"{backend}: {type(exc).__name__}: {exc}"[:400]))
    return rows
