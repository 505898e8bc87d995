"""The saga runner: the thin I/O shell around the saga machine.

Theory of operation
-------------------
One ``SagaRunner`` per server instance. Three background tasks and the step tasks, each
a part in its own module (``SagaRunner`` composes them over the shared ``state``):

* **claimer** (``claimer``) — woken by ``work`` notifications (from any instance), a
  timer for the earliest known ``due_at``, or a poll fallback; claims due workflows
  under a lease (``Transaction.claim_due_workflows``) and, *in the same transaction*,
  runs the machine's ``receive_claim`` (takeover of interrupted attempts, client
  requests) and starts the ready steps.
* **writer** (``writer``) — group commit: step outcomes, durable progress and timer
  ticks queue up while a commit is in flight, then all of them — of many workflows —
  commit in one transaction through ``Checkpointer.checkpoint``, which re-reads each
  row with its lock and refuses a stale owner (fencing). Steps that became ready start
  after COMMIT.
* **heartbeat** (``heartbeat``) — every ``lease/3`` renews the leases held; a lease
  that was not renewed was taken over (or revoked by a cancel): its attempts are
  cancelled locally.
* **step tasks** (``attempt``) — one asyncio task per running attempt, with the step's
  timeout; the outcome goes to the writer. Nothing a step does is written outside a
  checkpoint.

This module keeps the composition: construction, ``start``/``stop``, the submit path
(``reserve``/``start_new``/``adopt``) and ``_after_commit``, which turns every committed
claim or checkpoint into the lease held, the attempts to run and the timers to arm, and
reports the breaker transitions that came back with it (``Applied.breaker_changes``):
only what committed is reported, once, however often ``Store.run`` ran the transaction.
The three background tasks are held by explicit references; ``stop`` cancels and awaits
each of them and never catches the caller's own ``CancelledError``.

Write transactions per workflow (3 sequential steps, nothing failing): the submit (the
push transaction), the claim that also starts step 1, then one checkpoint per step, the
last one also completing the workflow: 5 when workflows run one at a time, far fewer
under load, where claims and checkpoints of many workflows share transactions.

Progress is delivered live through ``on_progress`` (coalesced to at most one call per
``live_interval`` per step, trailing value always delivered) and durably at most every
``progress_interval`` per step (SPEC: a chatty step cannot flood the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import httpx

from protocol import TERMINAL_WORKFLOW_STATUSES, Progress, StorageError, WorkflowStatus
from protocol.jsontypes import JSON
from sync_server import tracing
from sync_server.saga import spans
from sync_server.saga.alerts import Alerts, AlertSink
from sync_server.saga.attempt import Attempts
from sync_server.saga.backoff import jittered
from sync_server.saga.breaker import BreakerPolicy
from sync_server.saga.checkpoint import Applied, Checkpointer, Input
from sync_server.saga.claimer import Claimer
from sync_server.saga.definitions import STOP_SHUTDOWN, DefinitionError, Limit, Workflow
from sync_server.saga.heartbeat import Heartbeat
from sync_server.saga.intake import WORK_CHANNEL
from sync_server.saga.progress import ProgressPublisher
from sync_server.saga.state import Held, SagaMetrics
from sync_server.saga.writer import Writer
from sync_server.store.base import Store, Transaction, WorkflowKey, WorkflowRecord

__all__ = ["ProgressCallback", "SagaMetrics", "SagaRunner", "check_limits"]

log = logging.getLogger("tether.saga")
ProgressCallback = Callable[[str, Progress], Any]
"""``on_progress(tenant, progress)``; may return an awaitable."""


class SagaRunner(Claimer, Writer, Attempts, Heartbeat):
    """Runs the workflows of one store on this instance.

    Args:
        store: the opened store.
        workflows: the definitions this instance can run — several versions of one name
            may be given (the last is the current one); a workflow whose version is not
            among them is left to instances that have it.
        instance_id: lease owner id (unique per process; random if None).
        lease_seconds: lease length; a dead instance's work resumes after it.
        on_progress: live progress callback ``(tenant, Progress)``.
        alerts: alert sink (default: log lines).
        http: the ``httpx.AsyncClient`` handed to steps (one is created if None).
        clock: wall clock, seconds.
        rng: jitter source for backoff.
        max_concurrency: most workflows held at once.
        claim_batch: most workflows claimed per transaction.
        max_batch: most workflows per group commit.
        poll_interval: seconds between claims when nothing wakes the runner.
        heartbeat_interval: seconds between lease renewals (default ``lease/3``).
        progress_interval: seconds between durable progress writes per step.
        live_interval: seconds between live progress calls per step.
        breakers: ``BreakerPolicy`` per breaker name.
        default_breaker: the policy of breakers not named in ``breakers``.
        completion_webhook: outbox destination notified when a workflow ends.
        metrics: instrumentation hooks (``SagaMetrics``; e.g. ``sync_server.metrics``).
        limits: named limits (``Step(limit=...)``) by name.

    Raises:
        DefinitionError: a step names a limit that ``limits`` does not configure.
    """

    def __init__(
        self,
        store: Store,
        workflows: Iterable[Workflow],
        *,
        instance_id: str | None = None,
        lease_seconds: float = 10.0,
        on_progress: ProgressCallback | None = None,
        alerts: Alerts | None = None,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        max_concurrency: int = 2000,
        claim_batch: int = 200,
        max_batch: int = 500,
        poll_interval: float = 1.0,
        heartbeat_interval: float | None = None,
        progress_interval: float = 0.5,
        live_interval: float = 0.05,
        breakers: Mapping[str, BreakerPolicy] | None = None,
        default_breaker: BreakerPolicy | None = None,
        completion_webhook: str | None = None,
        metrics: SagaMetrics | None = None,
        limits: Mapping[str, Limit] | None = None,
    ) -> None:
        self.store = store
        self.limits = dict(limits or {})
        self.definitions = {(w.name, w.version): w for w in workflows}
        self.workflows = {name: w for (name, _), w in self.definitions.items()}
        """The current definition of each name."""
        check_limits(self.definitions.values(), self.limits)
        self.instance_id = instance_id or f"runner-{uuid.uuid4().hex[:12]}"
        self.lease_seconds = lease_seconds
        self.alerts: Alerts = alerts or AlertSink()
        self.metrics = metrics
        self.clock = clock
        self.max_concurrency = max_concurrency
        self.claim_batch = claim_batch
        self.max_batch = max_batch
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval or lease_seconds / 3
        policies = dict(breakers or {})
        fallback = default_breaker or BreakerPolicy()
        self.checkpointer = Checkpointer(
            self.definitions,
            self.instance_id,
            lease_seconds,
            jittered(rng or random.Random()),
            lambda name: policies.get(name, fallback),
            completion_webhook,
            self.limits,
        )
        self.progress = ProgressPublisher(
            on_progress, self._queue_progress, clock, progress_interval, live_interval
        )
        self._http = http
        self._own_http = http is None
        self._held: dict[WorkflowKey, Held] = {}
        self._queue: list[Input] = []
        self._queued = asyncio.Event()
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._claim_task: asyncio.Task[None] | None = None
        self._write_task: asyncio.Task[None] | None = None
        self._beat_task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._running = False
        self._committing = False
        self._reserved = 0
        self._full = False
        """The last claim stopped at ``max_concurrency``: wake the claimer when a held
        workflow is let go (back-pressure must not wait for the poll interval)."""
        self.stats: dict[str, int] = {
            "claim_txns": 0,
            "empty_claims": 0,
            "checkpoint_txns": 0,
            "claimed": 0,
            "checkpoints": 0,
            "fenced_checkpoints": 0,
            "refused": 0,
            "lost_leases": 0,
            "quarantined": 0,
            "attempts": 0,
            "ended": 0,
        }

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start claiming, checkpointing and heartbeating."""
        if self._running:
            return
        self._running = True
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(30.0))
        hooks = self._http.event_hooks.setdefault("request", [])
        if tracing.enabled() and tracing.inject_traceparent not in hooks:
            hooks.append(tracing.inject_traceparent)  # ctx.http sends traceparent
        self.store.listen(WORK_CHANNEL, self._on_work)
        self.store.on_reconnect(self._wake.set)
        self._claim_task = asyncio.create_task(self._claimer(), name="saga-claimer")
        self._write_task = asyncio.create_task(self._writer(), name="saga-writer")
        self._beat_task = asyncio.create_task(self._heartbeat(), name="saga-heartbeat")
        self._wake.set()

    async def stop(self) -> None:
        """Stop: cancel attempts, flush checkpoints, release every lease held.

        Order matters (drain on SIGTERM, issue 5): the claimer is let finish the claim in
        flight rather than cancelled — a claim cancelled while its COMMIT is under way
        may be committed without this runner knowing, and that lease would then outlive
        the instance. Nothing is launched once stopping (``_launch``), so the outcomes
        the writer still commits cannot start attempts that outlive the runner.
        Every background task is cancelled *and awaited*; a cancellation of the caller
        while it waits propagates (nothing here catches ``CancelledError``).
        """
        if not self._running:
            return
        self._running = False
        self.store.unlisten(WORK_CHANNEL, self._on_work)
        if self._timer is not None:
            self._timer.cancel()
        self._wake.set()
        claimer, writer, beat = self._claim_task, self._write_task, self._beat_task
        self._claim_task = self._write_task = self._beat_task = None
        background = [task for task in (claimer, beat, writer) if task is not None]
        try:
            if claimer is not None:
                await asyncio.wait([claimer], timeout=5.0)  # let the claim in flight end
            for task in background:
                if task is not writer:
                    task.cancel()
            steps = [t for h in self._held.values() for t in h.tasks.values()]
            for held in self._held.values():
                held.cancel(STOP_SHUTDOWN)
            await asyncio.gather(*steps, return_exceptions=True)
            self.progress.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain(), timeout=5.0)
        finally:
            # Also when the caller is cancelled meanwhile (that CancelledError goes on):
            # nothing of this runner keeps running.
            for task in background:
                task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for held in self._held.values():
            held.cancel()  # ticks armed by the last checkpoints
        leases = {key: h.fence for key, h in self._held.items()}
        self._held.clear()
        if leases:
            try:
                await self.store.release_leases(self.instance_id, leases)
            except StorageError as exc:
                log.warning("could not release %d leases: %s", len(leases), exc)
        if self._own_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    # ---------------------------------------------------------------- submits
    def runs(self, name: str) -> bool:
        """Whether this instance has the definition ``name``."""
        return name in self.workflows

    def reserve(self, names: list[str]) -> int:
        """How many of the workflows a push submits (their definition names) this
        instance takes on at once — the claim then rides on the push's own transaction
        (``start_new``). Release the reservation with ``adopt``."""
        if not self._running:
            return 0
        room = self.max_concurrency - len(self._held) - self._reserved
        count = max(0, min(room, sum(1 for name in names if name in self.workflows)))
        self._reserved += count
        return count

    async def start_new(
        self, tx: Transaction, records: list[WorkflowRecord], now: float
    ) -> list[Applied]:
        """Lease new workflows to this instance and start their first steps, in the
        submitting transaction ``tx`` (the caller inserts the rows)."""
        return await self.checkpointer.start_new(tx, records, now)

    async def adopt(self, reserved: int, applied: list[Applied]) -> None:
        """After the submitting transaction: run what ``start_new`` started (pass an
        empty list when it did not commit) and release the reservation. A runner that
        stopped meanwhile gives the new leases back at once (no lease outlives it)."""
        self._reserved = max(0, self._reserved - reserved)
        if not applied:
            return
        if not self._running:
            for item in applied:
                self._report_breakers(item)  # committed: the changes happened
            leases = {a.key: a.record.fence for a in applied if a.record is not None}
            try:
                await self.store.release_leases(self.instance_id, leases)
            except StorageError as exc:
                log.warning("could not release %d new leases: %s", len(leases), exc)
            return
        self.stats["claim_txns"] += 1
        self.stats["claimed"] += len(applied)
        for item in applied:
            self._after_commit(item, fence_hint=item.record.fence if item.record else 0)

    # ---------------------------------------------------------------- after commit
    def _after_commit(self, applied: Applied, *, fence_hint: int) -> None:
        self._report_breakers(applied)
        wid = applied.key
        held = self._held.get(wid)
        if applied.refused:
            self.stats["refused"] += 1
            log.warning(
                "stale write refused: workflow %s is no longer leased to %s with fence %d",
                wid,
                self.instance_id,
                fence_hint,
            )
            if held is not None and held.fence == fence_hint:
                self._held.pop(wid, None)
                held.cancel()
            return
        for alert in applied.alerts:
            self._alert(alert.kind, alert.message, alert.details)
        record = applied.record
        if record is not None and record.status in _ENDED:
            self.stats["ended"] += 1
            if self.metrics is not None:
                self.metrics.workflow_finished(record.name, record.status)
        if record is not None and tracing.enabled():
            spans.record_outcome(record, applied.alerts, self.clock(), record.status in _ENDED)
        if applied.failed or record is None:
            if held is not None:
                self._held.pop(wid, None)
                held.cancel()
            return
        if not applied.held:
            if held is not None:
                self._held.pop(wid, None)
                held.cancel()
                if self._full:
                    self._full = False
                    self._wake.set()
            if record.due_at is not None:
                self._arm(record.due_at)
            return
        if held is None or held.fence != record.fence:
            if held is not None:
                held.cancel()
            held = Held(record.id, record.tenant, record.fence)
            self._held[wid] = held
        if record.lease_until is not None:
            remaining = record.lease_until - self.clock()
            held.valid_until = time.monotonic() + remaining - self._lease_margin
        held.record = record
        self._sync_tasks(held, record, applied.commands)

    def _report_breakers(self, applied: Applied) -> None:
        """Report the breaker transitions of a *committed* checkpoint (log, metric,
        alert). They come with the commit's result, never from inside the transaction:
        a transaction ``Store.run`` retried reports each change once, a failed one none."""
        self.checkpointer.breaker_seen.update(applied.breakers_seen)
        for name, state in applied.breaker_changes:
            log.info("breaker %s is now %s", name, state)
            if self.metrics is not None:
                self.metrics.breaker_changed(name, state)
            if state == "open":
                self._alert("breaker_open", f"circuit breaker {name} opened", {"breaker": name})

    def _alert(self, kind: str, message: str, details: dict[str, JSON]) -> None:
        try:
            self.alerts.alert(kind, message, details)
        except Exception:
            log.exception("alert sink failed")


def check_limits(workflows: Iterable[Workflow], limits: Mapping[str, Limit]) -> None:
    """Every ``Step(limit=...)`` must name a configured limit (fail at start, not mid-run).

    Raises:
        DefinitionError: a step names an unknown limit.
    """
    for workflow in workflows:
        for step in workflow.steps.values():
            if step.limit is not None and step.limit not in limits:
                raise DefinitionError(
                    f"workflow {workflow.name!r} step {step.name!r} uses limit "
                    f"{step.limit!r}, which is not configured (create_app(limits=...))"
                )


_ENDED = frozenset({*TERMINAL_WORKFLOW_STATUSES, WorkflowStatus.PARKED})
