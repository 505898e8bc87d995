"""``python -m bench.sizing [N]``: rows per workflow, bytes per event, disk per million.

Runs ``N`` (default 2,000) three-step no-op workflows (``bench.workflows.NOOP3``, ten
submits per push, sagas on) through a Tether child process on SQLite and on PostgreSQL
with retention off, then measures what they left behind: rows per workflow in each
table, bytes per event and per workflow row (table plus its indexes: PostgreSQL's
``pg_total_relation_size``, SQLite's file pages per table from ``dbstat`` when compiled
in, else the file size), and extrapolates the disk a million such workflows take. The
README's "Retention and sizing" section quotes its output.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from bench.pg import PrivateDatabase
from bench.procs import child
from bench.wire import WireClient
from protocol import Events
from sync_server.retention import KINDS
from sync_server.store import open_store
from sync_server.store.postgres import parse_postgres_url
from sync_server.store.sqlite import sqlite_path

__all__ = ["measure"]

TABLES = ("events", "workflows", "mutation_results", "clients", "outbox", "dlq")


async def _run_workflows(url: str, n: int, workdir: Path) -> None:
    keep = {f"SYNC_RETENTION_{kind.upper()}": "0" for kind in KINDS}
    done: set[str] = set()
    finished = asyncio.Event()

    def sink(message: Events, _size: int, _at: float) -> None:
        for event in message.events:
            snap = event.data.get("workflow") if isinstance(event.data, dict) else None
            if isinstance(snap, dict) and snap.get("status") == "completed":
                done.add(str(snap.get("id")))
        if len(done) >= n:
            finished.set()

    async with child(
        "tether", ["--database", url, "--run-sagas"], logdir=workdir, env=keep
    ) as server:
        client = await WireClient.open(
            server.ws_url, tenant="sizing", client_id=uuid.uuid4().hex, on_events=sink
        )
        try:
            for _ in range(0, n, 10):  # batches of 10: under the push rate limit
                await client.push(client.mutations(10, name="noop3"))
            await asyncio.wait_for(finished.wait(), 300)
        finally:
            await client.close()


def _sqlite_sizes(path: str) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        rows = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        try:
            found = conn.execute(
                "SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"
            ).fetchall()
            owner = {name: table for name, table in found}
            sizes: dict[str, int] = {}
            for name, pages in conn.execute("SELECT name, count(*) FROM dbstat GROUP BY name"):
                table = owner.get(name, name)
                sizes[table] = sizes.get(table, 0) + pages * page
        except sqlite3.OperationalError:  # no dbstat in this build
            sizes = {"events": os.path.getsize(path)}
    finally:
        conn.close()
    return {"rows": rows, "bytes": sizes, "file": os.path.getsize(path)}


async def _pg_sizes(url: str) -> dict[str, Any]:
    dsn, options, _ = parse_postgres_url(url)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
    try:
        await conn.execute("VACUUM ANALYZE")
        rows = {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}
        sizes = {t: await conn.fetchval("SELECT pg_total_relation_size($1)", t) for t in TABLES}
    finally:
        await conn.close()
    return {"rows": rows, "bytes": sizes, "file": sum(sizes.values())}


async def measure(n: int, pg_dsn: str) -> dict[str, dict[str, Any]]:
    """Run ``n`` workflows on each backend and return their footprints."""
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tether-sizing-") as tmp:
        workdir = Path(tmp)
        pg = PrivateDatabase(pg_dsn)
        try:
            for backend in ("sqlite", "postgres"):
                if backend == "sqlite":
                    url = f"sqlite:///{workdir / 'sizing.db'}"
                else:
                    url = await pg.url("sizing")
                store = open_store(url)
                await store.open()
                await store.close()
                await _run_workflows(url, n, workdir)
                if backend == "sqlite":
                    out[backend] = await asyncio.to_thread(_sqlite_sizes, sqlite_path(url))
                else:
                    out[backend] = await _pg_sizes(url)
        finally:
            await pg.drop()
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the sizing table."""
    args = sys.argv[1:] if argv is None else argv
    n = int(args[0]) if args else 2000
    dsn = os.environ.get("TETHER_PG_DSN", "postgresql://127.0.0.1:5432/test")
    result = asyncio.run(measure(n, dsn))
    for backend, data in result.items():
        rows, sizes = data["rows"], data["bytes"]
        print(f"## {backend}: {n} three-step workflows")
        for table in TABLES:
            per = rows[table] / n
            size = sizes.get(table, 0)
            each = size / rows[table] if rows[table] else 0
            print(
                f"  {table:17s} rows/workflow {per:6.2f}   bytes/row {each:7.0f}   total {size:,}"
            )
        total = data["file"]
        print(f"  disk per workflow {total / n:,.0f} B; per million workflows {total / n:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
