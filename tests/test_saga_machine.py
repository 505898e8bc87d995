"""Unit tests of the pure saga machine: table, scenarios, and Hypothesis simulation."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from protocol import InvalidTransition, StepStatus, WorkflowStatus, events
from sync_server.saga import RetryPolicy, Step, Workflow, planner
from sync_server.saga.inputs import (
    CompensationFailed,
    CompensationSucceeded,
    StepFailed,
    StepSucceeded,
    apply_input,
)
from sync_server.saga.machine import (
    MAX_INTERRUPTS,
    SagaMachine,
    idempotency_key,
    initial_state,
)
from sync_server.saga.sagastate import Requests, WorkflowState
from sync_server.saga.transitions import (
    STEP_TABLE,
    WORKFLOW_TABLE,
    Alert,
    DeadLetter,
    EmitEvent,
    Fx,
    ResolveDeadLetters,
    RunCompensation,
    RunStep,
    StepInput,
    WorkflowInput,
    next_step_status,
    next_workflow_status,
    step_move,
    workflow_move,
)

pytestmark = pytest.mark.timeout(60)


async def act(ctx):
    return None


def linear(on_failure="compensate", attempts=2, compensate=True):
    undo = act if compensate else None
    policy = RetryPolicy(max_attempts=attempts, base_delay=1.0, jitter=False)
    return Workflow(
        "linear",
        [
            Step("a", act, compensate=undo, retry=policy),
            Step("b", act, depends_on=["a"], compensate=undo, retry=policy),
            Step("c", act, depends_on=["b"], compensate=undo, retry=policy),
        ],
        on_failure=on_failure,
    )


def diamond(on_failure="compensate"):
    policy = RetryPolicy(max_attempts=1)
    return Workflow(
        "diamond",
        [
            Step("root", act, compensate=act, retry=policy),
            Step("left", act, depends_on=["root"], compensate=act, retry=policy),
            Step("right", act, depends_on=["root"], retry=policy),
            Step("join", act, depends_on=["left", "right"], compensate=act, retry=policy),
        ],
        on_failure=on_failure,
    )


def fixed_delay(policy, attempt):
    return policy.base_delay * attempt


def new_machine(workflow, now=0.0):
    machine = SagaMachine(workflow, "wf1", WorkflowStatus.PENDING, {}, delay=fixed_delay)
    machine.receive_submit(now)
    return machine


def runs(effects):
    return [(e.step, e.attempt) for e in effects if isinstance(e, RunStep)]


def comps(effects):
    return [e.step for e in effects if isinstance(e, RunCompensation)]


def kinds(effects, kind):
    return [e for e in effects if isinstance(e, kind)]


# ------------------------------------------------------------------ the table


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


# ------------------------------------------------------------------ scenarios


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


# ------------------------------------------------------------------ simulation

SHAPES = {
    "linear": lambda: linear(attempts=3),
    "diamond": diamond,
    "linear_park": lambda: linear(on_failure="park", attempts=2),
    "diamond_park": lambda: diamond(on_failure="park"),
}


def simulate(workflow, seed, *, cancel_at=None, claim_every=None, retry_parked=True):
    """Drive the machine with random outcomes; return the machine and its effect log."""
    rng = random.Random(seed)
    m = new_machine(workflow)
    log = []
    now = 0.0
    for tick in itertools.count():
        if tick > 500:
            raise AssertionError("workflow did not end")
        if claim_every and tick % claim_every == 0 and not m.status.terminal:
            m.receive_claim(now)
        if cancel_at == tick and not m.status.terminal:
            m.receive_cancel(now)
        m.advance(now)
        log.extend(m.effects_to_apply())
        if m.status.terminal:
            return m, log
        if m.status == WorkflowStatus.PARKED:
            if not retry_parked:
                return m, log
            m.receive_retry(now)
            continue
        running = m.running()
        if not running:
            assert m.due_at is not None and m.due_at > now
            now = m.due_at
            continue
        step, attempt, compensation = rng.choice(running)
        roll = rng.random()
        if compensation:
            if roll < 0.8:
                item = CompensationSucceeded(step, attempt)
            else:
                item = CompensationFailed(step, attempt, "undo failed")
        elif roll < 0.6:
            item = StepSucceeded(step, attempt, {"step": step})
        elif roll < 0.65:
            item = StepFailed(step, attempt, "permanent", permanent=True)
        else:
            item = StepFailed(step, attempt, "flaky", timed_out=roll > 0.9)
        assert apply_input(m, item, now)
        assert not apply_input(m, item, now)  # the same outcome twice: recorded once
        now += 0.25
    raise AssertionError("unreachable")


def check_invariants(workflow, m, log):
    started = {(e.step, e.attempt) for e in log if isinstance(e, RunStep)}
    succeeded_events = [
        e.fields["step"]
        for e in log
        if isinstance(e, EmitEvent)
        and e.type == events.STEP_CHANGED
        and e.fields["status"] == "succeeded"
    ]
    # results recorded exactly once per success; compensation only of succeeded steps
    compensated = [e.step for e in log if isinstance(e, RunCompensation)]
    for step in set(compensated):
        assert step in succeeded_events
        assert workflow.steps[step].compensate is not None
    # reverse dependency order: a step's compensation starts after its dependents' ended
    first_comp = {}
    for i, e in enumerate(log):
        if isinstance(e, RunCompensation):
            first_comp.setdefault(e.step, i)
    done_at = {}
    for i, e in enumerate(log):
        compensated = isinstance(e, EmitEvent) and e.type == events.STEP_CHANGED
        if compensated and e.fields["status"] == "compensated":
            done_at[e.fields["step"]] = i
    for step, i in first_comp.items():
        for dependent in workflow.dependents[step]:
            if dependent in first_comp and dependent in done_at:
                assert done_at[dependent] < i
    assert all(attempt >= 1 for _s, attempt in started)
    if m.status == WorkflowStatus.COMPLETED:
        assert all(s.status == "succeeded" for s in m.steps.values())
    if m.status == WorkflowStatus.COMPENSATED:
        for name, s in m.steps.items():
            if workflow.steps[name].compensate is not None:
                assert s.status != "succeeded"
    for s in m.steps.values():
        assert s.status in set(StepStatus)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    shape=st.sampled_from(["linear", "diamond", "linear_park", "diamond_park"]),
    cancel_at=st.one_of(st.none(), st.integers(0, 12)),
    claim_every=st.one_of(st.none(), st.integers(2, 7)),
)
def test_simulation_always_ends_with_invariants(seed, shape, cancel_at, claim_every):
    workflow = SHAPES[shape]()
    m, log = simulate(workflow, seed, cancel_at=cancel_at, claim_every=claim_every)
    assert m.status.terminal
    check_invariants(workflow, m, log)


def test_independent_branches_compensate_concurrently():
    wf = Workflow(
        "fork",
        [
            Step("root", act, compensate=act),
            Step("x", act, depends_on=["root"], compensate=act),
            Step("y", act, depends_on=["root"], compensate=act),
            Step("z", act, depends_on=["x", "y"], retry=RetryPolicy(max_attempts=1)),
        ],
    )
    m = new_machine(wf)
    m.advance(0)
    m.receive_step_succeeded("root", 1, None, 1)
    m.advance(1)
    m.receive_step_succeeded("x", 1, None, 2)
    m.receive_step_succeeded("y", 1, None, 2)
    m.advance(2)
    m.receive_step_failed("z", 1, "x", 3)
    m.advance(3)
    assert sorted(comps(m.effects_to_apply())) == ["x", "y"]
    m.receive_compensation_succeeded("y", 1, 4)
    m.advance(4)  # x still compensating: root waits
    assert comps(m.effects_to_apply()) == [] and m.ready_steps(4) == []
    m.receive_compensation_succeeded("x", 1, 5)
    m.advance(5)
    assert comps(m.effects_to_apply()) == ["root"]
