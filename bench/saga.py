"""B5 — saga throughput, B5l — saga latency; both next to DBOS Transact.

The engine is measured in a worker process, in-process like the peer: the server's own
``MutationApplier`` accepts ``submit_workflow`` mutations (batches of 100, the push
path) and a ``SagaRunner`` runs them; completion is followed on the event log (the path
the hub takes). DBOS runs the same 3-step no-op workflow (``bench.peer_dbos``).

B5 on PostgreSQL runs both engines on a private cluster started for the run, so that the
advance of the transaction-id counter — PostgreSQL gives an xid only to a transaction
that writes — counts exactly the write transactions of each engine (submits included).
B5 on SQLite runs Tether only (DBOS's figure on PostgreSQL is the peer reference).
B5l runs one workflow at a time on the shared PostgreSQL server (private database) and
on SQLite; its raw limit is 5 sequential single-row commits.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from bench import peer_dbos, raw
from bench.core import Context, Row, Stat, figure, percentile, ratio, verdict
from bench.pg import with_database
from bench.procs import run_worker

__all__ = ["tether_latency", "tether_throughput"]


class _Engine:
    """Store + applier + runner of one instance, and a follower of the event log."""

    def __init__(self, url: str) -> None:
        from bench.workflows import NOOP3
        from protocol import Role
        from sync_server.auth import Principal
        from sync_server.domain import MutationApplier
        from sync_server.saga.runner import SagaRunner
        from sync_server.store import open_store

        self.store = open_store(url)
        self.runner = SagaRunner(self.store, [NOOP3], instance_id=f"bench-{uuid.uuid4().hex[:6]}")
        self.applier = MutationApplier(self.store, {"noop3": NOOP3})
        self.principal = Principal(tenant="bench", subject="b5", role=Role.CLIENT)
        self.client_id = f"b5-{uuid.uuid4().hex[:8]}"
        self.next_id = 1
        self.ended: dict[str, float] = {}
        self.cursor = 0
        self._wake = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._all: asyncio.Event = asyncio.Event()
        self.expect = 0

    async def start(self) -> None:
        await self.store.open()
        self.cursor = await self.store.head()
        self.store.listen("events", lambda payload: self._wake.set())
        self._follower = asyncio.create_task(self._follow())
        await self.runner.start()

    async def stop(self) -> None:
        await self.runner.stop()
        if self._follower is not None:
            self._follower.cancel()
        await self.store.close()

    async def _follow(self) -> None:
        from protocol import TERMINAL_WORKFLOW_STATUSES

        terminal = {str(s) for s in TERMINAL_WORKFLOW_STATUSES}
        while True:
            try:
                async with asyncio.timeout(0.05):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            while True:
                rows = await self.store.read_events(self.cursor, 1000)
                if not rows:
                    break
                self.cursor = rows[-1].seq
                now = time.perf_counter()
                for row in rows:
                    status = row.data.get("workflow", {}).get("status")
                    if status in terminal and row.workflow_id not in self.ended:
                        self.ended[row.workflow_id] = now
                        waiter = self._waiters.pop(row.workflow_id, None)
                        if waiter is not None and not waiter.done():
                            waiter.set_result(None)
                if len(self.ended) >= self.expect:
                    self._all.set()

    def mutations(self, count: int) -> list[Any]:
        from protocol import Mutation

        batch = [
            Mutation(
                id=self.next_id + i,
                name="submit_workflow",
                args={"workflow_id": str(uuid.uuid4()), "name": "noop3", "input": {}},
                created_at=time.time(),
            )
            for i in range(count)
        ]
        self.next_id += count
        return batch

    async def run_batch(self, count: int, timeout: float) -> float:
        """Submit ``count`` workflows (pushes of 100) and wait for all to end; seconds."""
        self.ended.clear()
        self._all.clear()
        self.expect = count
        pushes = [self.mutations(min(100, count - i)) for i in range(0, count, 100)]
        start = time.perf_counter()
        for mutations in pushes:
            results = await self.applier.push(self.principal, self.client_id, mutations)
            bad = [r for r in results if r.status != "applied"]
            if bad:
                raise RuntimeError(f"submit refused: {bad[0]}")
        async with asyncio.timeout(timeout):
            await self._all.wait()
        return time.perf_counter() - start

    async def run_one(self, timeout: float) -> float:
        """One workflow, submit → terminal event; seconds."""
        (mutation,) = self.mutations(1)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[mutation.args["workflow_id"]] = waiter
        self.expect = 1 << 60
        start = time.perf_counter()
        await self.applier.push(self.principal, self.client_id, [mutation])
        async with asyncio.timeout(timeout):
            await waiter
        return time.perf_counter() - start


async def tether_throughput(url: str, count: int, xid_dsn: str | None = None) -> dict[str, Any]:
    """Worker: ``count`` concurrent noop3 workflows end to end; wf/s, write txns."""
    from bench.pg import xid_counter

    engine = _Engine(url)
    await engine.start()
    try:
        await engine.run_batch(20, 60)  # warm-up
        xid_before = await xid_counter(xid_dsn) if xid_dsn else None
        stats_before = dict(engine.runner.stats)
        elapsed = await engine.run_batch(count, 240)
        xid_after = await xid_counter(xid_dsn) if xid_dsn else None
        stats = {k: v - stats_before.get(k, 0) for k, v in engine.runner.stats.items()}
    finally:
        await engine.stop()
    writes = None if xid_before is None or xid_after is None else xid_after - xid_before
    return {"rate": count / elapsed, "seconds": elapsed, "write_txns": writes, "runner": stats}


async def tether_latency(url: str, count: int) -> dict[str, Any]:
    """Worker: ``count`` noop3 workflows one at a time; p50/p99 submit → end (ms)."""
    engine = _Engine(url)
    await engine.start()
    try:
        for _ in range(10):
            await engine.run_one(30)
        latencies = [await engine.run_one(30) * 1000 for _ in range(count)]
    finally:
        await engine.stop()
    return {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}


def _runner_missing() -> str | None:
    try:
        from sync_server.saga.runner import SagaRunner  # noqa: F401
    except ImportError as exc:
        return f"the saga runner cannot be imported ({exc})"
    return None


async def _cluster_db(ctx: Context, name: str) -> tuple[str, str]:
    """A fresh database on the private cluster: (its DSN, the cluster's admin DSN)."""
    import asyncpg

    admin = await ctx.cluster()
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin, name), admin


