"""Heavy and hostile traffic against the real server (issue 11, findings 1, 2, 3, 5, 11).

Each test is a regression that failed before byte budgets: realistic payloads (tens of
KB per request), oversized text, non-finite numbers and slow readers. The SDK and the
server talk over real sockets, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from websockets.asyncio.client import connect

from protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Events,
    Hello,
    Mutation,
    PullResponse,
    encode,
)
from protocol import events as event_types
from protocol.codec import decode_server_message
from protocol.limits import MAX_DETAIL_BYTES, MAX_RESULT_BYTES
from sync_server import create_app
from sync_server.saga.definitions import Step, Workflow
from sync_server.snapshots import append_event, snapshot_data
from sync_server.store import open_store
from sync_server.store.base import WorkflowRecord
from tests.client_helpers import (
    TENANT,
    fast_client,
    make_app,
    server_events,
    server_submitted,
    wait_until,
)
from tests.conftest import scaled
from tests.servers import SECRET, RunningServer, free_port, running
from tests.sync_helpers import NOOP, RawClient, close_code_of, submit, token
from tests.test_client_sync import refuse_upgrades

pytestmark = pytest.mark.timeout(180)

BIG_INPUT = 60_000


def big_input(i: int) -> dict[str, Any]:
    """A workflow input of about 60 KB (under the 64 KiB limit)."""
    return {"i": i, "blob": "x" * (BIG_INPUT - 30)}


def report(mid: int, workflow_id: str, at: float = 1.0, detail: Any = None) -> Mutation:
    args = {
        "workflow_id": workflow_id,
        "source": "mini-app",
        "status": "running",
        "at": at,
        "detail": detail or {},
    }
    return Mutation(id=mid, name="report_state", args=args, created_at=1.0)


# --------------------------------------------------------------- finding 1


@pytest.mark.parametrize("transport", ["websocket", "http"])
async def test_offline_backlog_of_large_submits_is_delivered(
    database_url: str, tmp_path: Path, transport: str
) -> None:
    """Regression (finding 1): 10 submits of 60 KB queued offline were pushed as one
    601 KB batch, refused with 4413 (or 413 over HTTP) and resent forever."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    async with fast_client(url, tmp_path / "c.db", http_poll_interval=0.05) as client:
        handles = [await client.submit_workflow("noop", big_input(i)) for i in range(10)]
        later = await client.submit_workflow("noop", {"small": True})
        app = make_app(database_url)
        server = RunningServer(refuse_upgrades(app) if transport == "http" else app, port=port)
        await server.start()
        try:
            await client.flush(timeout=scaled(30))
            assert client.last_error is None or "too large" not in client.last_error.message
            assert client.transport == transport
            assert await server_submitted(database_url) == [h.id for h in handles] + [later.id]
            assert client.session.counters.pushes >= 2  # cut by bytes, not one batch
        finally:
            await client.close()
            await server.stop()


async def test_a_mutation_over_the_servers_budget_is_rejected_and_the_queue_moves_on(
    database_url: str, tmp_path: Path
) -> None:
    """A server with a small frame limit declares it in Welcome; a queued submit that
    cannot fit is answered ``rejected`` with a reason, and the submit behind it applies."""
    app = make_app(database_url, max_frame_bytes=32 * 1024)
    async with running(app) as server, fast_client(server.ws_url, tmp_path / "c.db") as client:
        big = await client.submit_workflow("noop", {"blob": "y" * 40_000})
        small = await client.submit_workflow("noop", {"n": 1})
        await client.flush(timeout=scaled(20))
        view = client.get_workflow(big.id)
        assert view is not None and view.status == "failed" and not view.pending
        assert view.error is not None and "too large" in view.error
        assert (await client.wait(small.id, timeout=scaled(20))).status == "completed"
        assert client.session.max_batch_bytes == 32 * 1024 - 1024
    assert await server_submitted(database_url) == [small.id]


async def test_http_push_refused_as_too_large_shrinks_the_budget(
    database_url: str, tmp_path: Path
) -> None:
    """Over HTTP there is no Welcome: a 413 for a batch halves the push budget for good
    until batches fit, and a mutation that cannot fit at all is settled rejected."""
    app = refuse_upgrades(make_app(database_url, max_frame_bytes=48 * 1024))
    async with running(app) as server:
        client = fast_client(server.ws_url, tmp_path / "c.db", http_poll_interval=0.05)
        async with client:
            handles = [await client.submit_workflow("noop", {"b": "s" * 20_000}) for _ in range(6)]
            big = await client.submit_workflow("noop", {"b": "B" * 60_000})
            last = await client.submit_workflow("noop", {"n": 1})
            await client.flush(timeout=scaled(30))
            assert client.transport == "http"
            assert client.session.max_batch_bytes <= 48 * 1024
            view = client.get_workflow(big.id)
            assert (
                view is not None and view.status == "failed" and "too large" in (view.error or "")
            )
    assert await server_submitted(database_url) == [h.id for h in handles] + [last.id]


