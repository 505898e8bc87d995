"""Reconciliation: the canonical rule as data, and repairs of real divergence (lost
completion, lost job, divergent client view, conflicting reports) on both backends."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from examples.image_pipeline import build_pipeline
from examples.job_service import JobServiceSource, running_job_service
from protocol import Mutation, WorkflowStatus
from sync_server import create_app
from sync_server.auth import issue_token
from sync_server.reconcile import ReconcileRules, decide
from sync_server.saga.machine import idempotency_key
from sync_server.store.base import WorkflowRecord
from tests.conftest import wait_for
from tests.servers import SECRET, running
from tests.sync_helpers import RawClient, token

pytestmark = pytest.mark.timeout(90)


# ------------------------------------------------------------------ pure rules


def record(status="running", step_status="running", reports=None) -> WorkflowRecord:
    return WorkflowRecord(
        id=str(uuid.uuid4()),
        tenant="acme",
        name="generate_image",
        status=status,
        state={
            "steps": {"render": {"status": step_status, "attempts": 1}},
            "reports": reports or {},
        },
    )


RULES = ReconcileRules(job_steps={"generate_image": "render"})


def rep(status, at, **detail):
    return {"status": status, "at": at, "detail": detail}


def test_higher_source_completion_completes_the_step():
    repair = decide(record(reports={"job-queue": rep("completed", 5, result={"x": 1})}), RULES)
    assert (repair.kind, repair.step, repair.result) == ("complete", "render", {"x": 1})


def test_priority_beats_a_later_timestamp():
    reports = {"job-queue": rep("completed", 5), "mini-app": rep("failed", 99)}
    assert decide(record(reports=reports), RULES).kind == "complete"


def test_operator_can_reorder_priority():
    rules = ReconcileRules(priority=("mini-app", "open-api", "job-queue"))
    reports = {"job-queue": rep("completed", 5), "mini-app": rep("cancelled", 1)}
    assert decide(record(reports=reports), rules).kind == "cancel"
    assert ReconcileRules.parse_priority("mini-app, job-queue,open-api")[0] == "mini-app"
    with pytest.raises(ValueError):
        ReconcileRules.parse_priority("job-queue,nobody")


def test_weaker_source_is_corrected_not_obeyed():
    repair = decide(
        record(status="completed", step_status="succeeded", reports={"mini-app": rep("failed", 9)}),
        RULES,
    )
    assert repair.kind == "correct" and repair.source == "mini-app"
    agreeing = record(status="completed", reports={"mini-app": rep("completed", 9)})
    assert decide(agreeing, RULES).kind == "none"


def test_unappliable_and_in_progress():
    late = record(
        status="compensating",
        step_status="compensating",
        reports={"job-queue": rep("completed", 5)},
    )
    assert decide(late, RULES).kind == "unappliable"
    assert decide(record(reports={"job-queue": rep("running", 5)}), RULES).kind == "none"
    assert decide(record(), RULES).kind == "none"
    done = record(step_status="succeeded", reports={"job-queue": rep("completed", 5)})
    assert decide(done, RULES).kind == "none"


# ---------------------------------------------------------------- integration


@pytest.fixture
def job_service():
    with running_job_service() as service:
        yield service


def app_for(database_url, job_service, **settings):
    pipeline = build_pipeline(job_service.url, render_timeout=60)
    return create_app(
        database_url,
        workflows=[pipeline],
        auth_secret=SECRET,
        sources=[JobServiceSource(job_service.url)],
        job_steps={"generate_image": "render"},
        reconcile_interval=0.2,
        reconcile_grace=0.5,
        **settings,
    )


async def submit(client: RawClient, mid: int, render: dict) -> str:
    wid = str(uuid.uuid4())
    result = await client.push(
        [
            Mutation(
                id=mid,
                name="submit_workflow",
                args={
                    "workflow_id": wid,
                    "name": "generate_image",
                    "input": {"prompt": "a cat", "credits": 1, "render": render},
                },
            )
        ]
    )
    assert result.results[0].status == "applied"
    return wid


async def final(store, wid, timeout=30):
    async def done():
        rec = await store.get_workflow("acme", wid)
        return rec if rec and WorkflowStatus(rec.status).terminal else None

    return await wait_for(done, timeout=timeout, message=f"workflow {wid} ends")


async def reconciled(store, wid):
    return [
        e.data
        for e in await store.read_workflow_events("acme", wid)
        if e.type == "workflow.reconciled"
    ]


async def test_lost_completion_is_applied(database_url, job_service):
    async with running(app_for(database_url, job_service)) as srv:
        store = srv.app.state.tether.store
        client = await RawClient.open(srv.ws_url)
        started = time.monotonic()
        # The job completes, but its answer is held for 60 s: a lost callback.
        wid = await submit(client, 1, {"lose_first": 1, "stall": 60})
        rec = await final(store, wid)
        assert rec.status == "completed"
        assert time.monotonic() - started < 30  # not by waiting out the 60 s
        [repair] = await reconciled(store, wid)
        assert repair["repair"] == "complete" and repair["source"] == "job-queue"
        assert repair["before"]["step_status"] == "running"
        assert repair["after"]["step_status"] == "succeeded"
        books = job_service.books
        key = idempotency_key(wid, "render", tenant="acme")
        assert books.lost[key] == 1  # the fault really happened
        assert books.effects[key] == 1
        assert rec.state["steps"]["render"]["result"]["image"] == f"image-for-{key}"
        metrics = srv.app.state.tether.metrics.render().decode()
        assert 'tether_reconciliation_repairs_total{kind="complete"}' in metrics
        await client.close()


async def test_lost_job_is_resubmitted_with_the_same_key(database_url, job_service):
    async with running(app_for(database_url, job_service)) as srv:
        store = srv.app.state.tether.store
        client = await RawClient.open(srv.ws_url)
        wid = await submit(client, 1, {"drop_first": 1, "stall": 60})
        rec = await final(store, wid)
        assert rec.status == "completed"
        repairs = await reconciled(store, wid)
        assert [r["repair"] for r in repairs] == ["resubmit"]
        key = idempotency_key(wid, "render", tenant="acme")
        assert job_service.books.dropped[key] == 1
        assert job_service.books.attempts[key] == 2  # the same key, resubmitted once
        assert job_service.books.effects[key] == 1
        assert rec.state["steps"]["render"]["attempts"] == 1  # no attempt burnt
        await client.close()


async def test_divergent_client_view_is_corrected(database_url, job_service):
    async with running(app_for(database_url, job_service)) as srv:
        store = srv.app.state.tether.store
        client = await RawClient.open(srv.ws_url)
        wid = await submit(client, 1, {})
        assert (await final(store, wid)).status == "completed"
        # The mini-app believes it failed (say, a stale local copy): it reports its view.
        report = Mutation(
            id=2,
            name="report_state",
            args={"workflow_id": wid, "source": "mini-app", "status": "failed", "at": time.time()},
        )
        result = await client.push([report])
        assert result.results[0].status == "applied"
        [repair] = await reconciled(store, wid)
        assert repair["repair"] == "correct"
        assert repair["before"] == {"status": "failed"}
        assert repair["after"] == {"status": "completed"}
        assert repair["workflow"]["status"] == "completed"  # the canonical snapshot
        # The client receives the correction on its stream.
        async with asyncio.timeout(10):
            while not any(e.type == "workflow.reconciled" for e in client.events):
                client._take(await client.recv())
        [seen] = [e for e in client.events if e.type == "workflow.reconciled"]
        assert seen.data["workflow"]["status"] == "completed"
        # A client may not speak for the job queue.
        forged = Mutation(
            id=3,
            name="report_state",
            args={"workflow_id": wid, "source": "job-queue", "status": "failed", "at": time.time()},
        )
        refused = await client.push([forged])
        assert refused.results[0].status == "rejected"
        await client.close()


async def test_conflicting_reports_end_canonical(database_url, job_service):
    app = app_for(database_url, job_service)
    async with running(app) as srv:
        store = srv.app.state.tether.store
        client = await RawClient.open(srv.ws_url)
        # The render stalls a long time: the saga is mid-step when the reports come in.
        wid = await submit(client, 1, {"stall_first": 1, "stall": 60})
        await wait_for(
            lambda: job_service.books.stalls[idempotency_key(wid, "render", tenant="acme")] == 1,
            timeout=20,
        )
        source = issue_token(SECRET, tenant="acme", subject="render-queue", role="source")
        now = time.time()
        async with httpx.AsyncClient(
            base_url=srv.http_url, headers={"Authorization": f"Bearer {source}"}
        ) as http:
            done = {
                "workflow_id": wid,
                "source": "job-queue",
                "status": "completed",
                "at": now,
                "detail": {"step": "render", "result": {"image": "from-queue"}},
            }
            older = {
                "workflow_id": wid,
                "source": "job-queue",
                "status": "running",
                "at": now - 50,
                "detail": {"step": "render"},
            }
            mini = {"workflow_id": wid, "source": "mini-app", "status": "failed", "at": now + 100}
            assert (await http.post("/v1/reports", json=done)).status_code == 202
            assert (await http.post("/v1/reports", json=older)).status_code == 202
            assert (await http.post("/v1/reports", json=mini)).status_code == 202
            # Wrong role and other tenants are refused and change nothing.
            client_tok = {"Authorization": f"Bearer {token()}"}
            assert (
                await http.post("/v1/reports", json=done, headers=client_tok)
            ).status_code == 403
            other = issue_token(SECRET, tenant="globex", subject="q", role="source")
            r = await http.post(
                "/v1/reports", json=done, headers={"Authorization": f"Bearer {other}"}
            )
            assert r.status_code == 404
        rec = await final(store, wid)
        assert rec.status == "completed"  # job-queue beat the later mini-app report
        assert rec.state["steps"]["render"]["result"] == {"image": "from-queue"}
        assert rec.state["reports"]["job-queue"]["status"] == "completed"  # latest kept
        kinds = [r["repair"] for r in await reconciled(store, wid)]
        assert kinds[0] == "complete"
        await client.close()


async def test_sdk_reports_a_diverged_view_and_converges(database_url, job_service, tmp_path):
    """The SDK's own view goes stale (its file was tampered with); it reports the view,
    the server corrects it, and the client converges to the canonical state."""
    import sqlite3

    import msgspec

    from tests.client_helpers import fast_client

    path = tmp_path / "client.db"
    async with running(app_for(database_url, job_service)) as srv:
        async with fast_client(srv.ws_url, path) as client:
            handle = await client.submit_workflow("generate_image", {"prompt": "a cat"})
            assert (await client.wait(handle.id, timeout=30)).status == "completed"
        with sqlite3.connect(path) as db:
            (snap,) = db.execute(
                "SELECT snapshot FROM workflows WHERE id = ?", (handle.id,)
            ).fetchone()
            stale = {**msgspec.json.decode(snap), "status": "failed"}
            db.execute(
                "UPDATE workflows SET status = 'failed', snapshot = ? WHERE id = ?",
                (msgspec.json.encode(stale).decode(), handle.id),
            )
        async with fast_client(srv.ws_url, path) as client:
            assert client.get_workflow(handle.id).status == "failed"  # diverged
            await client.report_state(handle.id)
            await client.flush(timeout=20)
            await wait_for(lambda: client.get_workflow(handle.id).status == "completed")
            with pytest.raises(Exception, match="no confirmed local view"):
                await client.report_state(str(uuid.uuid4()))
        [repair] = await reconciled(srv.app.state.tether.store, handle.id)
        assert repair["repair"] == "correct" and repair["before"] == {"status": "failed"}
