"""The saga runner on a real store (SQLite and PostgreSQL), in one process.

Split by topic: this file (steps, retries, failures, cancel, breaker),
test_saga_runner_leases.py, test_saga_runner_outbox.py; helpers in saga_runner_helpers.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from sync_server.saga import PermanentError, RetryPolicy, Step, Workflow, intake
from sync_server.saga.alerts import RecordingAlerts
from sync_server.saga.breaker import BreakerPolicy
from sync_server.saga.machine import idempotency_key
from tests import saga_runner_helpers
from tests.conftest import wait_for
from tests.saga_helpers import event_types, mutate, step_history, submit, wait_all, wait_status
from tests.saga_runner_helpers import noop_chain

# The shared fixture, bound here for pytest to find (importing it by name trips F811).
env = saga_runner_helpers.env
pytestmark = pytest.mark.timeout(60)


async def test_three_steps_complete_with_few_transactions(env):
    store, runner = env
    wf = noop_chain()
    r = await runner([wf])
    [wid] = await submit(store, wf, {"x": 1})
    record = await wait_status(store, wid, "completed")
    key = idempotency_key(wid, "s2", tenant="t1")
    assert record.result == {"step": "s2", "key": key, "deps": ["s1"]}
    assert record.progress == 1.0 and record.lease_owner is None and record.due_at is None
    assert await step_history(store, wid) == [
        ("s0", "running", 1),
        ("s0", "succeeded", 1),
        ("s1", "running", 1),
        ("s1", "succeeded", 1),
        ("s2", "running", 1),
        ("s2", "succeeded", 1),
    ]
    events = await store.read_workflow_events("t1", wid)
    assert [e.data["workflow"]["version"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1].data["workflow"]["status"] == "completed"
    # the claim starts step 1; each later checkpoint records one step and starts the next
    assert r.stats["claim_txns"] + r.stats["checkpoint_txns"] <= 4


async def test_many_workflows_share_transactions(env):
    store, runner = env
    wf = noop_chain()
    r = await runner([wf])
    ids = await submit(store, wf, count=200)
    records = await wait_all(store, ids, {"completed"})
    assert len(records) == 200
    txns = r.stats["claim_txns"] + r.stats["checkpoint_txns"]
    assert txns / 200 < 1.0, r.stats


async def test_retry_same_key_backoff_persisted_then_success(env):
    store, runner = env
    keys: list[tuple[str, int]] = []

    async def flaky(ctx):
        keys.append((ctx.idempotency_key, ctx.attempt))
        if ctx.attempt < 3:
            raise RuntimeError(f"boom {ctx.attempt}")
        return "ok"

    wf = Workflow("flaky", [Step("f", flaky, retry=RetryPolicy(max_attempts=3, base_delay=0.3))])
    await runner([wf])
    [wid] = await submit(store, wf)

    async def retrying():
        rec = await store.get_workflow("t1", wid)
        return rec if rec.state["steps"]["f"]["status"] == "retrying" else None

    rec = await wait_for(retrying, timeout=10)
    assert rec.due_at is not None and rec.lease_owner is None  # the schedule is in the store
    record = await wait_status(store, wid, "completed")
    assert record.state["steps"]["f"]["attempts"] == 3
    key = idempotency_key(wid, "f", tenant="t1")
    assert keys == [(key, 1), (key, 2), (key, 3)]
    statuses = [s for _, s, _ in await step_history(store, wid)]
    assert statuses == ["running", "retrying", "running", "retrying", "running", "succeeded"]


async def test_timeout_is_a_failed_attempt(env):
    store, runner = env

    async def slow(ctx):
        if ctx.attempt == 1:
            await asyncio.Event().wait()
        return "second"

    wf = Workflow(
        "slow", [Step("s", slow, timeout=0.2, retry=RetryPolicy(max_attempts=2, base_delay=0))]
    )
    await runner([wf])
    [wid] = await submit(store, wf)
    record = await wait_status(store, wid, "completed")
    assert record.result == "second"
    events = await store.read_workflow_events("t1", wid)
    errors = [e.data["error"] for e in events if e.data.get("status") == "retrying"]
    assert errors == ["timed out after 0.2 s"]


async def test_permanent_error_dead_letters_alerts_and_compensates_in_reverse(env):
    store, runner = env
    undone: list[str] = []

    async def ok(ctx):
        return ctx.step

    async def undo(ctx):
        undone.append(ctx.step)
        assert ctx.results[ctx.step] == ctx.step and ctx.compensating
        assert ctx.idempotency_key == idempotency_key(
            ctx.workflow_id, ctx.step, compensation=True, tenant="t1"
        )

    async def bad(ctx):
        raise PermanentError("no such prompt")

    wf = Workflow(
        "perm",
        [
            Step("a", ok, compensate=undo),
            Step("b", ok, depends_on=["a"], compensate=undo),
            Step("c", ok, depends_on=["a"]),  # no compensation
            Step("d", bad, depends_on=["b", "c"], retry=RetryPolicy(max_attempts=5)),
        ],
    )
    alerts = RecordingAlerts()
    await runner([wf], alerts=alerts)
    [wid] = await submit(store, wf)
    record = await wait_status(store, wid, "compensated")
    assert undone == ["b", "a"]
    assert "no such prompt" in record.error
    history = await step_history(store, wid)
    assert ("d", "failed", 1) in history  # no retries for a permanent error
    comp = [(s, st) for s, st, _ in history if st in ("compensating", "compensated")]
    assert comp == [
        ("b", "compensating"),
        ("b", "compensated"),
        ("a", "compensating"),
        ("a", "compensated"),
    ]
    [entry] = await store.list_dlq()
    assert (entry.workflow_id, entry.step, entry.reason, entry.attempts) == (
        wid,
        "d",
        "permanent_error",
        1,
    )
    assert "no such prompt" in entry.last_error
    assert alerts.kinds() == ["step_failed"]
    assert alerts.alerts[0][2]["dlq_entry"] == entry.id
    assert "dlq.added" in await event_types(store, wid)


async def test_park_retry_reruns_only_failed_and_resolves_dlq(env):
    store, runner = env
    calls: Counter[str] = Counter()
    healthy = asyncio.Event()

    async def first(ctx):
        calls["first"] += 1
        return 1

    async def second(ctx):
        calls["second"] += 1
        if not healthy.is_set():
            raise RuntimeError("down")
        return 2

    wf = Workflow(
        "parky",
        [
            Step("first", first),
            Step(
                "second",
                second,
                depends_on=["first"],
                retry=RetryPolicy(max_attempts=2, base_delay=0),
            ),
        ],
        on_failure="park",
    )
    await runner([wf])
    [wid] = await submit(store, wf)
    await wait_status(store, wid, "parked")
    assert len(await store.list_dlq()) == 1
    healthy.set()
    await mutate(store, wid, intake.request_retry)
    record = await wait_status(store, wid, "completed")
    assert calls == {"first": 1, "second": 3}
    assert record.result == 2
    assert await store.list_dlq() == []  # resolved by the retry
    assert "workflow.retry_requested" in await event_types(store, wid)


async def test_cancel_mid_run_stops_the_attempt_and_compensates(env):
    store, runner = env
    started = asyncio.Event()
    cancelled = asyncio.Event()
    undone: list[str] = []

    async def quick(ctx):
        return "q"

    async def long(ctx):
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def undo(ctx):
        undone.append(ctx.step)

    wf = Workflow(
        "cancellable",
        [
            Step("quick", quick, compensate=undo),
            Step("long", long, depends_on=["quick"], compensate=undo),
        ],
    )
    await runner([wf])
    [wid] = await submit(store, wf)
    await asyncio.wait_for(started.wait(), 10)
    await mutate(store, wid, intake.request_cancel)
    record = await wait_status(store, wid, "cancelled")
    await asyncio.wait_for(cancelled.wait(), 5)
    assert undone == ["quick"]  # exactly the completed steps
    assert record.state["steps"]["long"]["status"] == "failed"
    assert record.error == "cancelled"
    with pytest.raises(Exception, match="already cancelled"):
        await mutate(store, wid, intake.request_cancel)


async def test_compensation_failure_fails_then_requeue_recovers(env):
    store, runner = env
    refund_ok = asyncio.Event()

    async def ok(ctx):
        return "ok"

    async def refund(ctx):
        if not refund_ok.is_set():
            raise RuntimeError("ledger down")

    async def bad(ctx):
        raise PermanentError("nope")

    wf = Workflow(
        "compfail",
        [
            Step(
                "reserve",
                ok,
                compensate=refund,
                compensate_retry=RetryPolicy(max_attempts=2, base_delay=0),
            ),
            Step("bad", bad, depends_on=["reserve"]),
        ],
    )
    alerts = RecordingAlerts()
    await runner([wf], alerts=alerts)
    [wid] = await submit(store, wf)
    record = await wait_status(store, wid, "failed")
    assert "compensation of step reserve failed" in record.error
    entries = await store.list_dlq()
    assert sorted(e.reason for e in entries) == ["compensation_failed", "permanent_error"]
    assert alerts.kinds() == ["step_failed", "compensation_failed"]
    refund_ok.set()
    comp_entry = next(e for e in entries if e.reason == "compensation_failed")

    async def requeue(tx):
        entry = await tx.get_dlq(comp_entry.id)
        rec = await tx.get_workflow("t1", wid)
        intake.requeue_dlq(tx, entry, rec, 0.0 + rec.updated_at)
        await tx.update_dlq(entry)
        await tx.update_workflow(rec)

    await store.run(requeue)
    await wait_status(store, wid, "compensated")
    assert await store.list_dlq() == []
    assert "dlq.requeued" in await event_types(store, wid)


async def test_breaker_opens_defers_without_attempts_and_recovers(env):
    store, runner = env
    healthy = asyncio.Event()

    async def call(ctx):
        if not healthy.is_set():
            raise RuntimeError("503")
        return "ok"

    wf = Workflow(
        "guarded",
        [Step("call", call, breaker="svc", retry=RetryPolicy(max_attempts=1))],
        on_failure="park",
    )
    alerts = RecordingAlerts()
    policy = BreakerPolicy(failure_threshold=2, reset_timeout=0.6, recheck=0.1)
    await runner([wf], alerts=alerts, breakers={"svc": policy})
    first = await submit(store, wf, count=2)
    await wait_all(store, first, {"parked"})
    assert (await store.list_breakers())[0].state == "open"
    assert "breaker_open" in alerts.kinds()
    [deferred] = await submit(store, wf)

    async def is_deferred():
        rec = await store.get_workflow("t1", deferred)
        return rec if rec.state["steps"]["call"].get("deferred") == "svc" else None

    rec = await wait_for(is_deferred, timeout=10)
    assert rec.state["steps"]["call"]["attempts"] == 0  # no attempt burnt
    assert "breaker.changed" in await event_types(store, deferred)
    healthy.set()  # the half-open probe will succeed
    record = await wait_status(store, deferred, "completed")
    assert record.state["steps"]["call"]["attempts"] == 1
    assert (await store.list_breakers())[0].state == "closed"
