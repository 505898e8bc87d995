"""Helpers shared by the test_store_contract test files (moved from test_store_contract.py)."""

from __future__ import annotations

import pytest

from sync_server.store import (
    Store,
    Transaction,
    WorkflowRecord,
    open_store,
)


def is_pg(url: str) -> bool:
    return url.startswith("postgres")


def make_store(url: str) -> Store:
    # Small pools: the PostgreSQL tests open several stores and share the server.
    return open_store(url, max_size=3) if is_pg(url) else open_store(url)


@pytest.fixture
async def store(database_url):
    s = make_store(database_url)
    await s.open()
    yield s
    await s.close()


async def open_stores(url: str, n: int) -> list[Store]:
    stores = [make_store(url) for _ in range(n)]
    for s in stores:
        await s.open()
    return stores


async def close_all(stores: list[Store]) -> None:
    for s in stores:
        await s.close()


def wf(id: str, tenant: str = "t1", *, due_at: float | None = None, **kw) -> WorkflowRecord:
    return WorkflowRecord(
        id=id,
        tenant=tenant,
        name=kw.pop("name", "generate_image"),
        status="running",
        input={"prompt": "a cat"},
        created_at=kw.pop("created_at", 1.0),
        updated_at=1.0,
        due_at=due_at,
        **kw,
    )


async def create(store: Store, *records: WorkflowRecord) -> None:
    async def fn(tx: Transaction) -> None:
        for record in records:
            assert await tx.insert_workflow(record)

    await store.run(fn)


async def append(
    store: Store, workflow_id: str, n: int, *, type: str = "e", tenant: str = "t1"
) -> Transaction:
    async def fn(tx: Transaction) -> Transaction:
        current = await tx.get_workflow(tenant, workflow_id)
        assert current is not None
        for i in range(n):
            tx.append(current, type, {"i": i}, 10.0 + i)
        await tx.update_workflow(current)
        return tx

    return await store.run(fn)
