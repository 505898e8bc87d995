"""B1 — durable submit, B1g — group commit, B4 — catch-up: the client SDK's figures.

Each measurement runs in a fresh worker process (``bench.worker``) so that the SDK is
measured alone, on the run's disk:

* B1: sequential ``submit_workflow`` calls of an offline ``SyncClient`` (nothing to push:
  ``connect=False``), rate and p50/p99 latency. Raw limit: sqlite3 single-row commits,
  WAL + synchronous=FULL, same disk (``bench.raw.sqlite_single``).
* B1g: 16 concurrent callers of ``submit_workflow`` on one client; total rate against
  the same raw single-row rate (batches of 100 shown for orientation).
* B4: a server (child process, SQLite) holds a 100,000-event backlog of one tenant; a
  fresh client starts, pulls it and applies it durably. Events/s from ``start()`` to
  ``cursor == head``, and the client process's peak RSS growth (``ru_maxrss`` minus the
  RSS before ``start()``). Raw limit: the same rows inserted by sqlite3 in batches of
  the server's page size (500).
"""

from __future__ import annotations

import asyncio
import resource
import time
import uuid
from pathlib import Path
from typing import Any

from bench import raw
from bench.core import Context, Row, Stat, figure, percentile, ratio, verdict
from bench.procs import SECRET, child, run_worker

__all__ = ["catch_up", "populate_backlog", "submit_many"]

TENANT = "bench-b4"


def _sdk_missing() -> str | None:
    try:
        from client_sdk import SyncClient  # noqa: F401
    except ImportError as exc:
        return f"client_sdk.SyncClient cannot be imported ({exc})"
    return None


