"""EmpJobQueue against the emp-job-queue double: each quirk of the queue, one test.

The adapter runs in the test's loop; the double runs on uvicorn in its own thread, so
every message crosses a real socket. "No job id ever runs twice" is checked on the
double's books (``starts``) in every test.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest

from sync_server.adapters.emp_job_queue import EmpJobQueue, JobFailed
from sync_server.adapters.emp_seen import SeenJobs, attested_view, ended_view
from sync_server.adapters.emp_socket import EmpSocket
from sync_server.adapters.keyed import JobView, generation_id
from sync_server.saga.definitions import (
    STOP_CANCELLED,
    STOP_INTERRUPTED,
    PermanentError,
    StepContext,
)
from tests.conftest import wait_for
from tests.emp_queue_double import CANCELLED, running_emp_queue


class Alerts:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []

    def alert(self, kind: str, message: str, details: dict[str, Any]) -> None:
        self.seen.append((kind, message, details))


@pytest.fixture
def queue():
    with running_emp_queue() as server:
        yield server


@pytest.fixture
async def http():
    async with httpx.AsyncClient() as client:
        yield client


def make_queue(server: Any, **options: Any) -> EmpJobQueue:
    options.setdefault("poll", (0.05, 0.3))
    options.setdefault("submit_grace", 0.5)
    return EmpJobQueue(server.url, **options)


class Ctx:
    """A StepContext with its reports captured."""

    def __init__(self, http: httpx.AsyncClient, key: str = "wf-1:render", **kw: Any) -> None:
        self.progress: list[float] = []
        self.jobs: list[tuple[str, str]] = []
        workflow, _, step = key.rpartition(":")
        self.ctx = StepContext(
            workflow_id=workflow,
            step=step,
            input={},
            results={},
            attempt=1,
            idempotency_key=key,
            http=http,
            log=logging.getLogger("test.emp"),
            reporter=lambda fraction, message: self.progress.append(fraction),
            job_recorder=lambda source, adapter: self.jobs.append((source, adapter)),
            **kw,
        )


def ran_once(server: Any) -> bool:
    return bool(server.books.starts) and max(server.books.starts.values()) == 1


async def test_run_job_returns_the_data_names_the_job_by_key_and_feeds_progress(queue, http):
    adapter = make_queue(queue)
    call = Ctx(http)
    try:
        data = await adapter.run_job(
            call.ctx, "comfyui", {"prompt": "cat", "duration": 0.3}, current_step=1, total_steps=2
        )
        # The poll may see the end before the two completion events arrive: wait for them.
        await wait_for(lambda: adapter.stats["duplicate_events"] >= 1, 5)
    finally:
        await adapter.aclose()
    job_id = generation_id("wf-1:render", 0)
    assert data == {"service": "comfyui", "echo": "cat", "step": 1, "job_id": job_id}
    job = queue.job(job_id)
    assert job is not None and job["max_retries"] == 1  # one attempt: Tether owns retries
    assert job["workflow_id"] == "wf-1" and job["total_steps"] == 2
    assert call.progress and call.progress[-1] == 1.0 and all(0 <= p <= 1 for p in call.progress)
    assert call.jobs == [("job-queue", "emp-job-queue")]
    assert adapter.stats["duplicate_events"] >= 1  # the second completion was ignored
    assert ran_once(queue)


async def test_a_completed_job_is_taken_not_run_again_by_another_instance(queue, http):
    first, second = make_queue(queue), make_queue(queue)
    try:
        one = await first.run_job(Ctx(http).ctx, "svc", {"prompt": "x", "duration": 0.05})
        two = await second.run_job(Ctx(http).ctx, "svc", {"prompt": "x", "duration": 0.05})
    finally:
        await first.aclose()
        await second.aclose()
    assert one == two
    assert second.stats["submitted"] == 0  # the result came from the attestations
    assert queue.books.submits[generation_id("wf-1:render", 0)] == 1 and ran_once(queue)


async def test_another_instance_attaches_to_a_running_job(queue, http):
    first, second = make_queue(queue), make_queue(queue)
    try:
        task = asyncio.create_task(first.run_job(Ctx(http).ctx, "svc", {"duration": 0.6}))
        await wait_for(lambda: queue.books.starts, 5)
        other = Ctx(http)
        two = await second.run_job(other.ctx, "svc", {"duration": 0.6})
        one = await task
    finally:
        await first.aclose()
        await second.aclose()
    assert one == two and second.stats["attached"] == 1 and second.stats["submitted"] == 0
    assert ran_once(queue)


async def test_a_failed_job_fails_the_attempt_and_the_next_attempt_uses_a_new_id(queue, http):
    adapter = make_queue(queue)
    queue.term_workers(1)
    try:
        with pytest.raises(JobFailed, match="SIGTERM"):
            await adapter.run_job(Ctx(http).ctx, "svc", {"duration": 0.05})
        data = await adapter.run_job(Ctx(http).ctx, "svc", {"duration": 0.05})
    finally:
        await adapter.aclose()
    assert data["job_id"] == generation_id("wf-1:render", 1)
    assert ran_once(queue) and len(queue.books.starts) == 2


async def test_the_permanent_rule_raises_permanent_error(queue, http):
    adapter = make_queue(queue, permanent=lambda error: "bad prompt" in error)
    try:
        with pytest.raises(PermanentError, match="bad prompt"):
            await adapter.run_job(
                Ctx(http).ctx, "svc", {"duration": 0.05, "fail": True, "error": "bad prompt"}
            )
    finally:
        await adapter.aclose()
    assert ran_once(queue)


async def test_a_dead_worker_is_cancelled_resubmitted_counted_and_alerted(queue, http):
    alerts = Alerts()
    adapter = make_queue(queue, stuck_after=0.5, alerts=alerts)
    queue.kill_workers(1)
    try:
        data = await adapter.run_job(Ctx(http).ctx, "svc", {"duration": 0.05})
    finally:
        await adapter.aclose()
    dead, fresh = generation_id("wf-1:render", 0), generation_id("wf-1:render", 1)
    assert data["job_id"] == fresh  # the same attempt: the cancel's failure did not count
    assert queue.books.dead == [dead] and queue.books.cancels[dead] == 1
    assert queue.job(dead)["status"] == "failed"
    assert adapter.stats["stuck"] == 1 and [a[0] for a in alerts.seen] == ["job_stuck"]
    assert ran_once(queue)


async def test_lost_events_dropped_connections_and_an_api_restart_cost_only_latency(queue, http):
    adapter = make_queue(queue)
    try:
        queue.drop_events(1000)
        blind = Ctx(http, "wf-a:s")
        one = await adapter.run_job(blind.ctx, "svc", {"duration": 0.05})
        queue.drop_events(-1000)
        task = asyncio.create_task(
            adapter.run_job(Ctx(http, "wf-b:s").ctx, "svc", {"duration": 0.8})
        )
        await wait_for(lambda: len(queue.books.starts) == 2, 5)
        await asyncio.to_thread(queue.drop_connections)
        await wait_for(lambda: queue.books.connections >= 2, 5)  # it reconnected
        await asyncio.to_thread(queue.restart_api, 0.3)
        two = await task
    finally:
        await adapter.aclose()
    assert one["echo"] is None and one["job_id"] == generation_id("wf-a:s", 0)
    assert blind.progress == [1.0]  # no progress event arrived; done is still 100 %
    assert two["job_id"] == generation_id("wf-b:s", 0)
    assert queue.books.events_lost > 0 and ran_once(queue)


async def test_a_lost_submit_is_sent_again_under_the_same_id(queue, http):
    adapter = make_queue(queue)
    queue.lose_submits(1)
    try:
        data = await adapter.run_job(Ctx(http).ctx, "svc", {"duration": 0.05})
    finally:
        await adapter.aclose()
    assert adapter.stats["resubmitted_lost"] == 1
    assert data["job_id"] == generation_id("wf-1:render", 0) and ran_once(queue)


async def test_a_timeout_cancels_the_job_and_fails_the_attempt(queue, http):
    adapter = make_queue(queue)
    job_id = generation_id("wf-1:render", 0)
    try:
        with pytest.raises(TimeoutError):
            await adapter.run_job(Ctx(http).ctx, "svc", {"duration": 5}, timeout=0.5)
        await wait_for(lambda: (queue.job(job_id) or {}).get("status") == "failed", 5)
    finally:
        await adapter.aclose()
    assert queue.books.cancels[job_id] == 1


@pytest.mark.parametrize("reason", [STOP_CANCELLED, STOP_INTERRUPTED])
async def test_a_workflow_cancel_cancels_the_job_a_lost_lease_does_not(queue, http, reason):
    adapter, other = make_queue(queue), make_queue(queue)
    job_id = generation_id("wf-1:render", 0)
    call = Ctx(http)
    try:
        task = asyncio.create_task(adapter.run_job(call.ctx, "svc", {"duration": 0.8}))
        await wait_for(lambda: queue.books.starts, 5)
        call.ctx.stop_reason = reason  # what the runner sets before cancelling
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if reason == STOP_CANCELLED:
            await wait_for(lambda: (queue.job(job_id) or {}).get("status") == "failed", 5)
            assert queue.books.cancels[job_id] == 1
        else:
            data = await other.run_job(Ctx(http).ctx, "svc", {"duration": 0.8})
            assert data["job_id"] == job_id and queue.books.cancels[job_id] == 0
    finally:
        await adapter.aclose()
        await other.aclose()
    assert ran_once(queue)


async def test_aclose_ends_what_it_started(queue, http):
    adapter = make_queue(queue)
    call = Ctx(http)
    task = asyncio.create_task(adapter.run_job(call.ctx, "svc", {"duration": 5}))
    await wait_for(lambda: queue.books.starts, 5)
    call.ctx.stop_reason = STOP_CANCELLED
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert adapter._background  # the job's cancel is on its way
    await adapter.aclose()
    assert not adapter._background and adapter.socket._task is None


async def test_closing_the_socket_never_swallows_the_closers_cancellation():
    socket = EmpSocket("ws://127.0.0.1:9", "c", None, lambda message: None)
    socket.start()
    closer = asyncio.create_task(socket.close())
    await asyncio.sleep(0)  # the closer now waits for the connect loop to end
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer


async def test_cancel_job_from_a_compensation_cancels_the_live_job(queue, http):
    adapter = make_queue(queue)
    job_id = generation_id("wf-1:render", 0)
    try:
        task = asyncio.create_task(adapter.run_job(Ctx(http).ctx, "svc", {"duration": 5}))
        await wait_for(lambda: queue.books.starts, 5)
        compensation = Ctx(http, compensating=True).ctx
        compensation.idempotency_key = "wf-1:render:compensate"
        await adapter.cancel_job(compensation)
        with pytest.raises(JobFailed, match=CANCELLED):
            await task
    finally:
        await adapter.aclose()
    assert queue.job(job_id)["status"] == "failed" and ran_once(queue)


async def test_job_status_maps_the_queue_onto_the_sweep(queue, http):
    adapter = make_queue(queue, stuck_after=60)
    try:
        unknown = await adapter.job_status(None, "s", "wf-x:s")  # type: ignore[arg-type]
        assert unknown.status == "unknown"
        task = asyncio.create_task(
            adapter.run_job(Ctx(http, "wf-x:s").ctx, "svc", {"duration": 0.8})
        )
        await wait_for(lambda: queue.books.starts, 5)
        running = await adapter.job_status(None, "s", "wf-x:s")  # type: ignore[arg-type]
        assert running.status == "running" and running.since is not None
        data = await task
        fresh = make_queue(queue)  # another instance: the result comes from attestations
        done = await fresh.job_status(None, "s", "wf-x:s")  # type: ignore[arg-type]
        await fresh.aclose()
        assert done.status == "completed" and done.result == data
        queue.term_workers(1)
        with pytest.raises(JobFailed):
            await adapter.run_job(Ctx(http, "wf-y:s").ctx, "svc", {"duration": 0.05})
        failed = await adapter.job_status(None, "s", "wf-y:s")  # type: ignore[arg-type]
        assert failed.status == "failed" and "SIGTERM" in (failed.error or "")
        # A job this instance gave up itself (stuck) is being replaced, not a failure.
        adapter._abandoned[generation_id("wf-y:s", 0)] = None
        replaced = await adapter.job_status(None, "s", "wf-y:s")  # type: ignore[arg-type]
        assert replaced.status == "running"
    finally:
        await adapter.aclose()


async def test_bad_input_and_a_bad_token_get_clear_errors_and_submit_nothing(http):
    with pytest.raises(ValueError):
        EmpJobQueue("queue:3331")
    with running_emp_queue(token="secret") as server:
        adapter = make_queue(server, auth_token="wrong")
        try:
            with pytest.raises(ValueError, match="max_retries"):
                await adapter.run_job(Ctx(http).ctx, "svc", {}, max_retries=5)
            with pytest.raises(ConnectionError):
                await adapter.run_job(Ctx(http).ctx, "svc", {}, timeout=5)
        finally:
            await adapter.aclose()
        assert server.books.closed_1008 >= 1 and not server.books.submits
        good = make_queue(server, auth_token="secret")
        try:
            assert (await good.run_job(Ctx(http).ctx, "svc", {"duration": 0.05}))["job_id"]
        finally:
            await good.aclose()


def test_events_that_name_no_job_are_ignored():
    adapter = EmpJobQueue("http://127.0.0.1:9")
    for message in (
        {"type": "job_failed", "error": "?"},
        {"type": "complete_job", "job_id": 7, "result": {"status": "success"}},
    ):
        adapter._on_message(message)
    assert adapter._seen.get("") is None and adapter._seen.get("7") is None
    assert adapter.stats["duplicate_events"] == 0


def test_the_queues_end_events_and_attestations_read_as_views():
    ok = {"type": "complete_job", "job_id": "j", "result": {"status": "success", "data": 1}}
    also_ok = {"type": "complete_job", "job_id": "j", "result": {"success": True}}
    failed = {"type": "complete_job", "job_id": "j", "result": {"status": "failed", "error": "e"}}
    assert ended_view(ok) == JobView("completed", result=1)
    assert ended_view(also_ok) == JobView("completed", result={})
    assert ended_view(failed) == JobView("failed", error="e")
    assert ended_view({"type": "job_failed", "job_id": "j"}) == JobView("failed", error="failed")
    for other in ({"type": "complete_job", "result": "?"}, {"type": "update_job_progress"}):
        assert ended_view(other) is None
    assert attested_view({"status": "completed", "result": {"data": {"x": 1}}}).result == {"x": 1}
    assert attested_view({"status": "completed"}).result == {}
    assert attested_view({"status": "failed", "error": "boom"}) == JobView("failed", error="boom")


def test_seen_results_are_bounded_in_count_and_bytes():
    seen = SeenJobs(max_items=3, max_bytes=10_000)
    for i in range(5):
        seen.put(f"j{i}", JobView("completed", result={"i": i}))
    assert seen.get("j0") is None and seen.get("j4") is not None
    seen.put("big", JobView("completed", result="x" * 20_000))
    assert seen.bytes <= 10_000 or seen.get("j4") is None


async def test_served_stuck_jobs_are_counted_on_metrics_and_alerted(queue, sqlite_url):
    from sync_server import create_app
    from sync_server.saga import RetryPolicy, Step, Workflow
    from tests.saga_helpers import submit, wait_status
    from tests.servers import SECRET, running

    emp = make_queue(queue, stuck_after=0.5)

    async def render(ctx: StepContext) -> Any:
        return await emp.run_job(ctx, "svc", {"duration": 0.05})

    workflow = Workflow("one", [Step("render", render, retry=RetryPolicy(max_attempts=1))])
    app = create_app(sqlite_url, workflows=[workflow], sources=[emp], auth_secret=SECRET)
    tether = app.state.tether
    queue.kill_workers(1)
    async with running(app) as server:
        assert emp.alerts is tether.alerts  # bound to the instance's alert log
        [wid] = await submit(tether.store, workflow)
        await wait_status(tether.store, wid, "completed")
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{server.http_url}/metrics")).text
    assert 'tether_alerts_total{kind="job_stuck"} 1.0' in metrics
    assert [a.kind for a in tether.alerts.recent] == ["job_stuck"]
    assert tether.alerts.recent[0].details["tenant"] == "t1"  # the dashboard scopes by it


async def test_a_served_instance_stops_its_steps_before_closing_their_adapter(queue, sqlite_url):
    from sync_server import create_app
    from sync_server.saga import Step, Workflow
    from sync_server.saga.machine import idempotency_key
    from sync_server.store import open_store
    from tests.saga_helpers import submit
    from tests.servers import SECRET, running

    emp, seen = make_queue(queue, poll=(0.01, 0.01)), []

    async def render(ctx: StepContext) -> Any:
        seen.append(ctx)
        return await emp.run_job(ctx, "svc", {"duration": 30})

    class Probe:
        """A second source: sees, when the instance closes it, whether steps still run."""

        source = "job-queue"
        running_steps = -1

        async def job_status(self, workflow: Any, step: str, key: str) -> Any:
            raise NotImplementedError

        async def aclose(self) -> None:
            held = tether.runner._held.values() if tether.runner is not None else ()
            self.running_steps = sum(len(h.tasks) for h in held)

    probe = Probe()
    workflow = Workflow("one", [Step("render", render)])
    app = create_app(sqlite_url, workflows=[workflow], sources=[emp, probe], auth_secret=SECRET)
    tether = app.state.tether
    async with running(app):
        [wid] = await submit(tether.store, workflow)
        await wait_for(lambda: queue.books.starts, 10)
    # A shutdown, not a failure: the job is left to the next instance, the step still runs.
    assert seen[0].stop_reason == "shutdown" and probe.running_steps == 0
    store = open_store(sqlite_url)
    await store.open()
    try:
        record = await store.get_workflow("t1", wid)
    finally:
        await store.close()
    assert record is not None
    step = record.state["steps"]["render"]
    assert (step["status"], step["attempts"], step.get("error")) == ("running", 1, None)
    job_id = generation_id(idempotency_key(wid, "render", tenant="t1"), 0)
    assert queue.job(job_id) is not None and queue.books.cancels[job_id] == 0  # left running
    assert emp.socket._task is None


async def test_the_sweep_gets_no_news_while_the_queue_api_is_down(queue):
    adapter = make_queue(queue)
    adapter.lookup_timeout = 0.3
    try:
        await asyncio.to_thread(queue.restart_api, 2.0)
        with pytest.raises(TimeoutError):
            await adapter.job_status(None, "s", "w:s")  # type: ignore[arg-type]
        await wait_for(lambda: not queue.queue.down, 5)
        assert (await adapter.job_status(None, "s", "w:s")).status == "unknown"  # type: ignore[arg-type]
    finally:
        await adapter.aclose()


async def test_a_result_that_is_nowhere_fails_the_attempt_but_never_reruns_the_job(queue, http):
    adapter = make_queue(queue, poll=(0.01, 0.02))
    queue.drop_events(1000)  # no completion event reaches us...
    try:
        for _ in range(2):  # ...and without a workflow_id there is no attestation
            with pytest.raises(JobFailed, match="no event and no attestation"):
                await adapter.run_job(Ctx(http).ctx, "svc", {"duration": 0.05}, workflow_id="")
    finally:
        await adapter.aclose()
    assert queue.books.submits[generation_id("wf-1:render", 0)] == 1 and ran_once(queue)
