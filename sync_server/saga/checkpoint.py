"""Apply saga inputs to stored workflows inside one transaction (the runner's writes).

Theory of operation
-------------------
The runner never writes a workflow row directly. It hands ``Checkpointer`` the inputs
that arrived for a workflow (claimed, step outcomes, progress, timer ticks); inside the
caller's transaction the checkpointer

1. re-reads the row with its lock and checks ``lease_owner`` and ``fence`` — a stale
   owner's outcome is *refused* (LESSONS: leases need fencing);
2. runs the pure ``SagaMachine`` on the row's state, checking shared circuit breakers
   for the steps about to start;
3. writes what the machine decided — events (each with the snapshot after it), dead
   letters, breaker records, the completion notice in the outbox, the row itself with
   its new ``due_at`` — and keeps the lease while attempts run, releasing it otherwise.

One transaction can hold the checkpoints of many workflows (group commit), so the
function is careful to compute before it writes: a bug in one workflow's machine skips
that workflow and never leaves half its writes in the shared transaction. ``Store.run``
may retry the whole function on a deadlock, so it keeps no state between calls except
the breaker cache it creates per call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol import StepStatus, WorkflowStatus, events
from sync_server.saga import breaker as breakers
from sync_server.saga.backoff import DelayPolicy
from sync_server.saga.definitions import Limit, Workflow
from sync_server.saga.fastpath import MemoryTransaction, NeedsLock, copy_record
from sync_server.saga.intake import WORK_CHANNEL
from sync_server.saga.limits import WAITER_TTL, LimitGate
from sync_server.saga.machine import (
    Alert,
    DeadLetter,
    EmitEvent,
    RunCompensation,
    RunStep,
    SagaMachine,
)
from sync_server.snapshots import append_event, snapshot_data
from sync_server.store.base import (
    BreakerRecord,
    DlqEntry,
    FencedWrite,
    Transaction,
    WorkflowKey,
    WorkflowRecord,
)

__all__ = ["Applied", "Checkpointer", "Input"]

log = logging.getLogger("tether.saga")
JSON = Any
UNKNOWN_DEFINITION_DELAY = 5.0
"""Seconds an instance that lacks a workflow's definition leaves it for others."""


@dataclass(slots=True)
class Input:
    """One thing that happened to a workflow, waiting for its checkpoint.

    ``kind`` is ``step`` / ``comp`` (an attempt's outcome), ``progress``, ``job`` (the
    attempt runs a job at a downstream source) or ``tick``; ``tenant`` and
    ``workflow_id`` name the workflow (ids are per tenant).
    """

    kind: str
    workflow_id: str
    fence: int
    step: str = ""
    attempt: int = 0
    ok: bool = False
    result: JSON = None
    error: str | None = None
    permanent: bool = False
    timed_out: bool = False
    fraction: float = 0.0
    message: str | None = None
    breaker: str | None = None
    job: dict[str, str] | None = None
    tenant: str = field(kw_only=True)

    @property
    def key(self) -> WorkflowKey:
        """The workflow's ``(tenant, id)``."""
        return WorkflowKey(self.tenant, self.workflow_id)


@dataclass(slots=True)
class Applied:
    """What a checkpoint decided, for the runner to act on after COMMIT."""

    key: WorkflowKey
    record: WorkflowRecord | None
    refused: bool = False
    failed: bool = False
    held: bool = False
    commands: list[RunStep | RunCompensation] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)


