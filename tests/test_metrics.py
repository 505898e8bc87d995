"""Every metric and alert of issue 6, provoked for real and observed where an operator
would see it: on ``/metrics`` (scraped over HTTP from uvicorn on loopback) and at the
alert webhook (a tiny Starlette receiver on loopback), plus the log line.

Metrics: workflows started/finished by type, step attempts and retries, event append and
delivery latency, outbox lag, saga lag, DLQ depth, breaker state, connected clients,
reconciliation repairs. Alerts: ``step_failed`` (a dead letter was added),
``dlq_growing``, ``breaker_open``, ``compensation_failed``, ``reconciliation_failed``,
``processing_delayed`` (a backlog older than a minute).
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from client_sdk import SyncClient
from sync_server import create_app
from sync_server.monitor import AlertMachine
from sync_server.saga import PermanentError, RetryPolicy, Step, StepContext, Workflow
from sync_server.saga.breaker import BreakerPolicy
from tests.conftest import wait_for
from tests.servers import running
from tests.sync_helpers import token

pytestmark = pytest.mark.timeout(60)

TENANT = "acme"


# ------------------------------------------------------------------ workflows
async def _ok(ctx: StepContext) -> dict[str, Any]:
    return {"ok": True}


async def _fails_once(ctx: StepContext) -> dict[str, Any]:
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return {"attempt": ctx.attempt}


async def _permanent(ctx: StepContext) -> None:
    raise PermanentError("the downstream refused this request")


async def _broken_downstream(ctx: StepContext) -> None:
    raise RuntimeError("downstream unavailable")


async def _refund_fails(ctx: StepContext) -> None:
    raise RuntimeError("refund service down")


FAST = RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0, jitter=False)
TWICE = RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0, jitter=False)
ONCE = RetryPolicy(max_attempts=1)

FLAKY = Workflow("flaky", [Step("a", _fails_once, retry=FAST), Step("b", _ok, depends_on=["a"])])
DOOMED = Workflow("doomed", [Step("only", _permanent)], on_failure="park")
GUARDED = Workflow(
    "guarded",
    [Step("call", _broken_downstream, retry=TWICE, breaker="svc")],
    on_failure="park",
)
SAGA = Workflow(
    "saga",
    [
        Step("reserve", _ok, compensate=_refund_fails, compensate_retry=ONCE),
        Step("charge", _permanent, depends_on=["reserve"]),
    ],
    on_failure="compensate",
)


# ------------------------------------------------------------------ helpers
def webhook_receiver() -> tuple[Starlette, list[dict[str, Any]]]:
    """A loopback alert webhook that keeps what it receives."""
    received: list[dict[str, Any]] = []

    async def hook(request: Request) -> JSONResponse:
        received.append(await request.json())
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/alerts", hook, methods=["POST"])]), received


def make_app(tmp_path: Path, workflows: list[Workflow], **settings: Any) -> Any:
    app = create_app(
        f"sqlite:///{tmp_path / 'sync.db'}",
        workflows=workflows,
        auth_secret="test-secret-0123456789abcdef0123456789abcdef",
        **settings,
    )
    tether = app.state.tether
    tether.monitor_interval = 0.05
    tether.runner_options = {
        "poll_interval": 0.1,
        "breakers": {"svc": BreakerPolicy(failure_threshold=2, reset_timeout=60)},
    }
    return app


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``/metrics`` text -> {(sample name, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def push(http: httpx.AsyncClient, bearer: str, items: list[tuple[str, str, Any]]) -> None:
    """Submit workflows (id, name, input) over ``POST /v1/push`` as one client."""
    mutations = [
        {
            "id": n,
            "name": "submit_workflow",
            "args": {"workflow_id": wid, "name": name, "input": data},
            "created_at": time.time(),
        }
        for n, (wid, name, data) in enumerate(items, start=1)
    ]
    response = await http.post(
        "/v1/push",
        json={"client_id": f"c-{uuid.uuid4().hex[:8]}", "mutations": mutations},
        headers={"Authorization": f"Bearer {bearer}"},
    )
    assert response.status_code == 200, response.text
    assert all(r["status"] == "applied" for r in response.json()["results"])


async def status_of(app: Any, workflow_id: str) -> str | None:
    record = await app.state.tether.store.get_workflow(TENANT, workflow_id)
    return None if record is None else record.status


# ------------------------------------------------------------------ tests
async def test_workflow_step_latency_and_client_metrics(tmp_path: Path) -> None:
    app = make_app(tmp_path, [FLAKY])
    async with running(app) as srv, httpx.AsyncClient(base_url=srv.http_url) as http:
        client = SyncClient(srv.ws_url, token=token(TENANT, "sdk"), path=tmp_path / "c.db")
        async with client:
            await wait_for(lambda: client.connected, 10, message="client connected")
            handles = [await client.submit_workflow("flaky", {"n": i}) for i in range(3)]
            for handle in handles:
                view = await client.wait(handle.id, timeout=20)
                assert view.status == "completed"
            samples = scrape((await http.get("/metrics")).text)
            assert sample(samples, "tether_connected_clients") == 1
        started = sample(samples, "tether_workflows_started_total", workflow="flaky")
        assert started == 3
        finished = sample(
            samples, "tether_workflows_finished_total", workflow="flaky", status="completed"
        )
        assert finished == 3
        attempts = sample(
            samples, "tether_step_attempts_total", workflow="flaky", step="a", kind="step"
        )
        assert attempts == 6
        assert sample(samples, "tether_step_retries_total", workflow="flaky", step="a") == 3
        assert sample(samples, "tether_step_retries_total", workflow="flaky", step="b") == 0
        assert sample(samples, "tether_event_append_seconds_count", source="push") >= 1
        assert sample(samples, "tether_event_append_seconds_count", source="saga") >= 3
        assert sample(samples, "tether_event_delivery_seconds_count") >= 3 * 5
        assert sample(samples, "tether_events_delivered_total") >= 3 * 5
        assert sample(samples, "tether_mutations_total", status="applied") == 3
        # The client has gone: the gauge follows.
        await wait_for(lambda: app.state.tether.connections == 0, 10)
        samples = scrape((await http.get("/metrics")).text)
        assert sample(samples, "tether_connected_clients") == 0


async def test_dead_letters_breaker_and_compensation_alerts_reach_the_webhook(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, received = webhook_receiver()
    async with running(receiver) as hook:
        app = make_app(tmp_path, [DOOMED, GUARDED, SAGA], alert_webhook=f"{hook.http_url}/alerts")
        async with running(app) as srv, httpx.AsyncClient(base_url=srv.http_url) as http:
            tether = app.state.tether
            # The DLQ-growth rule needs a baseline reading before the first letter.
            await wait_for(lambda: tether.monitor.readings >= 1, 10)
            doomed, guarded, saga = (str(uuid.uuid4()) for _ in range(3))
            with caplog.at_level(logging.WARNING, logger="tether.alerts"):
                await push(
                    http,
                    token(TENANT),
                    [(doomed, "doomed", {}), (guarded, "guarded", {}), (saga, "saga", {})],
                )
                for wid, wanted in ((doomed, "parked"), (guarded, "parked"), (saga, "failed")):

                    async def ended(wid: str = wid, wanted: str = wanted) -> bool:
                        return await status_of(app, wid) == wanted

                    await wait_for(ended, 20, message=f"{wid} {wanted}")
                wanted_kinds = {"step_failed", "dlq_growing", "breaker_open", "compensation_failed"}
                await wait_for(
                    lambda: wanted_kinds <= {a["kind"] for a in received}, 10, message="webhook"
                )

            async def gauges_read() -> bool:
                # doomed and guarded: a step failed; saga: charge failed, then its refund.
                return sample(scrape((await http.get("/metrics")).text), "tether_dlq_depth") == 4

            await wait_for(gauges_read, 10, message="DLQ depth gauge")
            samples = scrape((await http.get("/metrics")).text)
        # Each kind also became a log line.
        logged = caplog.text
        for kind in wanted_kinds:
            assert f"ALERT {kind}" in logged
    by_kind = {a["kind"]: a for a in received}
    assert by_kind["breaker_open"]["details"]["breaker"] == "svc"
    assert by_kind["compensation_failed"]["details"]["workflow_id"] == saga
    assert by_kind["dlq_growing"]["details"]["depth"] >= 1
    assert {"kind", "message", "details", "at"} <= set(by_kind["step_failed"])
    assert sample(samples, "tether_breaker_state", breaker="svc") == 2  # open
    assert sample(samples, "tether_breaker_opened_total", breaker="svc") == 1
    assert sample(samples, "tether_alerts_total", kind="breaker_open") == 1
    assert sample(samples, "tether_alerts_total", kind="compensation_failed") == 1
    assert sample(samples, "tether_alerts_total", kind="dlq_growing") >= 1
    for name, status in (("doomed", "parked"), ("guarded", "parked"), ("saga", "failed")):
        assert sample(samples, "tether_workflows_finished_total", workflow=name, status=status) == 1
    attempts = sample(
        samples, "tether_step_attempts_total", workflow="saga", step="reserve", kind="compensation"
    )
    assert attempts == 1


async def test_reconciliation_repair_and_failure(tmp_path: Path) -> None:
    receiver, received = webhook_receiver()
    async with running(receiver) as hook:
        app = make_app(tmp_path, [FLAKY], alert_webhook=f"{hook.http_url}/alerts")
        async with running(app) as srv, httpx.AsyncClient(base_url=srv.http_url) as http:
            wid = str(uuid.uuid4())
            await push(http, token(TENANT), [(wid, "flaky", {})])

            async def done() -> bool:
                return await status_of(app, wid) == "completed"

            await wait_for(done, 20)
            source = {"Authorization": f"Bearer {token(TENANT, 'queue', role='source')}"}
            # The mini-app lags behind: the canonical record corrects it (a repair).
            stale = {"workflow_id": wid, "source": "mini-app", "status": "running", "at": 1.0}
            response = await http.post("/v1/reports", json=stale, headers=source)
            assert response.status_code == 202, response.text
            # The job queue (strongest source) contradicts a completed workflow: no repair
            # can express that, so a human is alerted.
            bad = {
                "workflow_id": wid,
                "source": "job-queue",
                "status": "failed",
                "at": time.time(),
            }
            response = await http.post("/v1/reports", json=bad, headers=source)
            assert response.status_code == 202, response.text
            await wait_for(lambda: "reconciliation_failed" in {a["kind"] for a in received}, 10)
            samples = scrape((await http.get("/metrics")).text)
    assert sample(samples, "tether_reconciliation_repairs_total", kind="correct") >= 1
    assert sample(samples, "tether_alerts_total", kind="reconciliation_failed") == 1
    alert = next(a for a in received if a["kind"] == "reconciliation_failed")
    assert alert["details"]["workflow_id"] == wid


async def test_backlogs_older_than_a_minute_raise_processing_delayed(tmp_path: Path) -> None:
    """A sync-only instance accepts work nobody runs; its outbox has an undelivered item.
    The monitor's clock is the seam: it reads the store two minutes "later"."""
    receiver, received = webhook_receiver()
    async with running(receiver) as hook:
        app = make_app(tmp_path, [FLAKY], alert_webhook=f"{hook.http_url}/alerts", run_sagas=False)
        async with running(app) as srv, httpx.AsyncClient(base_url=srv.http_url) as http:
            tether = app.state.tether
            await push(http, token(TENANT), [(str(uuid.uuid4()), "flaky", {})])

            async def unit(tx: Any) -> None:
                await tx.enqueue_outbox(
                    "http://127.0.0.1:9/never",
                    {"n": 1},
                    event_seq=None,
                    max_retries=3,
                    at=time.time(),
                )

            await tether.store.run(unit)

            async def outbox_seen() -> bool:
                samples = scrape((await http.get("/metrics")).text)
                return sample(samples, "tether_outbox_pending") == 1

            await wait_for(outbox_seen, 10, message="outbox gauge")
            samples = scrape((await http.get("/metrics")).text)
            assert sample(samples, "tether_saga_lag_seconds") < 60
            tether.monitor.clock = lambda: time.time() + 120
            await wait_for(
                lambda: (
                    {
                        a["details"].get("backlog")
                        for a in received
                        if a["kind"] == "processing_delayed"
                    }
                    >= {"saga", "outbox"}
                ),
                10,
                message="processing_delayed for saga and outbox",
            )
            samples = scrape((await http.get("/metrics")).text)
    assert sample(samples, "tether_saga_lag_seconds") >= 119
    assert sample(samples, "tether_outbox_lag_seconds") >= 119
    # One alert per backlog while it stays delayed, not one per reading.
    assert sample(samples, "tether_alerts_total", kind="processing_delayed") == 2


def test_alert_rules_fire_once_and_rearm() -> None:
    machine = AlertMachine(delay_threshold=60)
    machine.receive_dlq_depth(2, 0.0)  # baseline: old letters are not news
    machine.receive_lag("saga", 61, 1.0)
    machine.receive_lag("saga", 90, 2.0)
    machine.receive_dlq_depth(2, 2.0)
    assert [a.kind for a in machine.alerts_to_send()] == ["processing_delayed"]
    machine.receive_lag("saga", 5, 3.0)
    machine.receive_lag("saga", 70, 4.0)
    machine.receive_dlq_depth(3, 4.0)
    raised = machine.alerts_to_send()
    assert [a.kind for a in raised] == ["processing_delayed", "dlq_growing"]
    assert raised[1].details == {"depth": 3, "previous": 2, "added": 1}
    assert machine.alerts_to_send() == []
