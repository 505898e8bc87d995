"""B10 — bounded disk: retention at steady load, and what pruning costs the writers.

Per backend, three runs of the same steady load — ``CLIENTS`` protocol clients each
pushing one ``submit_workflow`` (no-op saga) every ``1 / RATE`` seconds — on a Tether
child process:

1. **baseline**: a fresh store, retention off (reported in the details);
2. **prune**: the store is bulk-loaded (``bench.fill``) with old finished history —
   about 1.1 M rows (``--quick``: 110 k) of events, workflows and mutation results —
   and the server starts with short retention windows, so its pruner deletes all of it
   while the load runs; push p99 *while that prune runs* (until the loaded rows are
   gone) vs push p99 of the same load on the same server in the ``phase`` seconds
   right after it (only the small steady pruning of live rows left) — target ≤ 2x;
3. **soak**: a fresh store, short windows (events 5 s, the rest 10 s), the load for
   ``soak`` seconds; rows (events, workflows, mutation results) and bytes on disk are
   sampled every second. The series is printed into the report's details and drawn
   as a PNG (``bench/results/b10-<backend>.png``); the verdict: after the first
   two windows, neither rows nor bytes grow by more than 20 %.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from bench.core import Context, Row, Stat, figure, percentile, ratio
from bench.fill import Shape, fill_postgres, fill_sqlite
from bench.plot import save_plot
from bench.procs import child
from bench.wire import WireClient
from sync_server.store import open_store
from sync_server.store.postgres import parse_postgres_url
from sync_server.store.sqlite import sqlite_path

__all__ = ["steady_load"]

CLIENTS = 4
RATE = 20.0  # pushes per second per client
RESULTS = Path(__file__).parent / "results"
WINDOWS = {"EVENTS": "5s", "WORKFLOWS": "10s", "RESULTS": "10s", "OUTBOX": "10s"}
OFF = {f"SYNC_RETENTION_{k}": "0" for k in (*WINDOWS, "DEAD_LETTERS")}
ON = {**OFF, **{f"SYNC_RETENTION_{k}": v for k, v in WINDOWS.items()}}


async def steady_load(url: str, stop: asyncio.Event, latencies: list[tuple[float, float]]) -> int:
    """Push one submit per ``1 / RATE`` s from each of ``CLIENTS`` clients until ``stop``.

    Appends (start time, latency in ms) per push to ``latencies``; returns pushes made.

    Raises:
        RuntimeError: a push was not applied.
    """
    sessions = await asyncio.gather(
        *(
            WireClient.open(url, tenant=f"b10-{i}", client_id=f"b10-{uuid.uuid4().hex[:10]}")
            for i in range(CLIENTS)
        )
    )

    async def pusher(session: WireClient) -> int:
        count = 0
        next_at = time.perf_counter()
        while not stop.is_set():
            start = time.perf_counter()
            result = await session.push(session.mutations(1))
            latencies.append((start, (time.perf_counter() - start) * 1000))
            if result.results[0].status != "applied":
                raise RuntimeError(f"push not applied: {result.results[0]}")
            count += 1
            next_at += 1 / RATE
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.perf_counter()))
        return count

    try:
        return sum(await asyncio.gather(*(pusher(s) for s in sessions)))
    finally:
        await asyncio.gather(*(s.close() for s in sessions))


class Probe:
    """Row counts and bytes on disk of one store, read from outside the server."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> Probe:
        if self.url.startswith("postgres"):
            dsn, options, _ = parse_postgres_url(self.url)
            self._conn = await asyncpg.connect(
                dsn, server_settings={"search_path": options["schema"]}
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def left(self, old_seq: int, old_before: float) -> dict[str, float]:
        """Whether loaded history is left (cheap index probes, not counts: the probe
        runs every second while push latencies are measured)."""
        events = "SELECT EXISTS (SELECT 1 FROM events WHERE seq <= {})"
        workflows = "SELECT EXISTS (SELECT 1 FROM workflows WHERE created_at < {})"
        if self._conn is not None:
            return {
                "old_events": float(await self._conn.fetchval(events.format("$1"), old_seq)),
                "old_workflows": float(
                    await self._conn.fetchval(workflows.format("$1"), old_before)
                ),
            }

        def probe() -> dict[str, float]:
            import sqlite3

            conn = sqlite3.connect(f"file:{sqlite_path(self.url)}?mode=ro", uri=True, timeout=10)
            try:
                e = conn.execute(events.format("?"), (old_seq,)).fetchone()[0]
                w = conn.execute(workflows.format("?"), (old_before,)).fetchone()[0]
            finally:
                conn.close()
            return {"old_events": float(e), "old_workflows": float(w)}

        return await asyncio.to_thread(probe)

    async def sample(self, old_seq: int = 0) -> dict[str, float]:
        """Rows per table, bytes on disk, and events at or below ``old_seq`` left."""
        tables = ("events", "workflows", "mutation_results")
        if self._conn is not None:
            out: dict[str, float] = {}
            for t in tables:
                out[t] = float(await self._conn.fetchval(f"SELECT count(*) FROM {t}"))
            out["bytes"] = float(
                await self._conn.fetchval(
                    "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN "
                    "pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
                )
            )
            out["old_events"] = float(
                await self._conn.fetchval("SELECT count(*) FROM events WHERE seq <= $1", old_seq)
            )
            return out
        return await asyncio.to_thread(self._sqlite_sample, old_seq)

    def _sqlite_sample(self, old_seq: int) -> dict[str, float]:
        import sqlite3

        path = sqlite_path(self.url)
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            out = {
                t: float(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
                for t in ("events", "workflows", "mutation_results")
            }
            out["old_events"] = float(
                conn.execute("SELECT count(*) FROM events WHERE seq <= ?", (old_seq,)).fetchone()[0]
            )
        finally:
            conn.close()
        out["bytes"] = float(
            sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
        )
        return out


async def _store(ctx: Context, backend: str, stem: str) -> str:
    url = f"sqlite:///{ctx.path(stem + '.db')}" if backend == "sqlite" else await ctx.pg_url(stem)
    store = open_store(url)
    await store.open()
    await store.close()
    return url


async def _run_load(
    ctx: Context,
    url: str,
    env: dict[str, str],
    until: Any,
    *,
    old_seq: int = 0,
    old_before: float | None = None,
    seconds: float,
    tail: float = 0.0,
) -> tuple[list[tuple[float, float]], list[dict[str, float]]]:
    """Serve ``url`` with ``env``, run the load, sample every second until ``until(sample,
    elapsed)`` is true, then ``tail`` seconds more; returns the latencies (start time on
    ``time.perf_counter``, ms) and the samples (with ``t`` and, once ``until`` held,
    ``done_at``, both on the same clock)."""
    latencies: list[tuple[float, float]] = []
    samples: list[dict[str, float]] = []
    stop = asyncio.Event()
    args = ["--database", url, "--run-sagas", "--retention-interval", "1"]
    async with child("tether", args, logdir=ctx.workdir, env=env) as server, Probe(url) as probe:
        load = asyncio.create_task(steady_load(server.ws_url, stop, latencies))
        started = time.perf_counter()
        done_at: float | None = None
        try:
            while True:
                await asyncio.sleep(1.0)
                if load.done():
                    await load  # a failed load surfaces here
                if old_before is None:
                    sample = await probe.sample(old_seq)
                else:
                    sample = await probe.left(old_seq, old_before)
                sample["t"] = time.perf_counter() - started
                samples.append(sample)
                if done_at is None and (until(sample, sample["t"]) or sample["t"] > seconds):
                    done_at = time.perf_counter()
                if done_at is not None:
                    sample["done_at"] = done_at
                    if time.perf_counter() - done_at >= tail:
                        break
        finally:
            stop.set()
            await load
    return latencies, samples


def _p99(latencies: list[tuple[float, float]]) -> float:
    return percentile([ms for _, ms in latencies], 99)


async def _backend(ctx: Context, backend: str) -> list[Row]:
    quick = ctx.quick
    phase = 8.0 if quick else 30.0
    ctx.say(f"B10 {backend}: baseline (no pruning)")
    url = await _store(ctx, backend, "b10_base")
    base, _ = await _run_load(ctx, url, OFF, lambda s, t: False, seconds=phase)

    ctx.say(f"B10 {backend}: loading old history to prune")
    shape = Shape(
        workflows=ctx.size(100_000, 10_000), events_per_workflow=9, tenants=100, start=1.6e9
    )
    url = await _store(ctx, backend, "b10_prune")
    if backend == "sqlite":
        await asyncio.to_thread(fill_sqlite, sqlite_path(url), shape, settle=True)
    else:
        dsn, options, _ = parse_postgres_url(url)
        await fill_postgres(dsn, options["schema"], shape, settle=True)
    old_rows = shape.events + 2 * shape.workflows
    ctx.say(f"B10 {backend}: pushing while {old_rows:,} rows are pruned")
    # The load goes on for ``phase`` seconds after the prune: the same store, process
    # and moment, only without the big prune — the fairest "no prune running".
    latencies, prune_samples = await _run_load(
        ctx,
        url,
        ON,
        lambda s, t: not s["old_events"] and not s["old_workflows"],
        old_seq=shape.events - 1,  # (SQLite keeps the log's newest event)
        old_before=1.7e9,
        seconds=900.0,
        tail=phase,
    )
    done_at = prune_samples[-1]["done_at"]
    during = [x for x in latencies if x[0] < done_at]
    after = [x for x in latencies if x[0] >= done_at]
    done = [s for s in prune_samples if "done_at" in s]
    prune_seconds = done[0]["t"]
    pruned = not done[0]["old_events"] and not done[0]["old_workflows"]

    ctx.say(f"B10 {backend}: soak with short retention windows")
    url = await _store(ctx, backend, "b10_soak")
    soak = 30.0 if quick else 120.0
    _, series = await _run_load(ctx, url, ON, lambda s, t: False, seconds=soak)

    plot = save_plot(
        RESULTS / f"b10-{backend}.png",
        f"B10 {backend}: steady load {CLIENTS * RATE:.0f} submits/s, retention 5 s / 10 s",
        {
            "events": [(s["t"], s["events"]) for s in series],
            "workflows": [(s["t"], s["workflows"]) for s in series],
            "mutation results": [(s["t"], s["mutation_results"]) for s in series],
            "MiB on disk": [(s["t"], s["bytes"] / 2**20) for s in series],
        },
    )
    settled = [s for s in series if s["t"] >= 20.0]  # two windows of 10 s
    first, last = settled[: max(1, len(settled) // 4)], settled[-max(1, len(settled) // 4) :]

    def growth(key: str) -> float:
        return max(s[key] for s in last) / max(1.0, max(s[key] for s in first))

    rows_growth = max(growth("events"), growth("workflows"), growth("mutation_results"))
    bytes_growth = growth("bytes")
    compact = [{k: round(v, 1) for k, v in s.items() if k != "old_events"} for s in series]
    p99_after, p99_during = Stat.of([_p99(after)], "ms"), Stat.of([_p99(during)], "ms")
    r = ratio(p99_during, p99_after)
    return [
        Row(
            "B10",
            f"{backend}: push p99 while {old_rows:,} old rows are pruned ({prune_seconds:.0f} s)",
            tether=p99_during,
            raw=p99_after,
            raw_label="same load and store right after, no big prune",
            ratio=r,
            target="≤ 2x",
            passed=pruned and r is not None and r <= 2.0,
            details={
                "pruned_all": pruned,
                "prune_seconds": round(prune_seconds, 1),
                "rows_pruned_per_s": round(old_rows / max(prune_seconds, 1e-9)),
                "p50_during_ms": percentile([ms for _, ms in during], 50),
                "p50_after_ms": percentile([ms for _, ms in after], 50),
                "p99_retention_off_fresh_store_ms": _p99(base),
                "p50_retention_off_fresh_store_ms": percentile([ms for _, ms in base], 50),
                "pushes_during": len(during),
                "pushes_after": len(after),
                "prune_series": [{k: round(v, 1) for k, v in s.items()} for s in prune_samples],
            },
        ),
        Row(
            "B10",
            f"{backend}: rows and bytes over a {soak:.0f} s soak, growth after the first windows",
            tether=Stat.of([rows_growth], "x rows"),
            raw=Stat.of([bytes_growth], "x bytes"),
            raw_label="bytes on disk, same soak",
            target="flat: ≤ 1.2x",
            passed=rows_growth <= 1.2 and bytes_growth <= 1.2,
            details={"series": compact, "plot": str(plot)},
        ),
    ]


@figure("B10")
async def b10(ctx: Context) -> list[Row]:
    """B10 on SQLite and on PostgreSQL."""
    rows: list[Row] = []
    for backend in ("sqlite", "postgres"):
        try:
            rows.extend(await _backend(ctx, backend))
        except Exception as exc:
            rows.append(Row.error("B10", f"{backend}: {type(exc).__name__}: {exc}"[:400]))
            rows[-1].details["traceback"] = traceback.format_exc()[-4000:]
    return rows
