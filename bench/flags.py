"""B11 — flags: a change reaching every connected client, and a local evaluation.

Propagation: one Tether instance (child process, SQLite, sagas off) with N connected
flag-aware clients of one tenant (raw protocol clients in this process, ``Hello`` with
``flags=True``). An admin ``PUT /v1/flags/bench.probe?tenant=T`` sets the flag's value
to a key; every client records when a ``Flags`` message carrying that key arrives. The
latency of a change is the *last* receiver's (as in B3); the next change is made only
after every client has the previous one. The span is HTTP request → audited commit →
hub → flag cache → every socket.

Raw limit: B3's raw broadcast — a plain ``websockets`` relay broadcasting a frame of the
same size to the same number of clients (``bench.fanout._raw_fanout``).

Evaluation: ``FlagBook.evaluate`` of a flag with a percentage rule (the rollout case:
rule walk and a cached bucket) and of a plain flag, and ``SyncClient.flag``'s path
(``ClientFlags.value``), in ns/op including the loop and a lambda call; raw limit:
``dict.get`` of the same name, measured the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
from websockets.asyncio.client import connect

from bench.core import Context, Row, Stat, figure, percentile, ratio, verdict
from bench.fanout import LatencyProbe, _raw_fanout
from bench.procs import child
from bench.wire import connect_many, token
from client_sdk.flags import ClientFlags
from protocol import (
    PROTOCOL_VERSION,
    Event,
    Events,
    Flags,
    Hello,
    decode_server_message,
    encode,
)
from protocol.flags import FlagBook, FlagDef, FlagRule

__all__ = ["evaluation_ns"]

PROBE = "bench.probe"


class _FlagReader:
    """A flag-aware raw client: records when each probe key arrives."""

    def __init__(self, ws: Any, on_key: Callable[[int, float, int], None]) -> None:
        self.ws = ws
        self.task = asyncio.create_task(self._read(on_key))

    @classmethod
    async def open(cls, url: str, tenant: str, on_key: Callable[[int, float, int], None]) -> Any:
        ws = await connect(
            f"{url}/v1/sync",
            additional_headers={"Authorization": f"Bearer {token(tenant)}"},
            max_size=None,
            compression=None,
            ping_interval=None,
            open_timeout=60,
        )
        hello = Hello(client_id=uuid.uuid4().hex, protocol_version=PROTOCOL_VERSION, flags=True)
        await ws.send(encode(hello))
        return cls(ws, on_key)

    async def _read(self, on_key: Callable[[int, float, int], None]) -> None:
        with contextlib.suppress(Exception):
            async for frame in self.ws:
                arrived = time.perf_counter()
                assert isinstance(frame, bytes)
                message = decode_server_message(frame)
                if isinstance(message, Flags):
                    for flag in message.flags:
                        if flag.name == PROBE and isinstance(flag.default, int):
                            on_key(flag.default, arrived, len(frame))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


async def _propagation(
    ctx: Context, url: str, receivers: int, changes: int
) -> tuple[list[dict[str, float]], int]:
    tenant = f"flags-{uuid.uuid4().hex[:8]}"
    probe = LatencyProbe(receivers)
    sent: dict[int, float] = {}
    sizes: list[int] = []

    def on_key(key: int, arrived: float, size: int) -> None:
        if key in probe.delays and key in sent:
            delays = probe.delays[key]
            delays.append(arrived - sent[key])
            if len(delays) == 1:
                sizes.append(size)
            if len(delays) >= receivers:
                probe.done[key].set()

    ctx.say(f"B11: connecting {receivers} flag-aware clients")
    readers = await connect_many(receivers, lambda i: _FlagReader.open(url, tenant, on_key))
    admin = {"Authorization": f"Bearer {token('*', 'bench-ops', 'admin')}"}
    summaries = []
    key = 0
    http_url = url.replace("ws://", "http://")
    try:
        async with httpx.AsyncClient(base_url=http_url, headers=admin, timeout=30) as http:
            for repeat in range(ctx.repeats + 1):  # round 0 warms up
                ctx.say(f"B11 {receivers} clients: round {repeat}/{ctx.repeats}")
                keys = []
                for _ in range(changes if repeat else max(3, changes // 5)):
                    key += 1
                    keys.append(key)
                    done = probe.expect(key)
                    sent[key] = time.perf_counter()
                    r = await http.put(
                        f"/v1/flags/{PROBE}", params={"tenant": tenant}, json={"value": key}
                    )
                    r.raise_for_status()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(10):
                            await done.wait()
                    await asyncio.sleep(0.02)
                if repeat:
                    summaries.append(probe.summary(keys))
    finally:
        await asyncio.gather(*(r.close() for r in readers))
    return summaries, int(percentile([float(s) for s in sizes] or [0.0], 50))


def _template(size: int) -> Events:
    """An ``Events`` frame about ``size`` bytes long, for the raw broadcast."""
    event = Event(seq=1, workflow_id="w", type="workflow.submitted", data={}, at=time.time())
    base = len(encode(Events(events=[event], cursor=1)))
    pad = "x" * max(0, size - base - 40)
    event = Event(seq=1, workflow_id="w", type="workflow.submitted", data={"pad": pad}, at=0.0)
    return Events(events=[event], cursor=1)


def evaluation_ns(n: int = 200_000) -> dict[str, float]:
    """ns/op of local evaluations and of the dict lookup they are compared with."""
    flags = [FlagDef(f"flag{i}", i) for i in range(100)]
    flags.append(
        FlagDef(
            "rollout", False, [FlagRule(True, tenants=["other"]), FlagRule(True, percentage=30)]
        )
    )
    book = FlagBook(flags, 1)
    client = ClientFlags(token("acme", "user-7"))
    client.book = book
    table = {f.name: f.default for f in flags}

    def timed(fn: Callable[[], Any]) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter_ns()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter_ns() - started) / n)
        return best

    # Each figure includes the same loop and call overhead (a lambda call), so they
    # compare like for like; nothing is subtracted.
    return {
        "rollout_rule": timed(lambda: book.evaluate("rollout", False, tenant="acme", key="user-7")),
        "plain_flag": timed(lambda: book.evaluate("flag7", 0, tenant="acme", key="user-7")),
        "client_flag": timed(lambda: client.value("rollout", False)),
        "dict_get": timed(lambda: table.get("flag7", 0)),
    }


@figure("B11")
async def b11(ctx: Context) -> list[Row]:
    """Flag change → every one of N clients (p50/p99), and local evaluation ns/op."""
    receivers = 100 if ctx.quick else 1000
    changes = ctx.size(20, 8)
    rows: list[Row] = []
    url = f"sqlite:///{ctx.path('b11.db')}"
    async with child("tether", ["--database", url], logdir=ctx.workdir) as server:
        summaries, size = await _propagation(ctx, server.ws_url, receivers, changes)
    raw_runs = await _raw_fanout(ctx, _template(size), receivers, changes, 0.02, "B11 raw")
    t50, t99 = (
        Stat.of([s["last_p50"] for s in summaries], "ms"),
        Stat.of([s["last_p99"] for s in summaries], "ms"),
    )
    r50, r99 = (
        Stat.of([s["last_p50"] for s in raw_runs], "ms"),
        Stat.of([s["last_p99"] for s in raw_runs], "ms"),
    )
    details = {
        "clients": receivers,
        "changes_per_repeat": changes,
        "frame_bytes": size,
        "missing_deliveries": sum(s["missing"] for s in summaries),
    }
    label = f"websockets broadcast, {size} B frame"
    for name, t, r, target, ok in (
        ("p50", t50, r50, "", None),
        ("p99", t99, r99, "≤ 100 ms (B3's 1,000-client target)", t99.median <= 100),
    ):
        rows.append(
            Row(
                "B11",
                f"flag change → {receivers} clients, last receiver {name}",
                tether=t,
                raw=r,
                raw_label=label,
                ratio=ratio(t, r),
                target=target,
                passed=None if ok is None else verdict(ctx, ok),
                details=details,
            )
        )
    runs = [
        await asyncio.to_thread(evaluation_ns, ctx.size(200_000, 20_000))
        for _ in range(ctx.repeats)
    ]
    raw = Stat.of([run["dict_get"] for run in runs], "ns")
    for key, measure in (
        ("rollout_rule", "local evaluation, percentage rule"),
        ("plain_flag", "local evaluation, plain flag"),
        ("client_flag", "client.flag (SDK path), percentage rule"),
    ):
        stat = Stat.of([run[key] for run in runs], "ns")
        rows.append(
            Row(
                "B11",
                measure + ", ns/op",
                tether=stat,
                raw=raw,
                raw_label="dict.get of the same name",
                ratio=ratio(stat, raw),
                target="≤ 5 µs",
                passed=verdict(ctx, stat.median <= 5000),
            )
        )
    return rows
