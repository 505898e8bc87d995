"""How client and admin requests enter the saga engine, inside the caller's transaction.

Theory of operation
-------------------
These functions are the seam with ``sync_server.domain`` (the push transaction) and the
admin DLQ endpoint. Each mutates ``record`` (status, state, due_at, lease) and appends
events through ``sync_server.snapshots.append_event``; the caller writes the record
afterwards (insert for a submit, update otherwise), so the request and its effect commit
together (SPEC promise 1). They are synchronous and free of I/O.

* ``start_workflow`` runs the machine's ``submit``: every step waiting, due at once; the
  definition's version is recorded with the workflow (rolling deploys).
* ``request_upgrade`` moves a workflow to another version of its definition (admin).
* ``request_cancel`` and ``request_retry`` (and ``requeue_dlq``, and the
  reconciliation's ``request_reconcile``) only *record* the request as typed
  ``sagastate.Requests`` in the state and make the workflow due now; the instance that
  claims it next applies the request through the machine (``receive_claim``), where the
  definition and the running attempts are known. Which steps a retry re-runs is the
  machine's ``retry_targets`` (the same answer the claim then carries out). A cancel
  also *revokes the lease* (owner cleared, fence + 1): the instance running the
  workflow can then no longer write an outcome (fencing), and any instance — usually
  at once, woken by the ``work`` notification — claims it and compensates.
"""

from __future__ import annotations

import msgspec
from msgspec.structs import replace

from protocol import Conflict, StepStatus, WorkflowStatus, events
from sync_server.saga.definitions import Workflow
from sync_server.saga.machine import MAX_JOB_ERROR, SagaMachine, initial_state, retry_targets
from sync_server.saga.sagastate import (
    FailRepair,
    ReconcileRepair,
    decode_state,
    encode_state,
    requested,
    step_wire,
    steps_wire,
    store_requests,
)
from sync_server.snapshots import append_event
from sync_server.store.base import DlqEntry, Transaction, WorkflowKey, WorkflowRecord

__all__ = [
    "WORK_CHANNEL",
    "parse_revoke",
    "request_cancel",
    "request_reconcile",
    "request_retry",
    "request_upgrade",
    "requeue_dlq",
    "revoke_payload",
    "start_workflow",
]

WORK_CHANNEL = "work"
"""Notification channel telling runners to look for due workflows.

Payloads: ``""`` (look now), ``"due:<unix time>"`` (something becomes due then),
``"revoke:<JSON [tenant, workflow id]>"`` (the lease of that workflow was taken away),
``"cancel:<JSON [tenant, workflow id]>"`` (taken away because the workflow is
cancelled); see ``revoke_payload`` and ``parse_revoke``.
"""


def revoke_payload(key: WorkflowKey, kind: str = "revoke") -> str:
    """The ``WORK_CHANNEL`` payload saying the lease of ``key`` was taken away
    (``kind`` ``revoke``, or ``cancel`` when the workflow is cancelled)."""
    return f"{kind}:" + msgspec.json.encode([key.tenant, key.id]).decode()


def parse_revoke(payload: str) -> tuple[str, WorkflowKey] | None:
    """(kind, workflow key) of a ``revoke:`` or ``cancel:`` payload; None otherwise."""
    kind, _, body = payload.partition(":")
    if kind not in ("revoke", "cancel"):
        return None
    try:
        tenant, workflow_id = msgspec.json.decode(body, type=tuple[str, str])
    except msgspec.DecodeError:
        return None
    return kind, WorkflowKey(tenant, workflow_id)


