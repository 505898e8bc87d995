"""The saga runner with emp-job-queue steps, on both backends (SQLite and PostgreSQL).

* a step learns why it was stopped (``ctx.stop_reason``): a workflow cancel cancels its
  queue job, a lost lease or a shutdown leaves it to the next instance, which attaches;
* a step that called the adapter is recorded (``state.steps[s].job``), and the sweep
  asks the queue about it: a completion lost with its instance is repaired, a failure
  is honoured (the attempt fails and retries), a job running past the horizon re-runs;
* the example generation compensates in reverse order with cleanup jobs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from examples.emp_pipeline import build_generation
from sync_server.adapters.emp_job_queue import EmpJobQueue
from sync_server.adapters.keyed import generation_id
from sync_server.reconcile import Reconciler, ReconcileRules
from sync_server.saga import RetryPolicy, Step, StepContext, Workflow, intake
from sync_server.saga.alerts import AlertSink
from sync_server.saga.machine import idempotency_key
from sync_server.saga.runner import SagaRunner
from sync_server.store import open_store
from tests.conftest import wait_for
from tests.emp_queue_double import running_emp_queue
from tests.saga_helpers import mutate, submit, wait_status

pytestmark = pytest.mark.timeout(90)
log = logging.getLogger("test")


@pytest.fixture
def queue():
    with running_emp_queue() as server:
        yield server


@pytest.fixture
async def store(database_url):
    opened = open_store(database_url)
    await opened.open()
    yield opened
    await opened.close()


def adapter(server: Any, **options: Any) -> EmpJobQueue:
    return EmpJobQueue(server.url, poll=(0.05, 0.3), submit_grace=0.5, **options)


def one_job(emp: EmpJobQueue, seen: list[StepContext], duration: float = 0.5) -> Workflow:
    async def render(ctx: StepContext) -> Any:
        seen.append(ctx)
        return await emp.run_job(ctx, "comfyui", {"duration": duration, "prompt": "cat"})

    retry = RetryPolicy(max_attempts=3, base_delay=0.05, jitter=False)
    return Workflow("render_one", [Step("render", render, retry=retry, timeout=30)])


def runner(store: Any, workflows: list[Workflow], name: str, lease: float = 1.0) -> SagaRunner:
    return SagaRunner(
        store,
        workflows,
        instance_id=name,
        lease_seconds=lease,
        poll_interval=0.1,
        alerts=AlertSink(),
    )


async def test_a_workflow_cancel_cancels_the_running_job(store, queue):
    emp, seen = adapter(queue), []
    workflow = one_job(emp, seen, duration=10)
    run = runner(store, [workflow], "r1")
    await run.start()
    try:
        [wid] = await submit(store, workflow)
        await wait_for(lambda: queue.books.starts, 10)

        async def job_recorded():
            # record_job is group-committed: the queue may see the job before the
            # checkpoint that records it is written.
            record = await store.get_workflow("t1", wid)
            return record is not None and "job" in record.state["steps"]["render"]

        await wait_for(job_recorded, 10)
        record = await store.get_workflow("t1", wid)
        assert record is not None and record.state["steps"]["render"]["job"] == {
            "source": "job-queue",
            "adapter": "emp-job-queue",
        }
        await mutate(store, wid, intake.request_cancel)
        await wait_status(store, wid, {"cancelled", "compensated"})
        job_id = generation_id(idempotency_key(wid, "render", tenant="t1"), 0)
        await wait_for(lambda: (queue.job(job_id) or {}).get("status") == "failed", 10)
    finally:
        await run.stop()
        await emp.aclose()
    assert seen[0].stop_reason == "cancelled" and queue.books.cancels[job_id] == 1


async def test_a_shutdown_leaves_the_job_and_the_next_instance_attaches(store, queue):
    first_emp, second_emp, seen = adapter(queue), adapter(queue), []
    first = runner(store, [one_job(first_emp, seen, 1.0)], "r1")
    await first.start()
    try:
        [wid] = await submit(store, one_job(first_emp, seen))
        await wait_for(lambda: queue.books.starts, 10)
        await first.stop()  # releases the lease; the job keeps running at the queue
        second = runner(store, [one_job(second_emp, seen, 1.0)], "r2")
        await second.start()
        try:
            record = await wait_status(store, wid, "completed")
        finally:
            await second.stop()
    finally:
        await first_emp.aclose()
        await second_emp.aclose()
    job_id = generation_id(idempotency_key(wid, "render", tenant="t1"), 0)
    assert seen[0].stop_reason == "shutdown" and queue.books.cancels[job_id] == 0
    assert record.state["steps"]["render"]["result"]["job_id"] == job_id
    assert second_emp.stats["attached"] + second_emp.stats["taken"] >= 1
    assert max(queue.books.starts.values()) == 1


async def sweep_until(reconciler: Reconciler, kind: str, timeout: float = 15.0) -> None:
    kinds: list[str] = []
    reconciler.on_repair = lambda repair, workflow_id: kinds.append(repair.kind)

    async def repaired() -> bool:
        await reconciler.sweep_once()
        return bool(kinds)

    await wait_for(repaired, timeout, 0.1, f"a {kind} repair")
    assert kinds == [kind]


async def test_the_sweep_repairs_a_completion_lost_with_its_instance(store, queue):
    emp, seen = adapter(queue), []
    workflow = one_job(emp, seen, 0.3)
    run = runner(store, [workflow], "r1", lease=30)
    await run.start()
    [wid] = await submit(store, workflow)
    await wait_for(lambda: queue.books.starts, 10)
    # The attempt is lost (as with its instance); the 30 s lease stays in the database.
    run._held.pop(("t1", wid)).cancel("interrupted")
    job_id = generation_id(idempotency_key(wid, "render", tenant="t1"), 0)
    await wait_for(lambda: (queue.job(job_id) or {}).get("status") == "completed", 10)
    rules = ReconcileRules(interval=0.1, grace=0.2)
    reconciler = Reconciler(store, rules, [emp], alerts=AlertSink())
    try:
        await sweep_until(reconciler, "complete")
        record = await wait_status(store, wid, "completed")
    finally:
        await run.stop()
        await emp.aclose()
    assert reconciler.repairs == 1
    assert record.state["steps"]["render"]["result"]["job_id"] == job_id
    assert max(queue.books.starts.values()) == 1


async def test_the_sweep_honours_a_failed_report_and_the_step_retries(store, queue):
    emp = adapter(queue)

    async def waits_forever(ctx: StepContext) -> Any:
        # A step whose adapter never sees the failure (say, a job submitted elsewhere).
        ctx.record_job("job-queue", "emp-job-queue")
        if ctx.attempt == 1:
            await queue_submit_failing(ctx)
            await asyncio.Event().wait()
        return {"attempt": ctx.attempt}

    async def queue_submit_failing(ctx: StepContext) -> None:
        queue.term_workers(1)
        task = asyncio.ensure_future(emp.run_job(ctx, "svc", {"duration": 0.05}))
        await wait_for(lambda: task.done(), 10)
        assert isinstance(task.exception(), Exception)

    retry = RetryPolicy(max_attempts=3, base_delay=0.05, jitter=False)
    workflow = Workflow("blind", [Step("render", waits_forever, retry=retry, timeout=60)])
    run = runner(store, [workflow], "r1")
    await run.start()
    reconciler = Reconciler(store, ReconcileRules(grace=0.2), [emp], alerts=AlertSink())
    try:
        [wid] = await submit(store, workflow)
        await wait_for(lambda: queue.books.starts, 10)
        await sweep_until(reconciler, "fail")
        record = await wait_status(store, wid, "completed")
    finally:
        await run.stop()
        await emp.aclose()
    step = record.state["steps"]["render"]
    assert step["attempts"] == 2 and step["result"] == {"attempt": 2}


async def test_a_job_running_past_the_horizon_is_rerun_and_its_dead_worker_replaced(store, queue):
    emp, seen = adapter(queue, stuck_after=1.0), []
    workflow = one_job(emp, seen, 0.2)
    queue.kill_workers(1)
    run = runner(store, [workflow], "r1", lease=30)
    await run.start()
    [wid] = await submit(store, workflow)
    await wait_for(lambda: queue.books.dead, 10)
    run._held.pop(("t1", wid)).cancel("interrupted")  # the attempt is lost; only the sweep can see
    rules = ReconcileRules(grace=0.2, horizon=0.5)
    reconciler = Reconciler(store, rules, [emp], alerts=AlertSink())
    try:
        await sweep_until(reconciler, "resubmit")
        assert reconciler._stuck  # the stuck job is re-run once, not on every sweep
        record = await wait_status(store, wid, "completed")
        await reconciler.sweep_once()
        assert not reconciler._stuck  # forgotten with its workflow: bounded memory
    finally:
        await run.stop()
        await emp.aclose()
    assert record.state["steps"]["render"]["result"]["job_id"] == generation_id(
        idempotency_key(wid, "render", tenant="t1"), 1
    )
    assert emp.stats["stuck"] == 1 and max(queue.books.starts.values()) == 1


async def test_the_example_generation_compensates_with_cleanup_jobs(store, queue):
    emp = adapter(queue)
    generation = build_generation(emp)
    run = runner(store, [generation], "r1")
    await run.start()
    try:
        [ok, bad] = await submit(
            store,
            generation,
            [
                {"prompt": "a", "duration": 0.05},
                {"prompt": "b", "duration": 0.05, "fail": "upscale"},
            ],
        )
        done = await wait_status(store, ok, "completed")
        undone = await wait_status(store, bad, "compensated", timeout=30)
    finally:
        await run.stop()
        await emp.aclose()
    steps = done.state["steps"]
    assert [steps[s]["result"]["step"] for s in ("prompt", "render", "upscale")] == [1, 2, 3]
    assert undone.state["steps"]["upscale"]["status"] == "failed"
    for step in ("prompt", "render"):
        key = idempotency_key(bad, step, compensation=True, tenant="t1")
        cleanup = generation_id(key, 0)
        job = queue.job(cleanup)
        produced = undone.state["steps"][step]["result"]["job_id"]
        assert job is not None and job["status"] == "completed"
        assert job["payload"] == {"job_id": produced}
    upscale_jobs = [
        generation_id(idempotency_key(bad, "upscale", tenant="t1"), n) for n in range(3)
    ]
    assert all(queue.books.starts[j] == 1 for j in upscale_jobs)  # 3 attempts, 3 ids
    assert max(queue.books.starts.values()) == 1