async def submit_many(path: str, count: int, callers: int) -> dict[str, Any]:
    """Worker: ``count`` submits by ``callers`` concurrent callers on an offline client."""
    from client_sdk import SyncClient
    from sync_server.auth import issue_token

    token = issue_token(SECRET, tenant="bench", subject="b1")
    client = SyncClient("ws://127.0.0.1:9", token=token, path=path, connect=False)
    await client.start()
    latencies: list[float] = []
    try:
        for _ in range(20):  # warm-up: first statements, caches
            await client.submit_workflow("noop", {"warm": True})

        async def caller(n: int) -> None:
            for i in range(n):
                began = time.perf_counter()
                await client.submit_workflow("noop", {"i": i})
                latencies.append(time.perf_counter() - began)

        per = count // callers
        start = time.perf_counter()
        await asyncio.gather(*(caller(per) for _ in range(callers)))
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    return {
        "rate": per * callers / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


@figure("B1")
async def b1(ctx: Context) -> list[Row]:
    """Sequential durable submits of an offline SDK client vs sqlite3 single commits."""
    missing = _sdk_missing()
    if missing:
        return [Row.unavailable("B1", missing, "≥ 0.5x raw rate; p50 < 1 ms")]
    count = ctx.size(2000, 300)
    runs = []
    for i in range(ctx.repeats):
        ctx.say(f"B1: {count} sequential submits, repeat {i + 1}/{ctx.repeats}")
        runs.append(
            await run_worker(
                "bench.client:submit_many",
                {"path": str(ctx.path("b1.db")), "count": count, "callers": 1},
                logdir=ctx.workdir,
            )
        )
    single: dict[str, Stat] = await ctx.raw("sqlite_single", raw.sqlite_single)
    rate = Stat.of([r["rate"] for r in runs], "/s")
    p50 = Stat.of([r["p50_ms"] for r in runs], "ms")
    p99 = Stat.of([r["p99_ms"] for r in runs], "ms")
    rate_ratio = ratio(rate, single["rate"])
    label = "sqlite3 single-row commit, WAL+FULL"
    return [
        Row(
            "B1",
            "sequential submit_workflow, offline: calls/s",
            tether=rate,
            raw=single["rate"],
            raw_label=label,
            ratio=rate_ratio,
            target="≥ 0.5x raw",
            passed=verdict(ctx, rate_ratio is not None and rate_ratio >= 0.5),
            details={"calls_per_repeat": count},
        ),
        Row(
            "B1",
            "sequential submit_workflow: p50 latency",
            tether=p50,
            raw=single["p50"],
            raw_label=label,
            ratio=ratio(p50, single["p50"]),
            target="< 1 ms",
            passed=verdict(ctx, p50.median < 1.0),
        ),
        Row(
            "B1",
            "sequential submit_workflow: p99 latency",
            tether=p99,
            raw=single["p99"],
            raw_label=label,
            ratio=ratio(p99, single["p99"]),
        ),
    ]


@figure("B1g")
async def b1g(ctx: Context) -> list[Row]:
    """16 concurrent submitters on one client (group commit) vs sqlite3 single commits."""
    missing = _sdk_missing()
    if missing:
        return [Row.unavailable("B1g", missing, "≥ 5x raw single-row rate")]
    count = ctx.size(8000, 800)
    runs = []
    for i in range(ctx.repeats):
        ctx.say(f"B1g: {count} submits by 16 callers, repeat {i + 1}/{ctx.repeats}")
        runs.append(
            await run_worker(
                "bench.client:submit_many",
                {"path": str(ctx.path("b1g.db")), "count": count, "callers": 16},
                logdir=ctx.workdir,
            )
        )
    single: dict[str, Stat] = await ctx.raw("sqlite_single", raw.sqlite_single)
    batch: Stat = await ctx.raw("sqlite_batch", raw.sqlite_batch)
    rate = Stat.of([r["rate"] for r in runs], "/s")
    r = ratio(rate, single["rate"])
    return [
        Row(
            "B1g",
            "16 concurrent submit_workflow callers: calls/s",
            tether=rate,
            raw=single["rate"],
            raw_label="sqlite3 single-row commit, WAL+FULL",
            ratio=r,
            target="≥ 5x raw single-row rate",
            passed=verdict(ctx, r is not None and r >= 5),
            details={
                "calls_per_repeat": count,
                "p50_ms": Stat.of([x["p50_ms"] for x in runs], "ms").to_json(),
                "p99_ms": Stat.of([x["p99_ms"] for x in runs], "ms").to_json(),
                "raw_batch_of_100_rows_s": batch.to_json(),
            },
        )
    ]


async def populate_backlog(url: str, events: int, per_workflow: int = 10) -> int:
    """Worker: write ``events`` events (``per_workflow`` per workflow) for one tenant
    through the server's own store; returns the head."""
    from protocol import events as event_types
    from sync_server.snapshots import append_event
    from sync_server.store import WorkflowRecord, open_store

    store = open_store(url)
    await store.open()
    try:
        workflows = events // per_workflow
        per_tx = max(1, 1000 // per_workflow)
        now = time.time()
        for start in range(0, workflows, per_tx):

            async def unit(tx: Any, start: int = start) -> None:
                for _ in range(start, min(start + per_tx, workflows)):
                    record = WorkflowRecord(
                        id=str(uuid.uuid4()),
                        tenant=TENANT,
                        name="noop",
                        status="running",
                        input={"prompt": "a cat"},
                        state={"steps": {"only": {"status": "running", "attempts": 1}}},
                        created_at=now,
                        updated_at=now,
                    )
                    append_event(tx, record, event_types.WORKFLOW_SUBMITTED, now, input={})
                    for i in range(per_workflow - 1):
                        append_event(
                            tx,
                            record,
                            event_types.WORKFLOW_PROGRESS,
                            now,
                            step="only",
                            fraction=(i + 1) / per_workflow,
                            message=None,
                        )
                    await tx.insert_workflow(record)

            await store.run(unit)
        return await store.head()
    finally:
        await store.close()


async def catch_up(url: str, path: str, head: int, timeout: float) -> dict[str, Any]:
    """Worker: a fresh SDK client pulls the backlog; events/s and peak RSS growth."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    from client_sdk import SyncClient
    from sync_server.auth import issue_token

    token = issue_token(SECRET, tenant=TENANT, subject="b4")
    before = psutil.Process().memory_info().rss
    client = SyncClient(url, token=token, path=path)
    start = time.perf_counter()
    await client.start()
    try:
        deadline = start + timeout
        while client.cursor < head:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"cursor {client.cursor} of {head} after {timeout} s")
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rate": head / elapsed, "rss_growth_mb": (peak - before) / 2**20, "seconds": elapsed}


def _sqlite_batch_500(path: Path, total: int) -> float:
    return raw._sqlite_batch_once(path, total, 500)


@figure("B4")
async def b4(ctx: Context) -> list[Row]:
    """A fresh client catches up a 100,000-event backlog."""
    missing = _sdk_missing()
    if missing:
        return [Row.unavailable("B4", missing, "≥ 20 k events/s; RSS growth ≤ 64 MB")]
    total = ctx.size(100_000, 5_000)
    url = f"sqlite:///{ctx.path('b4-server.db')}"
    ctx.say(f"B4: writing a {total}-event backlog")
    head = await run_worker(
        "bench.client:populate_backlog", {"url": url, "events": total}, logdir=ctx.workdir
    )
    runs = []
    async with child("tether", ["--database", url], logdir=ctx.workdir) as server:
        for i in range(ctx.repeats):
            ctx.say(f"B4: catch-up of {head} events, repeat {i + 1}/{ctx.repeats}")
            runs.append(
                await run_worker(
                    "bench.client:catch_up",
                    {
                        "url": server.ws_url,
                        "path": str(ctx.path("b4-client.db")),
                        "head": head,
                        "timeout": 240.0,
                    },
                    logdir=ctx.workdir,
                )
            )
    raw_rates = [
        await asyncio.to_thread(_sqlite_batch_500, ctx.path("raw-b4.db"), total)
        for _ in range(ctx.repeats)
    ]
    raw_stat = Stat.of(raw_rates, "rows/s")
    rate = Stat.of([r["rate"] for r in runs], "events/s")
    rss = Stat.of([r["rss_growth_mb"] for r in runs], "MB")
    return [
        Row(
            "B4",
            f"catch-up of {total:,} events, fresh client: events/s",
            tether=rate,
            raw=raw_stat,
            raw_label="sqlite3 batches of 500 rows",
            ratio=ratio(rate, raw_stat),
            target="≥ 20 k events/s",
            passed=verdict(ctx, rate.median >= 20_000),
            details={"events": total},
        ),
        Row(
            "B4",
            "catch-up: client peak RSS growth",
            tether=rss,
            target="≤ 64 MB",
            passed=verdict(ctx, rss.max <= 64),
        ),
    ]
