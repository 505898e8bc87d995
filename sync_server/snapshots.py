"""Turn a workflow row into the ``WorkflowSnapshot`` that clients see.

The saga state (``sync_server.saga.sagastate``, its JSON in the row) keeps
``steps[name]`` with at least the keys ``status``, ``attempts``, ``progress``, ``result``
and ``error``; anything else in the state is the engine's private bookkeeping and never
leaves the server. Snapshots read the row's JSON directly (no decode on this hot path).

Events stay small (issue 11): an event's ``data["workflow"]`` is a *partial* snapshot
(``WorkflowSnapshot.partial``) that carries results only where the event changed them
— the step a ``step.status`` event names, the output on a ``workflow.status`` event
(by reference, ``result_of``, when it equals a step's result). So a step's result is
written to the log once, not again with every later event of the workflow. Readers
merge a partial snapshot over the previous one (``client_sdk.localstore``); snapshots
served over HTTP, webhooks and the dashboard are whole.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol import StepSnapshot, WorkflowSnapshot
from protocol import events as event_types
from sync_server.saga.sagastate import steps_wire, trace_of
from sync_server.store.base import WorkflowRecord

__all__ = ["append_event", "event_snapshot_data", "snapshot", "snapshot_data"]


def snapshot(record: WorkflowRecord) -> WorkflowSnapshot:
    """The client-visible state of ``record`` (its ``version`` as the snapshot version)."""
    steps = {
        name: StepSnapshot(
            status=step.get("status", "waiting"),
            attempts=int(step.get("attempts", 0)),
            progress=float(step.get("progress", 0.0)),
            result=step.get("result"),
            error=step.get("error"),
        )
        for name, step in steps_wire(record.state).items()
    }
    return WorkflowSnapshot(
        id=record.id,
        name=record.name,
        status=record.status,
        steps=steps,
        progress=record.progress,
        result=record.result,
        error=record.error,
        updated_at=record.updated_at,
        version=record.version,
        workflow_version=record.workflow_version,
    )


def snapshot_data(record: WorkflowRecord) -> dict[str, Any]:
    """``snapshot(record)`` as plain JSON-ready data, for an event's ``data["workflow"]``.

    Call it *after* ``Transaction.append`` bumped the version — or use ``append_event``.
    """
    data: dict[str, Any] = msgspec.to_builtins(snapshot(record))
    return data


def event_snapshot_data(record: WorkflowRecord, type: str, step: Any = None) -> dict[str, Any]:
    """The partial snapshot an event of ``type`` carries (see the module docstring).

    Args:
        record: the workflow after the event.
        type: the event type.
        step: the step whose result the event set (its result is carried).
    """
    data = snapshot_data(record)
    data["partial"] = True
    steps = data["steps"]
    if type != event_types.WORKFLOW_CHANGED:
        data["result"] = None
    elif data["result"] is not None:
        # A single-leaf workflow's output is its leaf's result, already in the log.
        same = next((n for n, item in steps.items() if item["result"] == data["result"]), None)
        if same is not None:
            data["result"], data["result_of"] = None, same
    for name, item in steps.items():
        if name != step:
            item["result"] = None
    return data


def append_event(tx: Any, record: WorkflowRecord, type: str, at: float, /, **fields: Any) -> None:
    """Append an event whose data is ``fields`` plus the partial snapshot after it.

    The leading arguments are positional-only, so ``fields`` may hold any key — a report
    event carries its own ``at`` (the source's timestamp) beside the event time. A
    ``step.status`` event's ``result`` travels in its snapshot's step only, not twice.
    """
    record.updated_at = max(record.updated_at, at)
    trace = trace_of(record.state)
    if trace:
        # Events name the workflow's trace, so a client (``watch``) can log it.
        fields["trace_id"] = trace[3:35]
    step = None
    if type == event_types.STEP_CHANGED and fields.pop("result", None) is not None:
        step = fields.get("step")  # a success (or a reconciled one) set this result
    event = tx.append(record, type, fields, at)
    # The snapshot must carry the version of the event itself.
    event.data["workflow"] = event_snapshot_data(record, type, step)