async def test_server_rejects_oversized_payloads_per_mutation_and_applies_the_rest(
    database_url: str,
) -> None:
    """Too large an input or detail is ``rejected`` with a reason; the rest of the
    batch applies (nothing closes the connection, nothing is resent)."""
    async with running(make_app(database_url)) as server:
        raw = await RawClient.open(server.ws_url)
        wf = str(uuid.uuid4())
        oversized = Mutation(
            id=2,
            name="submit_workflow",
            args={"workflow_id": str(uuid.uuid4()), "name": "noop", "input": {"b": "z" * 70_000}},
        )
        result = await raw.push(
            [
                submit(1, wf),
                oversized,
                report(3, wf, detail={"text": "d" * (MAX_DETAIL_BYTES + 1)}),
                submit(4),
            ]
        )
        statuses = [(r.status, r.error) for r in result.results]
        assert statuses[0] == ("applied", None) and statuses[3] == ("applied", None)
        assert statuses[1][0] == "rejected" and "over the limit" in (statuses[1][1] or "")
        assert statuses[2][0] == "rejected" and "report detail" in (statuses[2][1] or "")
        await raw.close()


# --------------------------------------------------------------- finding 3


@pytest.mark.parametrize("bad", [math.inf, math.nan])
async def test_non_finite_report_is_refused_and_poisons_nothing(database_url: str, bad) -> None:
    """Regression (finding 3): ``report_state{at: +inf}`` passed ``ge=0``, was stored
    as null, and every later report of the workflow — and every batch it rode in —
    failed with ``internal: TypeError``; ``POST /v1/reports`` answered 500."""
    async with running(make_app(database_url)) as server:
        raw = await RawClient.open(server.ws_url)
        wf = str(uuid.uuid4())
        assert (await raw.push([submit(1, wf)])).results[0].status == "applied"
        first = await raw.push([report(2, wf, at=bad), report(3, wf, detail={"x": bad})])
        assert [r.status for r in first.results] == ["rejected", "rejected"]
        assert all("finite" in (r.error or "") or "float" in (r.error or "") for r in first.results)
        # The workflow still takes reports, in a batch with an unrelated submit.
        later = await raw.push([report(4, wf, at=2.0), submit(5)])
        assert [r.status for r in later.results] == ["applied", "applied"]
        await raw.close()
        headers = {"Authorization": f"Bearer {token(role='source')}"}
        async with httpx.AsyncClient(base_url=server.http_url, headers=headers) as http:
            body = {"workflow_id": wf, "source": "job-queue", "status": "running"}
            prefix = b'{"workflow_id":"%s","source":"job-queue","status":"running",' % wf.encode()
            for raw_body in (prefix + b'"at":1e999}', prefix + b'"at":1.0,"detail":{"v":-1e999}}'):
                r = await http.post(
                    "/v1/reports", content=raw_body, headers={"content-type": "application/json"}
                )
                assert r.status_code in (400, 422), r.text
                assert "finite" in r.text or "out of range" in r.text, r.text
            r = await http.post("/v1/reports", json={**body, "at": 3.0})
            assert r.status_code == 202, r.text


# ------------------------------------------------------------ findings 2, 11


async def _write_events(database_url: str, count: int, detail_bytes: int) -> None:
    """Events with a large ``detail`` straight into the store (as an older server, with
    no detail cap, accepted them)."""
    store = open_store(database_url)
    await store.open()
    now = time.time()  # just ended: well inside the retention window
    try:
        for _ in range(count):

            async def unit(tx: Any) -> None:
                record = WorkflowRecord(
                    id=str(uuid.uuid4()),
                    tenant=TENANT,
                    name="noop",
                    status="completed",
                    state={"steps": {"only": {"status": "succeeded"}}},
                    created_at=now,
                    updated_at=now,
                )
                append_event(
                    tx,
                    record,
                    event_types.WORKFLOW_REPORTED,
                    now,
                    source="job-queue",
                    status="completed",
                    at=now,
                    detail={"blob": "r" * detail_bytes},
                )
                await tx.insert_workflow(record)

            await store.run(unit)
    finally:
        await store.close()


