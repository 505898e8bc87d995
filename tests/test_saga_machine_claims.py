"""Saga machine: claims, requests, breaker, concurrent branches.

Split from test_saga_machine.py."""

from __future__ import annotations

import pytest
from msgspec.structs import replace

from protocol import WorkflowStatus, events
from sync_server.saga import Step, Workflow
from sync_server.saga.machine import (
    MAX_INTERRUPTS,
    SagaMachine,
    idempotency_key,
    initial_state,
)
from sync_server.saga.sagastate import Requests, WorkflowState
from sync_server.saga.transitions import (
    DeadLetter,
    EmitEvent,
    ResolveDeadLetters,
    RunCompensation,
)
from tests.saga_machine_helpers import act, comps, diamond, kinds, linear, new_machine, runs

pytestmark = pytest.mark.timeout(60)


def test_claim_takes_over_interrupted_attempts_and_applies_requests():
    m = new_machine(linear(attempts=1))
    m.advance(0)
    m.effects_to_apply()
    for n in range(1, MAX_INTERRUPTS + 1):
        m.receive_claim(float(n))
        m.advance(float(n))
        assert runs(m.effects_to_apply()) == [("a", 1)]  # same attempt again
    m.receive_claim(10.0)  # one interruption too many: the attempt failed
    m.advance(10.0)
    fx = m.effects_to_apply()
    assert kinds(fx, DeadLetter)[0].last_error.startswith("interrupted")
    assert m.status == WorkflowStatus.COMPENSATED


def test_claim_applies_cancel_request_and_resumes_compensation():
    m = new_machine(linear())
    m.advance(0)
    m.receive_step_succeeded("a", 1, None, 1)
    m.advance(1)
    m.state = replace(m.state, requests=Requests(cancel=True))
    m.receive_claim(2)
    m.advance(2)
    assert comps(m.effects_to_apply()) == ["a"] and m.state.requests is None
    m.receive_claim(3)  # the compensating instance died
    m.advance(3)
    fx = kinds(m.effects_to_apply(), RunCompensation)
    assert [(e.step, e.attempt) for e in fx] == [("a", 1)]


def test_claim_applies_retry_request():
    m = new_machine(linear(on_failure="park", attempts=1))
    m.advance(0)
    m.receive_step_failed("a", 1, "x", 1)
    m.advance(1)
    m.effects_to_apply()
    m.state = replace(m.state, requests=Requests(retry=True))
    m.receive_claim(2)
    m.advance(2)
    assert runs(m.effects_to_apply()) == [("a", 1)]


def test_a_retry_request_closes_the_dead_letters_it_reruns_first():
    m = new_machine(linear(on_failure="park", attempts=1))
    m.advance(0)
    m.receive_step_failed("a", 1, "x", 1)
    m.advance(1)
    m.effects_to_apply()
    m.state = replace(m.state, dlq=(5, 8), requests=Requests(retry=True))
    m.receive_claim(2)
    m.advance(2)
    fx = m.effects_to_apply()
    assert fx[0] == ResolveDeadLetters((5, 8)) and m.state.dlq == ()
    assert runs(fx) == [("a", 1)]
    m.state = replace(m.state, requests=Requests(cancel=True))  # no retry: none closed
    m.receive_claim(3)
    assert not kinds(m.effects_to_apply(), ResolveDeadLetters)


def test_breaker_defers_without_using_an_attempt():
    wf = Workflow("w", [Step("a", act, breaker="svc")])
    m = new_machine(wf)
    assert m.ready_steps(0) == ["a"]
    m.receive_breaker_open("a", 30.0, "svc", 0)
    m.receive_breaker_open("a", 30.0, "svc", 0)  # announced once only
    m.advance(0)
    fx = m.effects_to_apply()
    assert [e.type for e in fx] == [events.BREAKER_CHANGED]
    assert m.steps["a"].attempts == 0 and m.due_at == 30.0
    m.advance(30.0)
    assert runs(m.effects_to_apply()) == [("a", 1)]
    assert m.steps["a"].deferred is None


