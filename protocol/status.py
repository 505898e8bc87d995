"""Status vocabularies shared by the client, the server and the wire.

Every enum is a ``StrEnum`` whose values are the wire strings of SPEC; nothing else
spells these strings.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "TERMINAL_WORKFLOW_STATUSES",
    "MutationStatus",
    "Role",
    "Source",
    "StepStatus",
    "WorkflowStatus",
]


class WorkflowStatus(StrEnum):
    """Where a workflow stands. ``pending`` exists only on the client (not yet confirmed)."""

    PENDING = "pending"
    RUNNING = "running"
    COMPENSATING = "compensating"
    PARKED = "parked"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for the four statuses a workflow never leaves."""
        return self in TERMINAL_WORKFLOW_STATUSES


TERMINAL_WORKFLOW_STATUSES = frozenset(
    {
        WorkflowStatus.COMPLETED,
        WorkflowStatus.COMPENSATED,
        WorkflowStatus.FAILED,
        WorkflowStatus.CANCELLED,
    }
)


class StepStatus(StrEnum):
    """Where one step of a workflow stands."""

    WAITING = "waiting"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    SKIPPED = "skipped"


class MutationStatus(StrEnum):
    """The server's verdict on one pushed mutation."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


class Source(StrEnum):
    """Who reports a workflow's state (reconciliation); default priority is top to bottom."""

    JOB_QUEUE = "job-queue"
    OPEN_API = "open-api"
    MINI_APP = "mini-app"


class Role(StrEnum):
    """The ``role`` claim of a token."""

    CLIENT = "client"
    SOURCE = "source"
    ADMIN = "admin"
