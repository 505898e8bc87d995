"""Helpers for saga tests: submit workflows, read their events, wait for statuses."""

from __future__ import annotations

import time
import uuid
from typing import Any

from sync_server.saga import Workflow, intake
from sync_server.store.base import Store, Transaction, WorkflowRecord
from tests.conftest import wait_for

TERMINAL = {"completed", "compensated", "failed", "cancelled", "parked"}


async def submit(
    store: Store,
    workflow: Workflow,
    inputs: list[dict[str, Any]] | dict[str, Any] | None = None,
    *,
    tenant: str = "t1",
    count: int = 1,
    deadline: float | None = None,
    now: float | None = None,
) -> list[str]:
    """Submit workflows (one transaction), as the push endpoint would; returns their ids."""
    if isinstance(inputs, dict) or inputs is None:
        inputs = [inputs or {} for _ in range(count)]
    ids = [str(uuid.uuid4()) for _ in inputs]
    at = time.time() if now is None else now

    async def unit(tx: Transaction) -> None:
        for wid, data in zip(ids, inputs, strict=True):
            record = WorkflowRecord(
                id=wid,
                tenant=tenant,
                name=workflow.name,
                status="pending",
                input=data,
                created_at=at,
                updated_at=at,
                created_by="test",
            )
            intake.start_workflow(tx, record, workflow, at, "test-client", deadline=deadline)
            assert await tx.insert_workflow(record)

    await store.run(unit)
    return ids


async def mutate(store: Store, workflow_id: str, fn: Any, *, tenant: str = "t1") -> None:
    """Apply an intake function (cancel/retry) to a workflow in one transaction."""

    async def unit(tx: Transaction) -> None:
        record = await tx.get_workflow(tenant, workflow_id, lock=True)
        assert record is not None
        fn(tx, record, time.time(), "test-client")
        await tx.update_workflow(record)

    await store.run(unit)


async def wait_status(
    store: Store,
    workflow_id: str,
    statuses: set[str] | str = TERMINAL,
    timeout: float = 20.0,
    *,
    tenant: str = "t1",
) -> WorkflowRecord:
    """Wait until the workflow's status is one of ``statuses``."""
    wanted = {statuses} if isinstance(statuses, str) else statuses

    async def check() -> WorkflowRecord | None:
        record = await store.get_workflow(tenant, workflow_id)
        return record if record is not None and record.status in wanted else None

    result: WorkflowRecord = await wait_for(
        check, timeout=timeout, message=f"{workflow_id} in {wanted}"
    )
    return result


async def wait_all(
    store: Store,
    ids: list[str],
    statuses: set[str] | str = TERMINAL,
    timeout: float = 60.0,
    *,
    tenant: str = "t1",
) -> list[WorkflowRecord]:
    """Wait until every workflow of ``ids`` reached one of ``statuses``."""
    wanted = {statuses} if isinstance(statuses, str) else statuses
    want = set(ids)

    async def check() -> bool:
        rows = await store.list_workflows(statuses=sorted(wanted), limit=len(ids) * 4 + 100)
        return want <= {r.id for r in rows}

    await wait_for(check, timeout=timeout, interval=0.05, message=f"{len(ids)} workflows end")
    return [r for r in [await store.get_workflow(tenant, i) for i in ids] if r is not None]


async def step_history(
    store: Store, workflow_id: str, *, tenant: str = "t1"
) -> list[tuple[str, str, int]]:
    """(step, status, attempt) of every step.status event of a workflow, in order."""
    events = await store.read_workflow_events(tenant, workflow_id)
    return [
        (e.data["step"], e.data["status"], e.data["attempt"])
        for e in events
        if e.type == "step.status"
    ]


async def event_types(store: Store, workflow_id: str, *, tenant: str = "t1") -> list[str]:
    """The types of a workflow's events, in order."""
    return [e.type for e in await store.read_workflow_events(tenant, workflow_id)]
