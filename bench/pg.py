"""PostgreSQL for a run: a private database on the shared server, a private cluster.

* ``PrivateDatabase`` — ``CREATE DATABASE tether_bench_<hex>`` on the shared server
  (``TETHER_PG_DSN``), dropped at the end of the run; each figure takes its own schema
  in it (``?schema=``), so nothing is shared with other users of the server.
* ``PrivateCluster`` — ``initdb`` + ``pg_ctl`` in a temporary folder (LESSONS: as the
  ``postgres`` user when running as root). B5 counts *write* transactions per workflow
  as the advance of the transaction-id counter, which is cluster-wide; only a cluster
  nobody else uses gives an exact count (PostgreSQL assigns an xid only to a transaction
  that writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = ["PrivateCluster", "PrivateDatabase", "with_database", "xid_counter"]

_PG_BIN = Path("/usr/lib/postgresql")


def with_database(dsn: str, database: str, schema: str | None = None) -> str:
    """``dsn`` pointing at ``database`` (and ``?schema=`` for Tether)."""
    parts = urlsplit(dsn)
    url = urlunsplit(parts._replace(path=f"/{database}", query=""))
    return f"{url}?schema={schema}" if schema else url


async def xid_counter(dsn: str) -> int:
    """The cluster's next transaction id, without consuming one."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
    finally:
        await conn.close()
    return int(value)


class PrivateDatabase:
    """A database of its own on the shared server, for one run.

    Args:
        dsn: the server (``postgresql://127.0.0.1:5432/test``); its database is used
            only to create and drop the private one.
    """

    def __init__(self, dsn: str) -> None:
        self.admin_dsn = dsn
        self.name = f"tether_bench_{uuid.uuid4().hex[:10]}"
        self.created = False
        self._lock = asyncio.Lock()

    async def ensure(self) -> str:
        """Create the database on first use; returns its plain DSN."""
        import asyncpg

        async with self._lock:
            if not self.created:
                conn = await asyncpg.connect(self.admin_dsn, timeout=10)
                try:
                    await conn.execute(f'CREATE DATABASE "{self.name}"')
                finally:
                    await conn.close()
                self.created = True
        return with_database(self.admin_dsn, self.name)

    async def url(self, schema: str) -> str:
        """A Tether URL for a fresh schema in the private database."""
        dsn = await self.ensure()
        return with_database(dsn, self.name, schema)

    async def drop(self) -> None:
        """Drop the database (forcing out leftover sessions); idempotent."""
        import asyncpg

        if not self.created:
            return
        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await conn.close()
        self.created = False


class PrivateCluster:
    """A throw-away PostgreSQL cluster on a free port (same binaries, same disk).

    Raises (from ``start``):
        RuntimeError: no PostgreSQL binaries, or initdb/pg_ctl failed.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.dir: Path | None = None
        self.started = False

    @staticmethod
    def bin_dir() -> Path | None:
        """The newest PostgreSQL ``bin`` folder, if any."""
        if not _PG_BIN.is_dir():
            return None
        versions = sorted(
            (p for p in _PG_BIN.iterdir() if (p / "bin" / "initdb").exists()),
            key=lambda p: int(p.name) if p.name.isdigit() else 0,
        )
        return versions[-1] / "bin" if versions else None

    def _run(self, *cmd: str) -> None:
        as_root = os.geteuid() == 0
        full = ["runuser", "-u", "postgres", "--", *cmd] if as_root else list(cmd)
        result = subprocess.run(full, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {result.stderr.strip()[-500:]}")

    def start(self) -> str:
        """initdb and start; returns the DSN of its ``postgres`` database."""
        bin_dir = self.bin_dir()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql")
        self.dir = Path(tempfile.mkdtemp(prefix="tether-bench-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
        self._run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", user)
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            "-c max_connections=200 -c shared_buffers=256MB"
        )
        self._run(
            str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options,
            "-l", str(self.dir / "log"), "-w", "start",
        )  # fmt: skip
        self.started = True
        return f"postgresql://{user}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        """Stop the cluster and remove its folder; idempotent."""
        bin_dir = self.bin_dir()
        if self.started and bin_dir is not None and self.dir is not None:
            with contextlib.suppress(Exception):
                self._run(
                    str(bin_dir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate",
                    "-w", "stop",
                )  # fmt: skip
            self.started = False
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
