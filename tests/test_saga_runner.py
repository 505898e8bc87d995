"""The saga runner on a real store (SQLite and PostgreSQL), in one process."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from sync_server.saga import PermanentError, RetryPolicy, Step, Workflow, intake
from sync_server.saga.alerts import RecordingAlerts
from sync_server.saga.breaker import BreakerPolicy
from sync_server.saga.checkpoint import Applied
from sync_server.saga.machine import idempotency_key
from sync_server.saga.runner import SagaRunner
from sync_server.store import open_store
from tests.conftest import wait_for
from tests.saga_helpers import event_types, mutate, step_history, submit, wait_all, wait_status

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def env(database_url):
    """A store and a factory of runners (all stopped at the end)."""
    store = open_store(database_url)
    await store.open()
    runners: list[SagaRunner] = []

    async def runner(workflows, **options):
        options.setdefault("rng", random.Random(1))
        options.setdefault("alerts", RecordingAlerts())
        options.setdefault("poll_interval", 0.2)
        r = SagaRunner(store, workflows, **options)
        runners.append(r)
        await r.start()
        return r

    yield store, runner
    for r in runners:
        await r.stop()
    await store.close()


def noop_chain(name="chain", n=3):
    async def noop(ctx):
        return {"step": ctx.step, "key": ctx.idempotency_key, "deps": sorted(ctx.results)}

    steps = [Step(f"s{i}", noop, depends_on=[f"s{i - 1}"] if i else []) for i in range(n)]
    return Workflow(name, steps)


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


async def test_fencing_refuses_a_stale_owner(env):
    store, runner = env
    release = asyncio.Event()
    attempts: list[str] = []

    async def step(ctx):
        attempts.append(ctx.attempt)
        if len(attempts) == 1:
            await release.wait()  # the first owner is "paused"
            return "stale"
        return "fresh"

    wf = Workflow("fenced", [Step("s", step)])
    # A renews nothing (its heartbeat is far away), so its lease lapses as if paused; with
    # room for one workflow only, it cannot re-claim its own lapsed workflow either.
    a = await runner(
        [wf], instance_id="A", lease_seconds=0.5, heartbeat_interval=3600, max_concurrency=1
    )
    [wid] = await submit(store, wf)
    await wait_for(lambda: attempts, timeout=10)
    b = await runner([wf], instance_id="B", lease_seconds=5)
    record = await wait_status(store, wid, "completed")
    assert record.result == "fresh"
    release.set()
    await wait_for(lambda: a.stats["refused"] >= 1, timeout=10)
    record = await store.get_workflow("t1", wid)
    assert record.result == "fresh" and record.status == "completed"
    succeeded = [h for h in await step_history(store, wid) if h[1] == "succeeded"]
    assert len(succeeded) == 1  # one result recorded
    assert b.stats["claimed"] >= 1


async def test_stopped_runner_releases_and_another_resumes(env):
    store, runner = env
    gate = asyncio.Event()

    async def wait_gate(ctx):
        if ctx.attempt == 1 and not gate.is_set():
            await asyncio.Event().wait()
        return ctx.attempt

    wf = Workflow("handover", [Step("w", wait_gate, retry=RetryPolicy(max_attempts=1))])
    a = await runner([wf], instance_id="A")
    [wid] = await submit(store, wf)
    await wait_for(lambda: a.held, timeout=10)
    await a.stop()
    assert (await store.get_workflow("t1", wid)).lease_owner is None
    gate.set()
    await runner([wf], instance_id="B")
    record = await wait_status(store, wid, "completed")
    assert record.result == 1  # the same attempt, re-run (it was interrupted)
    events = await store.read_workflow_events("t1", wid)
    takeover = [e.data for e in events if e.data.get("status") == "retrying"]
    assert [(d["attempt"], d["error"]) for d in takeover] == [(1, "interrupted: lease taken over")]


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


def _hold_after_commit(store, when):
    """Make ``store.run`` stop after COMMIT, before returning, when ``when(result)`` — as
    if the COMMIT's answer were still on its way. Returns (inside, gate) events."""
    inside, gate = asyncio.Event(), asyncio.Event()
    real_run = store.run

    async def run(fn, **options):
        result = await real_run(fn, **options)
        if not inside.is_set() and when(result):
            inside.set()
            await gate.wait()
        return result

    store.run = run
    real_fenced = store.write_fenced

    async def write_fenced(owner, writes, notifications):
        # The fenced checkpoint commits without store.run: hold it the same way.
        written = await real_fenced(owner, writes, notifications)
        done = [Applied(w.record.key, w.record) for w in writes if w.record.key in written]
        if not inside.is_set() and when(done):
            inside.set()
            await gate.wait()
        return written

    store.write_fenced = write_fenced
    return inside, gate


