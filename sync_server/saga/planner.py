"""The core of ``SagaMachine``: its state, the table-driven moves, and planning.

Theory of operation
-------------------
``MachineBase`` holds one workflow's status and typed state (``sagastate``) and knows
how to move it: ``_step_to`` and ``_workflow_to`` look every status change up in
``STEP_TABLE`` / ``WORKFLOW_TABLE`` (``transitions``) and emit its event; ``_put``
replaces a step's Struct without a status change. ``advance`` plans what happens next —
the forward steps that are ready, the compensations that may start
(``compensation.plan_compensations``), the workflow's next status and ``due_at``.
The inputs (``receive_*``) are ``SagaMachine``'s (``machine``), which the shells use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from msgspec.structs import replace

from protocol import StepStatus, WorkflowStatus, events
from protocol.jsontypes import JSON
from sync_server.saga.backoff import DelayPolicy, no_delay
from sync_server.saga.compensation import plan_compensations
from sync_server.saga.definitions import Workflow
from sync_server.saga.sagastate import (
    FRESH_STEP,
    STATUS_TEXT,
    Compensation,
    CompPhase,
    StepState,
    WorkflowState,
    decode_state,
    encode_state,
    steps_wire,
)
from sync_server.saga.transitions import (
    COMPENSATION_INPUTS,
    Alert,
    DeadLetter,
    Effect,
    EmitEvent,
    Fx,
    RunCompensation,
    RunStep,
    StepInput,
    WorkflowInput,
    step_move,
    workflow_move,
)

__all__ = [
    "ACTIVE",
    "CLEAR_SCHEDULE",
    "MAX_INTERRUPTS",
    "MAX_JOB_ERROR",
    "MachineBase",
    "idempotency_key",
    "initial_state",
    "retry_targets",
]

W = WorkflowStatus
S = StepStatus
WI = WorkflowInput
SI = StepInput
# Enum members as constants: ``StepStatus.RUNNING`` is a descriptor call on every use.
_S_COMPENSATING = StepStatus.COMPENSATING
_S_FAILED = StepStatus.FAILED
_S_RETRYING = StepStatus.RETRYING
_S_RUNNING = StepStatus.RUNNING
_S_SKIPPED = StepStatus.SKIPPED
_S_SUCCEEDED = StepStatus.SUCCEEDED
_S_WAITING = StepStatus.WAITING
_W_COMPENSATING = WorkflowStatus.COMPENSATING
_W_FAILED = WorkflowStatus.FAILED
_W_PARKED = WorkflowStatus.PARKED
_W_RUNNING = WorkflowStatus.RUNNING
_C_RUNNING = CompPhase.RUNNING
_FX_EVENT, _FX_RUN_STEP, _FX_RUN_COMPENSATION = Fx.EVENT, Fx.RUN_STEP, Fx.RUN_COMPENSATION
_FX_DEAD_LETTER, _FX_ALERT = Fx.DEAD_LETTER, Fx.ALERT

MAX_INTERRUPTS = 3
"""Lease takeovers of one attempt tolerated before the attempt counts as failed."""
MAX_JOB_ERROR = 2000
"""Longest error a job source's failure report writes into a step (bounded state)."""

# Enum lookups by value through a dict: ``Enum(value)`` is slow on the hot path.
_WORKFLOW_STATUSES = {status.value: status for status in WorkflowStatus}
ACTIVE = (_S_WAITING, _S_RETRYING)
"""Step statuses that may still start (waiting for their turn or for a retry)."""


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


def initial_state(workflow: Workflow) -> WorkflowState:
    """The state of a just-submitted workflow: every step waiting."""
    return WorkflowState(dict.fromkeys(workflow.step_names, FRESH_STEP))


def retry_targets(status: WorkflowStatus, steps: Mapping[str, StepState]) -> list[str] | None:
    """The steps a retry re-runs: a parked workflow's failed and skipped steps, a failed
    workflow's exhausted compensations; None when a workflow in ``status`` cannot retry."""
    if status is _W_PARKED:
        return [name for name, s in steps.items() if s.status in (_S_FAILED, _S_SKIPPED)]
    if status is _W_FAILED:
        return [name for name, s in steps.items() if s.comp is not None and s.comp.exhausted]
    return None


# ------------------------------------------------------------------ machine


