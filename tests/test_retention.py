"""Retention on both backends: what the pruner deletes, what it keeps, and its settings.

The rows are written through the store's own units of work (events with snapshots,
mutation results, outbox items, dead letters); the pruner runs with a fixed clock.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from protocol import UsageError
from protocol import events as event_types
from sync_server.config import ServerConfig, parse_duration
from sync_server.retention import Pruner, RetentionPolicy, policy_from_config
from sync_server.snapshots import append_event
from sync_server.store import DlqEntry, Store, Transaction, WorkflowRecord, open_store
from tests.servers import SECRET

pytestmark = pytest.mark.timeout(60)

NOW = 1_800_000_000.0
TENANT = "acme"


@pytest.fixture
async def store(database_url):
    s = open_store(database_url, max_size=3) if database_url.startswith("postgres") else None
    s = s or open_store(database_url)
    await s.open()
    yield s
    await s.close()


async def add_workflow(
    store: Store, wid: str, status: str, ended_at: float, events: int = 3, tenant: str = TENANT
) -> None:
    async def unit(tx: Transaction) -> None:
        record = WorkflowRecord(
            id=wid,
            tenant=tenant,
            name="noop",
            status="running",
            state={"steps": {}},
            created_at=ended_at - 5,
            updated_at=ended_at - 5,
        )
        append_event(tx, record, event_types.WORKFLOW_SUBMITTED, ended_at - 5, client_id="x")
        for _ in range(events - 1):
            append_event(tx, record, event_types.WORKFLOW_PROGRESS, ended_at - 1, step="s")
        record.status = status
        record.updated_at = ended_at
        await tx.insert_workflow(record)

    await store.run(unit)


async def seqs_of(store: Store, wid: str, tenant: str = TENANT) -> list[int]:
    return [e.seq for e in await store.read_workflow_events(tenant, wid)]


async def add_bookkeeping(store: Store) -> None:
    async def unit(tx: Transaction) -> None:
        await tx.lock_client(TENANT, "subject", "c1")
        await tx.record_mutations(
            TENANT, "c1", [(1, "applied", None), (2, "applied", None)], 2, NOW - 100
        )
        await tx.record_mutations(TENANT, "c1", [(3, "rejected", "bad")], 3, NOW - 1)
        for at in (NOW - 100, NOW - 100, NOW - 1):
            await tx.enqueue_outbox("hook", {"at": at}, event_seq=None, max_retries=3, at=at)
        for status, at in (("resolved", NOW - 100), ("requeued", NOW - 1), ("open", NOW - 100)):
            await tx.add_dlq(
                DlqEntry(
                    id=0,
                    tenant=TENANT,
                    workflow_id="w-ended-old",
                    step="s",
                    reason="failed",
                    attempts=3,
                    last_error="x",
                    created_at=at - 10,
                    status=status,
                    resolved_at=None if status == "open" else at,
                )
            )

    await store.run(unit)
    items = await store.claim_outbox(NOW, 10, 30)
    for item in items[:2]:  # the two old ones are delivered; the new one stays pending
        item.status, item.published_at = "published", item.created_at
        await store.finish_outbox(item)


async def test_prune_deletes_only_what_the_policy_lets_go(store):
    await add_workflow(store, "w-ended-old", "completed", NOW - 100)
    await add_workflow(store, "w-ended-new", "failed", NOW - 1)
    await add_workflow(store, "w-other", "cancelled", NOW - 100, tenant="other")
    # Added last: the log's newest event is a running workflow's (SQLite never prunes
    # the newest event — its positions continue from MAX(seq)).
    await add_workflow(store, "w-running", "running", NOW - 100)
    await add_bookkeeping(store)
    old_seqs = await seqs_of(store, "w-ended-old")
    head_before = await store.head(TENANT)
    assert await store.horizon(TENANT) == 0

    policy = RetentionPolicy(events=50, workflows=0, results=50, outbox=50, dead_letters=50)
    report = await Pruner(store, policy, clock=lambda: NOW).prune_once()

    assert await seqs_of(store, "w-ended-old") == []
    assert len(await seqs_of(store, "w-ended-new")) == 3
    assert len(await seqs_of(store, "w-running")) == 3
    assert await seqs_of(store, "w-other", "other") == []
    assert await store.get_workflow(TENANT, "w-ended-old") is not None  # rows are kept longer
    assert report.deleted["events"] == 6
    # The horizon is per tenant; the tenant's head never goes back.
    assert await store.horizon(TENANT) == max(old_seqs)
    assert await store.horizon("other") > 0
    assert await store.head(TENANT) == head_before

    # Mutation results: the old ones go, the client's last applied id stays.
    async def results(tx: Transaction) -> dict[int, Any]:
        return await tx.mutation_results(TENANT, "c1", [1, 2, 3])

    assert set(await store.run(results)) == {3}
    assert await store.get_client(TENANT, "c1") == ("subject", 3)
    assert report.deleted["results"] == 2
    # Outbox: the old delivered items go; the pending one stays.
    assert await store.outbox_stats(NOW) == (1, 1.0)
    assert report.deleted["outbox"] == 2
    # Dead letters: the old resolved one goes; the new requeued and the open one stay.
    left = {e.status for e in await store.list_dlq(status=None)}
    assert left == {"requeued", "open"}
    assert report.deleted["dead_letters"] == 1

    # Rows: a second policy deletes finished rows past their window, never running ones.
    policy = RetentionPolicy(events=50, workflows=50, results=0, outbox=0, dead_letters=0)
    report = await Pruner(store, policy, clock=lambda: NOW).prune_once()
    assert await store.get_workflow(TENANT, "w-ended-old") is None
    assert await store.get_workflow("other", "w-other") is None
    assert await store.get_workflow(TENANT, "w-running") is not None
    assert await store.get_workflow(TENANT, "w-ended-new") is not None
    assert report.deleted["workflows"] == 2

    # Positions are never reused after pruning.
    await add_workflow(store, "w-after", "running", NOW)
    assert min(await seqs_of(store, "w-after")) > head_before


async def test_prune_in_batches_from_a_mark(store):
    for i in range(25):
        await add_workflow(store, f"w{i:03d}", "completed", NOW - 1000 + i, events=2)
    await add_workflow(store, "w-live", "running", NOW)  # holds the newest event
    pruner = Pruner(
        store,
        RetentionPolicy(events=10, workflows=0, results=0, outbox=0, dead_letters=0),
        clock=lambda: NOW,
    )
    pruner.workflow_batch = 10
    report = await pruner.prune_once()
    assert report.deleted["events"] == 50
    assert report.batches == 3  # 10 + 10 + 5 workflows; the short batch ends the kind
    assert [await seqs_of(store, f"w{i:03d}") for i in range(25)] == [[]] * 25
    # A workflow that ends later is found after the mark on the next round.
    await add_workflow(store, "w-late", "completed", NOW - 20, events=2)
    await add_workflow(store, "w-live2", "running", NOW)
    report = await pruner.prune_once()
    assert report.deleted["events"] == 2 and report.batches == 1


async def test_windows_of_zero_keep_everything(store):
    await add_workflow(store, "w", "completed", NOW - 10**6)
    policy = RetentionPolicy(events=0, workflows=0, results=0, outbox=0, dead_letters=0)
    pruner = Pruner(store, policy, clock=lambda: NOW)
    assert not policy.enabled
    await pruner.start()
    assert pruner._task is None  # nothing to do: no background task at all
    assert (await pruner.prune_once()).total == 0
    assert len(await seqs_of(store, "w")) == 3


async def test_bad_prune_kind_is_refused_and_changes_nothing(store):
    await add_bookkeeping(store)
    with pytest.raises(UsageError, match="unknown prune kind"):
        await store.prune_rows("clients", NOW, 10)
    assert await store.get_client(TENANT, "c1") == ("subject", 3)
    assert len(await store.list_dlq(status=None)) == 3


async def test_background_pruner_runs_and_stops(store):
    await add_workflow(store, "w", "completed", time.time() - 100)
    await add_workflow(store, "w-live", "running", time.time())
    seen: list[tuple[str, int]] = []
    pruner = Pruner(
        store,
        RetentionPolicy(events=10, workflows=0, results=0, outbox=0, dead_letters=0),
        interval=0.05,
        on_pruned=lambda kind, n: seen.append((kind, n)),
    )
    await pruner.start()
    try:
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.02)
    finally:
        await pruner.stop()
    assert seen == [("events", 3)]
    assert pruner._task is None
    await pruner.stop()  # idempotent


async def test_stop_propagates_the_callers_own_cancellation(store):
    pruner = Pruner(store, RetentionPolicy(events=10), interval=30)
    await pruner.start()
    stopper = asyncio.create_task(pruner.stop())
    await asyncio.sleep(0)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    await pruner.stop()


def test_durations_and_environment(monkeypatch):
    assert [parse_duration(t) for t in ("90s", "15m", "12h", "7d", "0", "2.5h", "30")] == [
        90.0,
        900.0,
        43_200.0,
        604_800.0,
        0.0,
        9000.0,
        30.0,
    ]
    for bad in ("", "7w", "-1d", "1 d d", "inf", "nan"):
        with pytest.raises(UsageError, match="not a duration"):
            parse_duration(bad, name="SYNC_RETENTION_EVENTS")
    monkeypatch.setenv("SYNC_RETENTION_EVENTS", "15m")
    monkeypatch.setenv("SYNC_RETENTION_DEAD_LETTERS", "0")
    config = ServerConfig(auth_secret=SECRET)
    assert config.retention_events == 900.0
    assert config.retention_dead_letters == 0.0
    assert config.retention_workflows == 30 * 86_400.0  # the default
    assert config.retention_outbox == 7 * 86_400.0
    policy = policy_from_config(config)
    assert policy.events == 900.0 and policy.dead_letters == 0.0
    # An explicit field wins over the environment.
    assert ServerConfig(auth_secret=SECRET, retention_events=60).retention_events == 60.0
    monkeypatch.setenv("SYNC_RETENTION_RESULTS", "soon")
    with pytest.raises(UsageError, match="retention_results"):
        ServerConfig(auth_secret=SECRET)
    monkeypatch.delenv("SYNC_RETENTION_RESULTS")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="retention_workflows"):
            ServerConfig(auth_secret=SECRET, retention_workflows=bad)


async def test_reclaim_vacuums_the_pruned_tables(store, database_url):
    await add_workflow(store, "w", "completed", NOW - 100)
    await add_workflow(store, "w-live", "running", NOW)
    policy = RetentionPolicy(events=10, workflows=0, results=0, outbox=0, dead_letters=0)
    await Pruner(store, policy, clock=lambda: NOW).prune_once()
    await store.reclaim()  # SQLite: nothing to do (freed pages are reused)
    if not database_url.startswith("postgres"):
        return
    import asyncpg

    from tests.conftest import PG_DSN, wait_for

    schema = database_url.rsplit("schema=", 1)[1]
    conn = await asyncpg.connect(PG_DSN)
    try:

        async def vacuumed() -> bool:
            count = await conn.fetchval(
                "SELECT vacuum_count FROM pg_stat_user_tables "
                "WHERE schemaname = $1 AND relname = 'events'",
                schema,
            )
            return bool(count)

        await wait_for(vacuumed, timeout=10, message="VACUUM of events recorded")
    finally:
        await conn.close()


async def test_status_counts_cover_the_newest_rows(store):
    for i, status in enumerate(["completed"] * 5 + ["running"] * 3 + ["failed"] * 2):
        await add_workflow(store, f"w{i}", status, NOW + i, events=1)
    await add_workflow(store, "x", "running", NOW + 100, events=1, tenant="other")
    assert await store.status_counts(tenant=TENANT, limit=100) == {
        "completed": 5,
        "running": 3,
        "failed": 2,
    }
    # The newest four of the tenant: two failed, two running (bounded work).
    assert await store.status_counts(tenant=TENANT, limit=4) == {"failed": 2, "running": 2}
    assert await store.status_counts(limit=1) == {"running": 1}
