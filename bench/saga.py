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

The worker side (``_Engine``, ``tether_throughput``, ``tether_latency``) is in
``bench/saga_engine.py``; it is re-exported here, where the workers are addressed.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from bench import peer_celery, peer_dbos, raw
from bench.core import Context, Row, Stat, figure, ratio, verdict
from bench.pg import with_database
from bench.procs import run_worker
from bench.saga_engine import tether_latency, tether_throughput

__all__ = ["tether_latency", "tether_throughput"]

SHAPES = {
    "clients16": "16 clients, one submit per push",
    "batched": "submits in pushes of 100",
    "backpressure": "pushes of 100, runner max_concurrency",
}
"""B5's shapes: the headline (the common case) first."""


def _peers_off() -> str | None:
    """``TETHER_BENCH_PEERS=0`` skips the peers (a quick before/after of Tether alone)."""
    if os.environ.get("TETHER_BENCH_PEERS", "1") == "0":
        return "peers not run (TETHER_BENCH_PEERS=0)"
    return None


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


def _best(runs: dict[str, list[dict[str, Any]]], key: str, *, low: bool) -> str | None:
    """The mode whose median ``key`` is best (lowest if ``low``)."""
    medians = {mode: Stat.of([r[key] for r in rs]).median for mode, rs in runs.items() if rs}
    if not medians:
        return None
    return (min if low else max)(medians, key=lambda mode: medians[mode])


def _modes_text(runs: dict[str, list[dict[str, Any]]], key: str, unit: str) -> str:
    return ", ".join(
        f"{mode} {Stat.of([r[key] for r in rs]).median:,.1f} {unit}" for mode, rs in runs.items()
    )


