"""SQLite-only storage behaviour: opening, and writers from two stores on one file."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable

import pytest

from protocol import StorageError
from sync_server.store import Transaction, WorkflowRecord
from sync_server.store.migrations import SQLITE_MIGRATIONS
from sync_server.store.sqlite import SqliteStore, sqlite_path

pytestmark = pytest.mark.timeout(30)


async def test_unopenable_path_is_storage_error(tmp_path):
    store = SqliteStore(f"sqlite:///{tmp_path}/missing-dir/sync.db")
    with pytest.raises(StorageError, match="cannot open SQLite database"):
        await store.open()
    await store.close()


async def test_wal_and_full_sync(sqlite_url):
    async with SqliteStore(sqlite_url) as store:
        assert store._writer is not None
        assert store._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


async def test_second_store_waits_without_blocking_the_loop(sqlite_url):
    """A write lock held by another connection is waited for asynchronously, and a
    writer that waits past ``busy_timeout`` gets a StorageError, not a hang."""
    holder, waiter = SqliteStore(sqlite_url), SqliteStore(sqlite_url, busy_timeout=0.3)
    await holder.open()
    await waiter.open()
    try:
        release = asyncio.Event()
        holding = asyncio.Event()

        async def hold(tx: Transaction) -> None:
            await tx.insert_workflow(WorkflowRecord("a", "t", "n", "running"))
            holding.set()
            await release.wait()

        async def insert_b(tx: Transaction) -> bool:
            return await tx.insert_workflow(WorkflowRecord("b", "t", "n", "running"))

        held = asyncio.create_task(holder.run(hold))
        await holding.wait()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while not release.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        with pytest.raises(StorageError, match="cannot start a write"):
            await waiter.run(insert_b)
        assert ticks >= 10  # the loop kept running while the waiter waited

        # Once the holder commits, the other store writes normally.
        late = asyncio.create_task(waiter.run(insert_b))
        release.set()
        await held
        assert await late is True
        await tick_task
        assert await waiter.get_workflow("t", "a") is not None
        assert await holder.get_workflow("t", "b") is not None
    finally:
        await holder.close()
        await waiter.close()


async def test_schema_versions_recorded_once(sqlite_url):
    for _ in range(2):
        async with SqliteStore(sqlite_url):
            pass
    conn = sqlite3.connect(sqlite_path(sqlite_url))
    try:
        found = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert found == [(v,) for v in sorted(v for v, _ in SQLITE_MIGRATIONS)]
    finally:
        conn.close()


def _slow_fsync(store: SqliteStore) -> tuple[asyncio.Event, threading.Event, list[bool]]:
    """Make the store's COMMIT block (in whatever thread runs it) until released: a slow
    fsync. Returns (the COMMIT has started, release it, whether each was released in time).
    """
    loop = asyncio.get_running_loop()
    started, release, in_time = asyncio.Event(), threading.Event(), []
    commit: Callable[[sqlite3.Connection], None] = store._commit_sync

    def slow_commit(conn: sqlite3.Connection) -> None:
        loop.call_soon_threadsafe(started.set)
        in_time.append(release.wait(timeout=5))  # on the loop thread this stalls the loop
        commit(conn)

    store._commit_sync = slow_commit  # type: ignore[method-assign]
    return started, release, in_time


async def _insert_a(tx: Transaction) -> bool:
    return await tx.insert_workflow(WorkflowRecord("a", "t", "n", "running"))


async def test_commit_runs_off_the_event_loop(sqlite_url):
    """The server's COMMIT (an fsync with synchronous=FULL) runs in a worker thread: while
    a slow fsync holds it, loop timers fire and reads are answered."""
    async with SqliteStore(sqlite_url) as store:
        started, release, in_time = _slow_fsync(store)
        writing = asyncio.create_task(store.run(_insert_a))
        await asyncio.wait_for(started.wait(), 10)
        ticked = asyncio.Event()
        asyncio.get_running_loop().call_later(0.001, ticked.set)
        await ticked.wait()  # a loop timer fires while the COMMIT is in its fsync
        assert await store.get_workflow("t", "a") is None  # not committed yet
        release.set()
        assert await writing is True
        assert in_time == [True]  # released by the loop, not by the hook's timeout
        assert await store.get_workflow("t", "a") is not None


async def test_cancelled_during_commit_waits_for_it_and_keeps_one_writer(sqlite_url):
    """A caller cancelled while its COMMIT is in the worker thread still holds the write
    lock until the COMMIT returns; then the cancellation reaches it."""
    async with SqliteStore(sqlite_url) as store:
        started, release, in_time = _slow_fsync(store)
        writing = asyncio.create_task(store.run(_insert_a))
        await asyncio.wait_for(started.wait(), 10)
        writing.cancel()
        assert store._lock.locked()  # the single writer still holds the file

        async def insert_b(tx: Transaction) -> bool:
            return await tx.insert_workflow(WorkflowRecord("b", "t", "n", "running"))

        second = asyncio.create_task(store.run(insert_b))
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await writing
        assert await second is True
        assert in_time == [True, True]
        assert await store.get_workflow("t", "a") is not None  # the COMMIT completed
