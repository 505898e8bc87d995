"""Compensation planning: which compensations may start now (pure, no I/O).

Theory of operation
-------------------
When a workflow compensates, the steps that succeeded and have a compensation are
undone in reverse dependency order (SPEC promise 3): a step's compensation starts only
once every step that (transitively) depends on it has finished compensating, and
nothing is undone while a forward step may still succeed. ``SagaMachine`` asks
``plan_compensations`` on every ``advance`` of a compensating workflow and carries out
the plan (``machine.py``); the plan never changes state itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from protocol import StepStatus
from sync_server.saga.definitions import Workflow
from sync_server.saga.sagastate import StepState

__all__ = ["CompensationPlan", "descendants", "needs_compensation", "plan_compensations"]

S = StepStatus
# Enum members as constants: ``StepStatus.RUNNING`` is a descriptor call on every use.
_S_COMPENSATING = StepStatus.COMPENSATING
_S_RUNNING = StepStatus.RUNNING
_S_SUCCEEDED = StepStatus.SUCCEEDED


@dataclass(frozen=True, slots=True)
class CompensationPlan:
    """What a compensating workflow does next.

    Attributes:
        start: steps whose compensation starts now (reverse definition order).
        failed: some compensation used its last attempt (the workflow fails).
        pending: some step still needs its compensation (started or not).
        blocked: a forward step still runs: nothing may start or settle yet.
    """

    start: list[str]
    failed: bool
    pending: bool
    blocked: bool = False


def needs_compensation(workflow: Workflow, steps: Mapping[str, StepState], name: str) -> bool:
    """Succeeded with a compensation not yet done, or compensating now."""
    status = steps[name].status
    if status is _S_COMPENSATING:
        return True
    return status is _S_SUCCEEDED and workflow.steps[name].compensate is not None


def descendants(workflow: Workflow, name: str) -> set[str]:
    """Every step that depends on ``name``, directly or transitively."""
    seen: set[str] = set()
    stack = list(workflow.dependents[name])
    while stack:
        nxt = stack.pop()
        if nxt not in seen:
            seen.add(nxt)
            stack.extend(workflow.dependents[nxt])
    return seen


def plan_compensations(
    workflow: Workflow, steps: Mapping[str, StepState], now: float
) -> CompensationPlan:
    """The compensations that may start at ``now`` (see the module docstring)."""
    if any(s.status is _S_RUNNING for s in steps.values()):
        return CompensationPlan([], False, True, blocked=True)
    failed = any(s.comp is not None and s.comp.exhausted for s in steps.values())
    pending = [n for n in workflow.step_names if needs_compensation(workflow, steps, n)]
    start: list[str] = []
    if not failed:
        for name in reversed(pending):
            comp = steps[name].comp
            if comp is not None and comp.running:
                continue
            due = comp.due_at if comp is not None else None
            if due is not None and due > now:
                continue
            if any(needs_compensation(workflow, steps, d) for d in descendants(workflow, name)):
                continue
            start.append(name)
    return CompensationPlan(start, failed, bool(pending))
