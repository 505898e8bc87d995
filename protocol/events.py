"""Event types of the log, and what their ``data`` holds.

Every event's ``data`` carries ``"workflow"``: a ``WorkflowSnapshot`` of the workflow
*after* the event. A client therefore converges by keeping the newest snapshot of each
workflow (highest ``version``); the other keys tell what happened, for humans, the
dashboard and tests. The snapshot is *partial* (``WorkflowSnapshot.partial``): it
carries results only where the event changed them, and a reader merges it over the
previous one, so an event never grows with the whole workflow (issue 11).
"""

from __future__ import annotations

__all__ = [
    "BREAKER_CHANGED",
    "DLQ_ADDED",
    "DLQ_REQUEUED",
    "STEP_CHANGED",
    "WORKFLOW_CANCEL_REQUESTED",
    "WORKFLOW_CHANGED",
    "WORKFLOW_PROGRESS",
    "WORKFLOW_RECONCILED",
    "WORKFLOW_REPORTED",
    "WORKFLOW_RETRY_REQUESTED",
    "WORKFLOW_SUBMITTED",
    "WORKFLOW_UPGRADED",
]

WORKFLOW_SUBMITTED = "workflow.submitted"
"""data: workflow, client_id, input."""
WORKFLOW_CHANGED = "workflow.status"
"""data: workflow, status, reason (a workflow-level status change)."""
STEP_CHANGED = "step.status"
"""data: workflow, step, status, attempt, error (a step-level change; a result it set
travels in the snapshot's step)."""
WORKFLOW_PROGRESS = "workflow.progress"
"""data: workflow, step, fraction, message (coalesced durable progress)."""
WORKFLOW_CANCEL_REQUESTED = "workflow.cancel_requested"
"""data: workflow, client_id."""
WORKFLOW_RETRY_REQUESTED = "workflow.retry_requested"
"""data: workflow, client_id, steps (the steps that will run again)."""
WORKFLOW_REPORTED = "workflow.reported"
"""data: workflow, source, status, at, detail (a source's state report)."""
WORKFLOW_RECONCILED = "workflow.reconciled"
"""data: workflow, before, after, source, reason (a repair by reconciliation)."""
WORKFLOW_UPGRADED = "workflow.upgraded"
"""data: workflow, client_id, version_before, version (an operator moved the workflow
to another version of its definition)."""
DLQ_ADDED = "dlq.added"
"""data: workflow, entry_id, step, reason, attempts, last_error."""
DLQ_REQUEUED = "dlq.requeued"
"""data: workflow, entry_id."""
BREAKER_CHANGED = "breaker.changed"
"""data: workflow, name, state (only on workflows whose step the breaker deferred)."""