class MachineBase:
    """The state and moves of one workflow's machine (see ``SagaMachine``).

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

    def __init__(
        self,
        workflow: Workflow,
        workflow_id: str,
        status: str,
        state: WorkflowState | dict[str, JSON] | None,
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
        self._source: dict[str, JSON] | None = None
        if isinstance(state, WorkflowState):
            state = replace(state, steps=dict(state.steps))
        elif state:
            self._source = steps_wire(state)
            state = decode_state(state)
        else:
            state = WorkflowState({})
        self._decoded = dict(state.steps)
        self.state: WorkflowState = state
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

    def encoded_state(self) -> dict[str, JSON]:
        """``encode_state(self.state)``: the JSON to write back to the row (the steps
        this machine did not change keep the JSON they were decoded from)."""
        return encode_state(self.state, self._decoded, self._source)

    @property
    def steps(self) -> dict[str, StepState]:
        """``state.steps`` (read it; the machine replaces its items)."""
        return self.state.steps

    def running(self) -> list[tuple[str, int, bool]]:
        """(step, attempt, is_compensation) of every attempt the state says is running."""
        out: list[tuple[str, int, bool]] = []
        for name, s in self.state.steps.items():
            if s.status is _S_RUNNING:
                out.append((name, s.attempts, False))
            elif s.comp is not None and s.comp.phase is _C_RUNNING:
                out.append((name, s.comp.attempts, True))
        return out

    # -------------------------------------------------------------- planning
    def ready_steps(self, now: float) -> list[str]:
        """Forward steps that ``advance(now)`` would start (for breaker checks)."""
        if self.status != _W_RUNNING or self.state.halt:
            return []
        steps = self.state.steps
        definitions = self.workflow.steps
        ready = []
        for name in self.workflow.step_names:  # definition order (jsonb reorders keys)
            s = steps[name]
            status = s.status
            if status is not _S_WAITING and status is not _S_RETRYING:
                continue
            due = s.due_at
            if due is not None and due > now:
                continue
            for dep in definitions[name].depends_on:
                if steps[dep].status is not _S_SUCCEEDED:
                    break
            else:
                ready.append(name)
        return ready

    def advance(self, now: float) -> None:
        """Start what is ready, settle the workflow's status, compute ``due_at``."""
        if self.status == _W_RUNNING:
            self._advance_running(now)
        if self.status == _W_COMPENSATING:
            self._advance_compensating(now)
        self.due_at = self._next_due(now)

    def _advance_running(self, now: float) -> None:
        halt = self.state.halt
        steps = self.state.steps
        if halt:
            if any(s.status is _S_RUNNING for s in steps.values()):
                return  # let in-flight siblings settle first
            if halt == "park":
                self._workflow_to(WI.HALT_PARK, "a step failed; parked for retry")
                return
            self._workflow_to(WI.HALT_COMPENSATE, "a step failed; compensating")
            for name in list(steps):
                if steps[name].status in ACTIVE:
                    self._step_to(name, SI.SKIP)
            return
        if all(s.status is _S_SUCCEEDED for s in steps.values()):
            leaves = self.workflow.leaves
            self.result = (
                steps[leaves[0]].result
                if len(leaves) == 1
                else {leaf: steps[leaf].result for leaf in leaves}
            )
            self.progress = 1.0
            self.error = None
            self._workflow_to(WI.COMPLETE, "all steps succeeded")
            return
        for name in self.ready_steps(now):
            s = steps[name]
            attempt = s.attempts if s.resume else s.attempts + 1
            self._step_to(
                name, SI.START, attempts=attempt, resume=False, due_at=None, deferred=None
            )

    def _advance_compensating(self, now: float) -> None:
        steps = self.state.steps
        plan = plan_compensations(self.workflow, steps, now)
        if plan.blocked:
            return  # nothing is undone while a forward step may still succeed
        for name in plan.start:
            comp = steps[name].comp or Compensation()
            attempt = comp.attempts if comp.resume else comp.attempts + 1
            self._step_to(name, SI.COMPENSATE, comp=Compensation(attempt, _C_RUNNING))
        if any(s.comp is not None and s.comp.running for s in steps.values()):
            return
        if plan.failed:
            self._workflow_to(WI.COMPENSATION_FAILED, self.error or "compensation failed")
        elif not plan.pending:
            if self.state.cancel:
                self._workflow_to(WI.CANCEL_DONE, "cancelled and compensated")
            else:
                self._workflow_to(WI.COMPENSATION_DONE, "compensated")

    def _next_due(self, now: float) -> float | None:
        """When someone should next look at this workflow (None: only on request)."""
        if self.status.terminal or self.status == _W_PARKED:
            return None
        if self.running():
            return now  # claimable as soon as the holder's lease expires
        times: list[float] = []
        steps = self.state.steps
        if self.status == _W_RUNNING:
            deadline = self.state.deadline_at
            if deadline is not None:
                times.append(deadline)
            for name in self.workflow.step_names:
                s = steps[name]
                if s.status in ACTIVE and all(
                    steps[d].status is _S_SUCCEEDED for d in self.workflow.steps[name].depends_on
                ):
                    times.append(s.due_at or now)
        else:
            for s in steps.values():
                if s.status is _S_COMPENSATING:
                    times.append((s.comp.due_at if s.comp is not None else None) or now)
        return min(times) if times else now

    # -------------------------------------------------------------- helpers
    def _current(self, step: str, attempt: int) -> StepState | None:
        s = self.state.steps.get(step)
        if s is None or s.status is not _S_RUNNING or s.attempts != attempt:
            return None
        return s

    def _current_compensation(self, step: str, attempt: int) -> Compensation | None:
        s = self.state.steps.get(step)
        if s is None or s.status is not _S_COMPENSATING:
            return None
        comp = s.comp
        if comp is None or comp.phase is not _C_RUNNING or comp.attempts != attempt:
            return None
        return comp

    def _attempt_failed(
        self,
        step: str,
        error: str,
        now: float,
        *,
        permanent: bool = False,
        reason: str = "failed",
    ) -> None:
        attempt = self.state.steps[step].attempts
        policy = self.workflow.steps[step].retry
        if self.state.halt:
            self._step_to(step, SI.ABANDON, say_error=error, error=error)
        elif not permanent and attempt < policy.max_attempts:
            delay = self._delay(policy, attempt)
            self._step_to(
                step,
                SI.FAIL,
                say_error=error,
                error=error,
                due_at=now + delay,
                retry_delay=delay,
                interrupts=0,
            )
        else:
            if reason == "failed":
                reason = "attempts_exhausted"
            message = f"step {step} failed after {attempt} attempt(s): {error}"
            self._step_to(
                step,
                SI.EXHAUST,
                say_error=error,
                letter=DeadLetter(step, reason, attempt, error),
                alert=Alert("step_failed", message, self._details(step)),
                error=error,
            )
            self.state = replace(self.state, halt=self.workflow.on_failure)
            self.error = message

    def _details(self, step: str) -> dict[str, JSON]:
        # The tenant rides with every alert so a tenant admin sees only its own (issue 11).
        return {
            "tenant": self.tenant,
            "workflow_id": self.workflow_id,
            "workflow": self.workflow.name,
            "step": step,
        }

    def _workflow_to(
        self,
        event: WorkflowInput,
        reason: str,
        *,
        letter: DeadLetter | None = None,
        alert: Alert | None = None,
    ) -> None:
        """Move the workflow by ``event`` (``WORKFLOW_TABLE``) and carry out the move's
        effects: its ``workflow.status`` event (with ``reason``), ``letter``, ``alert``."""
        move = workflow_move(self.status, event)
        self.status = move.next
        for fx in move.effects:
            if fx is _FX_EVENT:
                self._effects.append(
                    EmitEvent(
                        events.WORKFLOW_CHANGED, {"status": str(self.status), "reason": reason}
                    )
                )
            else:
                self._give_up(fx, letter, alert)

    def _give_up(self, fx: Fx, letter: DeadLetter | None, alert: Alert | None) -> None:
        """The dead letter or the alert a move of giving up carries (built by the caller,
        which knows why)."""
        effect = letter if fx is _FX_DEAD_LETTER else alert if fx is _FX_ALERT else None
        if effect is None:
            raise AssertionError(f"the move's {fx} effect was not given")
        self._effects.append(effect)

    def _put(self, name: str, **changes: Any) -> StepState:
        """Replace step ``name`` with a copy carrying ``changes`` (no status change)."""
        s = replace(self.state.steps[name], **changes)
        self.state.steps[name] = s
        return s

    def _step_to(
        self,
        name: str,
        event: StepInput,
        *,
        say_error: str | None = None,
        say_result: JSON = None,
        letter: DeadLetter | None = None,
        alert: Alert | None = None,
        **changes: Any,
    ) -> StepState:
        """Move step ``name`` by ``event`` (``STEP_TABLE``) with ``changes``, and carry
        out the move's effects: its ``step.status`` event (``say_error``,
        ``say_result``), the attempt to start, ``letter`` and ``alert``."""
        s = self.state.steps[name]
        move = step_move(s.status, event)
        status = move.next
        s = replace(s, status=status, **changes)
        self.state.steps[name] = s
        for fx in move.effects:
            if fx is _FX_EVENT:
                if event in COMPENSATION_INPUTS:
                    attempt = s.comp.attempts if s.comp is not None else 0
                else:
                    attempt = s.attempts
                self._effects.append(
                    EmitEvent(
                        events.STEP_CHANGED,
                        {
                            "step": name,
                            "status": STATUS_TEXT[status],
                            "attempt": attempt,
                            "error": say_error,
                            "result": say_result,
                        },
                    )
                )
            elif fx is _FX_RUN_STEP:
                key = idempotency_key(self.workflow_id, name, tenant=self.tenant)
                self._effects.append(RunStep(name, s.attempts, key))
            elif fx is _FX_RUN_COMPENSATION:
                assert s.comp is not None
                key = idempotency_key(self.workflow_id, name, compensation=True, tenant=self.tenant)
                self._effects.append(RunCompensation(name, s.comp.attempts, key))
            else:
                self._give_up(fx, letter, alert)
        return s

    def _update_progress(self) -> None:
        steps = self.state.steps.values()
        values = [1.0 if s.status is _S_SUCCEEDED else float(s.progress or 0.0) for s in steps]
        self.progress = sum(values) / len(values) if values else 0.0


CLEAR_SCHEDULE: dict[str, Any] = {
    "due_at": None,
    "resume": False,
    "interrupts": 0,
    "deferred": None,
}
"""Step fields a stop, skip or retry forgets (when to run, how the attempt resumes)."""
