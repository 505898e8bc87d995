"""B3 — live fan-out, and B3x — cross-instance fan-out.

B3: one Tether instance (child process, SQLite, sagas off — said in its rows: with sagas
on every write would be followed by the four events of the workflow it starts, and the
figure would measure that extra fan-out, not the latency of one event) with N connected
clients of
one tenant (raw protocol clients, all in this process). A writer client pushes one
``submit_workflow`` at a time whose input carries the send time; every receiver records
when the resulting ``workflow.submitted`` event arrives. The latency of an event is the
*last* receiver's (max over clients: the BENCH.md reference is "last receiver"); p50
and p99 are over the events of a repeat. The next event is sent only after every
receiver has the previous one, so this is latency, not throughput. The measured span is
write → commit → hub → every socket: the push transaction is included.

Raw limit: a plain ``websockets`` server (``bench.serve relay``) that broadcasts what
the writer sends (``websockets.broadcast``) to the same number of clients; the frame is
an encoded ``Events`` message copied from the Tether run (same size, and receivers
decode it with the same decoder, so client cost is the same on both sides).

B3x: two instances on one PostgreSQL schema, sagas on in both (the headline) and, as its
own rows, sagas off; the writer is on A, the receiver on B.
Raw limit: an asyncpg transaction {INSERT; NOTIFY} → a listener (``bench.raw``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
from websockets.asyncio.client import connect

from bench import raw
from bench.core import Context, Row, Stat, figure, percentile, ratio, verdict
from bench.procs import child
from bench.wire import WireClient, connect_many, submit
from protocol import Event, Events, decode_server_message, encode

__all__ = ["LatencyProbe"]


class LatencyProbe:
    """Collects, per event key, the arrival delay at each of ``receivers`` clients."""

    def __init__(self, receivers: int) -> None:
        self.receivers = receivers
        self.delays: dict[int, list[float]] = {}
        self.done: dict[int, asyncio.Event] = {}
        self.frame_sizes: list[int] = []
        self.template: Events | None = None
        self.inbound: list[float] = []  # send -> the server's event time (wall clock)
        self.outbound: list[float] = []  # the server's event time -> first arrival

    def expect(self, key: int) -> asyncio.Event:
        """Get ready for event ``key``; the returned Event is set when all received it."""
        self.delays[key] = []
        self.done[key] = asyncio.Event()
        return self.done[key]

    def on_events(self, message: Events, size: int, arrived: float) -> None:
        """A receiver's callback (``WireClient`` sink signature)."""
        for event in message.events:
            data = event.data.get("input", event.data)
            key = data.get("k") if isinstance(data, dict) else None
            if key is None or key not in self.delays:
                continue
            delays = self.delays[key]
            delays.append(arrived - float(data["t"]))
            if len(delays) == 1:
                self.frame_sizes.append(size)
                if "w" in data:
                    wall = time.time()
                    self.inbound.append((event.at - float(data["w"])) * 1000)
                    self.outbound.append((wall - event.at) * 1000)
                if self.template is None:
                    self.template = message
            if len(delays) >= self.receivers:
                self.done[key].set()

    def summary(self, keys: list[int]) -> dict[str, float]:
        """p50/p99 of the last receiver and of every receiver, in ms."""
        last = [max(self.delays[k]) * 1000 for k in keys if self.delays[k]]
        every = [d * 1000 for k in keys for d in self.delays[k]]
        missing = sum(self.receivers - len(self.delays[k]) for k in keys)
        return {
            "last_p50": percentile(last, 50),
            "last_p99": percentile(last, 99),
            "all_p50": percentile(every, 50),
            "all_p99": percentile(every, 99),
            "missing": float(missing),
        }


Sender = Callable[[int], Any]


