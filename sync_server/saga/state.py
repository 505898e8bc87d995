"""What the saga runner's parts share: the leases held, the runner's state, its metrics.

Theory of operation
-------------------
``SagaRunner`` (``runner``) is composed of parts that each live in their own module —
the claimer (``claimer``), the group-commit writer (``writer``), the step attempts
(``attempt``) and the lease heartbeat (``heartbeat``) — all working on one runner's
state. ``RunnerState`` declares that state (set up by ``SagaRunner.__init__``) and the
few hooks one part calls in another, so that each part type-checks on its own; a
``Held`` is one workflow whose lease this instance holds, with its attempts in flight.
Everything here runs on the event loop's thread: no locks, and no awaits between
reading and changing ``_held``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from sync_server.saga.definitions import STOP_INTERRUPTED, StepContext
from sync_server.store.base import WorkflowKey, WorkflowRecord

if TYPE_CHECKING:
    import httpx

    from sync_server.saga.alerts import Alerts
    from sync_server.saga.checkpoint import Applied, Checkpointer, Input
    from sync_server.saga.definitions import Limit, Workflow
    from sync_server.saga.machine import RunCompensation, RunStep
    from sync_server.saga.progress import ProgressPublisher
    from sync_server.store.base import Store

__all__ = ["Held", "RunnerState", "SagaMetrics"]


@dataclass(slots=True)
class Held:
    """A workflow this instance holds the lease of, and its attempts in flight."""

    id: str
    tenant: str
    fence: int
    tasks: dict[tuple[str, bool], asyncio.Task[None]] = field(default_factory=dict)
    contexts: dict[tuple[str, bool], StepContext] = field(default_factory=dict)
    tick: asyncio.TimerHandle | None = None
    valid_until: float = float("inf")
    """``time.monotonic()`` after which this instance can no longer be sure it holds the
    lease (its expiry as last confirmed, less a safety margin)."""
    record: WorkflowRecord | None = None
    """The row as this instance last wrote it: the base of a fenced checkpoint."""

    @property
    def key(self) -> WorkflowKey:
        return WorkflowKey(self.tenant, self.id)

    def cancel(self, reason: str = STOP_INTERRUPTED) -> None:
        """Stop every attempt, telling each why (``StepContext.stop_reason``)."""
        for key, task in self.tasks.items():
            self.stop(key, task, reason)
        self.tasks.clear()
        self.contexts.clear()
        if self.tick is not None:
            self.tick.cancel()
            self.tick = None

    def stop(self, key: tuple[str, bool], task: asyncio.Task[None], reason: str) -> None:
        ctx = self.contexts.pop(key, None)
        if ctx is not None and ctx.stop_reason is None:
            ctx.stop_reason = reason
        task.cancel()


class RunnerState:
    """The state of one ``SagaRunner`` (set in ``SagaRunner.__init__``) and the hooks its
    parts call in one another (each implemented by the part named)."""

    store: Store
    limits: dict[str, Limit]
    definitions: dict[tuple[str, str], Workflow]
    workflows: dict[str, Workflow]
    instance_id: str
    lease_seconds: float
    alerts: Alerts
    metrics: SagaMetrics | None
    clock: Callable[[], float]
    max_concurrency: int
    claim_batch: int
    max_batch: int
    poll_interval: float
    heartbeat_interval: float
    checkpointer: Checkpointer
    progress: ProgressPublisher
    stats: dict[str, int]
    _http: httpx.AsyncClient | None
    _own_http: bool
    _held: dict[WorkflowKey, Held]
    _queue: list[Input]
    _queued: asyncio.Event
    _wake: asyncio.Event
    _timer: asyncio.TimerHandle | None
    _timer_at: float
    _running: bool
    _committing: bool
    _reserved: int
    _full: bool

    @property
    def held(self) -> dict[WorkflowKey, int]:
        """Workflow key -> fence of every lease this instance holds."""
        return {key: h.fence for key, h in self._held.items()}

    @property
    def _lease_margin(self) -> float:
        """Attempts stop this long before the lease could expire (clock skew, delays)."""
        return min(1.0, self.lease_seconds * 0.2)

    # Hooks, implemented by the parts (``runner``, ``writer``, ``claimer``, ``attempt``).
    def _after_commit(self, applied: Applied, *, fence_hint: int) -> None:
        raise NotImplementedError  # runner

    def _enqueue(self, item: Input) -> None:
        raise NotImplementedError  # writer

    def _arm(self, at: float) -> None:
        raise NotImplementedError  # claimer

    def _sync_tasks(
        self, held: Held, record: WorkflowRecord, commands: list[RunStep | RunCompensation]
    ) -> None:
        raise NotImplementedError  # attempt


class SagaMetrics(Protocol):
    """Instrumentation the runner reports to (``sync_server.metrics.Metrics`` is one)."""

    def observe_append(self, source: str, seconds: float) -> None:
        """A transaction that appended events took ``seconds``."""

    def step_attempt(self, workflow: str, step: str, attempt: int, compensation: bool) -> None:
        """An attempt starts."""

    def workflow_finished(self, workflow: str, status: str) -> None:
        """A workflow ended or parked."""

    def breaker_changed(self, name: str, state: str) -> None:
        """A breaker changed state."""
