"""The saga state machine: pure (Sans-I/O) decisions of the engine.

Theory of operation
-------------------
A ``SagaMachine`` wraps one workflow's status and JSON ``state``. The shell (the runner,
or intake inside the push transaction) feeds it inputs — a step succeeded, failed or
timed out at ``now``, a cancel, a retry, an open breaker, a takeover of an expired
lease — then calls ``advance(now)`` and drains ``effects_to_apply()``: events to append,
steps and compensations to run, dead letters and alerts. It never does I/O, reads no
clock and draws no random number; the backoff delay is an injected policy.

Every status change of the workflow and of its steps goes through ``WORKFLOW_TABLE`` or
``STEP_TABLE`` (``transitions.py``) (``(status, input) -> next``); any other pair raises
``InvalidTransition`` (STYLE: transitions are a table).

State shape (``state["steps"][name]`` keeps the keys clients see, see snapshots.py)::

    {"steps": {name: {"status", "attempts", "progress", "result", "error",
                      # private, present only when set:
                      "due_at", "retry_delay", "resume", "interrupts", "deferred",
                      "comp_attempts", "comp_running", "comp_due_at", "comp_resume",
                      "comp_failed", "job"}},
     "halt": "compensate" | "park",      # a step used its last attempt, or the deadline
     "deadline_at": unix time,            # the whole workflow's deadline (absent: none)
     "cancel": true,                      # a cancel was applied
     "requests": {"cancel": true, "retry": true,    # written by intake, applied at claim
                  "reconcile": [...], "resubmit": [...], "fail": [...]},
     "dlq": [entry ids],
     "trace": traceparent}                # written by intake (sync_server.tracing)

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
  still runs.
* Every accepted workflow ends or parks (SPEC promise 2): a failure either retries with a
  persisted ``due_at``, or exhausts into a dead letter and then compensation or park.
* A deadline (``state["deadline_at"]``) is part of ``due_at`` while the workflow runs, so
  a workflow nobody holds is claimed when it passes; ``receive_deadline`` then stops the
  running steps, skips the rest and compensates or parks by ``on_failure``, with a dead
  letter naming the reason (``deadline_exceeded``). A retry of a workflow the deadline
  parked runs without a deadline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from protocol import StepStatus, WorkflowStatus, events
from protocol.jsontypes import JSON
from sync_server.saga.backoff import DelayPolicy, no_delay
from sync_server.saga.definitions import Workflow
from sync_server.saga.transitions import (
    COMPENSATION_INPUTS,
    STEP_TABLE,
    WORKFLOW_TABLE,
    Alert,
    DeadLetter,
    Effect,
    EmitEvent,
    RunCompensation,
    RunStep,
    StepInput,
    WorkflowInput,
    next_step_status,
    next_workflow_status,
)

__all__ = [
    "MAX_INTERRUPTS",
    "STEP_TABLE",
    "WORKFLOW_TABLE",
    "Alert",
    "DeadLetter",
    "Effect",
    "EmitEvent",
    "RunCompensation",
    "RunStep",
    "SagaMachine",
    "StepInput",
    "WorkflowInput",
    "idempotency_key",
    "initial_state",
]

W = WorkflowStatus
S = StepStatus
WI = WorkflowInput
SI = StepInput

MAX_INTERRUPTS = 3
"""Lease takeovers of one attempt tolerated before the attempt counts as failed."""
MAX_JOB_ERROR = 2000
"""Longest error a job source's failure report writes into a step (bounded state)."""


# Enum lookups by value through a dict: ``Enum(value)`` is slow on the hot path.
_WORKFLOW_STATUSES = {status.value: status for status in WorkflowStatus}
_STEP_STATUSES = {status.value: status for status in StepStatus}


def idempotency_key(
    workflow_id: str, step: str, *, compensation: bool = False, tenant: str = ""
) -> str:
    """The key every attempt of a step (or of its compensation) carries.

    Workflow ids are the tenant's own (SPEC promise 6), so two tenants may run a
    workflow with the same id; the key then starts with a fixed-length tag of the tenant
    (``t<16 hex>.``) so that a downstream never mistakes one tenant's job for another's.
    """
    base = f"{workflow_id}:{step}:compensate" if compensation else f"{workflow_id}:{step}"
    if not tenant:
        return base
    tag = hashlib.blake2b(tenant.encode(), digest_size=8, person=b"tether-tenant").hexdigest()
    return f"t{tag}.{base}"


