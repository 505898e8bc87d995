"""B8 — idle WebSocket clients held by one instance, and memory per connection.

Each repeat starts a fresh server process (Tether on SQLite with sagas on, or the raw
limit: a plain ``websockets`` server whose handler just waits for the close), warms it
up with a few connections, reads its RSS, opens N clients from this process (Tether
clients say Hello and get Welcome: an idle *synced* client), waits for the server to
settle and reads its RSS again. Memory per connection is the RSS delta over N; "held" is
the number of clients still open after the settle time. The clients live in another
process than the server, so the server's RSS holds only the server's share.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from websockets.asyncio.client import connect
from websockets.protocol import State

from bench.core import Context, Row, Stat, figure, ratio, verdict
from bench.procs import child
from bench.wire import WireClient, connect_many

__all__ = ["hold"]

SETTLE = 1.0
"""Seconds between the last connection and the RSS reading."""


async def hold(ctx: Context, kind: str, count: int) -> dict[str, float]:
    """Hold ``count`` idle clients on a fresh ``kind`` server ("tether" or "idle").

    Returns:
        ``held`` (clients still open after settling) and ``per_conn`` (bytes of server
        RSS per connection).
    """
    args = (
        ["--database", f"sqlite:///{ctx.path('b8.db')}", "--run-sagas"] if kind == "tether" else []
    )
    async with child(kind, args, logdir=ctx.workdir) as server:
        tenant = f"idle-{uuid.uuid4().hex[:8]}"

        async def open_one(i: int) -> Any:
            if kind == "tether":
                return await WireClient.open(server.ws_url, tenant=tenant)
            return await connect(
                f"{server.ws_url}/", compression=None, ping_interval=None, max_size=None
            )

        async def close_all(clients: list[Any]) -> None:
            await asyncio.gather(
                *(c.close() for c in clients if c is not None), return_exceptions=True
            )

        def abort_all(clients: list[Any]) -> None:
            # Held clients are dropped, not closed one by one: the server goes next.
            for c in clients:
                if isinstance(c, WireClient):
                    c.abort()
                elif c is not None and c.transport is not None:
                    c.transport.abort()

        warm = await connect_many(20, open_one)
        await close_all(warm)
        await asyncio.sleep(0.5)
        before = server.rss()
        clients: list[Any] = []
        try:
            clients = await connect_many(count, open_one, concurrency=50, deadline=300)
            await asyncio.sleep(SETTLE)
            after = server.rss()
            if kind == "tether":
                held = sum(1 for c in clients if not c.closed.is_set())
            else:
                held = sum(1 for c in clients if c.state is State.OPEN)
        finally:
            abort_all(clients)
            await asyncio.sleep(0)
    return {"held": float(held), "per_conn": (after - before) / count}


@figure("B8")
async def b8(ctx: Context) -> list[Row]:
    """Idle clients held, and server memory per connection, vs plain websockets."""
    count = ctx.size(5000, 200)
    runs: dict[str, list[dict[str, float]]] = {"tether": [], "idle": []}
    for i in range(ctx.repeats):
        for kind in ("tether", "idle"):
            ctx.say(f"B8 {kind}: {count} clients, repeat {i + 1}/{ctx.repeats}")
            runs[kind].append(await hold(ctx, kind, count))
    held = Stat.of([r["held"] for r in runs["tether"]], "clients")
    raw_held = Stat.of([r["held"] for r in runs["idle"]], "clients")
    mem = Stat.of([r["per_conn"] / 1024 for r in runs["tether"]], "KiB")
    raw_mem = Stat.of([r["per_conn"] / 1024 for r in runs["idle"]], "KiB")
    mem_ratio = ratio(mem, raw_mem)
    return [
        Row(
            "B8",
            f"idle clients held ({count} opened)",
            tether=held,
            raw=raw_held,
            raw_label="plain websockets server",
            ratio=ratio(held, raw_held),
            target="≥ 5,000 held",
            passed=verdict(ctx, held.min >= 5000),
        ),
        Row(
            "B8",
            "server memory per idle connection (RSS delta / N)",
            tether=mem,
            raw=raw_mem,
            raw_label="plain websockets server",
            ratio=mem_ratio,
            target="≤ 2x raw",
            passed=verdict(ctx, mem_ratio is not None and mem_ratio <= 2),
            details={"clients": count},
        ),
    ]
