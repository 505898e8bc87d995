"""The peer: DBOS Transact running the same 3-step no-op workflow on the same PostgreSQL.

Runs in a worker process (``bench.worker``): DBOS is a process-wide singleton with its
own threads, so each measurement gets a fresh interpreter. DBOS is an optional
dependency (the ``bench`` extra); ``available()`` says why it cannot run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bench.core import percentile

__all__ = ["available", "dbos_latency", "dbos_throughput"]


def available() -> str | None:
    """None if DBOS Transact can be imported, else the reason it cannot."""
    try:
        import dbos  # noqa: F401
    except ImportError as exc:
        return f"DBOS Transact is not installed (pip install -e '.[bench]'): {exc}"
    return None


def _launch(dsn: str) -> Any:
    """Configure DBOS on ``dsn`` with the noop3 workflow; returns the workflow function."""
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

    @DBOS.step()
    async def one() -> dict[str, Any]:
        return {}

    @DBOS.step()
    async def two() -> dict[str, Any]:
        return {}

    @DBOS.step()
    async def three() -> dict[str, Any]:
        return {}

    @DBOS.workflow()
    async def noop3() -> dict[str, Any]:
        await one()
        await two()
        await three()
        return {}

    DBOS.launch()
    return noop3


async def dbos_throughput(dsn: str, count: int, xid_dsn: str | None = None) -> dict[str, Any]:
    """Worker: start ``count`` workflows at once and wait for all; workflows/s and the
    transaction-id advance (write transactions) over the run."""
    from dbos import DBOS

    from bench.pg import xid_counter

    workflow = _launch(dsn)
    try:
        for _ in range(10):  # warm-up
            handle = await DBOS.start_workflow_async(workflow)
            await handle.get_result()
        xid_before = await xid_counter(xid_dsn) if xid_dsn else None
        start = time.perf_counter()
        handles = [await DBOS.start_workflow_async(workflow) for _ in range(count)]
        await asyncio.gather(*(h.get_result() for h in handles))
        elapsed = time.perf_counter() - start
        xid_after = await xid_counter(xid_dsn) if xid_dsn else None
    finally:
        DBOS.destroy(destroy_registry=True)
    writes = None if xid_before is None or xid_after is None else xid_after - xid_before
    return {"rate": count / elapsed, "seconds": elapsed, "write_txns": writes}


async def dbos_latency(dsn: str, count: int) -> dict[str, Any]:
    """Worker: ``count`` workflows one at a time; p50/p99 of start → result (ms)."""
    from dbos import DBOS

    workflow = _launch(dsn)
    latencies = []
    try:
        for _ in range(10):  # warm-up
            await (await DBOS.start_workflow_async(workflow)).get_result()
        for _ in range(count):
            start = time.perf_counter()
            handle = await DBOS.start_workflow_async(workflow)
            await handle.get_result()
            latencies.append((time.perf_counter() - start) * 1000)
    finally:
        DBOS.destroy(destroy_registry=True)
    return {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}
