"""The saga runner's spans (``sync_server.tracing``): one per attempt, and the spans of
what a checkpoint decided — a dead letter, the end of the workflow.

Every span's parent is the traceparent kept with the workflow (``WorkflowState.trace``, the
push span), so the spans of an instance that took the workflow over after a crash join
the same trace. Called only while tracing is on.
"""

from __future__ import annotations

from typing import Any

from sync_server import tracing
from sync_server.saga.definitions import Step
from sync_server.saga.sagastate import step_wire, trace_of
from sync_server.store.base import WorkflowRecord

__all__ = ["record_outcome", "start_attempt"]


def start_attempt(
    record: WorkflowRecord,
    step: Step,
    attempt: int,
    compensation: bool,
    breaker_state: str,
    instance: str,
) -> Any:
    """Start the span of one attempt of ``step`` (or of its compensation).

    Attributes: the attempt number, the retry delay that preceded it (the backoff the
    machine chose, ``StepState.retry_delay``), and the step's breaker with
    its state as the last checkpoint read it, and the instance that runs it.
    """
    state = step_wire(record.state, step.name)
    return tracing.start_span(
        f"tether.{'compensate' if compensation else 'step'} {step.name}",
        trace_of(record.state) or None,
        {
            "tether.workflow.id": record.id,
            "tether.workflow.name": record.name,
            "tether.step": step.name,
            "tether.attempt": attempt,
            "tether.retry_delay": None if compensation else state.get("retry_delay"),
            "tether.breaker": step.breaker,
            "tether.breaker.state": breaker_state if step.breaker else None,
            "tether.instance": instance,
        },
    )


def record_outcome(record: WorkflowRecord, alerts: list[Any], now: float, ended: bool) -> None:
    """After COMMIT: a span per dead letter added, and the workflow's span if it ended
    (or parked) — from its creation to ``now``."""
    trace = trace_of(record.state) or None
    for alert in alerts:
        entry = alert.details.get("dlq_entry")
        if entry is not None:
            tracing.record_span(
                f"tether.dlq {alert.details.get('step', '')}",
                trace,
                {"tether.workflow.id": record.id, "tether.dlq.entry": entry},
                error=alert.message,
            )
    if ended:
        tracing.record_span(
            f"tether.workflow {record.name}",
            trace,
            {
                "tether.workflow.id": record.id,
                "tether.workflow.name": record.name,
                "tether.workflow.status": record.status,
            },
            start=record.created_at,
            end=now,
            error=record.error if record.status != "completed" else None,
        )
