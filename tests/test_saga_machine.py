"""Unit tests of the pure saga machine: table, scenarios, and Hypothesis simulation.

Split by topic: this file (tables, scenarios), test_saga_machine_claims.py,
test_saga_machine_simulation.py; shared helpers in saga_machine_helpers.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import InvalidTransition, StepStatus, WorkflowStatus, events
from sync_server.saga import RetryPolicy, Step, Workflow, planner
from sync_server.saga.transitions import (
    STEP_TABLE,
    WORKFLOW_TABLE,
    Alert,
    DeadLetter,
    EmitEvent,
    Fx,
    RunCompensation,
    RunStep,
    StepInput,
    WorkflowInput,
    next_step_status,
    next_workflow_status,
    step_move,
    workflow_move,
)
from tests.saga_machine_helpers import (
    SHAPES,
    act,
    comps,
    kinds,
    linear,
    new_machine,
    runs,
    simulate,
)

pytestmark = pytest.mark.timeout(60)
GIVING_UP = {StepInput.EXHAUST, StepInput.COMP_EXHAUST}
DEADLINE = {WorkflowInput.DEADLINE_COMPENSATE, WorkflowInput.DEADLINE_PARK}


@given(st.sampled_from(list(WorkflowStatus)), st.sampled_from(list(WorkflowInput)))
def test_workflow_table_is_total_or_invalid(status, event):
    if (status, event) in WORKFLOW_TABLE:
        move = workflow_move(status, event)
        assert move == WORKFLOW_TABLE[(status, event)]
        assert next_workflow_status(status, event) == move.next
        # the effects of the move: its event (not for a submit: that is intake's own
        # ``workflow.submitted``), and a dead letter and an alert for a deadline
        expected = (Fx.DEAD_LETTER, Fx.ALERT, Fx.EVENT) if event in DEADLINE else (Fx.EVENT,)
        assert move.effects == (() if event == WorkflowInput.SUBMIT else expected)
    else:
        with pytest.raises(InvalidTransition):
            workflow_move(status, event)
        with pytest.raises(InvalidTransition):
            next_workflow_status(status, event)


@given(st.sampled_from(list(StepStatus)), st.sampled_from(list(StepInput)))
def test_step_table_is_total_or_invalid(status, event):
    if (status, event) in STEP_TABLE:
        move = step_move(status, event)
        assert move == STEP_TABLE[(status, event)]
        assert next_step_status(status, event) == move.next
        expected = [Fx.EVENT]
        if event == StepInput.START:
            expected.append(Fx.RUN_STEP)
        if event == StepInput.COMPENSATE:
            expected.append(Fx.RUN_COMPENSATION)
        if event in GIVING_UP:
            expected += [Fx.DEAD_LETTER, Fx.ALERT]
        # a deferral (breaker open, limit full) changes no status and says nothing
        assert list(move.effects) == ([] if event == StepInput.DEFER else expected)
    else:
        with pytest.raises(InvalidTransition):
            step_move(status, event)
        with pytest.raises(InvalidTransition):
            next_step_status(status, event)


def effect_kind(effect):
    if isinstance(effect, EmitEvent):
        assert effect.type in (events.STEP_CHANGED, events.WORKFLOW_CHANGED)
        return Fx.EVENT
    return {
        RunStep: Fx.RUN_STEP,
        RunCompensation: Fx.RUN_COMPENSATION,
        DeadLetter: Fx.DEAD_LETTER,
        Alert: Fx.ALERT,
    }[type(effect)]


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    shape=st.sampled_from(["linear", "diamond", "linear_park", "diamond_park"]),
    cancel_at=st.one_of(st.none(), st.integers(0, 12)),
    claim_every=st.one_of(st.none(), st.integers(2, 7)),
)
def test_the_effects_are_exactly_those_of_the_moves_taken(seed, shape, cancel_at, claim_every):
    """Every effect the machine emits comes from a move of the tables, in order, and
    every move taken has all its effects (progress and breaker notices aside, which are
    no moves and do not happen here)."""
    moves = []

    def recording(lookup):
        def move(status, event):
            found = lookup(status, event)
            moves.append(found)
            return found

        return move

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(planner, "step_move", recording(step_move))
        patch.setattr(planner, "workflow_move", recording(workflow_move))
        m, log = simulate(SHAPES[shape](), seed, cancel_at=cancel_at, claim_every=claim_every)
    assert m.status.terminal
    assert [effect_kind(e) for e in log] == [fx for move in moves for fx in move.effects]


def test_terminal_statuses_have_no_way_out():
    for (status, _event), _next in WORKFLOW_TABLE.items():
        assert not status.terminal or status == WorkflowStatus.FAILED  # failed retries
    assert {s for (s, _e) in WORKFLOW_TABLE} >= {WorkflowStatus.RUNNING, WorkflowStatus.PARKED}


def test_submit_then_linear_success():
    m = new_machine(linear())
    assert m.status == WorkflowStatus.RUNNING and m.due_at == 0.0
    assert all(s.status == "waiting" for s in m.steps.values())
    m.receive_claim(1.0)
    m.advance(1.0)
    fx = m.effects_to_apply()
    assert runs(fx) == [("a", 1)]
    assert kinds(fx, RunStep)[0].idempotency_key == "wf1:a"
    assert m.due_at == 1.0  # running: claimable once the lease expires
    assert m.receive_step_succeeded("a", 1, {"x": 1}, 2.0)
    m.advance(2.0)
    assert runs(m.effects_to_apply()) == [("b", 1)]
    m.receive_step_succeeded("b", 1, 2, 3.0)
    m.advance(3.0)
    m.effects_to_apply()
    m.receive_step_succeeded("c", 1, "done", 4.0)
    m.advance(4.0)
    fx = m.effects_to_apply()
    assert m.status == WorkflowStatus.COMPLETED
    assert m.result == "done" and m.progress == 1.0 and m.due_at is None
    assert fx[-1] == EmitEvent(
        events.WORKFLOW_CHANGED, {"status": "completed", "reason": "all steps succeeded"}
    )


def test_stale_outcomes_are_ignored():
    m = new_machine(linear())
    m.advance(0.0)
    assert not m.receive_step_succeeded("a", 2, None, 1.0)  # wrong attempt
    assert not m.receive_step_succeeded("b", 1, None, 1.0)  # not running
    assert not m.receive_step_failed("zzz", 1, "x", 1.0)  # unknown step
    assert not m.receive_progress("b", 1, 0.5, None, 1.0)
    assert not m.receive_compensation_succeeded("a", 1, 1.0)
    assert not m.receive_compensation_failed("a", 1, "x", 1.0)
    assert m.receive_progress("a", 1, 0.5, "half", 1.0)
    assert m.progress == pytest.approx(0.5 / 3)
    assert m.receive_step_succeeded("a", 1, None, 1.0)
    assert not m.receive_step_succeeded("a", 1, None, 1.0)  # recorded exactly once


def test_retry_with_backoff_then_success():
    m = new_machine(linear(attempts=3))
    m.advance(0.0)
    m.effects_to_apply()
    assert m.receive_step_failed("a", 1, "boom", 10.0)
    m.advance(10.0)
    fx = m.effects_to_apply()
    assert m.steps["a"].status == "retrying" and runs(fx) == []
    assert m.due_at == 11.0  # base 1.0 * attempt 1
    m.advance(10.5)
    assert runs(m.effects_to_apply()) == []
    m.advance(11.0)
    assert runs(m.effects_to_apply()) == [("a", 2)]
    m.receive_step_failed("a", 2, "boom", 12.0, timed_out=True)
    m.advance(12.0)
    assert m.due_at == 14.0


def test_exhaustion_dead_letters_and_compensates_in_reverse_order():
    m = new_machine(linear(attempts=1))
    m.advance(0)
    m.receive_step_succeeded("a", 1, "A", 1)
    m.advance(1)
    m.receive_step_succeeded("b", 1, "B", 2)
    m.advance(2)
    m.effects_to_apply()
    m.receive_step_failed("c", 1, "kaput", 3)
    m.advance(3)
    fx = m.effects_to_apply()
    assert kinds(fx, DeadLetter) == [DeadLetter("c", "attempts_exhausted", 1, "kaput")]
    assert kinds(fx, Alert)[0].kind == "step_failed"
    assert m.status == WorkflowStatus.COMPENSATING
    assert comps(fx) == ["b"]  # a waits for b
    assert kinds(fx, RunCompensation)[0].idempotency_key == "wf1:b:compensate"
    m.receive_compensation_succeeded("b", 1, 4)
    m.advance(4)
    assert comps(m.effects_to_apply()) == ["a"]
    m.receive_compensation_succeeded("a", 1, 5)
    m.advance(5)
    assert m.status == WorkflowStatus.COMPENSATED
    assert [m.steps[s].status for s in "abc"] == ["compensated", "compensated", "failed"]
    assert m.error.startswith("step c failed after 1 attempt(s)")


def test_permanent_error_skips_retries_and_nothing_to_compensate():
    m = new_machine(linear(attempts=5))
    m.advance(0)
    m.receive_step_failed("a", 1, "bad input", 1, permanent=True)
    m.advance(1)
    fx = m.effects_to_apply()
    assert kinds(fx, DeadLetter)[0].reason == "permanent_error"
    assert m.status == WorkflowStatus.COMPENSATED
    assert [m.steps[s].status for s in "abc"] == ["failed", "skipped", "skipped"]


def test_timeout_reason():
    m = new_machine(linear(attempts=1))
    m.advance(0)
    m.receive_step_failed("a", 1, "timed out", 1, timed_out=True)
    assert kinds(m.effects_to_apply(), DeadLetter)[0].reason == "timeout"


def test_compensation_failure_retries_then_fails_and_retry_resumes_it():
    wf = Workflow(
        "w",
        [
            Step("a", act, compensate=act, compensate_retry=RetryPolicy(max_attempts=2)),
            Step("b", act, depends_on=["a"], retry=RetryPolicy(max_attempts=1)),
        ],
    )
    m = new_machine(wf)
    m.advance(0)
    m.receive_step_succeeded("a", 1, None, 1)
    m.advance(1)
    m.receive_step_failed("b", 1, "x", 2)
    m.advance(2)
    assert comps(m.effects_to_apply()) == ["a"]
    m.receive_compensation_failed("a", 1, "refund failed", 3)
    m.advance(3)
    assert comps(m.effects_to_apply()) == []
    assert m.due_at == 3 + 0.5  # comp retry by its policy (base 0.5 * 1)
    m.advance(3.5)
    assert [(e.step, e.attempt) for e in kinds(m.effects_to_apply(), RunCompensation)] == [("a", 2)]
    m.receive_compensation_failed("a", 2, "refund failed", 4)
    m.advance(4)
    fx = m.effects_to_apply()
    assert m.status == WorkflowStatus.FAILED
    assert kinds(fx, DeadLetter) == [DeadLetter("a", "compensation_failed", 2, "refund failed")]
    assert [a.kind for a in kinds(fx, Alert)] == ["compensation_failed"]
    assert "compensation of step a failed" in m.error
    # retry re-runs only the failed compensation
    assert m.receive_retry(5) == ["a"]
    m.advance(5)
    fx = m.effects_to_apply()
    assert m.status == WorkflowStatus.COMPENSATING
    assert [(e.step, e.attempt) for e in kinds(fx, RunCompensation)] == [("a", 1)]
    m.receive_compensation_succeeded("a", 1, 6)
    m.advance(6)
    assert m.status == WorkflowStatus.COMPENSATED


def test_park_then_retry_reruns_only_failed_steps():
    m = new_machine(linear(on_failure="park", attempts=1))
    m.advance(0)
    m.receive_step_succeeded("a", 1, "A", 1)
    m.advance(1)
    m.receive_step_failed("b", 1, "down", 2)
    m.advance(2)
    fx = m.effects_to_apply()
    assert m.status == WorkflowStatus.PARKED and m.due_at is None
    assert comps(fx) == [] and kinds(fx, DeadLetter)
    assert [m.steps[s].status for s in "abc"] == ["succeeded", "failed", "waiting"]
    assert m.receive_retry(3) == ["b"]
    m.advance(3)
    assert runs(m.effects_to_apply()) == [("b", 1)]  # a is not re-run
    assert m.status == WorkflowStatus.RUNNING and m.error is None


def test_retry_of_running_workflow_is_invalid():
    m = new_machine(linear())
    with pytest.raises(InvalidTransition):
        m.receive_retry(1)


def test_cancel_mid_run_compensates_completed_steps_only():
    m = new_machine(linear())
    m.advance(0)
    m.receive_step_succeeded("a", 1, "A", 1)
    m.advance(1)
    m.effects_to_apply()
    m.receive_cancel(2)  # b is running
    m.advance(2)
    fx = m.effects_to_apply()
    assert [m.steps[s].status for s in "abc"] == ["compensating", "failed", "skipped"]
    assert comps(fx) == ["a"]
    assert not m.receive_step_succeeded("b", 1, "late", 3)  # the interrupted attempt
    m.receive_compensation_succeeded("a", 1, 3)
    m.advance(3)
    assert m.status == WorkflowStatus.CANCELLED and m.error == "cancelled"


def test_cancel_with_nothing_to_undo_ends_at_once_and_twice_is_invalid():
    m = new_machine(linear())
    m.receive_cancel(1)
    m.advance(1)
    assert m.status == WorkflowStatus.CANCELLED and m.due_at is None
    with pytest.raises(InvalidTransition):
        m.receive_cancel(2)


def test_cancel_of_parked_workflow():
    m = new_machine(linear(on_failure="park", attempts=1))
    m.advance(0)
    m.receive_step_succeeded("a", 1, None, 1)
    m.advance(1)
    m.receive_step_failed("b", 1, "x", 2)
    m.advance(2)
    m.receive_cancel(3)
    m.advance(3)
    assert comps(m.effects_to_apply()) == ["a"]
