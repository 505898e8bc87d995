"""The canonical rule on a job source's ``failed`` report, and the machine's ``fail``
repair (pure: no store, no sockets)."""

from __future__ import annotations

import uuid

from msgspec.structs import replace

from sync_server.reconcile import ReconcileRules, decide
from sync_server.saga import RetryPolicy, Step, Workflow
from sync_server.saga.machine import SagaMachine
from sync_server.saga.sagastate import FailRepair, Job, Requests
from sync_server.store.base import WorkflowRecord

RULES = ReconcileRules()


def record(step_status="running", attempts=1, status="running", **detail) -> WorkflowRecord:
    report = {"status": "failed", "at": 5.0, "detail": {"step": "render", **detail}}
    return WorkflowRecord(
        id=str(uuid.uuid4()),
        tenant="acme",
        name="generate",
        status=status,
        state={
            "steps": {"render": {"status": step_status, "attempts": attempts}},
            "reports": {"job-queue": report},
        },
    )


def test_a_failed_job_of_a_running_step_fails_the_attempt():
    repair = decide(record(attempt=1, error="SIGTERM"), RULES)
    assert (repair.kind, repair.step, repair.result) == ("fail", "render", "SIGTERM")


def test_a_failure_already_known_or_of_an_older_attempt_changes_nothing():
    assert decide(record(step_status="retrying", attempt=1), RULES).kind == "none"
    assert decide(record(attempts=2, attempt=1), RULES).kind == "none"
    assert decide(record(status="completed", step_status="succeeded"), RULES).kind == (
        "unappliable"
    )


async def _noop(ctx):
    return None


def test_the_fail_repair_counts_as_a_failed_attempt_and_retries():
    workflow = Workflow(
        "generate", [Step("render", _noop, retry=RetryPolicy(max_attempts=2, jitter=False))]
    )
    machine = SagaMachine(workflow, "w1", "pending", {})
    machine.receive_submit(0.0)
    machine.advance(0.0)
    assert machine.steps["render"].status == "running"
    machine.state = replace(
        machine.state, requests=Requests(fail=(FailRepair("render", "SIGTERM"),))
    )
    machine.receive_claim(1.0)
    step = machine.steps["render"]
    assert step.status == "retrying" and "SIGTERM" in step.error
    assert step.attempts == 1
    assert not machine.receive_job_failed("render", "again", 1.0)  # not running: no-op
    machine.advance(2.0)
    assert machine.steps["render"].status == "running"
    assert machine.receive_job_failed("render", "x" * 1_000_000, 2.0)  # a source's text
    assert len(machine.steps["render"].error) < 2100  # bounded in the state


def test_a_recorded_job_is_kept_only_for_the_current_attempt():
    workflow = Workflow("generate", [Step("render", _noop)])
    machine = SagaMachine(workflow, "w1", "pending", {})
    machine.receive_submit(0.0)
    machine.advance(0.0)
    job = {"source": "job-queue", "adapter": "emp-job-queue"}
    assert not machine.receive_job("render", 2, job)  # not the current attempt
    assert machine.steps["render"].job is None
    assert machine.receive_job("render", 1, job)
    assert machine.steps["render"].job == Job(**job)
