"""The one transition table of the saga engine, and the effects the machine emits.

Theory of operation
-------------------
Workflow and step statuses (SPEC's vocabularies, ``protocol.status``) change only
through ``WORKFLOW_TABLE`` and ``STEP_TABLE``: ``(status, input) -> next``. Any pair
missing from a table raises ``InvalidTransition`` (STYLE: transitions are a table; see
h11's ``_state.py``). ``SagaMachine`` (``machine.py``) is the only caller; the effects
defined here are what it asks its shell to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

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
    "RunCompensation",
    "RunStep",
    "StepInput",
    "WorkflowInput",
    "next_step_status",
    "next_workflow_status",
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

WORKFLOW_TABLE: dict[tuple[WorkflowStatus, WorkflowInput], WorkflowStatus] = {
    (W.PENDING, WI.SUBMIT): W.RUNNING,
    (W.RUNNING, WI.COMPLETE): W.COMPLETED,
    (W.RUNNING, WI.HALT_COMPENSATE): W.COMPENSATING,
    (W.RUNNING, WI.HALT_PARK): W.PARKED,
    (W.RUNNING, WI.CANCEL): W.COMPENSATING,
    (W.PARKED, WI.CANCEL): W.COMPENSATING,
    (W.COMPENSATING, WI.CANCEL): W.COMPENSATING,
    (W.PARKED, WI.RETRY): W.RUNNING,
    (W.FAILED, WI.RETRY): W.COMPENSATING,  # re-run the compensations that failed
    (W.COMPENSATING, WI.COMPENSATION_DONE): W.COMPENSATED,
    (W.COMPENSATING, WI.CANCEL_DONE): W.CANCELLED,
    (W.COMPENSATING, WI.COMPENSATION_FAILED): W.FAILED,
    (W.RUNNING, WI.DEADLINE_COMPENSATE): W.COMPENSATING,
    (W.RUNNING, WI.DEADLINE_PARK): W.PARKED,
}
"""Every allowed workflow status change; nothing else may happen."""

STEP_TABLE: dict[tuple[StepStatus, StepInput], StepStatus] = {
    (S.WAITING, SI.START): S.RUNNING,
    (S.RETRYING, SI.START): S.RUNNING,
    (S.RUNNING, SI.SUCCEED): S.SUCCEEDED,
    (S.RUNNING, SI.RECONCILE): S.SUCCEEDED,
    (S.RETRYING, SI.RECONCILE): S.SUCCEEDED,
    (S.RUNNING, SI.FAIL): S.RETRYING,
    (S.RUNNING, SI.EXHAUST): S.FAILED,
    (S.RUNNING, SI.ABANDON): S.FAILED,
    (S.RUNNING, SI.INTERRUPT): S.RETRYING,
    (S.RUNNING, SI.CANCEL): S.FAILED,
    (S.WAITING, SI.CANCEL): S.SKIPPED,
    (S.RETRYING, SI.CANCEL): S.SKIPPED,
    (S.WAITING, SI.SKIP): S.SKIPPED,
    (S.RETRYING, SI.SKIP): S.SKIPPED,
    (S.WAITING, SI.DEFER): S.WAITING,
    (S.RETRYING, SI.DEFER): S.RETRYING,
    (S.FAILED, SI.RETRY): S.WAITING,
    (S.SKIPPED, SI.RETRY): S.WAITING,
    (S.SUCCEEDED, SI.COMPENSATE): S.COMPENSATING,
    (S.COMPENSATING, SI.COMPENSATE): S.COMPENSATING,  # a retry of the compensation
    (S.COMPENSATING, SI.COMPENSATED): S.COMPENSATED,
    (S.COMPENSATING, SI.COMP_FAIL): S.COMPENSATING,
    (S.COMPENSATING, SI.COMP_INTERRUPT): S.COMPENSATING,
    (S.COMPENSATING, SI.COMP_EXHAUST): S.FAILED,
    (S.FAILED, SI.COMP_RETRY): S.COMPENSATING,
    (S.RUNNING, SI.DEADLINE): S.FAILED,
    (S.WAITING, SI.DEADLINE): S.SKIPPED,
    (S.RETRYING, SI.DEADLINE): S.SKIPPED,
}
"""Every allowed step status change; nothing else may happen."""


def next_workflow_status(status: WorkflowStatus, event: WorkflowInput) -> WorkflowStatus:
    """Look a workflow transition up in ``WORKFLOW_TABLE``.

    Raises:
        InvalidTransition: the pair is not in the table.
    """
    try:
        return WORKFLOW_TABLE[(status, event)]
    except KeyError:
        raise InvalidTransition(f"workflow cannot {event} while {status}") from None


def next_step_status(status: StepStatus, event: StepInput) -> StepStatus:
    """Look a step transition up in ``STEP_TABLE``.

    Raises:
        InvalidTransition: the pair is not in the table.
    """
    try:
        return STEP_TABLE[(status, event)]
    except KeyError:
        raise InvalidTransition(f"step cannot {event} while {status}") from None


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


Effect = EmitEvent | RunStep | RunCompensation | DeadLetter | Alert

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