@figure("B5")
async def b5(ctx: Context) -> list[Row]:
    """2,000 concurrent 3-step no-op workflows: Tether (PostgreSQL, SQLite) vs DBOS."""
    target = "≥ 2x DBOS; fewer write txns per workflow than DBOS"
    missing = _runner_missing()
    if missing:
        return [Row.unavailable("B5", missing, target)]
    count = ctx.size(2000, 100)
    # DBOS runs at ~50-120 wf/s here: 1,000 workflows per repeat keep the run within its
    # time budget and still saturate it (its rate is CPU-bound, flat in the batch size).
    peer_count = min(count, 1000)
    rows: list[Row] = []
    peer_missing = peer_dbos.available()
    try:
        base, xid_dsn = await _cluster_db(ctx, f"b5_{uuid.uuid4().hex[:6]}")
    except Exception as exc:  # no private cluster here: the shared server, no txn count
        ctx.notes.append(f"B5: private cluster unavailable ({exc}); write txns not counted")
        base, xid_dsn = await ctx.pg.ensure(), None
    tether_runs: list[dict[str, Any]] = []
    dbos_runs: list[dict[str, Any]] = []
    for i in range(ctx.repeats):
        ctx.say(f"B5 Tether PostgreSQL: {count} workflows, repeat {i + 1}/{ctx.repeats}")
        url = f"{base}?schema=b5_{uuid.uuid4().hex[:8]}"
        tether_runs.append(
            await run_worker(
                "bench.saga:tether_throughput",
                {"url": url, "count": count, "xid_dsn": xid_dsn},
                logdir=ctx.workdir,
            )
        )
        if peer_missing is None:
            ctx.say(f"B5 DBOS PostgreSQL: {peer_count} workflows, repeat {i + 1}/{ctx.repeats}")
            dbos_db = f"dbos_{uuid.uuid4().hex[:8]}"
            if xid_dsn is not None:
                dbos_dsn, _ = await _cluster_db(ctx, dbos_db)
            else:
                dbos_dsn = base  # DBOS makes its own schema in the shared private database
            dbos_runs.append(
                await run_worker(
                    "bench.peer_dbos:dbos_throughput",
                    {"dsn": dbos_dsn, "count": peer_count, "xid_dsn": xid_dsn},
                    logdir=ctx.workdir,
                    timeout=600,
                )
            )
    rate = Stat.of([r["rate"] for r in tether_runs], "wf/s")
    peer = Stat.of([r["rate"] for r in dbos_runs], "wf/s") if dbos_runs else None
    writes = (
        Stat.of([r["write_txns"] / count for r in tether_runs], "txn/wf")
        if xid_dsn is not None
        else None
    )
    peer_writes = (
        Stat.of([r["write_txns"] / peer_count for r in dbos_runs], "txn/wf")
        if xid_dsn is not None and dbos_runs
        else None
    )
    peer_label = "DBOS Transact" if peer else f"DBOS: {peer_missing or 'not run'}"
    r = ratio(rate, peer)
    rows.append(
        Row(
            "B5",
            f"{count:,} concurrent 3-step no-op workflows, PostgreSQL: wf/s",
            tether=rate,
            peer=peer,
            peer_label=peer_label,
            ratio=r,
            target="≥ 2x DBOS",
            passed=verdict(ctx, r is not None and r >= 2) if peer else None,
            details={
                "runner_stats": [t.get("runner") for t in tether_runs],
                "dbos_workflows_per_repeat": peer_count,
            },
        )
    )
    if writes is not None:
        wr = ratio(writes, peer_writes)
        rows.append(
            Row(
                "B5",
                "write transactions per workflow (xid advance / workflows), PostgreSQL",
                tether=writes,
                peer=peer_writes,
                peer_label=peer_label,
                ratio=wr,
                target="< DBOS",
                passed=verdict(ctx, peer_writes is not None and writes.median < peer_writes.median)
                if peer_writes
                else None,
            )
        )
    sqlite_runs = []
    for i in range(ctx.repeats):
        ctx.say(f"B5 Tether SQLite: {count} workflows, repeat {i + 1}/{ctx.repeats}")
        sqlite_runs.append(
            await run_worker(
                "bench.saga:tether_throughput",
                {"url": f"sqlite:///{ctx.path('b5.db')}", "count": count},
                logdir=ctx.workdir,
            )
        )
    srate = Stat.of([x["rate"] for x in sqlite_runs], "wf/s")
    sr = ratio(srate, peer)
    rows.append(
        Row(
            "B5",
            f"{count:,} concurrent 3-step no-op workflows, SQLite: wf/s",
            tether=srate,
            peer=peer,
            peer_label=peer_label + " (on PostgreSQL)" if peer else peer_label,
            ratio=sr,
            target="≥ 2x DBOS",
            passed=verdict(ctx, sr is not None and sr >= 2) if peer else None,
            details={"runner_stats": [t.get("runner") for t in sqlite_runs]},
        )
    )
    return rows


