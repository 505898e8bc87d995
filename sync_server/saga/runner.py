"""The saga runner: the thin I/O shell around the saga machine.

Theory of operation
-------------------
One ``SagaRunner`` per server instance. Three background tasks and the step tasks:

* **claimer** — woken by ``work`` notifications (from any instance), a timer for the
  earliest known ``due_at``, or a poll fallback; claims due workflows under a lease
  (``Transaction.claim_due_workflows``) and, *in the same transaction*, runs the
  machine's ``receive_claim`` (takeover of interrupted attempts, client requests) and
  starts the ready steps.
* **writer** — group commit: step outcomes, durable progress and timer ticks queue up
  while a commit is in flight, then all of them — of many workflows — commit in one
  transaction through ``Checkpointer.checkpoint``, which re-reads each row with its lock
  and refuses a stale owner (fencing). Steps that became ready start after COMMIT.
* **heartbeat** — every ``lease/3`` renews the leases held; a lease that was not renewed
  was taken over (or revoked by a cancel): its attempts are cancelled locally.
* **step tasks** — one asyncio task per running attempt, with the step's timeout; the
  outcome goes to the writer. Nothing a step does is written outside a checkpoint.

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
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import msgspec

from protocol import (
    TERMINAL_WORKFLOW_STATUSES,
    Progress,
    StorageError,
    ValidationError,
    WorkflowStatus,
)
from protocol.limits import MAX_RESULT_BYTES, check_finite
from sync_server import tracing
from sync_server.saga import spans
from sync_server.saga.alerts import Alerts, AlertSink
from sync_server.saga.backoff import jittered
from sync_server.saga.breaker import BreakerPolicy
from sync_server.saga.checkpoint import Applied, Checkpointer, Input
from sync_server.saga.definitions import (
    STOP_CANCELLED,
    STOP_INTERRUPTED,
    STOP_SHUTDOWN,
    DefinitionError,
    JobRecorder,
    Limit,
    PermanentError,
    StepContext,
    Workflow,
)
from sync_server.saga.intake import WORK_CHANNEL, parse_revoke
from sync_server.saga.machine import RunCompensation, RunStep
from sync_server.saga.progress import ProgressPublisher
from sync_server.saga.storable import refused_by_database, storable_json, storable_text
from sync_server.store.base import Store, Transaction, WorkflowKey, WorkflowRecord

__all__ = ["ProgressCallback", "SagaMetrics", "SagaRunner", "check_limits"]

log = logging.getLogger("tether.saga")
JSON = Any
ProgressCallback = Callable[[str, Progress], Any]
"""``on_progress(tenant, progress)``; may return an awaitable."""


@dataclass(slots=True)
class _Held:
    """A workflow this instance holds the lease of, and its attempts in flight."""

    id: str
    tenant: str
    fence: int
    tasks: dict[tuple[str, bool], asyncio.Task[None]] = field(default_factory=dict)
    contexts: dict[tuple[str, bool], StepContext] = field(default_factory=dict)
    tick: asyncio.TimerHandle | None = None
    valid_until: float = float("inf")
    """``time.monotonic()`` after which this instance can no longer be sure it holds the
    lease (its expiry as last confirmed, less a safety margin)."""
    record: WorkflowRecord | None = None
    """The row as this instance last wrote it: the base of a fenced checkpoint."""

    @property
    def key(self) -> WorkflowKey:
        return WorkflowKey(self.tenant, self.id)

    def cancel(self, reason: str = STOP_INTERRUPTED) -> None:
        """Stop every attempt, telling each why (``StepContext.stop_reason``)."""
        for key, task in self.tasks.items():
            self.stop(key, task, reason)
        self.tasks.clear()
        self.contexts.clear()
        if self.tick is not None:
            self.tick.cancel()
            self.tick = None

    def stop(self, key: tuple[str, bool], task: asyncio.Task[None], reason: str) -> None:
        ctx = self.contexts.pop(key, None)
        if ctx is not None and ctx.stop_reason is None:
            ctx.stop_reason = reason
        task.cancel()


class SagaRunner:
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
        self._held: dict[WorkflowKey, _Held] = {}
        self._queue: list[Input] = []
        self._queued = asyncio.Event()
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._tasks: list[asyncio.Task[None]] = []
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
        self._tasks = [
            asyncio.create_task(self._claimer(), name="saga-claimer"),
            asyncio.create_task(self._writer(), name="saga-writer"),
            asyncio.create_task(self._heartbeat(), name="saga-heartbeat"),
        ]
        self._wake.set()

    async def stop(self) -> None:
        """Stop: cancel attempts, flush checkpoints, release every lease held.

        Order matters (drain on SIGTERM, issue 5): the claimer is let finish the claim in
        flight rather than cancelled — a claim cancelled while its COMMIT is under way
        may be committed without this runner knowing, and that lease would then outlive
        the instance. Nothing is launched once stopping (``_launch``), so the outcomes
        the writer still commits cannot start attempts that outlive the runner.
        """
        if not self._running:
            return
        self._running = False
        self.store.unlisten(WORK_CHANNEL, self._on_work)
        if self._timer is not None:
            self._timer.cancel()
        self._wake.set()
        claimer = [t for t in self._tasks if t.get_name() == "saga-claimer"]
        if claimer:
            await asyncio.wait(claimer, timeout=5.0)
        for task in self._tasks:
            if task.get_name() != "saga-writer":
                task.cancel()
        steps = [t for h in self._held.values() for t in h.tasks.values()]
        for held in self._held.values():
            held.cancel(STOP_SHUTDOWN)
        await asyncio.gather(*steps, return_exceptions=True)
        self.progress.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain(), timeout=5.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
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

    async def _drain(self) -> None:
        # Also wait for the batch being committed: cancelling the writer mid-COMMIT
        # would leave its outcome's fate unknown to this runner.
        while self._queue or self._committing:
            self._queued.set()
            await asyncio.sleep(0.01)

    @property
    def held(self) -> dict[WorkflowKey, int]:
        """Workflow key -> fence of every lease this instance holds."""
        return {key: h.fence for key, h in self._held.items()}

    # ---------------------------------------------------------------- wake-ups
    def _on_work(self, payload: str) -> None:
        revoked = parse_revoke(payload)
        if revoked is not None:
            kind, key = revoked
            held = self._held.pop(key, None)
            if held is not None:
                log.info("lease of %s revoked; stopping its attempts", held.id)
                held.cancel(STOP_CANCELLED if kind == "cancel" else STOP_INTERRUPTED)
        elif payload.startswith("due:"):
            with contextlib.suppress(ValueError):
                self._arm(float(payload[4:]))
                return
        self._wake.set()

    def _arm(self, at: float) -> None:
        """Wake the claimer at ``at`` (keeps only the earliest timer)."""
        delay = at - self.clock()
        if delay <= 0:
            self._wake.set()
            return
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at

        def fire() -> None:
            self._timer = None
            self._timer_at = float("inf")
            self._wake.set()

        self._timer = asyncio.get_running_loop().call_later(delay, fire)

    # ---------------------------------------------------------------- claimer
    async def _claimer(self) -> None:
        failures = 0
        while self._running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()
            try:
                while self._running:
                    capacity = self.max_concurrency - len(self._held)
                    if capacity <= 0:
                        self._full = True
                        break
                    limit = min(self.claim_batch, capacity)
                    if await self._claim_once(limit) < limit:
                        break
                    self._full = limit == capacity
                failures = 0
            except StorageError as exc:
                failures += 1
                log.warning("claim failed (%s); retrying", exc)
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))
            except Exception:
                # A shell never dies of a bug: log it and keep claiming (STYLE, errors).
                failures += 1
                log.exception("claim failed unexpectedly; retrying")
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))

    async def _claim_once(self, limit: int) -> int:
        now = self.clock()
        started = time.perf_counter()
        applied = await self.store.run(lambda tx: self.checkpointer.claim(tx, now, limit))
        if applied and self.metrics is not None:
            self.metrics.observe_append("saga", time.perf_counter() - started)
        # A claim that found nothing wrote nothing; count only the ones that did.
        self.stats["claim_txns" if applied else "empty_claims"] += 1
        self.stats["claimed"] += len(applied)
        for item in applied:
            stale = self._held.pop(item.key, None)
            if stale is not None:
                stale.cancel()  # our own older lease on it expired; its attempts are void
            self._after_commit(item, fence_hint=item.record.fence if item.record else 0)
        self._after_checkpoints()
        return len(applied)

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
        self._after_checkpoints()

    # ---------------------------------------------------------------- writer
    def _enqueue(self, item: Input) -> None:
        self._queue.append(item)
        self._queued.set()

    def _queue_progress(self, item: Input) -> None:
        held = self._held.get(item.key)
        if held is not None and held.fence == item.fence:
            self._enqueue(item)

    async def _writer(self) -> None:
        failures = 0
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._queue:
                batch = self._queue
                self._queue = []
                self._committing = True
                try:
                    await self._commit(batch)
                    failures = 0
                except StorageError as exc:
                    failures += 1
                    log.warning("checkpoint of %d inputs failed (%s); retrying", len(batch), exc)
                    self._queue[:0] = batch
                    await asyncio.sleep(min(2.0, 0.05 * 2**failures))
                finally:
                    self._committing = False

    async def _commit(self, batch: list[Input]) -> None:
        grouped: dict[WorkflowKey, tuple[int, list[Input]]] = {}
        for item in batch:
            entry = grouped.get(item.key)
            if entry is None or entry[0] != item.fence:
                if entry is not None and entry[0] > item.fence:
                    self.stats["refused"] += 1
                    continue  # an input of an older lease: fenced out
                grouped[item.key] = (item.fence, [item])
            else:
                entry[1].append(item)
        keys = list(grouped)
        for start in range(0, len(keys), self.max_batch):
            chunk = {key: grouped[key] for key in keys[start : start + self.max_batch]}
            try:
                await self._commit_chunk(chunk)
            except StorageError as exc:
                if not refused_by_database(exc):
                    raise  # the database is down or busy: the writer retries the batch
                log.warning("checkpoint of %d workflows refused (%s); one by one", len(chunk), exc)
                await self._commit_each(chunk)
            except Exception:
                # A bug, not the database: isolate the workflow that triggers it.
                log.exception("checkpoint of %d workflows failed; retrying one by one", len(chunk))
                await self._commit_each(chunk)

    async def _commit_fenced(
        self, chunk: dict[WorkflowKey, tuple[int, list[Input]]], now: float
    ) -> dict[WorkflowKey, tuple[int, list[Input]]]:
        """Checkpoint what can be computed from this instance's copies of the rows with
        one fenced write (no locked read); returns the workflows left for the locked
        checkpoint (not eligible, or changed since the copy)."""
        computed = {}
        for key, (fence, inputs) in chunk.items():
            held = self._held.get(key)
            if held is None or held.fence != fence or held.record is None:
                continue
            outcome = await self.checkpointer.compute_fenced(held.record, fence, inputs, now)
            if outcome is not None:
                computed[key] = outcome
        if not computed:
            return chunk
        writes = [write for _, write, _ in computed.values()]
        notes = [note for _, _, notes in computed.values() for note in notes]
        started = time.perf_counter()
        try:
            written = await self.store.write_fenced(self.instance_id, writes, notes)
        except StorageError as exc:
            log.debug("fenced checkpoint failed (%s); taking the locked path", exc)
            return chunk
        if written:
            if self.metrics is not None:
                self.metrics.observe_append("saga", time.perf_counter() - started)
            self.stats["checkpoint_txns"] += 1
            self.stats["fenced_checkpoints"] += len(written)
            self.stats["checkpoints"] += len(written)
            for key in written:
                self._after_commit(computed[key][0], fence_hint=chunk[key][0])
            self._after_checkpoints()
        return {key: entry for key, entry in chunk.items() if key not in written}

    async def _commit_each(self, chunk: dict[WorkflowKey, tuple[int, list[Input]]]) -> None:
        """No poison batch (issue 11): commit each workflow of a failed chunk on its own,
        so the others commit; the one that fails is quarantined (``_quarantine``)."""
        for key, entry in chunk.items():
            try:
                await self._commit_chunk({key: entry})
            except StorageError as exc:
                if not refused_by_database(exc):
                    raise
                await self._quarantine(key, entry, exc)
            except Exception as exc:
                log.exception("checkpoint of workflow %s failed", key.id)
                await self._quarantine(key, entry, exc)

    async def _quarantine(
        self, key: WorkflowKey, entry: tuple[int, list[Input]], exc: BaseException
    ) -> None:
        """End a workflow whose checkpoint the database refuses, instead of retrying it
        forever: its step outcomes become permanent failures that carry the reason (no
        result, no free text but the reason), so the machine fails the step at once and
        the workflow compensates or parks by its ``on_failure``. If even that cannot be
        written, the workflow is dropped here and its lease lapses (a takeover retries
        it, bounded by ``MAX_INTERRUPTS``)."""
        fence, inputs = entry
        reason = storable_text(f"checkpoint refused by the store: {_describe(exc)}")[:500]
        safe: list[Input] = []
        for item in inputs:
            if item.kind == "step":
                failed = Input(
                    "step", item.workflow_id, fence, item.step, item.attempt, tenant=key.tenant
                )
                failed.error, failed.permanent = reason, True
                safe.append(failed)
            elif item.kind == "comp":
                failed = Input(
                    "comp", item.workflow_id, fence, item.step, item.attempt, tenant=key.tenant
                )
                failed.error = reason
                safe.append(failed)
            elif item.kind == "tick":
                safe.append(item)
            # progress: dropped (ephemeral; its message may be what was refused)
        self.stats["quarantined"] += 1
        try:
            await self._commit_chunk({key: (fence, safe)})
        except StorageError as again:
            if not refused_by_database(again):
                raise
            self._drop(key, again)
        except Exception as again:
            self._drop(key, again)

    def _drop(self, key: WorkflowKey, exc: BaseException) -> None:
        log.error("checkpoint of workflow %s cannot be written (%s); dropping it", key.id, exc)
        held = self._held.pop(key, None)
        if held is not None:
            held.cancel()

    async def _commit_chunk(self, chunk: dict[WorkflowKey, tuple[int, list[Input]]]) -> None:
        now = self.clock()
        chunk = await self._commit_fenced(chunk, now)
        if not chunk:
            return

        async def unit(tx: Transaction) -> list[Applied]:
            return await self.checkpointer.checkpoint(tx, chunk, now)

        started = time.perf_counter()
        applied = await self.store.run(unit)
        if self.metrics is not None:
            self.metrics.observe_append("saga", time.perf_counter() - started)
        self.stats["checkpoint_txns"] += 1
        self.stats["checkpoints"] += len(applied)
        for outcome in applied:
            entry = chunk.get(outcome.key)
            hint = entry[0] if entry else (outcome.record.fence if outcome.record else 0)
            self._after_commit(outcome, fence_hint=hint)
        self._after_checkpoints()

    # ---------------------------------------------------------------- after commit
    def _after_commit(self, applied: Applied, *, fence_hint: int) -> None:
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
            held = _Held(record.id, record.tenant, record.fence)
            self._held[wid] = held
        if record.lease_until is not None:
            remaining = record.lease_until - self.clock()
            held.valid_until = time.monotonic() + remaining - self._lease_margin
        held.record = record
        self._sync_tasks(held, record, applied.commands)

    def _after_checkpoints(self) -> None:
        for name, state in self.checkpointer.breaker_changes:
            log.info("breaker %s is now %s", name, state)
            if self.metrics is not None:
                self.metrics.breaker_changed(name, state)
            if state == "open":
                self._alert("breaker_open", f"circuit breaker {name} opened", {"breaker": name})
        self.checkpointer.breaker_changes.clear()

    def _alert(self, kind: str, message: str, details: dict[str, JSON]) -> None:
        try:
            self.alerts.alert(kind, message, details)
        except Exception:
            log.exception("alert sink failed")

    def _sync_tasks(
        self, held: _Held, record: WorkflowRecord, commands: list[RunStep | RunCompensation]
    ) -> None:
        """Start the commanded attempts; cancel local attempts the state no longer runs."""
        steps = record.state["steps"]
        reason = STOP_CANCELLED if record.state.get("cancel") else STOP_INTERRUPTED
        for (step, compensation), task in list(held.tasks.items()):
            s = steps.get(step, {})
            alive = s.get("comp_running") if compensation else s.get("status") == "running"
            if not alive:
                held.stop((step, compensation), task, reason)
                del held.tasks[(step, compensation)]
        for command in commands:
            self._launch(held, record, command)
        if held.tick is not None:
            held.tick.cancel()
            held.tick = None
        due = record.due_at
        now = self.clock()
        deadline = record.state.get("deadline_at") if record.status == "running" else None
        if deadline is not None and (due is None or due <= now or deadline < due):
            due = deadline  # the workflow's deadline passes while its attempts run
        if due is not None and due > now:
            # A sibling's retry falls due while other attempts still run: tick then.
            fence = held.fence
            held.tick = asyncio.get_running_loop().call_later(
                due - now, lambda: self._enqueue(Input("tick", held.id, fence, tenant=held.tenant))
            )

    def _launch(
        self, held: _Held, record: WorkflowRecord, command: RunStep | RunCompensation
    ) -> None:
        if not self._running:
            # Stopping: the lease is released below and the next holder re-runs the
            # attempt (as after a takeover); a task started now would outlive the runner.
            return
        definition = self.checkpointer.workflows[(record.name, record.workflow_version)]
        step = definition.steps[command.step]
        compensation = isinstance(command, RunCompensation)
        steps = record.state["steps"]
        results = {dep: steps[dep].get("result") for dep in step.depends_on}
        if compensation:
            results[step.name] = steps[step.name].get("result")
        assert self._http is not None
        ctx = StepContext(
            workflow_id=record.id,
            step=step.name,
            input=record.input,
            results=results,
            attempt=command.attempt,
            idempotency_key=command.idempotency_key,
            http=self._http,
            log=logging.LoggerAdapter(
                logging.getLogger("tether.step"),
                {"workflow_id": record.id, "step": step.name, "attempt": command.attempt},
            ),
            tenant=record.tenant,
            compensating=compensation,
            reporter=self.progress.reporter(
                record.tenant, record.id, held.fence, step.name, command.attempt
            ),
            timeout=step.timeout,
            job_recorder=self._job_recorder(held, step.name, command.attempt),
        )
        key = (step.name, compensation)
        old = held.tasks.pop(key, None)
        if old is not None:
            held.stop(key, old, STOP_INTERRUPTED)
        action = step.compensate if compensation else step.action
        assert action is not None
        self.stats["attempts"] += 1
        if self.metrics is not None:
            self.metrics.step_attempt(record.name, step.name, command.attempt, compensation)
        held.contexts[key] = ctx
        span = None
        if tracing.enabled():
            breaker = self.checkpointer.breaker_seen.get(step.breaker or "", "closed")
            span = spans.start_attempt(
                record, step, command.attempt, compensation, breaker, self.instance_id
            )
        run = self._attempt(held, key, action, ctx, step.timeout, step.breaker, span)
        held.tasks[key] = (
            asyncio.create_task(run)
            if span is None
            else asyncio.create_task(run, context=tracing.span_context(span))
        )

    def _job_recorder(self, held: _Held, step: str, attempt: int) -> JobRecorder:
        """``ctx.record_job``: the step's state names the job's source (for the sweep)."""

        def record(source: str, adapter: str) -> None:
            if self._held.get(held.key) is held:
                job = {"source": source, "adapter": adapter}
                self._enqueue(
                    Input("job", held.id, held.fence, step, attempt, job=job, tenant=held.tenant)
                )

        return record

    async def _attempt(
        self,
        held: _Held,
        key: tuple[str, bool],
        action: Callable[[StepContext], Any],
        ctx: StepContext,
        timeout: float | None,
        breaker: str | None,
        span: Any = None,
    ) -> None:
        """Run one attempt and queue its outcome (never raises but CancelledError)."""
        kind = "comp" if ctx.compensating else "step"
        item = Input(
            kind,
            ctx.workflow_id,
            held.fence,
            ctx.step,
            ctx.attempt,
            breaker=breaker,
            tenant=held.tenant,
        )
        try:
            async with asyncio.timeout(timeout) as scope:
                result = await action(ctx)
            item.result = _json_result(result)
            item.ok = True
        except TimeoutError as exc:
            if scope.expired():
                item.timed_out = True
                item.error = f"timed out after {timeout} s"
            else:
                item.error = _describe(exc)
        except PermanentError as exc:
            item.permanent = True
            item.error = _describe(exc)
        except asyncio.CancelledError:
            tracing.end_span(span, error="attempt interrupted (lease lost, cancel or stop)")
            raise
        except Exception as exc:
            item.error = _describe(exc)
            log.debug(
                "attempt %s of %s/%s failed: %s",
                ctx.attempt,
                ctx.workflow_id,
                ctx.step,
                item.error,
                extra={"workflow_id": ctx.workflow_id, "step": ctx.step, "attempt": ctx.attempt},
            )
        finally:
            if held.tasks.get(key) is asyncio.current_task():
                del held.tasks[key]
                held.contexts.pop(key, None)
        tracing.end_span(
            span, error=item.error, attributes={"tether.permanent": item.permanent or None}
        )
        self.progress.finish(held.tenant, ctx.workflow_id, ctx.step)
        if self._held.get(held.key) is held:
            self._enqueue(item)

    # ---------------------------------------------------------------- heartbeat
    @property
    def _lease_margin(self) -> float:
        """Attempts stop this long before the lease could expire (clock skew, delays)."""
        return min(1.0, self.lease_seconds * 0.2)

    async def _heartbeat(self) -> None:
        """Renew held leases every ``heartbeat_interval``.

        A lease is only as good as its last confirmation: when renewal fails or hangs
        (the database is down, the network is cut), attempts whose lease may have
        expired are stopped — another instance may take the workflow over once the
        lease runs out, and the same attempt must never run twice at once (issue 4:
        leases; LESSONS: leases need fencing). Fencing then refuses any late write.
        """
        while True:
            now = time.monotonic()
            soonest = min((h.valid_until for h in self._held.values()), default=float("inf"))
            await asyncio.sleep(max(0.0, min(self.heartbeat_interval, soonest - now)))
            leases = self.held
            if not leases:
                continue
            started = time.monotonic()
            renewed: set[WorkflowKey] | None = None
            try:
                renewed = await asyncio.wait_for(
                    self.store.renew_leases(
                        self.instance_id, leases, self.clock() + self.lease_seconds
                    ),
                    timeout=self.heartbeat_interval,
                )
            except (StorageError, TimeoutError) as exc:
                log.warning("lease renewal failed: %s", exc or "timed out")
            except Exception:
                log.exception("lease renewal failed unexpectedly")
            now = time.monotonic()
            for wid, fence in leases.items():
                held = self._held.get(wid)
                if held is None or held.fence != fence:
                    continue
                if renewed is not None and wid in renewed:
                    held.valid_until = started + self.lease_seconds - self._lease_margin
                    continue
                if renewed is None and now < held.valid_until:
                    continue  # not confirmed, but not expired either: try again soon
                self.stats["lost_leases"] += 1
                log.warning("lease of workflow %s lost or unconfirmed; stopping its attempts", wid)
                self._held.pop(wid, None)
                held.cancel()


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


class SagaMetrics(Protocol):
    """Instrumentation the runner reports to (``sync_server.metrics.Metrics`` is one)."""

    def observe_append(self, source: str, seconds: float) -> None:
        """A transaction that appended events took ``seconds``."""

    def step_attempt(self, workflow: str, step: str, attempt: int, compensation: bool) -> None:
        """An attempt starts."""

    def workflow_finished(self, workflow: str, status: str) -> None:
        """A workflow ended or parked."""

    def breaker_changed(self, name: str, state: str) -> None:
        """A breaker changed state."""


def _json_result(result: JSON) -> JSON:
    """The result as plain JSON data whose text every backend can store (U+0000 and lone
    surrogates become U+FFFD: ``sync_server.saga.storable``).

    Raises:
        PermanentError: the result cannot be stored: not JSON-serialisable, over
            ``MAX_RESULT_BYTES`` or holding a NaN/±inf (issue 11) — the step fails
            with that reason instead of bloating every reader's log.
    """
    try:
        try:
            encoded = msgspec.json.encode(result)
        except UnicodeEncodeError:  # a lone surrogate somewhere in a string or key
            encoded = msgspec.json.encode(storable_json(result))
        check_finite(result, "step result")
        if len(encoded) > MAX_RESULT_BYTES:
            raise ValidationError(
                f"step result is {len(encoded)} bytes, over the limit of {MAX_RESULT_BYTES} bytes"
            )
    except ValidationError as exc:
        raise PermanentError(exc.message) from exc
    except (TypeError, ValueError, msgspec.EncodeError) as exc:
        raise PermanentError(f"step result is not JSON-serialisable: {exc}") from exc
    decoded = msgspec.json.decode(encoded)
    return storable_json(decoded) if b"\\u0000" in encoded else decoded


def _describe(exc: BaseException) -> str:
    """An attempt's error as storable text (``storable_text``), at most 2,000 characters."""
    try:
        text = str(exc)
    except Exception:  # a user exception whose __str__ itself fails
        text = ""
    name = type(exc).__name__
    return storable_text(f"{name}: {text}"[:2000] if text else name)
