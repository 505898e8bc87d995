"""Helpers shared by the test_security test files (moved from test_security.py)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import msgspec
import pytest
import websockets
from websockets.asyncio.client import connect

from protocol import (
    decode_server_message,
)
from sync_server import create_app
from sync_server.store.base import DlqEntry
from tests.conftest import PG_DSN
from tests.servers import SECRET, RunningServer, running
from tests.sync_helpers import NOOP, submit, token

TABLES = ("events", "workflows", "clients", "mutation_results", "outbox", "dlq", "breakers")


def make_app(database_url: str, **settings_: Any):
    return create_app(
        database_url, workflows=[NOOP], auth_secret=SECRET, run_sagas=False, **settings_
    )


async def fingerprint(database_url: str) -> dict[str, Any]:
    """Row counts of every table plus every workflow's (id, tenant, status, version).

    Read with plain SQL beside the server, so a dropped table fails loudly here.
    """
    queries = {f"count:{table}": f"SELECT count(*) FROM {table}" for table in TABLES}
    queries["head"] = "SELECT coalesce(max(seq), 0) FROM events"
    workflows_sql = "SELECT id, tenant, status, version FROM workflows ORDER BY id"
    result: dict[str, Any] = {}
    if database_url.startswith("sqlite:"):
        con = sqlite3.connect(urlsplit(database_url).path)
        try:
            for key, sql in queries.items():
                result[key] = con.execute(sql).fetchone()[0]
            result["workflows"] = [tuple(row) for row in con.execute(workflows_sql)]
        finally:
            con.close()
        return result
    import asyncpg

    schema = parse_qs(urlsplit(database_url).query)["schema"][0]
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": schema})
    try:
        for key, sql in queries.items():
            result[key] = await conn.fetchval(sql)
        result["workflows"] = [tuple(row) for row in await conn.fetch(workflows_sql)]
    finally:
        await conn.close()
    return result


def without_bookkeeping(view: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint minus clients/mutation_results: a *rejected* mutation is recorded by
    design (so the client never resends it), but it must change no workflow or event."""
    return {k: v for k, v in view.items() if k not in ("count:clients", "count:mutation_results")}


def auth(tok: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"} if tok else {}


async def open_ws(url: str, *, header: str | None, origin: str | None = None):
    headers = {"Authorization": header} if header else {}
    if origin is not None:
        headers["Origin"] = origin
    return await connect(f"{url}/v1/sync", additional_headers=headers, max_size=None)


async def first_close(ws) -> tuple[int | None, list[Any]]:
    """Everything received until the close, and the close code."""
    received: list[Any] = []
    try:
        async with asyncio.timeout(10):
            while True:
                received.append(decode_server_message(await ws.recv()))
    except websockets.ConnectionClosed as exc:
        return (exc.rcvd.code if exc.rcvd else None), received


async def seed(server: RunningServer, tenant: str = "acme") -> tuple[str, int]:
    """One workflow (pushed by a client) and one dead letter for it; returns their ids."""
    wf = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        body = {"client_id": f"seed-{tenant}", "mutations": [msgspec.to_builtins(submit(1, wf))]}
        r = await http.post("/v1/push", json=body, headers=auth(token(tenant, f"seed-{tenant}")))
        assert r.json()["results"][0]["status"] == "applied"
    store = server.app.state.tether.store

    async def add(tx):
        return await tx.add_dlq(
            DlqEntry(
                id=0,
                tenant=tenant,
                workflow_id=wf,
                step="only",
                reason="attempts exhausted",
                attempts=3,
                last_error="boom",
                created_at=time.time(),
            )
        )

    return wf, await store.run(add)


def report_body(wf: str, source: str = "job-queue") -> dict[str, Any]:
    return {"workflow_id": wf, "source": source, "status": "completed", "at": time.time()}


@pytest.fixture
async def server(database_url) -> AsyncIterator[RunningServer]:
    async with running(make_app(database_url)) as srv:
        srv.database_url = database_url  # type: ignore[attr-defined]
        yield srv
