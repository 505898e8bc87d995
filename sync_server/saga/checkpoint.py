"""Apply saga inputs to stored workflows inside one transaction (the runner's writes).

Theory of operation
-------------------
The runner never writes a workflow row directly. It hands ``Checkpointer`` the inputs
that arrived for a workflow (claimed, step outcomes, progress, timer ticks); inside the
caller's transaction a checkpoint is **read → decide → write**:

1. **read** — each row with its lock, checking ``lease_owner`` and ``fence`` (a stale
   owner's outcome is *refused*; LESSONS: leases need fencing); the machine is fed
   (``decide.prepare``, pure) and the circuit breakers the batch needs are read with
   their locks, in name order;
2. **decide** — pure code (``decide``): the breakers record outcomes and gate the steps
   about to start; limits admit them (a slot is taken under the limit row's lock, so
   that one read is its own write); the machine advances and yields its effects;
3. **write** — events (each with the snapshot after it), dead letters, breaker
   records, the completion notice in the outbox, the row itself with its new
   ``due_at``, keeping the lease while attempts run and releasing it otherwise.

One transaction can hold the checkpoints of many workflows (group commit): a workflow
whose decision fails is skipped whole and never leaves half its writes in the shared
transaction. ``Store.run`` may run the whole function again after a deadlock, so it
keeps no state between calls (``_Batch`` is made per call) and nothing is *reported*
from inside it: breaker transitions travel in ``Applied.breaker_changes`` with the
commit's result, and the runner reports them (log, metric, alert) once ``Store.run``
has returned — once per change, and never for a commit that failed.

A plain checkpoint (no breaker, limit, dead letter or outbox) is computed from the
runner's own copy of the row instead (``compute_fenced``, ``fastpath``) and written by
one fenced statement, without the locked read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from protocol import events
from protocol.jsontypes import JSON
from sync_server.saga import breaker as breakers
from sync_server.saga.backoff import DelayPolicy
from sync_server.saga.decide import BreakerChange, BreakerGate, Draft, Input, prepare, settle_limits
from sync_server.saga.definitions import Limit, Workflow
from sync_server.saga.fastpath import MemoryTransaction, NeedsLock, copy_record
from sync_server.saga.intake import WORK_CHANNEL
from sync_server.saga.limits import WAITER_TTL, Admission, LimitGate
from sync_server.saga.machine import (
    Alert,
    DeadLetter,
    Effect,
    EmitEvent,
    ResolveDeadLetters,
    RunCompensation,
    RunStep,
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

__all__ = ["Applied", "BreakerChange", "Checkpointer", "Input"]

log = logging.getLogger("tether.saga")
UNKNOWN_DEFINITION_DELAY = 5.0
"""Seconds an instance that lacks a workflow's definition leaves it for others."""


@dataclass(slots=True)
class Applied:
    """What a checkpoint decided, for the runner to act on after COMMIT.

    ``breaker_changes`` are the breaker transitions this checkpoint wrote; the runner
    reports them only once the transaction committed.
    """

    key: WorkflowKey
    record: WorkflowRecord | None
    refused: bool = False
    failed: bool = False
    held: bool = False
    commands: list[RunStep | RunCompensation] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    breaker_changes: list[BreakerChange] = field(default_factory=list)
    breakers_seen: dict[str, str] = field(default_factory=dict)
    """Breaker name -> its state as this checkpoint's gate read it (a span attribute)."""


