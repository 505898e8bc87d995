"""SagaRunner: progress, outbox, unstorable steps and back pressure.

Split from test_saga_runner.py."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from sync_server.saga import PermanentError, RetryPolicy, Step, Workflow
from sync_server.saga.alerts import RecordingAlerts
from tests import saga_runner_helpers
from tests.conftest import wait_for
from tests.saga_helpers import event_types, submit, wait_all, wait_status
from tests.saga_runner_helpers import noop_chain

# The shared fixture, bound here for pytest to find (importing it by name trips F811).
env = saga_runner_helpers.env
pytestmark = pytest.mark.timeout(60)


async def test_progress_is_live_and_coalesced(env):
    store, runner = env
    live = []
    done = asyncio.Event()

    async def chatty(ctx):
        for i in range(1, 3001):
            await ctx.progress(i / 3000, f"{i}")
            if i % 100 == 0:
                await asyncio.sleep(0.01)
        done.set()
        return "ok"

    wf = Workflow("chatty", [Step("c", chatty)])
    await runner([wf], on_progress=lambda tenant, p: live.append((tenant, p)))
    [wid] = await submit(store, wf)
    await wait_status(store, wid, "completed")
    durable = [t for t in await event_types(store, wid) if t == "workflow.progress"]
    assert 1 <= len(durable) <= 4  # ~0.3 s of chatter, at most every 0.5 s
    assert 2 <= len(live) < 100
    tenant, last = live[-1]
    assert tenant == "t1" and last.fraction == 1.0 and last.message == "3000"
    assert last.workflow_id == wid and last.step == "c"


async def test_unknown_workflow_is_left_for_others(env):
    store, runner = env
    wf = noop_chain("known")
    other = noop_chain("other")
    await runner([wf])
    [wid] = await submit(store, other)
    [ok] = await submit(store, wf)
    await wait_status(store, ok, "completed")
    record = await store.get_workflow("t1", wid)
    # Never even claimed (the claim filters by the versions this instance has): still
    # due, for an instance that has the definition.
    assert record.status == "running" and record.lease_owner is None
    assert record.fence == 0 and record.due_at is not None


async def test_completion_notice_leaves_through_the_outbox(env):
    from examples.job_service import running_job_service
    from sync_server.saga.outbox import OutboxRelay

    store, runner = env
    wf = noop_chain("notified", 1)
    with running_job_service() as service:
        await runner([wf], completion_webhook=f"{service.url}/effects/notice")
        dead_alerts = RecordingAlerts()
        relay = OutboxRelay(
            store,
            alerts=dead_alerts,
            poll_interval=0.05,
            backoff=RetryPolicy(base_delay=0.01, max_delay=0.01),
        )
        await relay.start()
        try:
            [wid] = await submit(store, wf)
            await wait_status(store, wid, "completed")
            await wait_for(lambda: relay.published == 1, timeout=10)
            assert sum(service.books.ledger["notice"].values()) == 1
            pending, _age = await store.outbox_stats(0)
            assert pending == 0

            # an unreachable consumer: retried with backoff, then a dead letter + alert
            async def bad(tx):
                await tx.enqueue_outbox(
                    "http://127.0.0.1:9/nowhere", {"x": 1}, event_seq=None, max_retries=2, at=0.0
                )

            await store.run(bad)
            await wait_for(lambda: relay.dead == 1, timeout=10)
            assert dead_alerts.kinds() == ["outbox_dead"]
        finally:
            await relay.stop()


async def test_outbox_counts_an_outcome_only_once_it_is_recorded(env):
    # Regression (flaky test above, seen while running the chaos suite): the relay
    # counted ``published`` before ``finish_outbox`` committed, so a reader that saw the
    # counter could still find the item pending in the store.
    from examples.job_service import running_job_service
    from sync_server.saga.outbox import OutboxRelay

    store, _runner = env
    recording, gate = asyncio.Event(), asyncio.Event()
    real_finish = store.finish_outbox

    async def slow_finish(item):
        recording.set()
        await gate.wait()
        await real_finish(item)

    store.finish_outbox = slow_finish
    with running_job_service() as service:

        async def notice(tx):
            await tx.enqueue_outbox(
                f"{service.url}/effects/notice", {"x": 1}, event_seq=None, max_retries=2, at=0.0
            )

        await store.run(notice)
        relay = OutboxRelay(store, poll_interval=0.05)
        await relay.start()
        try:
            await asyncio.wait_for(recording.wait(), 10)  # delivered, being recorded
            assert relay.published == 0
            gate.set()
            await wait_for(lambda: relay.published == 1, timeout=10)
            pending, _age = await store.outbox_stats(0)
            assert pending == 0
        finally:
            await relay.stop()


async def test_unstorable_step_text_ends_its_workflow_and_spares_the_batch(env):
    """Finding 12: a step error with U+0000 made PostgreSQL refuse the checkpoint, which
    was retried forever together with every workflow batched with it. The text is made
    storable where it enters the saga, on both backends alike."""
    store, runner = env

    async def bad_error(ctx):
        raise PermanentError("downstream said \x00 and \ud800 then stopped")

    async def bad_result(ctx):
        return {"text": "nul \x00 here", "lone \udfff key": ["\ud800"]}

    async def fine(ctx):
        return {"ok": ctx.step}

    poison = Workflow("poison", [Step("s", bad_error)])
    odd = Workflow("odd", [Step("s", bad_result)])
    good = Workflow("good", [Step("a", fine), Step("b", fine, depends_on=["a"])])
    [p] = await submit(store, poison)
    [o] = await submit(store, odd)
    goods = await submit(store, good, count=12)  # claimed and checkpointed with p and o
    r = await runner([poison, odd, good], max_batch=64)
    ended = await wait_all(store, [p, o, *goods], timeout=30)
    status = {rec.id: rec for rec in ended}
    assert all(status[g].status == "completed" for g in goods)
    assert status[p].status == "compensated"
    assert "downstream said \ufffd and \ufffd then stopped" in status[p].error
    step = status[p].state["steps"]["s"]
    assert step["status"] == "failed" and "\x00" not in step["error"]
    [letter] = [e for e in await store.list_dlq(status=None) if e.workflow_id == p]
    assert letter.last_error == "PermanentError: downstream said \ufffd and \ufffd then stopped"
    assert status[o].status == "completed"
    assert status[o].result == {"text": "nul \ufffd here", "lone \ufffd key": ["\ufffd"]}
    assert r.stats["quarantined"] == 0  # sanitised at the door: nothing was refused


async def test_a_checkpoint_the_store_refuses_ends_only_its_workflow(env, monkeypatch):
    """No poison batch: when the database refuses one workflow's checkpoint (a data
    error, not an outage), the others of its batch commit and that one ends clearly —
    its step fails permanently with the reason and the workflow parks — instead of the
    batch being retried forever."""
    from protocol import StorageError

    store, runner = env
    tx_class = type(await store.run(lambda tx: _current(tx)))
    real = tx_class.update_workflows
    refusals = Counter()

    async def picky(self, workflows):
        for record in workflows:
            steps = (record.state or {}).get("steps") or {}
            if (steps.get("s") or {}).get("result") == "refused-by-db":
                refusals[record.id] += 1
                raise StorageError("value refused") from ValueError("simulated data error")
        return await real(self, workflows)

    monkeypatch.setattr(tx_class, "update_workflows", picky)
    real_fenced = store.write_fenced

    async def picky_fenced(owner, writes, notifications):
        # The one-statement fenced checkpoint (issue 16) refuses the same data.
        for write in writes:
            steps = (write.record.state or {}).get("steps") or {}
            if (steps.get("s") or {}).get("result") == "refused-by-db":
                raise StorageError("value refused") from ValueError("simulated data error")
        return await real_fenced(owner, writes, notifications)

    monkeypatch.setattr(store, "write_fenced", picky_fenced)

    async def refused(ctx):
        return "refused-by-db"

    async def fine(ctx):
        return "ok"

    bad = Workflow("bad", [Step("s", refused)], on_failure="park")
    good = Workflow("good", [Step("s", fine)])
    [b] = await submit(store, bad)
    goods = await submit(store, good, count=8)
    r = await runner([bad, good], max_batch=64)
    ended = await wait_all(store, [b, *goods], timeout=30)
    status = {rec.id: rec for rec in ended}
    assert all(status[g].status == "completed" for g in goods)
    assert status[b].status == "parked"
    assert "checkpoint refused by the store: StorageError: value refused" in status[b].error
    [letter] = await store.list_dlq(status=None)
    assert letter.workflow_id == b and "value refused" in letter.last_error
    assert r.stats["quarantined"] == 1
    # Refused once in the batch, once on its own, then ended: never retried forever.
    assert refusals[b] == 2


async def _current(tx):
    return tx


async def test_back_pressure_claims_more_as_soon_as_a_held_workflow_ends(env):
    """With more due workflows than ``max_concurrency``, a workflow that ends frees a
    slot at once: the claimer must not wait for the poll interval (issue 16)."""
    store, runner = env
    wf = noop_chain("bp", n=1)
    ids = await submit(store, wf, count=12)
    r = await runner([wf], max_concurrency=2, poll_interval=3600)
    # Six rounds of two; each round is a few commits, far below one poll interval.
    await wait_all(store, ids, "completed", timeout=20)
    assert r.stats["claimed"] == 12
    assert len(r.held) == 0
