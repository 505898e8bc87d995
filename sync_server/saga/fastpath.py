"""The checkpoint without a locked read: compute from the runner's own copy of a row.

Theory of operation
-------------------
The runner keeps the row it last wrote (or claimed) for every workflow it holds. For a
plain checkpoint — step outcomes of a workflow without circuit breakers — the machine can
run on that copy; ``Store.write_fenced`` then writes the result only if the stored row is
still the copy (same owner, fence and version), with its events, in one statement on
PostgreSQL. Anything that needs another row (a breaker, a dead letter, the outbox)
raises ``NeedsLock`` from ``MemoryTransaction`` and that workflow takes the locked
checkpoint instead, as does every row whose fenced write found it changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NoReturn

from sync_server.store.base import (
    BreakerRecord,
    DlqEntry,
    FencedWrite,
    Transaction,
    WorkflowRecord,
)
from sync_server.store.dialect import POSTGRES

__all__ = ["MemoryTransaction", "NeedsLock", "copy_record"]


class NeedsLock(Exception):
    """The checkpoint touches more than the workflow's own row: take the locked path."""


class _NoLimits:
    """Limits (issue 18) are rows of their own: a workflow that uses them takes the
    locked path (``Checkpointer.compute_fenced`` never sends it here)."""

    async def lock_limit(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise NeedsLock("limits need the locked path")

    async def limit_position(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise NeedsLock("limits need the locked path")

    async def take_limit_slot(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise NeedsLock("limits need the locked path")

    async def release_limit_slots(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise NeedsLock("limits need the locked path")

    async def drop_limit_waiters(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise NeedsLock("limits need the locked path")

    async def claim_limit_waiters(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise NeedsLock("limits need the locked path")

    async def wake_limit_waiters(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise NeedsLock("limits need the locked path")


class MemoryTransaction(_NoLimits, Transaction):
    """Collects the events and notifications of one workflow's checkpoint in memory.

    Only ``append`` and ``notify`` work; every read or write of another row raises
    ``NeedsLock``.
    """

    def fenced(self, record: WorkflowRecord, fence: int, expected_version: int) -> FencedWrite:
        """The write this checkpoint makes: the new row and its events."""
        return FencedWrite(record, fence, expected_version, list(self.pending_events))

    dialect = POSTGRES  # any: every query primitive below refuses before SQL is sent

    def _refuse(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise NeedsLock("this checkpoint needs the locked path")

    async def _fetch_all(self, sql: str, *args: Any) -> NoReturn:
        self._refuse()

    async def _fetch_one(self, sql: str, *args: Any) -> NoReturn:
        self._refuse()

    async def _exec(self, sql: str, *args: Any) -> NoReturn:
        self._refuse()

    async def _exec_many(self, sql: str, args: Sequence[Sequence[Any]]) -> NoReturn:
        self._refuse()

    async def get_workflow(
        self, tenant: str, workflow_id: str, *, lock: bool = True
    ) -> WorkflowRecord | None:
        self._refuse()

    async def insert_workflow(self, workflow: WorkflowRecord) -> bool:
        self._refuse()

    async def update_workflow(self, workflow: WorkflowRecord) -> None:
        self._refuse()

    async def claim_due_workflows(
        self,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        versions: Sequence[tuple[str, str]] | None = None,
    ) -> list[WorkflowRecord]:
        self._refuse()

    async def lock_client(self, tenant: str, subject: str, client_id: str) -> int:
        self._refuse()

    async def mutation_results(
        self, tenant: str, client_id: str, ids: list[int]
    ) -> dict[int, tuple[str, str | None]]:
        self._refuse()

    async def record_mutations(
        self,
        tenant: str,
        client_id: str,
        results: list[tuple[int, str, str | None]],
        last_id: int,
        at: float,
    ) -> None:
        self._refuse()

    async def enqueue_outbox(
        self, destination: str, payload: Any, *, event_seq: int | None, max_retries: int, at: float
    ) -> None:
        self._refuse()

    async def add_dlq(self, entry: DlqEntry) -> int:
        self._refuse()

    async def get_dlq(self, entry_id: int, *, lock: bool = True) -> DlqEntry | None:
        self._refuse()

    async def update_dlq(self, entry: DlqEntry) -> None:
        self._refuse()

    async def get_breaker(self, name: str, *, lock: bool = True) -> BreakerRecord | None:
        self._refuse()

    async def put_breaker(self, breaker: BreakerRecord) -> None:
        self._refuse()


def copy_record(record: WorkflowRecord) -> WorkflowRecord:
    """A copy the machine may change without touching the runner's cached row (the
    checkpoint replaces ``state`` with the machine's own copy)."""
    return dataclasses.replace(record)