def start_workflow(
    tx: Transaction,
    record: WorkflowRecord,
    definition: Workflow,
    now: float,
    client_id: str,
    *,
    trace: str = "",
    wake: bool = True,
    deadline: float | None = None,
) -> None:
    """Initialise a new workflow's state and schedule it to run at once.

    Args:
        tx: the caller's transaction (events and the notification go there).
        record: the new workflow row (not yet inserted).
        definition: its ``Workflow``; its version is recorded with the workflow.
        now: the current time.
        client_id: who submitted it.
        trace: the traceparent every later span of the workflow descends from
            (``sync_server.tracing``); kept in ``state["trace"]``, "" when not traced.
        wake: tell the claimers (False when this instance claims it in ``tx``).
        deadline: the submitter's deadline in seconds (the definition's also applies).
    """
    machine = SagaMachine(definition, record.id, WorkflowStatus.PENDING, {}, tenant=record.tenant)
    machine.receive_submit(now, deadline=deadline)
    record.workflow_version = definition.version
    record.status = machine.status.value
    record.state = encode_state(machine.state)
    if trace:
        record.state["trace"] = trace  # as ``WorkflowState.trace`` encodes it
    record.progress = 0.0
    record.due_at = machine.due_at
    append_event(
        tx, record, events.WORKFLOW_SUBMITTED, now, client_id=client_id, input=record.input
    )
    if wake:
        tx.notify(WORK_CHANNEL, "")


def request_cancel(tx: Transaction, record: WorkflowRecord, now: float, client_id: str) -> None:
    """Ask a workflow to stop and compensate.

    Raises:
        Conflict: the workflow has already ended.
    """
    if WorkflowStatus(record.status).terminal:
        raise Conflict(f"workflow {record.id} is already {record.status}")
    _record_request(record, cancel=True)
    _revoke_lease(tx, record, now, cancel=True)
    append_event(tx, record, events.WORKFLOW_CANCEL_REQUESTED, now, client_id=client_id)


def request_retry(tx: Transaction, record: WorkflowRecord, now: float, client_id: str) -> None:
    """Re-run only the failed steps of a parked workflow (or failed compensations).

    Raises:
        Conflict: nothing to retry (the workflow is neither parked nor failed).
    """
    steps = _retry_steps(record)
    _record_request(record, retry=True)
    record.due_at = now
    tx.notify(WORK_CHANNEL, "")
    append_event(tx, record, events.WORKFLOW_RETRY_REQUESTED, now, client_id=client_id, steps=steps)


def requeue_dlq(tx: Transaction, entry: DlqEntry, record: WorkflowRecord, now: float) -> None:
    """Requeue a dead letter: its workflow re-runs the failed work, as a retry would.

    The caller writes ``entry`` and ``record`` afterwards.

    Raises:
        Conflict: the entry is not open, or its workflow has nothing to re-run.
    """
    if entry.status != "open":
        raise Conflict(f"dead letter {entry.id} is {entry.status}, not open")
    steps = _retry_steps(record)
    entry.status = "requeued"
    entry.resolved_at = now
    _record_request(record, retry=True)
    record.due_at = now
    tx.notify(WORK_CHANNEL, "")
    append_event(tx, record, events.DLQ_REQUEUED, now, entry_id=entry.id, steps=steps)


def request_reconcile(
    tx: Transaction,
    record: WorkflowRecord,
    now: float,
    *,
    repair: str,
    step: str,
    result: object = None,
    source: str,
    reason: str,
) -> None:
    """Repair a workflow whose sources disagree (see ``sync_server.reconcile``).

    ``repair`` is ``complete`` (the job source says the step's job completed: record
    ``result`` as the step's outcome), ``resubmit`` (the job source never heard of the
    job: run the step again at once, with the same idempotency key) or ``fail`` (the job
    source says the job failed: the running attempt fails, ``result`` is the error).
    Like a cancel, the request takes the lease away, so an instance still waiting on the
    lost job stops and the next claim applies the repair through the machine. The
    ``workflow.reconciled`` event records what was seen before and what the repair makes of it.

    Raises:
        Conflict: the workflow is not running, or the step is not running or retrying.
    """
    current = step_wire(record.state, step).get("status")
    if record.status != WorkflowStatus.RUNNING or current not in (
        StepStatus.RUNNING,
        StepStatus.RETRYING,
    ):
        raise Conflict(
            f"cannot {repair} step {step!r} of workflow {record.id}: workflow is "
            f"{record.status}, step is {current}"
        )
    requests = requested(record.state)
    if repair == "complete":
        reconcile = (*requests.reconcile, ReconcileRepair(step, result))
        requests = replace(requests, reconcile=reconcile)
        after = StepStatus.SUCCEEDED.value
    elif repair == "resubmit":
        requests = replace(requests, resubmit=(*requests.resubmit, step))
        after = StepStatus.RUNNING.value
    elif repair == "fail":
        failure = FailRepair(step, str(result or "failed")[:MAX_JOB_ERROR])
        requests = replace(requests, fail=(*requests.fail, failure))
        after = StepStatus.RETRYING.value
    else:
        raise ValueError(f"unknown repair {repair!r}")
    store_requests(record.state, requests)
    _revoke_lease(tx, record, now)
    append_event(
        tx,
        record,
        events.WORKFLOW_RECONCILED,
        now,
        repair=repair,
        source=source,
        reason=reason,
        before={"status": record.status, "step": step, "step_status": current},
        after={"status": record.status, "step": step, "step_status": after},
    )