def initial_state(workflow: Workflow) -> dict[str, JSON]:
    """The state of a just-submitted workflow: every step waiting."""
    state: dict[str, JSON] = {
        "steps": {
            name: {
                "status": "waiting",
                "attempts": 0,
                "progress": 0.0,
                "result": None,
                "error": None,
            }
            for name in workflow.step_names
        }
    }
    return state


# ------------------------------------------------------------------ machine


class SagaMachine:
    """Decide what happens next for one workflow.

    Args:
        workflow: the definition (names, dependencies, attempt budgets, compensations).
        workflow_id: used for idempotency keys.
        status: the current workflow status.
        state: the JSON state; mutated in place (pass a copy to keep the original).
        progress: the workflow-level progress (0..1).
        result: the workflow-level result.
        error: the workflow-level error.
        delay: backoff policy ``delay(policy, failed_attempt) -> seconds``.
    """

    def __init__(
        self,
        workflow: Workflow,
        workflow_id: str,
        status: str,
        state: dict[str, JSON] | None,
        *,
        progress: float = 0.0,
        result: JSON = None,
        error: str | None = None,
        delay: DelayPolicy = no_delay,
        tenant: str = "",
    ) -> None:
        self.workflow = workflow
        self.workflow_id = workflow_id
        self.tenant = tenant
        self.status = _WORKFLOW_STATUSES.get(status) or WorkflowStatus(status)
        self.state: dict[str, JSON] = state if state is not None else {}
        self.progress = progress
        self.result = result
        self.error = error
        self.due_at: float | None = None
        self._delay = delay
        self._effects: list[Effect] = []

    # -------------------------------------------------------------- drains
    def effects_to_apply(self) -> list[Effect]:
        """Everything decided since the last call, in order; clears the list."""
        effects, self._effects = self._effects, []
        return effects

    @property
    def steps(self) -> dict[str, dict[str, JSON]]:
        """``state["steps"]``."""
        steps: dict[str, dict[str, JSON]] = self.state["steps"]
        return steps

    def running(self) -> list[tuple[str, int, bool]]:
        """(step, attempt, is_compensation) of every attempt the state says is running."""
        out: list[tuple[str, int, bool]] = []
        for name, s in self.steps.items():
            if s["status"] == S.RUNNING:
                out.append((name, s["attempts"], False))
            elif s.get("comp_running"):
                out.append((name, s.get("comp_attempts", 0), True))
        return out

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
        self._workflow_to(WI.SUBMIT, "submitted", emit=False)
        self.state.clear()
        self.state.update(initial_state(self.workflow))
        limits = [d for d in (self.workflow.deadline, deadline) if d is not None]
        if limits:
            self.state["deadline_at"] = now + min(limits)
        self.due_at = now

    def receive_deadline(self, now: float) -> bool:
        """The clock says ``now``: if the workflow's deadline has passed while it runs,
        stop it — running steps fail (their attempts are cancelled), waiting ones are
        skipped — and compensate or park by ``on_failure``, with a dead letter.

        Returns:
            True if the deadline applied now.
        """
        deadline = self.state.get("deadline_at")
        if deadline is None or now < deadline or self.status != W.RUNNING:
            return False
        del self.state["deadline_at"]
        running = [n for n in self.workflow.step_names if self.steps[n]["status"] == S.RUNNING]
        error = "deadline exceeded"
        for name in self.workflow.step_names:
            s = self.steps[name]
            if s["status"] not in (S.RUNNING, S.WAITING, S.RETRYING):
                continue
            for key in ("due_at", "resume", "interrupts", "deferred"):
                s.pop(key, None)
            if s["status"] == S.RUNNING:
                s["error"] = error
                self._step_to(name, SI.DEADLINE, error=error)
            else:
                self._step_to(name, SI.DEADLINE)
        halt = self.workflow.on_failure
        self.state["halt"] = halt
        message = f"workflow deadline exceeded at {deadline:.3f}"
        self.error = message
        step = running[0] if running else None
        attempts = self.steps[step]["attempts"] if step else 0
        self._effects.append(DeadLetter(step, "deadline_exceeded", attempts, message))
        self._effects.append(
            Alert("deadline_exceeded", message, {**self._details(step or ""), "running": running})
        )
        if halt == "park":
            self._workflow_to(WI.DEADLINE_PARK, "deadline exceeded; parked for retry")
        else:
            self._workflow_to(WI.DEADLINE_COMPENSATE, "deadline exceeded; compensating")
        return True

    def receive_claim(self, now: float) -> None:
        """This instance just took the lease: apply client requests, recover orphans.

        A step still ``running`` was interrupted with its previous lease holder; its same
        attempt runs again, and counts as failed after ``MAX_INTERRUPTS`` interruptions.
        """
        requests = self.state.pop("requests", None) or {}
        for repair in requests.get("reconcile", ()):
            self.receive_reconciled(repair["step"], repair.get("result"), now)
        for name in requests.get("resubmit", ()):
            self._make_due(name)
        for repair in requests.get("fail", ()):
            self.receive_job_failed(repair["step"], str(repair.get("error") or "failed"), now)
        if requests.get("cancel") and not self.status.terminal:
            self.receive_cancel(now)
        if requests.get("retry") and self.status in (W.PARKED, W.FAILED):
            self.receive_retry(now)
        for name, s in self.steps.items():
            deferred = s.get("deferred")
            if isinstance(deferred, str) and deferred.startswith("limit:"):
                s.pop("due_at", None)  # waiting for a limit: ask it again now
            if s["status"] == S.RUNNING:
                interrupts = s.get("interrupts", 0) + 1
                s["interrupts"] = interrupts
                if interrupts > MAX_INTERRUPTS:
                    self._attempt_failed(name, f"interrupted {interrupts - 1} times", now)
                else:
                    s["resume"] = True
                    s.pop("due_at", None)
                    self._step_to(name, SI.INTERRUPT, error="interrupted: lease taken over")
            elif s.get("comp_running"):
                s["comp_running"] = False
                s["comp_resume"] = True
                s.pop("comp_due_at", None)
                self._step_to(name, SI.COMP_INTERRUPT, error="interrupted: lease taken over")

    def receive_step_succeeded(self, step: str, attempt: int, result: JSON, now: float) -> bool:
        """Attempt ``attempt`` of ``step`` returned ``result``.

        Returns:
            False (and nothing changes) if that attempt is no longer the current one.
        """
        s = self._current(step, attempt)
        if s is None:
            return False
        s["result"] = result
        s["progress"] = 1.0
        s["error"] = None
        s.pop("interrupts", None)
        self._step_to(step, SI.SUCCEED, result=result)
        self._update_progress()
        return True

    def receive_reconciled(self, step: str, result: JSON, now: float) -> bool:
        """Reconciliation: the job source says ``step``'s job completed with ``result``
        (its completion callback or response was lost). Applies only to a step that is
        running or waiting to retry in a running workflow.

        Returns:
            False (and nothing changes) when the step is not in such a state.
        """
        s = self.steps.get(step)
        if s is None or self.status != W.RUNNING or s["status"] not in (S.RUNNING, S.RETRYING):
            return False
        s["result"] = result
        s["progress"] = 1.0
        s["error"] = None
        for key in ("interrupts", "due_at", "resume", "deferred"):
            s.pop(key, None)
        self._step_to(step, SI.RECONCILE, result=result)
        self._update_progress()
        return True

    def receive_job_failed(self, step: str, error: str, now: float) -> bool:
        """Reconciliation: the job source says the job of ``step``'s running attempt
        failed (its failure never reached the attempt). The attempt counts as failed:
        retried by the step's policy, or exhausted.

        Returns:
            False (and nothing changes) unless the step is running in a running workflow.
        """
        s = self.steps.get(step)
        if s is None or self.status != W.RUNNING or s["status"] != S.RUNNING:
            return False
        self._attempt_failed(step, f"job failed at its source: {error[:MAX_JOB_ERROR]}", now)
        return True

    def _make_due(self, step: str) -> None:
        """Reconciliation: the job source never heard of ``step``'s job — run it again now
        (a running attempt is re-run by the claim as an interrupted one)."""
        s = self.steps.get(step)
        if s is not None and s["status"] == S.RETRYING:
            s.pop("due_at", None)

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
        s = self._current_compensation(step, attempt)
        if s is None:
            return False
        s["comp_running"] = False
        s["error"] = None
        self._step_to(step, SI.COMPENSATED)
        return True

    def receive_compensation_failed(self, step: str, attempt: int, error: str, now: float) -> bool:
        """The compensation of ``step`` raised; retry it by policy or fail the workflow.

        Returns:
            False if that attempt is no longer the current one.
        """
        s = self._current_compensation(step, attempt)
        if s is None:
            return False
        s["comp_running"] = False
        s["error"] = error
        policy = self.workflow.steps[step].compensate_retry
        if attempt < policy.max_attempts:
            s["comp_due_at"] = now + self._delay(policy, attempt)
            self._step_to(step, SI.COMP_FAIL, error=error)
            return True
        s["comp_failed"] = True
        self._step_to(step, SI.COMP_EXHAUST, error=error)
        message = f"compensation of step {step} failed after {attempt} attempt(s): {error}"
        self.error = message
        self._effects.append(DeadLetter(step, "compensation_failed", attempt, error))
        self._effects.append(Alert("compensation_failed", message, self._details(step)))
        return True

    def receive_cancel(self, now: float) -> None:
        """Stop the workflow: interrupt running steps, skip the rest, then compensate.

        Raises:
            InvalidTransition: the workflow already ended.
        """
        self._workflow_to(WI.CANCEL, "cancelled by client")
        self.state["cancel"] = True
        self.state["halt"] = "compensate"
        self.error = "cancelled"
        for name, s in self.steps.items():
            if s["status"] == S.RUNNING:
                s["error"] = "cancelled"
                self._step_to(name, SI.CANCEL, error="cancelled")
            elif s["status"] in (S.WAITING, S.RETRYING):
                self._step_to(name, SI.CANCEL)

    def receive_retry(self, now: float) -> list[str]:
        """Re-run only what failed: parked steps, or the compensations that failed.

        Returns:
            The steps that will run again.

        Raises:
            InvalidTransition: the workflow is neither parked nor failed.
        """
        compensation = self.status == W.FAILED
        self._workflow_to(WI.RETRY, "retry requested")
        self.error = None
        again: list[str] = []
        if compensation:
            for name, s in self.steps.items():
                if s.get("comp_failed"):
                    for key in ("comp_failed", "comp_due_at", "comp_resume"):
                        s.pop(key, None)
                    s["comp_attempts"] = 0
                    s["error"] = None
                    self._step_to(name, SI.COMP_RETRY)
                    again.append(name)
            return again
        self.state.pop("halt", None)
        for name, s in self.steps.items():
            if s["status"] in (S.FAILED, S.SKIPPED):
                s["attempts"] = 0
                s["error"] = None
                s["progress"] = 0.0
                for key in ("due_at", "resume", "interrupts", "deferred"):
                    s.pop(key, None)
                self._step_to(name, SI.RETRY)
                again.append(name)
        self._update_progress()
        return again

    def receive_breaker_open(self, step: str, until: float, breaker: str, now: float) -> None:
        """Step ``step`` is ready but its breaker is open: defer it, using no attempt."""
        s = self.steps[step]
        s["due_at"] = until
        self._step_to(step, SI.DEFER, emit=False)
        if s.get("deferred") != breaker:  # announce a deferral once, not on every recheck
            s["deferred"] = breaker
            self._effects.append(
                EmitEvent(events.BREAKER_CHANGED, {"name": breaker, "state": "open", "step": step})
            )

    def receive_limit_wait(self, step: str, until: float, limit: str, now: float) -> None:
        """Step ``step`` is ready but its limit is full (or not its turn): defer it to
        ``until`` without using an attempt (it is woken earlier when a slot frees)."""
        s = self.steps[step]
        # A claim clears this ``due_at`` (``receive_claim``): whenever the workflow is
        # claimed — at ``until``, or earlier when a freed slot wakes it — the limit is
        # asked again.
        s["due_at"] = until
        s["deferred"] = f"limit:{limit}"
        self._step_to(step, SI.DEFER, emit=False)

    def receive_progress(
        self, step: str, attempt: int, fraction: float, message: str | None, now: float
    ) -> bool:
        """Durable (coalesced) progress of a running attempt.

        Returns:
            False if that attempt is no longer the current one.
        """
        s = self._current(step, attempt)
        if s is None:
            return False
        s["progress"] = fraction
        self._update_progress()
        self._effects.append(
            EmitEvent(
                events.WORKFLOW_PROGRESS, {"step": step, "fraction": fraction, "message": message}
            )
        )
        return True

    def receive_job(self, step: str, attempt: int, job: dict[str, str]) -> bool:
        """The running attempt runs a job at a downstream source (``{"source",
        "adapter"}``): kept on the step so the reconciliation sweep asks that source.

        Returns:
            False if that attempt is no longer the current one.
        """
        s = self._current(step, attempt)
        if s is None:
            return False
        s["job"] = {"source": str(job.get("source", "")), "adapter": str(job.get("adapter", ""))}
        return True

    # -------------------------------------------------------------- planning
    def ready_steps(self, now: float) -> list[str]:
        """Forward steps that ``advance(now)`` would start (for breaker checks)."""
        if self.status != W.RUNNING or self.state.get("halt"):
            return []
        steps = self.steps
        ready = []
        for name in self.workflow.step_names:
            s = steps[name]
            if s["status"] not in (S.WAITING, S.RETRYING):
                continue
            due = s.get("due_at")
            if due is not None and due > now:
                continue
            deps = self.workflow.steps[name].depends_on
            if all(steps[d]["status"] == S.SUCCEEDED for d in deps):
                ready.append(name)
        return ready

    def advance(self, now: float) -> None:
        """Start what is ready, settle the workflow's status, compute ``due_at``."""
        if self.status == W.RUNNING:
            self._advance_running(now)
        if self.status == W.COMPENSATING:
            self._advance_compensating(now)
        self.due_at = self._next_due(now)

    def _advance_running(self, now: float) -> None:
        halt = self.state.get("halt")
        if halt:
            if any(s["status"] == S.RUNNING for s in self.steps.values()):
                return  # let in-flight siblings settle first
            if halt == "park":
                self._workflow_to(WI.HALT_PARK, "a step failed; parked for retry")
                return
            self._workflow_to(WI.HALT_COMPENSATE, "a step failed; compensating")
            for name, s in self.steps.items():
                if s["status"] in (S.WAITING, S.RETRYING):
                    self._step_to(name, SI.SKIP)
            return
        if all(s["status"] == S.SUCCEEDED for s in self.steps.values()):
            leaves = self.workflow.leaves
            steps = self.steps
            self.result = (
                steps[leaves[0]]["result"]
                if len(leaves) == 1
                else {leaf: steps[leaf]["result"] for leaf in leaves}
            )
            self.progress = 1.0
            self.error = None
            self._workflow_to(WI.COMPLETE, "all steps succeeded")
            return
        for name in self.ready_steps(now):
            s = self.steps[name]
            attempt = s["attempts"] if s.pop("resume", False) else s["attempts"] + 1
            s["attempts"] = attempt
            s.pop("due_at", None)
            s.pop("deferred", None)
            self._step_to(name, SI.START)
            self._effects.append(
                RunStep(name, attempt, idempotency_key(self.workflow_id, name, tenant=self.tenant))
            )

    def _advance_compensating(self, now: float) -> None:
        steps = self.steps
        if any(s["status"] == S.RUNNING for s in steps.values()):
            return  # nothing is undone while a forward step may still succeed
        failed = any(s.get("comp_failed") for s in steps.values())
        pending = [n for n in self.workflow.step_names if self._needs_compensation(n)]
        if not failed:
            for name in reversed(pending):
                s = steps[name]
                if s.get("comp_running"):
                    continue
                due = s.get("comp_due_at")
                if due is not None and due > now:
                    continue
                if any(self._needs_compensation(d) for d in self._descendants(name)):
                    continue
                attempt = (
                    s.get("comp_attempts", 0)
                    if s.pop("comp_resume", False)
                    else s.get("comp_attempts", 0) + 1
                )
                s["comp_attempts"] = attempt
                s["comp_running"] = True
                s.pop("comp_due_at", None)
                self._step_to(name, SI.COMPENSATE)
                self._effects.append(
                    RunCompensation(
                        name,
                        attempt,
                        idempotency_key(
                            self.workflow_id, name, compensation=True, tenant=self.tenant
                        ),
                    )
                )
        if any(s.get("comp_running") for s in steps.values()):
            return
        if failed:
            self._workflow_to(WI.COMPENSATION_FAILED, self.error or "compensation failed")
        elif not pending:
            if self.state.get("cancel"):
                self._workflow_to(WI.CANCEL_DONE, "cancelled and compensated")
            else:
                self._workflow_to(WI.COMPENSATION_DONE, "compensated")

    def _needs_compensation(self, name: str) -> bool:
        """Succeeded with a compensation not yet done, or compensating now."""
        s = self.steps[name]
        if s["status"] == S.COMPENSATING:
            return True
        return s["status"] == S.SUCCEEDED and self.workflow.steps[name].compensate is not None

    def _descendants(self, name: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.workflow.dependents[name])
        while stack:
            nxt = stack.pop()
            if nxt not in seen:
                seen.add(nxt)
                stack.extend(self.workflow.dependents[nxt])
        return seen

    def _next_due(self, now: float) -> float | None:
        """When someone should next look at this workflow (None: only on request)."""
        if self.status.terminal or self.status == W.PARKED:
            return None
        if self.running():
            return now  # claimable as soon as the holder's lease expires
        times: list[float] = []
        if self.status == W.RUNNING:
            deadline = self.state.get("deadline_at")
            if deadline is not None:
                times.append(deadline)
            for name in self.workflow.step_names:
                s = self.steps[name]
                if s["status"] in (S.WAITING, S.RETRYING) and all(
                    self.steps[d]["status"] == S.SUCCEEDED
                    for d in self.workflow.steps[name].depends_on
                ):
                    times.append(s.get("due_at") or now)
        else:
            for s in self.steps.values():
                if s["status"] == S.COMPENSATING:
                    times.append(s.get("comp_due_at") or now)
        return min(times) if times else now

    # -------------------------------------------------------------- helpers
    def _current(self, step: str, attempt: int) -> dict[str, JSON] | None:
        s = self.steps.get(step)
        if s is None or s["status"] != S.RUNNING or s["attempts"] != attempt:
            return None
        return s

    def _current_compensation(self, step: str, attempt: int) -> dict[str, JSON] | None:
        s = self.steps.get(step)
        if (
            s is None
            or s["status"] != S.COMPENSATING
            or not s.get("comp_running")
            or s.get("comp_attempts", 0) != attempt
        ):
            return None
        return s

    def _attempt_failed(
        self,
        step: str,
        error: str,
        now: float,
        *,
        permanent: bool = False,
        reason: str = "failed",
    ) -> None:
        s = self.steps[step]
        s["error"] = error
        attempt = s["attempts"]
        policy = self.workflow.steps[step].retry
        if self.state.get("halt"):
            self._step_to(step, SI.ABANDON, error=error)
        elif not permanent and attempt < policy.max_attempts:
            delay = self._delay(policy, attempt)
            s["due_at"] = now + delay
            s["retry_delay"] = delay
            s.pop("interrupts", None)
            self._step_to(step, SI.FAIL, error=error)
        else:
            self._step_to(step, SI.EXHAUST, error=error)
            self.state["halt"] = self.workflow.on_failure
            if reason == "failed":
                reason = "attempts_exhausted"
            message = f"step {step} failed after {attempt} attempt(s): {error}"
            self.error = message
            self._effects.append(DeadLetter(step, reason, attempt, error))
            self._effects.append(Alert("step_failed", message, self._details(step)))

    def _details(self, step: str) -> dict[str, JSON]:
        # The tenant rides with every alert so a tenant admin sees only its own (issue 11).
        return {
            "tenant": self.tenant,
            "workflow_id": self.workflow_id,
            "workflow": self.workflow.name,
            "step": step,
        }

    def _workflow_to(self, event: WorkflowInput, reason: str, *, emit: bool = True) -> None:
        self.status = next_workflow_status(self.status, event)
        if emit:
            self._effects.append(
                EmitEvent(events.WORKFLOW_CHANGED, {"status": str(self.status), "reason": reason})
            )

    def _step_to(
        self,
        name: str,
        event: StepInput,
        *,
        error: str | None = None,
        result: JSON = None,
        emit: bool = True,
    ) -> None:
        s = self.steps[name]
        status = next_step_status(_STEP_STATUSES.get(s["status"]) or StepStatus(s["status"]), event)
        s["status"] = str(status)
        if emit:
            compensation = event in COMPENSATION_INPUTS
            attempt = s.get("comp_attempts", 0) if compensation else s["attempts"]
            self._effects.append(
                EmitEvent(
                    events.STEP_CHANGED,
                    {
                        "step": name,
                        "status": str(status),
                        "attempt": attempt,
                        "error": error,
                        "result": result,
                    },
                )
            )

    def _update_progress(self) -> None:
        steps: Iterable[dict[str, JSON]] = self.steps.values()
        values = [
            1.0 if s["status"] == S.SUCCEEDED else float(s.get("progress") or 0.0) for s in steps
        ]
        self.progress = sum(values) / len(values) if values else 0.0
