"""Helpers shared by the test_saga_machine test files (moved from test_saga_machine.py)."""

from __future__ import annotations

import itertools
import random

from protocol import WorkflowStatus
from sync_server.saga import RetryPolicy, Step, Workflow
from sync_server.saga.inputs import (
    CompensationFailed,
    CompensationSucceeded,
    StepFailed,
    StepSucceeded,
    apply_input,
)
from sync_server.saga.machine import (
    SagaMachine,
)
from sync_server.saga.transitions import (
    RunCompensation,
    RunStep,
)


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
