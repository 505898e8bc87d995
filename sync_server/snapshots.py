"""Turn a workflow row into the ``WorkflowSnapshot`` that clients see.

The saga state keeps ``state["steps"][name]`` with at least the keys ``status``,
``attempts``, ``progress``, ``result`` and ``error``; anything else in the state is the
engine's private bookkeeping and never leaves the server.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol import StepSnapshot, WorkflowSnapshot
from sync_server.store.base import WorkflowRecord

__all__ = ["append_event", "snapshot", "snapshot_data"]


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
        for name, step in (record.state.get("steps") or {}).items()
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
    )


def snapshot_data(record: WorkflowRecord) -> dict[str, Any]:
    """``snapshot(record)`` as plain JSON-ready data, for an event's ``data["workflow"]``.

    Call it *after* ``Transaction.append`` bumped the version — or use ``append_event``.
    """
    data: dict[str, Any] = msgspec.to_builtins(snapshot(record))
    return data


def append_event(tx: Any, record: WorkflowRecord, type: str, at: float, /, **fields: Any) -> None:
    """Append an event whose data is ``fields`` plus the snapshot after the event.

    The leading arguments are positional-only, so ``fields`` may hold any key — a report
    event carries its own ``at`` (the source's timestamp) beside the event time.
    """
    record.updated_at = max(record.updated_at, at)
    trace = record.state.get("trace")
    if trace:
        # Events name the workflow's trace, so a client (``watch``) can log it.
        fields["trace_id"] = trace[3:35]
    event = tx.append(record, type, fields, at)
    # The snapshot must carry the version of the event itself.
    event.data["workflow"] = snapshot_data(record)
