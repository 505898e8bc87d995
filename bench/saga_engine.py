"""B5/B5l's worker side: the Tether engine measured in-process, and its worker functions.

``bench/saga.py`` describes the figures. ``_Engine`` is the server's own
``MutationApplier`` (accepting ``submit_workflow`` mutations) and a ``SagaRunner`` on one
store, with a follower of the event log (the path the hub takes) that tells when each
workflow ended. ``tether_throughput`` and ``tether_latency`` run in a worker process
(``bench.procs.run_worker``, addressed as ``bench.saga:...``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgspec

from bench.core import percentile

__all__ = ["tether_latency", "tether_throughput"]


class _Engine:
    """Store + applier + runner of one instance, and a follower of the event log."""

    def __init__(self, url: str, max_concurrency: int = 2000) -> None:
        from bench.workflows import NOOP3
        from protocol import Role
        from sync_server.auth import Principal
        from sync_server.domain import MutationApplier
        from sync_server.saga.runner import SagaRunner
        from sync_server.store import open_store

        self.store = open_store(url)
        self.runner = SagaRunner(
            self.store,
            [NOOP3],
            instance_id=f"bench-{uuid.uuid4().hex[:6]}",
            max_concurrency=max_concurrency,
        )
        self.applier = MutationApplier(self.store, {"noop3": NOOP3})
        self.applier.runner = self.runner
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
        self.reads = 0
        """Round trips of the follower (not the engine's): one per ``read_events``."""

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
                self.reads += 1
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

    def trips(self) -> int:
        """The engine's database round trips so far (the follower's reads left out);
        0 on a tree without the counter (a before/after comparison)."""
        counter = getattr(self.store, "round_trips", None)
        return 0 if counter is None else counter.count - self.reads

    async def run_clients(self, count: int, clients: int, timeout: float) -> float:
        """``count`` workflows from ``clients`` concurrent clients, one submit per push,
        each client pushing its next submit once the previous one is answered; seconds."""
        self.ended.clear()
        self._all.clear()
        self.expect = count
        share = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]

        async def client(n: int) -> None:
            client_id = f"b5c-{uuid.uuid4().hex[:8]}"
            for i in range(1, n + 1):
                (mutation,) = self.mutations(1)
                mutation = msgspec.structs.replace(mutation, id=i)
                results = await self.applier.push(self.principal, client_id, [mutation])
                if results[0].status != "applied":
                    raise RuntimeError(f"submit refused: {results[0]}")

        start = time.perf_counter()
        await asyncio.gather(*(client(n) for n in share))
        async with asyncio.timeout(timeout):
            await self._all.wait()
        return time.perf_counter() - start

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


async def tether_throughput(
    url: str,
    count: int,
    xid_dsn: str | None = None,
    shape: str = "batched",
    max_concurrency: int = 2000,
) -> dict[str, Any]:
    """Worker: ``count`` noop3 workflows end to end in ``shape``; wf/s, write txns and
    database round trips per workflow."""
    from bench.pg import xid_counter

    engine = _Engine(url, max_concurrency=max_concurrency)
    await engine.start()
    try:
        await engine.run_batch(20, 60)  # warm-up
        xid_before = await xid_counter(xid_dsn) if xid_dsn else None
        stats_before = dict(engine.runner.stats)
        trips_before = engine.trips()
        if shape == "clients16":
            elapsed = await engine.run_clients(count, 16, 240)
        else:
            elapsed = await engine.run_batch(count, 600)
        trips = engine.trips() - trips_before
        xid_after = await xid_counter(xid_dsn) if xid_dsn else None
        stats = {k: v - stats_before.get(k, 0) for k, v in engine.runner.stats.items()}
    finally:
        await engine.stop()
    writes = None if xid_before is None or xid_after is None else xid_after - xid_before
    return {
        "rate": count / elapsed,
        "seconds": elapsed,
        "write_txns": writes,
        "round_trips": trips / count,
        "runner": stats,
    }


async def tether_latency(url: str, count: int) -> dict[str, Any]:
    """Worker: ``count`` noop3 workflows one at a time; p50/p99 submit → end (ms) and
    database round trips per workflow."""
    engine = _Engine(url)
    await engine.start()
    try:
        for _ in range(10):
            await engine.run_one(30)
        trips_before = engine.trips()
        latencies = [await engine.run_one(30) * 1000 for _ in range(count)]
        trips = engine.trips() - trips_before
    finally:
        await engine.stop()
    return {
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "round_trips": trips / count,
    }