async def test_fresh_client_catches_up_over_pages_cut_by_bytes(
    database_url: str, tmp_path: Path
) -> None:
    """Regression (finding 2): 25 events with a 400 KB detail made a 10 MB catch-up
    page, over the SDK's frame limit; a new client stayed at cursor 0 forever. Pages
    are now cut by bytes (WebSocket and HTTP), and such a detail is refused upfront."""
    await _write_events(database_url, 25, 400_000)
    head = len(await server_events(database_url))
    async with running(make_app(database_url)) as server:
        async with fast_client(server.ws_url, tmp_path / "c.db") as client:
            await wait_until(lambda: client.cursor == head, 30, "the fresh client catches up")
            assert client.store.event_seqs() == [e.seq for e in await server_events(database_url)]
        headers = {"Authorization": f"Bearer {token()}"}
        async with httpx.AsyncClient(base_url=server.http_url, headers=headers) as http:
            r = await http.get("/v1/pull", params={"cursor": 0, "limit": 1000})
            page = msgspec.json.decode(r.content, type=PullResponse)
            assert page.has_more and 1 <= len(page.events) <= 3
            assert len(r.content) < 1024 * 1024 + 420_000  # budget + one event at most
        # Refused at the door now: a 400 KB detail is over MAX_DETAIL_BYTES.
        raw = await RawClient.open(server.ws_url, client_id="reporter", cursor=head)
        wf = str(uuid.uuid4())
        pushed = await raw.push([submit(1, wf), report(2, wf, detail={"b": "q" * 400_000})])
        assert [r.status for r in pushed.results] == ["applied", "rejected"]
        await raw.close()


async def _big_result(ctx: Any) -> str:
    return "R" * (60 * 1024)


async def _huge_result(ctx: Any) -> str:
    return "H" * (2_500_000)


BIG = Workflow("big", [Step("make", _big_result)])
HUGE = Workflow("huge", [Step("make", _huge_result)])


async def test_large_step_results_cost_their_size_once_and_clients_catch_up(
    database_url: str, tmp_path: Path
) -> None:
    """Regression (finding 11): every event carried the workflow's whole snapshot, step
    results included, so a 60 KiB result cost ≈ 300 KB of log and a fresh client could
    never catch up; a 2.5 MiB result left even its submitter stuck."""
    app = create_app(database_url, workflows=[NOOP, BIG, HUGE], auth_secret=SECRET)
    async with running(app) as server:
        async with fast_client(server.ws_url, tmp_path / "a.db") as submitter:
            handles = [await submitter.submit_workflow("big", {"i": i}) for i in range(40)]
            huge = await submitter.submit_workflow("huge", {})
            for handle in handles:
                done = await submitter.wait(handle.id, timeout=scaled(60))
                assert done.status == "completed" and done.result == "R" * (60 * 1024)
                assert done.steps["make"].result == done.result
            failed = await submitter.wait(huge.id, timeout=scaled(60))
            assert failed.status in ("failed", "compensated", "parked"), failed
            error = failed.steps["make"].error or ""
            assert "over the limit" in error and str(MAX_RESULT_BYTES) in error, error
        events = await server_events(database_url)
        per_workflow: dict[str, int] = {}
        for event in events:
            size = len(msgspec.json.encode(event.data))
            per_workflow[event.workflow_id] = per_workflow.get(event.workflow_id, 0) + size
        # The result travels once: as the step's; the output refers to it (result_of).
        assert max(per_workflow[h.id] for h in handles) < 60 * 1024 + 8 * 1024
        head = events[-1].seq
        async with fast_client(server.ws_url, tmp_path / "b.db") as fresh:
            await wait_until(lambda: fresh.cursor == head, 60, "a fresh client catches up")
            store = open_store(database_url)
            await store.open()
            try:
                for handle in [*handles[:5], huge]:
                    record = await store.get_workflow(TENANT, handle.id)
                    assert record is not None
                    row = fresh.store.get_row(handle.id)
                    assert row is not None and row.snapshot is not None
                    assert msgspec.to_builtins(row.snapshot) == snapshot_data(record)
            finally:
                await store.close()


# --------------------------------------------------------------- finding 5


