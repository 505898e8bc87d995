"""PostgreSQL for a test ``Cluster``: a private killable server, and reads of the store.

``tests/cluster.py`` describes the theory of operation. ``PrivatePostgres`` is an
``initdb`` cluster in a folder owned by the ``postgres`` user, so that a test can kill
and restart it without touching the machine's shared PostgreSQL (LESSONS). The store
reads (``read_store``, ``statuses``…) open their own short-lived connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.cluster_procs import _pid_alive, wait_until
from tests.servers import free_port


def _pg_bin() -> Path:
    """The newest installed PostgreSQL's bin folder (Debian layout; 15 on these machines)."""
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return versions[-1] if versions else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


# ------------------------------------------------------------------ PostgreSQL


class PrivatePostgres:
    """A throw-away PostgreSQL cluster in a temporary folder owned by ``postgres``.

    ``initdb``/``pg_ctl`` refuse to run as root, so they run through ``runuser -u
    postgres`` (as root) or directly (as any other user). The superuser is ``root``
    with trust authentication on 127.0.0.1 only.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tether-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "log"
        self.user = "root" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.dir.chmod(0o700)
        self.pid: int | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run(
            [*prefix, *args], capture_output=True, text=True, check=check, timeout=120
        )

    def init(self) -> PrivatePostgres:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL binaries (initdb) not found in {PG_BIN}")
        self._run(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user, "-N"
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            # A test cluster: no fsync (speed), small, quick to stop.
            conf.write("fsync = off\nfull_page_writes = off\nmax_connections = 200\n")
        return self

    def start(self) -> None:
        result = self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1",
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "start",
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stdout}{result.stderr}")
        self.pid = int((self.data / "postmaster.pid").read_text().split("\n")[0])

    def kill(self) -> bool:
        """SIGKILL the postmaster and wait until it is gone. True if it was running."""
        pid = self.pid
        if pid is None or not _pid_alive(pid):
            return False
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _pid_alive(pid), 30, "postmaster gone after SIGKILL")
        # Its backends notice the postmaster's death and exit; the next start waits for
        # them through the shared-memory check, so only the postmaster pid matters here.
        self.pid = None
        return True

    def stop_immediate(self) -> bool:
        if self.pid is None or not _pid_alive(self.pid):
            return False
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        self.pid = None
        return True

    def running(self) -> bool:
        return self.pid is not None and _pid_alive(self.pid)

    def destroy(self) -> None:
        if self.running():
            self._run(
                str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop", check=False
            )
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------ store reads


async def read_store(database_url: str) -> tuple[list[Any], list[Any]]:
    """(every event in seq order, every workflow record) of the server's store."""
    from sync_server.store import open_store

    store = open_store(database_url)
    await store.open()
    try:
        events: list[Any] = []
        after = 0
        while True:
            page = await store.read_events(after, 5000)
            if not page:
                break
            events.extend(page)
            after = page[-1].seq
        records = await store.list_workflows(limit=1_000_000)
    finally:
        await store.close()
    return events, records


def store_snapshot(database_url: str) -> tuple[list[Any], list[Any]]:
    """``read_store`` from synchronous code."""
    return asyncio.run(read_store(database_url))


def dump_events(events: list[Any], path: Path) -> None:
    """Write the event log as JSON lines (post-mortem of a failed run)."""
    import json

    with path.open("w") as out:
        for e in events:
            data = {k: v for k, v in e.data.items() if k != "workflow"}
            status = (e.data.get("workflow") or {}).get("status")
            row = [e.seq, e.tenant, e.workflow_id, e.type, round(e.at, 3), status, data]
            out.write(json.dumps(row, default=str) + "\n")


async def _count_statuses(database_url: str) -> tuple[dict[str, int], dict[str, int], int]:
    """(status -> count, tenant -> last seq, head), read with one short-lived connection."""
    import asyncpg

    from sync_server.store.postgres import parse_postgres_url

    dsn, options, _ = parse_postgres_url(database_url)
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(f'SET search_path TO "{options["schema"]}"')
        rows = await conn.fetch("SELECT status, count(*) AS n FROM workflows GROUP BY status")
        heads = await conn.fetch("SELECT tenant, max(seq) AS seq FROM events GROUP BY tenant")
        head = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events")
    finally:
        await conn.close()
    return {r["status"]: r["n"] for r in rows}, {r["tenant"]: r["seq"] for r in heads}, head


def statuses(database_url: str) -> tuple[dict[str, int], dict[str, int], int]:
    """``(status counts, tenant heads, head)``; raises if the database is unreachable."""
    return asyncio.run(_count_statuses(database_url))


def try_statuses(database_url: str) -> tuple[dict[str, int], dict[str, int], int] | None:
    with contextlib.suppress(Exception):
        return statuses(database_url)
    return None


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A fresh, running private PostgreSQL cluster, destroyed afterwards."""
    pg = PrivatePostgres().init()
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()