class _Batch:
    """What the checkpoints of one transaction share: the breaker records read so far
    (with the changes of the workflows decided so far), the workflow rows to write back
    at the end, and the transaction's limit gate (waiters are woken at the end). Made
    anew for every call, so a transaction that ``Store.run`` retries starts clean."""

    def __init__(self, tx: Transaction, gate: LimitGate) -> None:
        self.tx = tx
        self.breakers: dict[str, BreakerRecord] = {}
        self.dirty: set[str] = set()
        self.workflows: list[WorkflowRecord] = []
        self.gate = gate

    async def read_breakers(self, names: set[str]) -> None:
        """Read (and lock) the breakers not read yet, in name order: two instances
        lock shared breakers in the same order."""
        for name in sorted(names - self.breakers.keys()):
            found = await self.tx.get_breaker(name, lock=True)
            self.breakers[name] = found or BreakerRecord(name=name)

    def put(self, records: dict[str, BreakerRecord]) -> None:
        self.breakers.update(records)
        self.dirty.update(records)

    async def flush(self, now: float, *, workflows: bool = True) -> None:
        """Write the changed breakers and every processed workflow row (one batch;
        ``workflows=False`` for rows the caller inserts itself — new workflows), then
        wake the waiters of limits whose slots were freed."""
        for name in sorted(self.dirty):
            await self.tx.put_breaker(self.breakers[name])
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
        self.breaker_seen: dict[str, str] = {}
        """Breaker name -> its state as the last committed gate read it (a span
        attribute); updated by the runner after COMMIT from ``Applied.breakers_seen``."""

    async def claim(self, tx: Transaction, now: float, limit: int) -> list[Applied]:
        """Claim due workflows and start their ready steps, in ``tx``."""
        records = await tx.claim_due_workflows(
            self.owner, now, self.lease_seconds, limit, self.versions
        )
        batch = self._batch(tx)
        out = await self._apply(batch, [(record, []) for record in records], now, claimed=True)
        out.extend(await self._hand_off(batch, now))
        await batch.flush(now)
        return out

    async def start_new(
        self, tx: Transaction, records: list[WorkflowRecord], now: float
    ) -> list[Applied]:
        """Lease new workflows to this instance and start their first steps, in the
        transaction that submits them (the caller inserts the rows afterwards): the
        claim rides on the submit."""
        batch = self._batch(tx)
        for record in records:
            record.lease_owner = self.owner
            record.lease_until = now + self.lease_seconds
            record.fence += 1
        out = await self._apply(batch, [(record, []) for record in records], now, claimed=True)
        await batch.flush(now, workflows=False)
        return out

    async def compute_fenced(
        self, cached: WorkflowRecord, fence: int, inputs: list[Input], now: float
    ) -> tuple[Applied, FencedWrite, list[tuple[str, str]]] | None:
        """The checkpoint of one workflow computed from the runner's copy of its row, for
        ``Store.write_fenced``; None when it needs the locked path (a circuit breaker, a
        limit, a dead letter, the outbox, or a machine that failed)."""
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
            [applied] = await self._apply(self._batch(tx), [(record, inputs)], now)
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
        shared = self._batch(tx)
        refused: dict[WorkflowKey, Applied] = {}
        items: list[tuple[WorkflowRecord, list[Input]]] = []
        for key in keys:
            fence, inputs = batch[key]
            record = records.get(key)
            if record is None or record.lease_owner != self.owner or record.fence != fence:
                refused[key] = Applied(key, record, refused=True)
            else:
                items.append((record, inputs))
        applied = {a.key: a for a in await self._apply(shared, items, now, claimed=claimed)}
        out = [refused.get(key) or applied[key] for key in keys]
        out.extend(await self._hand_off(shared, now))
        await shared.flush(now)
        return out

    async def _hand_off(self, batch: _Batch, now: float) -> list[Applied]:
        """Refill the slots this checkpoint freed: claim the next waiters (fair order, of
        the versions this instance runs) in the same transaction and start them — no
        wake, notification and second claim in between (issue 18: throughput equals the
        limit's capacity)."""
        out: list[Applied] = []
        for name, free in await batch.gate.take_freed(now):
            records = await batch.tx.claim_limit_waiters(
                name,
                free,
                now,
                now - WAITER_TTL,
                self.versions,
                self.owner,
                now + self.lease_seconds,
            )
            batch.gate.chosen.update(record.key for record in records)
            items: list[tuple[WorkflowRecord, list[Input]]] = [
                (record, []) for record in sorted(records, key=lambda r: r.key)
            ]
            out.extend(await self._apply(batch, items, now, claimed=True))
        return out

    def _batch(self, tx: Transaction) -> _Batch:
        return _Batch(tx, LimitGate(tx, self.limits, self.owner))

    async def _apply(
        self,
        batch: _Batch,
        items: list[tuple[WorkflowRecord, list[Input]]],
        now: float,
        *,
        claimed: bool = False,
    ) -> list[Applied]:
        """Read → decide → write for ``items`` (rows already read, with their inputs).

        Every machine is fed first (pure), then the breakers all of them need are read
        in one pass, then each workflow is decided and written in turn (a later one sees
        the breaker records an earlier one changed).
        """
        drafts = [self._prepare(record, inputs, now, claimed) for record, inputs in items]
        needed: set[str] = set()
        for i, draft in enumerate(drafts):
            if isinstance(draft, Draft):
                try:
                    needed |= draft.breakers_needed(now)
                except Exception:
                    drafts[i] = self._failed(items[i][0])
        if needed:
            await batch.read_breakers(needed)
        out: list[Applied] = []
        for (record, _), draft in zip(items, drafts, strict=True):
            if draft is None:
                out.append(self._leave(batch, record, now))
            elif isinstance(draft, Applied):
                out.append(draft)
            else:
                out.append(await self._decide_and_write(batch, record, draft, now))
        return out

    def _prepare(
        self, record: WorkflowRecord, inputs: list[Input], now: float, claimed: bool
    ) -> Draft | Applied | None:
        """The fed machine of ``record``; None without a definition; a failed
        ``Applied`` if the machine fails."""
        definition = self.workflows.get((record.name, record.workflow_version))
        if definition is None:
            return None
        try:
            return prepare(definition, record, inputs, now, self.delay, claimed=claimed)
        except Exception:
            return self._failed(record)

    @staticmethod
    def _failed(record: WorkflowRecord) -> Applied:
        """The machine failed on ``record`` (a bug): nothing is written for it."""
        log.exception("saga machine failed on workflow %s; leaving it", record.id)
        return Applied(record.key, record, failed=True)

    def _leave(self, batch: _Batch, record: WorkflowRecord, now: float) -> Applied:
        """This instance lacks the workflow's definition: let it go, for others."""
        log.warning("no definition for workflow %s (%s); leaving it", record.id, record.name)
        record.lease_owner = None
        record.lease_until = None
        record.due_at = now + UNKNOWN_DEFINITION_DELAY
        batch.workflows.append(record)
        return Applied(record.key, record)

    async def _decide_and_write(
        self, batch: _Batch, record: WorkflowRecord, draft: Draft, now: float
    ) -> Applied:
        """Decide (breakers, limits, the machine's advance), then write the outcome.

        Nothing is written for a workflow whose machine fails here (a limit slot already
        taken lapses with the lease if it does).
        """
        try:
            gate = draft.gate_breakers(batch.breakers, self.breaker_policy, self.owner, now)
            wanted = draft.steps_to_admit(self.limits, now)
        except Exception:
            return self._failed(record)
        admissions: dict[str, tuple[str, Admission]] = {}
        for step, name in wanted:
            admissions[step] = (name, await batch.gate.admit(name, record, step, now))
        try:
            effects = draft.finish(admissions, now)
        except Exception:
            return self._failed(record)
        return await self._write(batch, record, draft, gate, effects, now)

    async def _write(
        self,
        batch: _Batch,
        record: WorkflowRecord,
        draft: Draft,
        gate: BreakerGate,
        effects: list[Effect],
        now: float,
    ) -> Applied:
        """Write what was decided for ``record`` into the batch's transaction."""
        tx = batch.tx
        machine = draft.machine
        freed, gone = settle_limits(machine)
        if freed:
            batch.gate.release(record, freed)
        if gone:
            await batch.gate.drop_waiters(record, gone)
        if not record.workflow_version:
            record.workflow_version = draft.definition.version
        batch.put(gate.records)
        record.status = machine.status.value
        record.state = machine.encoded_state()
        record.progress = machine.progress
        record.result = machine.result
        record.error = machine.error
        record.due_at = machine.due_at
        applied = Applied(record.key, record, breaker_changes=gate.changes, breakers_seen=gate.seen)
        entry_id: int | None = None
        for effect in effects:
            if isinstance(effect, EmitEvent):
                append_event(tx, record, effect.type, now, **effect.fields)
            elif isinstance(effect, RunStep | RunCompensation):
                applied.commands.append(effect)
            elif isinstance(effect, ResolveDeadLetters):
                await _resolve_dead_letters(tx, effect.entries, now)
            elif isinstance(effect, DeadLetter):
                entry_id = await _dead_letter(tx, record, effect, now)
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
            if machine.state.trace:
                notice["traceparent"] = machine.state.trace  # the relay's span joins it
            await tx.enqueue_outbox(
                self.completion_webhook,
                notice,
                event_seq=None,
                max_retries=8,
                at=now,
            )
        batch.workflows.append(record)
        return applied


async def _dead_letter(
    tx: Transaction, record: WorkflowRecord, effect: DeadLetter, now: float
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


async def _resolve_dead_letters(tx: Transaction, entries: tuple[int, ...], now: float) -> None:
    """Close the dead letters ``entries`` that are still open (``ResolveDeadLetters``)."""
    for entry_id in entries:
        entry = await tx.get_dlq(int(entry_id), lock=True)
        if entry is not None and entry.status == "open":
            entry.status = "resolved"
            entry.resolved_at = now
            await tx.update_dlq(entry)
