"""The pure part of a checkpoint (``sync_server.saga.decide``): no store, no awaits."""

from __future__ import annotations

import inspect

import pytest

from sync_server.saga import RetryPolicy, Step, Workflow, decide
from sync_server.saga.backoff import no_delay
from sync_server.saga.breaker import BreakerPolicy
from sync_server.saga.decide import BreakerChange, Input, prepare
from sync_server.saga.inputs import StepFailed, StepSucceeded
from sync_server.saga.limits import Admission
from sync_server.saga.machine import RunStep, SagaMachine
from sync_server.store.base import BreakerRecord, WorkflowRecord

pytestmark = pytest.mark.timeout(10)

POLICY = BreakerPolicy(failure_threshold=1, reset_timeout=30.0)


async def _call(ctx):
    return None


WF = Workflow(
    "g",
    [
        Step("call", _call, breaker="svc", retry=RetryPolicy(max_attempts=2)),
        Step("next", _call, depends_on=["call"], limit="slots"),
    ],
)


def _record() -> WorkflowRecord:
    machine = SagaMachine(WF, "w1", "pending", {}, tenant="t1")
    machine.receive_submit(0.0)
    return WorkflowRecord(
        id="w1", tenant="t1", name="g", status=machine.status.value, state=machine.encoded_state()
    )


def test_the_module_is_pure():
    source = inspect.getsource(decide)
    assert "async " not in source and "await " not in source


def test_a_ready_guarded_step_needs_its_breaker_and_an_open_one_defers_it():
    record = _record()
    draft = prepare(WF, record, [], 10.0, no_delay, claimed=True)
    assert draft.breakers_needed(10.0) == {"svc"}
    current = {"svc": BreakerRecord(name="svc", state="open", failures=1, opened_at=5.0)}
    gate = draft.gate_breakers(current, lambda name: POLICY, "me", 10.0)
    assert gate.changes == [] and gate.records == {} and gate.seen == {"svc": "open"}
    effects = draft.finish({}, 10.0)
    assert not any(isinstance(e, RunStep) for e in effects)
    assert draft.machine.steps["call"].deferred == "svc"
    assert record.state["steps"]["call"].get("deferred") is None  # the row is untouched


def test_a_guarded_failure_opens_the_breaker_as_a_returned_change():
    draft = prepare(WF, _record(), [], 10.0, no_delay, claimed=True)
    draft.gate_breakers({}, lambda name: POLICY, "me", 10.0)
    [run] = [e for e in draft.finish({}, 10.0) if isinstance(e, RunStep)]
    started = WorkflowRecord(
        id="w1", tenant="t1", name="g", status=draft.machine.status.value,
        state=draft.machine.encoded_state(),
    )  # fmt: skip
    failed = Input(StepFailed("call", run.attempt, "503"), "w1", 1, breaker="svc", tenant="t1")
    again = prepare(WF, started, [failed], 11.0, no_delay)
    closed = {"svc": BreakerRecord(name="svc")}
    gate = again.gate_breakers(closed, lambda name: POLICY, "me", 11.0)
    assert gate.changes == [BreakerChange("svc", "open")]
    assert gate.records["svc"].state == "open"
    assert closed["svc"].state == "closed"  # the prefetched records are not changed


def test_limits_admit_or_defer_the_ready_steps_named():
    draft = prepare(WF, _record(), [], 10.0, no_delay, claimed=True)
    assert draft.steps_to_admit({"slots": object()}, 10.0) == []  # "next" is not ready
    draft.gate_breakers({}, lambda name: POLICY, "me", 10.0)
    draft.finish({}, 10.0)
    ok = Input(StepSucceeded("call", 1), "w1", 1, breaker="svc", tenant="t1")
    started = WorkflowRecord(
        id="w1", tenant="t1", name="g", status=draft.machine.status.value,
        state=draft.machine.encoded_state(),
    )  # fmt: skip
    after = prepare(WF, started, [ok], 11.0, no_delay)
    assert after.steps_to_admit({"slots": object()}, 11.0) == [("next", "slots")]
    after.finish({"next": ("slots", Admission(False, 20.0))}, 11.0)
    assert after.machine.steps["next"].deferred == "limit:slots"
