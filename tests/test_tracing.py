"""One trace from the device's submit to the job service (issue 17), through real parts.

A real OTLP/HTTP receiver on loopback decodes the protobuf the exporters send; the SDK
runs in this process (its spans exported to the receiver), the servers are real
``sync-server serve`` processes configured only by ``OTEL_*`` variables, and the job
service records the ``traceparent`` header of each attempt. The client is offline when
it submits; the first server instance is SIGKILLed while the render's retry runs; a
second instance takes the lease over and finishes. One trace id must span it all, with
every span parented as ``sync_server.tracing`` draws it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from bench.otlp import OtlpReceiver
from client_sdk import SyncClient
from client_sdk import tracing as client_tracing
from examples.job_service import running_job_service
from protocol.tracecontext import trace_id_of, tracing_requested, valid_traceparent
from sync_server.auth import issue_token
from sync_server.saga.machine import idempotency_key
from sync_server.store import open_store
from tests.conftest import wait_for
from tests.servers import SECRET, free_port, server_process

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def receiver():
    with OtlpReceiver() as running:
        yield running


@pytest.fixture
def client_provider(receiver):
    provider = TracerProvider(resource=Resource.create({"service.name": "mini-app"}))
    exporter = OTLPSpanExporter(endpoint=f"{receiver.url}/v1/traces")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client_tracing.install(provider)
    yield provider
    client_tracing.install(None)
    provider.shutdown()


def _server_env(receiver: OtlpReceiver, name: str, job_url: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_SERVICE_NAME": name,
        "TETHER_JOB_SERVICE": job_url,
    }


async def test_one_trace_from_offline_submit_through_sigkill_and_retry(
    tmp_path: Path, receiver, client_provider, caplog
):
    caplog.set_level(logging.INFO, logger="client_sdk")
    db_url = f"sqlite:///{tmp_path / 'sync.db'}"
    port = free_port()
    token = issue_token(SECRET, tenant="acme", subject="app", role="client")
    serve_args = ["--lease", "1.5", "--workflows", "tests.trace_workflows:workflows"]
    with running_job_service() as jobs:
        async with SyncClient(
            f"ws://127.0.0.1:{port}", token=token, path=str(tmp_path / "app.db")
        ) as client:
            # Offline: nothing listens on the port yet.
            handle = await client.submit_workflow(
                "traced", {"render": {"duration": 1.0, "fail_first": 1}}
            )
            assert not client.connected and client.pending_count == 1
            await wait_for(lambda: receiver.named("submit_workflow"), timeout=10)
            [submit] = receiver.named("submit_workflow")
            trace = submit.trace_id
            assert submit.parent_id == "" and submit.service == "mini-app"
            # The context is stored with the queued mutation in the SDK's SQLite file.
            with sqlite3.connect(tmp_path / "app.db") as conn:
                [(stored,)] = conn.execute("SELECT traceparent FROM mutations").fetchall()
            assert trace_id_of(stored) == trace and stored[36:52] == submit.span_id

            key = idempotency_key(handle.id, "render", tenant="acme")
            env_a = _server_env(receiver, "tether-a", jobs.url)
            with server_process(db_url, port=port, env=env_a, args=serve_args) as (proc_a, _):
                # Attempt 1 fails (503), attempt 2 (the retry) is running: kill -9 now.
                await wait_for(
                    lambda: jobs.books.attempts[key] >= 2 and jobs.books.active[key] >= 1,
                    timeout=30,
                )
                await wait_for(lambda: receiver.named("tether.step render"), timeout=10)
                proc_a.kill()
                proc_a.wait(timeout=10)
            env_b = _server_env(receiver, "tether-b", jobs.url)
            json_args = [*serve_args, "--log-format", "json", "--log-level", "info"]
            with (
                (tmp_path / "b.log").open("wb") as b_log,
                server_process(db_url, port=port, env=env_b, args=json_args, stderr=b_log),
            ):
                view = await client.wait(handle.id, timeout=60)
                assert view.status == "completed"
                await wait_for(lambda: receiver.named("tether.workflow traced"), timeout=15)

    spans = list(receiver.spans)
    # One trace id from submit to completion, on three processes.
    assert {s.trace_id for s in spans} == {trace}
    assert {s.service for s in spans} >= {"mini-app", "tether-a", "tether-b"}
    [push] = receiver.named("tether.push submit_workflow")
    assert push.parent_id == submit.span_id and push.service == "tether-a"
    assert push.attributes["tether.workflow.id"] == handle.id
    # Every server span after the push descends from the traceparent kept with the
    # workflow — including those of the instance that resumed it after the SIGKILL.
    later = [s for s in spans if s.name.startswith(("tether.step", "tether.workflow"))]
    assert later and all(s.parent_id == push.span_id for s in later)
    renders = receiver.named("tether.step render")
    first = [s for s in renders if s.attributes["tether.attempt"] == 1]
    assert first and first[0].error and first[0].service == "tether-a"
    resumed = [s for s in renders if s.service == "tether-b"]
    assert len(resumed) == 1 and not resumed[0].error
    assert resumed[0].attributes["tether.attempt"] == 2  # the same attempt, re-run
    assert resumed[0].attributes["tether.retry_delay"] > 0
    [workflow] = receiver.named("tether.workflow traced")
    assert workflow.service == "tether-b"
    assert workflow.attributes["tether.workflow.status"] == "completed"

    # The job service saw traceparent on every attempt: the trace, and the attempt's span.
    sent = jobs.books.traceparents[key]
    assert len(sent) == jobs.books.attempts[key] >= 3
    assert all(valid_traceparent(tp) and trace_id_of(tp) == trace for tp in sent)
    assert sent[0][36:52] == first[0].span_id
    assert sent[-1][36:52] == resumed[0].span_id

    # serve --log-format json: the step's log line names workflow, step, attempt, trace.
    lines = [json.loads(line) for line in (tmp_path / "b.log").read_text().splitlines()]
    [rendering] = [line for line in lines if line["message"] == "rendering"]
    assert rendering["workflow_id"] == handle.id and rendering["step"] == "render"
    assert rendering["attempt"] == 2 and rendering["trace_id"] == trace
    assert rendering["logger"] == "tether.step" and rendering["level"] == "info"

    # The SDK's watch (under wait) logged the trace id of the workflow's events.
    watched = [r.getMessage() for r in caplog.records if r.name == "client_sdk"]
    assert any(f"trace_id {trace}" in m and handle.id in m for m in watched), watched

    # Events carry the trace id (what the SDK's watch logs).
    store = open_store(db_url)
    await store.open()
    try:
        mine = await store.read_workflow_events("acme", handle.id)
        assert mine and all(e.data["trace_id"] == trace for e in mine)
    finally:
        await store.close()


def test_tracing_is_requested_only_by_otel_variables():
    assert not tracing_requested({})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c/v1/traces"})
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing_requested(
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    )


def test_traceparent_validation():
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert valid_traceparent(good) and trace_id_of(good) == "0af7651916cd43dd8448eb211c80319c"
    for bad in (
        None,
        "",
        good.upper(),
        "01" + good[2:],
        "00-" + "0" * 32 + "-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01",
        good + "-extra",
    ):
        assert not valid_traceparent(bad) and trace_id_of(bad) is None


def test_tracing_off_costs_nothing_measurable():
    from sync_server import tracing

    assert not tracing.enabled()
    started = time.perf_counter()
    for _ in range(100_000):
        tracing.end_span(tracing.start_span("x", None, {}))
    per_call = (time.perf_counter() - started) / 100_000
    assert per_call < 2e-6  # two function calls that return at once


# ------------------------------------------------- every server span, in one process


class _Webhook:
    """A loopback HTTP endpoint that records the headers of each POST."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.headers: list[dict[str, str]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hook.headers.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/done"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_compensation_dlq_and_outbox_spans_join_the_pushed_trace(sqlite_url):
    import uuid

    import httpx
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sync_server import PermanentError, Step, Workflow, create_app, tracing
    from tests.servers import running
    from tests.sync_helpers import token

    async def reserve(ctx):
        return {"ok": True}

    async def refund(ctx):
        return None

    async def charge(ctx):
        raise PermanentError("card declined")

    flow = Workflow(
        "pay",
        [
            Step("reserve", reserve, compensate=refund),
            Step("charge", charge, depends_on=["reserve"]),
        ],
        on_failure="compensate",
    )
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.install(provider)
    webhook = _Webhook()
    client_span = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    wid, other = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        app = create_app(
            sqlite_url, workflows=[flow], auth_secret=SECRET, completion_webhook=webhook.url
        )
        async with running(app) as server, httpx.AsyncClient(base_url=server.http_url) as http:
            mutations = [
                {
                    "id": 1,
                    "name": "submit_workflow",
                    "args": {"workflow_id": wid, "name": "pay", "input": {}},
                    "traceparent": client_span,
                },
                {
                    # Not a traceparent: ignored (a new trace), never a rejection.
                    "id": 2,
                    "name": "submit_workflow",
                    "args": {"workflow_id": other, "name": "pay", "input": {}},
                    "traceparent": "garbage",
                },
            ]
            answer = await http.post(
                "/v1/push",
                json={"client_id": "traced", "mutations": mutations},
                headers={"Authorization": f"Bearer {token('acme', 'traced')}"},
            )
            assert [r["status"] for r in answer.json()["results"]] == ["applied", "applied"]
            await wait_for(lambda: len(webhook.headers) >= 2, timeout=30)
            await wait_for(
                lambda: len([s for s in memory.get_finished_spans() if "outbox" in s.name]) >= 2
            )
    finally:
        tracing.install(None)
        webhook.close()
    spans = memory.get_finished_spans()
    trace = int(client_span[3:35], 16)
    mine = [s for s in spans if s.context.trace_id == trace]
    names = sorted(s.name for s in mine)
    assert names == [
        "tether.compensate reserve",
        "tether.dlq charge",
        "tether.outbox deliver",
        "tether.push submit_workflow",
        "tether.step charge",
        "tether.step reserve",
        "tether.workflow pay",
    ]
    [push] = [s for s in mine if s.name.startswith("tether.push")]
    assert push.parent.span_id == int(client_span[36:52], 16)
    assert all(s.parent.span_id == push.context.span_id for s in mine if s is not push)
    by_name = {s.name: s for s in mine}
    assert by_name["tether.step charge"].status.status_code.name == "ERROR"
    assert by_name["tether.step charge"].attributes["tether.permanent"] is True
    assert by_name["tether.workflow pay"].attributes["tether.workflow.status"] == "compensated"
    outbox = by_name["tether.outbox deliver"]
    sent = [h["traceparent"] for h in webhook.headers if trace_id_of(h["traceparent"])]
    assert f"00-{trace:032x}-{outbox.context.span_id:016x}-01" in sent
    # The other workflow got a trace of its own, rooted at its push span.
    [root] = [s for s in spans if s.name.startswith("tether.push") and s is not push]
    assert root.parent is None and root.context.trace_id != trace


async def test_tracing_off_adds_nothing_to_the_steps_http_calls(sqlite_url):
    from sync_server.saga.alerts import AlertSink
    from sync_server.saga.runner import SagaRunner

    store = open_store(sqlite_url)
    await store.open()
    runner = SagaRunner(store, [], instance_id="r1", alerts=AlertSink())
    await runner.start()
    try:
        assert runner._http is not None and runner._http.event_hooks["request"] == []
    finally:
        await runner.stop()
        await store.close()
