"""Workflow deadlines: the machine's ``receive_deadline`` input, and the runner on both
backends cancelling a running step when the deadline passes."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from msgspec.structs import replace

from protocol import WorkflowStatus, events
from sync_server.saga import RetryPolicy, Step, Workflow, intake
from sync_server.saga.alerts import RecordingAlerts
from sync_server.saga.machine import SagaMachine
from sync_server.saga.runner import SagaRunner
from sync_server.saga.transitions import Alert, DeadLetter, RunCompensation, RunStep
from sync_server.store import open_store
from tests.conftest import wait_for
from tests.saga_helpers import mutate, step_history, submit, wait_status

pytestmark = pytest.mark.timeout(60)


async def act(ctx):
    return None


def pipeline(on_failure="compensate", deadline=None):
    return Workflow(
        "pipeline",
        [
            Step("a", act, compensate=act),
            Step("b", act, depends_on=["a"], compensate=act),
            Step("c", act, depends_on=["b"]),
        ],
        on_failure=on_failure,
        deadline=deadline,
    )


def started(workflow, now=0.0, deadline=None):
    machine = SagaMachine(workflow, "wf1", WorkflowStatus.PENDING, {})
    machine.receive_submit(now, deadline=deadline)
    return machine


# ------------------------------------------------------------------ the machine


def test_the_shorter_of_definition_and_submit_deadline_wins():
    assert started(pipeline(deadline=30), 100.0).state.deadline_at == 130.0
    assert started(pipeline(deadline=30), 100.0, deadline=5).state.deadline_at == 105.0
    assert started(pipeline(deadline=5), 100.0, deadline=30).state.deadline_at == 105.0
    assert started(pipeline(), 100.0, deadline=7).state.deadline_at == 107.0
    assert started(pipeline(), 100.0).state.deadline_at is None


def test_deadline_is_part_of_due_at_while_nothing_runs():
    m = started(pipeline(deadline=10), 0.0)
    m.advance(0.0)
    [run] = [e for e in m.effects_to_apply() if isinstance(e, RunStep)]
    m.receive_step_failed("a", run.attempt, "boom", 1.0)  # retry due at 1.0 + backoff
    m.steps["a"] = replace(m.steps["a"], due_at=50.0)  # a long backoff: the deadline comes first
    m.advance(1.0)
    assert m.due_at == 10.0


def test_deadline_stops_the_running_step_and_compensates_with_a_dead_letter():
    m = started(pipeline(deadline=10), 0.0)
    m.advance(0.0)
    m.effects_to_apply()
    assert m.receive_step_succeeded("a", 1, "A", 1.0)
    m.advance(1.0)
    m.effects_to_apply()  # b runs now
    assert not m.receive_deadline(9.99)
    assert m.receive_deadline(10.0)
    m.advance(10.0)
    fx = m.effects_to_apply()
    assert m.status == WorkflowStatus.COMPENSATING
    assert m.steps["b"].status == "failed" and m.steps["b"].error == "deadline exceeded"
    assert m.steps["c"].status == "skipped"
    [letter] = [e for e in fx if isinstance(e, DeadLetter)]
    assert letter.reason == "deadline_exceeded" and letter.step == "b"
    assert any(isinstance(e, Alert) and e.kind == "deadline_exceeded" for e in fx)
    changes = [e.fields for e in fx if getattr(e, "type", None) == events.WORKFLOW_CHANGED]
    assert changes[0]["reason"] == "deadline exceeded; compensating"
    assert [e.step for e in fx if isinstance(e, RunCompensation)] == ["a"]  # only a finished
    assert not m.receive_deadline(11.0)  # applies once


def test_deadline_parks_by_on_failure_and_a_retry_runs_without_it():
    m = started(pipeline("park", deadline=5), 0.0)
    m.advance(0.0)
    m.effects_to_apply()
    assert m.receive_deadline(6.0)
    m.advance(6.0)
    m.effects_to_apply()
    assert m.status == WorkflowStatus.PARKED and m.due_at is None
    assert m.steps["a"].status == "failed" and m.steps["b"].status == "skipped"
    assert sorted(m.receive_retry(7.0)) == ["a", "b", "c"]
    m.advance(7.0)
    assert [e.step for e in m.effects_to_apply() if isinstance(e, RunStep)] == ["a"]
    assert not m.receive_deadline(1000.0)


def test_no_deadline_after_the_workflow_stopped_running():
    m = started(pipeline(deadline=5), 0.0)
    m.receive_cancel(1.0)
    assert not m.receive_deadline(6.0)


# ------------------------------------------------------------------ the runner


@pytest.fixture
async def env(database_url):
    store = open_store(database_url)
    await store.open()
    runners: list[SagaRunner] = []

    async def runner(workflows, **options):
        r = SagaRunner(store, workflows, rng=random.Random(1), alerts=RecordingAlerts(), **options)
        runners.append(r)
        await r.start()
        return r

    yield store, runner
    for r in runners:
        await r.stop()
    await store.close()


def slow_pipeline(on_failure, cancelled, deadline=None):
    async def slow(ctx):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(ctx.step)
            raise

    undone: list[str] = []

    async def undo(ctx):
        undone.append(ctx.step)

    wf = Workflow(
        "slow",
        [
            Step("quick", act, compensate=undo),
            Step("slow", slow, depends_on=["quick"], retry=RetryPolicy(max_attempts=5)),
        ],
        on_failure=on_failure,
        deadline=deadline,
    )
    return wf, undone


async def test_runner_cancels_the_running_step_at_the_deadline_and_compensates(env):
    store, runner = env
    cancelled: list[str] = []
    wf, undone = slow_pipeline("compensate", cancelled, deadline=30)
    await runner([wf])
    [wid] = await submit(store, wf, deadline=0.6)  # the submit's deadline is shorter
    record = await wait_status(store, wid, "compensated", timeout=15)
    assert cancelled == ["slow"] and undone == ["quick"]
    assert record.error is not None and "deadline exceeded" in record.error
    history = await step_history(store, wid)
    assert ("slow", "failed", 1) in history  # one attempt, not retried
    [letter] = await store.list_dlq(status=None)
    assert letter.workflow_id == wid and letter.reason == "deadline_exceeded"
    assert letter.step == "slow"
    reasons = [
        e.data.get("reason")
        for e in await store.read_workflow_events("t1", wid)
        if e.type == "workflow.status"
    ]
    assert "deadline exceeded; compensating" in reasons


async def test_deadline_is_persisted_for_whichever_instance_claims_next(env):
    """The deadline is persisted (``due_at``): a workflow nobody holds when it passes —
    no instance was up — is parked by ``on_failure`` by the next one that claims it."""
    store, runner = env
    cancelled: list[str] = []
    wf, _ = slow_pipeline("park", cancelled)
    [wid] = await submit(store, wf, deadline=1.0)
    # Nobody runs it: the first claim happens after the deadline, on a fresh instance.
    record = await store.get_workflow("t1", wid)
    assert record.due_at is not None
    deadline_at = record.state["deadline_at"]

    async def past() -> bool:
        return time.time() > deadline_at

    await wait_for(past, timeout=5)
    await runner([wf])
    record = await wait_status(store, wid, "parked", timeout=10)
    assert record.state["steps"]["quick"]["status"] == "skipped"
    assert cancelled == []  # nothing ran: the deadline was already gone
    [letter] = await store.list_dlq()
    assert letter.reason == "deadline_exceeded" and letter.step is None
    # A retry runs again, without the deadline.
    await mutate(store, wid, intake.request_retry)
    await wait_for(
        lambda: _status(store, wid, "running", "slow"), timeout=10, message="retry runs slow"
    )


async def _status(store, wid, status, step):
    record = await store.get_workflow("t1", wid)
    return record.status == status and record.state["steps"][step]["status"] == "running"