async def _rounds(
    ctx: Context, probe: LatencyProbe, send: Sender, events: int, gap: float, label: str
) -> list[dict[str, float]]:
    """``ctx.repeats`` rounds of ``events`` sequential events; one summary per round."""
    summaries = []
    key = 0
    for repeat in range(ctx.repeats + 1):  # round 0 warms up (JIT-free, but caches, pools)
        ctx.say(f"{label}: round {repeat}/{ctx.repeats}")
        keys = []
        count = events if repeat else max(3, events // 5)
        for _ in range(count):
            key += 1
            keys.append(key)
            done = probe.expect(key)
            await send(key)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await done.wait()
            await asyncio.sleep(gap)
        if repeat:
            summaries.append(probe.summary(keys))
    return summaries


async def _tether_fanout(
    ctx: Context, write_url: str, read_url: str, receivers: int, events: int, gap: float, label: str
) -> tuple[list[dict[str, float]], LatencyProbe]:
    probe = LatencyProbe(receivers)
    tenant = f"fan-{uuid.uuid4().hex[:8]}"
    ctx.say(f"{label}: connecting {receivers} clients")
    clients: list[WireClient] = await connect_many(
        receivers,
        lambda i: WireClient.open(read_url, tenant=tenant, on_events=probe.on_events),
    )
    writer = await WireClient.open(write_url, tenant=tenant)

    async def send(key: int) -> None:
        mutation = submit(writer.next_id, "noop", t=time.perf_counter(), k=key, w=time.time())
        writer.next_id += 1
        await writer.push([mutation])

    try:
        summaries = await _rounds(ctx, probe, send, events, gap, label)
    finally:
        await writer.close()
        await asyncio.gather(*(c.close() for c in clients))
    return summaries, probe


class _RelayReader:
    """A plain websockets client of the relay, decoding frames like a Tether client."""

    def __init__(self, ws: Any, sink: Callable[[Events, int, float], None]) -> None:
        self.ws = ws
        self.task = asyncio.create_task(self._read(sink))

    async def _read(self, sink: Callable[[Events, int, float], None]) -> None:
        with contextlib.suppress(Exception):
            async for frame in self.ws:
                arrived = time.perf_counter()
                message = decode_server_message(frame)
                if isinstance(message, Events):
                    sink(message, len(frame), arrived)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


async def _raw_fanout(
    ctx: Context, template: Events, receivers: int, events: int, gap: float, label: str
) -> list[dict[str, float]]:
    probe = LatencyProbe(receivers)
    event0: Event = template.events[0]
    async with child("relay", [], logdir=ctx.workdir) as relay:
        ctx.say(f"{label}: connecting {receivers} raw clients")

        async def open_reader(i: int) -> _RelayReader:
            ws = await connect(
                f"{relay.ws_url}/read", max_size=None, compression=None, ping_interval=None
            )
            return _RelayReader(ws, probe.on_events)

        readers: list[_RelayReader] = await connect_many(receivers, open_reader)
        writer = await connect(
            f"{relay.ws_url}/write", max_size=None, compression=None, ping_interval=None
        )

        async def send(key: int) -> None:
            data = dict(event0.data)
            data["input"] = {"t": time.perf_counter(), "k": key}
            event = msgspec.structs.replace(event0, seq=event0.seq + key, data=data)
            await writer.send(encode(Events(events=[event], cursor=event.seq)))

        try:
            # The relay answers nothing, so wait until every reader is registered.
            await asyncio.sleep(0.2)
            return await _rounds(ctx, probe, send, events, gap, label)
        finally:
            await writer.close()
            await asyncio.gather(*(r.close() for r in readers))


def _stat(summaries: list[dict[str, float]], key: str) -> Stat:
    return Stat.of([s[key] for s in summaries], "ms")


def _plan(ctx: Context) -> list[tuple[int, int, float]]:
    """(clients, events per repeat, gap seconds) per client count."""
    if ctx.quick:
        return [(1, 30, 0.002), (20, 15, 0.005), (100, 8, 0.01)]
    return [(1, 200, 0.002), (100, 60, 0.005), (1000, 20, 0.02)]


@figure("B3")
async def b3(ctx: Context) -> list[Row]:
    """Fan-out latency with 1, 100 and 1,000 clients on one instance, vs websockets."""
    rows: list[Row] = []
    url = f"sqlite:///{ctx.path('b3.db')}"
    async with child("tether", ["--database", url], logdir=ctx.workdir) as server:
        for receivers, events, gap in _plan(ctx):
            label = f"B3 {receivers} clients"
            tether, probe = await _tether_fanout(
                ctx, server.ws_url, server.ws_url, receivers, events, gap, label
            )
            if probe.template is None:
                rows.append(Row.error("B3", f"{receivers} clients: no event arrived"))
                continue
            raw_runs = await _raw_fanout(
                ctx, probe.template, receivers, events, gap, label + " raw"
            )
            size = int(percentile(probe.frame_sizes, 50))
            details = {
                "clients": receivers,
                "split_ms_p50": {
                    "send_to_server_event_time": percentile(probe.inbound or [0.0], 50),
                    "server_event_time_to_first_receiver": percentile(probe.outbound or [0.0], 50),
                },
                "events_per_repeat": events,
                "frame_bytes": size,
                "all_receivers_p50_ms": _stat(tether, "all_p50").to_json(),
                "all_receivers_p99_ms": _stat(tether, "all_p99").to_json(),
                "missing_deliveries": sum(s["missing"] for s in tether),
                "raw_missing_deliveries": sum(s["missing"] for s in raw_runs),
            }
            t50, t99 = _stat(tether, "last_p50"), _stat(tether, "last_p99")
            r50, r99 = _stat(raw_runs, "last_p50"), _stat(raw_runs, "last_p99")
            if receivers == 1:
                target50, ok50 = "≤ 3 ms", t50.median <= 3
                target99, ok99 = "≤ 10 ms", t99.median <= 10
            elif receivers >= 1000 or (ctx.quick and receivers == _plan(ctx)[-1][0]):
                target50, ok50 = "", None
                target99, ok99 = "≤ 100 ms", t99.median <= 100
            else:
                target50, ok50 = "", None
                target99, ok99 = "≤ raw p99 + 5 ms", t99.median <= r99.median + 5
            label_raw = f"websockets broadcast, {size} B frame"
            for name, t, r, target, ok in (
                ("p50", t50, r50, target50, ok50),
                ("p99", t99, r99, target99, ok99),
            ):
                rows.append(
                    Row(
                        "B3",
                        f"write → {receivers} client(s), last receiver {name} (sagas off)",
                        tether=t,
                        raw=r,
                        raw_label=label_raw,
                        ratio=ratio(t, r),
                        target=target,
                        passed=None if ok is None else verdict(ctx, ok),
                        details=details,
                    )
                )
    return rows


@figure("B3x")
async def b3x(ctx: Context) -> list[Row]:
    """Write via instance A → client on instance B, both on one PostgreSQL; sagas on (the
    headline) and off."""
    notify: dict[str, Stat] = await ctx.raw("pg_notify_latency", raw.pg_notify_latency)
    label = "asyncpg {INSERT; NOTIFY} → listener"
    rows: list[Row] = []
    for sagas in (True, False):
        url = await ctx.pg_url("b3x")
        events = ctx.size(200, 30)
        args = ["--database", url, *(["--run-sagas"] if sagas else [])]
        async with (
            child("tether", args, logdir=ctx.workdir) as a,
            child("tether", args, logdir=ctx.workdir) as b,
        ):
            summaries, _probe = await _tether_fanout(
                ctx, a.ws_url, b.ws_url, 1, events, 0.003, "B3x A→B"
            )
        t50, t99 = _stat(summaries, "last_p50"), _stat(summaries, "last_p99")
        details = {
            "events_per_repeat": events,
            "missing": sum(s["missing"] for s in summaries),
            "split_ms_p50": {
                "send_to_server_event_time": percentile(_probe.inbound or [0.0], 50),
                "server_event_time_to_receiver": percentile(_probe.outbound or [0.0], 50),
            },
        }
        mode = "sagas on" if sagas else "sagas off"
        for name, t, target, limit in (("p50", t50, "≤ 5 ms", 5), ("p99", t99, "≤ 20 ms", 20)):
            rows.append(
                Row(
                    "B3x",
                    f"write via A → client on B, {mode}, {name}",
                    tether=t,
                    raw=notify[name],
                    raw_label=label,
                    ratio=ratio(t, notify[name]),
                    target=target if sagas else "",
                    passed=verdict(ctx, t.median <= limit) if sagas else None,
                    details=details,
                )
            )
    return rows