async def test_send_queue_bounded_in_bytes_cuts_a_slow_reader(database_url: str) -> None:
    """Regression (finding 5): the send queue was bounded in frames only; a reader that
    stops reading while large reports flow is now cut (1013) at ``send_queue_bytes``
    and resumes from its cursor without loss."""
    app = make_app(
        database_url, send_queue_bytes=256 * 1024, send_queue_limit=100_000, page_bytes=64 * 1024
    )
    async with running(app, sndbuf=4096) as srv:
        # The writer pushes over HTTP: every accepted socket here has a tiny send buffer.
        headers = {"Authorization": f"Bearer {token()}"}
        http = httpx.AsyncClient(base_url=srv.http_url, headers=headers)

        async def push(mutations: list[Mutation]) -> None:
            body = {"client_id": "w", "mutations": [msgspec.to_builtins(m) for m in mutations]}
            r = await http.post("/v1/push", json=body)
            assert r.status_code == 200 and all(
                x["status"] == "applied" for x in r.json()["results"]
            ), r.text

        wf = str(uuid.uuid4())
        await push([submit(1, wf)])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        sock.setblocking(False)
        slow_ws = await connect(
            f"{srv.ws_url}/v1/sync",
            sock=sock,
            max_queue=1,
            max_size=None,
            additional_headers=headers,
        )
        await slow_ws.send(encode(Hello(client_id="slow", protocol_version=PROTOCOL_VERSION)))
        # Live batches queue only for a LIVE session (a catching-up one is paged under
        # flow control instead): read until the catch-up page that ends it, then stop.
        while True:
            frame = await asyncio.wait_for(slow_ws.recv(), 30)
            message = decode_server_message(frame if isinstance(frame, bytes) else frame.encode())
            if isinstance(message, Events) and not message.has_more:
                break
        metric = srv.app.state.tether.metrics.slow_consumers
        mid, at = 1, 1.0
        while metric._value.get() < 1 and mid < 400:
            batch = []
            for _ in range(10):
                mid += 1
                at += 1
                batch.append(report(mid, wf, at=at, detail={"d": "p" * 15_000}))
            await push(batch)
        await http.aclose()
        assert metric._value.get() >= 1, "the slow reader was never cut"
        assert await close_code_of(slow_ws) == 1013
        head = len(await server_events(database_url))
        back = await RawClient.open(srv.ws_url, client_id="slow")
        events = await back.collect_until(head, timeout=60)
        assert [e.seq for e in events] == sorted({e.seq for e in events})
        await back.close()


def test_hub_encodes_a_live_batch_once_for_every_connection() -> None:
    from protocol import Event, Events
    from sync_server.session import ServerSession

    class _NoStore:
        multi_instance = False

    from sync_server.hub import Hub

    hub = Hub(_NoStore())  # type: ignore[arg-type]
    batch = [
        Event(seq=i, workflow_id="w", type="t", data={"n": "x" * 1000}, at=1.0) for i in (1, 2)
    ]
    frames = []
    for _ in range(3):
        session = ServerSession(server_id="s")
        session.state = session.state.__class__.LIVE
        session.receive_live(batch)
        (message,) = session.messages_to_send()
        assert isinstance(message, Events)
        frames.append(hub.frame_for(message))
    assert frames[0] is frames[1] is frames[2]
    assert frames[0] == encode(Events(events=batch, cursor=2, has_more=False))
    assert len(frames[0]) < MAX_FRAME_BYTES


async def test_sweep_will_not_complete_a_step_with_an_oversized_job_result(
    database_url: str,
) -> None:
    """A job source's result obeys the step result cap too: the sweep raises an alert
    instead of storing it (the step's own attempt then fails with the reason)."""
    from sync_server.reconcile.rules import ReconcileRules
    from sync_server.reconcile.sources import JobState
    from sync_server.reconcile.sweep import Reconciler
    from sync_server.saga.alerts import RecordingAlerts

    class HugeResults:
        source = "job-queue"

        async def job_status(self, workflow: Any, step: str, key: str) -> JobState:
            return JobState("completed", result={"image": "h" * (MAX_RESULT_BYTES + 1)}, at=1.0)

    store = open_store(database_url)
    await store.open()
    try:
        record = WorkflowRecord(
            id=str(uuid.uuid4()),
            tenant=TENANT,
            name="generate_image",
            status="running",
            state={"steps": {"render": {"status": "running", "attempts": 1}}},
            created_at=1.0,
            updated_at=1.0,
        )

        async def unit(tx: Any) -> None:
            append_event(tx, record, event_types.WORKFLOW_SUBMITTED, 1.0, client_id="x")
            await tx.insert_workflow(record)

        await store.run(unit)
        head = await store.head()
        alerts = RecordingAlerts()
        rules = ReconcileRules(job_steps={"generate_image": "render"})
        sweeper = Reconciler(store, rules, [HugeResults()], alerts=alerts)
        assert await sweeper.sweep_once() == 0
        assert await store.head() == head  # nothing stored
        ((kind, message, _),) = alerts.alerts
        assert kind == "reconciliation_failed" and "over the limit" in message
    finally:
        await store.close()
