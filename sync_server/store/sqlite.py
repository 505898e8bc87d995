"""The SQLite backend: one file, one process's event loop, stdlib ``sqlite3``.

Theory of operation
-------------------
Statements run synchronously on the event-loop thread: one takes microseconds, far
less than a hop to a worker thread would. COMMIT is the exception: with
``synchronous=FULL`` it waits for an fsync (milliseconds, far more on a busy disk), so it
runs on a dedicated one-thread executor while the loop goes on serving everyone else.

* **Writes** go through one writer connection, guarded by an ``asyncio.Lock`` held for a
  whole unit of work: ``run(fn)`` takes the lock, issues ``BEGIN IMMEDIATE`` (the
  database write lock, so two *processes* on one file are also serialised), awaits
  ``fn(tx)``, writes the buffered events and commits (in the commit thread; the lock is
  held until the COMMIT has returned, so the single writer stays single, and a
  cancellation that arrives meanwhile waits for it). ``BEGIN IMMEDIATE`` is retried
  asynchronously while another process holds the file, so the loop never blocks on it.
* **Reads** use a second connection in autocommit mode. WAL lets them proceed while a
  write transaction is open, and they see committed data only.
* **Gapless order** (SPEC promise 4): positions are taken as ``MAX(seq) + 1 …`` as the
  last statements before COMMIT while the write lock is held, so positions are assigned
  in commit order and a reader can never see seq N+1 without seq N.
* **Durability** (SPEC promise 1): WAL with ``synchronous=FULL``; a commit has reached
  the disk when ``run`` returns.
* **Notifications** stay inside the process: after commit, ``Store._dispatch`` is called
  for each queued notification and for ``events`` with the new head.

``attempts`` of ``run`` is accepted for the interface's sake: SQLite has no deadlocks
between transactions here, since writers are strictly serialised.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from protocol import StorageError, UsageError
from sync_server.store import rows, statements
from sync_server.store.base import (
    Store,
    StoredEvent,
    Transaction,
    WorkflowKey,
)
from sync_server.store.dialect import SQLITE, Sql
from sync_server.store.migrations import migrate_sqlite
from sync_server.store.sqlite_transaction import SqliteSql, SqliteTransaction

__all__ = ["SqliteStore", "SqliteTransaction", "sqlite_path"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def sqlite_path(url: str) -> str:
    """The file path in a ``sqlite:///path`` URL (``sqlite:////abs/path`` is absolute).

    Args:
        url: the database URL; a query string is ignored.

    Returns:
        The path, relative to the working directory unless it starts with ``/``.

    Raises:
        UsageError: the URL is not of the form ``sqlite:///path``.
    """
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise UsageError(f"SQLite URL must look like sqlite:///path/to/file.db, got {url!r}")
    path = url[len(prefix) :].split("?", 1)[0]
    if not path or path == ":memory:":
        raise UsageError(f"SQLite URL needs a file path (sqlite:///path/to/file.db), got {url!r}")
    return path


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class SqliteStore(SqliteSql, Store):
    """The event store on one SQLite file.

    Args:
        url: ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.
        busy_timeout: seconds to wait for another process holding the file's write lock.
    """

    def __init__(self, url: str, *, busy_timeout: float = 10.0) -> None:
        super().__init__()
        self.url = url
        self.path = sqlite_path(url)
        self._busy_timeout = busy_timeout
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._committer: ThreadPoolExecutor | None = None

    def _connect(self, busy_ms: int) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    async def open(self) -> None:
        """Open the file (creating it), switch to WAL and apply pending migrations.

        Raises:
            StorageError: the file cannot be opened or its schema is newer than this code.
        """
        if self._writer is not None:
            return
        try:
            writer = self._connect(int(self._busy_timeout * 1000))
            try:
                migrate_sqlite(writer, self.path)
                # The writer never waits inside SQLite: _begin retries BEGIN IMMEDIATE
                # asynchronously. Once it holds the write lock (WAL), nothing else waits.
                writer.execute("PRAGMA busy_timeout = 0")
                reader = self._connect(int(self._busy_timeout * 1000))
            except BaseException:
                writer.close()
                raise
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        self._writer, self._reader = writer, reader
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="tether-sqlite-commit")

    async def close(self) -> None:
        """Wait for the running unit of work, then close both connections; idempotent."""
        async with self._lock:
            for conn in (self._writer, self._reader):
                if conn is not None:
                    conn.close()
            self._writer = self._reader = None
            committer, self._committer = self._committer, None
            if committer is not None:
                committer.shutdown(wait=False)

    def _sql_conn(self) -> sqlite3.Connection:
        if self._reader is None:
            raise UsageError("the store is not open (call await store.open() first)")
        return self._reader

    def _require_writer(self) -> sqlite3.Connection:
        if self._writer is None:
            raise UsageError("the store is not open (call await store.open() first)")
        return self._writer

    async def _begin(self, conn: sqlite3.Connection) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._busy_timeout
        delay = 0.001
        # Another connection (another process, or another store in this one) may hold
        # the write lock. Wait for it *asynchronously*: SQLite's busy handler would block
        # the event loop, and with it a holder that runs on this very loop.
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.Error as exc:
                if not _is_busy(exc) or loop.time() > deadline:
                    raise StorageError(f"SQLite cannot start a write: {exc}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("SQLite rollback failed")

    async def run(self, fn: Callable[[Transaction], Awaitable[T]], *, attempts: int = 5) -> T:
        """Run ``fn`` in one write transaction and commit.

        Args:
            fn: the unit of work; awaited while the write lock is held.
            attempts: unused on SQLite (writers are serialised, so nothing to retry).

        Returns:
            What ``fn`` returned.

        Raises:
            StorageError: SQLite failed; nothing was written.
        """
        cancelled = False
        async with self._lock:
            conn = self._require_writer()
            await self._begin(conn)
            tx = SqliteTransaction(conn, self.round_trips)
            self.round_trips.count += 2  # BEGIN and COMMIT
            try:
                result = await fn(tx)
                head, stored = tx._write_events() if tx.pending_events else (0, [])
                cancelled = await self._commit(conn)
            except BaseException as exc:
                self._rollback(conn)
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"SQLite commit failed: {exc}") from exc
                raise
        tx.committed_events = stored
        if stored:
            self._committed(stored)
        for channel, payload in tx.notifications:
            self._dispatch(channel, payload)
        if stored:
            self._dispatch("events", str(head))
        if cancelled:  # committed all the same: listeners heard of it, now the caller
            raise asyncio.CancelledError
        return result

    async def _commit(self, conn: sqlite3.Connection) -> bool:
        """COMMIT in the commit thread (its fsync never stalls the loop); returns whether
        the caller was cancelled meanwhile (the COMMIT itself cannot be stopped halfway,
        so it is waited for, with the write lock held, and then the cancellation goes on).
        """
        assert self._committer is not None
        done = asyncio.get_running_loop().run_in_executor(self._committer, self._commit_sync, conn)
        cancelled = False
        while not done.done():
            try:
                await asyncio.wait([done])  # never cancels ``done`` itself
            except asyncio.CancelledError:
                cancelled = True
        if cancelled and done.exception() is not None:
            raise asyncio.CancelledError from done.exception()
        done.result()
        return cancelled

    @staticmethod
    def _commit_sync(conn: sqlite3.Connection) -> None:
        """The COMMIT with its fsync; runs in the commit thread."""
        conn.execute("COMMIT")

    async def _one_shot(self, work: Callable[[Sql], Awaitable[T]]) -> T:
        """A single-statement write (claims, outbox upkeep): a unit of work of its own
        on the single writer."""
        return await self.run(work)

    async def _write(self, work: Callable[[SqliteTransaction], T]) -> T:
        """A one-shot write of synchronous statements (lease upkeep) in its own short
        transaction."""

        async def unit(tx: Transaction) -> T:
            assert isinstance(tx, SqliteTransaction)
            return work(tx)

        return await self.run(unit)

    # -- reads ------------------------------------------------------------------
    async def read_events(
        self, after: int, limit: int, *, tenant: str | None = None
    ) -> list[StoredEvent]:
        """Events with ``seq > after`` in seq order (of one tenant, or all)."""
        if tenant is None:
            found = self._all(SQLITE.sql(statements.READ_EVENTS), (after, limit))
        else:
            found = self._all(SQLITE.sql(statements.READ_TENANT_EVENTS), (tenant, after, limit))
        return [rows.event_from_row(row) for row in found]

    async def head(self, tenant: str | None = None) -> int:
        """The highest committed ``seq`` (0 for an empty log), of all or one tenant."""
        if tenant is not None:
            return int(self._one(statements.SQLITE_TENANT_HEAD, (tenant,))[0])
        return int(self._one("SELECT COALESCE(MAX(seq), 0) FROM events")[0])

    # -- leases -------------------------------------------------------------------
    async def renew_leases(
        self, owner: str, leases: dict[WorkflowKey, int], until: float
    ) -> set[WorkflowKey]:
        """Extend leases (key -> fence) still held with the same fence; returns those keys."""
        if not leases:
            return set()

        def work(tx: SqliteTransaction) -> set[WorkflowKey]:
            renewed: set[WorkflowKey] = set()
            for key, fence in leases.items():
                cur = tx._execute(
                    "UPDATE workflows SET lease_until = ? "
                    "WHERE id = ? AND tenant = ? AND lease_owner = ? AND fence = ?",
                    (until, key.id, key.tenant, owner, fence),
                )
                if cur.rowcount:
                    renewed.add(key)
            return renewed

        return await self._write(work)

    async def release_leases(self, owner: str, leases: dict[WorkflowKey, int]) -> None:
        """Give up leases (key -> fence) still held with the same fence."""
        if not leases:
            return

        def work(tx: SqliteTransaction) -> None:
            tx._executemany(
                "UPDATE workflows SET lease_owner = NULL, lease_until = NULL "
                "WHERE id = ? AND tenant = ? AND lease_owner = ? AND fence = ?",
                [(key.id, key.tenant, owner, fence) for key, fence in leases.items()],
            )

        await self._write(work)
