"""PostgreSQL-only storage behaviour: connecting, concurrent migration, the LISTEN link,
deadlock retries."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import asyncpg
import pytest
from conftest import PG_DSN, wait_for

from protocol import StorageError
from sync_server.store import Transaction, WorkflowRecord, open_store
from sync_server.store.migrations import POSTGRES_MIGRATIONS
from sync_server.store.postgres import PostgresStore, parse_postgres_url

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]


async def test_closed_port_is_a_quick_storage_error():
    store = open_store("postgresql://127.0.0.1:1/test?connect_timeout=2&schema=x")
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot connect to PostgreSQL at 127\.0\.0\.1:1/test"):
        await store.open()
    assert time.monotonic() - started < 3
    await store.close()


async def test_password_is_not_in_the_error(unused_tcp_port):
    store = open_store(f"postgresql://u:hunter2@127.0.0.1:{unused_tcp_port}/test")
    with pytest.raises(StorageError) as info:
        await store.open()
    assert "hunter2" not in str(info.value)


async def test_concurrent_first_open_of_a_fresh_schema(pg_url):
    stores = [PostgresStore(pg_url, max_size=2) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        dsn, options, _ = parse_postgres_url(pg_url)
        conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
            assert [row[0] for row in versions] == sorted(v for v, _ in POSTGRES_MIGRATIONS)
            assert await conn.fetchval("SELECT seq FROM event_head") == 0
        finally:
            await conn.close()
        assert [await s.head() for s in stores] == [0, 0, 0, 0]
    finally:
        for s in stores:
            await s.close()


async def test_listener_reconnects_and_announces_it(pg_url):
    store = PostgresStore(pg_url, max_size=2)
    await store.open()
    try:
        reconnects: list[int] = []
        got: list[str] = []
        store.on_reconnect(lambda: reconnects.append(1))
        store.listen("custom", got.append)

        async def ping(tx: Transaction) -> None:
            tx.notify("custom", "ping")

        await store.run(ping)
        await wait_for(lambda: got == ["ping"], 5, message="first notification")

        conn = await asyncpg.connect(PG_DSN)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1",
                f"tether-listen:{store.schema}",
            )
        finally:
            await conn.close()
        assert killed == 1
        await wait_for(lambda: reconnects, 10, message="__reconnect__ after link loss")

        await store.run(ping)
        await wait_for(lambda: got == ["ping", "ping"], 5, message="notification after reconnect")
    finally:
        await store.close()


async def test_deadlock_is_retried_in_a_fresh_transaction(pg_url):
    store = PostgresStore(pg_url, max_size=3)
    await store.open()
    try:

        async def create(tx: Transaction) -> None:
            for wid in ("a", "b"):
                await tx.insert_workflow(WorkflowRecord(wid, "t", "n", "running"))

        await store.run(create)
        attempts: Counter[str] = Counter()
        both_hold_first = asyncio.Barrier(2)

        async def cross(name: str, first: str, second: str) -> None:
            async def fn(tx: Transaction) -> None:
                attempts[name] += 1
                row = await tx.get_workflow("t", first, lock=True)
                assert row is not None
                if attempts[name] == 1:
                    await both_hold_first.wait()
                row2 = await tx.get_workflow("t", second, lock=True)
                assert row2 is not None
                row2.progress += 0.5
                await tx.update_workflow(row2)

            await store.run(fn)

        await asyncio.gather(cross("x", "a", "b"), cross("y", "b", "a"))
        assert sorted(attempts.values()) == [1, 2]
        a, b = await store.get_workflow("t", "a"), await store.get_workflow("t", "b")
        assert a is not None and b is not None and a.progress == b.progress == 0.5
    finally:
        await store.close()


async def test_unretryable_database_error_is_storage_error(pg_url):
    store = PostgresStore(pg_url, max_size=2)
    await store.open()
    try:
        calls = 0

        async def bad(tx: Transaction) -> None:
            nonlocal calls
            calls += 1
            await tx.insert_workflow(WorkflowRecord("a", "t", None, "running"))  # type: ignore[arg-type]

        with pytest.raises(StorageError):
            await store.run(bad)
        assert calls == 1
    finally:
        await store.close()


async def test_a_connection_broken_mid_operation_is_a_storage_error(pg_url, monkeypatch):
    # Regression (chaos test, PostgreSQL restart): asyncpg raised InternalClientError
    # ("cannot switch to state 15; another operation (2) is in progress") when the pool
    # reset a connection that broke mid-operation; it escaped unconverted, so /v1/pull
    # and /readyz answered a bare 500 instead of a clear 503 StorageError.
    store = PostgresStore(pg_url, max_size=2)
    await store.open()
    try:
        broken = asyncpg.InternalClientError(
            "cannot switch to state 15; another operation (2) is in progress"
        )

        class Broken:
            async def fetch(self, *args):
                raise broken

            fetchval = fetch

        monkeypatch.setattr(store, "_executor", Broken)
        with pytest.raises(StorageError, match="another operation"):
            await store.read_events(0, 10)
        with pytest.raises(StorageError, match="another operation"):
            await store.head()
        monkeypatch.undo()

        async def unit(tx):
            raise broken

        with pytest.raises(StorageError, match="another operation"):
            await store.run(unit)
        assert await store.head() == 0  # the store still works afterwards
    finally:
        await store.close()
