"""The periodic reconciliation sweep: ask the job source, repair divergence.

Every ``rules.interval`` seconds the sweep lists running workflows, and in each every
running or retrying step that runs a job — the step recorded it when it called its
adapter (``StepContext.record_job``; the step state's ``job``), or it is the step named
in ``rules.job_steps`` — asks the recorded ``SourceAdapter`` about that job (by the
step's idempotency key) and turns the answer into a report of the source
(``rules.apply_report`` decides and repairs in one transaction, under the row lock):

* the source says *completed* while the saga still waits: the lost completion is
  applied (``complete``);
* the source says *failed* while the step still runs, for longer than ``rules.grace``:
  the report is honoured by the canonical rule — the attempt fails (``fail``);
* the source has *never heard of* the job of a running step for longer than
  ``rules.grace``, or has been *running it for longer than* ``rules.horizon`` (a dead
  worker): the step re-runs with the same idempotency key (``resubmit``), and its
  adapter attaches to, or replaces, the job.

Every repair is a ``workflow.reconciled`` event and a metric (``on_repair``); a
divergence that no repair can fix, or a sweep that fails, raises an alert. Several
instances may sweep at once: the decision is re-made under the row lock, and a repair
already queued is not queued twice (``pending_repair``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from protocol import (
    ReportStateArgs,
    Source,
    StepStatus,
    TetherError,
    ValidationError,
    WorkflowStatus,
)
from protocol.limits import MAX_RESULT_BYTES, check_payload
from sync_server.reconcile.rules import (
    ReconcileRules,
    Repair,
    apply_repair,
    apply_report,
    pending_repair,
)
from sync_server.reconcile.sources import JobState, SourceAdapter
from sync_server.saga.alerts import Alerts
from sync_server.saga.machine import idempotency_key
from sync_server.saga.sagastate import step_wire, steps_wire
from sync_server.saga.storable import storable_json, storable_text
from sync_server.service import PeriodicService
from sync_server.store.base import Store, Transaction, WorkflowKey, WorkflowRecord

__all__ = ["Reconciler"]

log = logging.getLogger("tether.reconcile")

RepairCallback = Callable[[Repair, str], None]
"""Called with the repair and the workflow id after a repair committed."""


class Reconciler(PeriodicService):
    """Runs the sweep on one instance.

    Args:
        store: the event store.
        rules: the canonical rule and sweep settings.
        sources: the job sources to ask.
        alerts: where failed reconciliations are reported.
        on_repair: called after each committed repair (metrics).
        clock: wall clock.
    """

    def __init__(
        self,
        store: Store,
        rules: ReconcileRules,
        sources: Iterable[SourceAdapter],
        *,
        alerts: Alerts,
        on_repair: RepairCallback | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name="tether-reconcile", interval=rules.interval, tick_first=False)
        self.store = store
        self.rules = rules
        self.sources = list(sources)
        self.alerts = alerts
        self.on_repair = on_repair
        self.clock = clock
        self.repairs = 0
        self.sweeps = 0
        self._since: dict[tuple[str, str, str, int, str], float] = {}
        self._stuck: set[tuple[str, str, str, int, str]] = set()
        """Stuck jobs already re-run (one repair per job); forgotten once the workflow
        is no longer running, so the set is bounded by the running workflows."""

    async def start(self) -> None:
        """Start sweeping every ``rules.interval`` seconds (nothing to ask: no sweep)."""
        if self.sources:
            await super().start()

    async def tick(self) -> None:
        """One sweep; the service base runs it every ``rules.interval`` seconds."""
        await self.sweep_once()

    def tick_failed(self, exc: Exception) -> None:
        """A failed sweep is logged and alerted; the next one is tried later."""
        log.error("reconciliation sweep failed", exc_info=exc)
        self.alerts.alert("reconciliation_failed", f"reconciliation sweep failed: {exc}", {})

    def job_steps(self, record: WorkflowRecord) -> list[tuple[str, list[SourceAdapter]]]:
        """The running or retrying steps of ``record`` that run a job, with the sources
        to ask: those the step recorded (``StepContext.record_job``), else every source
        for the step named in ``rules.job_steps``."""
        fallback = self.rules.job_steps.get(record.name)
        out: list[tuple[str, list[SourceAdapter]]] = []
        for name, state in steps_wire(record.state).items():
            if state.get("status") not in (StepStatus.RUNNING, StepStatus.RETRYING):
                continue
            job = state.get("job")
            if isinstance(job, dict):
                sources = self._sources_for(job)
            elif name == fallback:
                sources = self.sources
            else:
                continue
            if sources and not pending_repair(record, name):
                out.append((name, sources))
        return out

    def _sources_for(self, job: dict[str, Any]) -> list[SourceAdapter]:
        named = [s for s in self.sources if getattr(s, "name", s.source) == job.get("adapter")]
        return named or [s for s in self.sources if s.source == job.get("source")]

    async def sweep_once(self) -> int:
        """One pass over the running workflows; returns the repairs made."""
        self.sweeps += 1
        made = 0
        seen: set[tuple[str, str, str, int, str]] = set()
        records = await self.store.list_workflows(
            statuses=[WorkflowStatus.RUNNING.value], limit=10_000
        )
        for record in records:
            for step, sources in self.job_steps(record):
                state = step_wire(record.state, step)
                key = idempotency_key(record.id, step, tenant=record.tenant)
                for source in sources:
                    try:
                        job = await source.job_status(record, step, key)
                    except Exception as exc:  # a source that is down is not divergence
                        log.warning("job source %s failed for %s: %s", source.source, key, exc)
                        continue
                    attempt = int(state.get("attempts", 0))
                    made += await self._compare(record, step, attempt, source.source, job, seen)
        # Forget the timers of attempts that are no longer seen.
        for stale in set(self._since) - seen:
            del self._since[stale]
        running = {(record.tenant, record.id) for record in records}
        self._stuck = {marker for marker in self._stuck if marker[:2] in running}
        return made

    def _lasted(self, marker: tuple[str, str, str, int, str], now: float, seen: set[Any]) -> bool:
        """True once ``marker`` has been seen for longer than ``rules.grace``."""
        seen.add(marker)
        first = self._since.setdefault(marker, now)
        if now - first < self.rules.grace:
            return False
        del self._since[marker]
        return True

    async def _compare(
        self,
        record: WorkflowRecord,
        step: str,
        attempt: int,
        source: str,
        job: JobState,
        seen: set[tuple[str, str, str, int, str]],
    ) -> int:
        now = self.clock()
        running = step_wire(record.state, step).get("status") == StepStatus.RUNNING
        if job.status == "completed":
            try:  # the same cap as a step's own result (issue 11)
                result = storable_json(job.result)
                check_payload(result, f"the result of job {step}", MAX_RESULT_BYTES)
            except ValidationError as exc:
                self.alerts.alert(
                    "reconciliation_failed",
                    f"cannot complete {record.id} from {source}: {exc.message}",
                    {"workflow_id": record.id, "step": step},
                )
                return 0  # the step's own attempt meets the cap and fails with the reason
            args = ReportStateArgs(
                workflow_id=record.id,
                source=Source(source),
                status=WorkflowStatus.COMPLETED,
                at=job.at or now,
                # A downstream's text must be storable on every backend (issue 11).
                detail={"step": step, "result": result, "observed_by": "sweep"},
            )
            return await self._report(record.key, args)
        if job.status == "failed" and running:
            # Honoured by the canonical rule (the job source outranks the saga record),
            # once it has lasted ``grace``: the attempt may be about to report it itself.
            if not self._lasted((record.tenant, record.id, step, attempt, "failed"), now, seen):
                return 0
            args = ReportStateArgs(
                workflow_id=record.id,
                source=Source(source),
                status=WorkflowStatus.FAILED,
                at=job.at or now,
                detail={
                    "step": step,
                    "attempt": attempt,
                    "error": storable_text(job.error or "failed"),
                    "observed_by": "sweep",
                },
            )
            return await self._report(record.key, args)
        if job.status == "unknown" and running:
            if not self._lasted((record.tenant, record.id, step, attempt, "unknown"), now, seen):
                return 0
            why = "never heard of the job"
            return await self._resubmit(record.key, step, attempt, source, why)
        if job.status == "running" and running and job.since is not None:
            marker = (record.tenant, record.id, step, attempt, f"stuck:{job.since}")
            if now - job.since <= self.rules.horizon or marker in self._stuck:
                return 0
            self._stuck.add(marker)
            why = f"has run the job for {now - job.since:.0f} s (horizon {self.rules.horizon} s)"
            return await self._resubmit(record.key, step, attempt, source, why)
        return 0

    async def _report(self, key: WorkflowKey, args: ReportStateArgs) -> int:
        now = self.clock()

        async def unit(tx: Transaction) -> Repair | None:
            record = await tx.get_workflow(key.tenant, key.id, lock=True)
            if record is None or record.status != WorkflowStatus.RUNNING:
                # Things moved on since the sweep looked (the saga saw the completion
                # itself): a report on an ended workflow would only add a stale event.
                return None
            repair = apply_report(tx, record, args, now, self.rules)
            await tx.update_workflow(record)
            return repair

        return self._after(await self._run(unit), key)

    async def _resubmit(
        self, key: WorkflowKey, step: str, attempt: int, source: str, why: str
    ) -> int:
        now = self.clock()

        async def unit(tx: Transaction) -> Repair | None:
            record = await tx.get_workflow(key.tenant, key.id, lock=True)
            if record is None:
                return None
            current = step_wire(record.state, step)
            if (
                record.status != WorkflowStatus.RUNNING
                or current.get("status") != StepStatus.RUNNING
                or int(current.get("attempts", 0)) != attempt
                or pending_repair(record, step)
            ):
                return None  # things moved on since the sweep looked
            repair = Repair(
                "resubmit",
                source,
                f"{source} {why} of {step} (attempt {attempt}); re-run with the same "
                "idempotency key",
                step,
            )
            apply_repair(tx, record, repair, now)
            await tx.update_workflow(record)
            return repair

        return self._after(await self._run(unit), key)

    async def _run(self, unit: Callable[[Transaction], Awaitable[Repair | None]]) -> Repair | None:
        try:
            return await self.store.run(unit)
        except TetherError as exc:
            self.alerts.alert("reconciliation_failed", f"repair failed: {exc.message}", {})
            return None

    def _after(self, repair: Repair | None, key: WorkflowKey) -> int:
        workflow_id = key.id
        if repair is None or repair.kind == "none":
            return 0
        if repair.kind == "unappliable":
            self.alerts.alert(
                "reconciliation_failed",
                f"workflow {workflow_id}: {repair.reason}",
                {"tenant": key.tenant, "workflow_id": workflow_id, "source": repair.source},
            )
            return 0
        self.repairs += 1
        log.info("reconciled %s: %s (%s)", workflow_id, repair.kind, repair.reason)
        if self.on_repair is not None:
            self.on_repair(repair, workflow_id)
        return 1
