"""The one transition table of the saga engine, and the effects the machine emits.

Theory of operation
-------------------
Workflow and step statuses (SPEC's vocabularies, ``protocol.status``) change only
through ``WORKFLOW_TABLE`` and ``STEP_TABLE``: ``(status, input) -> Move(next status,
effects)``. Any pair missing from a table raises ``InvalidTransition`` (STYLE:
transitions are a table; see h11's ``_state.py``). A move's ``effects`` say what the
shell must do for it, in order (``Fx``): the status event, the attempt to start, the
dead letter and the alert of giving up; the machine (``planner.MachineBase``) builds
exactly those and nothing else for a move. Three effects are not moves and so not in
the tables: a step's durable progress (``workflow.progress``), the first deferral of a
ready step by an open breaker (``breaker.changed``), and closing the dead letters a
retry request re-runs (``ResolveDeadLetters``, at the claim that applies it).
``SagaMachine`` (``machine.py``) is the only caller; the effects defined here are what
it asks its shell to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from protocol import InvalidTransition, StepStatus, WorkflowStatus
from protocol.jsontypes import JSON

__all__ = [
    "COMPENSATION_INPUTS",
    "STEP_TABLE",
    "WORKFLOW_TABLE",
    "Alert",
    "DeadLetter",
    "Effect",
    "EmitEvent",
    "Fx",
    "Move",
    "ResolveDeadLetters",
    "RunCompensation",
    "RunStep",
    "StepInput",
    "WorkflowInput",
    "next_step_status",
    "next_workflow_status",
    "step_move",
    "workflow_move",
]

W = WorkflowStatus
S = StepStatus


class WorkflowInput(StrEnum):
    """What can happen to a workflow as a whole."""

    SUBMIT = "submit"
    COMPLETE = "complete"
    HALT_COMPENSATE = "halt_compensate"
    HALT_PARK = "halt_park"
    CANCEL = "cancel"
    RETRY = "retry"
    COMPENSATION_DONE = "compensation_done"
    CANCEL_DONE = "cancel_done"
    COMPENSATION_FAILED = "compensation_failed"
    DEADLINE_COMPENSATE = "deadline_compensate"  # the deadline passed; on_failure=compensate
    DEADLINE_PARK = "deadline_park"  # the deadline passed; on_failure=park


class StepInput(StrEnum):
    """What can happen to one step."""

    START = "start"
    SUCCEED = "succeed"
    FAIL = "fail"  # an attempt failed and another is allowed
    EXHAUST = "exhaust"  # the last attempt failed, or a permanent error
    ABANDON = "abandon"  # failed while the workflow is already halting: no retry
    INTERRUPT = "interrupt"  # its lease holder vanished mid-attempt
    CANCEL = "cancel"
    SKIP = "skip"  # never ran and never will (the workflow compensates)
    DEFER = "defer"  # an open circuit breaker or a full limit postponed it; no attempt used
    DEADLINE = "deadline"  # the workflow's deadline passed: stop it (running) or skip it
    RETRY = "retry"  # retry_workflow / DLQ requeue
    COMPENSATE = "compensate"
    COMPENSATED = "compensated"
    COMP_FAIL = "comp_fail"
    COMP_EXHAUST = "comp_exhaust"
    COMP_INTERRUPT = "comp_interrupt"
    COMP_RETRY = "comp_retry"  # retry_workflow after a compensation failed
    RECONCILE = "reconcile"  # the job source says the step's job completed (lost callback)


WI = WorkflowInput
SI = StepInput


class Fx(StrEnum):
    """The kinds of effect a move asks the shell for (in the order listed in its move)."""

    EVENT = "event"  # a ``step.status`` / ``workflow.status`` event (``EmitEvent``)
    RUN_STEP = "run_step"  # start the attempt (``RunStep``)
    RUN_COMPENSATION = "run_compensation"  # start the compensation's attempt
    DEAD_LETTER = "dead_letter"  # file a dead letter (``DeadLetter``)
    ALERT = "alert"  # tell a human (``Alert``)


class Move(NamedTuple):
    """One row of a transition table: the next status and the effects of the move."""

    next: Any  # WorkflowStatus in WORKFLOW_TABLE, StepStatus in STEP_TABLE
    effects: tuple[Fx, ...] = (Fx.EVENT,)


_QUIET: tuple[Fx, ...] = ()
_GIVE_UP = (Fx.DEAD_LETTER, Fx.ALERT, Fx.EVENT)
_STEP_GIVES_UP = (Fx.EVENT, Fx.DEAD_LETTER, Fx.ALERT)

WORKFLOW_TABLE: dict[tuple[WorkflowStatus, WorkflowInput], Move] = {
    (W.PENDING, WI.SUBMIT): Move(W.RUNNING, _QUIET),  # the submit event is intake's
    (W.RUNNING, WI.COMPLETE): Move(W.COMPLETED),
    (W.RUNNING, WI.HALT_COMPENSATE): Move(W.COMPENSATING),
    (W.RUNNING, WI.HALT_PARK): Move(W.PARKED),
    (W.RUNNING, WI.CANCEL): Move(W.COMPENSATING),
    (W.PARKED, WI.CANCEL): Move(W.COMPENSATING),
    (W.COMPENSATING, WI.CANCEL): Move(W.COMPENSATING),
    (W.PARKED, WI.RETRY): Move(W.RUNNING),
    (W.FAILED, WI.RETRY): Move(W.COMPENSATING),  # re-run the compensations that failed
    (W.COMPENSATING, WI.COMPENSATION_DONE): Move(W.COMPENSATED),
    (W.COMPENSATING, WI.CANCEL_DONE): Move(W.CANCELLED),
    (W.COMPENSATING, WI.COMPENSATION_FAILED): Move(W.FAILED),
    (W.RUNNING, WI.DEADLINE_COMPENSATE): Move(W.COMPENSATING, _GIVE_UP),
    (W.RUNNING, WI.DEADLINE_PARK): Move(W.PARKED, _GIVE_UP),
}
"""Every allowed workflow move, ``(status, input) -> (next status, effects)``; nothing
else may happen."""

STEP_TABLE: dict[tuple[StepStatus, StepInput], Move] = {
    (S.WAITING, SI.START): Move(S.RUNNING, (Fx.EVENT, Fx.RUN_STEP)),
    (S.RETRYING, SI.START): Move(S.RUNNING, (Fx.EVENT, Fx.RUN_STEP)),
    (S.RUNNING, SI.SUCCEED): Move(S.SUCCEEDED),
    (S.RUNNING, SI.RECONCILE): Move(S.SUCCEEDED),
    (S.RETRYING, SI.RECONCILE): Move(S.SUCCEEDED),
    (S.RUNNING, SI.FAIL): Move(S.RETRYING),
    (S.RUNNING, SI.EXHAUST): Move(S.FAILED, _STEP_GIVES_UP),
    (S.RUNNING, SI.ABANDON): Move(S.FAILED),
    (S.RUNNING, SI.INTERRUPT): Move(S.RETRYING),
    (S.RUNNING, SI.CANCEL): Move(S.FAILED),
    (S.WAITING, SI.CANCEL): Move(S.SKIPPED),
    (S.RETRYING, SI.CANCEL): Move(S.SKIPPED),
    (S.WAITING, SI.SKIP): Move(S.SKIPPED),
    (S.RETRYING, SI.SKIP): Move(S.SKIPPED),
    (S.WAITING, SI.DEFER): Move(S.WAITING, _QUIET),
    (S.RETRYING, SI.DEFER): Move(S.RETRYING, _QUIET),
    (S.FAILED, SI.RETRY): Move(S.WAITING),
    (S.SKIPPED, SI.RETRY): Move(S.WAITING),
    (S.SUCCEEDED, SI.COMPENSATE): Move(S.COMPENSATING, (Fx.EVENT, Fx.RUN_COMPENSATION)),
    # a retry of the compensation:
    (S.COMPENSATING, SI.COMPENSATE): Move(S.COMPENSATING, (Fx.EVENT, Fx.RUN_COMPENSATION)),
    (S.COMPENSATING, SI.COMPENSATED): Move(S.COMPENSATED),
    (S.COMPENSATING, SI.COMP_FAIL): Move(S.COMPENSATING),
    (S.COMPENSATING, SI.COMP_INTERRUPT): Move(S.COMPENSATING),
    (S.COMPENSATING, SI.COMP_EXHAUST): Move(S.FAILED, _STEP_GIVES_UP),
    (S.FAILED, SI.COMP_RETRY): Move(S.COMPENSATING),
    (S.RUNNING, SI.DEADLINE): Move(S.FAILED),
    (S.WAITING, SI.DEADLINE): Move(S.SKIPPED),
    (S.RETRYING, SI.DEADLINE): Move(S.SKIPPED),
}
"""Every allowed step move, ``(status, input) -> (next status, effects)``; nothing else
may happen."""


def workflow_move(status: WorkflowStatus, event: WorkflowInput) -> Move:
    """Look a workflow move up in ``WORKFLOW_TABLE``.

    Raises:
        InvalidTransition: the pair is not in the table.
    """
    try:
        return WORKFLOW_TABLE[(status, event)]
    except KeyError:
        raise InvalidTransition(f"workflow cannot {event} while {status}") from None


def step_move(status: StepStatus, event: StepInput) -> Move:
    """Look a step move up in ``STEP_TABLE``.

    Raises:
        InvalidTransition: the pair is not in the table.
    """
    try:
        return STEP_TABLE[(status, event)]
    except KeyError:
        raise InvalidTransition(f"step cannot {event} while {status}") from None


def next_workflow_status(status: WorkflowStatus, event: WorkflowInput) -> WorkflowStatus:
    """The status ``workflow_move`` leads to."""
    next_status: WorkflowStatus = workflow_move(status, event).next
    return next_status


def next_step_status(status: StepStatus, event: StepInput) -> StepStatus:
    """The status ``step_move`` leads to."""
    next_status: StepStatus = step_move(status, event).next
    return next_status


# ------------------------------------------------------------------ effects


@dataclass(frozen=True, slots=True)
class EmitEvent:
    """Append an event (``type``, ``fields``) with the workflow's snapshot."""

    type: str
    fields: dict[str, JSON]


@dataclass(frozen=True, slots=True)
class RunStep:
    """Run attempt ``attempt`` of step ``step`` (after the transaction commits)."""

    step: str
    attempt: int
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class RunCompensation:
    """Run attempt ``attempt`` of the compensation of ``step``."""

    step: str
    attempt: int
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Add a dead-letter entry (and say so with a ``dlq.added`` event)."""

    step: str | None
    reason: str
    attempts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Alert:
    """Tell a human (log line, webhook)."""

    kind: str
    message: str
    details: dict[str, JSON] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ResolveDeadLetters:
    """Close the open dead letters ``entries`` (a retry re-runs what they describe)."""

    entries: tuple[int, ...]


Effect = EmitEvent | RunStep | RunCompensation | DeadLetter | Alert | ResolveDeadLetters

COMPENSATION_INPUTS = frozenset(
    {
        SI.COMPENSATE,
        SI.COMPENSATED,
        SI.COMP_FAIL,
        SI.COMP_EXHAUST,
        SI.COMP_INTERRUPT,
        SI.COMP_RETRY,
    }
)
"""Step inputs that concern the compensation (their events carry ``comp_attempts``)."""
