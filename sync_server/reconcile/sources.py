"""What a job source must answer so the sweep can compare it with the saga record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sync_server.store.base import WorkflowRecord

__all__ = ["JobState", "SourceAdapter"]


@dataclass(frozen=True, slots=True)
class JobState:
    """A job as its source sees it.

    Attributes:
        status: ``unknown`` (never heard of), ``running``, ``completed`` or ``failed``.
        result: the job's result when completed.
        error: why it failed.
        at: when the source observed this (unix seconds).
        since: when the job started running there (unix seconds; None if unknown), so
            the sweep can tell a job running for longer than its horizon.
    """

    status: str
    result: Any = None
    error: str | None = None
    at: float = 0.0
    since: float | None = None


class SourceAdapter(Protocol):
    """A downstream that runs jobs for a workflow step (e.g. the render queue)."""

    source: str
    """The source name in the canonical rule (e.g. ``job-queue``).

    An adapter may also have a ``name`` (default: ``source``): the one a step records
    with ``StepContext.record_job`` to be asked about it by the sweep.
    """

    async def job_status(self, workflow: WorkflowRecord, step: str, key: str) -> JobState:
        """Look the job of ``step`` (idempotency key ``key``) up at the source."""
        ...
