"""The typed, immutable inputs of the saga machine, and the one place that applies them.

Theory of operation
-------------------
Everything that happens to a workflow reaches ``SagaMachine`` as one of these frozen,
tagged Structs: an attempt's outcome (``StepSucceeded``, ``StepFailed``), its
compensation's (``CompensationSucceeded``, ``CompensationFailed``), durable progress
(``ProgressReported``), the downstream job an attempt runs (``JobStarted``), or a timer
(``Tick``: nothing but the clock moved). Client and operator requests (cancel, retry,
DLQ requeue, reconciliation repairs) are recorded by intake as ``sagastate.Requests``
and applied at the next claim (``SagaMachine.receive_claim``). An input is built once,
complete, and never changed (a quarantined outcome is a new ``StepFailed``).

``apply_input`` feeds one input to a machine; it returns whether the input was accepted
(an outcome of an attempt that is no longer the current one is not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from protocol.jsontypes import JSON
from sync_server.saga.sagastate import Job

if TYPE_CHECKING:
    from sync_server.saga.machine import SagaMachine

__all__ = [
    "CompensationFailed",
    "CompensationSucceeded",
    "JobStarted",
    "MachineInput",
    "ProgressReported",
    "StepFailed",
    "StepSucceeded",
    "Tick",
    "apply_input",
]


class StepSucceeded(msgspec.Struct, frozen=True, tag=True):
    """Attempt ``attempt`` of ``step`` returned ``result``."""

    step: str
    attempt: int
    result: JSON = None


class StepFailed(msgspec.Struct, frozen=True, tag=True):
    """Attempt ``attempt`` of ``step`` raised (``permanent``: no retry) or timed out."""

    step: str
    attempt: int
    error: str = "failed"
    permanent: bool = False
    timed_out: bool = False


class CompensationSucceeded(msgspec.Struct, frozen=True, tag=True):
    """The compensation of ``step`` (attempt ``attempt``) finished."""

    step: str
    attempt: int


class CompensationFailed(msgspec.Struct, frozen=True, tag=True):
    """The compensation of ``step`` (attempt ``attempt``) raised."""

    step: str
    attempt: int
    error: str = "failed"


class ProgressReported(msgspec.Struct, frozen=True, tag=True):
    """Durable (coalesced) progress of a running attempt."""

    step: str
    attempt: int
    fraction: float
    message: str | None = None


class JobStarted(msgspec.Struct, frozen=True, tag=True):
    """The running attempt runs ``job`` at a downstream source (for reconciliation)."""

    step: str
    attempt: int
    job: Job


class Tick(msgspec.Struct, frozen=True, tag=True):
    """Only the clock moved (a retry or the deadline falls due)."""


MachineInput = (
    StepSucceeded
    | StepFailed
    | CompensationSucceeded
    | CompensationFailed
    | ProgressReported
    | JobStarted
    | Tick
)


def apply_input(machine: SagaMachine, item: MachineInput, now: float) -> bool:
    """Feed ``item`` to ``machine`` at ``now``.

    Returns:
        True if the machine accepted it (a ``Tick`` always is); False for an outcome or
        report of an attempt that is no longer the current one.
    """
    if isinstance(item, StepSucceeded):
        return machine.receive_step_succeeded(item.step, item.attempt, item.result, now)
    if isinstance(item, StepFailed):
        return machine.receive_step_failed(
            item.step,
            item.attempt,
            item.error,
            now,
            permanent=item.permanent,
            timed_out=item.timed_out,
        )
    if isinstance(item, CompensationSucceeded):
        return machine.receive_compensation_succeeded(item.step, item.attempt, now)
    if isinstance(item, CompensationFailed):
        return machine.receive_compensation_failed(item.step, item.attempt, item.error, now)
    if isinstance(item, ProgressReported):
        return machine.receive_progress(item.step, item.attempt, item.fraction, item.message, now)
    if isinstance(item, JobStarted):
        job = {"source": item.job.source, "adapter": item.job.adapter}
        return machine.receive_job(item.step, item.attempt, job)
    return True
