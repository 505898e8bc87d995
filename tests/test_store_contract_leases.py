"""Store contract: claims, leases, outbox, DLQ and breakers (split from test_store_contract.py)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from sync_server.store import (
    BreakerRecord,
    DlqEntry,
    Transaction,
)
from sync_server.store.base import WorkflowKey
from tests import store_contract_helpers
from tests.store_contract_helpers import close_all, create, open_stores, wf

# The shared fixture, bound here for pytest to find (importing it by name trips F811).
store = store_contract_helpers.store
pytestmark = pytest.mark.timeout(60)


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
