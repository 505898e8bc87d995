"""The storage contract, run on SQLite and PostgreSQL (``database_url`` is parametrized).

Every backend must pass the same suite: order, tenant filtering, gapless positions
under concurrent writers, rollback, exactly-once bookkeeping, leases with fencing,
outbox, dead letters, breakers, notifications and restart durability.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import defaultdict

import asyncpg
import pytest
from conftest import PG_DSN, wait_for

from protocol import Forbidden, StorageError, UsageError
from sync_server.store import (
    BreakerRecord,
    DlqEntry,
    Store,
    Transaction,
    WorkflowRecord,
    open_store,
)
from sync_server.store.base import WorkflowKey
from sync_server.store.postgres import parse_postgres_url
from sync_server.store.sqlite import sqlite_path

pytestmark = pytest.mark.timeout(60)


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


# -- leases ----------------------------------------------------------------------
async def test_claim_respects_due_at_and_live_leases(store):
    await create(
        store,
        wf("due1", due_at=5.0),
        wf("due2", due_at=1.0),
        wf("later", due_at=50.0),
        wf("idle", due_at=None),
    )
    claimed = await store.claim_due_workflows("A", now=10.0, lease_seconds=10.0, limit=10)
    assert [w.id for w in claimed] == ["due2", "due1"]
    assert all(w.lease_owner == "A" and w.lease_until == 20.0 and w.fence == 1 for w in claimed)
    # Live leases are not handed out again, to anyone.
    assert await store.claim_due_workflows("B", now=15.0, lease_seconds=10.0, limit=10) == []
    # Expired at 21: B takes over with fence + 1.
    taken = await store.claim_due_workflows("B", now=21.0, lease_seconds=10.0, limit=1)
    assert [(w.id, w.lease_owner, w.fence) for w in taken] == [("due2", "B", 2)]
    stored = await store.get_workflow("t1", "due2")
    assert stored is not None and (stored.lease_owner, stored.lease_until) == ("B", 31.0)
    later = await store.claim_due_workflows("C", now=60.0, lease_seconds=1.0, limit=10)
    assert {w.id for w in later} == {"due1", "due2", "later"}


async def test_renew_and_release_are_fenced(store):
    await create(store, wf("a", due_at=0.0), wf("b", due_at=0.0))
    claimed = await store.claim_due_workflows("A", now=1.0, lease_seconds=5.0, limit=10)
    leases = {w.key: w.fence for w in claimed}
    a_key, b_key = WorkflowKey("t1", "a"), WorkflowKey("t1", "b")
    assert leases == {a_key: 1, b_key: 1}
    assert await store.renew_leases("A", leases, until=20.0) == {a_key, b_key}
    assert await store.renew_leases("A", {}, until=20.0) == set()
    # Another owner, a stale fence, or another tenant's key renews nothing.
    assert await store.renew_leases("B", leases, until=99.0) == set()
    assert await store.renew_leases("A", {a_key: 0}, until=99.0) == set()
    assert await store.renew_leases("A", {WorkflowKey("t2", "a"): 1}, until=99.0) == set()
    a = await store.get_workflow("t1", "a")
    assert a is not None and a.lease_until == 20.0

    # A's lease on "a" expires and B takes over; A (paused) wakes up with fence 1.
    taken = await store.claim_due_workflows("B", now=21.0, lease_seconds=5.0, limit=1)
    assert taken[0].id == "a" and taken[0].fence == 2
    assert await store.renew_leases("A", leases, until=30.0) == {b_key}
    await store.release_leases("A", leases)  # must not release B's lease on "a"
    a = await store.get_workflow("t1", "a")
    assert a is not None and (a.lease_owner, a.fence) == ("B", 2)
    b = await store.get_workflow("t1", "b")
    assert b is not None and (b.lease_owner, b.lease_until, b.fence) == (None, None, 1)
    await store.release_leases("B", {})
    await store.release_leases("B", {a_key: 2})
    # Released rows are free at once, and the next claim fences again.
    again = await store.claim_due_workflows("C", now=22.0, lease_seconds=5.0, limit=10)
    assert sorted((w.id, w.fence) for w in again) == [("a", 3), ("b", 2)]


async def test_concurrent_claims_never_share_a_workflow(database_url):
    stores = await open_stores(database_url, 4)
    try:
        total = 200
        await create(stores[0], *(wf(f"w{i:03}", due_at=float(i % 7)) for i in range(total)))
        owners: dict[str, list[str]] = defaultdict(list)

        async def claimer(n: int) -> None:
            while True:
                got = await stores[n].claim_due_workflows(f"o{n}", 100.0, 60.0, 7)
                if not got:
                    return
                for record in got:
                    owners[record.id].append(f"o{n}")
                    assert record.lease_owner == f"o{n}" and record.fence == 1

        await asyncio.gather(*(claimer(n) for n in range(4)))
        assert len(owners) == total
        assert all(len(who) == 1 for who in owners.values())
    finally:
        await close_all(stores)


# -- outbox, dlq, breakers ---------------------------------------------------------
async def test_outbox_claim_finish_and_stats(store):
    async def enqueue(tx: Transaction) -> None:
        await tx.enqueue_outbox("hook-a", {"n": 1}, event_seq=7, max_retries=3, at=10.0)
        await tx.enqueue_outbox("hook-b", {"n": 2}, event_seq=None, max_retries=5, at=11.0)

    await store.run(enqueue)
    assert await store.outbox_stats(20.0) == (2, 10.0)
    assert await store.claim_outbox(now=9.0, limit=10, lease_seconds=30.0) == []
    items = await store.claim_outbox(now=12.0, limit=10, lease_seconds=30.0)
    assert [(i.destination, i.payload, i.event_seq) for i in items] == [
        ("hook-a", {"n": 1}, 7),
        ("hook-b", {"n": 2}, None),
    ]
    assert all(i.next_retry_at == 42.0 and i.status == "pending" for i in items)
    assert items[0].max_retries == 3 and items[0].created_at == 10.0
    # Claimed items are invisible to other relays until the claim lapses.
    assert await store.claim_outbox(now=13.0, limit=10, lease_seconds=30.0) == []

    first, second = items
    first.status, first.published_at = "published", 13.0
    await store.finish_outbox(first)
    second.retry_count, second.next_retry_at, second.last_error = 1, 15.0, "HTTP 503"
    await store.finish_outbox(second)
    assert await store.outbox_stats(20.0) == (1, 9.0)
    retried = await store.claim_outbox(now=16.0, limit=10, lease_seconds=30.0)
    assert [(i.id, i.retry_count, i.last_error) for i in retried] == [(second.id, 1, "HTTP 503")]
    retried[0].status = "dead"
    await store.finish_outbox(retried[0])
    assert await store.outbox_stats(20.0) == (0, 0.0)


async def test_dlq_add_get_update_list(store):
    def entry(tenant: str, step: str | None, at: float) -> DlqEntry:
        return DlqEntry(0, tenant, "wf-1", step, "attempts exhausted", 5, "HTTP 500", at)

    async def add(tx: Transaction) -> list[int]:
        return [
            await tx.add_dlq(entry("t1", "render", 1.0)),
            await tx.add_dlq(entry("t2", None, 2.0)),
            await tx.add_dlq(entry("t1", "store", 3.0)),
        ]

    ids = await store.run(add)
    assert len(set(ids)) == 3
    assert [e.id for e in await store.list_dlq()] == ids
    assert [e.id for e in await store.list_dlq(tenant="t1")] == [ids[0], ids[2]]

    async def resolve(tx: Transaction) -> DlqEntry | None:
        got = await tx.get_dlq(ids[0])
        assert got is not None and got.step == "render" and got.last_error == "HTTP 500"
        got.status, got.resolved_at = "requeued", 9.0
        await tx.update_dlq(got)
        return await tx.get_dlq(12345, lock=False)

    assert await store.run(resolve) is None
    assert [e.id for e in await store.list_dlq()] == ids[1:]
    requeued = await store.list_dlq(status="requeued")
    assert [(e.id, e.resolved_at) for e in requeued] == [(ids[0], 9.0)]
    assert len(await store.list_dlq(status=None)) == 3
    assert len(await store.list_dlq(status=None, limit=2)) == 2


async def test_breakers_put_get_list(store):
    async def put(tx: Transaction) -> BreakerRecord | None:
        assert await tx.get_breaker("render") is None
        await tx.put_breaker(BreakerRecord("render", "open", 5, 10.0, 10.0))
        await tx.put_breaker(BreakerRecord("store", updated_at=1.0))
        return await tx.get_breaker("render", lock=False)

    got = await store.run(put)
    assert got == BreakerRecord("render", "open", 5, 10.0, 10.0)

    async def probe(tx: Transaction) -> None:
        current = await tx.get_breaker("render")
        assert current is not None
        current.state, current.probe_owner, current.probe_until = "half_open", "A", 20.0
        await tx.put_breaker(current)

    await store.run(probe)
    listed = {b.name: b for b in await store.list_breakers()}
    assert set(listed) == {"render", "store"}
    assert (listed["render"].state, listed["render"].probe_owner) == ("half_open", "A")
    assert listed["store"] == BreakerRecord("store", updated_at=1.0)


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