def request_upgrade(
    tx: Transaction, record: WorkflowRecord, definition: Workflow, now: float, client_id: str
) -> str:
    """Move a workflow to another version of its definition (an operator's explicit act).

    Steps the new version shares keep their state; steps it adds start ``waiting``; a
    step it drops must never have run (``waiting`` or ``skipped``). The lease is taken
    away (like a cancel) so that an instance of the new version picks the workflow up.

    Returns:
        The version the workflow had before.

    Raises:
        Conflict: the workflow has ended, already has that version, or the new version
            drops a step that has run.
    """
    if WorkflowStatus(record.status).terminal:
        raise Conflict(f"workflow {record.id} is already {record.status}")
    before = record.workflow_version
    if before == definition.version:
        raise Conflict(f"workflow {record.id} already has version {before!r}")
    steps = steps_wire(record.state)
    started = [
        name
        for name, s in steps.items()
        if name not in definition.steps and s.get("status") not in ("waiting", "skipped")
    ]
    if started:
        raise Conflict(
            f"version {definition.version!r} of {definition.name!r} lacks step(s) "
            f"{', '.join(sorted(started))} that workflow {record.id} has already run"
        )
    blank = encode_state(initial_state(definition))["steps"]
    record.state["steps"] = {name: steps.get(name, new) for name, new in blank.items()}
    record.workflow_version = definition.version
    _revoke_lease(tx, record, now)
    append_event(
        tx,
        record,
        events.WORKFLOW_UPGRADED,
        now,
        client_id=client_id,
        version_before=before,
        version=definition.version,
    )
    return before


def _retry_steps(record: WorkflowRecord) -> list[str]:
    """The steps a retry would re-run.

    Raises:
        Conflict: the workflow is neither parked nor failed.
    """
    steps = retry_targets(WorkflowStatus(record.status), decode_state(record.state).steps)
    if steps is None:
        raise Conflict(
            f"workflow {record.id} is {record.status}; only a parked or failed workflow retries"
        )
    return steps


def _record_request(record: WorkflowRecord, *, cancel: bool = False, retry: bool = False) -> None:
    """Record a cancel or retry in ``state["requests"]`` for the next claim to apply."""
    requests = requested(record.state)
    requests = replace(requests, cancel=requests.cancel or cancel, retry=requests.retry or retry)
    store_requests(record.state, requests)


def _revoke_lease(
    tx: Transaction, record: WorkflowRecord, now: float, *, cancel: bool = False
) -> None:
    """Take the lease away (fence + 1) so the current holder's writes are refused.

    The holder is told ``cancel:<id>`` for a cancel (its attempts should stop their
    downstream work) and ``revoke:<id>`` otherwise (another instance resumes them).
    """
    holder = record.lease_owner
    record.lease_owner = None
    record.lease_until = None
    record.fence += 1
    record.due_at = now
    kind = "cancel" if cancel else "revoke"
    tx.notify(WORK_CHANNEL, revoke_payload(record.key, kind) if holder else "")