@figure("B5l")
async def b5l(ctx: Context) -> list[Row]:
    """One 3-step no-op workflow at a time: p50/p99, vs DBOS and 5 single-row commits."""
    target50, target99 = "≤ 5 ms", "≤ 10 ms"
    missing = _runner_missing()
    if missing:
        return [Row.unavailable("B5l", missing, f"p50 {target50}, p99 {target99}")]
    count = ctx.size(100, 20)
    peer_missing = peer_dbos.available()
    runs: dict[str, list[dict[str, Any]]] = {"postgres": [], "sqlite": [], "dbos": []}
    for i in range(ctx.repeats):
        ctx.say(f"B5l: {count} sequential workflows, repeat {i + 1}/{ctx.repeats}")
        pg_url = await ctx.pg_url("b5l")
        runs["postgres"].append(
            await run_worker(
                "bench.saga:tether_latency", {"url": pg_url, "count": count}, logdir=ctx.workdir
            )
        )
        runs["sqlite"].append(
            await run_worker(
                "bench.saga:tether_latency",
                {"url": f"sqlite:///{ctx.path('b5l.db')}", "count": count},
                logdir=ctx.workdir,
            )
        )
        if peer_missing is None:
            runs["dbos"].append(
                await run_worker(
                    "bench.peer_dbos:dbos_latency",
                    {"dsn": await ctx.pg.ensure(), "count": count},
                    logdir=ctx.workdir,
                )
            )
    pg_raw: Stat = await ctx.raw("pg_five_commits", raw.pg_five_commits)
    sqlite_raw: Stat = await ctx.raw("sqlite_five_commits", raw.sqlite_five_commits)
    rows = []
    for backend, raw_stat, raw_label in (
        ("postgres", pg_raw, "5 single-row asyncpg commits"),
        ("sqlite", sqlite_raw, "5 single-row sqlite3 commits"),
    ):
        for q, target, limit in (("p50", target50, 5.0), ("p99", target99, 10.0)):
            t = Stat.of([r[q] for r in runs[backend]], "ms")
            peer = Stat.of([r[q] for r in runs["dbos"]], "ms") if runs["dbos"] else None
            rows.append(
                Row(
                    "B5l",
                    f"one 3-step workflow at a time, {backend}: {q}",
                    tether=t,
                    raw=raw_stat if q == "p50" else None,
                    raw_label=raw_label + " (p50)" if q == "p50" else "",
                    peer=peer,
                    peer_label=("DBOS Transact (PostgreSQL)" if peer else f"DBOS: {peer_missing}"),
                    ratio=ratio(t, peer) if peer else ratio(t, raw_stat),
                    target=target,
                    passed=verdict(ctx, t.median <= limit),
                )
            )
    return rows