def test_diamond_runs_independent_steps_concurrently_and_compensates_in_order():
    m = new_machine(diamond())
    m.advance(0)
    assert runs(m.effects_to_apply()) == [("root", 1)]
    m.receive_step_succeeded("root", 1, None, 1)
    m.advance(1)
    assert runs(m.effects_to_apply()) == [("left", 1), ("right", 1)]
    m.receive_step_succeeded("left", 1, None, 2)
    m.advance(2)
    assert m.effects_to_apply() == [
        EmitEvent(
            events.STEP_CHANGED,
            {"step": "left", "status": "succeeded", "attempt": 1, "error": None, "result": None},
        )
    ]
    m.receive_step_failed("right", 1, "x", 3)
    m.advance(3)
    fx = m.effects_to_apply()
    assert comps(fx) == ["left"]  # root waits for its descendants; right has no undo
    m.receive_compensation_succeeded("left", 1, 4)
    m.advance(4)
    assert comps(m.effects_to_apply()) == ["root"]


def test_failure_waits_for_running_sibling_which_is_then_compensated():
    m = new_machine(diamond())
    m.advance(0)
    m.receive_step_succeeded("root", 1, None, 1)
    m.advance(1)
    m.effects_to_apply()
    m.receive_step_failed("right", 1, "x", 2)  # left still running
    m.advance(2)
    assert m.status == WorkflowStatus.RUNNING and comps(m.effects_to_apply()) == []
    m.receive_step_succeeded("left", 1, None, 3)
    m.advance(3)
    assert m.status == WorkflowStatus.COMPENSATING
    assert comps(m.effects_to_apply()) == ["left"]


def test_sibling_failure_while_halting_is_abandoned():
    m = new_machine(diamond(on_failure="park"))
    m.advance(0)
    m.receive_step_succeeded("root", 1, None, 1)
    m.advance(1)
    m.receive_step_failed("right", 1, "x", 2)
    m.receive_step_failed("left", 1, "y", 2)
    m.advance(2)
    fx = m.effects_to_apply()
    assert len(kinds(fx, DeadLetter)) == 1  # only the exhausted step
    assert m.status == WorkflowStatus.PARKED
    assert m.receive_retry(3) == ["left", "right"]


def test_compensation_attempt_interrupted_then_done():
    m = new_machine(linear(attempts=1))
    m.advance(0)
    m.receive_step_succeeded("a", 1, None, 1)
    m.advance(1)
    m.receive_step_failed("b", 1, "x", 2)
    m.advance(2)
    m.effects_to_apply()
    m.receive_claim(3)
    assert m.running() == []
    m.advance(3)
    assert m.running() == [("a", 1, True)]


def test_workflow_result_of_several_leaves():
    wf = Workflow("w", [Step("x", act), Step("y", act)])
    m = new_machine(wf)
    m.advance(0)
    m.receive_step_succeeded("x", 1, 1, 1)
    m.receive_step_succeeded("y", 1, 2, 1)
    m.advance(1)
    assert m.result == {"x": 1, "y": 2}


def test_helpers():
    assert idempotency_key("w", "s") == "w:s"
    assert idempotency_key("w", "s", compensation=True) == "w:s:compensate"
    # Per tenant (workflow ids are the tenant's own): a fixed-length tag of the tenant.
    mine, theirs = idempotency_key("w", "s", tenant="a"), idempotency_key("w", "s", tenant="b")
    assert mine != theirs and mine.endswith(".w:s") and len(mine) == len("t.w:s") + 16
    assert idempotency_key("w", "s", compensation=True, tenant="a").endswith(".w:s:compensate")
    state = initial_state(linear())
    assert list(state.steps) == ["a", "b", "c"]
    m = SagaMachine(linear(), "w", "running", None)
    assert m.state == WorkflowState({})
