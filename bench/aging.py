"""B9 — cost at age: the hot paths on a store full of history vs an empty one.

For each backend, the same measurements run twice in one run: on an empty store, then
on a store bulk-loaded (``bench.fill``) with finished history — 1,000,000 workflows
and 10,000,000 events over 1,000 tenants (``--quick``: 100,000 / 1,000,000). A Tether
server (a child process, sagas on) serves each store; the live work happens in a fresh
tenant so that both runs do exactly the same work:

* push: one ``submit_workflow`` per push, sequential, time per push (p50);
* submit → complete: one no-op workflow at a time, push sent → its ``completed``
  event received (p50);
* claim: the saga claim statement itself (``Store.claim_due_workflows`` with nothing
  due: the index probe every runner loop pays), p50;
* catch-up of one tenant: a fresh client (cursor 0) pages the live tenant's events,
  acknowledging each page, until it reaches the head;
* dashboard overview: ``GET /v1/admin/overview`` with the live tenant's admin token
  (p50); the global admin's overview is reported beside it for information.

Each figure is reported as aged / empty (target ≤ 1.25).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import traceback
import uuid

import httpx
from websockets.asyncio.client import connect

from bench.core import Context, Row, Stat, figure, ratio
from bench.fill import Shape, fill_postgres, fill_sqlite
from bench.procs import child
from bench.wire import WireClient, token
from protocol import (
    PROTOCOL_VERSION,
    Ack,
    Events,
    Hello,
    Welcome,
    decode_server_message,
    encode,
)
from sync_server.retention import KINDS
from sync_server.store import open_store
from sync_server.store.postgres import parse_postgres_url
from sync_server.store.sqlite import sqlite_path

__all__ = ["measure_hot_paths"]

TARGET = "≤ 1.25x empty store"
LIVE = "b9-live"


def _p50(values: list[float]) -> float:
    return float(statistics.median(values))


async def _pushes(url: str, tenant: str, n: int) -> float:
    client = await WireClient.open(url, tenant=tenant, client_id=f"b9-push-{uuid.uuid4().hex[:8]}")
    try:
        times = []
        for _ in range(n):
            batch = client.mutations(1)
            start = time.perf_counter()
            result = await client.push(batch)
            times.append(time.perf_counter() - start)
            if result.results[0].status != "applied":
                raise RuntimeError(f"push not applied: {result.results[0]}")
        return _p50(times) * 1000
    finally:
        await client.close()


class _Completions:
    """A client of the live tenant that sees every event as it is committed.

    Opened while the tenant is still empty, so it is live at once (a raw client that
    never acknowledges would stall after two catch-up pages).
    """

    def __init__(self) -> None:
        self.done: dict[str, asyncio.Future[float]] = {}
        self.client: WireClient | None = None

    async def open(self, url: str, tenant: str) -> None:
        self.client = await WireClient.open(
            url, tenant=tenant, client_id=f"b9-wf-{uuid.uuid4().hex[:8]}", on_events=self.sink
        )

    def sink(self, message: Events, _size: int, arrived: float) -> None:
        for event in message.events:
            snap = event.data.get("workflow") if isinstance(event.data, dict) else None
            if isinstance(snap, dict) and snap.get("status") == "completed":
                waiter = self.done.get(str(snap.get("id")))
                if waiter is not None and not waiter.done():
                    waiter.set_result(arrived)

    async def measure(self, n: int) -> float:
        assert self.client is not None
        times = []
        loop = asyncio.get_running_loop()
        for _ in range(n):
            batch = self.client.mutations(1)
            wid = str(batch[0].args["workflow_id"])
            self.done[wid] = loop.create_future()
            start = time.perf_counter()
            await self.client.push(batch)
            arrived = await asyncio.wait_for(self.done[wid], 30)
            times.append(arrived - start)
        return _p50(times) * 1000

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


async def _claims(database_url: str, n: int) -> float:
    store = open_store(database_url)
    await store.open()
    try:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            # Nothing is due at t=1: the probe of the due index every runner loop pays.
            claimed = await store.claim_due_workflows("b9-probe", 1.0, 0.001, 100)
            times.append(time.perf_counter() - start)
            if claimed:
                raise RuntimeError("the claim probe claimed a workflow")
        return _p50(times) * 1000
    finally:
        await store.close()


async def _catch_up(url: str, tenant: str) -> tuple[float, int]:
    headers = {"Authorization": f"Bearer {token(tenant)}"}
    async with connect(
        f"{url}/v1/sync", additional_headers=headers, max_size=None, compression=None
    ) as ws:
        start = time.perf_counter()
        hello = Hello(client_id=uuid.uuid4().hex, protocol_version=PROTOCOL_VERSION, cursor=0)
        await ws.send(encode(hello))
        head, cursor, events = None, 0, 0
        while head is None or cursor < head:
            frame = await asyncio.wait_for(ws.recv(), 30)
            assert isinstance(frame, bytes)
            message = decode_server_message(frame)
            if isinstance(message, Welcome):
                head = message.head
            elif isinstance(message, Events):
                events += len(message.events)
                cursor = message.cursor
                await ws.send(encode(Ack(cursor=cursor)))
        return (time.perf_counter() - start) * 1000, events


async def _overview(http_url: str, tenant: str, n: int) -> float:
    from bench.procs import SECRET
    from sync_server.auth import issue_token

    tok = issue_token(SECRET, tenant=tenant, subject="b9-admin", role="admin", ttl=600)
    async with httpx.AsyncClient(base_url=http_url, timeout=60) as http:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            response = await http.get(
                "/v1/admin/overview",
                params={"limit": "50"},
                headers={"authorization": f"Bearer {tok}"},
            )
            times.append(time.perf_counter() - start)
            response.raise_for_status()
        return _p50(times) * 1000


async def measure_hot_paths(ctx: Context, database_url: str, tenant: str) -> dict[str, float]:
    """Every B9 figure on one store (milliseconds; ``catch_up_events`` is a count); the
    live work happens in ``tenant``, which must be new to the store."""
    n = ctx.size(300, 60)
    out: dict[str, float] = {}
    # Retention off: B9 measures a store that holds all this history (B10 measures
    # pruning); with the defaults, the server would start deleting the loaded years.
    keep = {f"SYNC_RETENTION_{kind.upper()}": "0" for kind in KINDS}
    async with child(
        "tether", ["--database", database_url, "--run-sagas"], logdir=ctx.workdir, env=keep
    ) as server:
        completions = _Completions()
        await completions.open(server.ws_url, tenant)
        try:
            await _pushes(server.ws_url, tenant, 20)  # warm-up: caches, prepared statements
            out["push"] = await _pushes(server.ws_url, tenant, n)
            out["complete"] = await completions.measure(max(20, n // 4))
        finally:
            await completions.close()
        out["claim"] = await _claims(database_url, n)
        await _catch_up(server.ws_url, tenant)  # warm-up: the first read of a tenant is cold
        runs = [await _catch_up(server.ws_url, tenant) for _ in range(5)]
        out["catch_up"] = _p50([ms for ms, _ in runs])
        out["catch_up_events"] = float(runs[0][1])
        await _overview(server.http_url, tenant, 2)  # warm-up
        out["overview"] = await _overview(server.http_url, tenant, max(10, n // 10))
        out["overview_global"] = await _overview(server.http_url, "*", max(5, n // 30))
    return out


async def _prepare(ctx: Context, backend: str, shape: Shape | None) -> tuple[str, float]:
    url = f"sqlite:///{ctx.path('b9.db')}" if backend == "sqlite" else await ctx.pg_url("b9")
    store = open_store(url)
    await store.open()  # creates the schema (migrations)
    await store.close()
    if shape is None:
        return url, 0.0
    ctx.say(f"B9 {backend}: loading {shape.workflows:,} workflows, {shape.events:,} events")
    if backend == "sqlite":
        seconds = await asyncio.to_thread(fill_sqlite, sqlite_path(url), shape, settle=True)
    else:
        dsn, options, _ = parse_postgres_url(url)
        seconds = await fill_postgres(dsn, options["schema"], shape, settle=True)
    return url, seconds


MEASURES = [
    ("push", "push of one submit_workflow, p50"),
    ("complete", "submit → complete (no-op workflow), p50"),
    ("claim", "saga claim statement (nothing due), p50"),
    ("catch_up", "catch-up of one tenant (fresh client, cursor 0)"),
    ("overview", "dashboard overview (tenant admin), p50"),
    ("overview_global", "dashboard overview (global admin), p50"),
]


async def _backend(ctx: Context, backend: str) -> list[Row]:
    workflows = ctx.size(1_000_000, 100_000)
    shape = Shape(workflows=workflows, events_per_workflow=10, tenants=1000, start=1.6e9)
    empty: list[dict[str, float]] = []
    aged: list[dict[str, float]] = []
    empty_url, _ = await _prepare(ctx, backend, None)
    url, load_seconds = await _prepare(ctx, backend, shape)
    if backend == "postgres":
        await _quiet(url)
    # Interleaved (empty, aged, empty, aged …): both see the same background load of a
    # shared machine, instead of one running while the other's load is written back.
    for i in range(ctx.repeats):
        ctx.say(f"B9 {backend}: empty store, repeat {i + 1}")
        empty.append(await measure_hot_paths(ctx, empty_url, f"{LIVE}-{i}"))
        ctx.say(f"B9 {backend}: aged store, repeat {i + 1}")
        aged.append(await measure_hot_paths(ctx, url, f"{LIVE}-{i}"))
    if backend == "postgres":
        await _drop_schema(url)
        await _drop_schema(empty_url)
    rows = []
    for key, label in MEASURES:
        tether = Stat.of([m[key] for m in aged], "ms")
        base = Stat.of([m[key] for m in empty], "ms")
        r = ratio(tether, base)
        informational = key == "overview_global"
        rows.append(
            Row(
                "B9",
                f"{backend}: {label}, {shape.workflows:,} wf / {shape.events:,} events",
                tether=tether,
                raw=base,
                raw_label="same figure, empty store",
                ratio=r,
                target="" if informational else TARGET,
                passed=None if informational else (r is not None and r <= 1.25),
                details={
                    "load_seconds": round(load_seconds, 1),
                    "catch_up_events": [m["catch_up_events"] for m in aged],
                    "empty": empty,
                    "aged": aged,
                },
            )
        )
    return rows


async def _quiet(url: str, timeout: float = 600.0) -> None:
    """Wait until no autovacuum worker runs in the database (after a bulk load)."""
    import asyncpg

    dsn, _, _ = parse_postgres_url(url)
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                "'autovacuum worker' AND datname = current_database()"
            )
            if not busy:
                return
            await asyncio.sleep(1.0)
    finally:
        await conn.close()


async def _drop_schema(url: str) -> None:
    import asyncpg

    dsn, options, _ = parse_postgres_url(url)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{options["schema"]}" CASCADE')
    finally:
        await conn.close()


@figure("B9")
async def b9(ctx: Context) -> list[Row]:
    """B9 on SQLite and on PostgreSQL."""
    rows: list[Row] = []
    for backend in ("sqlite", "postgres"):
        try:
            rows.extend(await _backend(ctx, backend))
        except Exception as exc:
            rows.append(Row.error("B9", f"{backend}: {type(exc).__name__}: {exc}"[:400]))
            rows[-1].details["traceback"] = traceback.format_exc()[-4000:]
    return rows
