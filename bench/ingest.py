"""B2 — server ingest: mutations applied per second through ``/v1/sync``.

One Tether instance (a child process) on SQLite and on PostgreSQL, with sagas on (the
headline: the instance also runs every workflow submitted) and, as its own row, sagas off
(a sync-only instance). ``clients`` raw protocol clients each push batches of 100
``submit_workflow`` mutations for a fixed time, one push in flight per client, and the
rate is applied mutations over wall time. Raw limit, like for like
(``bench.raw_ingest``): the same three rows and index entries Tether writes per mutation,
inserted directly into Tether's own schema in transactions of 100 — on PostgreSQL the
best of ``executemany``, ``unnest`` and ``COPY``, named.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from bench import raw, raw_ingest
from bench.core import Context, Row, Stat, figure, ratio, verdict
from bench.procs import child
from bench.wire import WireClient

__all__ = ["ingest_rate"]

BATCH = 100
TARGET = "≥ 0.25x raw and ≥ 10 k/s"


async def ingest_rate(url: str, seconds: float, clients: int) -> tuple[float, int]:
    """Push batches of ``BATCH`` submits through ``clients`` sessions for ``seconds``.

    Returns:
        (applied mutations per second, mutations applied).

    Raises:
        RuntimeError: a mutation was not applied.
    """
    # One tenant per client: each gets its own events back, as a real client does.
    sessions = await asyncio.gather(
        *(
            WireClient.open(
                url, client_id=f"ingest-{uuid.uuid4().hex[:12]}", tenant=f"t{uuid.uuid4().hex[:8]}"
            )
            for _ in range(clients)
        )
    )

    async def pusher(session: WireClient, deadline: float) -> int:
        applied = 0
        mutations = session.mutations(BATCH)
        while time.perf_counter() < deadline:
            result = await session.push(mutations)
            ok = sum(1 for r in result.results if r.status == "applied")
            if ok != len(mutations):
                raise RuntimeError(f"only {ok} of {len(mutations)} mutations applied")
            applied += ok
            mutations = session.mutations(BATCH)  # built while the clock runs: client cost
        return applied

    try:
        start = time.perf_counter()
        counts = await asyncio.gather(*(pusher(s, start + seconds) for s in sessions))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    return sum(counts) / elapsed, sum(counts)


async def _backend(ctx: Context, backend: str, sagas: bool) -> Row:
    if backend == "sqlite":
        url = f"sqlite:///{ctx.path('b2.db')}"
        raw_stat: Stat = await ctx.raw("sqlite_mutation_rows", raw_ingest.sqlite_mutation_rows)
        raw_label = "same 3 rows + indexes per mutation, sqlite3 executemany, txns of 100"
        methods: dict[str, Stat] = {}
    else:
        url = await ctx.pg_url("b2")
        methods = await ctx.raw("pg_mutation_rows", raw_ingest.pg_mutation_rows)
        best = max(methods, key=lambda m: methods[m].median)
        raw_stat = methods[best]
        raw_label = (
            f"same 3 rows + indexes per mutation, txns of 100, best of "
            f"executemany/unnest/COPY: {best}"
        )
    seconds = 4.0 if not ctx.quick else 1.0
    clients = 4
    rates, applied, busy = [], [], []
    mode = "sagas on" if sagas else "sagas off"
    ctx.say(f"B2 {backend} ({mode}): starting a server")
    args = ["--database", url, *(["--run-sagas"] if sagas else [])]
    async with child("tether", args, logdir=ctx.workdir) as server:
        await ingest_rate(server.ws_url, 0.3, clients)  # warm-up
        for i in range(ctx.repeats):
            ctx.say(f"B2 {backend} ({mode}): repeat {i + 1}/{ctx.repeats}")
            cpu, wall = server.cpu_seconds(), time.perf_counter()
            rate, count = await ingest_rate(server.ws_url, seconds, clients)
            busy.append(round(100 * (server.cpu_seconds() - cpu) / (time.perf_counter() - wall)))
            rates.append(rate)
            applied.append(count)
    tether = Stat.of(rates, "mut/s")
    r = ratio(tether, raw_stat)
    row = Row(
        "B2",
        f"ingest via /v1/sync, {backend}, {mode}, batches of {BATCH}, {clients} clients",
        tether=tether,
        raw=raw_stat,
        raw_label=raw_label,
        ratio=r,
        target=TARGET if sagas else "",
        passed=verdict(ctx, r is not None and r >= 0.25 and tether.median >= 10_000)
        if sagas
        else None,
        details={
            "seconds_per_repeat": seconds,
            "applied": applied,
            "clients": clients,
            "server_cpu_percent": busy,
            "raw_methods": {m: st.to_json() for m, st in methods.items()},
        },
    )
    if backend == "postgres":
        single8: Stat = await ctx.raw("pg_single_8conn", raw.pg_single_8conn)
        row.details["raw_single_row_8_connections_txn_s"] = single8.to_json()
    return row


@figure("B2")
async def b2(ctx: Context) -> list[Row]:
    """B2 on SQLite and on PostgreSQL, sagas on (headline) and off."""
    rows = []
    for backend in ("sqlite", "postgres"):
        for sagas in (True, False):
            try:
                rows.append(await _backend(ctx, backend, sagas))
            except Exception as exc:
                rows.append(Row.error("B2", f"{backend}: {type(exc).__name__}: {exc}"[:400]))
    return rows
