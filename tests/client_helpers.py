"""Helpers for the client SDK's integration tests: servers, fast clients, server reads."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from client_sdk import SyncClient
from client_sdk.backoff import Backoff, CircuitBreaker
from protocol import events as event_types
from sync_server import create_app
from sync_server.snapshots import append_event
from sync_server.store import open_store
from sync_server.store.base import WorkflowRecord
from tests.servers import SECRET
from tests.sync_helpers import NOOP, token

TENANT = "acme"


def make_app(database_url: str, **settings: Any) -> Any:
    """The real server app with the no-op workflow."""
    return create_app(database_url, workflows=[NOOP], auth_secret=SECRET, **settings)


def fast_client(url: str, path: Path | str, **options: Any) -> SyncClient:
    """A client with test-sized reconnect timings (delays in tens of milliseconds)."""
    options.setdefault("token", token(TENANT, "client"))
    options.setdefault("backoff", Backoff(base=0.02, cap=0.3))
    options.setdefault("breaker", CircuitBreaker(failure_threshold=1000, reset_timeout=0.5))
    options.setdefault("stall_timeout", 5.0)
    return SyncClient(url, path=path, **options)


async def server_events(database_url: str, tenant: str = TENANT) -> list[Any]:
    """Every event of ``tenant`` in the server's log, in seq order."""
    store = open_store(database_url)
    await store.open()
    try:
        out: list[Any] = []
        after = 0
        while True:
            page = await store.read_events(after, 5000, tenant=tenant)
            if not page:
                return out
            out.extend(page)
            after = page[-1].seq
    finally:
        await store.close()


async def server_submitted(database_url: str, tenant: str = TENANT) -> list[str]:
    """Workflow ids in the order the server accepted their submit."""
    return [
        e.workflow_id
        for e in await server_events(database_url, tenant)
        if e.type == event_types.WORKFLOW_SUBMITTED
    ]


async def server_snapshots(database_url: str, tenant: str = TENANT) -> dict[str, Any]:
    """Workflow id -> (status, version) of the server's current state."""
    store = open_store(database_url)
    await store.open()
    try:
        records = await store.list_workflows(tenant=tenant, limit=1_000_000)
    finally:
        await store.close()
    return {r.id: (r.status, r.version) for r in records}


def local_state(client: SyncClient) -> dict[str, Any]:
    """Workflow id -> (status, version) of the client's confirmed views.

    Rolled-back submits (never on the server: version 0) are left out.
    """
    return {
        v.id: (v.status, v.version)
        for v in client.list_workflows()
        if not v.pending and v.version > 0
    }


async def prefill_backlog(
    database_url: str, events: int, workflows: int, tenant: str = TENANT
) -> None:
    """Write ``events`` events spread over ``workflows`` workflows straight into the store."""
    store = open_store(database_url)
    await store.open()
    per = events // workflows
    now = time.time()
    try:
        for start in range(0, workflows, 50):
            chunk = range(start, min(start + 50, workflows))

            async def unit(tx: Any, chunk: range = chunk) -> None:
                for _ in chunk:
                    record = WorkflowRecord(
                        id=str(uuid.uuid4()),
                        tenant=tenant,
                        name="noop",
                        status="running",
                        state={"steps": {"only": {"status": "running"}}},
                        created_at=now,
                        updated_at=now,
                    )
                    record.due_at = None
                    append_event(tx, record, event_types.WORKFLOW_SUBMITTED, now, client_id="x")
                    for i in range(per - 1):
                        record.progress = (i + 1) / per
                        append_event(
                            tx,
                            record,
                            event_types.WORKFLOW_PROGRESS,
                            now,
                            step="only",
                            fraction=record.progress,
                            message=None,
                        )
                    await tx.insert_workflow(record)

            await store.run(unit)
    finally:
        await store.close()


async def wait_until(predicate: Any, timeout: float, message: str = "") -> None:
    """Poll a condition with a deadline (not a fixed sleep)."""
    from tests.conftest import wait_for

    await wait_for(predicate, timeout=timeout, interval=0.02, message=message)
