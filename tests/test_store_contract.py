"""The storage contract, run on SQLite and PostgreSQL (``database_url`` is parametrized).

Every backend must pass the same suite: order, tenant filtering, gapless positions
under concurrent writers, rollback, exactly-once bookkeeping, leases with fencing,
outbox, dead letters, breakers, notifications and restart durability.

Split by topic: this file (events, clients, workflows), test_store_contract_leases.py,
test_store_contract_lifecycle.py; shared helpers in store_contract_helpers.py.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import pytest
from conftest import wait_for

from protocol import Forbidden, StorageError
from sync_server.store import (
    Transaction,
)
from sync_server.store.base import WorkflowKey
from tests import store_contract_helpers
from tests.store_contract_helpers import append, close_all, create, make_store, open_stores, wf

# The shared fixture, bound here for pytest to find (importing it by name trips F811).
store = store_contract_helpers.store
pytestmark = pytest.mark.timeout(60)


# -- events ----------------------------------------------------------------------
async def test_append_read_order_and_tenant_filter(store):
    await create(store, wf("a", "t1"), wf("b", "t2"))
    await append(store, "a", 3)
    await append(store, "b", 2, tenant="t2")
    await append(store, "a", 1)

    events = await store.read_events(0, 100)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.workflow_id for e in events] == ["a", "a", "a", "b", "b", "a"]
    assert events[0].data == {"i": 0} and events[0].at == 10.0 and events[0].type == "e"
    assert [e.seq for e in await store.read_events(0, 100, tenant="t2")] == [4, 5]
    assert [e.seq for e in await store.read_events(4, 100, tenant="t1")] == [6]
    assert [e.seq for e in await store.read_events(2, 2)] == [3, 4]
    assert await store.read_events(6, 100) == []
    wire = events[0].to_wire()
    assert (wire.seq, wire.workflow_id, wire.data) == (1, "a", {"i": 0})


async def test_wf_seq_numbering_and_workflow_events(store):
    await create(store, wf("a"), wf("b"))
    await append(store, "a", 2)
    await append(store, "b", 1)
    await append(store, "a", 2)
    a_events = await store.read_workflow_events("t1", "a")
    assert [e.wf_seq for e in a_events] == [1, 2, 3, 4]
    assert [e.seq for e in a_events] == [1, 2, 4, 5]
    record = await store.get_workflow("t1", "a")
    assert record is not None and record.version == 4
    assert await store.read_workflow_events("t1", "nope") == []


async def test_head_and_committed_events(store):
    assert await store.head() == 0
    await create(store, wf("a"))
    assert await store.head() == 0
    tx = await append(store, "a", 3)
    assert [e.seq for e in tx.committed_events] == [1, 2, 3]
    assert [e.wf_seq for e in tx.committed_events] == [1, 2, 3]
    assert tx.committed_events[2].data == {"i": 2}
    assert await store.head() == 3
    tx = await append(store, "a", 1)
    assert [e.seq for e in tx.committed_events] == [4]
    assert await store.head() == 4


async def test_rollback_on_exception_writes_nothing(store):
    await create(store, wf("a"))
    await append(store, "a", 2)
    seen: list[str] = []
    store.listen("events", seen.append)
    store.listen("custom", seen.append)
    captured: list[Transaction] = []

    async def fn(tx: Transaction) -> None:
        captured.append(tx)
        assert await tx.insert_workflow(wf("b"))
        current = await tx.get_workflow("t1", "a")
        assert current is not None
        tx.append(current, "x", {}, 1.0)
        current.status = "failed"
        await tx.update_workflow(current)
        await tx.lock_client("t1", "s1", "c1")
        await tx.record_mutations("t1", "c1", [(1, "applied", None)], 1, 1.0)
        await tx.enqueue_outbox("hook", {"x": 1}, event_seq=None, max_retries=3, at=1.0)
        tx.notify("custom", "should not arrive")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await store.run(fn)

    assert await store.head() == 2
    assert len(await store.read_events(0, 100)) == 2
    assert captured[0].committed_events == []
    assert await store.get_workflow("t1", "b") is None
    a = await store.get_workflow("t1", "a")
    assert a is not None and a.status == "running" and a.version == 2
    assert await store.get_client("t1", "c1") is None
    assert await store.outbox_stats(5.0) == (0, 0.0)
    # A later commit works and notifications of the failed unit never show up.
    await append(store, "a", 1)
    await wait_for(lambda: "3" in seen, 5, message="events notification")
    assert "should not arrive" not in seen


async def test_conflicting_wf_seq_is_storage_error_and_rolls_back(store):
    await create(store, wf("a"))
    await append(store, "a", 2)

    async def stale(tx: Transaction) -> None:
        current = await tx.get_workflow("t1", "a")
        assert current is not None
        current.version = 0  # a stale writer reusing wf_seq 1
        tx.append(current, "dup", {}, 1.0)
        await tx.update_workflow(current)

    with pytest.raises(StorageError):
        await store.run(stale)
    assert await store.head() == 2
    a = await store.get_workflow("t1", "a")
    assert a is not None and a.version == 2


async def test_gapless_under_concurrent_writers(database_url):
    writers, per_writer = 8, 2000
    stores = await open_stores(database_url, writers)
    reader = make_store(database_url)
    await reader.open()
    try:
        await create(stores[0], *(wf(f"w{n}", f"t{n % 2}") for n in range(writers)))
        done = asyncio.Event()
        finished = 0

        async def writer(n: int) -> None:
            nonlocal finished
            rng = random.Random(n)
            store, sent = stores[n], 0
            while sent < per_writer:
                size = min(per_writer - sent, rng.choice([1, 3, 10, 40, 100]))
                pause = rng.random() < 0.3
                start = sent

                async def fn(tx: Transaction, size=size, pause=pause, start=start) -> None:
                    current = await tx.get_workflow(f"t{n % 2}", f"w{n}")
                    assert current is not None
                    current.progress = start / per_writer
                    await tx.update_workflow(current)
                    if pause:  # other writes done, events not yet positioned: overlap
                        await asyncio.sleep(rng.uniform(0, 0.004))
                    for i in range(size):
                        tx.append(current, "e", {"w": n, "i": start + i}, 1.0)
                    await tx.update_workflow(current)

                await store.run(fn)
                sent += size
            finished += 1
            if finished == writers:
                done.set()

        seen: list[tuple[int, int]] = []
        cursor = 0

        async def read() -> None:
            nonlocal cursor
            rng = random.Random(99)
            total = writers * per_writer
            while cursor < total:
                page = await reader.read_events(cursor, rng.choice([7, 50, 500]))
                for event in page:
                    assert event.seq == cursor + 1, f"gap or disorder after {cursor}: {event.seq}"
                    cursor = event.seq
                    seen.append((event.data["w"], event.data["i"]))
                if not page:
                    if done.is_set() and cursor < total:
                        assert await reader.head() == cursor, "head ahead of readable events"
                    await asyncio.sleep(0.001)  # poll: nothing new yet

        await asyncio.wait_for(
            asyncio.gather(read(), *(writer(n) for n in range(writers))), timeout=50
        )
        assert len(seen) == len(set(seen)) == writers * per_writer
        by_writer: dict[int, list[int]] = defaultdict(list)
        for w, i in seen:
            by_writer[w].append(i)
        for w in range(writers):
            assert by_writer[w] == list(range(per_writer)), f"writer {w} out of order"
        assert await reader.head() == writers * per_writer
        for n in range(writers):
            wf_seqs = [e.wf_seq for e in await reader.read_workflow_events(f"t{n % 2}", f"w{n}")]
            assert wf_seqs == list(range(1, per_writer + 1))
    finally:
        await reader.close()
        await close_all(stores)


# -- clients ---------------------------------------------------------------------
async def test_clients_and_mutation_results(store):
    async def first(tx: Transaction) -> int:
        last = await tx.lock_client("t1", "s1", "c1")
        assert await tx.mutation_results("t1", "c1", [1, 2]) == {}
        await tx.record_mutations(
            "t1", "c1", [(1, "applied", None), (2, "rejected", "bad")], 2, 5.0
        )
        return last

    assert await store.run(first) == 0
    assert await store.get_client("t1", "c1") == ("s1", 2)
    assert await store.get_client("t1", "nobody") is None

    async def second(tx: Transaction) -> tuple[int, dict[int, tuple[str, str | None]]]:
        last = await tx.lock_client("t1", "s1", "c1")
        results = await tx.mutation_results("t1", "c1", [1, 2, 3])
        await tx.record_mutations("t1", "c1", [], 2, 6.0)
        return last, results

    last, results = await store.run(second)
    assert last == 2
    assert results == {1: ("applied", None), 2: ("rejected", "bad")}

    async def empty_ids(tx: Transaction) -> dict[int, tuple[str, str | None]]:
        return await tx.mutation_results("t1", "c1", [])

    assert await store.run(empty_ids) == {}

    # Client ids are namespaced by tenant: t2's "c1" is a fresh client of its own.
    async def other_tenant(tx: Transaction) -> int:
        return await tx.lock_client("t2", "s1", "c1")

    assert await store.run(other_tenant) == 0
    assert await store.get_client("t2", "c1") == ("s1", 0)
    assert await store.get_client("t1", "c1") == ("s1", 2)

    # Within a tenant, a client id belongs to the subject that first used it.
    async def other_subject(tx: Transaction) -> int:
        return await tx.lock_client("t1", "s2", "c1")

    with pytest.raises(Forbidden, match="another subject"):
        await store.run(other_subject)
    assert await store.get_client("t1", "c1") == ("s1", 2)

    # Mutation results are the tenant's own as well.
    async def results_of_t2(tx: Transaction) -> dict[int, tuple[str, str | None]]:
        return await tx.mutation_results("t2", "c1", [1, 2])

    assert await store.run(results_of_t2) == {}


# -- workflows -------------------------------------------------------------------
async def test_workflow_insert_update_get_list(store):
    await create(store, wf("a", created_at=1.0), wf("b", "t2", created_at=2.0))

    async def duplicate(tx: Transaction) -> bool:
        return await tx.insert_workflow(wf("a", "t1", name="other"))

    async def same_id_other_tenant(tx: Transaction) -> bool:
        return await tx.insert_workflow(wf("a", "t2", name="theirs"))

    assert await store.run(duplicate) is False
    assert await store.run(same_id_other_tenant) is True
    a = await store.get_workflow("t1", "a")
    assert a is not None and a.tenant == "t1" and a.name != "other"
    theirs = await store.get_workflow("t2", "a")
    assert theirs is not None and theirs.name == "theirs"
    assert await store.workflow_tenants("a") == ["t1", "t2"]
    assert await store.workflow_tenants("a", limit=1) == ["t1"]
    assert await store.workflow_tenants("zzz") == []

    async def update(tx: Transaction) -> None:
        current = await tx.get_workflow("t1", "a", lock=True)
        assert current is not None
        current.status = "completed"
        current.state = {"steps": {"render": {"status": "succeeded", "attempts": 2}}}
        current.result = {"url": "https://x/y.png"}
        current.progress = 1.0
        current.error = None
        current.due_at = None
        current.updated_at = 3.5
        await tx.update_workflow(current)

    await store.run(update)
    a = await store.get_workflow("t1", "a")
    assert a is not None
    assert a.status == "completed" and a.progress == 1.0 and a.updated_at == 3.5
    assert a.state["steps"]["render"]["attempts"] == 2
    assert a.result == {"url": "https://x/y.png"} and a.input == {"prompt": "a cat"}
    assert await store.get_workflow("t1", "zzz") is None

    await create(store, wf("c", created_at=3.0))
    assert [w.id for w in await store.list_workflows()] == ["c", "b", "a", "a"]
    assert [w.id for w in await store.list_workflows(tenant="t1")] == ["c", "a"]
    assert [w.id for w in await store.list_workflows(statuses=["completed"])] == ["a"]
    listed = await store.list_workflows(tenant="t1", statuses=["running", "failed"])
    assert [w.id for w in listed] == ["c"]
    assert [w.id for w in await store.list_workflows(limit=1)] == ["c"]


async def test_insert_workflows_batch(store):
    await create(store, wf("old", "t1"))

    async def batch(tx: Transaction) -> set[WorkflowKey]:
        assert await tx.insert_workflows([]) == set()
        return await tx.insert_workflows(
            [wf("n1", due_at=2.0), wf("old", "t2"), wf("old"), wf("n2", result={"k": [1]})]
        )

    # "old" exists for t1 only: t2's "old" is a new workflow, t1's is skipped.
    assert await store.run(batch) == {("t1", "n1"), ("t2", "old"), ("t1", "n2")}
    old = await store.get_workflow("t1", "old")
    assert old is not None and old.tenant == "t1"
    assert (await store.get_workflow("t2", "old")) is not None
    n1, n2 = await store.get_workflow("t1", "n1"), await store.get_workflow("t1", "n2")
    assert n1 is not None and n1.due_at == 2.0 and n1.input == {"prompt": "a cat"}
    assert n2 is not None and n2.result == {"k": [1]} and n2.due_at is None

    async def single(tx: Transaction) -> set[WorkflowKey]:
        return await tx.insert_workflows([wf("n3")])

    assert await store.run(single) == {("t1", "n3")}