class _BreakerCache:
    """Rows of one transaction written back once at the end: breakers and workflows;
    and the transaction's limit gate (waiters are woken at the end)."""

    def __init__(self, tx: Transaction, gate: LimitGate) -> None:
        self.tx = tx
        self.records: dict[str, BreakerRecord] = {}
        self.dirty: set[str] = set()
        self.workflows: list[WorkflowRecord] = []
        self.gate = gate

    async def get(self, name: str) -> BreakerRecord:
        record = self.records.get(name)
        if record is None:
            record = await self.tx.get_breaker(name, lock=True) or BreakerRecord(name=name)
            self.records[name] = record
        return record

    def put(self, record: BreakerRecord) -> None:
        self.records[record.name] = record
        self.dirty.add(record.name)

    async def flush(self, now: float, *, workflows: bool = True) -> None:
        """Write the changed breakers and every processed workflow row (one batch;
        ``workflows=False`` for rows the caller inserts itself — new workflows), then
        wake the waiters of limits whose slots were freed."""
        for name in sorted(self.dirty):
            await self.tx.put_breaker(self.records[name])
        if workflows:
            await self.tx.update_workflows(self.workflows)
        if await self.gate.wake(now):
            self.tx.notify(WORK_CHANNEL, "")


class Checkpointer:
    """Runs the machine for stored workflows inside the caller's transaction.

    Args:
        workflows: definitions by (name, version); a name's last one is its current
            version (it also runs workflows stored before versions existed).
        owner: this instance's lease owner id.
        lease_seconds: lease length; every checkpoint that keeps the lease extends it.
        delay: the backoff policy fed to the machine.
        breaker_policy: the ``BreakerPolicy`` of a breaker name.
        completion_webhook: outbox destination for a notice when a workflow ends.
        limits: named limits by name (``Step(limit=...)``).
    """

    def __init__(
        self,
        workflows: Mapping[tuple[str, str], Workflow],
        owner: str,
        lease_seconds: float,
        delay: DelayPolicy,
        breaker_policy: Callable[[str], breakers.BreakerPolicy],
        completion_webhook: str | None = None,
        limits: Mapping[str, Limit] | None = None,
    ) -> None:
        self.workflows = dict(workflows)
        for workflow in workflows.values():
            # A row written before versions existed has version "": the current one runs it.
            self.workflows[(workflow.name, "")] = workflow
        self.versions = sorted(self.workflows)
        """The (name, version) pairs this instance claims."""
        self.limits = dict(limits or {})
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.delay = delay
        self.breaker_policy = breaker_policy
        self.completion_webhook = completion_webhook
        self.breaker_changes: list[tuple[str, str]] = []
        self.breaker_seen: dict[str, str] = {}
        """Breaker name -> its state as the last gate read it (a span attribute)."""

    async def claim(self, tx: Transaction, now: float, limit: int) -> list[Applied]:
        """Claim due workflows and start their ready steps, in ``tx``."""
        records = await tx.claim_due_workflows(
            self.owner, now, self.lease_seconds, limit, self.versions
        )
        cache = self._cache(tx)
        out = [await self.process(tx, record, [], now, cache, claimed=True) for record in records]
        out.extend(await self._hand_off(tx, cache, now))
        await cache.flush(now)
        return out

    async def start_new(
        self, tx: Transaction, records: list[WorkflowRecord], now: float
    ) -> list[Applied]:
        """Lease new workflows to this instance and start their first steps, in the
        transaction that submits them (the caller inserts the rows afterwards): the
        claim rides on the submit."""
        cache = self._cache(tx)
        out = []
        for record in records:
            record.lease_owner = self.owner
            record.lease_until = now + self.lease_seconds
            record.fence += 1
            out.append(await self.process(tx, record, [], now, cache, claimed=True))
        await cache.flush(now, workflows=False)
        return out

    async def compute_fenced(
        self, cached: WorkflowRecord, fence: int, inputs: list[Input], now: float
    ) -> tuple[Applied, FencedWrite, list[tuple[str, str]]] | None:
        """The checkpoint of one workflow computed from the runner's copy of its row, for
        ``Store.write_fenced``; None when it needs the locked path (a circuit breaker, a
        dead letter, the outbox, or a machine that failed)."""
        definition = self.workflows.get((cached.name, cached.workflow_version))
        if (
            definition is None
            # A limit's slots and waiters are rows of their own: the locked path.
            or any(step.breaker or step.limit for step in definition.steps.values())
            or any(item.breaker for item in inputs)
        ):
            return None
        record = copy_record(cached)
        tx = MemoryTransaction()
        try:
            applied = await self.process(tx, record, inputs, now, self._cache(tx))
        except NeedsLock:
            return None
        if applied.failed:
            return None
        return applied, tx.fenced(record, fence, cached.version), tx.notifications

    async def checkpoint(
        self,
        tx: Transaction,
        batch: Mapping[WorkflowKey, tuple[int, list[Input]]],
        now: float,
        *,
        claimed: bool = False,
    ) -> list[Applied]:
        """Record inputs of many workflows (key -> (fence, inputs)), in ``tx``.

        Each row is read with its lock (keys in sorted order, so two instances never
        deadlock on each other) and fenced: if its owner or fence differs, the inputs
        are refused.
        """
        keys = sorted(batch)
        records = await tx.get_workflows(keys, lock=True)
        cache = self._cache(tx)
        out: list[Applied] = []
        for key in keys:
            fence, inputs = batch[key]
            record = records.get(key)
            if record is None or record.lease_owner != self.owner or record.fence != fence:
                out.append(Applied(key, record, refused=True))
                continue
            out.append(await self.process(tx, record, inputs, now, cache, claimed=claimed))
        out.extend(await self._hand_off(tx, cache, now))
        await cache.flush(now)
        return out

    async def _hand_off(self, tx: Transaction, cache: _BreakerCache, now: float) -> list[Applied]:
        """Refill the slots this checkpoint freed: claim the next waiters (fair order, of
        the versions this instance runs) in the same transaction and start them — no
        wake, notification and second claim in between (issue 18: throughput equals the
        limit's capacity)."""
        out: list[Applied] = []
        for name, free in await cache.gate.take_freed(now):
            records = await tx.claim_limit_waiters(
                name,
                free,
                now,
                now - WAITER_TTL,
                self.versions,
                self.owner,
                now + self.lease_seconds,
            )
            cache.gate.chosen.update(record.key for record in records)
            for record in sorted(records, key=lambda r: r.key):
                out.append(await self.process(tx, record, [], now, cache, claimed=True))
        return out

    def _cache(self, tx: Transaction) -> _BreakerCache:
        return _BreakerCache(tx, LimitGate(tx, self.limits, self.owner))

    async def process(
        self,
        tx: Transaction,
        record: WorkflowRecord,
        inputs: list[Input],
        now: float,
        cache: _BreakerCache,
        *,
        claimed: bool = False,
    ) -> Applied:
        """Feed ``inputs`` to the machine for ``record`` and write the outcome to ``tx``."""
        definition = self.workflows.get((record.name, record.workflow_version))
        if definition is None:
            log.warning("no definition for workflow %s (%s); leaving it", record.id, record.name)
            record.lease_owner = None
            record.lease_until = None
            record.due_at = now + UNKNOWN_DEFINITION_DELAY
            cache.workflows.append(record)
            return Applied(record.key, record)
        state = _copy_state(record.state)
        retry_requested = claimed and bool((state.get("requests") or {}).get("retry"))
        machine = SagaMachine(
            definition,
            record.id,
            record.status,
            state,
            progress=record.progress,
            result=record.result,
            error=record.error,
            delay=self.delay,
            tenant=record.tenant,
        )
        try:
            # Compute everything first: nothing is written for a workflow that fails here
            # (a limit slot taken by ``_gate`` lapses with the lease if it does).
            if claimed:
                machine.receive_claim(now)
            breaker_outcomes = self._feed(machine, inputs, now)
            machine.receive_deadline(now)
            pending_breakers = await self._gate(machine, definition, cache, breaker_outcomes, now)
            await self._limit_gate(machine, definition, record, cache.gate, now)
            machine.advance(now)
            effects = machine.effects_to_apply()
        except Exception:
            log.exception("saga machine failed on workflow %s; leaving it", record.id)
            return Applied(record.key, record, failed=True)
        await _settle_limits(machine, record, cache.gate)
        if not record.workflow_version:
            record.workflow_version = definition.version
        for record_ in pending_breakers:
            cache.put(record_)
        record.status = machine.status.value
        record.state = machine.state
        record.progress = machine.progress
        record.result = machine.result
        record.error = machine.error
        record.due_at = machine.due_at
        applied = Applied(record.key, record)
        if retry_requested:
            await _resolve_dead_letters(tx, record, now)
        entry_id: int | None = None
        for effect in effects:
            if isinstance(effect, EmitEvent):
                append_event(tx, record, effect.type, now, **effect.fields)
            elif isinstance(effect, RunStep | RunCompensation):
                applied.commands.append(effect)
            elif isinstance(effect, DeadLetter):
                entry_id = await self._dead_letter(tx, record, effect, now)
            else:
                details = dict(effect.details)
                if entry_id is not None:
                    details["dlq_entry"] = entry_id
                applied.alerts.append(Alert(effect.kind, effect.message, details))
        if machine.running():
            applied.held = True
            record.lease_owner = self.owner
            record.lease_until = now + self.lease_seconds
        else:
            record.lease_owner = None
            record.lease_until = None
            if record.due_at is not None:
                tx.notify(WORK_CHANNEL, f"due:{record.due_at}")
        if machine.status.terminal and self.completion_webhook:
            notice: dict[str, JSON] = {
                "type": "workflow.finished",
                "workflow": snapshot_data(record),
            }
            if record.state.get("trace"):
                notice["traceparent"] = record.state["trace"]  # the relay's span joins it
            await tx.enqueue_outbox(
                self.completion_webhook,
                notice,
                event_seq=None,
                max_retries=8,
                at=now,
            )
        cache.workflows.append(record)
        return applied

    def _feed(
        self, machine: SagaMachine, inputs: list[Input], now: float
    ) -> list[tuple[str, bool]]:
        """Feed inputs in order; returns (breaker, succeeded) for guarded outcomes."""
        outcomes: list[tuple[str, bool]] = []
        for item in inputs:
            if item.kind == "step":
                if item.ok:
                    accepted = machine.receive_step_succeeded(
                        item.step, item.attempt, item.result, now
                    )
                else:
                    accepted = machine.receive_step_failed(
                        item.step,
                        item.attempt,
                        item.error or "failed",
                        now,
                        permanent=item.permanent,
                        timed_out=item.timed_out,
                    )
                # A permanent error is the step's verdict, not the downstream's health.
                if accepted and item.breaker and not item.permanent:
                    outcomes.append((item.breaker, item.ok))
            elif item.kind == "comp":
                if item.ok:
                    machine.receive_compensation_succeeded(item.step, item.attempt, now)
                else:
                    machine.receive_compensation_failed(
                        item.step, item.attempt, item.error or "failed", now
                    )
            elif item.kind == "progress":
                machine.receive_progress(item.step, item.attempt, item.fraction, item.message, now)
            elif item.kind == "job" and item.job is not None:
                machine.receive_job(item.step, item.attempt, item.job)
        return outcomes

    async def _gate(
        self,
        machine: SagaMachine,
        definition: Workflow,
        cache: _BreakerCache,
        outcomes: list[tuple[str, bool]],
        now: float,
    ) -> list[BreakerRecord]:
        """Record guarded outcomes on their breakers, then defer steps an open one blocks.

        Returns the changed breaker records (written only if the machine succeeds).
        """
        changed: dict[str, BreakerRecord] = {}
        for name, ok in outcomes:
            current = changed.get(name) or await cache.get(name)
            if ok:
                new, moved = breakers.record_success(current, now)
            else:
                new, moved = breakers.record_failure(current, self.breaker_policy(name), now)
            if new is not current:
                changed[name] = new
            if moved:
                self.breaker_changes.append((name, new.state))
        for step in machine.ready_steps(now):
            guard = definition.steps[step].breaker
            if guard is None:
                continue
            current = changed.get(guard) or await cache.get(guard)
            decision = breakers.allow(
                current,
                self.breaker_policy(guard),
                now,
                f"{self.owner}/{machine.tenant}/{machine.workflow_id}",
            )
            self.breaker_seen[guard] = decision.record.state
            if decision.changed:
                changed[guard] = decision.record
                self.breaker_changes.append((guard, decision.record.state))
            if not decision.allowed:
                assert decision.retry_at is not None
                machine.receive_breaker_open(step, decision.retry_at, guard, now)
        return list(changed.values())

    async def _limit_gate(
        self,
        machine: SagaMachine,
        definition: Workflow,
        record: WorkflowRecord,
        gate: LimitGate,
        now: float,
    ) -> None:
        """Admit each ready step that names a limit, or defer it as a waiter (no attempt
        used); an admitted step holds a slot (``state["steps"][step]["slot"]``)."""
        for step in machine.ready_steps(now):
            name = definition.steps[step].limit
            if name is None or name not in self.limits:
                continue
            admission = await gate.admit(name, record, step, now)
            if admission.admitted:
                machine.steps[step]["slot"] = name
            else:
                machine.receive_limit_wait(step, admission.retry_at, name, now)

    async def _dead_letter(
        self, tx: Transaction, record: WorkflowRecord, effect: DeadLetter, now: float
    ) -> int:
        entry = DlqEntry(
            id=0,
            tenant=record.tenant,
            workflow_id=record.id,
            step=effect.step,
            reason=effect.reason,
            attempts=effect.attempts,
            last_error=effect.last_error,
            created_at=now,
        )
        entry_id = await tx.add_dlq(entry)
        record.state.setdefault("dlq", []).append(entry_id)
        append_event(
            tx,
            record,
            events.DLQ_ADDED,
            now,
            entry_id=entry_id,
            step=effect.step,
            reason=effect.reason,
            attempts=effect.attempts,
            last_error=effect.last_error,
        )
        return entry_id


