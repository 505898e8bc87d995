"""What the application sees: ``WorkflowView``, ``StepView`` and ``WorkflowHandle``.

A view is computed, never stored: the newest server-confirmed snapshot of a workflow
(highest ``version``) with the client's still-pending mutations laid over it, plus the
ephemeral live progress the server streams while a step runs (SPEC promise 5: once
everything is confirmed, the view *is* the server's canonical state).

Overlay rules (``build_view``):

* no snapshot yet and a pending or applied ``submit_workflow`` → status ``pending``;
* a rejected ``submit_workflow`` and no snapshot → rolled back: status ``failed``,
  ``error`` = the server's reason, ``pending`` False (so ``wait`` returns);
* a pending ``retry_workflow`` on a parked/failed workflow → status ``running``;
* a pending ``cancel_workflow`` keeps the status (the server decides between
  ``cancelled`` and compensation) but marks the view ``pending``;
* any other rejection keeps the confirmed state and shows the reason in ``error``.

``pending`` is True while any mutation of the workflow is unconfirmed, and while a
submitted workflow has not yet shown up in the server's event stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocol import Progress, StepStatus, WorkflowSnapshot, WorkflowStatus

if TYPE_CHECKING:
    from client_sdk.client import SyncClient

__all__ = ["StepView", "WorkflowHandle", "WorkflowRow", "WorkflowView", "build_view"]

_TERMINAL = frozenset(s.value for s in WorkflowStatus if s.terminal)
_RUNNABLE_STEP = frozenset({StepStatus.WAITING, StepStatus.RUNNING, StepStatus.RETRYING})


@dataclass(frozen=True, slots=True)
class StepView:
    """One step as the application sees it."""

    status: str
    attempts: int = 0
    progress: float = 0.0
    result: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class WorkflowView:
    """One workflow as the application sees it: confirmed state plus local overlay.

    ``steps`` maps step name to ``StepView``; ``progress`` is in 0..1; ``pending`` is
    True until the server has confirmed every local change; ``version`` is the version
    of the confirmed snapshot underneath (0 if none yet).
    """

    id: str
    name: str
    status: str
    steps: Mapping[str, StepView] = field(default_factory=dict)
    progress: float = 0.0
    result: Any = None
    error: str | None = None
    pending: bool = False
    updated_at: float = 0.0
    version: int = 0

    @property
    def terminal(self) -> bool:
        """True when the workflow has ended and nothing local is pending."""
        return not self.pending and self.status in _TERMINAL


@dataclass(frozen=True, slots=True)
class WorkflowRow:
    """The stored part of a workflow: its newest snapshot and the local facts."""

    id: str
    name: str
    snapshot: WorkflowSnapshot | None
    rejected: str | None = None
    """Name of the last rejected mutation of this workflow, if any."""
    rejection: str | None = None
    """The server's reason for that rejection."""
    created_at: float = 0.0


def build_view(
    row: WorkflowRow,
    pending: Sequence[str] = (),
    live: Mapping[str, Progress] | None = None,
) -> WorkflowView:
    """Lay the pending mutations and live progress over the confirmed snapshot.

    Args:
        row: the stored workflow.
        pending: names of this workflow's unconfirmed mutations, oldest first.
        live: the latest ``Progress`` per step (ephemeral, not persisted).

    Returns:
        The view the application sees.
    """
    snap = row.snapshot
    if snap is None:
        rolled_back = row.rejected == "submit_workflow" and "submit_workflow" not in pending
        if rolled_back:
            return WorkflowView(
                id=row.id,
                name=row.name,
                status=WorkflowStatus.FAILED.value,
                error=row.rejection,
                pending=bool(pending),
                updated_at=row.created_at,
            )
        status = WorkflowStatus.PENDING.value
        return WorkflowView(
            id=row.id, name=row.name, status=status, pending=True, updated_at=row.created_at
        )
    status = snap.status
    error = snap.error
    steps = {
        name: StepView(s.status, s.attempts, s.progress, s.result, s.error)
        for name, s in snap.steps.items()
    }
    progress = snap.progress
    if "retry_workflow" in pending and status in (WorkflowStatus.PARKED, WorkflowStatus.FAILED):
        status, error = WorkflowStatus.RUNNING.value, None
    elif row.rejection is not None and not pending:
        error = row.rejection
    if live and status not in _TERMINAL:
        for step_name, update in live.items():
            step = steps.get(step_name)
            if step is None or step.status not in _RUNNABLE_STEP:
                continue
            if update.fraction > step.progress:
                steps[step_name] = StepView(
                    step.status, step.attempts, min(1.0, update.fraction), step.result, step.error
                )
        if steps:
            progress = max(progress, sum(s.progress for s in steps.values()) / len(steps))
    return WorkflowView(
        id=snap.id,
        name=snap.name,
        status=status,
        steps=steps,
        progress=progress,
        result=snap.result,
        error=error,
        pending=bool(pending),
        updated_at=snap.updated_at,
        version=snap.version,
    )


class WorkflowHandle:
    """A reference to one workflow of a ``SyncClient``; returned by ``submit_workflow``.

    Args:
        client: the client that owns the workflow.
        workflow_id: the workflow's id (a UUID string).
    """

    __slots__ = ("_client", "id")

    def __init__(self, client: SyncClient, workflow_id: str) -> None:
        self._client = client
        self.id = workflow_id

    def __repr__(self) -> str:
        return f"WorkflowHandle({self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkflowHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def view(self) -> WorkflowView | None:
        """The current local view (``SyncClient.get_workflow``)."""
        return self._client.get_workflow(self.id)

    def watch(self) -> AsyncIterator[WorkflowView]:
        """Every change of the view until it is terminal (``SyncClient.watch``)."""
        return self._client.watch(self.id)

    async def wait(self, timeout: float | None = None) -> WorkflowView:
        """The terminal view (``SyncClient.wait``).

        Raises:
            TimeoutError: not terminal within ``timeout`` seconds.
        """
        return await self._client.wait(self.id, timeout)

    async def cancel(self) -> WorkflowHandle:
        """Queue a cancellation (``SyncClient.cancel_workflow``)."""
        return await self._client.cancel_workflow(self.id)

    async def retry(self) -> WorkflowHandle:
        """Queue a retry of the failed or parked steps (``SyncClient.retry_workflow``)."""
        return await self._client.retry_workflow(self.id)
