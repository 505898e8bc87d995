"""The saga state machine: pure (Sans-I/O) decisions of the engine.

Theory of operation
-------------------
A ``SagaMachine`` wraps one workflow's status and its typed, frozen ``WorkflowState``
(``sagastate.py``; the row's JSON is decoded by the caller or by the constructor). The
shell (the runner's checkpointer, or intake inside the push transaction) feeds it
inputs — a step succeeded, failed or timed out at ``now``, a cancel, a retry, a
reconciliation repair, an open breaker or a full limit, a takeover of an expired
lease — then calls ``advance(now)`` and drains ``effects_to_apply()``: events to append,
steps and compensations to run, dead letters and alerts. The shell only carries the
effects out and writes ``encode_state(machine.state)`` back. The machine never does
I/O, reads no clock and draws no random number; the backoff delay is an injected policy.

Every change replaces Structs (``msgspec.structs.replace``): a ``StepState`` is never
changed in place, and the ``steps`` dict of ``machine.state`` is the machine's own.
Every status change of the workflow and of its steps goes through ``WORKFLOW_TABLE`` or
``STEP_TABLE`` (``transitions.py``) (``(status, input) -> next``); any other pair raises
``InvalidTransition`` (STYLE: transitions are a table). Client and operator requests
(cancel, retry, DLQ requeue, reconciliation repairs) are recorded by intake as typed
``Requests`` and applied here at the next claim (``receive_claim``), so they take the
same paths as the runner's own inputs; which steps a retry re-runs is decided once
(``retry_targets``), for intake's answer and for the machine alike. Compensation
planning (reverse dependency order) lives in ``compensation.py``.

Invariants:

* A step is ``running`` only while some instance holds the workflow's lease; a new
  lease holder therefore treats every ``running`` step as interrupted (``receive_claim``)
  and re-runs the *same* attempt (at-least-once, SPEC promise 3), counting it as failed
  only after ``MAX_INTERRUPTS`` interruptions so a step that crashes its host cannot loop.
* An outcome for an attempt that is no longer the current one is ignored (returns
  False): results are recorded exactly once.
* Compensation runs for exactly the succeeded steps that have a compensation, a step
  only after every step that (transitively) depends on it has finished compensating:
  reverse dependency order (SPEC promise 3). Nothing is compensated while a forward step
  still runs. A compensation that used its last attempt is explicit
  (``CompPhase.EXHAUSTED``) and fails the workflow; a retry re-runs exactly those.
* Every accepted workflow ends or parks (SPEC promise 2): a failure either retries with a
  persisted ``due_at``, or exhausts into a dead letter and then compensation or park.
* A deadline (``state.deadline_at``) is part of ``due_at`` while the workflow runs, so
  a workflow nobody holds is claimed when it passes; ``receive_deadline`` then stops the
  running steps, skips the rest and compensates or parks by ``on_failure``, with a dead
  letter naming the reason (``deadline_exceeded``). A retry of a workflow the deadline
  parked runs without a deadline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from msgspec.structs import replace

from protocol import StepStatus, WorkflowStatus, events
from protocol.jsontypes import JSON
from sync_server.saga.planner import (
    ACTIVE,
    CLEAR_SCHEDULE,
    MAX_INTERRUPTS,
    MAX_JOB_ERROR,
    MachineBase,
    idempotency_key,
    initial_state,
    retry_targets,
)
from sync_server.saga.sagastate import Compensation, CompPhase, Job, Requests
from sync_server.saga.transitions import (
    STEP_TABLE,
    WORKFLOW_TABLE,
    Alert,
    DeadLetter,
    Effect,
    EmitEvent,
    ResolveDeadLetters,
    RunCompensation,
    RunStep,
    StepInput,
    WorkflowInput,
)

__all__ = [
    "MAX_INTERRUPTS",
    "MAX_JOB_ERROR",
    "STEP_TABLE",
    "WORKFLOW_TABLE",
    "Alert",
    "DeadLetter",
    "Effect",
    "EmitEvent",
    "ResolveDeadLetters",
    "RunCompensation",
    "RunStep",
    "SagaMachine",
    "StepInput",
    "WorkflowInput",
    "idempotency_key",
    "initial_state",
    "retry_targets",
]

W = WorkflowStatus
S = StepStatus
WI = WorkflowInput
SI = StepInput
# Enum members as constants: ``StepStatus.RUNNING`` is a descriptor call on every use.
_S_RETRYING = StepStatus.RETRYING
_S_RUNNING = StepStatus.RUNNING
_W_FAILED = WorkflowStatus.FAILED
_W_PARKED = WorkflowStatus.PARKED
_W_RUNNING = WorkflowStatus.RUNNING
_C_EXHAUSTED = CompPhase.EXHAUSTED
_C_IDLE = CompPhase.IDLE
_C_RUNNING = CompPhase.RUNNING


class SagaMachine(MachineBase):
    """Decide what happens next for one workflow: feed it inputs (``receive_*``), then
    ``advance(now)``, then drain ``effects_to_apply()``.

    Args:
        workflow: the definition (names, dependencies, attempt budgets, compensations).
        workflow_id: used for idempotency keys.
        status: the current workflow status.
        state: the typed state, or a row's JSON state (decoded here); never changed —
            the machine works on its own copy (``self.state``).
        progress: the workflow-level progress (0..1).
        result: the workflow-level result.
        error: the workflow-level error.
        delay: backoff policy ``delay(policy, failed_attempt) -> seconds``.
    """

    # -------------------------------------------------------------- inputs
    def receive_submit(self, now: float, *, deadline: float | None = None) -> None:
        """A new workflow: every step waits; due at once.

        Args:
            now: acceptance time.
            deadline: seconds the submitter allows; the definition's own deadline also
                applies, and the shorter wins.

        Raises:
            InvalidTransition: the workflow is not new (``pending``).
        """
        self._workflow_to(WI.SUBMIT, "submitted")
        state = initial_state(self.workflow)
        limits = [d for d in (self.workflow.deadline, deadline) if d is not None]
        if limits:
            state = replace(state, deadline_at=now + min(limits))
        self.state = state
        self.due_at = now

    def receive_deadline(self, now: float) -> bool:
        """The clock says ``now``: if the workflow's deadline has passed while it runs,
        stop it — running steps fail (their attempts are cancelled), waiting ones are
        skipped — and compensate or park by ``on_failure``, with a dead letter.

        Returns:
            True if the deadline applied now.
        """
        deadline = self.state.deadline_at
        if deadline is None or now < deadline or self.status != _W_RUNNING:
            return False
        halt = self.workflow.on_failure
        self.state = replace(self.state, deadline_at=None, halt=halt)
        steps = self.state.steps
        names = self.workflow.step_names
        running = [n for n in names if steps[n].status is _S_RUNNING]
        error = "deadline exceeded"
        for name in names:
            s = steps[name]
            if s.status is _S_RUNNING:
                self._step_to(name, SI.DEADLINE, say_error=error, error=error, **CLEAR_SCHEDULE)
            elif s.status in ACTIVE:
                self._step_to(name, SI.DEADLINE, **CLEAR_SCHEDULE)
        message = f"workflow deadline exceeded at {deadline:.3f}"
        self.error = message
        step = running[0] if running else None
        attempts = steps[step].attempts if step else 0
        letter = DeadLetter(step, "deadline_exceeded", attempts, message)
        details = {**self._details(step or ""), "running": running}
        alert = Alert("deadline_exceeded", message, details)
        if halt == "park":
            event, reason = WI.DEADLINE_PARK, "deadline exceeded; parked for retry"
        else:
            event, reason = WI.DEADLINE_COMPENSATE, "deadline exceeded; compensating"
        self._workflow_to(event, reason, letter=letter, alert=alert)
        return True

    def receive_claim(self, now: float) -> None:
        """This instance just took the lease: apply recorded requests, recover orphans.

        The requests (``state.requests``, recorded by intake) are applied in a fixed
        order: reconciliation repairs, cancel, retry. A step still ``running`` was
        interrupted with its previous lease holder; its same attempt runs again, and
        counts as failed after ``MAX_INTERRUPTS`` interruptions.
        """
        requests = self.state.requests
        if requests is not None:
            self.state = replace(self.state, requests=None)
            if requests.retry and self.state.dlq:  # it re-runs what the dead letters say
                self._effects.append(ResolveDeadLetters(self.state.dlq))
                self.state = replace(self.state, dlq=())
            self.receive_requests(requests, now)
        steps = self.state.steps
        for name in list(steps):
            s = steps[name]
            deferred = s.deferred
            if deferred is not None and deferred.startswith("limit:"):
                s = self._put(name, due_at=None)  # waiting for a limit: ask it again now
            if s.status is _S_RUNNING:
                interrupts = s.interrupts + 1
                if interrupts > MAX_INTERRUPTS:
                    self._put(name, interrupts=interrupts)
                    self._attempt_failed(name, f"interrupted {interrupts - 1} times", now)
                else:
                    self._step_to(
                        name,
                        SI.INTERRUPT,
                        say_error="interrupted: lease taken over",
                        interrupts=interrupts,
                        resume=True,
                        due_at=None,
                    )
            elif s.comp is not None and s.comp.phase is _C_RUNNING:
                self._step_to(
                    name,
                    SI.COMP_INTERRUPT,
                    say_error="interrupted: lease taken over",
                    comp=replace(s.comp, phase=_C_IDLE, resume=True, due_at=None),
                )

    def receive_requests(self, requests: Requests, now: float) -> None:
        """Apply recorded client and operator requests (see ``receive_claim``)."""
        for repair in requests.reconcile:
            self.receive_reconciled(repair.step, repair.result, now)
        for name in requests.resubmit:
            self.receive_resubmit(name)
        for failure in requests.fail:
            self.receive_job_failed(failure.step, str(failure.error or "failed"), now)
        if requests.cancel and not self.status.terminal:
            self.receive_cancel(now)
        if requests.retry and self.status in (_W_PARKED, _W_FAILED):
            self.receive_retry(now)

    def receive_step_succeeded(self, step: str, attempt: int, result: JSON, now: float) -> bool:
        """Attempt ``attempt`` of ``step`` returned ``result``.

        Returns:
            False (and nothing changes) if that attempt is no longer the current one.
        """
        if self._current(step, attempt) is None:
            return False
        self._record_result(step, SI.SUCCEED, result)
        return True

    def receive_reconciled(self, step: str, result: JSON, now: float) -> bool:
        """Reconciliation: the job source says ``step``'s job completed with ``result``
        (its completion callback or response was lost). Applies only to a step that is
        running or waiting to retry in a running workflow.

        Returns:
            False (and nothing changes) when the step is not in such a state.
        """
        s = self.state.steps.get(step)
        if s is None or self.status != _W_RUNNING or s.status not in (_S_RUNNING, _S_RETRYING):
            return False
        self._record_result(step, SI.RECONCILE, result, due_at=None, resume=False, deferred=None)
        return True

    def _record_result(self, step: str, event: StepInput, result: JSON, **more: Any) -> None:
        """``step`` succeeded with ``result`` (its attempt's, or the job source's)."""
        self._step_to(
            step,
            event,
            say_result=result,
            result=result,
            progress=1.0,
            error=None,
            interrupts=0,
            **more,
        )
        self._update_progress()

    def receive_job_failed(self, step: str, error: str, now: float) -> bool:
        """Reconciliation: the job source says the job of ``step``'s running attempt
        failed (its failure never reached the attempt). The attempt counts as failed:
        retried by the step's policy, or exhausted.

        Returns:
            False (and nothing changes) unless the step is running in a running workflow.
        """
        s = self.state.steps.get(step)
        if s is None or self.status != _W_RUNNING or s.status is not _S_RUNNING:
            return False
        self._attempt_failed(step, f"job failed at its source: {error[:MAX_JOB_ERROR]}", now)
        return True

    def receive_resubmit(self, step: str) -> bool:
        """Reconciliation: the job source never heard of ``step``'s job — run it again now
        (a running attempt is re-run by the claim as an interrupted one).

        Returns:
            True if a retrying step was made due now.
        """
        s = self.state.steps.get(step)
        if s is None or s.status is not _S_RETRYING:
            return False
        self._put(step, due_at=None)
        return True

    def receive_step_failed(
        self,
        step: str,
        attempt: int,
        error: str,
        now: float,
        *,
        permanent: bool = False,
        timed_out: bool = False,
    ) -> bool:
        """Attempt ``attempt`` of ``step`` raised (or timed out, or failed permanently).

        Returns:
            False (and nothing changes) if that attempt is no longer the current one.
        """
        if self._current(step, attempt) is None:
            return False
        reason = "permanent_error" if permanent else "timeout" if timed_out else "failed"
        self._attempt_failed(step, error, now, permanent=permanent, reason=reason)
        return True

    def receive_compensation_succeeded(self, step: str, attempt: int, now: float) -> bool:
        """The compensation of ``step`` (attempt ``attempt``) finished.

        Returns:
            False if that attempt is no longer the current one.
        """
        comp = self._current_compensation(step, attempt)
        if comp is None:
            return False
        self._step_to(step, SI.COMPENSATED, error=None, comp=replace(comp, phase=_C_IDLE))
        return True

    def receive_compensation_failed(self, step: str, attempt: int, error: str, now: float) -> bool:
        """The compensation of ``step`` raised; retry it by policy or fail the workflow.

        Returns:
            False if that attempt is no longer the current one.
        """
        comp = self._current_compensation(step, attempt)
        if comp is None:
            return False
        policy = self.workflow.steps[step].compensate_retry
        if attempt < policy.max_attempts:
            due = now + self._delay(policy, attempt)
            self._step_to(
                step,
                SI.COMP_FAIL,
                say_error=error,
                error=error,
                comp=replace(comp, phase=_C_IDLE, due_at=due),
            )
            return True
        message = f"compensation of step {step} failed after {attempt} attempt(s): {error}"
        self._step_to(
            step,
            SI.COMP_EXHAUST,
            say_error=error,
            letter=DeadLetter(step, "compensation_failed", attempt, error),
            alert=Alert("compensation_failed", message, self._details(step)),
            error=error,
            comp=replace(comp, phase=_C_EXHAUSTED),
        )
        self.error = message
        return True

    def receive_cancel(self, now: float) -> None:
        """Stop the workflow: interrupt running steps, skip the rest, then compensate.

        Raises:
            InvalidTransition: the workflow already ended.
        """
        self._workflow_to(WI.CANCEL, "cancelled by client")
        self.state = replace(self.state, cancel=True, halt="compensate")
        self.error = "cancelled"
        steps = self.state.steps
        for name in list(steps):
            status = steps[name].status
            if status is _S_RUNNING:
                self._step_to(name, SI.CANCEL, say_error="cancelled", error="cancelled")
            elif status in ACTIVE:
                self._step_to(name, SI.CANCEL)

    def receive_retry(self, now: float) -> list[str]:
        """Re-run only what failed: parked steps, or the compensations that failed
        (``retry_targets``).

        Returns:
            The steps that will run again.

        Raises:
            InvalidTransition: the workflow is neither parked nor failed.
        """
        before = self.status
        self._workflow_to(WI.RETRY, "retry requested")
        self.error = None
        again = retry_targets(before, self.state.steps) or []
        if before is _W_FAILED:
            for name in again:
                self._step_to(name, SI.COMP_RETRY, error=None, comp=Compensation())
            return again
        self.state = replace(self.state, halt=None)
        for name in again:
            self._step_to(name, SI.RETRY, attempts=0, error=None, progress=0.0, **CLEAR_SCHEDULE)
        self._update_progress()
        return again

    def receive_breaker_open(self, step: str, until: float, breaker: str, now: float) -> None:
        """Step ``step`` is ready but its breaker is open: defer it, using no attempt."""
        s = self._step_to(step, SI.DEFER, due_at=until)
        if s.deferred != breaker:  # announce a deferral once, not on every recheck
            self._put(step, deferred=breaker)
            self._effects.append(
                EmitEvent(events.BREAKER_CHANGED, {"name": breaker, "state": "open", "step": step})
            )

    def receive_limit_wait(self, step: str, until: float, limit: str, now: float) -> None:
        """Step ``step`` is ready but its limit is full (or not its turn): defer it to
        ``until`` without using an attempt (it is woken earlier when a slot frees)."""
        # A claim clears this ``due_at`` (``receive_claim``): whenever the workflow is
        # claimed — at ``until``, or earlier when a freed slot wakes it — the limit is
        # asked again.
        self._step_to(step, SI.DEFER, due_at=until, deferred=f"limit:{limit}")

    def receive_limit_admitted(self, step: str, limit: str) -> None:
        """Step ``step`` took a slot of ``limit``: it holds the slot while it runs."""
        self._put(step, slot=limit)

    def settle_limits(self) -> tuple[list[str], list[str]]:
        """Forget the slots of steps that stopped running (outcome, cancel, deadline,
        takeover) and the limit waits of steps that no longer wait (skipped, cancelled,
        halted).

        Returns:
            (steps whose slot to free, steps whose waiter entries to drop).
        """
        waiting = self.status == _W_RUNNING and not self.state.halt
        freed: list[str] = []
        gone: list[str] = []
        steps = self.state.steps
        for name in list(steps):
            s = steps[name]
            if s.slot and s.status is not _S_RUNNING:
                s = self._put(name, slot=None)
                freed.append(name)
            deferred = s.deferred
            still = waiting and s.status in ACTIVE
            if deferred is not None and deferred.startswith("limit:") and not still:
                self._put(name, deferred=None)
                gone.append(name)
        return freed, gone

    def receive_progress(
        self, step: str, attempt: int, fraction: float, message: str | None, now: float
    ) -> bool:
        """Durable (coalesced) progress of a running attempt.

        Returns:
            False if that attempt is no longer the current one.
        """
        if self._current(step, attempt) is None:
            return False
        self._put(step, progress=fraction)
        self._update_progress()
        self._effects.append(
            EmitEvent(
                events.WORKFLOW_PROGRESS, {"step": step, "fraction": fraction, "message": message}
            )
        )
        return True

    def receive_job(self, step: str, attempt: int, job: Mapping[str, str]) -> bool:
        """The running attempt runs a job at a downstream source (``{"source",
        "adapter"}``): kept on the step so the reconciliation sweep asks that source.

        Returns:
            False if that attempt is no longer the current one.
        """
        if self._current(step, attempt) is None:
            return False
        source, adapter = str(job.get("source", "")), str(job.get("adapter", ""))
        self._put(step, job=Job(source, adapter))
        return True