async def _settle_limits(machine: SagaMachine, record: WorkflowRecord, gate: LimitGate) -> None:
    """Free the slots of steps that stopped running (outcome, cancel, deadline, takeover),
    and forget the waiters of steps that no longer wait (skipped, cancelled, halted)."""
    waiting = machine.status == WorkflowStatus.RUNNING and not machine.state.get("halt")
    freed: list[str] = []
    gone: list[str] = []
    for name, s in machine.steps.items():
        if s.get("slot") and s["status"] != StepStatus.RUNNING:
            del s["slot"]
            freed.append(name)
        deferred = s.get("deferred")
        still = waiting and s["status"] in (StepStatus.WAITING, StepStatus.RETRYING)
        if isinstance(deferred, str) and deferred.startswith("limit:") and not still:
            del s["deferred"]
            gone.append(name)
    if freed:
        gate.release(record, freed)
    if gone:
        await gate.drop_waiters(record, gone)


async def _resolve_dead_letters(tx: Transaction, record: WorkflowRecord, now: float) -> None:
    """A retry re-runs what the open dead letters of this workflow describe: close them."""
    for entry_id in record.state.pop("dlq", None) or []:
        entry = await tx.get_dlq(int(entry_id), lock=True)
        if entry is not None and entry.status == "open":
            entry.status = "resolved"
            entry.resolved_at = now
            await tx.update_dlq(entry)


def _copy_state(state: JSON) -> dict[str, JSON]:
    """A copy deep enough for the machine to mutate (steps are one level down)."""
    if not isinstance(state, dict):
        return {}
    copy = dict(state)
    steps = state.get("steps") or {}
    copy["steps"] = {name: dict(s) for name, s in steps.items()}
    if "requests" in state:
        copy["requests"] = dict(state["requests"])
    if "dlq" in state:
        copy["dlq"] = list(state["dlq"])
    return copy
