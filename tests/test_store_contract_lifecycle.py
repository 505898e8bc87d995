"""Store contract: notifications, reopening, schema versions and opening.

Split from test_store_contract.py."""

from __future__ import annotations

import asyncio
import sqlite3

import asyncpg
import pytest
from conftest import PG_DSN, wait_for

from protocol import StorageError, UsageError
from sync_server.store import (
    Transaction,
    open_store,
)
from sync_server.store.postgres import parse_postgres_url
from sync_server.store.sqlite import sqlite_path
from tests import store_contract_helpers
from tests.store_contract_helpers import append, create, is_pg, make_store, wf

# The shared fixture, bound here for pytest to find (importing it by name trips F811).
store = store_contract_helpers.store
pytestmark = pytest.mark.timeout(60)


async def raw_execute(url: str, sql: str) -> None:
    """Run SQL outside the store, on its schema (to set up foreign states)."""
    if is_pg(url):
        dsn, options, _ = parse_postgres_url(url)
        conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    else:
        conn = sqlite3.connect(sqlite_path(url), isolation_level=None)
        try:
            conn.execute(sql)
        finally:
            conn.close()


# -- notifications -----------------------------------------------------------------
async def test_listen_and_notify(database_url):
    # On PostgreSQL the notification crosses instances; SQLite stays in-process.
    sender = make_store(database_url)
    await sender.open()
    receiver = make_store(database_url) if is_pg(database_url) else sender
    if receiver is not sender:
        await receiver.open()
    try:
        got: list[tuple[str, str]] = []

        def on_custom(payload: str) -> None:
            got.append(("custom", payload))

        receiver.listen("custom", on_custom)
        receiver.listen("events", lambda payload: got.append(("events", payload)))
        await create(sender, wf("a"))

        async def fn(tx: Transaction) -> None:
            current = await tx.get_workflow("t1", "a")
            assert current is not None
            tx.append(current, "e", {}, 1.0)
            await tx.update_workflow(current)
            tx.notify("custom", "a:b")

        await sender.run(fn)
        await wait_for(lambda: len(got) >= 2, 5, message="notifications")
        assert ("custom", "a:b") in got and ("events", "1") in got

        async def only_notify(tx: Transaction) -> None:
            tx.notify("custom", "second")

        receiver.unlisten("custom", on_custom)
        receiver.listen("custom", lambda payload: got.append(("again", payload)))
        await sender.run(only_notify)
        await wait_for(lambda: ("again", "second") in got, 5, message="notify without events")
        assert ("custom", "second") not in got
    finally:
        await sender.close()
        if receiver is not sender:
            await receiver.close()


# -- lifecycle -------------------------------------------------------------------
async def test_reopen_keeps_everything_and_migrations_are_idempotent(database_url):
    store = make_store(database_url)
    await store.open()
    await store.open()  # idempotent
    await create(store, wf("a", due_at=3.0))
    await append(store, "a", 5)

    async def client(tx: Transaction) -> None:
        await tx.lock_client("t1", "s1", "c1")
        await tx.record_mutations("t1", "c1", [(1, "applied", None)], 1, 1.0)

    await store.run(client)
    await store.close()
    await store.close()  # idempotent

    reopened = make_store(database_url)
    async with reopened:
        assert await reopened.head() == 5
        assert [e.seq for e in await reopened.read_events(0, 10)] == [1, 2, 3, 4, 5]
        assert await reopened.get_client("t1", "c1") == ("s1", 1)
        a = await reopened.get_workflow("t1", "a")
        assert a is not None and a.version == 5 and a.due_at == 3.0
        tx = await append(reopened, "a", 1)
        assert [e.seq for e in tx.committed_events] == [6]


async def test_newer_schema_is_refused(database_url):
    store = make_store(database_url)
    await store.open()
    await store.close()
    await raw_execute(
        database_url, "INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)"
    )
    with pytest.raises(StorageError, match="newer"):
        await make_store(database_url).open()


async def test_store_not_open_is_usage_error(database_url):
    store = make_store(database_url)
    with pytest.raises(UsageError):
        await store.head()
    with pytest.raises(UsageError):
        await store.run(lambda tx: asyncio.sleep(0))


def test_open_store_rejects_unknown_schemes():
    for url in ("mysql://localhost/db", "sync.db", "", "http://x"):
        with pytest.raises(UsageError, match="unsupported database URL"):
            open_store(url)
    with pytest.raises(UsageError):
        open_store("sqlite://relative-without-third-slash.db")
    with pytest.raises(UsageError):
        open_store("sqlite:///:memory:")
    with pytest.raises(UsageError, match="schema"):
        open_store(f"{PG_DSN}?schema=bad-name;drop")


def test_open_store_chooses_backend_by_scheme(tmp_path):
    from sync_server.store.postgres import PostgresStore
    from sync_server.store.sqlite import SqliteStore

    assert isinstance(open_store(f"sqlite:///{tmp_path}/x.db"), SqliteStore)
    assert isinstance(open_store("sqlite:///relative/x.db"), SqliteStore)
    assert sqlite_path("sqlite:///relative/x.db") == "relative/x.db"
    assert sqlite_path("sqlite:////abs/x.db?mode=rw") == "/abs/x.db"
    pg = open_store("postgresql://u:secret@db:6543/app?schema=s1&sslmode=disable&max_size=4")
    assert isinstance(pg, PostgresStore) and pg.schema == "s1"
    assert isinstance(open_store("postgres://db/app"), PostgresStore)
    dsn, options, label = parse_postgres_url("postgresql://u:secret@db:6543/app?schema=s1&x=1")
    assert dsn == "postgresql://u:secret@db:6543/app?x=1"
    assert options == {"schema": "s1"} and label == "db:6543/app"
