"""``sync_server.adapters.job_service`` against the real example job service (loopback)."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from examples.job_service import running_job_service
from sync_server.adapters.job_service import JobService
from sync_server.saga import PermanentError, StepContext
from tests.conftest import wait_for


@pytest.fixture
def service():
    with running_job_service() as svc:
        yield svc


def ctx_for(http: httpx.AsyncClient, progress: list[float], key: str = "w1:render") -> StepContext:
    workflow, _, step = key.rpartition(":")
    return StepContext(
        workflow_id=workflow,
        step=step,
        input={},
        results={},
        attempt=1,
        idempotency_key=key,
        http=http,
        log=logging.getLogger("test"),
        reporter=lambda fraction, message: progress.append(fraction),
    )


async def test_submit_then_take_the_result_without_a_second_request(service):
    progress: list[float] = []
    async with httpx.AsyncClient() as http:
        jobs = JobService(service.url, poll=0.02, http=http)
        first = await jobs.run_job(ctx_for(http, progress), {"duration": 0.3})
        again = await jobs.run_job(ctx_for(http, []), {"duration": 0.3})
    assert first == again and first["job_id"] == "w1:render"
    assert service.books.attempts["w1:render"] == 1 and service.books.effects["w1:render"] == 1
    assert progress and progress[-1] == 1.0 and any(0 < p < 1 for p in progress)


async def test_a_second_caller_attaches_to_a_running_job(service):
    async with httpx.AsyncClient() as http:
        jobs = JobService(service.url, poll=0.02, http=http)
        first = asyncio.create_task(jobs.run_job(ctx_for(http, []), {"duration": 0.6}))
        await wait_for(lambda: service.books.progress.get("w1:render", 0) > 0, 5)
        second = await jobs.run_job(ctx_for(http, []), {"duration": 0.6})
        assert await first == second
    assert service.books.attempts["w1:render"] == 1 and service.books.overlaps == []


async def test_failures_map_to_retryable_and_permanent_errors(service):
    async with httpx.AsyncClient() as http:
        jobs = JobService(service.url, poll=0.02, http=http)
        with pytest.raises(RuntimeError, match="HTTP 503"):
            await jobs.run_job(ctx_for(http, []), {"fail_always": True})
        state = await jobs.job_status(None, "render", "w1:render")  # type: ignore[arg-type]
        assert state.status == "unknown"  # the service forgets a failed job
        bad = ctx_for(http, [], "w2:render")
        bad.idempotency_key = ""
        with pytest.raises(PermanentError):
            await jobs.run_job(bad, {})  # no key: the service answers 400


async def test_a_cancelled_attempt_leaves_no_request_running(service):
    async with httpx.AsyncClient() as http:
        jobs = JobService(service.url, poll=0.02, http=http)
        attempt = asyncio.create_task(jobs.run_job(ctx_for(http, []), {"duration": 5}))
        await wait_for(lambda: service.books.progress.get("w1:render", 0) > 0, 5)
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt
        # The POST /work it held was ended with it, not left to finish on its own.
        assert [t for t in asyncio.all_tasks() if not t.done()] == [asyncio.current_task()]