@figure("B5")
async def b5(ctx: Context) -> list[Row]:
    """3-step no-op workflows in three shapes: Tether (PostgreSQL, SQLite) vs DBOS at its
    best start style; write transactions and round trips per workflow."""
    missing = _runner_missing()
    if missing:
        return [Row.unavailable("B5", missing, "≥ 2x the best peer")]
    headline = ctx.size(2000, 100)
    plan = {  # shape -> (workflows, runner max_concurrency)
        "clients16": (headline, 2000),
        "batched": (headline, 2000),
        "backpressure": (ctx.size(20000, 500), ctx.size(200, 50)),
    }
    # DBOS runs at ~50-150 wf/s here, flat in the batch size: 500 per mode and repeat
    # saturate it and keep five start styles within the time budget.
    peer_count = ctx.size(500, 30)
    peer_missing = _peers_off() or peer_dbos.available()
    celery_missing = _peers_off() or peer_celery.available()
    if celery_missing:
        ctx.notes.append(f"B5: second peer not run: {celery_missing}")
    try:
        base, xid_dsn = await _cluster_db(ctx, f"b5_{uuid.uuid4().hex[:6]}")
    except Exception as exc:  # no private cluster here: the shared server, no txn count
        ctx.notes.append(f"B5: private cluster unavailable ({exc}); write txns not counted")
        base, xid_dsn = await ctx.pg.ensure(), None
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    dbos: dict[str, list[dict[str, Any]]] = {m: [] for m in peer_dbos.THROUGHPUT_MODES}
    celery: dict[str, list[dict[str, Any]]] = {m: [] for m in peer_celery.MODES}
    for i in range(ctx.repeats):
        for shape, (count, limit) in plan.items():
            for backend in ("postgres", "sqlite"):
                ctx.say(f"B5 Tether {backend} {shape}: {count}, repeat {i + 1}/{ctx.repeats}")
                url = (
                    f"{base}?schema=b5_{uuid.uuid4().hex[:8]}"
                    if backend == "postgres"
                    else f"sqlite:///{ctx.path('b5.db')}"
                )
                params = {"url": url, "count": count, "shape": shape, "max_concurrency": limit}
                if backend == "postgres":
                    params["xid_dsn"] = xid_dsn
                runs.setdefault((backend, shape), []).append(
                    await run_worker(
                        "bench.saga:tether_throughput", params, logdir=ctx.workdir, timeout=900
                    )
                )
        if peer_missing is None:
            for mode in peer_dbos.THROUGHPUT_MODES:
                ctx.say(f"B5 DBOS {mode}: {peer_count}, repeat {i + 1}/{ctx.repeats}")
                dsn = (
                    (await _cluster_db(ctx, f"dbos_{uuid.uuid4().hex[:8]}"))[0]
                    if xid_dsn is not None
                    else base
                )
                dbos[mode].append(
                    await run_worker(
                        "bench.peer_dbos:dbos_throughput",
                        {"dsn": dsn, "count": peer_count, "xid_dsn": xid_dsn, "mode": mode},
                        logdir=ctx.workdir,
                        timeout=600,
                    )
                )
        if celery_missing is None:
            for mode in peer_celery.MODES:
                ctx.say(f"B5 Celery {mode}: {peer_count}, repeat {i + 1}/{ctx.repeats}")
                celery[mode].append(
                    await run_worker(
                        "bench.peer_celery:celery_throughput",
                        {"count": peer_count, "mode": mode},
                        logdir=ctx.workdir,
                        timeout=600,
                    )
                )
    peers = {f"DBOS {m}": rs for m, rs in dbos.items() if rs}
    peers.update({f"Celery+Redis {m}": rs for m, rs in celery.items() if rs})
    best = _best(peers, "rate", low=False)
    best_dbos = _best(dbos, "rate", low=False)
    peer = Stat.of([r["rate"] for r in peers[best]], "wf/s") if best else None
    peer_writes = (
        Stat.of([r["write_txns"] / peer_count for r in dbos[best_dbos]], "txn/wf")
        if best_dbos and xid_dsn is not None
        else None
    )
    peer_label = f"best peer: {best}" if best else f"DBOS: {peer_missing or 'not run'}"
    writes_label = f"DBOS {best_dbos} (its fastest style)" if best_dbos else peer_label
    every = "; ".join(
        f"{name}: {_modes_text(runs_of, 'rate', 'wf/s')}"
        for name, runs_of in (("DBOS", dbos), ("Celery+Redis", celery))
        if any(runs_of.values())
    )
    rows: list[Row] = []
    for shape, (count, limit) in plan.items():
        what = f"{count:,} workflows, {SHAPES[shape]}"
        if shape == "backpressure":
            what += f" {limit}"
        pg = runs[("postgres", shape)]
        lite = runs[("sqlite", shape)]
        rate = Stat.of([r["rate"] for r in pg], "wf/s")
        r = ratio(rate, peer)
        headline = shape == "clients16"
        rows.append(
            Row(
                "B5",
                f"{what}, PostgreSQL: wf/s",
                tether=rate,
                peer=peer,
                peer_label=f"{peer_label} (every style: {every})" if headline else peer_label,
                ratio=r,
                target="≥ 2x the best peer" if headline else "",
                passed=verdict(ctx, r is not None and r >= 2) if peer and headline else None,
                details={
                    "runner_stats": [t.get("runner") for t in pg],
                    "peer_modes": {"dbos": dbos, "celery": celery},
                },
            )
        )
        if xid_dsn is not None:
            writes = Stat.of([t["write_txns"] / count for t in pg], "txn/wf")
            rows.append(
                Row(
                    "B5",
                    f"{what}, PostgreSQL: write transactions per workflow (xid advance)",
                    tether=writes,
                    peer=peer_writes,
                    peer_label=writes_label,
                    ratio=ratio(writes, peer_writes),
                    target="< DBOS's",
                    passed=verdict(ctx, writes.median < peer_writes.median)
                    if peer_writes
                    else None,
                )
            )
        trips = Stat.of([t["round_trips"] for t in pg], "trips/wf")
        rows.append(
            Row(
                "B5",
                f"{what}, PostgreSQL: database round trips per workflow",
                tether=trips,
                target="≤ 12",
                passed=verdict(ctx, trips.median <= 12),
            )
        )
        srate = Stat.of([t["rate"] for t in lite], "wf/s")
        sr = ratio(srate, peer)
        rows.append(
            Row(
                "B5",
                f"{what}, SQLite: wf/s",
                tether=srate,
                peer=peer,
                peer_label=peer_label + " (on PostgreSQL)" if peer else peer_label,
                ratio=sr,
                target="≥ 2x the best peer" if headline else "",
                passed=verdict(ctx, sr is not None and sr >= 2) if peer and headline else None,
                details={
                    "runner_stats": [t.get("runner") for t in lite],
                    "round_trips": [t["round_trips"] for t in lite],
                },
            )
        )
        rows.append(
            Row(
                "B5",
                f"{what}, SQLite: statements per workflow",
                tether=Stat.of([t["round_trips"] for t in lite], "stmts/wf"),
            )
        )
    return rows


