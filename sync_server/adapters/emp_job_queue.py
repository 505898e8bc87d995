"""emp-job-queue's adapter: steps run queue jobs exactly once per failure, whatever fails.

Theory of operation
-------------------
emp-job-queue (stakeordie/emp-job-queue) is neither idempotent nor reliable in what it
tells its clients (issue 14 lists what was observed). ``EmpJobQueue`` makes a step's
``await queue.run_job(ctx, service, payload)`` behave as SPEC promise 3 expects:

* **Job ids from the key.** The job id is derived from ``ctx.idempotency_key`` and a
  generation (``keyed.generation_id``), so every attempt on every instance names the
  same job. ``keyed.run_keyed`` looks it up first: a pending/running job is attached
  to, a completed one's result is taken, and only a failed one is followed by a new
  generation — a job id is never submitted twice, so never run twice.
* **Tether owns retries.** Jobs are submitted with ``max_retries=1`` (one attempt: the
  queue turns ``0`` into 3); a failed job fails the attempt (``JobFailed``, retried by
  the step's ``RetryPolicy``) or the step (``PermanentError``, by the ``permanent`` rule).
* **Events are hints.** Progress and completions arrive only on the submitting
  connection, at most once: one reconnecting WebSocket per instance (``EmpSocket``)
  feeds ``ctx.progress``; the status is also polled with backoff, so a lost event, an
  event sent to another instance's connection, or an API restart costs only latency.
  Success arrives twice in two shapes; the first wins, the rest are ignored.
* **Results.** The status answer has neither result nor error: results come from the
  completion event (kept, bounded, for the sweep) or the attestation records of the
  job's ``workflow_id`` (``GET /api/attestations``).
* **Dead workers.** A job ``in_progress`` for longer than ``stuck_after`` seconds since
  its ``started_at`` is cancelled and the next generation submitted in the same attempt;
  the cancel's own failure events are not the attempt's failure. Counted
  (``stats["stuck"]``), logged and alerted (``job_stuck``).
* **Stops.** A timeout (``timeout``, default the step's) cancels the job and fails the
  attempt; a workflow cancel (``ctx.stop_reason == "cancelled"``) cancels the job; a
  lost lease or a shutdown leaves it running for the next instance to attach to.
  ``cancel_job(ctx)`` cancels the job of the step a compensation compensates.
* **Reconciliation.** The instance is the ``job-queue`` ``SourceAdapter``: statuses map
  to the sweep's (pending/assigned/in_progress -> running, completed, failed, 404 ->
  unknown), with the job's ``started_at`` as ``since``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from protocol.jsontypes import JSON
from sync_server.adapters.emp_seen import SeenJobs, attested_view, ended_view, unix_time
from sync_server.adapters.emp_socket import EmpSocket
from sync_server.adapters.keyed import MAX_GENERATIONS, JobView, generation_id, run_keyed
from sync_server.reconcile.sources import JobState
from sync_server.saga.alerts import Alerts, AlertSink
from sync_server.saga.definitions import STOP_CANCELLED, PermanentError, StepContext
from sync_server.saga.machine import idempotency_key
from sync_server.store.base import WorkflowRecord

__all__ = ["EmpJobQueue", "JobFailed"]

log = logging.getLogger("tether.adapters.emp")
CANCELLED_BY_USER = "Job cancelled by user"
_RUNNING = {"assigned": "running", "in_progress": "running", "pending": "pending"}
_RUNNING |= {"queued": "pending", "accepted": "pending"}
_FAILED = {"failed", "cancelled", "timeout", "unworkable"}
MISSING_RESULT_POLLS = 20
"""Polls of a completed job whose result cannot be found before the attempt fails
(the job is never run again for it: every attempt waits for the same result)."""
MAX_ABANDONED = 4096
"""Job ids given up (stuck) remembered, so their cancel's failure is not the attempt's."""
_RESERVED = {"message_id", "max_retries", "type", "service_required", "payload"}


class JobFailed(RuntimeError):
    """The queue reports the job failed; the attempt fails (the step's policy retries)."""


class _Watch:
    """One job being waited on by a step on this instance."""

    def __init__(self, ctx: StepContext | None) -> None:
        self.ctx = ctx
        self.final: JobView | None = None
        self.done = asyncio.Event()


class EmpJobQueue:
    """emp-job-queue for Tether steps; also the ``job-queue`` reconciliation source.

    Args:
        api_url: the queue's HTTP base, e.g. ``http://queue:3331`` (its WebSocket is on
            the same host and port).
        auth_token: the queue's token (``?token=`` on the WebSocket, bearer on HTTP).
        stuck_after: seconds a job may stay ``in_progress`` (since ``started_at``) before
            its worker counts as dead: the job is cancelled and submitted anew.
        permanent: ``(error) -> bool``: a failure that no retry can fix (raises
            ``PermanentError``); default: every failure is retried by the step's policy.
        alerts: where stuck jobs are alerted (default: the serving instance's alerts,
            see ``bind_alerts``; log lines outside an app).
        poll: (first, most) seconds between status polls while waiting.
        submit_grace: seconds a submitted job may stay unknown before it is resubmitted
            under the same id (the queue acknowledges nothing; a submit can be lost).
        client_id: the WebSocket's client id (default: unique per instance).
        http: an ``httpx.AsyncClient`` to use (default: one of its own).
    """

    source = "job-queue"
    name = "emp-job-queue"

    def __init__(
        self,
        api_url: str,
        *,
        auth_token: str | None = None,
        stuck_after: float = 300.0,
        permanent: Callable[[str], bool] | None = None,
        alerts: Alerts | None = None,
        poll: tuple[float, float] = (0.2, 5.0),
        submit_grace: float = 3.0,
        client_id: str | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if not api_url.startswith(("http://", "https://")):
            raise ValueError(f"api_url must be http(s)://host:port, not {api_url!r}")
        if stuck_after <= 0:
            raise ValueError("stuck_after must be > 0 seconds")
        self.api_url = api_url.rstrip("/")
        self.auth_token = auth_token
        self.stuck_after = stuck_after
        self.permanent = permanent or (lambda error: False)
        self.alerts: Alerts = alerts or AlertSink()
        self._own_alerts = alerts is None
        self.poll = poll
        self.submit_grace = submit_grace
        self.lookup_timeout = 10.0
        """Longest wait for the queue when the sweep asks (``job_status``)."""
        self.client_id = client_id or f"tether-{uuid.uuid4().hex[:12]}"
        headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        self._http = http or httpx.AsyncClient(timeout=10.0, headers=headers)
        self._own_http = http is None
        ws_url = "ws" + self.api_url[4:]
        self.socket = EmpSocket(ws_url, self.client_id, auth_token, self._on_message)
        self._watches: dict[str, _Watch] = {}
        self._abandoned: OrderedDict[str, None] = OrderedDict()  # bounded: MAX_ABANDONED
        self._seen = SeenJobs()
        self._background: set[asyncio.Task[Any]] = set()
        self.stats: dict[str, int] = {
            "submitted": 0,
            "attached": 0,
            "taken": 0,
            "stuck": 0,
            "cancelled": 0,
            "duplicate_events": 0,
            "resubmitted_lost": 0,
        }

    # ---------------------------------------------------------------- steps
    async def run_job(
        self,
        ctx: StepContext,
        service: str,
        payload: Mapping[str, JSON],
        *,
        timeout: float | None = None,
        **job_fields: JSON,
    ) -> JSON:
        """Run the step's queue job (once per failure) and return the worker's data.

        Args:
            ctx: the step's context (its idempotency key names the job).
            service: the queue's ``service_required``.
            payload: the job's payload.
            timeout: the longest wait for this attempt (default: the step's timeout);
                then the job is cancelled and the attempt fails.
            **job_fields: other submit fields (``priority``, ``requirements``,
                ``workflow_id`` — default the Tether workflow id —, ``current_step``,
                ``total_steps``, ``customer_id``, ``ctx``...).

        Returns:
            The ``data`` the worker returned.

        Raises:
            JobFailed: the job failed (the step's ``RetryPolicy`` decides).
            PermanentError: the job failed and ``permanent`` says no retry can help.
            TimeoutError: the job did not finish in time (it was cancelled).
            ValueError: a reserved field (``max_retries``, ``message_id``...) was given.
        """
        reserved = _RESERVED & set(job_fields)
        if reserved:
            raise ValueError(f"run_job: {sorted(reserved)} are set by the adapter")
        if not isinstance(service, str) or not service:
            raise ValueError("run_job: service must be a non-empty string")
        ctx.record_job(self.source, self.name)
        self.socket.start()
        call = _Call(self, ctx, service, dict(payload), job_fields)
        limit = timeout if timeout is not None else ctx.timeout
        try:
            async with asyncio.timeout(limit) as scope:
                outcome = await run_keyed(call, ctx.idempotency_key)
        except TimeoutError:
            if not scope.expired():
                raise
            if call.current is not None:
                self._spawn(self._send_cancel(call.current))
            raise TimeoutError(f"queue job of {ctx.step} did not finish in {limit} s") from None
        except asyncio.CancelledError:
            # A workflow cancel (or the step's own timeout in the runner: no reason set)
            # stops the job; a lost lease or a shutdown leaves it to the next instance.
            if call.current is not None and ctx.stop_reason in (STOP_CANCELLED, None):
                self._spawn(self._send_cancel(call.current))
            raise
        finally:
            if call.current is not None:
                self._watches.pop(call.current, None)
        view = outcome.view
        if view.status == "completed":
            # Done is 100 %, even if the last progress event was lost or is still on its
            # way (the poll can see the end first).
            await ctx.progress(1.0, "queue job completed")
            return view.result
        error = view.error or "job failed at emp-job-queue"
        if self.permanent(error):
            raise PermanentError(f"queue job {outcome.job_id} failed: {error}")
        raise JobFailed(f"queue job {outcome.job_id} failed: {error}")

    async def cancel_job(self, ctx: StepContext) -> None:
        """Cancel the live job of the step ``ctx`` compensates (or runs); a completed or
        failed job is left alone (the queue cannot cancel a completed job)."""
        key = idempotency_key(ctx.workflow_id, ctx.step, tenant=ctx.tenant)
        for generation in range(MAX_GENERATIONS):
            job_id = generation_id(key, generation)
            view = await self._lookup(job_id)
            if view.status == "absent":
                return
            if view.status in ("pending", "running"):
                await self._send_cancel(job_id)

    # ---------------------------------------------------------------- source
    async def job_status(self, workflow: WorkflowRecord, step: str, key: str) -> JobState:
        """The sweep's view of the step's job: its latest generation, mapped.

        Raises:
            TimeoutError: the queue did not answer within ``lookup_timeout`` (the sweep
                treats a source that is down as no news, not as divergence).
        """
        now = time.time()
        last: JobView | None = None
        last_id = ""
        async with asyncio.timeout(self.lookup_timeout):
            for generation in range(MAX_GENERATIONS):
                job_id = generation_id(key, generation)
                view = await self._lookup(job_id)
                if view.status == "absent":
                    break
                last, last_id = view, job_id
                if view.status != "failed":
                    break
        if last is None:
            return JobState("unknown", at=now)
        if last.status == "failed" and last_id in self._abandoned:
            # Cancelled by us (a dead worker): its replacement is on its way, and the
            # cancel's failure must not fail the attempt through the sweep either.
            return JobState("running", at=now)
        if last.status == "failed":
            return JobState("failed", error=last.error, at=now)
        if last.status == "completed" and last.result is not None:
            return JobState("completed", result=last.result, at=now)
        return JobState("running", at=now, since=last.started_at)

    def bind_alerts(self, alerts: Alerts) -> None:
        """Raise alerts through ``alerts`` (the serving instance's, counted as
        ``tether_alerts_total{kind="job_stuck"}``) unless some were given explicitly."""
        if self._own_alerts:
            self.alerts = alerts

    async def aclose(self) -> None:
        """Close the WebSocket and the HTTP client."""
        pending = list(self._background)
        for task in pending:
            task.cancel()
        if pending:
            # Ended before the socket closes: a send still running would reopen it.
            await asyncio.wait(pending)
        await self.socket.close()
        if self._own_http:
            await self._http.aclose()

    # ---------------------------------------------------------------- internals
    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        job_id = message.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            return  # not about a job (a welcome, ``subscribed``...)
        watch = self._watches.get(job_id)
        if kind == "update_job_progress":
            progress = message.get("progress")
            if watch is not None and watch.ctx is not None and isinstance(progress, int | float):
                fraction = min(1.0, max(0.0, float(progress) / 100.0))
                watch.ctx.reporter(fraction, "queue job running")
            return
        view = ended_view(message)
        if view is None:
            return
        if self._seen.get(job_id) is not None:
            self.stats["duplicate_events"] += 1  # success comes twice; failure twice too
            return
        if view.status == "failed" and job_id in self._abandoned:
            view = JobView("failed", error=view.error, abandoned=True)
        self._seen.put(job_id, view)
        if watch is not None and watch.final is None:
            watch.final = view
            watch.done.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_cancel(self, job_id: str) -> None:
        self.stats["cancelled"] += 1
        try:
            await self.socket.send({"type": "cancel_job", "job_id": job_id}, timeout=10.0)
        except ConnectionError as exc:
            log.warning("could not cancel queue job %s: %s", job_id, exc)

    async def _get(self, path: str, **params: str) -> httpx.Response:
        """GET with retries on transport errors and 5xx (the queue may be restarting)."""
        delay = self.poll[0]
        while True:
            try:
                response = await self._http.get(f"{self.api_url}{path}", params=params)
                if response.status_code < 500:
                    return response
            except httpx.HTTPError as exc:
                log.debug("emp-job-queue GET %s failed: %s", path, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.poll[1])

    async def _lookup(self, job_id: str) -> JobView:
        response = await self._get(f"/api/jobs/{job_id}")
        if response.status_code == 404:
            return JobView("absent")
        if response.status_code >= 400:
            raise ConnectionError(f"emp-job-queue answered {response.status_code} for {job_id}")
        job = response.json().get("job") or {}
        status = str(job.get("status"))
        started = unix_time(job.get("started_at"))
        if status == "completed":
            seen = self._seen.get(job_id)
            if seen is None or seen.status != "completed":
                seen = await self._attested(job_id, job.get("workflow_id"))
            return JobView("completed", result=seen.result if seen else None, started_at=started)
        if status in _FAILED:
            seen = self._seen.get(job_id)
            if seen is None or seen.status != "failed":
                seen = await self._attested(job_id, job.get("workflow_id"))
            error = seen.error if seen and seen.error else f"job {status} at the queue"
            return JobView("failed", error=error, started_at=started)
        return JobView(_RUNNING.get(status, "pending"), started_at=started)

    async def _attested(self, job_id: str, workflow_id: Any) -> JobView | None:
        """The job's completion record among its workflow's attestations (if any)."""
        if not isinstance(workflow_id, str) or not workflow_id:
            return None
        response = await self._get("/api/attestations", workflow_id=workflow_id)
        if response.status_code != 200:
            return None
        for record in response.json().get("attestations") or ():
            if isinstance(record, dict) and record.get("job_id") == job_id:
                view = attested_view(record)
                self._seen.put(job_id, view)
                return view
        return None


class _Call:
    """One ``run_job`` call: the ``keyed.Downstream`` of one attempt."""

    def __init__(
        self,
        queue: EmpJobQueue,
        ctx: StepContext,
        service: str,
        payload: dict[str, JSON],
        fields: dict[str, JSON],
    ) -> None:
        self.queue = queue
        self.ctx = ctx
        self.service = service
        self.payload = payload
        self.fields = fields
        self.current: str | None = None

    async def lookup(self, job_id: str) -> JobView:
        view = await self.queue._lookup(job_id)
        if view.status == "completed" and view.result is None:
            # Done, but its result is not (yet) attested: wait for it; never re-run it.
            return JobView("running", started_at=view.started_at)
        return view

    async def submit(self, job_id: str) -> None:
        self._watch(job_id)
        message = {
            "type": "submit_job",
            "message_id": job_id,
            "service_required": self.service,
            "payload": self.payload,
            "priority": 50,
            "workflow_id": self.ctx.workflow_id,
            **self.fields,
            "max_retries": 1,  # one attempt: Tether owns retries (0 would mean 3)
        }
        await self.queue.socket.send(message, timeout=self.queue.poll[1] * 6)
        self.queue.stats["submitted"] += 1
        self.ctx.log.info("submitted queue job %s (%s)", job_id, self.service)

    async def wait(self, job_id: str, view: JobView) -> JobView:
        queue = self.queue
        watch = self._watch(job_id)
        if view.status != "absent":
            queue.stats["attached"] += 1
        delay = queue.poll[0]
        absent_since: float | None = None
        unattested = 0
        while True:
            if watch.final is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watch.done.wait(), delay)
            if watch.final is not None:
                return watch.final
            delay = min(delay * 2, queue.poll[1])
            view = await queue._lookup(job_id)
            if view.status == "failed" and job_id in queue._abandoned:
                return JobView("failed", error=view.error, abandoned=True)
            if view.status in ("completed", "failed"):
                if view.status == "completed" and view.result is None:
                    unattested += 1  # done, but its result not attested (yet)
                    if unattested < MISSING_RESULT_POLLS:
                        continue
                    error = "completed, but its result is in no event and no attestation"
                    return JobView("failed", error=error)
                return view
            now = time.time()
            if view.status == "absent":
                absent_since = absent_since or now
                if now - absent_since > queue.submit_grace:
                    queue.stats["resubmitted_lost"] += 1
                    await self.submit(job_id)  # the submit was lost: the id is still free
                    absent_since = None
                continue
            absent_since = None
            started = view.started_at
            stuck = started is not None and now - started > queue.stuck_after
            if view.status == "running" and stuck and job_id not in queue._abandoned:
                self._abandon(job_id, now - (started or now))
                await queue._send_cancel(job_id)

    def _abandon(self, job_id: str, age: float) -> None:
        queue = self.queue
        queue._abandoned[job_id] = None
        while len(queue._abandoned) > MAX_ABANDONED:
            queue._abandoned.popitem(last=False)
        queue.stats["stuck"] += 1
        message = (
            f"queue job {job_id} of {self.ctx.workflow_id}/{self.ctx.step} has been "
            f"in_progress for {age:.0f} s (stuck_after {queue.stuck_after} s): its worker is "
            "presumed dead; cancelling it and submitting it again"
        )
        log.warning(message)
        queue.alerts.alert(
            "job_stuck",
            message,
            {
                "tenant": self.ctx.tenant,  # a tenant admin sees its own alerts (issue 11)
                "workflow_id": self.ctx.workflow_id,
                "step": self.ctx.step,
                "job_id": job_id,
            },
        )

    def _watch(self, job_id: str) -> _Watch:
        if self.current is not None and self.current != job_id:
            self.queue._watches.pop(self.current, None)  # an abandoned generation
        self.current = job_id
        watch = self.queue._watches.get(job_id)
        if watch is None or watch.ctx is not self.ctx:
            watch = _Watch(self.ctx)
            seen = self.queue._seen.get(job_id)
            if seen is not None:
                watch.final = seen
                watch.done.set()
            self.queue._watches[job_id] = watch
        return watch