async def test_stop_lets_the_claim_in_flight_finish_and_releases_it(env):
    # Regression (LB test, SIGTERM drain): stop() cancelled the claimer while a claim
    # was committing, so that lease outlived the instance until it expired.
    store, runner = env
    calls = []

    async def never(ctx):
        calls.append(ctx.attempt)
        await asyncio.Event().wait()

    wf = Workflow("held", [Step("s", never)])
    inside, gate = _hold_after_commit(
        store, lambda result: isinstance(result, list) and result and result[0].held
    )
    r = await runner([wf])
    [wid] = await submit(store, wf)
    await asyncio.wait_for(inside.wait(), 20)  # claimed and committed, answer in flight
    stopping = asyncio.create_task(r.stop())
    await wait_for(lambda: not r._running)
    gate.set()
    await asyncio.wait_for(stopping, 20)
    record = await store.get_workflow("t1", wid)
    assert record.lease_owner is None, "the lease claimed during stop() was kept"
    assert calls == []  # nothing launched by a stopping runner
    assert r.held == {}


async def test_a_stop_cancelled_while_draining_propagates_and_leaves_nothing_running(
    env, monkeypatch
):
    _, runner = env
    r = await runner([noop_chain()])
    draining = asyncio.Event()

    async def drain():
        draining.set()
        await asyncio.Event().wait()  # a commit that never ends

    monkeypatch.setattr(r, "_drain", drain)
    tasks = [r._claim_task, r._write_task, r._beat_task]
    stopping = asyncio.create_task(r.stop())
    await draining.wait()
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping  # the caller's own cancellation is not swallowed
    _, pending = await asyncio.wait(tasks, timeout=5.0)
    assert not pending  # and no background task of the runner keeps running


async def test_stop_launches_nothing_from_the_checkpoints_it_drains(env):
    # Regression (LB test): an outcome committed during stop() started the next step,
    # whose task outlived the runner and the store ("store is not open").
    store, runner = env
    go, b_calls = asyncio.Event(), []

    async def quick(ctx):
        return "one"

    async def a(ctx):
        await go.wait()
        return "a"

    async def b(ctx):
        b_calls.append(ctx.attempt)
        return "b"

    one = Workflow("one", [Step("x", quick)])
    chain = Workflow("chain", [Step("a", a), Step("b", b, depends_on=["a"])])
    [w2] = await submit(store, chain)
    first = await runner([one, chain])
    await wait_for(lambda: ("t1", w2) in first.held)  # a is running
    inside, gate = _hold_after_commit(
        store,
        lambda result: (
            isinstance(result, list)
            and any(
                item.record is not None and item.record.status == "completed" for item in result
            )
        ),
    )
    [w1] = await submit(store, one)
    await asyncio.wait_for(inside.wait(), 20)  # the writer is busy committing w1
    go.set()  # a's outcome queues behind it
    await wait_for(lambda: first._queue)
    stopping = asyncio.create_task(first.stop())
    await wait_for(lambda: not first._running)
    gate.set()
    await asyncio.wait_for(stopping, 20)
    assert b_calls == [], "a stopping runner started step b"
    for wid in (w1, w2):
        assert (await store.get_workflow("t1", wid)).lease_owner is None
    await runner([one, chain])  # another instance finishes the work
    record = await wait_status(store, w2, "completed")
    assert record.state["steps"]["b"]["attempts"] == 1 and b_calls == [1]


async def test_unconfirmed_lease_stops_its_attempts_before_it_can_expire(env, monkeypatch):
    """Regression (chaos seed 3): while the database was restarting, renewals failed, the
    old owner kept running its attempt past the lease, and the instance that took the
    workflow over ran the same attempt at once. An attempt whose lease can no longer be
    confirmed must stop before the lease may expire."""
    from protocol import StorageError

    store, runner = env
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(ctx):
        started.set()
        try:
            await asyncio.Event().wait()  # a long job, until cancelled
        except asyncio.CancelledError:
            cancelled.set()
            raise

    wf = Workflow("slow", [Step("render", slow, timeout=60)])
    r = await runner([wf], lease_seconds=1.0)
    [wid] = await submit(store, wf)
    await asyncio.wait_for(started.wait(), 10)
    assert ("t1", wid) in r.held

    async def down(*args, **kwargs):
        raise StorageError("PostgreSQL is restarting")

    loop = asyncio.get_running_loop()
    lost_at = loop.time()
    monkeypatch.setattr(store, "renew_leases", down)
    await asyncio.wait_for(cancelled.wait(), 10)
    # Stopped before the 1 s lease could have run out for another instance.
    assert loop.time() - lost_at < 1.0
    assert ("t1", wid) not in r.held
    assert r.stats["lost_leases"] >= 1


# ------------------------------------------------- issue 11: no poison batch


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
