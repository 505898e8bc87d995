"""SagaRunner: fencing, leases and stopping (split from test_saga_runner.py)."""

from __future__ import annotations

import asyncio

import pytest

from sync_server.saga import RetryPolicy, Step, Workflow
from sync_server.saga.checkpoint import Applied
from tests import saga_runner_helpers
from tests.conftest import wait_for
from tests.saga_helpers import step_history, submit, wait_status
from tests.saga_runner_helpers import noop_chain

# The shared fixture, bound here for pytest to find (importing it by name trips F811).
env = saga_runner_helpers.env
pytestmark = pytest.mark.timeout(60)


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
