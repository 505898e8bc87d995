"""Database round trips per workflow (issue 16) and the fast paths that keep them few.

A 3-step workflow submitted through the push path and run by this instance's runner
costs, on PostgreSQL: the push transaction, which also claims it and starts step 1
(BEGIN, client row, insert, mutation results, events, COMMIT), then one fenced
checkpoint statement per step. The budget is 12; the fenced write must still refuse a
stale owner and a row changed behind the runner's back.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from protocol import Mutation, Role
from sync_server.auth import Principal
from sync_server.domain import MutationApplier
from sync_server.saga import Step, Workflow, intake
from sync_server.saga.runner import SagaRunner
from sync_server.snapshots import append_event
from sync_server.store import open_store
from sync_server.store.base import FencedWrite, Transaction
from tests.conftest import scaled, wait_for
from tests.saga_helpers import submit

pytestmark = pytest.mark.timeout(60)

BUDGET = {"postgres": 12, "sqlite": 25}
"""Most round trips one 3-step workflow may take, submit to completion."""


async def _noop(ctx):
    return {}


NOOP3 = Workflow(
    "noop3",
    [
        Step("one", _noop),
        Step("two", _noop, depends_on=["one"]),
        Step("three", _noop, depends_on=["two"]),
    ],
)


async def test_one_workflow_stays_within_its_round_trip_budget(database_url):
    backend = "postgres" if database_url.startswith("postgres") else "sqlite"
    store = open_store(database_url)
    await store.open()
    # No polling or renewal during the measure: only the workflow's own work counts.
    runner = SagaRunner(store, [NOOP3], poll_interval=3600, lease_seconds=600)
    applier = MutationApplier(store, {"noop3": NOOP3})
    applier.runner = runner
    ended: dict[str, asyncio.Event] = {}

    def on_commit(events):
        for event in events:
            status = event.data.get("workflow", {}).get("status")
            if status == "completed" and event.workflow_id in ended:
                ended[event.workflow_id].set()

    store.on_commit(on_commit)
    principal = Principal(tenant="t1", subject="c", role=Role.CLIENT)
    await runner.start()
    try:
        # The claimer's first (empty) look must pass before counting starts.
        await wait_for(lambda: runner.stats["empty_claims"], 5, message="first empty claim")
        count = 5
        before = store.round_trips.count
        for i in range(1, count + 1):
            wid = str(uuid.uuid4())
            ended[wid] = asyncio.Event()
            mutation = Mutation(
                id=i, name="submit_workflow", args={"workflow_id": wid, "name": "noop3"}
            )
            [result] = await applier.push(principal, "client-1", [mutation])
            assert result.status == "applied"
            await asyncio.wait_for(ended[wid].wait(), scaled(20))
        trips = (store.round_trips.count - before) / count
        stats = dict(runner.stats)
    finally:
        await runner.stop()
        await store.close()
    assert trips <= BUDGET[backend], f"{trips} round trips per workflow on {backend}"
    # Each claim rode on its submit; every step was checkpointed by the fenced write.
    assert stats["claimed"] == count and stats["fenced_checkpoints"] == 3 * count
    assert stats["refused"] == 0


async def _held_pair(store):
    """Two workflows claimed by owner ``a``: their records as the runner would hold them."""
    await submit(store, NOOP3, count=2)
    claimed = await store.claim_due_workflows("a", time.time(), 60, 10)
    assert len(claimed) == 2
    return sorted(claimed, key=lambda r: r.id)


def _next(record, tx_events):
    """The runner's next row for ``record`` with one event, as a FencedWrite."""
    from sync_server.saga.fastpath import MemoryTransaction, copy_record

    tx = MemoryTransaction()
    new = copy_record(record)
    append_event(tx, new, "workflow.progress", time.time(), note="fast")
    new.progress = 0.5
    tx_events.append(new.id)
    return FencedWrite(new, record.fence, record.version, list(tx.pending_events))


async def test_fenced_write_refuses_a_revoked_lease_and_keeps_order(database_url):
    store = open_store(database_url)
    await store.open()
    try:
        first, second = await _held_pair(store)

        async def cancel(tx: Transaction) -> None:  # revokes the lease: fence + 1
            record = await tx.get_workflow(first.tenant, first.id, lock=True)
            intake.request_cancel(tx, record, time.time(), "someone")
            await tx.update_workflow(record)

        await store.run(cancel)
        head = await store.head()
        written = await store.write_fenced(
            "a", [_next(first, []), _next(second, [])], [("work", "")]
        )
        assert written == {second.key}
        stored_first = await store.get_workflow(first.tenant, first.id)
        stored_second = await store.get_workflow(second.tenant, second.id)
        assert stored_first.progress == 0.0 and stored_first.lease_owner is None
        assert stored_second.progress == 0.5 and stored_second.version == second.version + 1
        new = await store.read_events(head, 100)
        assert [(e.workflow_id, e.type) for e in new] == [(second.id, "workflow.progress")]
        assert [e.seq for e in new] == [head + 1]  # gapless: the refused event took no seq
    finally:
        await store.close()


async def test_fenced_write_refuses_a_row_changed_behind_the_runner(database_url):
    store = open_store(database_url)
    await store.open()
    try:
        first, second = await _held_pair(store)

        async def report(tx: Transaction) -> None:  # same owner and fence, new version
            record = await tx.get_workflow(first.tenant, first.id, lock=True)
            append_event(tx, record, "workflow.reported", time.time(), source="x")
            await tx.update_workflow(record)

        await store.run(report)
        assert await store.write_fenced("a", [_next(first, [])], []) == set()
        assert await store.write_fenced("b", [_next(second, [])], []) == set()  # not b's
        assert (await store.get_workflow(first.tenant, first.id)).progress == 0.0
        assert (await store.get_workflow(second.tenant, second.id)).progress == 0.0
        assert await store.write_fenced("a", [_next(second, [])], []) == {second.key}
    finally:
        await store.close()


async def test_a_runner_stopped_during_the_push_gives_the_new_lease_back(database_url):
    """The claim rode on a push whose runner stopped before the push returned: the new
    lease must not outlive the runner (any instance may claim the workflow at once)."""
    store = open_store(database_url)
    await store.open()
    runner = SagaRunner(store, [NOOP3], poll_interval=3600, lease_seconds=600)
    applier = MutationApplier(store, {"noop3": NOOP3})
    applier.runner = runner
    await runner.start()
    real_run = store.run
    stopped = []

    async def run(fn, **options):
        result = await real_run(fn, **options)
        if not stopped:
            stopped.append(True)
            await runner.stop()  # between COMMIT and the push's return
        return result

    store.run = run
    try:
        wid = str(uuid.uuid4())
        mutation = Mutation(
            id=1, name="submit_workflow", args={"workflow_id": wid, "name": "noop3"}
        )
        principal = Principal(tenant="t1", subject="c", role=Role.CLIENT)
        [result] = await applier.push(principal, "client-1", [mutation])
        assert result.status == "applied" and stopped
        record = await store.get_workflow("t1", wid)
        assert record.fence == 1, "the claim rode on the submit"
        assert record.lease_owner is None and runner.held == {}
    finally:
        store.run = real_run
        await store.close()
