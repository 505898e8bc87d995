"""The peer: DBOS Transact running the same 3-step no-op workflow on the same PostgreSQL.

Runs in a worker process (``bench.worker``): DBOS is a process-wide singleton with its
own threads, so each measurement gets a fresh interpreter. DBOS is an optional
dependency (the ``bench`` extra); ``available()`` says why it cannot run.

A peer is measured at its best (LESSONS): every start style DBOS documents is run and the
best is reported, its mode named.

* ``sync-direct`` — a synchronous workflow (DBOS's default style) called directly; for
  throughput, from 32 threads at once.
* ``sync-start`` — ``DBOS.start_workflow`` (runs in DBOS's thread pool), then
  ``handle.get_result()``.
* ``sync-queue`` — ``Queue.enqueue`` on a DBOS queue (throughput only: a queue is
  polled, which is not how one would run one workflow at a time).
* ``async-direct`` — an ``async`` workflow awaited directly; for throughput, all of
  them gathered at once.
* ``async-start`` — ``await DBOS.start_workflow_async``, then ``await
  handle.get_result()``.

Settings are DBOS's defaults (its own system-database pool and executor), which is what
its documentation recommends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.core import percentile

__all__ = [
    "LATENCY_MODES",
    "THROUGHPUT_MODES",
    "available",
    "dbos_latency",
    "dbos_throughput",
]

THROUGHPUT_MODES = ("sync-direct", "sync-start", "sync-queue", "async-direct", "async-start")
LATENCY_MODES = ("sync-direct", "sync-start", "async-direct", "async-start")
_THREADS = 32


def available() -> str | None:
    """None if DBOS Transact can be imported, else the reason it cannot."""
    try:
        import dbos  # noqa: F401
    except ImportError as exc:
        return f"DBOS Transact is not installed (pip install -e '.[bench]'): {exc}"
    return None


class _Peer:
    """DBOS configured on one database with the noop3 workflow in both styles."""

    def __init__(self, dsn: str) -> None:
        from dbos import DBOS, DBOSConfig

        for name in ("dbos", "sqlalchemy", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config: DBOSConfig = {
            "name": "tether-bench",
            "system_database_url": dsn,
            "log_level": "WARNING",
            "console_log_level": "WARNING",
            "enable_otlp": False,
        }
        DBOS(config=config)
        self._queue: Any = None

        @DBOS.step()
        def one() -> dict[str, Any]:
            return {}

        @DBOS.step()
        def two() -> dict[str, Any]:
            return {}

        @DBOS.step()
        def three() -> dict[str, Any]:
            return {}

        @DBOS.workflow()
        def noop3_sync() -> dict[str, Any]:
            one()
            two()
            three()
            return {}

        @DBOS.step()
        async def one_a() -> dict[str, Any]:
            return {}

        @DBOS.step()
        async def two_a() -> dict[str, Any]:
            return {}

        @DBOS.step()
        async def three_a() -> dict[str, Any]:
            return {}

        @DBOS.workflow()
        async def noop3_async() -> dict[str, Any]:
            await one_a()
            await two_a()
            await three_a()
            return {}

        self.sync_wf = noop3_sync
        self.async_wf = noop3_async
        DBOS.launch()

    def queue(self) -> Any:
        """The bench queue, registered on first use (after launch; from a thread)."""
        from dbos import DBOS

        if self._queue is None:
            self._queue = DBOS.register_queue("bench", polling_interval_sec=0.05)
        return self._queue

    @staticmethod
    def close() -> None:
        from dbos import DBOS

        DBOS.destroy(destroy_registry=True)

    # -- one workflow, in each style ----------------------------------------------
    async def one(self, mode: str) -> None:
        """Run one workflow to its result in ``mode`` (sync styles in a thread)."""
        from dbos import DBOS

        if mode == "async-direct":
            await self.async_wf()
        elif mode == "async-start":
            await (await DBOS.start_workflow_async(self.async_wf)).get_result()
        else:
            await asyncio.to_thread(self.one_sync, mode)

    def one_sync(self, mode: str) -> None:
        from dbos import DBOS

        if mode == "sync-direct":
            self.sync_wf()
        elif mode == "sync-start":
            DBOS.start_workflow(self.sync_wf).get_result()
        elif mode == "sync-queue":
            self.queue().enqueue(self.sync_wf).get_result()
        else:
            raise ValueError(f"unknown DBOS mode {mode!r}")

    # -- many workflows at once, in each style ------------------------------------
    async def many(self, mode: str, count: int) -> None:
        """Start ``count`` workflows as the style allows and wait for every result."""
        from dbos import DBOS

        if mode == "async-direct":
            await asyncio.gather(*(self.async_wf() for _ in range(count)))
        elif mode == "async-start":
            handles = [await DBOS.start_workflow_async(self.async_wf) for _ in range(count)]
            await asyncio.gather(*(h.get_result() for h in handles))
        else:
            await asyncio.to_thread(self.many_sync, mode, count)

    def many_sync(self, mode: str, count: int) -> None:
        from dbos import DBOS

        if mode == "sync-direct":
            with ThreadPoolExecutor(_THREADS) as pool:
                list(pool.map(lambda _: self.sync_wf(), range(count)))
        elif mode == "sync-start":
            handles = [DBOS.start_workflow(self.sync_wf) for _ in range(count)]
            for handle in handles:
                handle.get_result()
        elif mode == "sync-queue":
            queue = self.queue()
            handles = [queue.enqueue(self.sync_wf) for _ in range(count)]
            for handle in handles:
                handle.get_result()
        else:
            raise ValueError(f"unknown DBOS mode {mode!r}")


async def dbos_throughput(
    dsn: str, count: int, xid_dsn: str | None = None, mode: str = "async-start"
) -> dict[str, Any]:
    """Worker: ``count`` workflows at once in ``mode``, wait for all; workflows/s and the
    transaction-id advance (write transactions) over the run."""
    from bench.pg import xid_counter

    peer = _Peer(dsn)
    try:
        await peer.many(mode, 10)  # warm-up
        xid_before = await xid_counter(xid_dsn) if xid_dsn else None
        start = time.perf_counter()
        await peer.many(mode, count)
        elapsed = time.perf_counter() - start
        xid_after = await xid_counter(xid_dsn) if xid_dsn else None
    finally:
        peer.close()
    writes = None if xid_before is None or xid_after is None else xid_after - xid_before
    return {"rate": count / elapsed, "seconds": elapsed, "write_txns": writes, "mode": mode}


async def dbos_latency(dsn: str, count: int, mode: str = "async-start") -> dict[str, Any]:
    """Worker: ``count`` workflows one at a time in ``mode``; p50/p99 start → result (ms).

    Synchronous styles are timed inside their own thread (no hand-off in the figure)."""
    peer = _Peer(dsn)
    try:
        if mode.startswith("sync"):
            latencies = await asyncio.to_thread(_time_sync, peer, mode, count)
        else:
            latencies = []
            for i in range(count + 10):  # 10 warm-up runs
                start = time.perf_counter()
                await peer.one(mode)
                if i >= 10:
                    latencies.append((time.perf_counter() - start) * 1000)
    finally:
        peer.close()
    return {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "mode": mode}


def _time_sync(peer: _Peer, mode: str, count: int) -> list[float]:
    latencies = []
    for i in range(count + 10):  # 10 warm-up runs
        start = time.perf_counter()
        peer.one_sync(mode)
        if i >= 10:
            latencies.append((time.perf_counter() - start) * 1000)
    return latencies
