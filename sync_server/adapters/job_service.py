"""The example job service's adapter (``examples/job_service.py``), through ``keyed``.

The job service honours idempotency keys (one effect per key), but a second request for
a key whose job still runs is a second, overlapping attempt — and a ``POST /work`` holds
the request until the job ends, so a step that crashed leaves a job running that the
next attempt should wait for rather than start again. ``JobService.run_job`` therefore
follows the same pattern as every non-idempotent downstream (``keyed.run_keyed``): look
the key up (``GET /jobs/{key}``), take a done job's result, attach to a running one, and
submit (``POST /work``) only when the service never heard of it. The key is the job id
(one generation: the service never keeps a failed job, it forgets it).

It is also a ``SourceAdapter`` (``source = "job-queue"``) for the reconciliation sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx

from protocol.jsontypes import JSON
from sync_server.adapters.keyed import JobView, run_keyed
from sync_server.reconcile.sources import JobState
from sync_server.saga.definitions import PermanentError, StepContext
from sync_server.store.base import WorkflowRecord

__all__ = ["JobService"]

_STATES = {"done": "completed", "running": "running"}


class JobService:
    """Steps call the example job service at ``url`` through this.

    Args:
        url: the service's base URL.
        poll: seconds between progress/status polls while a job runs.
        http: an ``httpx.AsyncClient`` (default: one of its own, closed by ``aclose``).
    """

    source = "job-queue"
    name = "job-service"

    def __init__(self, url: str, *, poll: float = 0.1, http: httpx.AsyncClient | None = None):
        self.url = url.rstrip("/")
        self.poll = poll
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(10.0))
        self._own_http = http is None

    async def run_job(
        self, ctx: StepContext, body: dict[str, JSON], *, timeout: float | None = None
    ) -> JSON:
        """Run the job of ``ctx.idempotency_key`` once; returns the service's answer.

        Raises:
            RuntimeError: the service failed the job (HTTP 5xx): retried by the policy.
            PermanentError: the service refused it (HTTP 4xx).
        """
        call = _Call(self, ctx, body, timeout)
        try:
            outcome = await run_keyed(call, ctx.idempotency_key, naming=_key, generations=1)
        finally:
            if call.request is not None:
                await _settle(call.request)
        view = outcome.view
        if view.status == "completed":
            await ctx.progress(1.0, "done")
            return view.result
        if view.error and view.error.startswith("HTTP 4"):
            raise PermanentError(f"job rejected: {view.error}")
        raise RuntimeError(f"job failed: {view.error}")

    async def status(self, key: str) -> tuple[str, float, JSON]:
        """(``completed``/``running``/``absent``, progress, result) of the key's job."""
        response = await self._http.get(f"{self.url}/jobs/{key}")
        response.raise_for_status()
        body = response.json()
        state = _STATES.get(body.get("state"), "absent")
        return state, float(body.get("progress") or 0.0), body.get("result")

    async def job_status(self, workflow: WorkflowRecord, step: str, key: str) -> JobState:
        """The sweep's view: ``unknown``, ``running`` or ``completed`` (with the result)."""
        state, _, result = await self.status(key)
        return JobState({"absent": "unknown"}.get(state, state), result=result, at=time.time())

    async def aclose(self) -> None:
        """Close the HTTP client (if it is ours)."""
        if self._own_http:
            await self._http.aclose()


def _key(key: str, generation: int) -> str:
    return key


async def _settle(request: asyncio.Task[httpx.Response]) -> None:
    """Cancel the ``POST /work`` still open (if any) and wait until it has ended, so no
    request outlives its attempt; a failure it ended with was already reported."""
    request.cancel()
    await asyncio.wait([request])  # raises our own CancelledError, never the request's
    if not request.cancelled():
        request.exception()  # retrieved: the attempt already saw it (or never needed it)


class _Call:
    """One ``run_job``: the ``keyed.Downstream`` of one attempt."""

    def __init__(
        self, service: JobService, ctx: StepContext, body: dict[str, JSON], timeout: float | None
    ) -> None:
        self.service = service
        self.ctx = ctx
        self.body = body
        self.timeout = timeout or ctx.timeout or 120.0
        self.request: asyncio.Task[httpx.Response] | None = None

    async def lookup(self, job_id: str) -> JobView:
        state, _, result = await self.service.status(job_id)
        return JobView(state, result=result)

    async def submit(self, job_id: str) -> None:
        self.request = asyncio.ensure_future(
            self.service._http.post(
                f"{self.service.url}/work",
                json=self.body,
                headers={"Idempotency-Key": job_id},
                timeout=httpx.Timeout(self.timeout + 5),
            )
        )

    async def wait(self, job_id: str, view: JobView) -> JobView:
        while True:
            request = self.request
            if request is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(request), self.service.poll)
                if request.done():
                    response = request.result()
                    if response.status_code >= 400:
                        return JobView("failed", error=f"HTTP {response.status_code}")
                    return JobView("completed", result=response.json())
            else:
                await asyncio.sleep(self.service.poll)
            state, progress, result = await self.service.status(job_id)
            if state == "completed" and request is None:
                return JobView("completed", result=result)
            if state == "absent" and request is None:
                await self.submit(job_id)  # what we attached to ended without a result
            elif state == "running":
                await self.ctx.progress(progress, "running")
