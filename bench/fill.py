"""Bulk-load a store with months of finished history, straight into its tables.

Used by the plan test (``tests/test_store_plans.py``) and by B9/B10: going through the
API would take hours for a million workflows; COPY (PostgreSQL) and ``executemany``
(SQLite) take seconds to minutes. The rows have the shape Tether writes: a finished
workflow row with its saga state, ``events_per_workflow`` events each carrying a
snapshot, one mutation result per workflow and one client per tenant. ``ANALYZE`` runs
at the end, as autovacuum would on a real deployment.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from sync_server.store import rows

__all__ = ["Shape", "fill_postgres", "fill_sqlite"]

_STATE = rows.dumps(
    {
        "steps": {
            name: {"status": "succeeded", "attempts": 1, "progress": 1.0, "result": None}
            for name in ("reserve", "render", "store")
        }
    }
)
_SNAPSHOT = rows.dumps(
    {
        "step": "render",
        "status": "succeeded",
        "workflow": {
            "id": "0" * 32,
            "name": "generate_image",
            "status": "running",
            "steps": {"render": {"status": "succeeded", "attempts": 1, "progress": 1.0}},
            "progress": 0.66,
            "updated_at": 0.0,
            "version": 1,
        },
    }
)


@dataclass(frozen=True, slots=True)
class Shape:
    """How much history to load.

    Attributes:
        workflows: finished workflows in all.
        events_per_workflow: events of each.
        tenants: tenants the workflows are spread over.
        start: ``created_at`` of the first workflow (unix seconds).
        spacing: seconds between two workflows' creation.
    """

    workflows: int
    events_per_workflow: int = 3
    tenants: int = 100
    start: float = 0.0
    spacing: float = 1.0

    @property
    def events(self) -> int:
        return self.workflows * self.events_per_workflow

    def tenant(self, i: int) -> str:
        return f"t{i % self.tenants:05d}"


def _workflow_id(i: int) -> str:
    return f"{i:032x}"


# How finished workflows end, in a realistic mix (and realistic planner statistics).
_ENDINGS = ["completed"] * 90 + ["failed"] * 4 + ["compensated"] * 3 + ["cancelled"] * 3


def _workflow_rows(shape: Shape, lo: int, hi: int) -> Iterator[tuple[Any, ...]]:
    for i in range(lo, hi):
        at = shape.start + i * shape.spacing
        yield (
            _workflow_id(i),
            shape.tenant(i),
            "generate_image",
            _ENDINGS[i % len(_ENDINGS)],
            '{"prompt":"a cat"}',
            _STATE,
            1.0,
            '{"url":"s3://bucket/x.png"}',
            None,
            shape.events_per_workflow,
            at,
            at + 2.0,
            "mini-app",
            None,
            None,
            None,
            1,
            "v1",  # workflow_version
        )


def _event_rows(shape: Shape, lo: int, hi: int) -> Iterator[tuple[Any, ...]]:
    k = shape.events_per_workflow
    for i in range(lo, hi):
        at = shape.start + i * shape.spacing
        tenant, wid = shape.tenant(i), _workflow_id(i)
        for j in range(k):
            yield (i * k + j + 1, tenant, wid, j + 1, "step.status", _SNAPSHOT, at + j * 0.5)


def _result_rows(shape: Shape, lo: int, hi: int) -> Iterator[tuple[Any, ...]]:
    for i in range(lo, hi):
        t = shape.tenant(i)
        yield (f"client-{t}", t, i + 1, "applied", None, shape.start + i * shape.spacing)


def _client_rows(shape: Shape) -> list[tuple[Any, ...]]:
    last: dict[str, int] = {}
    for i in range(max(0, shape.workflows - shape.tenants), shape.workflows):
        last[f"client-{shape.tenant(i)}"] = i + 1
    return [
        (cid, cid.removeprefix("client-"), "mini-app", mid, shape.start)
        for cid, mid in sorted(last.items())
    ]


_CHUNK = 20_000
_WF_COLS = [c.strip() for c in rows.WORKFLOW_COLUMNS.split(",")]
_EV_COLS = [c.strip() for c in rows.EVENT_COLUMNS.split(",")]
_MR_COLS = ["client_id", "tenant", "mutation_id", "status", "error", "at"]
_CL_COLS = ["client_id", "tenant", "subject", "last_mutation_id", "updated_at"]


async def fill_postgres(dsn: str, schema: str, shape: Shape, *, settle: bool = False) -> float:
    """COPY ``shape`` into an already migrated schema; returns the seconds it took.

    Also moves ``event_head`` to the last loaded seq, and runs ANALYZE (with ``settle``:
    VACUUM ANALYZE, CHECKPOINT and a sync of the file system, as before a benchmark).
    """
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET synchronous_commit = off")
        for lo in range(0, shape.workflows, _CHUNK):
            hi = min(shape.workflows, lo + _CHUNK)
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "workflows",
                    records=_workflow_rows(shape, lo, hi),
                    columns=_WF_COLS,
                    schema_name=schema,
                )
                await conn.copy_records_to_table(
                    "events",
                    records=_event_rows(shape, lo, hi),
                    columns=_EV_COLS,
                    schema_name=schema,
                )
                await conn.copy_records_to_table(
                    "mutation_results",
                    records=_result_rows(shape, lo, hi),
                    columns=_MR_COLS,
                    schema_name=schema,
                )
        await conn.copy_records_to_table(
            "clients", records=_client_rows(shape), columns=_CL_COLS, schema_name=schema
        )
        await conn.execute(f'UPDATE "{schema}".event_head SET seq = $1 WHERE id = 1', shape.events)
        if settle:
            # A months-old store is settled: vacuumed (visibility map set, so autovacuum
            # does not start in the middle of a measurement) and checkpointed.
            for table in ("workflows", "events", "mutation_results", "clients"):
                await conn.execute(f'VACUUM ANALYZE "{schema}".{table}')
            with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
                await conn.execute("CHECKPOINT")
        else:
            await conn.execute(f'ANALYZE "{schema}".workflows, "{schema}".events')
            await conn.execute(f'ANALYZE "{schema}".mutation_results, "{schema}".clients')
    finally:
        await conn.close()
    if settle:
        os.sync()  # the load's dirty pages would otherwise slow every fsync measured next
    return time.perf_counter() - started


def fill_sqlite(path: str, shape: Shape, *, settle: bool = False) -> float:
    """Insert ``shape`` into an already migrated SQLite file; returns the seconds it took
    (with ``settle``, the file system is synced afterwards, as before a benchmark)."""
    started = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        marks = {n: ", ".join("?" * n) for n in (5, 6, 7, rows.WORKFLOW_COLUMN_COUNT)}
        for lo in range(0, shape.workflows, _CHUNK * 5):
            hi = min(shape.workflows, lo + _CHUNK * 5)
            conn.execute("BEGIN")
            conn.executemany(
                f"INSERT INTO workflows ({rows.WORKFLOW_COLUMNS}) "
                f"VALUES ({marks[rows.WORKFLOW_COLUMN_COUNT]})",
                _workflow_rows(shape, lo, hi),
            )
            conn.executemany(
                f"INSERT INTO events ({rows.EVENT_COLUMNS}) VALUES ({marks[7]})",
                _event_rows(shape, lo, hi),
            )
            conn.executemany(
                f"INSERT INTO mutation_results ({', '.join(_MR_COLS)}) VALUES ({marks[6]})",
                _result_rows(shape, lo, hi),
            )
            conn.execute("COMMIT")
        conn.executemany(
            f"INSERT INTO clients ({', '.join(_CL_COLS)}) VALUES ({marks[5]})", _client_rows(shape)
        )
        conn.execute("ANALYZE")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    if settle:
        os.sync()
    return time.perf_counter() - started
