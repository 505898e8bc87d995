"""The canonical rule, as data, and the pure decisions built on it.

Theory of operation
-------------------
Several sources report a workflow's state: ``job-queue`` (the downstream executor),
``open-api`` (this server's own saga record) and ``mini-app`` (the SDK's view). The
rule (SPEC, Reconciliation): the source ranked higher in ``ReconcileRules.priority``
wins; within one source the report with the latest timestamp wins. The saga record
itself always speaks for ``open-api`` at its ``updated_at``.

``apply_report`` keeps the newest report per source in ``state["reports"]`` (an older
report from the same source changes nothing), then ``decide`` compares the canonical
state with the saga record and names the repair:

* ``complete`` — a higher source says the job step completed while the saga still runs
  or retries it (a lost completion callback): record its result as the step's outcome;
* ``resubmit`` — the job source never heard of a job the saga is running (a lost job),
  or has run it for longer than ``horizon`` (a dead worker): run the step again now
  with the same idempotency key;
* ``fail`` — a higher source says the job of a running step failed (the failure never
  reached the attempt): the attempt fails and the step retries by its policy;
* ``cancel`` — a higher source says cancelled: cancel and compensate;
* ``correct`` — a lower source (the mini-app) diverges from the canonical state: send
  it the canonical snapshot in a ``workflow.reconciled`` event;
* ``unappliable`` — a higher source disagrees in a way no repair can express (e.g. a
  job completed for a workflow already compensating): alert a human.

Everything here is pure; ``sync_server.reconcile.sweep`` and the report endpoints apply
the decisions inside a transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol import ReportStateArgs, Source, StepStatus, WorkflowStatus, events
from sync_server.saga import intake
from sync_server.saga.sagastate import pending_repairs, step_wire
from sync_server.snapshots import append_event
from sync_server.store.base import Transaction, WorkflowRecord

__all__ = [
    "DEFAULT_PRIORITY",
    "ReconcileRules",
    "Repair",
    "apply_repair",
    "apply_report",
    "decide",
    "pending_repair",
]

DEFAULT_PRIORITY = (Source.JOB_QUEUE.value, Source.OPEN_API.value, Source.MINI_APP.value)
_ACTIVE_STEP = (StepStatus.RUNNING.value, StepStatus.RETRYING.value)


@dataclass(frozen=True, slots=True)
class ReconcileRules:
    """The canonical rule and the sweep's settings; operators change them as data.

    Attributes:
        priority: sources, highest first (env ``SYNC_SOURCE_PRIORITY``, comma-separated).
        job_steps: workflow name -> the step whose job runs at the job source.
        interval: seconds between sweeps.
        grace: seconds a job may stay unknown (or failed while its step still runs) at
            its source before it counts as lost (or failed).
        horizon: seconds a job may run at its source before the step is re-run as stuck.
    """

    priority: tuple[str, ...] = DEFAULT_PRIORITY
    job_steps: Mapping[str, str] = field(default_factory=dict)
    interval: float = 5.0
    grace: float = 2.0
    horizon: float = 900.0

    def __post_init__(self) -> None:
        unknown = set(self.priority) - {s.value for s in Source}
        if unknown or len(set(self.priority)) != len(self.priority):
            raise ValueError(f"bad source priority {self.priority!r}")

    @classmethod
    def parse_priority(cls, text: str) -> tuple[str, ...]:
        """``"job-queue,open-api,mini-app"`` -> a priority tuple (validated)."""
        priority = tuple(part.strip() for part in text.split(",") if part.strip())
        cls(priority=priority)
        return priority

    def rank(self, source: str) -> int:
        """Lower is stronger; unknown sources rank last."""
        try:
            return self.priority.index(source)
        except ValueError:
            return len(self.priority)


@dataclass(frozen=True, slots=True)
class Repair:
    """What reconciliation decided for one workflow."""

    kind: str  # complete | resubmit | cancel | correct | unappliable | none
    source: str
    reason: str
    step: str | None = None
    result: Any = None


NONE = Repair("none", "", "sources agree")


def _job_step(
    record: WorkflowRecord, rules: ReconcileRules, detail: Mapping[str, Any]
) -> str | None:
    step = detail.get("step") if isinstance(detail.get("step"), str) else None
    return step or rules.job_steps.get(record.name)


def pending_repair(record: WorkflowRecord, step: str) -> bool:
    """True while a repair of ``step`` waits for the next claim to apply it."""
    return step in pending_repairs(record.state)


def decide(record: WorkflowRecord, rules: ReconcileRules) -> Repair:
    """Compare the canonical state of ``record``'s reports with its saga record.

    Returns:
        The repair to apply (``kind == "none"`` when the sources agree).
    """
    reports: dict[str, dict[str, Any]] = record.state.get("reports") or {}
    candidates = {source: report for source, report in reports.items() if source != Source.OPEN_API}
    server = record.status
    strongest = min(candidates, key=rules.rank, default=None)
    if strongest is None:
        return NONE
    report = candidates[strongest]
    status = report["status"]
    if rules.rank(strongest) > rules.rank(Source.OPEN_API.value):
        # The saga record is canonical: a weaker source that diverges gets corrected.
        if status != server and not report.get("corrected"):
            return Repair("correct", strongest, f"{strongest} saw {status}, server says {server}")
        return NONE
    if status == server:
        return NONE
    detail = report.get("detail") or {}
    if status == WorkflowStatus.COMPLETED.value:
        step = _job_step(record, rules, detail)
        state = step_wire(record.state, step).get("status") if step else None
        if step and (state == StepStatus.SUCCEEDED.value or pending_repair(record, step)):
            return NONE  # the job step has (or is getting) its result; the rest is the saga's
        if step and server == WorkflowStatus.RUNNING.value and state in _ACTIVE_STEP:
            return Repair(
                "complete",
                strongest,
                f"{strongest} says the job of {step} completed; its callback was lost",
                step,
                detail.get("result"),
            )
    elif status == WorkflowStatus.FAILED.value and server == WorkflowStatus.RUNNING.value:
        # The job source outranks the saga record: its job failed, so the attempt did.
        step = _job_step(record, rules, detail)
        state = step_wire(record.state, step).get("status") if step else None
        if not step or state != StepStatus.RUNNING.value or pending_repair(record, step):
            return NONE  # the saga already knows (retrying, done) or is being repaired
        attempts = step_wire(record.state, step).get("attempts")
        if detail.get("attempt") is not None and detail.get("attempt") != attempts:
            return NONE  # a failure of an earlier attempt, already counted
        error = detail.get("error") if isinstance(detail.get("error"), str) else "failed"
        return Repair("fail", strongest, f"{strongest} says the job of {step} failed", step, error)
    elif status == WorkflowStatus.CANCELLED.value and not WorkflowStatus(server).terminal:
        return Repair("cancel", strongest, f"{strongest} says cancelled")
    elif status in (WorkflowStatus.RUNNING.value, WorkflowStatus.PENDING.value):
        return NONE  # still in progress there: nothing to repair yet
    return Repair(
        "unappliable",
        strongest,
        f"{strongest} says {status} but the workflow is {server}; no repair applies",
    )


def apply_report(
    tx: Transaction,
    record: WorkflowRecord,
    args: ReportStateArgs,
    now: float,
    rules: ReconcileRules,
    *,
    on_repair: Callable[[Repair, str], None] | None = None,
) -> Repair:
    """Store a source's report on ``record`` and apply the repair it calls for.

    The caller writes ``record`` afterwards, in the same transaction.

    Returns:
        The repair applied (``kind`` ``none`` if the report is stale or changes nothing).
    """
    reports = record.state.setdefault("reports", {})
    source = args.source.value
    previous = reports.get(source)
    if previous is not None and previous["at"] > args.at:
        return NONE  # within one source, the latest timestamp wins
    reports[source] = {"status": args.status.value, "at": args.at, "detail": args.detail}
    append_event(
        tx,
        record,
        events.WORKFLOW_REPORTED,
        now,
        source=source,
        status=args.status.value,
        at=args.at,
        detail=args.detail,
    )
    repair = decide(record, rules)
    apply_repair(tx, record, repair, now)
    if on_repair is not None and repair.kind != "none":
        on_repair(repair, record.id)
    return repair


def apply_repair(tx: Transaction, record: WorkflowRecord, repair: Repair, now: float) -> None:
    """Apply a decided repair to ``record`` inside ``tx`` (the caller writes the record)."""
    if repair.kind in ("complete", "resubmit", "fail"):
        assert repair.step is not None
        intake.request_reconcile(
            tx,
            record,
            now,
            repair=repair.kind,
            step=repair.step,
            result=repair.result,
            source=repair.source,
            reason=repair.reason,
        )
    elif repair.kind == "cancel":
        intake.request_cancel(tx, record, now, f"reconcile:{repair.source}")
    elif repair.kind == "correct":
        report = record.state["reports"][repair.source]
        report["corrected"] = True
        append_event(
            tx,
            record,
            events.WORKFLOW_RECONCILED,
            now,
            repair="correct",
            source=repair.source,
            reason=repair.reason,
            before={"status": report["status"]},
            after={"status": record.status},
        )
