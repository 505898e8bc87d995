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

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocol import Mutation, Progress, StepStatus, WorkflowSnapshot, WorkflowStatus

if TYPE_CHECKING:
    from client_sdk.client import SyncClient

__all__ = [
    "Overlay",
    "StepView",
    "WorkflowHandle",
    "WorkflowRow",
    "WorkflowView",
    "build_view",
]

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


class Overlay:
    """The pending mutations per workflow, in memory (mirrors the queue's pending rows).

    Updated only after commits: ``add`` when a mutation's INSERT committed, ``remove``
    when its verdict committed; rebuilt from the file at start.

    Args:
        pending: the pending mutations found in the file, in id order.
    """

    def __init__(self, pending: Iterable[Mutation] = ()) -> None:
        self._by_workflow: dict[str, list[Mutation]] = {}
        self._workflow_of: dict[int, str] = {}
        for mutation in pending:
            self.add(mutation)

    def __len__(self) -> int:
        return len(self._workflow_of)

    def add(self, mutation: Mutation) -> str:
        """Lay a newly queued mutation over its workflow; returns the workflow id."""
        workflow_id = str(mutation.args.get("workflow_id"))
        self._by_workflow.setdefault(workflow_id, []).append(mutation)
        self._workflow_of[mutation.id] = workflow_id
        return workflow_id

    def remove(self, ids: Iterable[int]) -> set[str]:
        """Drop settled mutations; returns the ids of the workflows they touched."""
        touched: set[str] = set()
        for mutation_id in ids:
            workflow_id = self._workflow_of.pop(mutation_id, None)
            if workflow_id is None:
                continue
            touched.add(workflow_id)
            left = [m for m in self._by_workflow[workflow_id] if m.id != mutation_id]
            if left:
                self._by_workflow[workflow_id] = left
            else:
                del self._by_workflow[workflow_id]
        return touched

    def pending_for(self, workflow_id: str) -> list[Mutation]:
        """The workflow's pending mutations, oldest first."""
        return self._by_workflow.get(workflow_id, [])

    def workflow_ids(self) -> list[str]:
        """Every workflow with a pending mutation."""
        return list(self._by_workflow)


def build_view(
    row: WorkflowRow | None,
    pending: Sequence[Mutation] = (),
    live: Mapping[str, Progress] | None = None,
) -> WorkflowView | None:
    """Lay the pending mutations and live progress over the confirmed snapshot.

    Args:
        row: the stored workflow, if any.
        pending: this workflow's unconfirmed mutations, oldest first.
        live: the latest ``Progress`` per step (ephemeral, not persisted).

    Returns:
        The view the application sees, or None if nothing is known of the workflow.
    """
    names = [m.name for m in pending]
    if row is None:
        submit = next((m for m in pending if m.name == "submit_workflow"), None)
        if submit is None:
            return None
        return WorkflowView(
            id=str(submit.args.get("workflow_id")),
            name=str(submit.args.get("name", "")),
            status=WorkflowStatus.PENDING.value,
            pending=True,
            updated_at=submit.created_at,
        )
    snap = row.snapshot
    if snap is None:
        rolled_back = row.rejected == "submit_workflow" and "submit_workflow" not in names
        if rolled_back:
            return WorkflowView(
                id=row.id,
                name=row.name,
                status=WorkflowStatus.FAILED.value,
                error=row.rejection,
                pending=bool(names),
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
    if "retry_workflow" in names and status in (WorkflowStatus.PARKED, WorkflowStatus.FAILED):
        status, error = WorkflowStatus.RUNNING.value, None
    elif error is None and not names:
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
        pending=bool(names),
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
