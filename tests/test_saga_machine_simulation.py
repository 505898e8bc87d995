"""Saga machine: randomised simulation and invariants (split from test_saga_machine.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import StepStatus, WorkflowStatus, events
from sync_server.saga import RetryPolicy, Step, Workflow
from sync_server.saga.transitions import (
    EmitEvent,
    RunCompensation,
    RunStep,
)
from tests.saga_machine_helpers import SHAPES, act, comps, new_machine, simulate

pytestmark = pytest.mark.timeout(60)


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