@figure("B5l")
async def b5l(ctx: Context) -> list[Row]:
    """One 3-step no-op workflow at a time: p50/p99 and round trips, vs DBOS at its best
    start style and 5 single-row commits."""
    target50, target99 = "≤ 5 ms", "≤ 10 ms"
    missing = _runner_missing()
    if missing:
        return [Row.unavailable("B5l", missing, f"p50 {target50}, p99 {target99}")]
    count = ctx.size(100, 20)
    peer_missing = _peers_off() or peer_dbos.available()
    runs: dict[str, list[dict[str, Any]]] = {"postgres": [], "sqlite": []}
    dbos: dict[str, list[dict[str, Any]]] = {m: [] for m in peer_dbos.LATENCY_MODES}
    celery: dict[str, list[dict[str, Any]]] = {m: [] for m in peer_celery.MODES}
    celery_missing = _peers_off() or peer_celery.available()
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
            for mode in peer_dbos.LATENCY_MODES:
                ctx.say(f"B5l DBOS {mode}, repeat {i + 1}/{ctx.repeats}")
                dbos[mode].append(
                    await run_worker(
                        "bench.peer_dbos:dbos_latency",
                        {"dsn": await ctx.pg.ensure(), "count": count, "mode": mode},
                        logdir=ctx.workdir,
                    )
                )
        if celery_missing is None:
            for mode in peer_celery.MODES:
                ctx.say(f"B5l Celery {mode}, repeat {i + 1}/{ctx.repeats}")
                celery[mode].append(
                    await run_worker(
                        "bench.peer_celery:celery_latency",
                        {"count": count, "mode": mode},
                        logdir=ctx.workdir,
                    )
                )
    pg_raw: Stat = await ctx.raw("pg_five_commits", raw.pg_five_commits)
    sqlite_raw: Stat = await ctx.raw("sqlite_five_commits", raw.sqlite_five_commits)
    peers = {f"DBOS {m}": rs for m, rs in dbos.items() if rs}
    peers.update({f"Celery+Redis {m}": rs for m, rs in celery.items() if rs})
    best = _best(peers, "p50", low=True)
    every = "; ".join(
        f"{name}: {_modes_text(runs_of, 'p50', 'ms')}"
        for name, runs_of in (("DBOS", dbos), ("Celery+Redis", celery))
        if any(runs_of.values())
    )
    rows = []
    peer_label = f"best peer: {best}" if best else f"DBOS: {peer_missing}"
    for backend, raw_stat, raw_label in (
        ("postgres", pg_raw, "5 single-row asyncpg commits"),
        ("sqlite", sqlite_raw, "5 single-row sqlite3 commits"),
    ):
        for q, target, limit in (("p50", target50, 5.0), ("p99", target99, 10.0)):
            t = Stat.of([r[q] for r in runs[backend]], "ms")
            peer = Stat.of([r[q] for r in peers[best]], "ms") if best else None
            rows.append(
                Row(
                    "B5l",
                    f"one 3-step workflow at a time, {backend}: {q}",
                    tether=t,
                    raw=raw_stat if q == "p50" else None,
                    raw_label=raw_label + " (p50)" if q == "p50" else "",
                    peer=peer,
                    peer_label=f"{peer_label} (every style, p50: {every})"
                    if backend == "postgres" and q == "p50"
                    else peer_label,
                    ratio=ratio(t, peer) if peer else ratio(t, raw_stat),
                    target=target,
                    passed=verdict(ctx, t.median <= limit),
                )
            )
        trips = Stat.of([r["round_trips"] for r in runs[backend]], "trips/wf")
        rows.append(
            Row(
                "B5l",
                f"one 3-step workflow at a time, {backend}: database round trips per workflow"
                + (" (statements)" if backend == "sqlite" else ""),
                tether=trips,
                target="≤ 12" if backend == "postgres" else "",
                passed=verdict(ctx, trips.median <= 12) if backend == "postgres" else None,
            )
        )
    return rows
